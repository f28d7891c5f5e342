"""Behaviour of the LoRA layers: merging, exact restore, mixed precision, wrapping, errors."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def randomise(module, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, lora.LoRALayer) and layer.has_lora:
                for p in (layer.lora_A, layer.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def build(kind, dtype=torch.float32, r=3, **kw):
    """A layer of each type with its input."""
    torch.manual_seed(0)
    if kind == "Linear":
        layer, x = lora.Linear(12, 10, r=r, lora_alpha=6, **kw), torch.randn(2, 5, 12)
    elif kind == "MergedLinear":
        layer = lora.MergedLinear(12, 16, r=r, enable_lora=(True, False, True), split_sizes=(8, 4, 4), **kw)
        x = torch.randn(2, 5, 12)
    elif kind == "Embedding":
        layer, x = lora.Embedding(30, 8, r=r, lora_alpha=6, **kw), torch.randint(0, 30, (2, 5))
    elif kind == "Conv1d":
        layer, x = lora.Conv1d(4, 6, 3, r=r, padding=1, **kw), torch.randn(2, 4, 9)
    elif kind == "Conv2d":
        layer, x = lora.Conv2d(4, 6, 3, r=r, padding=1, **kw), torch.randn(2, 4, 7, 7)
    elif kind == "Conv3d":
        layer, x = lora.Conv3d(4, 6, (1, 3, 2), r=r, **kw), torch.randn(2, 4, 3, 5, 5)
    layer = layer.to(dtype)
    randomise(layer)
    if x.is_floating_point():
        x = x.to(dtype)
    return layer, x


KINDS = ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d"]


@pytest.mark.parametrize("kind", KINDS)
def test_merged_forward_equals_unmerged(kind):
    layer, x = build(kind, dtype=torch.float64)
    layer.eval()  # merges
    assert layer.merged and layer.merged_weight is not None
    merged = layer(x)
    layer.unmerge()
    torch.testing.assert_close(merged, layer(x), rtol=1e-10, atol=1e-10)


@given(
    in_features=st.integers(1, 24),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    data=st.data(),
    r=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fan_in_fan_out=st.booleans(),
)
def test_merged_linear_merge_equals_unmerged_property(in_features, sizes, data, r, dtype, fan_in_fan_out):
    enable = tuple(data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes))))
    if not any(enable):
        enable = (True,) + enable[1:]
    layer = lora.MergedLinear(
        in_features, sum(sizes), r=r, lora_alpha=2 * r, enable_lora=enable, split_sizes=sizes,
        fan_in_fan_out=fan_in_fan_out,
    ).to(dtype)
    randomise(layer, scale=0.1)
    x = torch.randn(3, in_features).to(dtype)
    unmerged = layer(x)
    with lora.merged(layer):
        merged = layer(x)
    # Reference in float64 from the one delta definition.
    weight = layer.weight.double() + layer.delta_weight().double()
    expected = x.double() @ (weight if fan_in_fan_out else weight.t()) + layer.bias.double()
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(unmerged.double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(merged.double(), expected, rtol=0, atol=tol)
    assert unmerged.dtype == dtype


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_bit_identical_after_many_cycles_with_changing_adapters(kind, dtype):
    layer, x = build(kind, dtype=dtype)
    original = layer.weight.detach().clone()
    for cycle in range(50):
        layer.eval()
        layer.train()
        with torch.no_grad():
            layer.lora_B.add_(0.01 * (cycle % 3 - 1))
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(layer.weight.detach().view(bits), original.view(bits))
    assert layer.weight.dtype == dtype


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_taken_while_merged_reloads_to_same_outputs(kind):
    layer, x = build(kind)
    layer.eval()
    expected = layer(x)
    state = layer.state_dict()
    assert "merged_weight" not in state
    fresh, _ = build(kind)
    fresh.load_state_dict(state)
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected)
    fresh.train()
    torch.testing.assert_close(fresh(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_loading_adapters_in_eval_mode_takes_effect(kind):
    layer, x = build(kind)
    layer.eval()
    before = layer(x)
    other, _ = build(kind)
    randomise(other, seed=5)
    layer.load_state_dict(lora.lora_state_dict(other), strict=False)
    other.eval()
    torch.testing.assert_close(layer(x), other(x))
    assert not torch.allclose(layer(x), before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_float32_adapters(kind, dtype):
    layer, x = build(kind, dtype=dtype)
    assert layer.weight.dtype == dtype
    # .to(dtype) casts everything; make the adapters float32 again, as the constructor makes them.
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = layer.lora_B.data.float()
    if x.is_floating_point():
        x = x.requires_grad_()
    layer.train()
    y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert layer.weight.grad is None
    # Compare with a float64 computation of the same maths.
    ref_layer = copy.deepcopy(layer).double()
    ref_x = x.detach().double() if x.is_floating_point() else x
    ref = ref_layer(ref_x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=TOL[dtype] * max(scale, 1))


def test_constructor_makes_float32_adapters_over_a_half_base():
    layer = lora.Linear(8, 4, r=2, dtype=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    layer = lora.Linear(8, 4, r=2, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "make, cls, args",
    [
        (lambda: nn.Linear(8, 6), lora.Linear, {}),
        (lambda: nn.Linear(8, 12, bias=False), lora.MergedLinear, {"split_sizes": (6, 3, 3)}),
        (lambda: nn.Embedding(10, 4, padding_idx=0), lora.Embedding, {}),
        (lambda: nn.Conv1d(3, 4, 3, stride=2), lora.Conv1d, {}),
        (lambda: nn.Conv2d(4, 4, (3, 1), groups=2), lora.Conv2d, {}),
        (lambda: nn.Conv3d(3, 4, 1), lora.Conv3d, {}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_module_shares_the_weight_without_copying(make, cls, args, dtype):
    torch.manual_seed(0)
    base = make().to(dtype)
    weight, bias = base.weight, getattr(base, "bias", None)
    before = weight.detach().clone()
    layer = cls.from_module(base, r=2, lora_alpha=4, **args)
    assert layer.weight is weight and layer.weight.data_ptr() == weight.data_ptr()
    assert getattr(layer, "bias", None) is bias
    assert torch.equal(layer.weight, before)  # not re-initialised
    assert not layer.weight.requires_grad
    assert layer.lora_A.dtype == torch.float32
    assert "lora_A" not in base._parameters  # the original module is untouched
    x = torch.randint(0, 10, (2, 3)) if cls is lora.Embedding else torch.randn(
        {lora.Linear: (2, 8), lora.MergedLinear: (2, 8), lora.Conv1d: (1, 3, 9), lora.Conv2d: (1, 4, 5, 5),
         lora.Conv3d: (1, 3, 2, 2, 2)}[cls]).to(dtype)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: the base's output
    with torch.device("meta"):
        meta_base = make()
    meta_layer = cls.from_module(meta_base, r=2, **args)
    assert meta_layer.weight is meta_base.weight and meta_layer.lora_A.is_meta


def test_from_module_rejects_wrong_types_before_changing_anything():
    base = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="Linear.from_module expects an nn.Linear; got Conv1d"):
        lora.Linear.from_module(nn.Conv1d(4, 4, 1), r=2)
    with pytest.raises(TypeError, match="Conv2d.from_module expects an nn.Conv2d; got Conv1d"):
        lora.Conv2d.from_module(nn.Conv1d(4, 4, 1), r=2)
    with pytest.raises(ValueError, match="r must be a non-negative int"):
        lora.Linear.from_module(base, r=-1)
    assert base.weight.requires_grad


def test_merged_linear_never_builds_the_full_delta():
    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(ret.alias_info is not None for ret in func._schema.returns):
                return out  # a view of an existing tensor allocates nothing
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.add(tuple(t.shape))
            return out

    layer = lora.MergedLinear(48, 96, r=4, enable_lora=(True, False, True), split_sizes=(64, 16, 16))
    randomise(layer)
    x = torch.randn(5, 48, requires_grad=True)
    with Shapes() as mode:
        layer(x).sum().backward()
    assert (96, 48) not in mode.shapes and (48, 96) not in mode.shapes


def test_merged_linear_lora_b_layout():
    equal = lora.MergedLinear(8, 12, r=2, enable_lora=(True, False, True))
    assert equal.lora_A.shape == (4, 8) and equal.lora_B.shape == (8, 2)
    gqa = lora.MergedLinear(8, 16, r=2, enable_lora=(True, True, False), split_sizes=(8, 4, 4))
    assert gqa.lora_B.shape == (12, 2)


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear", "Conv2d"])
def test_dropout_is_applied_in_train_mode_only(kind):
    layer, x = build(kind, lora_dropout=0.5)
    layer.merge_weights = False
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), a)  # seeded: repeatable
    layer.eval()
    c1, c2 = layer(x), layer(x)
    torch.testing.assert_close(c1, c2)
    # Dropout's expectation is the undropped output.
    layer.train()
    mean = torch.stack([layer(x) for _ in range(400)]).mean(0)
    torch.testing.assert_close(mean, c1, rtol=0, atol=0.1 * c1.abs().max().item())


def test_linear_dropout_matches_reference_with_the_same_mask():
    from lora.lowrank import dropout_positions

    layer, x = build("Linear", lora_dropout=0.2)
    x = x.reshape(-1, 12).requires_grad_()
    torch.manual_seed(3)
    seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
    torch.manual_seed(3)
    y = layer(x)
    y.square().sum().backward()
    grads = [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask.view(-1)[dropout_positions(seed, x.numel(), 0.2, x.device)] = True
    keep = 0.8
    ref = layer.bias + x @ layer.weight.t() + (x.masked_fill(mask, 0) / keep) @ layer.lora_A.t() @ layer.lora_B.t() * 2
    torch.testing.assert_close(y, ref)
    ref.square().sum().backward()
    for ours, theirs in zip(grads, [x.grad, layer.lora_A.grad, layer.lora_B.grad], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_custom_dropout_module_is_called():
    layer, x = build("Linear")
    layer.lora_dropout = nn.Dropout1d(0.5)
    layer.train()
    layer.merge_weights = False
    calls = []
    layer.lora_dropout.register_forward_hook(lambda *a: calls.append(1))
    layer(x)
    assert calls


@pytest.mark.parametrize("kind", KINDS)
def test_only_lora_parameters_get_gradients(kind):
    layer, x = build(kind, lora_dropout=0.1) if kind != "Embedding" else build(kind)
    model = nn.Sequential(layer)
    lora.mark_only_lora_as_trainable(model)
    out = model(x)
    out.float().pow(2).mean().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.weight.grad is None
    assert getattr(layer, "bias", None) is None or layer.bias.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_and_deepcopy(kind):
    layer, x = build(kind, lora_dropout=0.1) if kind != "Embedding" else build(kind)
    layer.eval()
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # pickles the module
    unpickled = pickle.loads(pickle.dumps(layer))
    for other in (clone, unpickled):
        assert type(other) is type(layer)
        torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear", "Embedding", "Conv2d"])
def test_torch_compile(kind):
    layer, x = build(kind, lora_dropout=0.1) if kind != "Embedding" else build(kind)
    layer.merge_weights = False
    layer.eval()
    expected = layer(x)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)
    layer.train()
    compiled(x).float().sum().backward()
    assert layer.lora_A.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_non_reentrant(kind):
    from torch.utils.checkpoint import checkpoint

    layer, x = build(kind, lora_dropout=0.2) if kind != "Embedding" else build(kind)
    layer.merge_weights = False
    layer.train()
    torch.manual_seed(7)
    layer(x).float().square().sum().backward()
    expected = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    checkpoint(layer, x, use_reentrant=False).float().square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, expected[0])
    torch.testing.assert_close(layer.lora_B.grad, expected[1])


def test_r_zero_is_a_plain_layer():
    layer = lora.Linear(6, 4)
    plain = nn.Linear(6, 4)
    assert set(layer.state_dict()) == {"weight", "bias"}
    layer.load_state_dict(plain.state_dict())
    assert layer.weight.requires_grad
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), plain(x))
    layer.eval()
    torch.testing.assert_close(layer(x), plain(x))


def test_use_rslora_scaling():
    assert lora.Linear(4, 4, r=16, lora_alpha=32).scaling == 2.0
    assert lora.Linear(4, 4, r=16, lora_alpha=32, use_rslora=True).scaling == 8.0


def test_train_and_eval_return_the_module():
    layer = lora.Linear(4, 4, r=2)
    assert layer.eval() is layer and layer.train() is layer


# -- conv -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, conv, kw",
    [
        (lora.Conv1d, nn.functional.conv1d, dict(kernel_size=5, stride=2, padding=2, dilation=1, groups=1)),
        (lora.Conv1d, nn.functional.conv1d, dict(kernel_size=3, stride=1, padding=2, dilation=2, groups=2)),
        (lora.Conv2d, nn.functional.conv2d, dict(kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=1, groups=1)),
        (lora.Conv2d, nn.functional.conv2d, dict(kernel_size=3, stride=1, padding=1, dilation=2, groups=2)),
        (lora.Conv3d, nn.functional.conv3d, dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=1)),
        (lora.Conv3d, nn.functional.conv3d, dict(kernel_size=(1, 2, 3), stride=2, padding=0, dilation=1, groups=2)),
    ],
)
def test_conv_any_kernel_equals_conv_with_merged_weight(cls, conv, kw):
    torch.manual_seed(0)
    layer = cls(4, 6, r=2, lora_alpha=4, **kw)
    randomise(layer)
    dims = {lora.Conv1d: (9,), lora.Conv2d: (9, 8), lora.Conv3d: (6, 7, 6)}[cls]
    x = torch.randn(2, 4, *dims)
    args = {k: v for k, v in kw.items() if k != "kernel_size"}
    expected = conv(x, layer.weight + layer.delta_weight(), layer.bias, **args)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    if not layer.loralib_layout:
        # True rank r as an (out, in/groups * K) matrix.
        assert layer.lora_A.shape[0] == 2
        assert torch.linalg.matrix_rank(layer.delta_weight().flatten(1)) <= 2


def test_conv_keeps_the_conv_attribute_and_plain_keys():
    layer = lora.Conv2d(3, 4, 3, r=2)
    assert layer.conv is layer and isinstance(layer, nn.Conv2d)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    plain = nn.Conv2d(3, 4, 3)
    layer.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(layer.weight, plain.weight)


def test_convlora_spelling_builds_the_matching_class():
    layer = lora.ConvLoRA(nn.Conv3d, 2, 3, 1, r=2)
    assert type(layer) is lora.Conv3d and layer.lora_A.shape == (2, 2)
    with pytest.raises(TypeError, match="ConvLoRA expects nn.Conv1d, nn.Conv2d or nn.Conv3d first"):
        lora.ConvLoRA(nn.Linear, 2, 3, 1)


# -- embedding --------------------------------------------------------------------------------------


def test_embedding_padding_row_has_no_delta():
    layer = lora.Embedding(10, 4, r=2, padding_idx=3)
    randomise(layer)
    x = torch.tensor([[3, 1, 3]])
    torch.testing.assert_close(layer(x)[0, 0], layer.weight[3])
    assert torch.equal(layer.delta_weight()[3], torch.zeros(4))
    with lora.merged(layer):
        torch.testing.assert_close(layer(x)[0, 0], layer.weight[3])


def test_embedding_max_norm_rewrites_neither_weight_nor_lora_a():
    layer = lora.Embedding(10, 4, r=2, max_norm=0.5)
    randomise(layer)
    weight, a = layer.weight.detach().clone(), layer.lora_A.detach().clone()
    out = layer(torch.tensor([1, 2, 3]))
    assert torch.equal(layer.weight, weight) and torch.equal(layer.lora_A, a)
    # nn.Embedding's renormalisation of the adapted table W + delta, done on a copy
    adapted = weight + layer.delta_weight().detach()
    torch.testing.assert_close(out, torch.nn.functional.embedding(torch.tensor([1, 2, 3]), adapted, max_norm=0.5))
    assert out.norm(dim=-1).max() <= 0.5 + 1e-6


def test_embedding_max_norm_merged_equals_unmerged():
    layer = lora.Embedding(10, 4, r=2, max_norm=0.5, padding_idx=0)
    randomise(layer)
    x = torch.tensor([[0, 1, 2], [3, 9, 0]])
    unmerged = layer(x)
    with lora.merged(layer):
        torch.testing.assert_close(layer(x), unmerged)


def test_embedding_sparse_is_refused_with_r():
    with pytest.raises(ValueError, match="sparse=True is not supported with r > 0"):
        lora.Embedding(10, 4, r=2, sparse=True)
    plain = lora.Embedding(10, 4, sparse=True)
    plain(torch.tensor([1])).sum().backward()
    assert plain.weight.grad.is_sparse


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(r=-1), ValueError, "r must be a non-negative int (0 means no LoRA); got -1"),
        (dict(r=2.0), TypeError, "r must be a non-negative int (0 means no LoRA); got 2.0 of type float"),
        (dict(r=True), TypeError, "r must be a non-negative int (0 means no LoRA); got True of type bool"),
        (dict(r=2, lora_alpha=0), ValueError, "lora_alpha must be a positive, finite number; got 0"),
        (dict(r=2, lora_alpha=-3.0), ValueError, "lora_alpha must be a positive, finite number; got -3.0"),
        (dict(r=2, lora_alpha="8"), TypeError, "lora_alpha must be a positive number; got '8' of type str"),
        (dict(r=2, lora_dropout=1.0), ValueError, "lora_dropout must be in [0, 1); got 1.0"),
        (dict(r=2, lora_dropout=-0.1), ValueError, "lora_dropout must be in [0, 1); got -0.1"),
    ],
)
@pytest.mark.parametrize("cls", [lora.Linear, lora.MergedLinear, lora.Conv2d])
def test_bad_hyperparameters(cls, kwargs, error, message):
    args = (4, 6, 1) if cls is lora.Conv2d else (4, 6)
    if cls is lora.MergedLinear:
        kwargs = dict(kwargs, enable_lora=(True, False))
    with pytest.raises(error) as info:
        cls(*args, **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(enable_lora=(False, False)), ValueError,
         "enable_lora=(False, False) enables no slice, so r=2 would add no adapter; "
         "enable at least one slice or use r=0"),
        (dict(enable_lora=(True, False, True, False, True)), ValueError,
         "len(enable_lora)=5 must divide out_features=12; pass split_sizes for unequal slices"),
        (dict(enable_lora=(True, False), split_sizes=(8, 3)), ValueError,
         "split_sizes (8, 3) sum to 11, not out_features=12"),
        (dict(enable_lora=(True, False), split_sizes=(12,)), ValueError,
         "split_sizes has 1 entries but enable_lora has 2; they must match"),
        (dict(enable_lora=(1, 0)), TypeError, "enable_lora must be a non-empty sequence of bools; got (1, 0)"),
    ],
)
def test_bad_merged_linear_slices(kwargs, error, message):
    with pytest.raises(error) as info:
        lora.MergedLinear(4, 12, r=2, **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_with_wrong_lora_shape_is_refused_before_loading(kind):
    layer, _ = build(kind)
    other, _ = build(kind, r=5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError) as info:
        layer.load_state_dict(other.state_dict())
    expected_a, given_a = tuple(layer.lora_A.shape), tuple(other.lora_A.shape)
    assert str(info.value) == (
        f"shape mismatch for lora_A: this layer expects {expected_a} (r=3), the state dict has {given_a}"
    )
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@given(
    in_features=st.integers(1, 16),
    out_features=st.integers(1, 16),
    r=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    cycles=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_exact_restore_and_save_load_round_trip_property(in_features, out_features, r, dtype, cycles, seed):
    torch.manual_seed(seed)
    layer = lora.Linear(in_features, out_features, r=r, lora_alpha=2 * r, dtype=dtype)
    original = layer.weight.detach().clone()
    for _ in range(cycles):
        with torch.no_grad():
            layer.lora_B.add_(torch.randn_like(layer.lora_B))
        layer.eval()
        layer.train()
    assert torch.equal(layer.weight, original)
    layer.eval()
    x = torch.randn(2, in_features).to(dtype)
    expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = lora.Linear(in_features, out_features, r=r, lora_alpha=2 * r, dtype=dtype)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


@given(
    kind=st.sampled_from(["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d"]),
    r=st.integers(1, 4),
    bias=st.sampled_from(["none", "all", "lora_only"]),
)
def test_gradients_reach_exactly_the_trainable_parameters_property(kind, r, bias):
    layer, x = build(kind, r=r)
    lora.mark_only_lora_as_trainable(layer, bias=bias)
    layer(x).float().square().sum().backward()
    trainable = set(lora.lora_parameter_names(layer, bias))
    for name, param in layer.named_parameters():
        assert (param.grad is not None) == (name in trainable), name


def test_model_level_load_with_a_late_wrong_shape_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), lora.Linear(4, 4, r=2), lora.Linear(4, 4, r=2))
    other = nn.Sequential(nn.Linear(4, 4), lora.Linear(4, 4, r=2), lora.Linear(4, 4, r=3))
    randomise(other)
    lora.mark_only_lora_as_trainable(model)
    lora.mark_only_lora_as_trainable(model)  # idempotent: one hook
    assert len(model._load_state_dict_pre_hooks) == 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for target in (model, copy.deepcopy(model)):
        with pytest.raises(ValueError) as info:
            target.load_state_dict(other.state_dict())
        assert str(info.value) == (
            "shape mismatch for 2.lora_A: this layer expects (2, 4) (r=2), the state dict has (3, 4)"
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # lora.check_lora_shapes is the same check, callable on its own
    with pytest.raises(ValueError, match=r"shape mismatch for 2\.lora_A"):
        lora.check_lora_shapes(nn.Sequential(nn.Linear(4, 4), lora.Linear(4, 4, r=2), lora.Linear(4, 4, r=2)),
                               other.state_dict())


@pytest.mark.parametrize("merged", [False, True])
def test_from_module_refuses_a_fan_in_fan_out_that_contradicts_the_weight(merged):
    base = nn.Linear(6, 6)
    with pytest.raises(ValueError) as info:
        if merged:
            lora.MergedLinear.from_module(base, (2, 2, 2), r=2, fan_in_fan_out=True)
        else:
            lora.Linear.from_module(base, r=2, fan_in_fan_out=True)
    assert str(info.value) == (
        "fan_in_fan_out=True does not match the module: its weight is stored as (out_features, in_features) "
        "(6, 6); pass fan_in_fan_out=False"
    )
    assert base.weight.requires_grad  # nothing was frozen
    # a layer that stores (in, out) says so, and wraps with fan_in_fan_out=True
    transposed = lora.Linear(6, 4, fan_in_fan_out=True)
    layer = lora.Linear.from_module(transposed, r=2, fan_in_fan_out=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), transposed(x))


@pytest.mark.parametrize("r", ["2", None, 2.0])
def test_merged_linear_reports_a_bad_r_before_checking_slices(r):
    with pytest.raises(TypeError, match=r"^r must be a non-negative int \(0 means no LoRA\); got "):
        lora.MergedLinear(4, 6, r=r, enable_lora=(True, False))
    with pytest.raises(TypeError, match=r"^r must be a non-negative int"):
        lora.MergedLinear.from_module(nn.Linear(4, 6), (3, 3), r=r)


def test_a_lora_layer_subclass_without_delta_weight_says_what_is_missing():
    class Custom(lora.LoRALayer, nn.Module):
        def __init__(self):
            nn.Module.__init__(self)
            lora.LoRALayer.__init__(self, 2, 1, 0.0, False)
            self.weight = nn.Parameter(torch.zeros(2, 2))
            self.lora_A = nn.Parameter(torch.zeros(2, 2))
            self.lora_B = nn.Parameter(torch.zeros(2, 2))

    with pytest.raises(NotImplementedError, match=r"^Custom does not define delta_weight\(\): a LoRALayer subclass"):
        lora.merge_lora(nn.Sequential(Custom()))


@st.composite
def any_layer(draw):
    """A layer of any kind with drawn shapes (kernels, strides, groups, padding_idx...) and its input."""
    kind = draw(st.sampled_from(["Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d"]))
    r = draw(st.integers(1, 4))
    common = dict(r=r, lora_alpha=draw(st.sampled_from([1, 2 * r])), use_rslora=draw(st.booleans()))
    if kind == "Linear":
        n_in, n_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        layer = lora.Linear(n_in, n_out, fan_in_fan_out=draw(st.booleans()), bias=draw(st.booleans()),
                            use_dora=draw(st.booleans()), **common)
        return layer, torch.randn(3, n_in)
    if kind == "Embedding":
        num, dim = draw(st.integers(2, 20)), draw(st.integers(1, 8))
        padding_idx = draw(st.one_of(st.none(), st.integers(0, num - 1)))
        max_norm = draw(st.one_of(st.none(), st.sampled_from([0.5, 2.0])))
        layer = lora.Embedding(num, dim, padding_idx=padding_idx, max_norm=max_norm, **common)
        return layer, torch.randint(0, num, (2, 5))
    dims = int(kind[-2])
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.one_of(st.integers(1, 3), st.tuples(*[st.integers(1, 3)] * dims)))
    stride, dilation, padding = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
    layer = {1: lora.Conv1d, 2: lora.Conv2d, 3: lora.Conv3d}[dims](
        c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, **common)
    return layer, torch.randn((2, c_in) + (7,) * dims)


def _reference(layer, x):
    """The layer's output in float64 from the one delta definition: W + delta in the torch op."""
    weight = layer.weight.double() + layer.delta_weight().double()
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias.double()
    if isinstance(layer, nn.Embedding):
        return nn.functional.embedding(x, weight, layer.padding_idx, max_norm=layer.max_norm)
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x.double(), weight.t() if layer.fan_in_fan_out else weight, bias)
    return layer._conv_forward(x.double(), weight, bias)


