"""Chat data to token ids with an assistant-only loss mask, in the target's own chat template.

A head learns to draft what the target writes, so the loss covers the assistant turns only: their
content and the end-of-turn token that stops generation (a head that drafts it lets generation end
inside a draft). The separator a template prints after the end-of-turn token (ChatML's newline) is not
learned: the target never generates it.

`datasets` and `trl` are imported inside the functions that need them: a machine that only decodes or
trains from stored features may lack them, and the rest of the package must import there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..json_files import check_utf8, json_rows_problem

Message = dict[str, str]

# ShareGPT speakers -> chat-template roles. ShareGPT dumps name the assistant after the service it
# was collected from, so all of those map to "assistant".
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
CHAT_ROLES = {"system", "user", "assistant"}


def load_chat_dataset(data: str, split: str = "train"):
    """Load chat data from a JSONL/JSON/Parquet file (JSON also gzip-compressed), a `save_to_disk` folder,
    a dataset folder or a Hub id."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isfile(data):
        builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
        # `datasets` decompresses .gz files itself; the builder follows the extension beneath it.
        extension = os.path.splitext(data.removesuffix(".gz"))[1].lower()
        if extension not in builders or (data.endswith(".gz") and builders[extension] != "json"):
            raise ValueError(f"Unsupported data file {data!r}: use .jsonl, .json (optionally .gz) or .parquet.")
        if builders[extension] == "json":
            check_utf8(data)
        try:
            return load_dataset(builders[extension], data_files=data, split="train")
        except Exception as error:  # datasets' own errors name no file or row (an empty file: StopIteration)
            problem = json_rows_problem(data) if builders[extension] == "json" else None
            if problem is None:
                raise
            raise ValueError(problem) from error
    saved_markers = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes
    if os.path.isdir(data) and any(os.path.isfile(os.path.join(data, name)) for name in saved_markers):
        dataset = load_from_disk(data)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{data!r} has splits {sorted(dataset)}, not {split!r}: pass --split.")
            dataset = dataset[split]
        return dataset
    return load_dataset(data, split=split)


def _check_messages(messages: Any, source: str) -> list[Message]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"{source} must be a non-empty list of messages, got {messages!r}.")
    checked = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{source}: every message needs 'role' and 'content', got {message!r}.")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"{source}: unknown role {message['role']!r}; expected one of {sorted(CHAT_ROLES)}.")
        if not isinstance(message["content"], str):
            raise ValueError(f"{source}: message content must be text, got {type(message['content']).__name__}.")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def to_messages(example: Mapping[str, Any], index: int | None = None) -> list[Message]:
    """One row of chat data as a list of `{"role", "content"}` messages.

    Accepted layouts: `messages` (TRL/OpenAI conversational), `conversations` with `from`/`value`
    (ShareGPT), and `prompt` with an optional `completion` (TRL prompt-only and prompt-completion), each
    a message list or text. Prompt-only rows are for `regenerate_conversations` to answer.
    """
    source = "row" if index is None else f"row {index}"
    if example.get("messages") is not None:
        return _check_messages(example["messages"], f"{source} 'messages'")
    if example.get("conversations") is not None:
        turns = example["conversations"]
        if not isinstance(turns, Sequence) or isinstance(turns, str):
            raise ValueError(f"{source} 'conversations' must be a list of turns, got {turns!r}.")
        messages = []
        for turn in turns:
            if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
                raise ValueError(f"{source}: ShareGPT turns need 'from' and 'value', got {turn!r}.")
            speaker = str(turn["from"]).lower()
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(
                    f"{source}: unknown ShareGPT speaker {turn['from']!r}; expected {sorted(SHAREGPT_ROLES)}."
                )
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
        return _check_messages(messages, f"{source} 'conversations'")
    if example.get("prompt") is not None:
        # TRL's prompt(-completion) layouts, conversational (message lists) or plain text.
        prompt, completion = example["prompt"], example.get("completion")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if isinstance(completion, str):
            messages.append({"role": "assistant", "content": completion})
        elif completion is not None:
            messages += list(completion)
        return _check_messages(messages, f"{source} 'prompt'/'completion'")
    raise ValueError(
        f"{source} has columns {sorted(example)}; chat data needs 'messages' (role/content), 'conversations' "
        "(ShareGPT from/value) or 'prompt' (+ 'completion'), as text or message lists."
    )


