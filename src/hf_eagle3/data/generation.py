"""Training text written by the target itself: regenerated answers and self-synthesised prompts.

A head is trained to predict the target's own next tokens, so it learns best from text the target
wrote (the EAGLE papers regenerate every answer with the target). With an instruct target not even
prompts are needed: Magpie (arXiv 2406.08464) feeds the chat template up to the start of a user
turn and the model writes a plausible user question, which it then answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .chat import Message

logger = logging.get_logger(__name__)

# A user message no template will alter, used to find where user content starts.
_SENTINEL = "hf_eagle3_user_message_sentinel"


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a turn: the model's generation config may list several (Llama 3: eot and eos)."""
    configured = model.generation_config.eos_token_id
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("Neither the model's generation config nor the tokenizer names an end-of-sequence token.")
    return ids


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    description: str | None = "Generating",
) -> tuple[list[str], list[bool]]:
    """Continue already-rendered prompts in batches; greedy when `temperature == 0`.

    Prompts are tokenised without extra special tokens (rendered chat templates carry their own BOS),
    left-padded on the model's device, and each continuation is cut at its first end-of-turn token.
    `description` labels the progress bar over batches; None shows none.

    Returns:
        The continuations, and for each whether it ended with an end-of-turn token (False: cut at
        `max_new_tokens`).
    """
    stop_ids = _stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    # Batching prompts of similar length wastes less compute on padding; longest first, so running out of
    # memory shows at once rather than at the end.
    order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    finished: list[bool] = [False] * len(prompts)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=description, unit="batch", disable=description is None):
        batch = [encoded[index] for index in order[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        # Padded by hand: the tokenizer may have no pad token, and setting one would change the caller's tokenizer.
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=model.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device
        )
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            **sampling,
        )
        for index, new_tokens in zip(order[start : start + batch_size], output[:, width:].tolist(), strict=True):
            end = next((position for position, token in enumerate(new_tokens) if token in stop_ids), None)
            finished[index] = end is not None
            texts[index] = tokenizer.decode(new_tokens[:end], skip_special_tokens=True)
    return texts, finished


def regenerate_conversations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[Message]],
    max_new_tokens: int = 1024,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[list[Message]]:
    """Replace every assistant turn with the target's own answer; system and user turns are kept.

    Multi-turn conversations are answered turn by turn, each answer conditioned on the target's
    earlier answers, with all conversations at the same turn batched together.
    """
    rounds_per_conversation = []
    for index, messages in enumerate(conversations):
        rounds: list[list[Message]] = [[]]
        for message in messages:
            if message["role"] == "assistant":
                continue
            rounds[-1].append(message)
            if message["role"] == "user":
                rounds.append([])
        if len(rounds) == 1:
            raise ValueError(f"Conversation {index} has no user message for the target to answer.")
        # Messages after the last user turn (a trailing system message) have nothing to answer.
        rounds_per_conversation.append(rounds[:-1])
    regenerated: list[list[Message]] = [[] for _ in conversations]
    for turn in range(max((len(rounds) for rounds in rounds_per_conversation), default=0)):
        active = [index for index, rounds in enumerate(rounds_per_conversation) if turn < len(rounds)]
        for index in active:
            regenerated[index].extend(rounds_per_conversation[index][turn])
        prompts = [
            tokenizer.apply_chat_template(regenerated[index], tokenize=False, add_generation_prompt=True)
            for index in active
        ]
        answers, finished = generate_texts(
            model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p, f"Answering turn {turn + 1}"
        )
        for index, answer in zip(active, answers, strict=True):
            regenerated[index].append({"role": "assistant", "content": answer})
        # A cut answer still is the target's text; only its closing end-of-turn token is not what it would write.
        logger.info(
            "Answered turn %d of %d conversations (%d cut at max_new_tokens=%d).",
            turn + 1,
            len(active),
            finished.count(False),
            max_new_tokens,
        )
    return regenerated


