"""Data preparation: assistant-only masks in two chat templates, draft vocabulary maps, target-written data."""

from __future__ import annotations

import gzip
import json
import sys

import pytest
import torch
from conftest import CHATML_TEMPLATE, CONVERSATION, make_head, make_target, make_tokenizer
from trl.chat_template_utils import llama3_chat_template

from hf_eagle3.cli.prepare_data import main as prepare_data_main
from hf_eagle3.data import (
    build_vocab_maps,
    count_loss_tokens,
    coverage_by_size,
    filter_prompts,
    generate_texts,
    get_assistant_mask_template,
    load_chat_dataset,
    load_vocab_map,
    regenerate_conversations,
    save_vocab_map,
    synthesize_prompts,
    to_messages,
    tokenize_conversation,
    tokenize_conversations,
    user_turn_prefix,
)

# Llama 3 layout written differently from Meta's template, so TRL does not recognise it.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Drops earlier assistant turns, as reasoning templates drop earlier thoughts: not prefix-preserving.
FORGETFUL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'assistant' or loop.last %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def masked_spans(tokenizer, encoded) -> list[str]:
    """The text of each run of loss-masked tokens."""
    spans, current = [], []
    for token, masked in zip(encoded["input_ids"], encoded["loss_mask"] + [0], strict=False):
        if masked:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize(
    "template, end_of_turn, via_trl",
    [
        (CHATML_TEMPLATE, "<|im_end|>", False),
        (LLAMA3_STYLE_TEMPLATE, "<|eot_id|>", False),
        (llama3_chat_template, "<|eot_id|>", True),
    ],
    ids=["chatml", "llama3-style", "llama3-trl"],
)
def test_loss_mask_is_assistant_content_and_end_of_turn(byte_level_tokenizer, template, end_of_turn, via_trl):
    tokenizer = make_tokenizer(byte_level_tokenizer, template)
    mask_template = get_assistant_mask_template(tokenizer)
    assert (mask_template is not None) == via_trl
    encoded = tokenize_conversation(tokenizer, CONVERSATION, mask_template)
    assert encoded["input_ids"] == tokenizer.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])
    expected = [message["content"] + end_of_turn for message in CONVERSATION if message["role"] == "assistant"]
    assert masked_spans(tokenizer, encoded) == expected
    # Marker template (TRL) and rendered-prefix fallback agree.
    assert tokenize_conversation(tokenizer, CONVERSATION, None) == encoded


def test_masks_without_trl(byte_level_tokenizer, monkeypatch):
    """Where TRL is not installed, the rendered-prefix method gives the same masks."""
    tokenizer = make_tokenizer(byte_level_tokenizer, llama3_chat_template)
    with_trl = tokenize_conversation(tokenizer, CONVERSATION, get_assistant_mask_template(tokenizer))
    monkeypatch.setitem(sys.modules, "trl.chat_template_utils", None)  # makes the import raise ImportError
    assert get_assistant_mask_template(tokenizer) is None
    assert tokenize_conversations(tokenizer, [CONVERSATION])[0][0] == with_trl


def test_chat_formats_and_bad_rows():
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert to_messages(sharegpt) == expected
    assert to_messages({"messages": expected, "id": 3}) == expected
    assert to_messages({"prompt": expected[:1], "completion": expected[1:]}) == expected
    assert to_messages({"prompt": "hi", "completion": "hello"}) == expected
    assert to_messages({"prompt": "hi"}) == expected[:1]
    with pytest.raises(ValueError, match="row 7 has columns \\['text'\\]"):
        to_messages({"text": "plain"}, index=7)
    with pytest.raises(ValueError, match="unknown ShareGPT speaker 'robot'"):
        to_messages({"conversations": [{"from": "robot", "value": "beep"}]})
    with pytest.raises(ValueError, match="unknown role 'narrator'"):
        to_messages({"messages": [{"role": "narrator", "content": "once"}]})


