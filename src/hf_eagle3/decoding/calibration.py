"""The prompts `eagle3_tree="auto"` calibrates a head's acceptance on.

How many drafts a head gets accepted depends on the text: far more on a prompt the target answers predictably (or
with a repetition loop) than on everyday requests; on an H200 one such prompt predicted tau 7.6 where MT-bench gave
2.98, and the tree chosen from it was far too deep. So the automatic tree is calibrated on a fixed set of short,
varied requests (`CALIBRATION_REQUESTS`: advice, explanation, code, arithmetic, rewriting, summarising, planning,
verse), each rendered as one user turn with the target's chat template (a tokenizer without one: the text alone, as a
base model continues it). The choice then does not depend on which prompt came first, and is the same on every run.
The acceptance of every shape is pooled over all their decoded steps (`tree_shape.calibrate_acceptance`), so a
request the head predicts unusually well takes few steps and weighs less than its tokens.

The requests of one's own workload go in `eagle3_calibration_prompts` (text, rendered alike) or as token ids to
`tree_shape.tune_tree_shape(target, head, prompts)`. Text is rendered with the tokenizer `generate` was given
(`tokenizer=`), else the target's own where it is on this machine (`offline_models.local_tokenizer`). Without either,
the built-in requests cannot be encoded and the call's own prompt stands in, with a warning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers.utils import logging

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.get_logger(__name__)

_LIBRARY_NOTE = (
    "The town library opened a tool-lending shelf last spring. Residents can borrow drills, ladders, sewing machines "
    "and garden tools for up to a week with their library card. The idea came from a survey in which many people "
    "said they owned tools they used once a year, while others could not afford to buy them at all. In its first six "
    "months the shelf lent more than nine hundred items, and volunteers now run a repair afternoon every second "
    "Saturday, where broken toasters and bicycles are fixed for free."
)

# Everyday requests of different kinds, short enough that their prefills cost little; each asks for an answer longer
# than a calibration decode, so that the decode stays inside the answer.
CALIBRATION_REQUESTS: tuple[str, ...] = (
    "I have a job interview tomorrow morning for a junior accountant position and I get nervous talking to "
    "strangers. What can I do tonight and tomorrow to feel better prepared?",
    "Explain in simple terms how a refrigerator keeps food cold, and why the back of it feels warm.",
    "Write a Python function that checks whether a sentence is a palindrome, ignoring spaces, punctuation and capital "
    "letters. Include a docstring and two examples.",
    "A train leaves at 9:40 and travels 210 km at an average speed of 84 km/h. At what time does it arrive? Show your "
    "reasoning step by step.",
    "Rewrite this message so that it sounds polite and professional: 'hey, the report you sent is missing the march "
    "numbers again, fix it before friday.'",
    f"Summarise the following paragraph in two or three sentences.\n\n{_LIBRARY_NOTE}",
    "Give me a three-day plan for learning the basics of photography with a phone camera, with one practice exercise "
    "for each day.",
    "Write a short poem about a lighthouse keeper waiting for a storm to pass.",
)


def render_requests(tokenizer: PreTrainedTokenizerBase, requests: Sequence[str]) -> list[torch.LongTensor]:
    """Each request as one user turn in the tokenizer's chat template, ready for the answer (`(1, length)` ids), or
    its text alone where the tokenizer has no chat template."""
    prompts = []
    for request in requests:
        if tokenizer.chat_template is None:
            ids = tokenizer(request, return_tensors="pt")["input_ids"]
        else:
            messages = [{"role": "user", "content": request}]
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
        prompts.append(ids)
    return prompts


def target_tokenizer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedTokenizerBase | None:
    """`tokenizer` if given, else the target's own found on this machine (None where there is none)."""
    if tokenizer is not None:
        return tokenizer
    from ..offline_models import local_tokenizer

    return local_tokenizer(model.config.name_or_path)


def requests_key(requests: Sequence[str] | None) -> str | None:
    """What identifies a call's own calibration requests in a cache key (None: the default calibration)."""
    if requests is None:
        return None
    return hashlib.sha256(json.dumps(list(requests)).encode()).hexdigest()[:24]


def calibration_prompts(
    model: PreTrainedModel,
    requests: Sequence[str] | None,
    tokenizer: PreTrainedTokenizerBase | None,
    call_prompts: Callable[[], list[torch.LongTensor]],
) -> tuple[list[torch.LongTensor], str]:
    """The prompts a call's automatic tree is calibrated on, and what they are: its `requests`
    (`eagle3_calibration_prompts`) or the built-in ones, rendered with `tokenizer` or the target's own; without a
    tokenizer, the built-in requests give way to `call_prompts()` (a warning says so) and a call's own requests are an
    error."""
    tokenizer = target_tokenizer(model, tokenizer)
    if requests is not None:
        if tokenizer is None:
            raise ValueError(
                f"eagle3_calibration_prompts are text, and no tokenizer of the target {model.config.name_or_path!r} is on "
                "this machine to encode them. Pass the target's tokenizer to `generate` (tokenizer=...), or give "
                "token ids to hf_eagle3.decoding.tree_shape.tune_tree_shape before generating."
            )
        return render_requests(tokenizer, requests), "the requests of eagle3_calibration_prompts"
    if tokenizer is None:
        logger.warning(
            f"EAGLE-3 found no tokenizer of the target {model.config.name_or_path!r} to encode its built-in calibration "
            "requests, so the automatic tree is calibrated on this call's prompt: the choice depends on it. Pass the "
            "target's tokenizer to `generate` (tokenizer=...), or call hf_eagle3.decoding.tree_shape.tune_tree_shape "
            "with prompts of your workload first."
        )
        return call_prompts(), "the prompt of the call that measured it (no tokenizer found)"
    return render_requests(tokenizer, CALIBRATION_REQUESTS), f"the {len(CALIBRATION_REQUESTS)} built-in requests"


__all__ = ["CALIBRATION_REQUESTS", "calibration_prompts", "render_requests", "requests_key", "target_tokenizer"]
