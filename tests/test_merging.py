"""Model-level merge helpers: merge_lora, unmerge_lora, merged, merged_state_dict, disable_adapters."""

import pytest
import torch
from torch import nn

import lora


def model_and_input():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(8, 16, r=2, lora_alpha=4, merge_weights=False), nn.GELU(),
                          lora.MergedLinear(16, 12, r=2, enable_lora=(True, False, True), merge_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model, torch.randn(3, 8)


def plain_copy():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 12))


def test_merge_unmerge_and_context_manager():
    model, x = model_and_input()
    expected = model(x)
    weights = [m.weight.detach().clone() for m in (model[0], model[2])]
    assert lora.merge_lora(model) is model
    lora.merge_lora(model)  # idempotent
    torch.testing.assert_close(model(x), expected)
    assert lora.unmerge_lora(model) is model
    assert all(torch.equal(m.weight, w) for m, w in zip((model[0], model[2]), weights, strict=True))
    with lora.merged(model):
        assert model[0].merged and model[2].merged
        torch.testing.assert_close(model(x), expected)
    assert not model[0].merged and not model[2].merged
    # A layer merged before the block stays merged after it.
    model[0].merge()
    with lora.merged(model):
        pass
    assert model[0].merged and not model[2].merged


def test_merged_state_dict_is_pure_and_loads_into_the_plain_model():
    model, x = model_and_input()
    expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = lora.merged_state_dict(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not model[0].merged
    plain = plain_copy()
    plain.load_state_dict(state)  # strict: no lora_ keys, nothing missing
    torch.testing.assert_close(plain(x), expected)


def test_disable_adapters_runs_the_base_alone():
    model, x = model_and_input()
    plain = plain_copy()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    with_adapters = model(x)
    with lora.disable_adapters(model):
        torch.testing.assert_close(model(x), plain(x))
        with lora.merged(model):  # merged or not, the base alone
            torch.testing.assert_close(model(x), plain(x))
    torch.testing.assert_close(model(x), with_adapters)


def test_merged_restores_every_layer_when_the_block_or_the_merge_itself_fails():
    model, x = model_and_input()
    expected = model(x)
    with pytest.raises(RuntimeError, match="inside the block"):
        with lora.merged(model):
            raise RuntimeError("inside the block")
    assert not model[0].merged and not model[2].merged

    class FailsToMerge(lora.Linear):
        def merge(self):
            raise RuntimeError("out of memory")

    failing = FailsToMerge(12, 4, r=2, merge_weights=False)
    chain = nn.Sequential(model, failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        with lora.merged(chain):
            pass
    assert not model[0].merged and not model[2].merged
    assert model[0].merged_weight is None and model[2].merged_weight is None
    torch.testing.assert_close(model(x), expected)


def test_merged_state_dict_folds_a_shared_layer_under_each_of_its_names():
    shared = lora.Linear(4, 4, r=2)
    with torch.no_grad():
        shared.lora_B.normal_()
    model = nn.Sequential(shared, nn.GELU(), shared)
    state = lora.merged_state_dict(model)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    plain = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    plain.load_state_dict(state)
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), model(x))