def user_turn_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The rendered chat up to where a user's words begin (with the template's default system prompt, if any).

    Found by rendering a one-message conversation and cutting before the message, so it works for any
    template that prints user content verbatim (ChatML gives `<|im_start|>user\\n`).
    """
    if not tokenizer.chat_template:
        raise ValueError("Synthesising prompts needs an instruct model's chat template; this tokenizer has none.")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in rendered:
        raise ValueError(
            "The chat template does not print user messages verbatim; cannot find where a user turn starts."
        )
    return rendered[: rendered.index(_SENTINEL)]


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def filter_prompts(texts: list[str], min_length: int = 10, seen: set[str] | None = None) -> list[str]:
    """Stripped texts of at least `min_length` characters, without duplicates (ignoring case and spacing).

    `seen` holds the normalised prompts kept so far and is updated, so successive batches stay distinct.
    """
    seen = set() if seen is None else seen
    kept = []
    for text in texts:
        text = text.strip()
        key = _normalise(text)
        if len(text) >= min_length and key not in seen:
            seen.add(key)
            kept.append(text)
    return kept


def synthesize_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_p: float = 0.95,
    min_length: int = 10,
    max_rounds: int | None = None,
    openers: Sequence[str] | None = None,
    first_paragraph: bool = False,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Let an instruct target write `num_prompts` distinct user prompts (Magpie).

    The model continues the template's user-turn prefix with sampling; unfinished (cut at
    `max_new_tokens`), empty, too short and duplicate prompts are discarded and sampling goes on until
    enough are kept, for at most `max_rounds` batches (default: four times what `num_prompts` needs),
    after which fewer are returned with a warning.

    `openers` are first words of a user message ("Write", "Solve the equation"), taken in turn: the model
    continues the prefix plus an opener, and the prompt is the opener plus what it wrote. A small model left
    to itself starts most requests alike (SmolLM2-135M: "I'm ..." or "Can you ..." in two of three), so
    openers spread the prompts over kinds of tasks it would seldom ask for.

    `first_paragraph` keeps each prompt's text up to its first blank line, and counts a prompt that reaches one as
    finished even if the turn goes on: some models write a request and then answer it inside the user turn
    (Qwen2.5-Coder-0.5B-Instruct: "Write a Python function that ...", a blank line, the code), which would
    otherwise make the answer part of the prompt, or leave the turn unfinished and the prompt discarded.

    Prompts equal to one in `exclude` (ignoring case and spacing) are discarded too: new conversations added to
    earlier ones must not repeat them, or a held-out split would hold prompts also trained on.
    """
    if num_prompts <= 0:
        raise ValueError(f"num_prompts must be positive, got {num_prompts}.")
    if temperature <= 0:
        raise ValueError("Synthesising prompts needs sampling (temperature > 0): greedy decoding writes one prompt.")
    openers = [opener.strip() for opener in openers or [""]]
    if any(not opener for opener in openers) and len(openers) > 1:
        raise ValueError("Prompt openers must not be empty.")
    prefix = user_turn_prefix(tokenizer)
    max_rounds = max_rounds if max_rounds is not None else 4 * math.ceil(num_prompts / batch_size)
    seen = {_normalise(text) for text in exclude}
    prompts: list[str] = []
    progress = tqdm(total=num_prompts, desc="Writing prompts", unit="prompt")
    for round_index in range(max_rounds):
        starts = [openers[(round_index * batch_size + row) % len(openers)] for row in range(batch_size)]
        texts, finished = generate_texts(
            model,
            tokenizer,
            [prefix + start for start in starts],
            max_new_tokens,
            batch_size,
            temperature,
            top_p,
            description=None,
        )
        # A prompt cut at max_new_tokens is an unfinished question: the model is left to guess what was asked.
        texts = [start + text for start, text in zip(starts, texts, strict=True)]
        if first_paragraph:
            paragraphs = [text.strip().split("\n\n", 1) for text in texts]
            finished = [done or len(parts) > 1 for done, parts in zip(finished, paragraphs, strict=True)]
            texts = [parts[0] for parts in paragraphs]
        kept = filter_prompts([text for text, done in zip(texts, finished, strict=True) if done], min_length, seen)
        progress.update(min(len(kept), num_prompts - len(prompts)))
        prompts += kept
        if len(prompts) >= num_prompts:
            progress.close()
            return prompts[:num_prompts]
    progress.close()
    if not prompts:
        raise ValueError(
            f"The model wrote no usable prompt in {max_rounds} batches: is it an instruct model with a chat template?"
        )
    logger.warning(
        "Kept %d distinct prompts of the %d asked for after %d batches.", len(prompts), num_prompts, max_rounds
    )
    return prompts
