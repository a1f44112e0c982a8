"""Long-prompt training data: documents from files and the Python installation, chunking, deduplication, the
user turns over them, and `prepare-data --documents` / `--synthesize_documents`."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
from email.message import Message
from pathlib import Path

import pytest
import torch

from hf_eagle3.cli.prepare_data import main as prepare_data_main
from hf_eagle3.data.document_tasks import CATEGORIES, DOCUMENT_TASKS, document_prompt, document_prompts
from hf_eagle3.data.documents import (
    DOCUMENT_REQUESTS,
    Document,
    cut_repetition,
    distribution_license,
    documents_from,
    held_out,
    load_documents,
    split_document,
    synthesize_documents,
)

PARAGRAPH = "The river rose in the night and the town woke to water in the streets. "


def paragraphs(count: int, words: str = PARAGRAPH) -> str:
    return "\n\n".join(f"{index}. {words * 2}".strip() for index in range(count))


def test_split_document_cuts_at_paragraph_ends_within_the_budget(chatml):
    document = Document(paragraphs(12), "notes.txt", "prose")
    total = len(chatml(document.text, add_special_tokens=False)["input_ids"])
    chunks = split_document(chatml, document, max_tokens=total // 3, min_tokens=10, max_chunks=10)
    assert len(chunks) >= 3
    for index, chunk in enumerate(chunks, 1):
        assert len(chatml(chunk.text, add_special_tokens=False)["input_ids"]) <= total // 3
        assert chunk.text in document.text and chunk.source == f"notes.txt#{index}"
        assert chunk.text.endswith(PARAGRAPH.strip()) and (chunk.kind, chunk.license) == ("prose", None)
    # Consecutive whole paragraphs: together they are the text.
    assert "\n\n".join(chunk.text for chunk in chunks) == document.text
    assert len(split_document(chatml, document, total // 3, 10, max_chunks=2)) == 2
    # A text that fits is one chunk under its own name; one shorter than min_tokens is none.
    assert split_document(chatml, document, total, 10, 4) == [document]
    assert split_document(chatml, document, total + 5, total + 1, 4) == []
    with pytest.raises(ValueError, match="min_tokens <= max_tokens"):
        split_document(chatml, document, 10, 20, 4)


def test_documents_from_files_folders_and_globs_with_clear_errors(tmp_path, chatml):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(paragraphs(3))
    (folder / "sub" / "b.py").write_text("def f(x):\n    return x + 1\n" * 20)
    # The same text as a.txt but for case and spacing: a duplicate.
    (folder / "sub" / "c.md").write_text(paragraphs(3).upper().replace(" ", "  "))
    (folder / ".hidden").write_text("never read")
    documents = list(documents_from(str(folder)))
    assert [(d.source, d.kind) for d in documents] == [
        (str(folder / "a.txt"), "prose"),
        (str(folder / "sub" / "b.py"), "code"),
        (str(folder / "sub" / "c.md"), "prose"),
    ]
    assert [d.source for d in documents_from(str(folder / "**" / "*.py"))] == [str(folder / "sub" / "b.py")]
    kept, counts = load_documents([str(folder)], chatml, max_tokens=4096, min_tokens=8)
    assert [d.source for d in kept] == [str(folder / "a.txt"), str(folder / "sub" / "b.py")]
    assert counts == {"texts": 3, "too_short": 0, "duplicates": 1}

    (folder / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match=f"Document {folder / 'empty.txt'} is empty"):
        load_documents([str(folder)], chatml)
    (folder / "empty.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ValueError, match=f"Document {folder / 'empty.txt'} is not UTF-8 text"):
        load_documents([str(folder / "empty.txt")], chatml)
    with pytest.raises(ValueError, match="no file, folder or glob pattern that matches"):
        load_documents([str(tmp_path / "missing" / "*.txt")], chatml)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        load_documents([str(tmp_path / "none")], chatml)


def test_builtin_sources_are_licensed_and_leave_held_out_documents(chatml):
    stdlib = list(itertools.islice(documents_from("stdlib"), 30))
    assert len(stdlib) == 30 and all(d.kind == "code" and d.license == "PSF-2.0" for d in stdlib)
    assert not any(held_out(d.source) or "/test/" in d.source for d in stdlib)
    pydoc = list(documents_from("pydoc"))
    assert len(pydoc) > 40 and all(d.kind == "prose" and not held_out(d.source) for d in pydoc)
    assert any(d.source == "pydoc:assert" for d in pydoc) != held_out("pydoc:assert")
    packages = list(documents_from("packages"))
    assert packages and all(d.license and "GPL" not in d.license.upper() for d in packages)
    # About one name in ten is held out, whatever the source.
    assert 30 < sum(held_out(f"stdlib:{index}.py") for index in range(1000)) < 170


def test_distribution_license_takes_only_permissive_ones():
    def metadata(**fields) -> Message:
        message = Message()
        for name, value in fields.items():
            for item in value if isinstance(value, list) else [value]:
                message[name.replace("_", "-")] = item
        return message

    assert distribution_license(metadata(License_Expression="MIT")) == "MIT"
    assert (
        distribution_license(metadata(License="Apache License\n\nVersion 2.0, January 2004 ...")) == "Apache License"
    )
    classifier = "License :: OSI Approved :: BSD License"
    assert distribution_license(metadata(Classifier=["Programming Language :: Python", classifier])) == "BSD License"
    assert distribution_license(metadata(License="GPL-3.0-or-later")) is None
    assert distribution_license(metadata(License="LGPL with BSD parts")) is None
    assert distribution_license(metadata(License_Expression="GPL-2.0-only", License="MIT")) is None
    assert distribution_license(metadata(Name="unstated")) is None


def test_document_prompts_quote_the_document_and_vary_the_task(chatml):
    prose = Document("An article about the flood.", "a.txt", "prose")
    code = Document("def f(x):\n    return x", "f.py", "code")
    prompts = document_prompts([prose, code], 40, seed=3)
    assert len(prompts) == 40 and prompts == document_prompts([prose, code], 40, seed=3)
    assert {p.category for p in prompts if p.document is prose} <= {c for c, _ in DOCUMENT_TASKS["prose"]}
    assert {p.category for p in prompts if p.document is code} <= {c for c, _ in DOCUMENT_TASKS["code"]}
    assert all(p.document.text in p.prompt for p in prompts)
    assert sum(p.document is prose for p in prompts) == 20  # used evenly
    assert len({p.prompt for p in prompts}) == 40  # a document asked about again is asked differently
    assert document_prompt(code, "code_review", random.Random(0)).category == "code_review"
    assert set(CATEGORIES) == {c for tasks in DOCUMENT_TASKS.values() for c, _ in tasks}
    with pytest.raises(ValueError, match="No 'summary' task for code documents"):
        document_prompt(code, "summary", random.Random(0))
    with pytest.raises(ValueError, match="No documents"):
        document_prompts([], 1)
    assert document_prompts([], 0) == []


def test_cut_repetition_stops_a_loop():
    loop = "The event will be held on a Saturday.\n"
    text = "A library opens.\n\nIt has books.\n\n" + loop + "Short.\nShort.\n" + loop * 3
    assert cut_repetition(text) == "A library opens.\n\nIt has books.\n\n" + loop + "Short.\nShort."
    assert cut_repetition("No loop here.\nAt all.") == "No loop here.\nAt all."


def test_synthesize_documents_follow_the_requests(chatml, chatty_target):
    torch.manual_seed(0)
    documents = synthesize_documents(
        chatty_target, chatml, 4, max_new_tokens=12, batch_size=4, request_tokens=40, min_request_length=1
    )
    assert 0 < len(documents) <= 4
    kinds = dict(DOCUMENT_REQUESTS)
    for document in documents:
        request = document.source.split(": ", 1)[1]
        opener = next(opener for opener in kinds if request.startswith(opener))
        assert document.kind == kinds[opener] and document.text and document.license is None


def test_prepare_data_with_documents_end_to_end(tmp_path, chatml, chatty_target):
    from datasets import load_from_disk

    target_dir = tmp_path / "target"
    chatty_target.save_pretrained(target_dir)
    chatml.save_pretrained(target_dir)
    folder = tmp_path / "docs"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.txt").write_text(paragraphs(6, f"Story {index} goes on. "))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(json.dumps({"prompt": f"Question {index}?", "completion": "Yes."}) + "\n" for index in range(4))
    )
    output_dir = tmp_path / "prepared"
    common = ["--target", str(target_dir), "--output_dir", str(output_dir), "--draft_vocab_size", "64"]
    common += ["--max_new_tokens", "4", "--batch_size", "4", "--max_document_tokens", "60"]
    common += ["--min_document_tokens", "20", "--max_document_chunks", "2"]
    assert prepare_data_main([*common, "--data", str(chat), "--documents", str(folder), "--long_ratio", "0.5"]) == 0
    lines = [json.loads(line) for line in (output_dir / "conversations.jsonl").read_text().splitlines()]
    origins = [json.loads(line) for line in (output_dir / "long_prompts.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and len(origins) == 2  # 4 short + 0.5 x 4 long
    assert lines[0]["messages"][1]["content"] == "Yes."  # not regenerated without --regenerate
    for messages, origin in zip([line["messages"] for line in lines[4:]], origins, strict=True):
        assert [m["role"] for m in messages] == ["user", "assistant"]
        chunk = next(c for c in load_documents([str(folder)], chatml, 60, 20, 2)[0] if c.source == origin["source"])
        assert chunk.text in messages[0]["content"] and origin["kind"] == "prose" and origin["category"] in CATEGORIES
    summary = json.loads((output_dir / "prepare_data_summary.json").read_text())
    assert summary["kept"] == 6 and summary["long_prompts"]["conversations"] == 2
    assert summary["long_prompts"]["origins"] == {"files": 2} and summary["long_prompts"]["licenses"] == {
        "not stated": 2
    }
    # Documents alone: one conversation per chunk by default, or as many as asked.
    assert prepare_data_main([*common, "--documents", str(folder)]) == 0
    assert load_from_disk(str(output_dir)).num_rows == 6  # 3 files x 2 chunks
    assert prepare_data_main([*common, "--documents", str(folder / "0.txt"), "--long_conversations", "3"]) == 0
    origins = [json.loads(line) for line in (output_dir / "long_prompts.jsonl").read_text().splitlines()]
    assert len(origins) == 3 and len({o["source"] for o in origins}) == 2

    torch.manual_seed(0)
    written = [*common, "--synthesize_documents", "2", "--document_max_new_tokens", "30"]
    # The tiny target ends its turn less often when sampled hotter: documents of a few tokens.
    written += ["--document_temperature", "2", "--min_document_tokens", "1"]
    assert prepare_data_main(written) == 0
    summary = json.loads((output_dir / "prepare_data_summary.json").read_text())
    assert summary["long_prompts"]["origins"] == {"synthesized": summary["long_prompts"]["conversations"]}

    with pytest.raises(ValueError, match="not both"):
        prepare_data_main([*common, "--documents", str(folder), "--long_ratio", "1", "--long_conversations", "2"])
    with pytest.raises(ValueError, match="needs a positive ratio and short conversations"):
        prepare_data_main([*common, "--documents", str(folder), "--long_ratio", "1"])
    with pytest.raises(ValueError, match="need documents"):
        prepare_data_main([*common, "--data", str(chat), "--long_conversations", "2"])
    too_long = ["--max_document_tokens", "2000", "--min_document_tokens", "1500"]
    with pytest.raises(ValueError, match="No document of at least --min_document_tokens 1500 tokens"):
        prepare_data_main([*common, "--documents", str(folder), *too_long])
    with pytest.raises(ValueError, match="--min_document_tokens 70 must be positive and at most"):
        prepare_data_main([*common, "--documents", str(folder), "--min_document_tokens", "70"])
    (folder / "3.txt").write_text("")
    with pytest.raises(ValueError, match=f"Document {folder / '3.txt'} is empty"):
        prepare_data_main([*common, "--documents", str(folder)])


RECIPE = Path(__file__).resolve().parents[1] / "benchmarks" / "train_smollm2_long.sh"
# Stands in for run_benchmark.py: records each command line, and makes the folder prepare-data would fill.
RECORDER = """
import json, os, sys
with open(os.environ["CALLS"], "a") as file:
    file.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "prepare-data":
    output_dir = sys.argv[sys.argv.index("--output_dir") + 1]
    os.makedirs(output_dir, exist_ok=True)
    open(os.path.join(output_dir, "vocab_map.safetensors"), "w").close()
