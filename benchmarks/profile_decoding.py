#!/usr/bin/env python
"""Where one EAGLE-3 decoding step spends its time, beyond the two model forwards.

Runs plain, tree and chain decoding on a target and head for a few MT-bench prompts and reports, per
verification step (one target forward):

- time: drafting (head forwards, tree building / chain drafting), verification (the target forward) and
  bookkeeping (everything else: processors, acceptance walk, cache compaction, statistics, stopping
  criteria, streamer, transformers' loop);
- counts: head and target forwards, tensor operations per phase (in eager mode each one is a kernel launch,
  which is what bounds a small model on a GPU, where a forward costs about the same for 1 or 128 tokens),
  and host-device synchronisations (`.item()`, `.tolist()`, `bool(tensor)`, `nonzero`,
  boolean indexing, ...), by the source line that caused them: each one stalls the launch queue on a GPU;
- Python: self time of hf_eagle3's own functions (cProfile).

Timing, counting and cProfile are separate passes over the same prompts, so the instrumentation of one does
not distort another. On CUDA the timing pass synchronises at phase boundaries and the counting pass also
records every synchronisation the CUDA runtime reports (`torch.cuda.set_sync_debug_mode`).

    OMP_NUM_THREADS=1 python benchmarks/profile_decoding.py --target tiny
    OMP_NUM_THREADS=1 python benchmarks/profile_decoding.py --target smollm2 --prompts 2 --max_new_tokens 32
    python benchmarks/profile_decoding.py --target smollm2 --device cuda --dtype bfloat16 --max_new_tokens 256

`--target tiny` is a random 30-layer Llama with SmolLM2's vocabulary but a 64-wide residual stream: its
forwards cost almost no arithmetic, so on a CPU it shows the overhead a GPU run is bound by.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hf_eagle3
from hf_eagle3 import Eagle3Config, Eagle3DraftModel
from hf_eagle3.decoding import dynamic_tree, tree_loop
from hf_eagle3.decoding.candidate_generator import Eagle3CandidateGenerator

BENCHMARKS_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = str(Path(hf_eagle3.__file__).resolve().parent)
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
PROMPTS_FILE = BENCHMARKS_DIR / "data" / "mt_bench" / "question.jsonl"
MODES = ("plain", "tree", "chain")
PHASES = ("drafting", "verification", "bookkeeping")
# Left out of the per-step figures.
ONCE_PER_CALL = ("setup", "prefill")
# Operations that make the host wait for the device: a scalar read (`item`, `int()`, `bool()`), or an output
# whose size depends on the data.
SYNCING_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique_consecutive",
    "aten._unique2",
    "aten.unique_dim",
    "aten.repeat_interleave",
}
# Tensor methods that copy to the host without dispatching an operation on a CPU tensor.
HOST_COPY_METHODS = ("tolist", "cpu", "numpy")


# ---------------------------------------------------------------------------------------------- phases
class PhaseClock:
    """Exclusive time per phase: a nested phase (a head forward inside tree building) pauses its parent.

    Time outside every phase is bookkeeping. `sync` makes each boundary wait for the device, so a phase's time
    includes the device work it launched (CUDA); on the CPU it is a no-op.
    """

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._stack: list[str] = []
        self._since = time.perf_counter()

    @property
    def current(self) -> str:
        if self._stack:
            return self._stack[-1]
        # Before the prefill: `generate`'s and the candidate generator's one-off checks.
        return "bookkeeping" if self.calls["prefill"] else "setup"

    def flush(self) -> None:
        """Book the time since the last boundary to the current phase."""
        self.sync()
        now = time.perf_counter()
        self.seconds[self.current] += now - self._since
        self._since = now

    def enter(self, phase: str) -> None:
        self.flush()
        self._stack.append(phase)
        self.calls[phase] += 1

    def exit(self) -> None:
        self.flush()
        self._stack.pop()

    def reset(self) -> None:
        self.flush()
        self.seconds.clear()
        self.calls.clear()


@contextmanager
def instrumented(clock: PhaseClock, target: torch.nn.Module, head: Eagle3DraftModel) -> Iterator[None]:
    """Attribute time to phases: target forwards, head forwards, tree building and chain drafting.

    The first target forward after `clock.reset()` is the prefill, kept apart from the per-step figures.
    """

    def target_pre_hook(*_):
        clock.enter("target_forward" if clock.calls["prefill"] else "prefill")

    def wrap(function: Callable, phase: str) -> Callable:
        def wrapper(*args, **kwargs):
            clock.enter(phase)
            try:
                return function(*args, **kwargs)
            finally:
                clock.exit()

        return wrapper

    handles = [
        target.register_forward_pre_hook(target_pre_hook),
        target.register_forward_hook(lambda *_: clock.exit()),
        head.register_forward_pre_hook(lambda *_: clock.enter("head_forward")),
        head.register_forward_hook(lambda *_: clock.exit()),
    ]
    build_draft_tree, get_candidates = dynamic_tree.build_draft_tree, Eagle3CandidateGenerator.get_candidates
    dynamic_tree.build_draft_tree = wrap(build_draft_tree, "tree_building")
    Eagle3CandidateGenerator.get_candidates = wrap(get_candidates, "chain_drafting")
    try:
        yield
    finally:
        dynamic_tree.build_draft_tree, Eagle3CandidateGenerator.get_candidates = build_draft_tree, get_candidates
        for handle in handles:
            handle.remove()


def phase_of(detail: str) -> str:
    """The report's three phases from the clock's detailed ones."""
    if detail in ("head_forward", "tree_building", "chain_drafting"):
        return "drafting"
    if detail == "target_forward":
        return "verification"
    return detail  # "setup", "prefill" and "bookkeeping"


# ---------------------------------------------------------------------------------------------- counting
def caller() -> str:
    """`file:line` of the innermost frame outside torch (and outside this script's hooks)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(TORCH_DIR) or frame.filename == __file__:
            continue
        filename = frame.filename
        for marker in ("/hf_eagle3/", "/transformers/"):
            if marker in filename:
                filename = marker.strip("/") + "/" + filename.split(marker, 1)[1]
                break
        return f"{filename}:{frame.lineno}"
    return "?"


def owner(location: str) -> str:
    return location.split("/", 1)[0] if location.startswith(("hf_eagle3/", "transformers/")) else "other"


class OpCounter(TorchDispatchMode):
    """Counts tensor operations per phase (view-only ones excluded: they launch nothing) and syncing ones."""

    def __init__(self, clock: PhaseClock):
        super().__init__()
        self.clock = clock
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[tuple[str, str]] = Counter()  # (phase, source line)

    def record_sync(self) -> None:
        self.syncs[(self.clock.current, caller())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        boolean_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
        )
        if name in SYNCING_OPS or boolean_index:
            self.record_sync()
        if not func.is_view:
            self.ops[self.clock.current] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_host_copies(counter: OpCounter) -> Iterator[None]:
    """Count `.tolist()`, `.cpu()` and `.numpy()` too: on a CPU tensor they dispatch nothing, on CUDA they sync."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPY_METHODS}

    def counted(method: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            counter.record_sync()
            return method(self, *args, **kwargs)

        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@contextmanager
def counting_cuda_syncs(counter: Counter) -> Iterator[None]:
    """Every synchronisation the CUDA runtime reports, by source line (CUDA only)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if "synchronizing" in str(warning.message):
            counter[f"{Path(warning.filename).name}:{warning.lineno}"] += 1


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class ModeReport:
    """Per-step figures of one decoding mode over all prompts."""

    mode: str
    new_tokens: int = 0
    steps: int = 0  # target forwards after the prefill
    seconds: float = 0.0
    seconds_by_detail: Counter[str] = field(default_factory=Counter)  # PhaseClock's phases, prefill included
    head_forwards: int = 0
    ops_by_detail: Counter[str] = field(default_factory=Counter)  # decoding steps only
    syncs: dict[str, int] = field(default_factory=dict)  # owner -> count, decoding steps only
    top_syncs: list[tuple[str, str, int]] = field(default_factory=list)
    cuda_syncs: int | None = None
    python_self_seconds: dict[str, float] = field(default_factory=dict)
    top_functions: list[tuple[str, float, float]] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)

    def per_step(self, value: float) -> float:
        return value / self.steps if self.steps else float("nan")

    @staticmethod
    def by_phase(by_detail: Counter[str]) -> Counter[str]:
        totals: Counter[str] = Counter()
        for detail, value in by_detail.items():
            totals[phase_of(detail)] += value
        return totals

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "tokens_per_step": self.per_step(self.new_tokens - self.outputs_count()),
            "tokens_per_second": self.new_tokens / self.seconds if self.seconds else None,
            "setup_and_prefill_ms": 1e3
            * sum(self.seconds_by_detail[detail] for detail in ONCE_PER_CALL)
            / max(len(self.outputs), 1),
            "ms_per_step": {
                phase: 1e3 * self.per_step(s)
                for phase, s in self.by_phase(self.seconds_by_detail).items()
                if phase not in ONCE_PER_CALL
            },
            "ms_per_step_detail": {
                detail: 1e3 * self.per_step(s)
                for detail, s in self.seconds_by_detail.items()
                if detail not in ONCE_PER_CALL
            },
            "head_forwards_per_step": self.per_step(self.head_forwards),
            "ops_per_step": {phase: self.per_step(n) for phase, n in self.by_phase(self.ops_by_detail).items()},
            "ops_per_step_detail": {detail: self.per_step(n) for detail, n in self.ops_by_detail.items()},
            "syncs_per_step": {who: self.per_step(n) for who, n in self.syncs.items()},
            "cuda_syncs_per_step": self.per_step(self.cuda_syncs) if self.cuda_syncs is not None else None,
            "top_syncs": self.top_syncs,
            "python_self_ms_per_step": {who: 1e3 * self.per_step(s) for who, s in self.python_self_seconds.items()},
            "top_functions": self.top_functions,
        }

    def outputs_count(self) -> int:
        """The prefill emits one token per prompt: not a step's."""
        return len(self.outputs)