@given(made=any_layer(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
def test_every_layer_merged_equals_unmerged_and_round_trips_property(made, dtype, seed):
    layer, x = made
    layer = layer.to(dtype)
    randomise(layer, seed=seed, scale=0.2)
    x = x.to(dtype) if x.is_floating_point() else x
    unmerged = layer(x)
    with lora.merged(layer):
        merged = layer(x)
    expected = _reference(layer, x)
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(unmerged.double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(merged.double(), expected, rtol=0, atol=tol)
    assert unmerged.dtype == merged.dtype == dtype
    # a fresh layer of the same configuration loads the state dict and computes the same bits
    fresh = copy.deepcopy(layer)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), unmerged)
    fresh.eval()
    layer.eval()
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("fused", [False, True])
def test_an_input_that_does_not_fit_the_layer_is_named_in_the_layers_terms(fused):
    layer = lora.MergedLinear(8, 6, r=2, enable_lora=(True, False)) if fused else lora.Linear(8, 6, r=2)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"^{name}: the input's last dimension must be in_features=8; "
                                         r"got an input of shape \(3, 7\)$"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match=rf"^{name}: the input is torch.bfloat16 but the weight is torch.float32; "
                                        r"cast the input \(x.to\(torch.float32\)\) or run under torch.autocast$"):
        layer(torch.randn(3, 8, dtype=torch.bfloat16))
    layer.eval()  # the merged path checks the same
    with pytest.raises(TypeError, match=rf"^{name}: the input is torch.float64"):
        layer(torch.randn(3, 8, dtype=torch.float64))