def test_load_chat_dataset_from_files_and_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_list([{"messages": CONVERSATION}])
    rows.to_parquet(str(tmp_path / "chat.parquet"))
    rows.to_json(str(tmp_path / "chat.jsonl"))
    (tmp_path / "chat.jsonl.gz").write_bytes(gzip.compress((tmp_path / "chat.jsonl").read_bytes()))
    rows.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"test": rows}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("chat.parquet", "chat.jsonl", "chat.jsonl.gz", "saved"):
        assert to_messages(load_chat_dataset(str(tmp_path / source))[0]) == CONVERSATION
    assert to_messages(load_chat_dataset(str(tmp_path / "saved_dict"), split="test")[0]) == CONVERSATION
    with pytest.raises(ValueError, match="has splits \\['test'\\], not 'train': pass --split"):
        load_chat_dataset(str(tmp_path / "saved_dict"))
    (tmp_path / "chat.txt").write_text("hello")
    with pytest.raises(ValueError, match="use .jsonl, .json \\(optionally .gz\\) or .parquet"):
        load_chat_dataset(str(tmp_path / "chat.txt"))


def test_bad_chat_data_errors(byte_level_tokenizer, chatml):
    with pytest.raises(ValueError, match="no chat template"):
        get_assistant_mask_template(make_tokenizer(byte_level_tokenizer, None))
    with pytest.raises(ValueError, match="Conversation 1: conversation has no assistant message"):
        tokenize_conversations(chatml, [CONVERSATION, CONVERSATION[:1]])
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        tokenize_conversation(make_tokenizer(byte_level_tokenizer, FORGETFUL_TEMPLATE), CONVERSATION, None)
    user_turns_only = "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}"
    empty_answers = user_turns_only + "{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="marked no assistant tokens"):
        tokenize_conversation(make_tokenizer(byte_level_tokenizer, empty_answers), CONVERSATION, None)


def test_long_conversations_dropped_or_truncated(chatml):
    full = len(tokenize_conversation(chatml, CONVERSATION, None)["input_ids"])
    short = CONVERSATION[:2]
    short_length = len(tokenize_conversation(chatml, short, None)["input_ids"])
    dataset, counts = tokenize_conversations(chatml, [CONVERSATION, short], max_length=short_length)
    assert counts["kept"] == 1 and counts["dropped_too_long"] == 1 and dataset.num_rows == 1
    assert counts["tokens"] == short_length
    dataset, counts = tokenize_conversations(chatml, [CONVERSATION, short], max_length=full - 3, truncate=True)
    assert counts["kept"] == 2 and [len(ids) for ids in dataset["input_ids"]] == [full - 3, short_length]
    assert sorted(dataset.column_names) == ["attention_mask", "input_ids", "loss_mask"]
    # The first assistant token sits past a 20-token cut: nothing left to learn.
    with pytest.raises(ValueError, match="No conversation left"):
        tokenize_conversations(chatml, [CONVERSATION], max_length=20, truncate=True)


def test_parallel_tokenising_gives_the_same_rows(chatml):
    conversations = [CONVERSATION, CONVERSATION[:2]] * 3
    serial, serial_counts = tokenize_conversations(chatml, conversations, max_length=60, truncate=True)
    parallel, parallel_counts = tokenize_conversations(chatml, conversations, max_length=60, truncate=True, num_proc=2)
    assert parallel_counts == serial_counts and parallel.to_dict() == serial.to_dict()
    assert parallel.features["input_ids"].feature.dtype == "int32"


