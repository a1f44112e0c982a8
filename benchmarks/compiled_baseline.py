#!/usr/bin/env python
"""transformers' compiled static-cache `generate` on its own, in the configurations a user might choose.

The speedups of `run_benchmark.py measure` divide by its `plain_compiled` method; this script measures the same
target and prompts standalone, so that divisor can be checked against transformers at its best. A configuration is
`CACHE:COMPILE[:forced]`:

- CACHE `exact`: each prompt with a static cache sized for it alone (prompt + new tokens), warmed up on the same
  input (the best one call can do, at the price of a compilation per new length); `bucket`: sized per prompt and
  rounded up to 64 positions, every length warmed up first; `shared`: one length for every prompt (the longest
  prompt plus the new tokens), warmed up once on the longest prompt (what `plain_compiled` does);
- COMPILE `default`: transformers' `CompileConfig()`; `fullgraph`: `CompileConfig(fullgraph=True, dynamic=False)`;
- `forced`: `min_new_tokens` makes every call produce all its tokens (EOS ends some answers early, and the per-call
  cost of `generate` and the prefill is then spread over fewer tokens).

Per configuration it reports tokens/s over all calls (each row counted to its EOS), the time of one decoding step
(the difference between a call that makes all the tokens and one that makes a single token, divided by the steps in
between; one token of every row) and the graphs torch.compile compiled inside the timed calls (zero when nothing
recompiles).

`--batch_sizes` measures left-padded batches too, the batched baseline of `run_benchmark.py measure-batch`: at
batch size B the prompts, cycled to whole batches, are decoded B rows per call (batch 1: each prompt once), so
`--limit N --stride 1` here decodes the rows that `measure-batch --limit N --rows N` decodes at every size.

    python benchmarks/compiled_baseline.py --gguf PIECE... --configs bucket:fullgraph exact:fullgraph exact:default
    python benchmarks/compiled_baseline.py --gguf PIECE... --batch_sizes 1 4 16 32 --limit 32 --stride 1 \
        --configs shared:default shared:default:forced
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
# The `bucket` configuration's cache lengths are multiples of this.
CACHE_BUCKET = 64
sys.path.insert(0, str(BENCHMARKS_DIR))

from run_benchmark import (  # noqa: E402
    DATA_DIR,
    RESULTS_DIR,
    _synchronize,
    batch_pad_token_id,
    batch_rows,
    compiled_graphs,
    encode_batch,
    environment,
    gguf_location,
    load_prompts,
    row_tokens,
)


def timed_generate(target, inputs, eos_token_id: int | None, **kwargs) -> tuple[float, int, int, int]:
    """Seconds, new tokens (each row's, to its EOS), decoding steps and newly compiled graphs of one `generate` call."""
    graphs = compiled_graphs()
    _synchronize(target.device)
    start = time.perf_counter()
    output = target.generate(**inputs, do_sample=False, **kwargs)
    _synchronize(target.device)
    seconds = time.perf_counter() - start
    new_ids = output[:, inputs["input_ids"].shape[1] :].cpu()
    tokens = sum(len(row) for row in row_tokens(new_ids, eos_token_id))
    return seconds, tokens, new_ids.shape[1], compiled_graphs() - graphs


def host_speed_ms(repeats: int = 5) -> float:
    """Best time of a fixed host-side workload (tiny tensor ops and Python, as in a decoding loop's bookkeeping).

    Batch-1 decoding of a small model is bound by the host, so a row's time per token moves with the host's speed at
    that moment; this index, measured right after each row's timed calls, shows whether a spread between rows is the host's.
    """
    a, b = torch.ones(1), torch.ones(1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(2000):
            a = torch.add(a, b).mul_(0.5)
        best = min(best, time.perf_counter() - start)
    return round(1000 * best, 3)


def measure_configuration(
    target, encoded: list, max_new_tokens: int, configuration: str, pad_token_id: int, eos_token_id: int | None
) -> dict:
    """One configuration over the calls' inputs (a prompt or a left-padded batch each): untimed warm-ups, then a timed
    full call and a timed one-token call each."""
    from transformers import CompileConfig

    cache, compile_name, *rest = configuration.split(":")
    forced = rest == ["forced"]
    compile_config = CompileConfig(fullgraph=True, dynamic=False) if compile_name == "fullgraph" else CompileConfig()
    longest = max(inputs["input_ids"].shape[1] for inputs in encoded)
    lengths = {
        "exact": lambda length: length + max_new_tokens,
        "bucket": lambda length: -(-(length + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET,
        "shared": lambda length: longest + max_new_tokens,
    }[cache]
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(encoded) + 1)
    static = {"cache_implementation": "static", "compile_config": compile_config, "pad_token_id": pad_token_id}
    calls = [
        (inputs, {**static, "max_cache_len": size})
        for inputs in encoded
        for size in [lengths(inputs["input_ids"].shape[1])]
    ]
    full = {"max_new_tokens": max_new_tokens, **({"min_new_tokens": max_new_tokens} if forced else {})}
    # Every cache length the timed calls meet, at full length, before any timing (the longest prompt per length).
    warm_ups = {}
    for inputs, kwargs in sorted(calls, key=lambda call: call[0]["input_ids"].shape[1]):
        warm_ups[kwargs["max_cache_len"]] = (inputs, kwargs)
    for inputs, kwargs in warm_ups.values():
        target.generate(**inputs, do_sample=False, **kwargs, **full)
    seconds = tokens = graphs = 0
    per_token_ms = []
    for inputs, kwargs in calls:
        call_seconds, call_tokens, steps, call_graphs = timed_generate(target, inputs, eos_token_id, **kwargs, **full)
        one_seconds, _, _, one_graphs = timed_generate(target, inputs, eos_token_id, **kwargs, max_new_tokens=1)
        seconds += call_seconds
        tokens += call_tokens
        graphs += call_graphs + one_graphs
        if steps > 1:
            per_token_ms.append(1000 * (call_seconds - one_seconds) / (steps - 1))
    return {
        "configuration": configuration,
        "host_speed_ms": host_speed_ms(),
        "batch_size": encoded[0]["input_ids"].shape[0],
        "calls": len(encoded),
        "cache_lengths": sorted(warm_ups),
        "tokens_per_s": round(tokens / seconds, 2),
        "new_tokens": tokens,
        "decode_ms_per_token": round(sum(per_token_ms) / len(per_token_ms), 3),
        "compiled_graphs_in_timed_calls": graphs,
    }


def main(argv: list[str] | None = None) -> int:
    from hf_eagle3.offline_models import load_target

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--gguf", nargs="+", type=Path, help="the GGUF file or its pieces in order")
    parser.add_argument("--prompts", type=Path, default=DATA_DIR / "mt_bench" / "question.jsonl")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--configs", nargs="+", default=["bucket:fullgraph", "exact:fullgraph", "exact:default", "shared:default"]
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure each configuration this many times, each compiled afresh (the spread between compilations)",
    )
    parser.add_argument(
        "--batch_sizes", nargs="+", type=int, default=[1], help="rows per call (left-padded batches of the prompts)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "compiled-baseline.json")
    args = parser.parse_args(argv)

    target, tokenizer = load_target(args.target, dtype=args.dtype, device=args.device, gguf_path=gguf_location(args))
    prompts = load_prompts(args.prompts, args.limit, args.stride)
    rows = []
    for batch_size in args.batch_sizes:
        batches = batch_rows(prompts, batch_size, len(prompts))
        encoded = [encode_batch(tokenizer, batch, target.device) for batch in batches]
        for configuration in [name for name in args.configs for _ in range(args.repeats)]:
            row = measure_configuration(
                target,
                encoded,
                args.max_new_tokens,
                configuration,
                batch_pad_token_id(tokenizer),
                tokenizer.eos_token_id,
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    payload = {
        **environment(),
        "command": " ".join(["compiled_baseline.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "prompts": str(args.prompts)},
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
