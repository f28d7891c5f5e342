"""The Phi-3 patcher on our model and on transformers' model."""

from __future__ import annotations

import pytest
import torch
from phi3_tiny import TINY, randomise_adapters

import lora
from lora.phi3 import from_pretrained, patch
from lora.phi3.checkpoint import plan_checkpoint
from lora.phi3.fsdp import _draw_adapters
from lora.phi3.patch import resolve_targets


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("targets", [("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("q", "v"),
                                     ("q_proj", "v_proj", "gate_proj", "down_proj")])
def test_ours_and_transformers_patched_alike_give_the_same_logits(hf_checkpoint, kv_heads, targets):
    hf, path = hf_checkpoint(num_key_value_heads=kv_heads)
    ours = from_pretrained(path)
    ours_summary = patch(ours, r=4, lora_alpha=8, lora_dropout=0.0, targets=targets)
    hf_summary = patch(hf, r=4, lora_alpha=8, lora_dropout=0.0, targets=targets)
    randomise_adapters(ours)
    randomise_adapters(hf)
    ids = torch.randint(3, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert ours_summary.trainable == hf_summary.trainable == trainable
    assert trainable == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert ours_summary.total == sum(p.numel() for p in ours.parameters())


def test_slices_follow_the_config_under_gqa(hf_checkpoint):
    _, path = hf_checkpoint(num_key_value_heads=2)
    model = from_pretrained(path)
    summary = patch(model, r=4, targets=("q", "v", "up"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora.MergedLinear)
    assert qkv.split_sizes == (32, 16, 16) and qkv.enable_lora == (True, False, True)
    assert tuple(qkv.lora_A.shape) == (8, 32) and tuple(qkv.lora_B.shape) == (48, 4)
    gate_up = model.model.layers[0].mlp.gate_up_proj
    assert gate_up.split_sizes == (48, 48) and gate_up.enable_lora == (False, True)
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert [row.slices for row in summary.rows[:2]] == ["q,v", "up"]
    text = str(summary)
    assert "model.layers.N.self_attn.qkv_proj" in text and "0-1" in text
    assert f"trainable {summary.trainable:,} of {summary.total:,} parameters" in text


def test_base_weights_are_shared_frozen_and_adapters_float32(hf_checkpoint):
    _, path = hf_checkpoint()
    model = from_pretrained(path, dtype=torch.bfloat16)
    before = {n: (p.data_ptr(), p) for n, p in model.named_parameters()}
    patch(model, r=4, layers=[1])
    for name, param in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert param.requires_grad and param.dtype == torch.float32
            assert ".layers.1." in name
        else:
            assert not param.requires_grad
            assert before[name][1] is param and before[name][0] == param.data_ptr()
    assert model.model.layers[1].mlp.down_proj.merge_weights is False
    out = model(torch.randint(3, 100, (1, 5)))
    assert out.dtype == torch.bfloat16


def test_layers_and_defaults(hf_checkpoint):
    _, path = hf_checkpoint()
    model = from_pretrained(path)
    patch(model)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, lora.Linear) and not isinstance(layer.self_attn.qkv_proj,
                                                                                 lora.MergedLinear)
    assert layer.self_attn.qkv_proj.r == 16 and layer.self_attn.qkv_proj.scaling == 2.0
    assert layer.mlp.down_proj.lora_dropout.p == 0.05


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(targets=("qkv", "o_proj")), ValueError,
         "unknown target 'qkv'; valid targets are qkv_proj, o_proj, gate_up_proj, down_proj, q, k, v, gate, up, "
         "q_proj, k_proj, v_proj, gate_proj, up_proj"),
        (dict(targets=("qkv_proj", "q_proj")), ValueError,
         "target 'q_proj' and its module 'qkv_proj' both named; pick one or the other"),
        (dict(targets=("v", "qkv_proj")), ValueError,
         "target 'qkv_proj' and its slices ('v',) both named; pick one or the other"),
        (dict(targets=()), ValueError, "targets is empty; name at least one of qkv_proj, o_proj, gate_up_proj, "
         "down_proj, q, k, v, gate, up, q_proj, k_proj, v_proj, gate_proj, up_proj"),
        (dict(r=0), ValueError, "r must be at least 1 to patch a model; got 0"),
        (dict(r=-2), ValueError, "r must be a non-negative int (0 means no LoRA); got -2"),
        (dict(lora_alpha=0), ValueError, "lora_alpha must be a positive, finite number; got 0"),
        (dict(lora_dropout=1.5), ValueError, "lora_dropout must be in [0, 1); got 1.5"),
        (dict(layers=[0, 2]), ValueError, "layers must hold layer indices in [0, 2); got 2"),
        (dict(layers=[]), ValueError, "nothing to patch: no module matches the targets and layers given"),
    ],
)
def test_bad_arguments_change_nothing(hf_checkpoint, kwargs, error, message):
    _, path = hf_checkpoint()
    model = from_pretrained(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error) as info:
        patch(model, **kwargs)
    assert str(info.value) == message
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_patching_twice_is_an_error(hf_checkpoint):
    _, path = hf_checkpoint()
    model = from_pretrained(path)
    patch(model, r=2)
    with pytest.raises(ValueError) as info:
        patch(model, r=2)
    assert str(info.value) == "the model is already patched (it has LoRA layers); load a fresh model to patch again"