def generate_kwargs(mode: str, head: Eagle3DraftModel, args: argparse.Namespace) -> dict:
    kwargs = {"do_sample": False, "max_new_tokens": args.max_new_tokens}
    if mode == "tree":
        total_tokens, depth, top_k = args.tree
        kwargs.update(assistant_model=head, eagle3_total_tokens=total_tokens, eagle3_depth=depth, eagle3_top_k=top_k)
    elif mode == "chain":
        kwargs.update(assistant_model=head, eagle3_mode="chain", num_assistant_tokens=args.chain_length)
    return kwargs


def run_mode(mode: str, target, head, prompts: list[dict], args: argparse.Namespace) -> ModeReport:
    """The timing, counting and cProfile passes of one mode."""
    device = target.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    kwargs = generate_kwargs(mode, head, args)
    report = ModeReport(mode)

    # Timing pass.
    clock = PhaseClock(sync)
    with instrumented(clock, target, head):
        for inputs in prompts:
            clock.reset()
            start = time.perf_counter()
            output = target.generate(**inputs, **kwargs)
            sync()
            report.seconds += time.perf_counter() - start
            clock.flush()
            report.seconds_by_detail.update(clock.seconds)
            report.steps += clock.calls["target_forward"]
            report.head_forwards += clock.calls["head_forward"]
            new = output[0, inputs["input_ids"].shape[1] :].tolist()
            report.outputs.append(new)
            report.new_tokens += len(new)

    # Counting pass: operations and syncs of the decoding steps (the prefill's are left out).
    clock = PhaseClock(lambda: None)
    counter = OpCounter(clock)
    cuda_syncs: Counter[str] = Counter()
    with instrumented(clock, target, head), ExitStack() as stack:
        stack.enter_context(counting_host_copies(counter))
        if device.type == "cuda":
            stack.enter_context(counting_cuda_syncs(cuda_syncs))
        stack.enter_context(counter)
        for inputs in prompts:
            clock.reset()
            target.generate(**inputs, **kwargs)
    report.ops_by_detail = Counter({detail: n for detail, n in counter.ops.items() if detail not in ONCE_PER_CALL})
    syncs = Counter()
    by_line: Counter[tuple[str, str]] = Counter()
    for (detail, location), count in counter.syncs.items():
        if detail in ONCE_PER_CALL:
            continue
        syncs[owner(location)] += count
        by_line[(phase_of(detail), location)] += count
    report.syncs = dict(syncs)
    report.top_syncs = [(phase, location, count) for (phase, location), count in by_line.most_common(12)]
    if device.type == "cuda":
        report.cuda_syncs = sum(cuda_syncs.values())

    # cProfile pass: Python self time by package, and our slowest functions.
    profiler = cProfile.Profile()
    profiler.enable()
    for inputs in prompts:
        target.generate(**inputs, **kwargs)
    sync()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    self_seconds: Counter[str] = Counter()
    ours = []
    for (filename, line, name), (_, _, tottime, cumtime, _) in stats.items():
        if PACKAGE_DIR in filename:
            self_seconds["hf_eagle3"] += tottime
            ours.append((f"{Path(filename).name}:{line}({name})", tottime, cumtime))
        elif "/transformers/" in filename:
            self_seconds["transformers"] += tottime
        elif filename == "~":
            self_seconds["builtins (torch ops)"] += tottime
        else:
            self_seconds["other python"] += tottime
    report.python_self_seconds = dict(self_seconds)
    report.top_functions = [
        (where, 1e3 * tot, 1e3 * cum) for where, tot, cum in sorted(ours, key=lambda f: -f[1])[:10]
    ]
    return report


