"""Data loading: Alpaca and text files, masking, errors that point at the record, resumable order."""

import copy
import json

import pytest

from dlqat.data import (
    IGNORE_INDEX,
    DataError,
    alpaca_prompt,
    chunk_tokens,
    collate,
    examples_fingerprint,
    load_examples,
    micro_batch_indices,
)


def test_alpaca_prompt_tokens_are_masked(alpaca_file, tokenizer):
    examples = load_examples(alpaca_file, tokenizer, seq_len=512)
    assert len(examples) == 8
    ex = examples[1]
    prompt = tokenizer(
        alpaca_prompt({"instruction": "Add the numbers.", "input": "2 and 3"}), add_special_tokens=False
    )["input_ids"]
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex["labels"][len(prompt) :] == ex["input_ids"][len(prompt) :]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert "### Input:" in alpaca_prompt({"instruction": "i", "input": "x"})
    assert "### Input:" not in alpaca_prompt({"instruction": "i", "input": ""})
    assert len(load_examples(alpaca_file, tokenizer, seq_len=128)) < 8  # prompt-only truncations are dropped
    full = load_examples(alpaca_file, tokenizer, seq_len=512, train_on_prompt=True)
    assert full[1]["labels"] == full[1]["input_ids"]


def test_jsonl_and_text(tmp_path, tokenizer, text_file):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(3)) + "\n")
    assert len(load_examples(path, tokenizer, 512)) == 3
    blocks = load_examples(text_file, tokenizer, 32)
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert len(blocks) == len(ids) // 32 and all(len(b["input_ids"]) == 32 for b in blocks)
    assert blocks[1]["input_ids"] == ids[32:64]


@pytest.mark.parametrize(
    "content,suffix,expected",
    [
        (
            '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
            ".json",
            r"alpaca.json\[1\]: missing field 'output'",
        ),
        ('[{"instruction": 3, "output": "b"}]', ".json", r"alpaca.json\[0\]: field 'instruction' must be a string"),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"',
            ".jsonl",
            r"alpaca.jsonl:2: invalid JSON",
        ),
        ('{"instruction": "a", "output": "b"}\n[1]', ".jsonl", r"alpaca.jsonl:2: expected an object"),
        ('{"instruction": "a"}', ".json", r"alpaca.json: expected a JSON list"),
    ],
)
def test_malformed_records_name_file_record_and_field(tmp_path, tokenizer, content, suffix, expected):
    path = tmp_path / f"alpaca{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_examples(path, tokenizer, 64)


def test_unknown_suffix_and_too_short(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text("a,b")
    with pytest.raises(DataError, match=r"data.csv: unknown data file type '.csv'"):
        load_examples(path, tokenizer, 64)
    short = tmp_path / "short.txt"
    short.write_text("hi")
    with pytest.raises(DataError, match="seq_len=64"):
        load_examples(short, tokenizer, 64)


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_micro_batch_order_is_resumable_and_process_independent():
    full = take(micro_batch_indices(10, 2, seed=3), 12)  # crosses an epoch boundary (5 per epoch)
    assert take(micro_batch_indices(10, 2, seed=3, start=7), 5) == full[7:]
    assert sorted(i for batch in full[:5] for i in batch) == list(range(10))
    assert full[:5] != full[5:10]  # a fresh permutation each epoch
    # two processes at micro-batch 1 see, together, what one process sees at micro-batch 2
    one = take(micro_batch_indices(10, 2, seed=3), 5)
    r0 = take(micro_batch_indices(10, 1, seed=3, rank=0, world_size=2), 5)
    r1 = take(micro_batch_indices(10, 1, seed=3, rank=1, world_size=2), 5)
    assert [a + b for a, b in zip(r0, r1)] == one
    with pytest.raises(DataError, match="cannot fill one step"):
        next(micro_batch_indices(3, 2, seed=0, world_size=2))


def test_chunk_drops_only_the_short_tail():
    assert chunk_tokens(list(range(10)), 4) == [
        {"input_ids": [0, 1, 2, 3], "labels": [0, 1, 2, 3]},
        {"input_ids": [4, 5, 6, 7], "labels": [4, 5, 6, 7]},
    ]


def test_chunk_puts_the_bos_first_and_keeps_the_stream_contiguous():
    assert chunk_tokens(list(range(10, 17)), 4, bos=1) == [
        {"input_ids": [1, 10, 11, 12], "labels": [1, 10, 11, 12]},
        {"input_ids": [1, 13, 14, 15], "labels": [1, 13, 14, 15]},
    ]


def test_bos_models_get_their_bos_in_training_examples(tokenizer, tmp_path, alpaca_file):
    """A tokenizer that adds a BOS by default (Gemma, Llama 3) gets it on every example; ours adds none."""
    from tokenizers.processors import TemplateProcessing

    from dlqat.data import leading_bos

    assert leading_bos(tokenizer) is None
    with_bos = copy.deepcopy(tokenizer)
    with_bos.add_special_tokens({"bos_token": "<s>"})
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert with_bos("a b")["input_ids"][0] == bos and leading_bos(with_bos) == bos
    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven eight nine ten " * 20)
    blocks = load_examples(text, with_bos, seq_len=8)
    assert blocks and all(b["input_ids"][0] == bos and len(b["input_ids"]) == 8 for b in blocks)
    plain = load_examples(text, tokenizer, seq_len=8)
    assert blocks[0]["input_ids"][1:] == plain[0]["input_ids"][:7]
    records = load_examples(alpaca_file, with_bos, seq_len=512)
    assert all(r["input_ids"][0] == bos and r["labels"][0] == IGNORE_INDEX for r in records)


def test_examples_fingerprint_sees_tokens_labels_order_and_boundaries():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    same = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in examples]
    assert examples_fingerprint(examples) == examples_fingerprint(same)
    other_label = [examples[0], {"input_ids": [4, 5], "labels": [4, 5]}]
    moved_boundary = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4, 5], "labels": [3, -100, 5]}]
    fingerprints = {examples_fingerprint(e) for e in (examples, other_label, examples[::-1], moved_boundary)}
    assert len(fingerprints) == 4
