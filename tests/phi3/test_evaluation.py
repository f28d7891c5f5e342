"""lora.phi3.evaluation (eval loss over a set, a greedy sample), lora.phi3.distributed on one process, and the
model's `model(ids, labels)` loss form that DDP wraps."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from phi3_tiny import tiny_config

from lora.phi3 import Phi3ForCausalLM, generate, patch
from lora.phi3.chat import PHI3, encode_prompt
from lora.phi3.data import collate, encode_conversations, read_conversations, unigram_loss
from lora.phi3.distributed import Processes, setup_processes
from lora.phi3.evaluation import Evaluation
from lora.phi3.tokenizer import ByteTokenizer

ONE = Processes(rank=0, world=1, device=torch.device("cpu"))


def setup(tmp_path, n: int = 7):
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    model = Phi3ForCausalLM(tiny_config(vocab_size=264, pad_token_id=256))
    patch(model, r=2, lora_dropout=0.3)  # dropout: eval mode must switch it off
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}" * (i + 1)},
                                                     {"role": "assistant", "content": f"a{i}" * (3 - i % 3)}]}) + "\n"
                            for i in range(n)))
    rows, _ = encode_conversations(read_conversations(path), tokenizer, PHI3, max_length=128, policy="truncate")
    return model.train(), tokenizer, rows


def test_eval_loss_is_the_mean_over_every_target_token_whatever_the_batch_size(tmp_path):
    model, tokenizer, rows = setup(tmp_path)
    whole = collate(rows, pad_id=256)
    with torch.no_grad():
        expected = float(model.eval().loss(whole.input_ids, whole.labels))
    model.train()
    for size in (1, 3, 7):
        evaluation = Evaluation(rows, size, 256, tokenizer, PHI3, "q1", max_new_tokens=0)
        assert abs(evaluation.loss(model, ONE) - expected) < 1e-6
    assert model.training  # and back in training mode after __call__
    evaluation(model, ONE)
    assert model.training


def test_evaluating_leaves_the_training_random_stream_alone(tmp_path):
    model, tokenizer, rows = setup(tmp_path)
    evaluation = Evaluation(rows, 4, 256, tokenizer, PHI3, "q1q1", max_new_tokens=5)
    torch.manual_seed(3)
    loss, sample = evaluation(model, ONE)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), after)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "q1q1"}], PHI3)
    greedy = generate(model.eval(), torch.tensor([ids]), max_new_tokens=5)
    assert sample == tokenizer.decode(greedy[0, len(ids):].tolist(), skip_special_tokens=True).strip()
    assert isinstance(loss, float)


def test_model_called_with_labels_is_its_loss(tmp_path):
    model, _, rows = setup(tmp_path)
    batch = collate(rows, pad_id=256)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch.input_ids, batch.labels, reduction="sum"),
                           model.loss(batch.input_ids, batch.labels, reduction="sum"))
        assert model(batch.input_ids).shape == (*batch.input_ids.shape, 264)


def test_unigram_loss_by_hand():
    from lora.phi3.data import Example

    train = [Example([0, 1, 1, 2], [-100, 1, 1, 2])]  # targets 1, 1, 2
    evaluation = [Example([0, 1, 3], [-100, 1, 3])]  # targets 1, 3
    # add-one over a 4-id vocabulary: counts 1, 3, 2, 1 of 7
    assert abs(unigram_loss(train, evaluation, 4) - -(math.log(3 / 7) + math.log(1 / 7)) / 2) < 1e-12


def test_one_process_without_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    procs = setup_processes("cpu")
    assert (procs.rank, procs.world, procs.device, procs.sharded, procs.rng_devices) == (0, 1, torch.device("cpu"),
                                                                                         False, [])


def test_an_eval_set_without_targets_is_an_error_not_nan(tmp_path):
    model, tokenizer, rows = setup(tmp_path)
    with pytest.raises(ValueError, match="Evaluation needs at least one eval row"):
        Evaluation([], 4, 256, tokenizer, PHI3, "q1", max_new_tokens=0)
    unlabelled = [dataclasses.replace(row, labels=[-100] * len(row.labels)) for row in rows[:3]]
    evaluation = Evaluation(unlabelled, 2, 256, tokenizer, PHI3, "q1", max_new_tokens=0)
    with pytest.raises(ValueError, match="the eval set has no target tokens"):
        evaluation.loss(model, ONE)
    assert model.training
