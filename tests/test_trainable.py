"""mark_only_lora_as_trainable and lora_state_dict agree, and select by module type."""

import pytest
import torch
from torch import nn

import lora


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = lora.Embedding(10, 8, r=2)
        self.proj = lora.Linear(8, 8, r=2)
        self.plain_lora = lora.Linear(8, 8)  # r = 0: a plain layer
        self.conv = lora.Conv1d(8, 8, 1, r=2)
        self.head = nn.Linear(8, 4)
        # Named like an adapter but not one: loralib would train and save it.
        self.explorer_lora_gate = nn.Parameter(torch.zeros(3))


EXPECTED = {
    "none": ["embed.lora_A", "embed.lora_B", "proj.lora_A", "proj.lora_B", "conv.lora_A", "conv.lora_B"],
    "lora_only": ["embed.lora_A", "embed.lora_B", "proj.lora_A", "proj.lora_B", "proj.bias",
                  "conv.lora_A", "conv.lora_B", "conv.bias"],
    "all": ["embed.lora_A", "embed.lora_B", "proj.lora_A", "proj.lora_B", "proj.bias", "plain_lora.bias",
            "conv.lora_A", "conv.lora_B", "conv.bias", "head.bias"],
}


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_trainable_and_saved_agree(bias):
    model = Model()
    lora.mark_only_lora_as_trainable(model, bias=bias)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    saved = lora.lora_state_dict(model, bias=bias)
    assert trainable == sorted(EXPECTED[bias])
    assert sorted(saved) == sorted(EXPECTED[bias])
    for name, value in saved.items():
        assert torch.equal(value, model.state_dict()[name])
        assert not value.requires_grad


def test_frozen_lora_parameters_become_trainable_again():
    model = Model()
    for p in model.parameters():
        p.requires_grad = False
    lora.mark_only_lora_as_trainable(model)
    assert model.proj.lora_A.requires_grad and not model.proj.weight.requires_grad


def test_lora_state_dict_round_trip():
    model = Model()
    with torch.no_grad():
        for p in lora.lora_state_dict(model).values():
            p.normal_()
    state = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    fresh = Model()
    fresh.load_state_dict(model.state_dict(), strict=True)
    result = fresh.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value)


@pytest.mark.parametrize("function", [lora.mark_only_lora_as_trainable, lora.lora_state_dict])
def test_unknown_bias_mode(function):
    with pytest.raises(ValueError) as info:
        function(Model(), bias="some")
    assert str(info.value) == "bias must be one of ('none', 'all', 'lora_only'); got 'some'"
