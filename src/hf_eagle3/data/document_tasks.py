"""User turns that carry a long document and ask something of it: summaries, answers, rewrites, extraction,
continuation, and for code explanation, review and transformation.

The wording is varied on purpose (the instruction before or after the document, several ways of setting the
document apart) so that a head does not learn one framing of a long prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .documents import Document

# (category, instruction) by kind of document.
DOCUMENT_TASKS: dict[str, tuple[tuple[str, str], ...]] = {
    "prose": (
        ("summary", "Summarize the following text in one paragraph."),
        ("summary", "Write a short summary of this document for someone who has no time to read it."),
        ("summary", "Give me a TL;DR of the text below."),
        ("summary", "Summarize the main points as a bulleted list."),
        ("summary", "Summarize this in three sentences."),
        ("questions", "What is the main idea of this text, and what supports it?"),
        ("questions", "Who or what is this text about, what does it describe, and why does it matter?"),
        ("questions", "Which parts of this text would a beginner find hardest? Explain them simply."),
        ("questions", "Write five questions a reader can answer from this text, each followed by its answer."),
        ("questions", "What conclusions can be drawn from this document?"),
        ("rewrite", "Rewrite this text in simpler words for a ten-year-old."),
        ("rewrite", "Rewrite the following text in a formal, professional tone."),
        ("rewrite", "Turn this text into an email to a colleague that tells them what they need to know."),
        ("rewrite", "Rewrite the text as a short news item."),
        ("extraction", "List every name, date and number mentioned in this text."),
        ("extraction", "Extract the key terms from this text and define each in one line."),
        ("extraction", "Make a table of the main topics of this text with a one-line description of each."),
        ("extraction", "Extract the action items or recommendations from this document."),
        ("extraction", "Give this document a title and five keywords."),
        ("continuation", "Continue this text from where it stops, in the same style."),
        ("continuation", "Write the next section of this document."),
        ("continuation", "Write a conclusion for this text."),
    ),
    "code": (
        ("code_explanation", "Explain what this code does."),
        ("code_explanation", "Explain this code step by step for a beginner."),
        ("code_explanation", "What are the main classes and functions in this file, and what is each one for?"),
        ("code_explanation", "Summarize what this module provides."),
        ("code_review", "Review this code: point out bugs, risks and possible improvements."),
        ("code_review", "How could this code be made simpler or faster?"),
        ("code_review", "Which edge cases does this code not handle? List them."),
        ("code_transformation", "Write unit tests for the functions in this code."),
        ("code_transformation", "Add docstrings and comments where they are missing, and show the improved code."),
        ("code_transformation", "Write documentation for this code in Markdown."),
        ("code_transformation", "Continue this code: write what should come next."),
    ),
}
CATEGORIES = tuple(dict.fromkeys(category for tasks in DOCUMENT_TASKS.values() for category, _ in tasks))

# Ways of putting an instruction and a document together.
_LAYOUTS = (
    "{instruction}\n\n{document}",
    "{document}\n\n{instruction}",
    "{instruction}\n\n```\n{document}\n```",
    'Here is a text:\n\n"""\n{document}\n"""\n\n{instruction}',
    "<document>\n{document}\n</document>\n\n{instruction}",
    "{instruction}\n\nText:\n{document}\n\nEnd of text.",
)


@dataclass(frozen=True)
class DocumentPrompt:
    """A user turn over a document, with what it asks (`category`) and the document it quotes."""

    prompt: str
    category: str
    document: Document


def document_prompt(document: Document, category: str | None, rng: random.Random) -> DocumentPrompt:
    """One user turn over `document`: a task of `category` (any category its kind has, when None) in a layout,
    both drawn from `rng`."""
    tasks = [task for task in DOCUMENT_TASKS[document.kind] if category is None or task[0] == category]
    if not tasks:
        raise ValueError(f"No {category!r} task for {document.kind} documents; categories: {list(CATEGORIES)}.")
    category, instruction = rng.choice(tasks)
    layout = rng.choice(_LAYOUTS)
    return DocumentPrompt(layout.format(instruction=instruction, document=document.text), category, document)


def document_prompts(documents: list[Document], count: int, seed: int = 0) -> list[DocumentPrompt]:
    """`count` user turns over `documents`, each document used as evenly as possible (one asked about again is asked
    differently: another task or layout), in an order shuffled by `seed`."""
    if count > 0 and not documents:
        raise ValueError("No documents to write long prompts over: check --documents / --synthesize_documents.")
    rng = random.Random(seed)
    order = rng.sample(range(len(documents)), len(documents)) if documents else []
    prompts, used = [], set()
    for position in range(count):
        document = documents[order[position % len(order)]]
        for _ in range(8):  # a few draws for a task this document has not had yet
            prompt = document_prompt(document, None, rng)
            if (document.source, prompt.prompt) not in used:
                break
        used.add((document.source, prompt.prompt))
        prompts.append(prompt)
    return prompts


__all__ = ["CATEGORIES", "DOCUMENT_TASKS", "DocumentPrompt", "document_prompt", "document_prompts"]
