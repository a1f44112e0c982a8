#!/usr/bin/env python
"""Build the long-prompt evaluation set, `data/long_prompts/question.jsonl`, deterministically.

Each prompt asks something of one document (a summary, answers, a rewrite, extraction, a continuation; for code an
explanation, a review or a transformation: `hf_eagle3.data.document_tasks`), `--per_category` prompts per category,
listed category by category (so `--stride` in run_benchmark.py spreads a few prompts over all of them), each of
`--min_tokens` to `--max_tokens` tokens of the target's chat template. The documents are none that
`prepare-data --documents` trains on:

- prose: text files of the standard library that are no module (IDLE's NEWS, HISTORY, README, TODO and ChangeLog,
  the email package's architecture notes, Python's LICENSE with its history), the held-out Language Reference
  topics, and the target's own prose documents from `written_documents.jsonl`;
- code: the held-out standard library modules (`hf_eagle3.data.documents.held_out`) and the target's own code.

The standard library's files are those of the Python running the script (the set in the repository: Python 3.11).
`written_documents.jsonl` is kept in the repository, so a rebuild does not generate; `--write_documents N` has the
target write N new ones first (sampled with `--seed`, on the CPU in float32).

    python benchmarks/build_long_prompts.py                        # rebuild question.jsonl from the kept documents
    python benchmarks/build_long_prompts.py --write_documents 32   # first write new target documents
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import sysconfig
from pathlib import Path

import torch

from hf_eagle3.data.document_tasks import CATEGORIES, DOCUMENT_TASKS, document_prompt
from hf_eagle3.data.documents import (
    PYTHON_LICENSE,
    Document,
    pydoc_documents,
    split_document,
    stdlib_documents,
    synthesize_documents,
)

BENCHMARKS_DIR = Path(__file__).resolve().parent
SET_DIR = BENCHMARKS_DIR / "data" / "long_prompts"
# Standard library text that no training source reads (prepare-data takes modules, never idlelib).
PROSE_FILES = (
    "idlelib/NEWS.txt",
    "idlelib/NEWS2x.txt",
    "idlelib/HISTORY.txt",
    "idlelib/README.txt",
    "idlelib/TODO.txt",
    "idlelib/ChangeLog",
    "email/architecture.rst",
    "LICENSE.txt",
)


WRITTEN_REQUESTS_SEED_OFFSET = 1000  # the written documents are sampled apart from any training seed


def stdlib_prose() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [
        Document((root / name).read_text(encoding="utf-8"), f"stdlib:{name}", "prose", PYTHON_LICENSE)
        for name in PROSE_FILES
        if (root / name).is_file()
    ]


def read_written(path: Path) -> list[Document]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as file:
        return [Document(**json.loads(line)) for line in file if line.strip()]


def write_documents(count: int, path: Path, seed: int, gguf) -> list[Document]:
    """Have SmolLM2 write `count` documents (CPU, float32) and keep them in `path`."""
    from transformers import set_seed

    from hf_eagle3 import load_target

    model, tokenizer = load_target("smollm2", dtype="float32", device="cpu", gguf_path=gguf)
    set_seed(seed + WRITTEN_REQUESTS_SEED_OFFSET)
    documents = synthesize_documents(model, tokenizer, count, max_new_tokens=1000, batch_size=count)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for document in documents:
            file.write(json.dumps(dataclasses.asdict(document), ensure_ascii=False) + "\n")
    return documents


def prompt_tokens(tokenizer, prompt: str) -> int:
    """Tokens of the prompt as the benchmark feeds it: one user turn in the chat template, ready for the answer."""
    messages = [{"role": "user", "content": prompt}]
    return len(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def build(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoTokenizer

    written_path = args.output.parent / "written_documents.jsonl"
    written = (
        write_documents(args.write_documents, written_path, args.seed, args.gguf)
        if args.write_documents
        else read_written(written_path)
    )
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    if tokenizer is None:
        from hf_eagle3 import load_target

        _, tokenizer = load_target("smollm2", dtype="float32", device="cpu", gguf_path=args.gguf)
    pools = {
        "prose": stdlib_prose() + list(pydoc_documents(evaluation=True)) + [d for d in written if d.kind == "prose"],
        "code": list(stdlib_documents(evaluation=True)) + [d for d in written if d.kind == "code"],
    }
    rng = random.Random(args.seed)
    # Every chunk a document gives at the longest size, in a shuffled order; each is used once.
    chunks = {}
    for kind, documents in pools.items():
        pieces = [
            chunk
            for document in documents
            for chunk in split_document(tokenizer, document, args.max_tokens - 100, args.min_tokens, max_chunks=10)
        ]
        rng.shuffle(pieces)
        chunks[kind] = pieces
    rows = []
    for category in CATEGORIES:
        kind = next(kind for kind, tasks in DOCUMENT_TASKS.items() if any(task[0] == category for task in tasks))
        made = 0
        while made < args.per_category:
            if not chunks[kind]:
                raise SystemExit(f"Out of {kind} documents for {category!r}: lower --per_category.")
            chunk = chunks[kind].pop()
            # Varied lengths: the document cut to a budget drawn between the bounds, at a paragraph or line end.
            budget = rng.randint(args.min_tokens, args.max_tokens - 100)
            pieces = split_document(tokenizer, chunk, budget, args.min_tokens - 100, max_chunks=1) or [chunk]
            prompt = document_prompt(pieces[0], category, rng)
            tokens = prompt_tokens(tokenizer, prompt.prompt)
            if not args.min_tokens <= tokens <= args.max_tokens:
                continue
            made += 1
            rows.append(
                {
                    "question_id": len(rows) + 1,
                    "category": category,
                    "turns": [prompt.prompt],
                    "prompt_tokens": tokens,
                    "source": chunk.source,
                    "license": chunk.license or "written by SmolLM2-135M-Instruct",
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=SET_DIR / "question.jsonl")
    parser.add_argument("--per_category", type=int, default=10)
    parser.add_argument("--min_tokens", type=int, default=500)
    parser.add_argument("--max_tokens", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write_documents", type=int, default=0, help="have the target write this many first")
    parser.add_argument("--tokenizer", help="a tokenizer folder instead of SmolLM2's (whose GGUF --gguf finds)")
    parser.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file or a folder with it, when not cached")
    args = parser.parse_args(argv)
    rows = build(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    lengths = [row["prompt_tokens"] for row in rows]
    print(
        f"Wrote {len(rows)} prompts to {args.output}: {min(lengths)}-{max(lengths)} tokens, median "
        f"{statistics.median(lengths):.0f} (Python {sys.version.split()[0]}, torch {torch.__version__})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
