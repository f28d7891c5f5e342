"""Datasets: JSONL errors with line numbers, the length policy, padding, packing (same loss), step order."""

from __future__ import annotations

import json
import re

import pytest
import torch
from phi3_tiny import tiny_config

from lora.phi3 import Phi3ForCausalLM
from lora.phi3.chat import IGNORE_INDEX, PHI3
from lora.phi3.data import (
    Example,
    collate,
    encode_conversations,
    pack_examples,
    read_conversations,
    step_indices,
)
from lora.phi3.tokenizer import ByteTokenizer


def conversation(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_read_conversations_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation("a", "b"), "", conversation("c", "d", "s")])
    assert [n for n, _ in read_conversations(path)] == [1, 3]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"messages": [', "d.jsonl:2: not valid JSON"),
        ('["not", "an object"]', "d.jsonl:2: expected an object"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "d.jsonl:2: message 0 has unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "d.jsonl:2: conversation has no assistant turn"),
        ('{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "c"}]}',
         r"d.jsonl:2: message 0 content is not valid Unicode: lone surrogate '\\ud800' at character 1"),
    ],
)
def test_read_conversations_errors_name_the_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation("a", "b"), bad_line])
    with pytest.raises(ValueError, match=message):
        read_conversations(path)


# Characters that str.splitlines() ends a line at but that JSON strings may hold unescaped.
LINE_BREAKS_IN_STRINGS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"


def test_read_conversations_keeps_unicode_line_separators_inside_strings(tmp_path):
    question, answer = f"one{LINE_BREAKS_IN_STRINGS}two", "ok\u2029done\x85"
    record = json.dumps(conversation(question, answer), ensure_ascii=False)
    path = tmp_path / "u.jsonl"
    path.write_text(f"{record}\n\n{record}\n", encoding="utf-8")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert read_conversations(path) == [(1, messages), (3, messages)]
    # A bad line after such a line is reported at its own line number.
    path.write_text(f"{record}\n{record}\n{{\"messages\": [\n", encoding="utf-8")
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:3: not valid JSON")):
        read_conversations(path)


def test_read_conversations_reads_crlf_files(tmp_path):
    path = tmp_path / "crlf.jsonl"
    lines = [json.dumps(conversation("a\u2028b", "c")), "", json.dumps(conversation("d", "e", "s"))]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    assert [(n, m[-1]["content"]) for n, m in read_conversations(path)] == [(1, "c"), (3, "e")]
    path.write_bytes(b"\r\n".join([lines[0].encode(), b'{"messages": 1]', b""]))
    with pytest.raises(ValueError) as info:
        read_conversations(path)
    assert str(info.value) == f"{path}:2: not valid JSON (Expecting ',' delimiter at column 15)"


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"messages": [{"role": "user", "content": "a', "Unterminated string starting at column 43"),
        ('{"messages": [', "Expecting value at column 15"),
        ('{"messages": [{"role" "user"}]}', "Expecting ':' delimiter at column 23"),
        ('{"messages": [{"role": "us\ter"}]}', "Invalid control character at column 27"),
    ],
)
def test_read_conversations_json_error_text(tmp_path, bad_line, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation("a", "b"), bad_line])
    with pytest.raises(ValueError) as info:
        read_conversations(path)
    assert str(info.value) == f"{path}:2: not valid JSON ({reason})"


def test_empty_and_unreadable_datasets(tmp_path):
    with pytest.raises(ValueError, match="the dataset is empty"):
        read_conversations(write_jsonl(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match="cannot read the dataset"):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="cannot read the dataset"):
        read_conversations(tmp_path / "bin.jsonl")


def test_length_policy_truncates_or_drops_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation("hi", "ok"), conversation("x" * 50, "y" * 50),
                                              conversation("z" * 80, "w")])
    conversations = read_conversations(path)
    tok = ByteTokenizer()
    examples, stats = encode_conversations(conversations, tok, PHI3, max_length=64, policy="truncate")
    # Line 2 keeps part of its answer; line 3 loses all of it and is dropped even when truncating.
    assert (stats.kept, stats.truncated, stats.dropped, stats.dropped_lines) == (1, 1, 1, [3])
    assert [len(e.input_ids) for e in examples] == [len(tok.encode("<|user|>hi<|end|><|assistant|>ok<|end|>")) + 1, 64]
    examples, stats = encode_conversations(conversations, tok, PHI3, max_length=64, policy="drop")
    assert (stats.kept, stats.truncated, stats.dropped, stats.dropped_lines) == (1, 0, 2, [2, 3])
    assert str(stats) == "3 conversations: 1 kept whole, 0 truncated, 2 dropped"


def test_collate_pads_right_with_ignored_labels():
    rows = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8, 9], [IGNORE_INDEX, 9])]
    batch = collate(rows, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch.position_ids is None and batch.document_ids is None and batch.num_targets == 3
    assert batch.num_tokens == 5


def test_pack_examples_restarts_positions_and_never_splits_documents():
    rows = pack_examples([Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5]), Example([6, 7, 8], [6, 7, 8])],
                         seq_len=5)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert rows[0].position_ids == [0, 1, 2, 0, 1]
    assert rows[0].labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]
    batch = collate(rows, pad_id=0)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]  # the pads form a document of their own
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples([Example([1] * 6, [1] * 6)], seq_len=5)


def test_packed_and_unpacked_loss_agree(tmp_path):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = Phi3ForCausalLM(tiny_config(vocab_size=264, pad_token_id=256)).eval()
    path = write_jsonl(tmp_path / "d.jsonl", [conversation(f"q{i}" * (i + 1), f"a{i}" * (3 - i % 3), "sys" * (i % 2))
                                              for i in range(6)])
    examples, _ = encode_conversations(read_conversations(path), tok, PHI3, max_length=128, policy="truncate")
    plain = collate(examples, pad_id=256)
    packed = collate(pack_examples(examples, seq_len=96), pad_id=256)
    assert packed.input_ids.shape[0] < len(examples) and packed.num_targets == plain.num_targets
    with torch.no_grad():
        unpacked_loss = model.loss(plain.input_ids, plain.labels)
        packed_loss = model.loss(packed.input_ids, packed.labels, position_ids=packed.position_ids,
                                 document_ids=packed.document_ids)
        leaky_loss = model.loss(packed.input_ids, packed.labels)  # attention across documents: not the same
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky_loss, unpacked_loss, rtol=1e-3, atol=1e-3)


def test_step_indices_cover_each_epoch_and_depend_only_on_arguments():
    steps = [step_indices(10, step=s, global_batch=3, seed=7) for s in range(6)]
    first_epoch = [i for s in steps[:3] for i in s]
    assert len(set(first_epoch)) == 9 and all(len(s) == 3 for s in steps)
    assert steps[3] != steps[0]  # a new shuffle in the next epoch
    assert step_indices(10, step=4, global_batch=3, seed=7) == steps[4]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        step_indices(2, step=0, global_batch=3, seed=0)