def test_vocab_maps_invert_and_cover():
    counts = torch.tensor([0, 5, 1, 9, 0, 3, 2, 0])
    d2t, t2d, coverage = build_vocab_maps(counts, draft_vocab_size=3, vocab_size=8)
    kept = torch.arange(3) + d2t
    assert kept.tolist() == [1, 3, 5] and t2d.nonzero().flatten().tolist() == [1, 3, 5]
    assert coverage == pytest.approx(17 / 20)
    # Coverage as the vocabulary grows, on the counts it was chosen on and on others (ranked by the first).
    assert coverage_by_size(counts, [1, 3, 6, 8]) == pytest.approx({1: 9 / 20, 3: 17 / 20, 6: 1.0, 8: 1.0})
    other = torch.tensor([4, 0, 0, 1, 0, 0, 0, 5])
    assert coverage_by_size(counts, [2, 6, 8], other) == pytest.approx({2: 0.1, 6: 0.5, 8: 1.0})
    with pytest.raises(ValueError, match="No loss-masked tokens"):
        coverage_by_size(counts, [2], torch.zeros(8, dtype=torch.long))
    # Fewer distinct ids than draft ids: padded with the lowest unused ids, still ascending.
    d2t, t2d, coverage = build_vocab_maps({3: 4, 6: 1}, draft_vocab_size=4, vocab_size=8)
    assert (torch.arange(4) + d2t).tolist() == [0, 1, 3, 6] and coverage == 1.0
    # A head's own maps take them and map both ways.
    head = make_head(make_target(vocab_size=8, num_hidden_layers=4), draft_vocab_size=4)
    head.d2t.copy_(d2t)
    head.t2d.copy_(t2d)
    head.check_vocab_maps()
    draft_ids = torch.arange(4)
    assert torch.equal(head.target_to_draft_ids(head.draft_to_target_ids(draft_ids)), draft_ids)
    with pytest.raises(ValueError, match="must be between 1 and the target's vocab_size \\(8\\)"):
        build_vocab_maps(counts, draft_vocab_size=9, vocab_size=8)
    with pytest.raises(ValueError, match="No loss-masked tokens"):
        build_vocab_maps(torch.zeros(8, dtype=torch.long), draft_vocab_size=2, vocab_size=8)


