"""`generate`: greedy decoding equals transformers', KV cache, left padding, stop ids, LongRoPE switch."""

from __future__ import annotations

import json

import pytest
import torch
from phi3_tiny import TINY, longrope, tiny_config

from lora.phi3 import Phi3ForCausalLM, default_stop_token_ids, from_pretrained, generate

transformers = pytest.importorskip("transformers")


def _hf_greedy(hf, ids: torch.Tensor, mask: torch.Tensor | None, new: int, stop: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(
            ids,
            attention_mask=mask if mask is not None else torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=TINY["pad_token_id"],
        )


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64}, {"sliding_window": 5}],
    ids=["mha", "gqa", "sliding_window"],
)
def test_greedy_equals_transformers(hf_checkpoint, overrides: dict) -> None:
    hf, path = hf_checkpoint(**overrides)
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (1, 6))
    expected = _hf_greedy(hf, ids, None, 20, [])
    got = generate(model, ids, max_new_tokens=20, stop_token_ids=[])
    assert got.tolist() == expected.tolist()


def test_greedy_left_padded_batch_equals_transformers_and_unpadded_rows(hf_checkpoint) -> None:
    hf, path = hf_checkpoint(num_key_value_heads=2)
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (3, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, TINY["pad_token_id"])
    expected = _hf_greedy(hf, ids, mask, 12, [])
    got = generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=[])
    assert got.tolist() == expected.tolist()
    alone = generate(model, ids[1:2, 3:], max_new_tokens=12, stop_token_ids=[])
    assert got[1, 3:].tolist() == alone[0].tolist()


def test_longrope_crossing_original_max_equals_transformers(hf_checkpoint) -> None:
    # Prompt of 10 with original_max 16: the cache is rebuilt with the long factors at the 17th token.
    hf, path = hf_checkpoint(**longrope(8, original=16, maximum=64))
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (1, 10))
    expected = _hf_greedy(hf, ids, None, 20, [])
    got = generate(model, ids, max_new_tokens=20, stop_token_ids=[])
    assert got.tolist() == expected.tolist()
    # The same tokens scored in one pass (long factors throughout) give the same argmaxes from 16 on.
    with torch.no_grad():
        full = model(got[:, :-1]).argmax(-1)
    assert full[0, 16:].tolist() == got[0, 17:].tolist()


def test_stops_on_any_stop_id_and_pads_finished_rows(hf_checkpoint) -> None:
    hf, path = hf_checkpoint()
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (2, 5))
    free = generate(model, ids, max_new_tokens=10, stop_token_ids=[])
    stop = [int(free[0, 7]), int(free[1, 5])]
    expected = _hf_greedy(hf, ids, None, 10, stop)
    got = generate(model, ids, max_new_tokens=10, stop_token_ids=stop)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] < free.shape[1]


def test_default_stop_ids_come_from_generation_config(hf_checkpoint) -> None:
    _, path = hf_checkpoint()
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [32000, 32001, 32007]}))
    assert default_stop_token_ids(from_pretrained(path)) == [32000, 32001, 32007]
    (path / "generation_config.json").unlink()
    assert default_stop_token_ids(from_pretrained(path)) == [TINY["eos_token_id"]]


def test_default_stop_id_ends_generation() -> None:
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config())
    ids = torch.randint(3, TINY["vocab_size"], (1, 4))
    first = int(generate(model, ids, max_new_tokens=1)[0, -1])
    model.generation_config = {"eos_token_id": [first], "pad_token_id": 0}
    assert generate(model, ids, max_new_tokens=8).shape == (1, 5)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy() -> None:
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config())
    ids = torch.randint(3, TINY["vocab_size"], (2, 4))

    def sample(seed: int, **kwargs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, ids, max_new_tokens=8, stop_token_ids=[], generator=generator, **kwargs)

    assert torch.equal(sample(1, temperature=1.0), sample(1, temperature=1.0))
    assert not torch.equal(sample(1, temperature=5.0), sample(2, temperature=5.0))
    greedy = generate(model, ids, max_new_tokens=8, stop_token_ids=[])
    assert torch.equal(sample(3, temperature=1.0, top_p=1e-6), greedy)


def test_generate_restores_training_mode() -> None:
    model = Phi3ForCausalLM(tiny_config()).train()
    generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    assert model.training


def test_bad_generate_arguments() -> None:
    model = Phi3ForCausalLM(tiny_config())
    ids = torch.ones(2, 4, dtype=torch.long)
    right_padded = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="attention_mask has padding after a real token; generate needs left padding"):
        generate(model, ids, attention_mask=right_padded, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\) with at least one token, got shape \(4,\)"):
        generate(model, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"at least one token, got shape \(2, 0\)"):
        generate(model, ids[:, :0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        generate(model, ids, max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        generate(model, ids, max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        generate(model, ids, max_new_tokens=-1)