def test_a_meta_device_layer_says_its_weight_has_no_values():
    with torch.device("meta"):
        layer = lora.Linear(8, 6, r=2)
    with pytest.raises(RuntimeError, match=r"^Linear: the weight is on the meta device \(shape \(6, 8\), no values\): "
                                           r"materialise it before forward"):
        layer(torch.randn(3, 8))
    assert layer(torch.randn(3, 8, device="meta")).shape == (3, 6)  # shape inference on meta still works


# --- issue 13: no half-loads, no wrapped adapters, clear errors for bad constructor arguments ---


def _changed(module, before):
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


def _half_load_cases(sd):
    """(name, edited state dict, strict values that must refuse it)."""
    missing = {k: v for k, v in sd.items() if k != "2.weight"}  # a late base weight, not a LoRA one
    unexpected = {**sd, "2.extra": torch.zeros(1)}
    wrong_base = {**sd, "2.weight": torch.zeros(5, 4)}
    return [("missing", missing, (True,)), ("unexpected", unexpected, (True,)), ("shape", wrong_base, (True, False))]


@pytest.mark.parametrize("strict", [True, False])
def test_model_level_load_checks_every_key_first(strict):
    model = nn.Sequential(nn.Linear(4, 4), lora.Linear(4, 4, r=2), lora.Linear(4, 4, r=2))
    lora.mark_only_lora_as_trainable(model)
    other = copy.deepcopy(model)
    randomise(other, seed=7)
    for name, state, refusing in _half_load_cases(other.state_dict()):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if strict in refusing:
            with pytest.raises((RuntimeError, ValueError), match="nothing was loaded"):
                model.load_state_dict(state, strict=strict)
            assert _changed(model, before) == [], name
        else:
            model.load_state_dict(state, strict=strict)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strict", [True, False])