# ---------------------------------------------------------------------------------------------- models
def load_models(args: argparse.Namespace):
    """The target (and its tokenizer, None for `tiny`) and the head on the requested device and dtype."""
    dtype = getattr(torch, args.dtype)
    tokenizer = None
    if args.target == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=30,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=True,
            attn_implementation=args.attn_implementation,
        )
        target = LlamaForCausalLM(config).to(dtype)
    else:
        from hf_eagle3.offline_models import load_target

        target, tokenizer = load_target(
            args.target, dtype=dtype, verbose=False, attn_implementation=args.attn_implementation
        )
    target = target.to(args.device).eval()

    head_path = args.head
    if head_path is None and args.target != "tiny":
        from hf_eagle3.offline_models import shipped_head_path

        shipped = shipped_head_path(args.target)
        head_path = shipped if shipped is not None and (shipped / "config.json").is_file() else None
    if head_path is not None:
        head = Eagle3DraftModel.from_pretrained(head_path, dtype=dtype)
        head_name = str(head_path)
    else:
        # Random weights draft almost nothing acceptable, but cost what a trained head costs per step.
        torch.manual_seed(0)
        config = Eagle3Config.from_target_config(target.config, draft_vocab_size=args.draft_vocab_size)
        head = Eagle3DraftModel(config)
        ids = torch.randperm(config.vocab_size)[: config.draft_vocab_size].sort().values
        head.d2t.copy_(ids - torch.arange(config.draft_vocab_size))
        head.t2d.zero_()
        head.t2d[ids] = True
        head = head.to(dtype)
        head_name = f"random (draft vocabulary {args.draft_vocab_size})"
    head = head.to(args.device).eval().attach_target(target)
    return target, tokenizer, head, head_name


