"""Long documents for long-prompt training conversations: real text found offline, or text the target writes.

A head trained on short chat meets prompts of a thousand tokens and more (summarise this article, explain this
file) with hidden states it has never seen, and its acceptance drops. The cure is conversations whose user turn
carries a long document. Where documents come from (`load_documents` sources):

- `stdlib`: the Python standard library's own modules (source with their docstrings), Python Software Foundation
  License; every Python installation has them.
- `pydoc`: the Python Language Reference's topics as shipped in the standard library (`pydoc_data.topics`, the
  text `help("assert")` prints), prose under the same license.
- `packages`: the long descriptions (READMEs, changelogs) of the installed Python distributions, taken only where
  their metadata states a permissive license, which is recorded with each document.
- a file, a folder (its files, recursively, hidden ones left out) or a glob pattern of text files.
- `synthesize_documents`: the target writes articles, code, transcripts, letters and reports on requests it
  completes itself (Magpie, as `synthesize_prompts` does for chat).

Long texts are cut into chunks of at most `max_tokens` at paragraph or line ends. One document in
`HELD_OUT_BUCKETS` of the built-in sources is held out by its name, so that an evaluation set built from those
(benchmarks/build_long_prompts.py) never shares a document with the training data.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .generation import generate_texts, synthesize_prompts

logger = logging.get_logger(__name__)

BUILTIN_SOURCES = ("stdlib", "pydoc", "packages")
PYTHON_LICENSE = "PSF-2.0"
# Parts of the standard library that are not its own prose or code: tests, vendored packages, generated tables.
_STDLIB_SKIPPED = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "idlelib",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "encodings",
}
# Licenses whose text may be used and quoted with attribution; anything copyleft or unstated is left out.
_PERMISSIVE = ("MIT", "BSD", "APACHE", "PSF", "PYTHON SOFTWARE FOUNDATION", "ISC", "ZLIB", "UNLICENSE", "MPL")
CODE_EXTENSIONS = {".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".rb", ".sh", ".sql", ".toml"}
HELD_OUT_BUCKETS = 10
# More characters than a token holds but for rare runs of spaces: a text cut at this many per token it may give
# yields the same chunks.
_MAX_CHARACTERS_PER_TOKEN = 16


@dataclass(frozen=True)
class Document:
    """A text to ask about: `source` names where it came from (file and chunk), `kind` is `code` or `prose`."""

    text: str
    source: str
    kind: str
    license: str | None = None


def document_origin(document: Document) -> str:
    """`stdlib`, `pydoc`, `package`, `synthesized` or `files`: the kind of source a document came from."""
    prefix = document.source.split(":", 1)[0]
    return prefix if prefix in ("stdlib", "pydoc", "package", "synthesized") else "files"


def held_out(name: str) -> bool:
    """Whether a built-in document is kept for evaluation: one name in `HELD_OUT_BUCKETS`, by a stable hash."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def _kind_of(path: str) -> str:
    return "code" if os.path.splitext(path)[1].lower() in CODE_EXTENSIONS else "prose"


def _read_text(path: str) -> str:
    """A file's text, or an error that names it: unreadable, not UTF-8 or empty."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"Document {path} is not UTF-8 text ({error.reason} at byte {error.start}).") from error
    except OSError as error:
        raise ValueError(f"Document {path} cannot be read: {error.strerror or error}.") from error
    if not text.strip():
        raise ValueError(f"Document {path} is empty: remove it, or point --documents at the files to use.")
    return text


def _files_of(source: str) -> list[str]:
    """The files a path, folder or glob pattern names, sorted."""
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        found = []
        for root, folders, files in os.walk(source):
            folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
            found += [os.path.join(root, name) for name in sorted(files) if not name.startswith(".")]
        if not found:
            raise ValueError(f"--documents folder {source} holds no files.")
        return found
    matches = sorted(path for path in glob.glob(source, recursive=True) if os.path.isfile(path))
    if not matches:
        raise ValueError(
            f"--documents {source!r} is no file, folder or glob pattern that matches files (and not one of "
            f"{', '.join(BUILTIN_SOURCES)})."
        )
    return matches


def stdlib_documents(evaluation: bool = False) -> Iterator[Document]:
    """The standard library's Python modules, held-out ones excepted (or only those, with `evaluation`)."""
    root = sysconfig.get_paths()["stdlib"]
    for folder, folders, files in os.walk(root):
        folders[:] = sorted(name for name in folders if name not in _STDLIB_SKIPPED and not name.startswith("__"))
        for name in sorted(files):
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            wanted = held_out(f"stdlib:{relative}") == evaluation
            if name.endswith(".py") and not name.startswith("_sysconfigdata") and wanted:
                with open(path, encoding="utf-8", errors="replace") as file:
                    yield Document(file.read(), f"stdlib:{relative}", "code", PYTHON_LICENSE)