def test_layer_level_load_checks_every_key_first(kind, strict):
    layer, _ = build(kind)
    other, _ = build(kind)
    randomise(other, seed=9)
    sd = other.state_dict()
    weight = sd["weight"]
    cases = [("missing", {k: v for k, v in sd.items() if k != "weight"}, (True,)),
             ("unexpected", {**sd, "extra": torch.zeros(1)}, (True,)),
             ("shape", {**sd, "weight": torch.zeros(weight.shape[0] + 1, *weight.shape[1:])}, (True, False))]
    for name, state, refusing in cases:
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        if strict in refusing:
            with pytest.raises((RuntimeError, ValueError), match="nothing was loaded"):
                layer.load_state_dict(state, strict=strict)
            assert _changed(layer, before) == [], (name, kind)
    layer.load_state_dict(sd, strict=strict)
    assert all(torch.equal(v, sd[k]) for k, v in layer.state_dict().items())


def test_the_load_check_leaves_what_torch_would_load_to_torch():
    # What torch's own loading forgives must load after mark_only_lora_as_trainable too, as with loralib.
    def model():
        net = nn.Sequential(lora.Linear(4, 4, r=2), nn.BatchNorm1d(4), nn.Linear(4, 2))
        lora.mark_only_lora_as_trainable(net)
        return net

    source = model()
    randomise(source, seed=3)
    state = source.state_dict()
    # a state dict without version metadata: BatchNorm fills in num_batches_tracked
    legacy = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    target = model()
    target.load_state_dict(legacy)
    assert torch.equal(target[0].lora_B, source[0].lora_B)
    # with version 2 metadata it is missing, as torch says: refused before anything is copied
    versioned = copy.copy(state)
    versioned._metadata = state._metadata
    del versioned["1.num_batches_tracked"]
    target = model()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: '1\.num_batches_tracked'; nothing was"):
        target.load_state_dict(versioned)
    assert not torch.equal(target[0].lora_B, source[0].lora_B)

    def rename(module, state_dict, prefix, *args):  # a checkpoint whose layer keys were spelled "w", "b"
        for old, new in (("w", "weight"), ("b", "bias")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    renamed = {k.replace("2.weight", "2.w").replace("0.weight", "0.w"): v for k, v in state.items()}
    for holder in (2, 0):  # the hook on a plain submodule, and on the LoRA layer itself
        target = model()
        target[holder].register_load_state_dict_pre_hook(rename)
        target.load_state_dict({k: v for k, v in renamed.items() if k.startswith(f"{holder}.")} |
                               {k: v for k, v in state.items() if not k.startswith(f"{holder}.")})
        assert torch.equal(target[holder].weight, source[holder].weight)
    target = model()  # a state dict that holds num_batches_tracked, without version metadata, loads too
    target.load_state_dict(dict(state))

    target = model()  # a post-hook that forgives a missing key, torch's documented way
    target.register_load_state_dict_post_hook(lambda module, keys: keys.missing_keys.remove("2.bias"))
    target.load_state_dict({k: v for k, v in state.items() if k != "2.bias"})
    assert torch.equal(target[0].lora_A, source[0].lora_A)


def test_numpy_hyperparameters_are_accepted_as_python_numbers():
    layer = lora.Linear(4, 4, r=np.int64(2), lora_alpha=np.float32(8.0), lora_dropout=np.float32(0.25))
    assert (layer.r, layer.lora_alpha, layer.scaling, layer.dropout_rate) == (2, 8.0, 4.0, 0.25)
    assert type(layer.lora_alpha) is float and type(layer.dropout_rate) is float
    assert type(lora.Linear(4, 4, r=2, lora_alpha=np.int64(4)).lora_alpha) is int
    with pytest.raises(TypeError, match="lora_alpha must be a positive number; got np.True_"):
        lora.Linear(4, 4, r=2, lora_alpha=np.bool_(True))


def test_loralib_conv_keys_still_load_under_the_whole_state_dict_check():
    model = nn.Sequential(lora.Conv2d(4, 6, 3, r=2))
    lora.mark_only_lora_as_trainable(model)
    sd = {("0.conv." + k if k in ("weight", "bias") else "0." + k): v for k, v in
          {k.removeprefix("0."): v for k, v in model.state_dict().items()}.items()}
    model.load_state_dict(sd)


@pytest.mark.parametrize("kind", KINDS)
def test_from_module_of_a_lora_layer_is_refused(kind):
    layer, _ = build(kind)
    cls = getattr(lora, kind)
    args = ((8, 4, 4),) if kind == "MergedLinear" else ()
    with pytest.raises(TypeError, match=rf"^{kind}.from_module: the module is already a LoRA layer \({kind}, r=3\)"):
        cls.from_module(layer, *args, r=2)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: lora.Linear(4, 4, r=2, use_rslora="false"), TypeError,
         "use_rslora must be True or False; got 'false'"),
        (lambda: lora.Linear(4, 4, r=2, merge_weights="no"), TypeError, "merge_weights must be True or False"),
        (lambda: lora.Linear(4, 4, r=2, fan_in_fan_out=0), TypeError, "fan_in_fan_out must be True or False; got 0"),
        (lambda: lora.MergedLinear(4, 6, r=2, enable_lora=(True, False), use_rslora="true"), TypeError,
         "use_rslora must be True or False"),
        (lambda: lora.Embedding(5, 4, r=2, use_rslora="false"), TypeError, "use_rslora must be True or False"),
        (lambda: lora.Conv2d(4, 6, 3, r=2, use_rslora="false"), TypeError, "use_rslora must be True or False"),
        (lambda: lora.Linear.from_module(nn.Linear(4, 4), r=2, use_rslora="false"), TypeError,
         "use_rslora must be True or False"),
        (lambda: lora.Linear(4, 4, r=2, adapter_dtype=torch.int64), TypeError,
         "adapter_dtype must be a floating-point torch.dtype .*; got torch.int64"),
        (lambda: lora.Linear(4, 4, r=2, adapter_dtype="float32"), TypeError, "adapter_dtype must be a floating-point"),
        (lambda: lora.Linear(0, 4, r=2), ValueError,
         "Linear: a rank-2 adapter needs every size positive; got in_features=0, out_features=4"),
        (lambda: lora.Embedding(5, 4, r=2, padding_idx=5), ValueError,
         r"padding_idx must be in \[-num_embeddings, num_embeddings\) = \[-5, 5\); got 5"),
    ],
)
def test_bad_constructor_arguments_are_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_numpy_bools_are_bools():
    np = pytest.importorskip("numpy")
    layer = lora.Linear(4, 4, r=2, use_rslora=np.bool_(True))
    assert layer.use_rslora is True