"""


def run_recipe(tmp_path, stage: str, **environment) -> list[list[str]]:
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    calls = tmp_path / f"calls-{stage}.jsonl"
    env = {"PATH": os.environ["PATH"], "BENCH": f"{sys.executable} {recorder}", "CALLS": str(calls), **environment}
    subprocess.run(["bash", str(RECIPE), stage, str(tmp_path / "run")], check=True, env=env, capture_output=True)
    return [json.loads(line) for line in calls.read_text().splitlines()]


def option(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_long_recipe_commands_and_mix(tmp_path):
    (data,) = run_recipe(tmp_path, "data", GGUF="a.part b.part", LONG="30", WRITE_DOCS="5")
    assert data[:5] == ["prepare-data", "--target", "smollm2", "--gguf", "a.part"] and data[5] == "b.part"
    assert data[data.index("--documents") + 1 : data.index("--documents") + 4] == ["stdlib", "pydoc", "packages"]
    assert (option(data, "--long_conversations"), option(data, "--synthesize_documents")) == ("30", "5")
    # Done once: a second run finds the data and makes none.
    assert run_recipe(tmp_path, "data") == [data]

    long = tmp_path / "long.jsonl"
    long.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"L{i}"}]}) + "\n" for i in range(10))
    )
    chat = tmp_path / "chat.jsonl.gz"
    with gzip.open(chat, "wt") as file:
        file.writelines(json.dumps({"messages": [{"role": "user", "content": f"C{i}"}]}) + "\n" for i in range(50))
    environment = dict(LONG_CONVERSATIONS=str(long), CHAT=str(chat), EVAL_HOLDOUT="2", CHAT_PER_LONG="3")
    evaluation, training, train = run_recipe(tmp_path, "train", **environment)
    run = tmp_path / "run"
    contents = {
        name: [json.loads(line)["messages"][0]["content"] for line in (run / f"{name}_conversations.jsonl").open()]
        for name in ("train", "eval")
    }
    assert len(contents["eval"]) == 4 and sum(c.startswith("L") for c in contents["eval"]) == 2
    assert len(contents["train"]) == 36 and sum(c.startswith("L") for c in contents["train"]) == 8
    assert len(set(contents["train"]) | set(contents["eval"])) == 40  # 30 chat and 10 long, none twice
    assert option(evaluation, "--data").endswith("eval_conversations.jsonl") and option(training, "--data").endswith(
        "train_conversations.jsonl"
    )
    assert train[0] == "train" and option(train, "--head") == "src/hf_eagle3/heads/smollm2-135m-instruct"
    assert option(train, "--eval_data") == str(run / "eval_data") and "--resume_from_checkpoint" not in train
    # The same seed draws the same mix.
    first = (run / "train_conversations.jsonl").read_text()
    for name in ("data", "eval_data"):
        (run / name / "vocab_map.safetensors").unlink()
    run_recipe(tmp_path, "train", **environment)
    assert (run / "train_conversations.jsonl").read_text() == first


def test_long_recipe_adds_sampled_chat_without_its_prompts_twice(tmp_path):
    (sampled,) = run_recipe(tmp_path, "sampled", SAMPLE_FROM="chat.jsonl.gz", SAMPLED="40")
    assert sampled[0] == "prepare-data" and "--regenerate" in sampled
    assert (option(sampled, "--data"), option(sampled, "--max_samples"), option(sampled, "--temperature")) == (
        "chat.jsonl.gz",
        "40",
        "1",
    )
    assert option(sampled, "--output_dir") == str(tmp_path / "run" / "sampled_data")
    assert run_recipe(tmp_path, "sampled") == [sampled]  # done once

    def write(path, prefix, count, answer=None):
        with gzip.open(path, "wt") if path.suffix == ".gz" else path.open("w") as file:
            for i in range(count):
                messages = [{"role": "user", "content": f"{prefix}{i}"}]
                if answer:
                    messages.append({"role": "assistant", "content": answer})
                file.write(json.dumps({"messages": messages}) + "\n")

    write(tmp_path / "long.jsonl", "L", 10)
    write(tmp_path / "chat.jsonl.gz", "C", 50, answer="greedy")
    # The sampled stage answered the first 12 chat prompts again: the greedy draw leaves those out.
    (tmp_path / "run" / "sampled_data").mkdir(exist_ok=True)
    write(tmp_path / "run" / "sampled_data" / "conversations.jsonl", "C", 12, answer="sampled")
    environment = dict(LONG_CONVERSATIONS=str(tmp_path / "long.jsonl"), CHAT=str(tmp_path / "chat.jsonl.gz"))
    run_recipe(tmp_path, "train", EVAL_HOLDOUT="2", CHAT_PER_LONG="5", **environment)
    rows = {
        name: [json.loads(line)["messages"] for line in (tmp_path / "run" / f"{name}_conversations.jsonl").open()]
        for name in ("train", "eval")
    }
    assert len(rows["eval"]) == 6 and len(rows["train"]) == 10 + 12 + 38 - 6
    everything = rows["train"] + rows["eval"]
    sampled_prompts = {m[0]["content"] for m in everything if m[1:] and m[1]["content"] == "sampled"}
    greedy_prompts = {m[0]["content"] for m in everything if m[1:] and m[1]["content"] == "greedy"}
    assert len(sampled_prompts) == 12 and len(greedy_prompts) == 38 and not sampled_prompts & greedy_prompts

    # Named but missing: an error naming the file, not a mix without it.
    for name in ("data", "eval_data"):
        (tmp_path / "run" / name / "vocab_map.safetensors").unlink()
    with pytest.raises(subprocess.CalledProcessError) as error:
        run_recipe(tmp_path, "train", SAMPLED_CONVERSATIONS=str(tmp_path / "missing.jsonl"), **environment)
    assert "missing.jsonl" in error.value.stderr.decode()


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("build_long_prompts", BENCHMARKS / "build_long_prompts.py")
build_long_prompts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_long_prompts)


def evaluation_only(source: str) -> bool:
    """Whether no training source reads this document: held out, a standard library text file, or written apart."""
    name = source.split("#")[0]
    if name.startswith("stdlib:") and name.removeprefix("stdlib:") in build_long_prompts.PROSE_FILES:
        return True
    return name.startswith("synthesized:") or (name.startswith(("stdlib:", "pydoc:")) and held_out(name))


@pytest.mark.slow
def test_long_prompt_set_builds_deterministically_from_held_out_documents(tmp_path, chatml):
    chatml.save_pretrained(tmp_path / "tokenizer")
    argv = ["--tokenizer", str(tmp_path / "tokenizer"), "--per_category", "2", "--min_tokens", "300"]
    argv += ["--max_tokens", "700"]
    outputs = []
    for name in ("a", "b"):
        outputs.append(tmp_path / name / "question.jsonl")
        assert build_long_prompts.main([*argv, "--output", str(outputs[-1])]) == 0
    assert outputs[0].read_text() == outputs[1].read_text()
    rows = [json.loads(line) for line in outputs[0].read_text().splitlines()]
    assert [row["category"] for row in rows] == [category for category in CATEGORIES for _ in range(2)]
    for row in rows:
        assert 300 <= row["prompt_tokens"] <= 700 and evaluation_only(row["source"])
        messages = [{"role": "user", "content": row["turns"][0]}]
        assert (
            len(chatml.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]) == row["prompt_tokens"]
        )


def test_shipped_long_prompt_set():
    rows = [json.loads(line) for line in (BENCHMARKS / "data" / "long_prompts" / "question.jsonl").open()]
    assert len(rows) == 80 and len({row["turns"][0] for row in rows}) == 80
    assert [row["category"] for row in rows] == [category for category in CATEGORIES for _ in range(10)]
    assert all(500 <= row["prompt_tokens"] <= 1500 and evaluation_only(row["source"]) for row in rows)
    assert all(row["license"] for row in rows)
