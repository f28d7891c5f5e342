"""LoRA layers over a bitsandbytes 4-bit base: forward, gradients, dropout, slices, merging, state dicts."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora
from lora import quant
from lora.lowrank import lowrank_linear

bnb = pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")


def quantized_linear(in_features=64, out_features=96, *, dtype=torch.float32, bias=True, quant_type="nf4",
                     double_quant=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    weight = quant.quantize_weight(base.weight.data, quant_type=quant_type, double_quant=double_quant)
    return quant.linear4bit(weight, None if base.bias is None else base.bias.data)


def with_random_adapters(layer, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
    return layer


def make_layer(kind, module, *, seed=1, **kwargs):
    kwargs.setdefault("merge_weights", False)
    if kind == "linear":
        return with_random_adapters(lora.Linear.from_module(module, r=4, lora_alpha=8, **kwargs), seed)
    return with_random_adapters(lora.MergedLinear.from_module(module, (48, 16, 32), r=4, lora_alpha=8,
                                                              enable_lora=(True, False, True), **kwargs), seed)


def reference_layer(layer):
    """The same layer over the dequantized weight as an ordinary (out, in) weight."""
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      dtype=quant.logical_dtype(layer.weight))
    with torch.no_grad():
        plain.weight.copy_(quant.dequantize(layer.weight))
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    ref = (lora.Linear.from_module(plain, r=4, lora_alpha=8, merge_weights=False) if type(layer) is lora.Linear
           else lora.MergedLinear.from_module(plain, layer.split_sizes, r=4, lora_alpha=8,
                                              enable_lora=layer.enable_lora, merge_weights=False))
    with torch.no_grad():
        ref.lora_A.copy_(layer.lora_A)
        ref.lora_B.copy_(layer.lora_B)
    ref.lora_dropout = layer.lora_dropout
    return ref


@pytest.mark.parametrize("kind", ["linear", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_and_gradients_equal_the_dequantized_weights(kind, dtype, p, quant_type):
    layer = make_layer(kind, quantized_linear(dtype=dtype, quant_type=quant_type), lora_dropout=p)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and not layer.weight.requires_grad
    ref = reference_layer(layer)
    x = torch.randn(3, 5, 64, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    y = layer(x1)
    torch.manual_seed(7)
    y_ref = ref(x2)
    # the same hand-written maths on the same (dequantized) weight: bit for bit
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(layer.lora_A.grad, ref.lora_A.grad) and torch.equal(layer.lora_B.grad, ref.lora_B.grad)
    if p == 0.0:
        # ... and both against F.linear and autograd on the dequantized weight, in float64
        W = quant.dequantize(layer.weight).double()
        x3 = x.double().requires_grad_()
        A, B = layer.lora_A.double().detach().requires_grad_(), layer.lora_B.double().detach().requires_grad_()
        expected = F.linear(x3, W, layer.bias.double())
        r, row, delta = 4, 0, torch.zeros_like(expected)
        for j, (offset, size) in enumerate((s.offset, s.size) for s in layer.lora_slices):
            piece = x3 @ A[j * r : (j + 1) * r].t() @ B[row : row + size].t() * layer.scaling
            delta = delta + F.pad(piece, (offset, layer.out_features - offset - size))
            row += size
        expected = expected + delta
        expected.backward(dy.double())
        # float32: rounding only; bf16: a few ulps of the largest value (bf16 GEMMs round their operands)
        rel = 1e-5 if dtype == torch.float32 else 2**-6
        for got, want in ((y, expected), (x1.grad, x3.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)):
            torch.testing.assert_close(got.double(), want, rtol=rel, atol=rel * want.abs().max().item())


def test_the_dequantized_weight_is_never_saved_for_backward():
    layer = make_layer("linear", quantized_linear(256, 128, dtype=torch.bfloat16), lora_dropout=0.1)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    x = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (128, 256) not in [shape for shape, _ in saved] and (256, 128) not in [shape for shape, _ in saved]
    assert ((128 * 256 // 2, 1), torch.uint8) in saved  # the packed weight, 1/4 of bf16
    y.sum().backward()
    assert x.grad is not None


def test_adapters_disabled_and_r0_compute_the_4bit_base():
    module = quantized_linear(dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = module(x)
    W = quant.dequantize(module.weight)
    assert torch.equal(expected, F.linear(x, W, module.bias))
    layer = make_layer("merged", module)
    with lora.disable_adapters(layer), torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), expected)
    x.requires_grad_()
    with lora.disable_adapters(layer):
        layer(x).sum().backward()
    torch.testing.assert_close(x.grad, W.sum(0).expand_as(x), rtol=1e-2, atol=1e-2)


def test_in_model_merges_are_refused_and_merged_state_dict_dequantizes():
    layer = make_layer("linear", quantized_linear(dtype=torch.bfloat16))
    model = nn.Sequential(layer)
    message = re.escape("merge_and_save")
    with pytest.raises(quant.QuantizedMergeError, match=message):
        layer.merge()
    with pytest.raises(quant.QuantizedMergeError, match=message):
        lora.merge_lora(model)
    with pytest.raises(quant.QuantizedMergeError, match=message), lora.merged(model):
        pass
    assert not layer.merged and layer.merged_weight is None
    with pytest.raises(quant.QuantizedMergeError, match="merge_weights=False"):
        lora.Linear.from_module(quantized_linear(), r=4)  # loralib's default merge_weights=True: merge on eval()
    state = lora.merged_state_dict(model)
    assert sorted(state) == ["0.bias", "0.weight"]
    delta = layer.delta_weight()
    expected = (quant.dequantize(layer.weight).float() + delta).to(torch.bfloat16)
    assert state["0.weight"].dtype == torch.bfloat16 and torch.equal(state["0.weight"], expected)
    plain = nn.Sequential(nn.Linear(64, 96, dtype=torch.bfloat16))
    plain.load_state_dict(state)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=2e-2, atol=2e-2)


def test_dora_and_fan_in_fan_out_over_4bit_are_refused():
    with pytest.raises(ValueError, match="use_dora=True over a 4-bit base weight is not supported"):
        lora.Linear.from_module(quantized_linear(), r=4, merge_weights=False, use_dora=True)
    with pytest.raises(ValueError, match="fan_in_fan_out=True does not match the module"):
        lora.Linear.from_module(quantized_linear(), r=4, merge_weights=False, fan_in_fan_out=True)


def test_state_dict_keeps_the_quant_state_and_round_trips():
    layer = make_layer("linear", quantized_linear(dtype=torch.bfloat16, seed=0))
    state = layer.state_dict()
    assert sorted(state) == sorted(["weight", "bias", "lora_A", "lora_B", "weight.absmax", "weight.quant_map",
                                    "weight.nested_absmax", "weight.nested_quant_map",
                                    "weight.quant_state.bitsandbytes__nf4"])
    assert sorted(state) == sorted([*quantized_linear().state_dict(), "lora_A", "lora_B"])  # bnb's own keys
    other = make_layer("linear", quantized_linear(dtype=torch.bfloat16, seed=5), seed=9)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(quant.dequantize(other.weight), quant.dequantize(layer.weight))


def test_input_dtype_and_autocast():
    layer = make_layer("linear", quantized_linear(dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=re.escape("the input is torch.float32 but the weight is torch.bfloat16")):
        layer(torch.randn(2, 64))
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.manual_seed(0)
    assert torch.equal(y, layer(x.to(torch.bfloat16)))


def test_quantize_errors_and_missing_bitsandbytes(hide_bitsandbytes):
    with pytest.raises(ValueError, match=re.escape("quantize='int4' is not a 4-bit type; expected one of nf4, fp4")):
        quant.quantize_weight(torch.randn(64, 64), quant_type="int4")
    with pytest.raises(ValueError, match=re.escape("weight: a weight of shape (64, 96) cannot be quantized in blocks "
                                                   "of 64: its in_features must be a multiple of 64")):
        quant.quantize_weight(torch.randn(64, 96))
    hide_bitsandbytes()
    with pytest.raises(ImportError, match=re.escape('pip install "purelora[qlora]"')):
        quant.quantize_weight(torch.randn(64, 64))


def test_lowrank_linear_on_packed_weight_equals_dequantized():
    module = quantized_linear(dtype=torch.bfloat16)
    A, B = torch.randn(4, 64) * 0.3, torch.randn(96, 4) * 0.3
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    W = quant.dequantize(module.weight)
    y4 = lowrank_linear(x, module.weight, module.bias, A, B, 2.0, slices=((0, 96),))
    y = lowrank_linear(x, W, module.bias, A, B, 2.0, slices=((0, 96),))
    assert torch.equal(y4, y)
    with pytest.raises(ValueError, match="fan_in_fan_out=True does not apply"):
        lowrank_linear(x, module.weight, None, A, B, 2.0, slices=((0, 96),), fan_in_fan_out=True)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_chunked_quantization_gives_bitsandbytes_bits(monkeypatch, quant_type, double_quant):
    monkeypatch.setattr(quant, "QUANT_CHUNK", 64 * 40)  # 40 rows of 64 per chunk: 7 chunks, the last one short
    weight = torch.randn(260, 64, dtype=torch.bfloat16)
    ours = quant.quantize_weight(weight, quant_type=quant_type, double_quant=double_quant)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                 quant_type=quant_type)
    assert torch.equal(ours.data, packed)
    mine, theirs = quant.quant_state_entries(ours), state.as_dict(packed=True)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def bnb_repacked(layer):
    """What bitsandbytes' Linear4bit does to its weight at its first eval-mode forward without grad on an
    AVX512-BF16 CPU (done by hand, so that the test runs on any CPU)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    weight = layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert weight.quant_state.packing_format_for_cpu and weight.quant_state.dtype == torch.bfloat16
    return layer


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_a_weight_bitsandbytes_repacked_for_its_cpu_kernel_computes_the_same_every_call(kind):
    module = bnb_repacked(quantized_linear(dtype=torch.float32))
    assert quant.logical_dtype(module.weight) == torch.float32  # not the repack's bfloat16 label
    first, second = quant.dequantize(module.weight), quant.dequantize(module.weight)
    assert first.dtype == torch.float32 and torch.equal(first, second)  # the weight's state was not rewritten
    assert module.weight.quant_state.packing_format_for_cpu
    layer = make_layer(kind, module)  # wraps it in the standard layout, once
    assert not layer.weight.quant_state.packing_format_for_cpu
    assert torch.equal(quant.dequantize(layer.weight), first)
    x = torch.randn(5, 64)
    ref = reference_layer(layer)
    for _ in range(2):
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_4bit_weight_stored_as_bf16_bytes_is_recognised():
    # transformers' bnb_4bit_quant_storage=torch.bfloat16 (for FSDP): the packed bytes viewed as bf16
    module = quantized_linear(dtype=torch.float32, bias=False)
    expected = quant.dequantize(module.weight)
    packed = module.weight
    stored = bnb.nn.Params4bit(packed.data.reshape(-1, 2).view(torch.bfloat16), requires_grad=False,
                               quant_state=packed.quant_state, quant_type=packed.quant_type,
                               quant_storage=torch.bfloat16, bnb_quantized=True)
    module.weight = stored
    assert quant.is_quantized(stored) and quant.logical_shape(stored) == (96, 64)
    layer = lora.Linear.from_module(module, r=4, lora_alpha=8, merge_weights=False)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ expected.t(), rtol=1e-5, atol=1e-5)