def test_lora_scaling_is_the_one_rule_and_lora_alpha_for_inverts_it():
    from lora.layers import lora_alpha_for

    assert lora.lora_scaling(32, 16) == 2.0
    assert lora.lora_scaling(32, 16, use_rslora=True) == 8.0
    for r, rslora in ((12, True), (12, False), (7, True)):
        layer = lora.Linear(4, 4, r=r, lora_alpha=5, use_rslora=rslora)
        assert layer.scaling == lora.lora_scaling(5, r, use_rslora=rslora)
        assert lora_alpha_for(layer.scaling, r, use_rslora=rslora) == pytest.approx(5, rel=1e-15)


def test_lora_layers_names_every_lora_layer_or_only_the_adapted_ones():
    shared = lora.Linear(4, 4, r=2)
    model = nn.Sequential(shared, nn.ReLU(), lora.Linear(4, 4), shared, lora.Embedding(5, 4, r=1))
    assert [name for name, _ in lora.lora_layers(model)] == ["0", "2", "4"]
    assert [name for name, _ in lora.lora_layers(model, adapted_only=True)] == ["0", "4"]
    assert [name for name, _ in lora.lora_layers(model, adapted_only=True, remove_duplicate=False)] == ["0", "3", "4"]
    assert [name for name, _ in lora.lora_layers(model, prefix="m")][0] == "m.0"