def test_vocab_maps_count_loss_tokens_only_and_round_trip(tmp_path):
    from datasets import Dataset

    rows = [{"input_ids": [4, 4, 7, 2], "loss_mask": [0, 1, 1, 0]}, {"input_ids": [7, 9], "loss_mask": [1, 1]}]
    assert count_loss_tokens(rows, 10).tolist() == [0, 0, 0, 0, 1, 0, 0, 2, 0, 1]
    # A `datasets.Dataset` is counted from Arrow batches, through its index mapping (here: one row).
    assert count_loss_tokens(Dataset.from_list(rows).select([1]), 10).tolist() == [0] * 7 + [1, 0, 1]
    d2t, t2d, coverage = build_vocab_maps(rows, draft_vocab_size=2, vocab_size=10)
    assert (torch.arange(2) + d2t).tolist() == [4, 7] and coverage == pytest.approx(3 / 4)
    save_vocab_map(tmp_path, d2t, t2d)
    loaded_d2t, loaded_t2d = load_vocab_map(tmp_path)
    assert torch.equal(loaded_d2t, d2t) and torch.equal(loaded_t2d, t2d)
    save_vocab_map(tmp_path / "bad.safetensors", torch.tensor([4, 4]), t2d)
    with pytest.raises(ValueError, match="do not describe the same draft vocabulary"):
        load_vocab_map(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        count_loss_tokens(rows, 8)


def test_user_turn_prefix_and_prompt_filter(byte_level_tokenizer, chatml):
    assert user_turn_prefix(chatml) == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    llama3 = make_tokenizer(byte_level_tokenizer, LLAMA3_STYLE_TEMPLATE)
    assert user_turn_prefix(llama3) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    seen = set()
    assert filter_prompts(["  Tell me a joke. ", "", "short", "tell me  a JOKE."], min_length=6, seen=seen) == [
        "Tell me a joke."
    ]
    assert filter_prompts(["Tell me a joke.", "Write a poem."], min_length=6, seen=seen) == ["Write a poem."]


@pytest.fixture
def tiny_target(chatml):
    return make_target("llama", vocab_size=len(chatml), num_hidden_layers=2)


def test_batched_left_padded_generation_matches_one_by_one(chatml, tiny_target):
    prompts = [
        chatml.apply_chat_template(CONVERSATION[: end + 1], tokenize=False, add_generation_prompt=True)
        for end in (0, 2)
    ]
    prompts.append(user_turn_prefix(chatml))
    batched, finished = generate_texts(tiny_target, chatml, prompts, max_new_tokens=6, batch_size=3)
    assert len(finished) == 3
    assert batched == [generate_texts(tiny_target, chatml, [prompt], max_new_tokens=6)[0][0] for prompt in prompts]


def test_regenerate_keeps_user_turns_and_replaces_answers(chatml, tiny_target):
    conversations = [CONVERSATION, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    regenerated = regenerate_conversations(tiny_target, chatml, conversations, max_new_tokens=4, batch_size=2)
    assert [[message["role"] for message in messages] for messages in regenerated] == [
        ["user", "assistant", "user", "assistant"],
        ["system", "user", "assistant"],
    ]
    assert regenerated[0][0] == CONVERSATION[0] and regenerated[0][2] == CONVERSATION[2]
    assert regenerated[0][1]["content"] != CONVERSATION[1]["content"]
    with pytest.raises(ValueError, match="Conversation 0 has no user message"):
        regenerate_conversations(tiny_target, chatml, [[{"role": "system", "content": "x"}]], max_new_tokens=2)


def test_synthesize_prompts_are_finished_and_distinct(chatml, tiny_target, chatty_target):
    torch.manual_seed(0)
    texts, finished = generate_texts(chatty_target, chatml, [user_turn_prefix(chatml)] * 8, 40, temperature=1.0)
    assert any(finished) and all(
        len(chatml.encode(text)) < 40 for text, done in zip(texts, finished, strict=True) if done
    )
    prompts = synthesize_prompts(chatty_target, chatml, 5, max_new_tokens=40, batch_size=4, min_length=1)
    assert len(prompts) == 5 and len({" ".join(prompt.lower().split()) for prompt in prompts}) == 5
    # The plain random target hardly ever ends a turn: its cut prompts are all discarded.
    with pytest.raises(ValueError, match="wrote no usable prompt in 1 batches"):
        synthesize_prompts(tiny_target, chatml, 2, max_new_tokens=3, batch_size=2, min_length=1, max_rounds=1)
    with pytest.raises(ValueError, match="needs sampling"):
        synthesize_prompts(tiny_target, chatml, 5, temperature=0.0)


def test_synthesized_prompts_start_with_the_openers_in_turn(chatml, chatty_target):
    torch.manual_seed(0)
    openers = ["Write a", "Solve", "Explain why"]
    prompts = synthesize_prompts(
        chatty_target, chatml, 6, max_new_tokens=40, batch_size=6, min_length=1, openers=openers, max_rounds=8
    )
    assert len(prompts) == 6
    assert all(any(prompt.startswith(opener) for opener in openers) for prompt in prompts)
    # The model continues the opener: the prompt is longer than it, and every opener gets used.
    assert all(len(prompt) > len(next(o for o in openers if prompt.startswith(o))) for prompt in prompts)
    assert {next(o for o in openers if prompt.startswith(o)) for prompt in prompts} == set(openers)
    with pytest.raises(ValueError, match="must not be empty"):
        synthesize_prompts(chatty_target, chatml, 2, openers=["Write", " "])


def test_synthesized_prompts_skip_the_excluded_ones(chatml, tiny_target):
    """Prompts added to earlier conversations do not repeat theirs (case and spacing ignored)."""
    torch.manual_seed(0)
    openers = ["Write a\n\nstory", "Solve\n\nit", "Explain why\n\nnow"]
    common = dict(max_new_tokens=3, batch_size=3, min_length=1, openers=openers, first_paragraph=True, max_rounds=1)
    assert synthesize_prompts(tiny_target, chatml, 3, **common) == ["Write a", "Solve", "Explain why"]
    kept = synthesize_prompts(tiny_target, chatml, 3, exclude=["write  A", "other"], **common)
    assert kept == ["Solve", "Explain why"]


def test_synthesized_prompts_cut_at_their_first_blank_line(chatml, tiny_target):
    """A model that writes its request, a blank line and then an answer (or never ends the turn) still gives
    prompts: the first paragraphs, kept though the turn is unfinished."""
    torch.manual_seed(0)
    openers = ["Write a\n\nstory", "Solve\n\nit", "Explain why\n\nnow"]
    common = dict(max_new_tokens=3, batch_size=3, min_length=1, openers=openers, max_rounds=1)
    prompts = synthesize_prompts(tiny_target, chatml, 3, first_paragraph=True, **common)
    assert prompts == ["Write a", "Solve", "Explain why"]
    # Without the cut the random target's turns all run to max_new_tokens: nothing is kept.
    with pytest.raises(ValueError, match="wrote no usable prompt"):
        synthesize_prompts(tiny_target, chatml, 3, **common)


def test_prepare_data_cli_end_to_end(tmp_path, chatml, chatty_target, capsys):
    from datasets import load_from_disk

    target_dir = tmp_path / "target"
    chatty_target.save_pretrained(target_dir)
    chatml.save_pretrained(target_dir)
    data_file = tmp_path / "sharegpt.jsonl"
    turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONVERSATION]
    data_file.write_text(
        json.dumps({"conversations": turns}) + "\n" + json.dumps({"messages": CONVERSATION[:2]}) + "\n"
    )
    output_dir = tmp_path / "prepared"
    common = ["--target", str(target_dir), "--output_dir", str(output_dir), "--draft_vocab_size", "64"]
    assert prepare_data_main([*common, "--data", str(data_file), "--max_samples", "1"]) == 0
    dataset = load_from_disk(str(output_dir))
    assert dataset.num_rows == 1 and dataset[0] == tokenize_conversation(chatml, CONVERSATION, None)
    assert "cover 100.00% of the tokens to learn" in capsys.readouterr().out

    openers = tmp_path / "openers.txt"
    openers.write_text("Write a\n\nSolve\n")
    generated = [*common, "--synthesize", "3", "--max_prompt_tokens", "40", "--min_prompt_length", "1"]
    generated += ["--prompt_openers", str(openers)]
    assert prepare_data_main([*generated, "--max_new_tokens", "5", "--temperature", "1", "--batch_size", "2"]) == 0
    dataset = load_from_disk(str(output_dir))
    d2t, t2d = load_vocab_map(output_dir)
    assert dataset.num_rows == 3 and d2t.shape == (64,) and t2d.shape == (len(chatml),)
    lines = (output_dir / "conversations.jsonl").read_text().splitlines()
    assert [[m["role"] for m in json.loads(line)["messages"]] for line in lines] == [["user", "assistant"]] * 3
    assert all(json.loads(line)["messages"][0]["content"].startswith(("Write a", "Solve")) for line in lines)
    summary = json.loads((output_dir / "prepare_data_summary.json").read_text())
    assert summary["kept"] == 3 and 0 < summary["coverage"] <= 1
    # The written conversations re-tokenise to the same rows without generating again.
    retokenised = tmp_path / "retokenised"
    conversations = str(output_dir / "conversations.jsonl")
    assert prepare_data_main([*common[:2], "--output_dir", str(retokenised), "--data", conversations]) == 0
    assert load_from_disk(str(retokenised)).to_dict() == dataset.to_dict()
    # Several sources are read in order, --max_samples counting across them; a bad row is named with its source.
    both = [*common[:2], "--output_dir", str(tmp_path / "both"), "--data", conversations, str(data_file)]
    assert prepare_data_main(both) == 0
    rows = load_from_disk(str(tmp_path / "both"))["input_ids"]
    assert (
        rows[:3] == dataset["input_ids"] and rows[3] == tokenize_conversation(chatml, CONVERSATION, None)["input_ids"]
    )
    assert (
        prepare_data_main([*both, "--max_samples", "4"]) == 0 and load_from_disk(str(tmp_path / "both")).num_rows == 4
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"conversations": "not turns"}) + "\n")
    with pytest.raises(ValueError, match=f"--data {broken}, row 0 'conversations' must be a list"):
        prepare_data_main([*both, str(broken)])
    # Added to them with the same seed, the synthesis would write the same prompts again; it writes others.
    added = tmp_path / "added"
    more = ["--output_dir", str(added), "--data", conversations, "--max_new_tokens", "5", "--batch_size", "2"]
    assert prepare_data_main([*generated[:2], *more, *generated[4:], "--temperature", "1"]) == 0
    prompts = [json.loads(line)["messages"][0]["content"] for line in (added / "conversations.jsonl").open()]
    assert len(prompts) == 6 and prompts[:3] == [json.loads(line)["messages"][0]["content"] for line in lines]
    assert len({" ".join(prompt.lower().split()) for prompt in prompts}) == 6

    with pytest.raises(ValueError, match="exceeds the target's vocab_size"):
        prepare_data_main([*common[:-1], str(len(chatml) + 1), "--data", str(data_file)])
    with pytest.raises(ValueError, match="Nothing to prepare"):
        prepare_data_main(common)
    openers.write_text("\n")
    with pytest.raises(ValueError, match="holds no opener"):
        prepare_data_main(generated)