def pydoc_documents(evaluation: bool = False) -> Iterator[Document]:
    """The Language Reference topics `help()` shows, held-out ones excepted (or only those, with `evaluation`)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if held_out(f"pydoc:{name}") == evaluation:
            yield Document(topics[name], f"pydoc:{name}", "prose", PYTHON_LICENSE)


def distribution_license(metadata) -> str | None:
    """The license a distribution's metadata states (SPDX expression, License field or classifier), if permissive."""
    stated = [metadata.get("License-Expression"), metadata.get("License")]
    stated += [line.rsplit("::", 1)[-1] for line in metadata.get_all("Classifier") or [] if line.startswith("License")]
    # A License field sometimes holds the whole license text: its first line names it.
    names = [license.strip().splitlines()[0] for license in stated if license and license.strip()]
    if any("GPL" in name.upper() for name in names):  # copyleft anywhere in the metadata: left out
        return None
    return next((name[:80] for name in names if any(word in name.upper() for word in _PERMISSIVE)), None)


def package_documents() -> Iterator[Document]:
    """Long descriptions of the installed distributions under permissive licenses, held-out ones excepted."""
    seen = set()
    distributions = sorted(importlib.metadata.distributions(), key=lambda dist: dist.metadata["Name"] or "")
    for distribution in distributions:
        metadata = distribution.metadata
        name = metadata["Name"]
        description = metadata.get_payload() or metadata.get("Description") or ""
        license = distribution_license(metadata)
        if name in seen or not description.strip() or held_out(f"package:{name}"):
            continue
        seen.add(name)
        if license is None:
            logger.info("Left out the description of %s: its metadata states no permissive license.", name)
            continue
        yield Document(description, f"package:{name}", "prose", license)


def documents_from(source: str) -> Iterator[Document]:
    """The documents one `--documents` entry names: a built-in source, a file, folder or glob pattern."""
    builtin = {"stdlib": stdlib_documents, "pydoc": pydoc_documents, "packages": package_documents}
    if source in builtin:
        yield from builtin[source]()
        return
    for path in _files_of(source):
        yield Document(_read_text(path), path, _kind_of(path))