def test_dropout_rate_is_the_configured_probability_in_either_mode():
    layer = lora.Linear(4, 4, r=2, lora_dropout=0.25)
    assert layer.dropout_rate == 0.25 and layer.eval().dropout_rate == 0.25
    assert lora.Linear(4, 4, r=2).dropout_rate == 0.0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_merge_inside_inference_mode_leaves_an_ordinary_tensor(kind):
    # an @inference_mode evaluation calling eval() merges; a later forward with autograd must still work
    torch.manual_seed(0)
    layer = lora.Linear(6, 4, r=2) if kind == "linear" else lora.Conv1d(6, 4, 1, r=2)
    randomise(layer, seed=2)
    x = torch.randn(3, 6, requires_grad=True) if kind == "linear" else torch.randn(3, 6, 5, requires_grad=True)
    with torch.inference_mode():
        layer.eval()
    assert layer.merged and not layer.merged_weight.is_inference()
    layer(x).sum().backward()
    expected = torch.autograd.grad(F.linear(x, layer.merged_weight).sum() if kind == "linear"
                                   else F.conv1d(x, layer.merged_weight, layer.bias).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_an_embedding_computes_its_delta_in_float32_whatever_the_adapters_dtype():
    torch.manual_seed(0)
    layer = lora.Embedding(20, 8, r=2, lora_alpha=4, adapter_dtype=torch.bfloat16)
    randomise(layer, seed=4)
    ids = torch.arange(20)
    expected = layer.weight.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).t()
    trained = layer(ids)
    layer.eval()  # merged: the float32 delta_weight
    torch.testing.assert_close(trained.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(ids), trained, rtol=1e-6, atol=1e-6)