@pytest.mark.real_model
@pytest.mark.slow
def test_prepare_data_with_smollm2_from_nothing(tmp_path, capsys):
    """SmolLM2-Instruct writes its own prompts and answers; its ChatML template has no TRL training variant."""
    pytest.importorskip("gguf", reason="loading a GGUF target needs the `gguf` package")
    from datasets import load_from_disk

    from hf_eagle3.cli import setup_logging

    setup_logging()  # as `hf-eagle3 prepare-data` does: the progress messages on stderr
    output_dir = tmp_path / "smollm2-data"
    options = ["--synthesize", "2", "--batch_size", "2", "--max_prompt_tokens", "64", "--max_new_tokens", "24"]
    prepare_data_main(["--target", "smollm2", "--output_dir", str(output_dir), "--dtype", "float32", *options])
    assert "Synthesised 2 distinct prompts." in capsys.readouterr().err
    conversations = [
        json.loads(line)["messages"] for line in (output_dir / "conversations.jsonl").read_text().splitlines()
    ]
    assert all(len(messages[0]["content"]) >= 10 and messages[1]["content"] for messages in conversations)
    dataset = load_from_disk(str(output_dir))
    d2t, t2d = load_vocab_map(output_dir)
    assert d2t.shape == (32000,) and t2d.shape == (49152,)
    im_start, im_end = 1, 2  # SmolLM2's <|im_start|>, <|im_end|>
    assert dataset.num_rows == len(conversations)
    for row in dataset:
        assert row["input_ids"][0] == im_start  # the template's own first token, no extra BOS
        learned = [token for token, masked in zip(row["input_ids"], row["loss_mask"], strict=True) if masked]
        # The answer is learned whole, then the end-of-turn token (cut answers get one from the template).
        assert learned[-1] == im_end and learned[:-1] == row["input_ids"][-len(learned) - 1 : -2]
        assert bool(t2d[learned].all())