def split_document(
    tokenizer: PreTrainedTokenizerBase, document: Document, max_tokens: int, min_tokens: int, max_chunks: int
) -> list[Document]:
    """`document` in chunks of `min_tokens` to `max_tokens` tokens, at most `max_chunks`, cut where a paragraph
    (else a line) ends when one falls in the chunk's second half; a shorter rest is dropped."""
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"Document lengths need 0 < min_tokens <= max_tokens, got {min_tokens} and {max_tokens}.")
    # Only the text the chunks can reach is tokenised: a module of 200 kB would otherwise cost seconds for 4 chunks.
    reach = max_chunks * max_tokens * _MAX_CHARACTERS_PER_TOKEN
    offsets = tokenizer(document.text[:reach], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    chunks: list[Document] = []
    start_token = 0
    while len(chunks) < max_chunks and len(offsets) - start_token >= min_tokens:
        start = offsets[start_token][0]
        end_token = min(start_token + max_tokens, len(offsets))
        end = offsets[end_token - 1][1]
        if end_token < len(offsets):
            middle = offsets[start_token + (end_token - start_token) // 2][0]
            cut = document.text.rfind("\n\n", middle, end)
            if cut < 0:
                cut = document.text.rfind("\n", middle, end)
            if cut >= 0:
                end = cut + 1
                end_token = next(
                    (index for index in range(start_token, end_token) if offsets[index][1] > end), end_token
                )
        text = document.text[start:end].strip()
        if text:
            source = document.source if start_token == 0 and end_token == len(offsets) else None
            source = source or f"{document.source}#{len(chunks) + 1}"
            chunks.append(Document(text, source, document.kind, document.license))
        start_token = max(end_token, start_token + 1)
    return chunks


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def load_documents(
    sources: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int = 1024,
    min_tokens: int = 256,
    max_chunks: int = 4,
) -> tuple[list[Document], dict[str, int]]:
    """Every document the sources name, cut into chunks (`split_document`), without duplicates (ignoring case and
    spacing).

    Returns:
        The chunks, and counts: texts read, texts too short for one chunk, duplicate chunks dropped.
    """
    counts = {"texts": 0, "too_short": 0, "duplicates": 0}
    seen: set[str] = set()
    kept: list[Document] = []
    for source in sources:
        for document in documents_from(source):
            counts["texts"] += 1
            chunks = split_document(tokenizer, document, max_tokens, min_tokens, max_chunks)
            counts["too_short"] += not chunks
            for chunk in chunks:
                key = hashlib.sha256(_normalised(chunk.text).encode()).hexdigest()
                counts["duplicates"] += key in seen
                if key not in seen:
                    seen.add(key)
                    kept.append(chunk)
    return kept, counts


def cut_repetition(text: str, min_line_length: int = 20) -> str:
    """`text` up to the first line (of at least `min_line_length` characters) that repeats an earlier one: a small
    model writing at length falls into loops, and a loop is no document worth asking about."""
    seen: set[str] = set()
    position = 0
    for line in text.splitlines(keepends=True):
        key = _normalised(line)
        if len(key) >= min_line_length and key in seen:
            break
        seen.add(key)
        position += len(line)
    return text[:position].strip()


# First words of requests for documents, and the kind of text each asks for. The target writes the rest of each
# request (its topic), then the document.
DOCUMENT_REQUESTS = (
    ("Write a long, detailed news article about", "prose"),
    ("Write a long report on", "prose"),
    ("Write the full transcript of a meeting where", "prose"),
    ("Write the transcript of an interview with", "prose"),
    ("Write a long formal letter to", "prose"),
    ("Write a long email to", "prose"),
    ("Write a detailed blog post about", "prose"),
    ("Write a long story about", "prose"),
    ("Write a detailed guide on how to", "prose"),
    ("Write the minutes of", "prose"),
    ("Write a long essay on", "prose"),
    ("Write a product description and user manual for", "prose"),
    ("Write a lecture on", "prose"),
    ("Write a complete Python module that", "code"),
    ("Write a long Python script that", "code"),
    ("Write a JavaScript file that", "code"),
    ("Write a SQL schema and queries for", "code"),
    ("Write a Python class with docstrings and tests for", "code"),
)


def synthesize_documents(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_documents: int,
    max_new_tokens: int = 1024,
    batch_size: int = 16,
    temperature: float = 0.7,
    top_p: float = 0.95,
    request_tokens: int = 64,
    min_request_length: int = 40,
) -> list[Document]:
    """Let an instruct target write `num_documents` documents: it completes a request for one (`DOCUMENT_REQUESTS`
    in turn, Magpie-style), then answers it at length, sampled (greedy long text loops in a small model).

    Requests (opener and topic) shorter than `min_request_length` characters are written again. A document cut at
    `max_new_tokens` is kept: it is text the target wrote, and a continuation task fits it.
    """
    openers = [opener for opener, _ in DOCUMENT_REQUESTS]
    requests = synthesize_prompts(
        model,
        tokenizer,
        num_documents,
        max_new_tokens=request_tokens,
        batch_size=batch_size,
        min_length=min_request_length,
        openers=openers,
    )
    kinds = dict(DOCUMENT_REQUESTS)
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
        )
        for request in requests
    ]
    texts, _ = generate_texts(
        model, tokenizer, rendered, max_new_tokens, batch_size, temperature, top_p, "Writing documents"
    )
    documents = []
    for index, (request, text) in enumerate(zip(requests, texts, strict=True)):
        kind = next(kind for opener, kind in kinds.items() if request.startswith(opener))
        text = cut_repetition(text)
        if text:
            documents.append(Document(text, f"synthesized:{index}: {request[:200]}", kind))
    return documents


__all__ = [
    "BUILTIN_SOURCES",
    "DOCUMENT_REQUESTS",
    "Document",
    "cut_repetition",
    "distribution_license",
    "document_origin",
    "documents_from",
    "held_out",
    "load_documents",
    "split_document",
    "synthesize_documents",
]
