"""Chat datasets for training: JSONL reading, tokenisation with a length policy, packing, batches, step order.

A dataset is a JSONL file with one `{"messages": [{"role": ..., "content": ...}, ...]}` per line (the
format of ultrachat_200k). Each conversation becomes an `Example` (ids and assistant-only labels, see
`lora.phi3.chat`). Examples are batched with right padding, or packed several to a fixed-length row with
position ids restarting at 0 for each document, and the batch's `document_ids` make the model block attention
across documents, so a packed row gives each document the loss it has alone.

    conversations = read_conversations("train.jsonl")
    examples, stats = encode_conversations(conversations, tokenizer, PHI3, max_length=512, policy="truncate")
    batch = collate([examples[i] for i in step_indices(len(examples), step=0, global_batch=8, seed=0)], pad_id=0)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lora.phi3.chat import ChatTemplate, check_conversation, encode_chat
from lora.phi3.loss import IGNORE_INDEX
from lora.phi3.model import document_ids_from_positions
from lora.phi3.tokenizer import Tokenizer

__all__ = [
    "LENGTH_POLICIES",
    "Batch",
    "EncodeStats",
    "Example",
    "collate",
    "encode_conversations",
    "pack_examples",
    "read_conversations",
    "step_indices",
    "unigram_loss",
]


LENGTH_POLICIES = ("truncate", "drop")  # what `encode_conversations` does with a conversation too long


@dataclass
class Example:
    """One training row: token ids, labels (-100 where not learned) and position ids (None: 0, 1, 2, ...)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    @property
    def num_targets(self) -> int:
        """Tokens this row teaches: labels that are not -100, except the first (nothing predicts it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class EncodeStats:
    """What `encode_conversations` did: conversations read, kept as they were, truncated, dropped."""

    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_lines: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.conversations} conversations: {self.kept} kept whole, {self.truncated} truncated, "
                f"{self.dropped} dropped")


def read_conversations(path: str | Path) -> list[tuple[int, list[dict[str, str]]]]:
    """`(line number, messages)` for each non-blank line of a JSONL file, every conversation checked.

    Lines end at `\\n` or `\\r\\n` only. Errors name the file and line: `train.jsonl:12: not valid JSON
    (Expecting value at column 1)`, an unknown role, no assistant turn; an empty file is an error too.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")  # no newline translation: "\r" alone does not end a line
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the dataset ({err})") from err
    conversations = []
    # Not `str.splitlines`: it also splits at U+2028, U+0085 and other characters that JSON strings may
    # hold unescaped (`json.dumps(..., ensure_ascii=False)` writes them).
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:  # err.msg may end in "at": "Unterminated string starting at"
            raise ValueError(f"{where}: not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})") from err
        if not isinstance(record, dict) or "messages" not in record:
            raise ValueError(f"{where}: expected an object with a 'messages' list")
        conversations.append((number, check_conversation(record["messages"], where)))
    if not conversations:
        raise ValueError(f"{path}: the dataset is empty (no conversations)")
    return conversations


def encode_conversations(
    conversations: Sequence[tuple[int, list[dict[str, str]]]],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    *,
    max_length: int,
    policy: Literal["truncate", "drop"],
) -> tuple[list[Example], EncodeStats]:
    """Tokenise each conversation; longer than `max_length` tokens: cut (`"truncate"`) or skip (`"drop"`).

    A truncated conversation that keeps no assistant token is dropped too. Stats count each outcome.
    """
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"policy must be 'truncate' or 'drop', got {policy!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    stats = EncodeStats(conversations=len(conversations))
    examples = []
    for number, messages in conversations:
        ids, labels = encode_chat(tokenizer, messages, template)
        example = Example(ids, labels)
        if len(ids) > max_length:
            example = Example(ids[:max_length], labels[:max_length])
            if policy == "drop" or example.num_targets == 0:
                stats.dropped += 1
                stats.dropped_lines.append(number)
                continue
            stats.truncated += 1
        elif example.num_targets == 0:
            stats.dropped += 1
            stats.dropped_lines.append(number)
            continue
        else:
            stats.kept += 1
        examples.append(example)
    return examples, stats


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Concatenate examples, in order, into rows of at most `seq_len` tokens; documents are never split.

    Position ids restart at 0 for each document: `[0, 1, 2, 0, 1, 0, 1, 2, 3]`. The first token of each
    document gets label -100 (the previous document must not learn to predict it). Rows are not padded
    here; `collate` pads them.
    """
    rows: list[Example] = []
    current = Example([], [], [])
    for example in examples:
        n = len(example.input_ids)
        if n > seq_len:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {seq_len}")
        if current.input_ids and len(current.input_ids) + n > seq_len:
            rows.append(current)
            current = Example([], [], [])
        current.input_ids += example.input_ids
        current.labels += [IGNORE_INDEX, *example.labels[1:]]
        current.position_ids += list(range(n))
    if current.input_ids:
        rows.append(current)
    return rows


@dataclass
class Batch:
    """Tensors for `Phi3ForCausalLM.loss`: `input_ids`, `labels` `(B, T)`; for packed rows `position_ids` and
    `document_ids` (None otherwise), which the model takes as they are:
    `model.loss(b.input_ids, b.labels, position_ids=b.position_ids, document_ids=b.document_ids)`.

    `num_targets` counts the labels the loss covers, `num_tokens` the real (not padding) tokens.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None
    document_ids: torch.Tensor | None
    num_targets: int
    num_tokens: int

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device`."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(self.input_ids.to(device), self.labels.to(device), move(self.position_ids),
                     move(self.document_ids), self.num_targets, self.num_tokens)


def collate(rows: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad `rows` to the longest: ids with `pad_id`, labels with -100.

    With right padding a causal model needs no attention mask: real tokens never see the pads after
    them, and the pads' own outputs carry no label. Packed rows (with position ids) pad their positions
    with a fresh 0, 1, 2, ... run, a document of its own that no real token attends to.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    packed = rows[0].position_ids is not None
    positions = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        if positions is not None:
            positions[b, :n] = torch.tensor(row.position_ids)
            positions[b, n:] = torch.arange(width - n)
    documents = None if positions is None else document_ids_from_positions(positions)  # (B, T)
    num_tokens = sum(len(r.input_ids) for r in rows)
    return Batch(ids, labels, positions, documents, int((labels[:, 1:] != IGNORE_INDEX).sum()), num_tokens)


def step_indices(num_rows: int, *, step: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step` (0-based): the step-th slice of a seeded per-epoch shuffle.

    Epoch `e = step // (num_rows // global_batch)` uses `randperm(num_rows)` seeded with `seed + e`; the
    last incomplete batch of an epoch is skipped. A function of its arguments only, so resuming at any
    step, or sharding the slice over ranks, needs no data-loader state.
    """
    steps_per_epoch = num_rows // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{num_rows} rows are fewer than one global batch of {global_batch}")
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[offset * global_batch : (offset + 1) * global_batch].tolist()


def unigram_loss(train: Sequence[Example], evaluation: Sequence[Example], vocab_size: int) -> float:
    """Cross-entropy of `evaluation`'s target tokens under add-one unigram frequencies of `train`'s: what a model
    that ignores context can reach, `-mean(log((count[t] + 1) / (N + V)))`.

    A reference for a trained model's eval loss (the embedded random model starts above it).
    """

    def targets(rows: Sequence[Example]) -> torch.Tensor:
        return torch.tensor([t for r in rows for t in r.labels[1:] if t != IGNORE_INDEX], dtype=torch.long)

    counts = torch.bincount(targets(train), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[targets(evaluation)].mean())