def test_prepare_data_holds_out_an_evaluation_set(tmp_path, chatml, chatty_target, capsys):
    """--eval_size: a seeded split of the conversations, the draft vocabulary chosen on the training part only, and a
    held-out folder `train --eval_data` reads."""
    from datasets import load_from_disk

    from hf_eagle3.cli import main
    from hf_eagle3.data import vocab_coverage

    target_dir = tmp_path / "target"
    chatty_target.save_pretrained(target_dir)
    chatml.save_pretrained(target_dir)
    # Each answer repeats its own letter: the letters of held-out answers occur nowhere in the training part.
    data_file = tmp_path / "letters.jsonl"
    conversations = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": letter * 40}] for letter in "ABCDEFGHIJKL"
    ]
    data_file.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))

    def prepare(output_dir, *options: str) -> dict:
        common = ["--target", str(target_dir), "--data", str(data_file), "--draft_vocab_size", "4"]
        assert prepare_data_main([*common, "--output_dir", str(output_dir), *options]) == 0
        return json.loads((output_dir / "prepare_data_summary.json").read_text())

    summary = prepare(tmp_path / "prepared", "--eval_size", "3")
    training = load_from_disk(str(tmp_path / "prepared"))
    held_out = load_from_disk(str(tmp_path / "prepared" / "eval"))
    assert (training.num_rows, held_out.num_rows) == (9, 3) and summary["kept"] == 12
    assert {"train": 9, "eval": 3, "eval_folder": "eval"}.items() <= summary["split"].items()
    every_row = tokenize_conversations(chatml, conversations)[0]["input_ids"]
    assert sorted(map(tuple, [*training["input_ids"], *held_out["input_ids"]])) == sorted(map(tuple, every_row))
    # The vocabulary is the training part's own, and misses the ids only the held-out answers use.
    d2t, t2d = load_vocab_map(tmp_path / "prepared")
    assert torch.equal(d2t, build_vocab_maps(training, 4, len(chatml))[0])
    learned = {
        name: set(count_loss_tokens(part, len(chatml)).nonzero().flatten().tolist())
        for name, part in (("train", training), ("eval", held_out))
    }
    assert learned["eval"] - learned["train"] and not t2d[sorted(learned["eval"] - learned["train"])].any()
    assert summary["eval_coverage"] == vocab_coverage(held_out, t2d) < summary["coverage"]
    assert vocab_coverage(count_loss_tokens(held_out, len(chatml)), t2d) == summary["eval_coverage"]  # counted once
    out = capsys.readouterr().out
    assert "Held out 3 conversations" in out and f"{summary['eval_coverage']:.2%} of the held-out ones" in out
    # Half, twice and four times the draft vocabulary, per part; at its own size the figures above.
    by_size = summary["coverage_by_size"]
    assert list(by_size["train"]) == list(by_size["eval"]) == ["2", "4", "8", "16"]
    assert by_size["train"]["4"] == summary["coverage"] and by_size["eval"]["4"] == summary["eval_coverage"]
    assert all(list(part.values()) == sorted(part.values()) for part in by_size.values())
    assert f"4: {summary['coverage']:.2%} / {summary['eval_coverage']:.2%}," in out
    # The same seed draws the same split; another seed another one.
    prepare(tmp_path / "again", "--eval_size", "3")
    assert load_from_disk(str(tmp_path / "again" / "eval")).to_dict() == held_out.to_dict()
    prepare(tmp_path / "reseeded", "--eval_size", "3", "--seed", "0")
    assert load_from_disk(str(tmp_path / "reseeded" / "eval")).to_dict() != held_out.to_dict()
    # Prepared again without a split: the earlier held-out folder goes, its rows now being training rows.
    prepare(tmp_path / "reseeded")
    assert load_from_disk(str(tmp_path / "reseeded")).num_rows == 12 and not (tmp_path / "reseeded" / "eval").exists()

    with pytest.raises(ValueError, match="--eval_size 0 holds out no conversation"):
        prepare(tmp_path / "unused", "--eval_size", "0")
    with pytest.raises(ValueError, match="--eval_size 12 leaves nothing to train on: there are 12 conversations"):
        prepare(tmp_path / "unused", "--eval_size", "12")
    # Refused before anything is generated when only synthesised prompts are asked for.
    synthesis = ["--target", str(target_dir), "--output_dir", str(tmp_path / "unused"), "--synthesize", "3"]
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="--eval_size 3 leaves nothing to train on: there are 3 conversations"):
        prepare_data_main([*synthesis, "--eval_size", "3"])

    # train evaluates its head on the held-out folder.
    head_dir = tmp_path / "head"
    args = ["train", "--target", str(target_dir), "--data", str(tmp_path / "prepared")]
    args += ["--eval_data", str(tmp_path / "prepared" / "eval"), "--eval_strategy", "steps", "--eval_steps", "1"]
    args += ["--target_layer_ids", "0", "1", "1"]
    args += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--ttt_steps", "2", "--use_cpu", "true"]
    args += ["--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(head_dir), "--save_steps", "1"]
    assert main(args) == 0
    state = json.loads((head_dir / "checkpoint-1" / "trainer_state.json").read_text())
    assert any("eval_loss" in log for log in state["log_history"])