def get_assistant_mask_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's chat template with `{% generation %}` markers, or None when none can be obtained.

    Markers are what `apply_chat_template(..., return_assistant_tokens_mask=True)` needs. The tokenizer's
    own template is used when it has them; otherwise TRL's patched training template for known
    templates. None means `tokenize_conversation` falls back to locating assistant turns itself.
    """
    if not tokenizer.chat_template:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, so there are no assistant turns to learn. "
            "Use the instruct model's tokenizer, or pass a Jinja template (`--chat_template FILE`)."
        )
    try:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    except ImportError:
        # TRL is optional (not every environment installs it); the rendered-prefix method gives the
        # same masks for every template it accepts, and refuses the others.
        return None
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template["default"]
    if has_generation_markers(template):
        return template
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        # TRL raises for templates it has no training variant of (SmolLM2's ChatML among them).
        return None


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_mask_by_prefixes(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> dict[str, list[int]]:
    """Assistant mask for templates without generation markers, from rendered prefixes of the conversation.

    The text an assistant message adds is what rendering the conversation through it adds to rendering
    the conversation before it with the generation prompt. That holds for any template that renders
    earlier turns the same whatever follows (prefix-preserving), which is checked, not assumed.
    """
    if not tokenizer.is_fast:
        raise ValueError("Locating assistant turns needs a fast tokenizer (character offsets); load it with use_fast.")
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:position], add_generation_prompt=True)
        through = _render(tokenizer, messages[: position + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "The chat template renders earlier turns differently depending on what follows (e.g. it drops "
                "reasoning from past turns), so assistant tokens cannot be located. Pass a template with "
                "{% generation %} / {% endgeneration %} around assistant output (`--chat_template FILE`)."
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    loss_mask = np.zeros(len(offsets), dtype=bool)
    for span_start, span_end in spans:  # a token belongs to a span when their characters overlap
        loss_mask |= (offsets[:, 0] < span_end) & (offsets[:, 1] > span_start)
    return {"input_ids": list(encoding["input_ids"]), "loss_mask": loss_mask.astype(int).tolist()}


def _drop_trailing_separators(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], loss_mask: list[int]) -> None:
    """Unmask whitespace-only tokens that end an assistant span (the separator after the end-of-turn token)."""
    padded = np.asarray([0, *loss_mask, 0], dtype=bool)
    for end in np.flatnonzero(padded[1:-1] & ~padded[2:]):  # last token of each span
        position = int(end)
        while position > 0 and loss_mask[position - 1] and not tokenizer.decode([input_ids[position]]).strip():
            loss_mask[position] = 0
            position -= 1


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], mask_template: str | None
) -> dict[str, list[int]]:
    """`input_ids`, `attention_mask` and `loss_mask` (1 on assistant tokens) of one conversation.

    Args:
        mask_template: `get_assistant_mask_template(tokenizer)`: a template with generation markers, or
            None to locate assistant turns from rendered prefixes.
    """
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(
            "conversation has no assistant message, so nothing to learn; add assistant turns or let the target "
            "write them (`--regenerate`)."
        )
    if mask_template is None:
        encoded = _assistant_mask_by_prefixes(tokenizer, messages)
    else:
        # apply_chat_template tokenises without adding special tokens: the template already has them.
        output = tokenizer.apply_chat_template(
            messages, chat_template=mask_template, return_dict=True, return_assistant_tokens_mask=True
        )
        encoded = {"input_ids": list(output["input_ids"]), "loss_mask": list(output["assistant_masks"])}
    _drop_trailing_separators(tokenizer, encoded["input_ids"], encoded["loss_mask"])
    if not any(encoded["loss_mask"]):
        raise ValueError(
            "the chat template marked no assistant tokens; check that it prints assistant content "
            "(or pass one that does with `--chat_template FILE`)."
        )
    encoded["attention_mask"] = [1] * len(encoded["input_ids"])
    return encoded


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    mask_template: str | None,
    max_length: int | None,
    truncate: bool,
) -> dict[str, list]:
    """`Dataset.map` body: tokenise a batch of conversations; `status` says which are kept (0), too long (1) or
    left without assistant tokens by truncation (2)."""
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "loss_mask": [], "status": []}
    for index, messages in zip(indices, batch["messages"], strict=True):
        try:
            encoded = tokenize_conversation(tokenizer, messages, mask_template)
        except ValueError as error:
            raise ValueError(f"Conversation {index}: {error}") from error
        status = 0
        if max_length is not None and len(encoded["input_ids"]) > max_length:
            encoded = {name: values[:max_length] for name, values in encoded.items()}
            status = 1 if not truncate else 0 if any(encoded["loss_mask"]) else 2
        for name, values in encoded.items():
            columns[name].append(values if status == 0 else [])
        columns["status"].append(status)
    return columns


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[list[Message]],
    max_length: int | None = None,
    truncate: bool = False,
    num_proc: int | None = None,
):
    """Tokenise conversations into a `datasets.Dataset` of `input_ids`, `attention_mask`, `loss_mask`.

    Conversations longer than `max_length` tokens are dropped, as the official EAGLE code does, or cut to
    `max_length` with `truncate=True` (dropped anyway when no assistant token survives the cut). Runs as a
    batched `Dataset.map`, in `num_proc` processes when given.

    Returns:
        The dataset and counts: conversations seen, kept, dropped as too long, dropped for no assistant token
        left after truncation, and the tokens and loss-masked tokens kept.
    """
    from datasets import Dataset, Features, Sequence, Value

    mask_template = get_assistant_mask_template(tokenizer)
    messages = [[{"role": m["role"], "content": m["content"]} for m in conversation] for conversation in conversations]
    # int32 ids and int8 masks: a quarter of the default int64 on disk (rows still read back as Python ints).
    features = Features(
        {
            "input_ids": Sequence(Value("int32")),
            "attention_mask": Sequence(Value("int8")),
            "loss_mask": Sequence(Value("int8")),
            "status": Value("int8"),
        }
    )
    tokenized = Dataset.from_dict({"messages": messages}).map(
        _tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=["messages"],
        features=features,
        num_proc=num_proc if num_proc and num_proc > 1 and len(messages) > 1 else None,
        fn_kwargs=dict(tokenizer=tokenizer, mask_template=mask_template, max_length=max_length, truncate=truncate),
        desc="Tokenising conversations",
    )
    status = np.asarray(tokenized["status"])
    dataset = tokenized.select(np.flatnonzero(status == 0)).remove_columns("status")
    counts = {
        "conversations": len(messages),
        "kept": int((status == 0).sum()),
        "dropped_too_long": int((status == 1).sum()),
        "dropped_no_loss_tokens": int((status == 2).sum()),
        "tokens": sum(len(ids) for ids in dataset["input_ids"]),
        "loss_tokens": sum(sum(mask) for mask in dataset["loss_mask"]),
    }
    if not counts["kept"]:
        raise ValueError(
            f"No conversation left to train on ({counts}). Raise max_length or pass truncate=True (`--truncate`)."
        )
    return dataset, counts