def test_the_targets_order_does_not_change_the_initial_adapters(hf_checkpoint):
    # A is drawn module by module in the model's order (as lora.phi3.fsdp draws it for a sharded model)
    _, path = hf_checkpoint()

    def initial(targets):
        model = from_pretrained(path)
        torch.manual_seed(0)
        patch(model, r=2, targets=targets)
        return lora.lora_state_dict(model)

    def sharded_initial(targets):  # what lora.phi3.fsdp draws for a model built on the meta device
        model = plan_checkpoint(path).model
        patch(model, r=2, targets=targets)
        torch.manual_seed(0)
        _draw_adapters(model)
        return lora.lora_state_dict(model)

    for one, other in ((("qkv_proj", "o_proj", "down_proj"), ("down_proj", "o_proj", "qkv_proj")),
                       (("q", "v", "o_proj"), ("o_proj", "v", "q"))):
        a, b, c = initial(one), initial(other), sharded_initial(other)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (one, other)
        assert all(torch.equal(a[k], c[k]) for k in a if k.endswith("lora_A")), other  # B: zero in both


def test_resolve_targets_merges_aliases():
    assert resolve_targets(("q_proj", "v", "o_proj")) == {"qkv_proj": ("q", "v"), "o_proj": None}
    assert resolve_targets("down_proj") == {"down_proj": None}


def test_patching_allocates_only_the_adapters(hf_checkpoint):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.returns and all(r.alias_info is None for r in func._schema.returns):
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        self.bytes += t.numel() * t.element_size()
            return out

    _, path = hf_checkpoint()
    model = from_pretrained(path, dtype=torch.bfloat16)
    with Allocations() as mode:
        summary = patch(model, r=4)
    adapter_bytes = summary.trainable * 4  # float32
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert mode.bytes <= 2 * adapter_bytes < base_bytes


def test_a_state_dict_of_another_rank_changes_nothing_in_a_patched_model(hf_checkpoint):
    _, path = hf_checkpoint()
    model = from_pretrained(path)
    patch(model, r=4, targets=("qkv_proj", "o_proj"))
    other = from_pretrained(path)
    patch(other, r=4, targets=("qkv_proj", "o_proj"))
    last = len(other.model.layers) - 1
    # the same model, but the last layer's o_proj adapter has rank 2: everything before it matches
    other.model.layers[last].self_attn.o_proj = lora.Linear.from_module(
        torch.nn.Linear(TINY["hidden_size"], TINY["hidden_size"], bias=False), r=2)
    randomise_adapters(other)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^shape mismatch for model\.layers\.{last}\.self_attn\.o_proj\.lora_A: "
                                         r"this layer expects \(4, \d+\) \(r=4\), the state dict has \(2, \d+\)$"):
        model.load_state_dict(other.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