def load_prompts(target, tokenizer, args: argparse.Namespace) -> list[dict]:
    """Chat-templated MT-bench first turns (random ids for `tiny`), on the target's device."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return [
            {"input_ids": torch.randint(3, target.config.vocab_size, (1, 64), generator=generator).to(target.device)}
            for _ in range(args.prompts)
        ]
    prompts = []
    with PROMPTS_FILE.open() as file:
        for line in file:
            question = json.loads(line)["turns"][0]
            messages = [{"role": "user", "content": question}]
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            prompts.append({name: tensor.to(target.device) for name, tensor in inputs.items()})
            if len(prompts) == args.prompts:
                break
    return prompts


# ---------------------------------------------------------------------------------------------- report
def format_report(reports: list[ModeReport], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| mode | tokens/s | tokens/step | ms/step: drafting | verification | bookkeeping | head fwd/step "
        "| ops/step: drafting | verification | bookkeeping | syncs/step: hf_eagle3 | transformers | other "
        "| Python self ms/step: hf_eagle3 | transformers |"
    )
    lines.append("|" + "---|" * 15)
    for report in reports:
        row = report.to_dict()
        ms, ops, syncs, py = (
            row["ms_per_step"],
            row["ops_per_step"],
            row["syncs_per_step"],
            row["python_self_ms_per_step"],
        )
        cells = [
            report.mode,
            f"{row['tokens_per_second']:.1f}",
            f"{row['tokens_per_step']:.2f}",
            *(f"{ms.get(phase, 0.0):.2f}" for phase in PHASES),
            f"{row['head_forwards_per_step']:.1f}",
            *(f"{ops.get(phase, 0.0):.0f}" for phase in PHASES),
            *(f"{syncs.get(who, 0.0):.1f}" for who in ("hf_eagle3", "transformers", "other")),
            f"{py.get('hf_eagle3', 0.0):.2f}",
            f"{py.get('transformers', 0.0):.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for report in reports:
        row = report.to_dict()
        details = ", ".join(
            f"{detail} {ms:.2f} ms / {row['ops_per_step_detail'].get(detail, 0.0):.0f} ops"
            for detail, ms in row["ms_per_step_detail"].items()
        )
        lines += [
            "",
            f"{report.mode}: per step {details}; setup and prefill {row['setup_and_prefill_ms']:.1f} ms per prompt",
        ]
        lines.append(f"{report.mode}: syncs per step by source line (decoding steps only)")
        lines += [f"  {count / report.steps:6.2f}  {phase:13s} {where}" for phase, where, count in report.top_syncs]
        if report.cuda_syncs is not None:
            lines.append(f"  CUDA runtime reported {report.cuda_syncs / report.steps:.2f} synchronisations per step")
        if report.top_functions:
            lines.append(f"{report.mode}: hf_eagle3 functions by Python self time (ms per step: self, cumulative)")
            lines += [
                f"  {tot / report.steps:7.3f} {cum / report.steps:8.3f}  {where}"
                for where, tot, cum in report.top_functions
            ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="tiny", help="'tiny' (overhead proxy), 'smollm2', a GGUF or a folder")
    parser.add_argument("--head", default=None, help="head folder (default: the shipped head, else a random one)")
    parser.add_argument("--draft_vocab_size", type=int, default=8192, help="of the random head")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--tree", type=int, nargs=3, default=(60, 7, 10), metavar=("TOTAL", "DEPTH", "TOP_K"))
    parser.add_argument("--chain_length", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument(
        "--accelerator_paths",
        action="store_true",
        help="on the CPU, accept through the path used on accelerators (one host read per greedy step), to count "
        "its operations and syncs here",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.accelerator_paths:
        # `_uses_batched_greedy` keeps the node-by-node walk on the CPU, where host reads cost nothing.
        tree_loop.uses_batched_greedy = lambda do_sample, processors, device: not do_sample and not processors
    target, tokenizer, head, head_name = load_models(args)
    prompts = load_prompts(target, tokenizer, args)
    # Warm-up: first calls pay one-time costs (kernel selection, lazy imports, allocator growth).
    for mode in args.modes:
        target.generate(**prompts[0], **{**generate_kwargs(mode, head, args), "max_new_tokens": 8})
    reports = [run_mode(mode, target, head, prompts, args) for mode in args.modes]
    plain = next((report for report in reports if report.mode == "plain"), None)
    header = (
        f"target {args.target}, head {head_name}, {args.device} {args.dtype} {args.attn_implementation}, "
        f"torch threads {torch.get_num_threads()}, {len(prompts)} prompts x {args.max_new_tokens} new tokens, "
        f"tree {tuple(args.tree)}, chain {args.chain_length}"
        + (", accelerator acceptance path" if args.accelerator_paths else "")
    )
    print(format_report(reports, header))
    if plain is not None:
        for report in reports:
            if report is not plain and report.outputs != plain.outputs:
                print(f"NOTE: {report.mode} text differs from plain generate's", file=sys.stderr)
    if args.json is not None:
        payload = {"settings": vars(args) | {"tree": list(args.tree), "json": str(args.json), "head": head_name}}
        payload["results"] = [
            report.to_dict() | {"same_text_as_plain": report.outputs == plain.outputs if plain else None}
            for report in reports
        ]
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
