"""Every layer kind under torch.autocast (CPU, bfloat16 and float16) against the same maths in plain autograd
under the same autocast; adapters and their gradients in float32; one rounding of the 16-bit output;
float16 adapter gradients that do not overflow; GradScaler training."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lora
import lora.lowrank as lowrank
from lora.lowrank import dropout_positions

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
SEED = 1234


@pytest.fixture(autouse=True)
def fixed_dropout_seed(monkeypatch):
    # The reference rebuilds our dropout mask from the seed the layer draws.
    monkeypatch.setattr(lowrank, "new_seed", lambda: SEED)


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype)


def randomise(layer, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def build(kind, p, *, bias=True):
    torch.manual_seed(0)
    if kind == "Linear":
        layer, x = lora.Linear(12, 10, r=3, lora_alpha=6, lora_dropout=p, bias=bias), torch.randn(2, 5, 12)
    elif kind == "MergedLinear":
        layer = lora.MergedLinear(12, 16, r=3, lora_alpha=6, lora_dropout=p, enable_lora=(True, False, True),
                                  split_sizes=(8, 4, 4), bias=bias)
        x = torch.randn(2, 5, 12)
    elif kind == "Embedding":
        layer, x = lora.Embedding(30, 8, r=3, lora_alpha=6, padding_idx=2), torch.randint(0, 30, (2, 5))
    elif kind == "Conv1d":
        layer, x = lora.Conv1d(4, 6, 3, r=3, lora_dropout=p, padding=1), torch.randn(2, 4, 9)
    elif kind == "Conv2d":
        layer, x = lora.Conv2d(4, 6, 3, r=3, lora_dropout=p, padding=1), torch.randn(2, 4, 7, 7)
    else:
        layer, x = lora.Conv3d(4, 6, (1, 3, 2), r=3, lora_dropout=p), torch.randn(2, 4, 3, 5, 5)
    randomise(layer)
    return layer, x


def linear_reference(layer, x, p, dtype):
    """Our maths in plain autograd ops under the same autocast, with the layer's dropout mask."""
    weight = layer.weight.t() if layer.fan_in_fan_out else layer.weight
    with autocast(dtype):
        y = F.linear(x, weight, layer.bias)
        if layer.merged:
            return F.linear(x, weight + layer.delta_weight().t() if layer.fan_in_fan_out
                            else weight + layer.delta_weight(), layer.bias)
        xd = x
        if p > 0:
            mask = torch.zeros(x.shape, dtype=torch.bool)
            mask.view(-1)[dropout_positions(SEED, x.numel(), p, x.device)] = True
            xd = x.masked_fill(mask, 0) / (1 - p)
        r, row, parts = layer.r, 0, []
        for j, (offset, size) in enumerate((s.offset, s.size) for s in layer.lora_slices):
            out = F.linear(F.linear(xd, layer.lora_A[j * r : (j + 1) * r]), layer.lora_B[row : row + size])
            parts.append(F.pad(out, (offset, y.shape[-1] - offset - size)))
            row += size
        return y + layer.scaling * sum(parts)


def conv_reference(layer, x, p, dtype):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.weight.dim() - 2]
    args = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    delta = layer.delta_weight()  # float32, outside autocast
    with autocast(dtype):
        if layer.merged or p == 0:
            return conv(x, layer.weight + delta, layer.bias, **args)
        torch.manual_seed(SEED)
        return conv(x, layer.weight, layer.bias, **args) + conv(F.dropout(x, p), delta, None, **args)


def run(layer, x, dtype, *, seed_global=False):
    """Forward under autocast, backward of a fixed cotangent; (output, input grad, A grad, B grad)."""
    layer.zero_grad()
    x = x.clone().requires_grad_(x.is_floating_point())
    if seed_global:
        torch.manual_seed(SEED)
    with autocast(dtype):
        y = layer(x)
    if y.requires_grad:  # not so for a merged embedding: nothing in it trains
        cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        y.backward(cotangent)
    grads = [t.grad for t in (x, layer.lora_A, layer.lora_B)]
    return y, grads


def reference_run(layer, x, p, dtype):
    reference = {"Embedding": None, "Conv1d": conv_reference, "Conv2d": conv_reference,
                 "Conv3d": conv_reference}.get(type(layer).__name__, linear_reference)
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    x = x.clone().requires_grad_(x.is_floating_point())
    original = layer.lora_A, layer.lora_B
    layer.lora_A, layer.lora_B = torch.nn.Parameter(A), torch.nn.Parameter(B)  # the same values, own grads
    try:
        y = reference(layer, x, p, dtype)
        cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        y.backward(cotangent)
        grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad]
    finally:
        layer.lora_A, layer.lora_B = original
    return y, grads


def assert_close(got, want, dtype):
    scale = want.detach().abs().max().clamp(min=1).item()
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["Linear", "MergedLinear", "Conv1d", "Conv2d", "Conv3d"])
def test_layer_under_autocast_equals_the_same_maths_in_autograd(kind, p, merged, dtype):
    layer, x = build(kind, p)
    if merged:
        layer.merge()
    y, grads = run(layer, x, dtype, seed_global=kind.startswith("Conv"))
    with autocast(dtype):
        frozen_dtype = torch.nn.functional.linear(x, torch.zeros(3, x.shape[-1])).dtype
    assert y.dtype == frozen_dtype == dtype  # the dtype autocast gives the frozen layer alone
    want, want_grads = reference_run(layer, x, p, dtype)
    assert_close(y, want, dtype)
    assert grads[0].dtype == torch.float32  # back to the caller's dtype
    assert_close(grads[0], want_grads[0], dtype)
    if merged:  # adapters are not in the graph of a merged forward
        assert grads[1] is None and grads[2] is None
        return
    for got, expected, param in zip(grads[1:], want_grads[1:], (layer.lora_A, layer.lora_B), strict=True):
        assert param.dtype == got.dtype == torch.float32
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merged", [False, True])
def test_embedding_under_autocast_computes_as_the_frozen_lookup_does_in_float32(dtype, merged):
    # autocast leaves a lookup alone, so an adapted float32 embedding gives exactly its float32 output.
    layer, x = build("Embedding", 0.0)
    if merged:
        layer.merge()
    outside = layer(x)
    y, grads = run(layer, x, dtype)
    assert y.dtype == torch.float32
    assert torch.equal(y, outside)
    if not merged:
        assert grads[1].dtype == grads[2].dtype == torch.float32
        assert grads[1][:, 2].abs().max() == 0  # the padding row gets no adapter gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_a_bfloat16_base_under_autocast_computes_in_autocasts_dtype(fused, dtype):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 9).to(torch.bfloat16)
    if fused:
        layer = lora.MergedLinear.from_module(base, (3, 3, 3), r=2, lora_alpha=4, lora_dropout=0.1)
    else:
        layer = lora.Linear.from_module(base, r=2, lora_alpha=4, lora_dropout=0.1)
    randomise(layer)
    assert layer.lora_A.dtype == torch.float32  # float32 adapters over a 16-bit base by default
    x = torch.randn(3, 12)
    y, grads = run(layer, x, dtype)
    want, want_grads = reference_run(layer, x, 0.1, dtype)
    assert y.dtype == dtype and grads[0].dtype == torch.float32
    assert grads[1].dtype == grads[2].dtype == torch.float32
    for got, expected in zip([y, *grads], [want, *want_grads], strict=True):
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_tiny_delta_survives_the_16bit_output_under_autocast(dtype):
    # The adapters' output and the frozen GEMM are summed before one rounding. A delta of 0.05 on outputs
    # near 96 is below half a bfloat16 ulp there (0.25), so rounding the frozen output first and adding the
    # delta after (PEFT's order) loses it everywhere; one rounding shifts the right fraction of elements.
    torch.manual_seed(0)
    n, d, r = 4096, 64, 4
    layer = lora.Linear(d, d, r=r, lora_alpha=r, bias=False)
    with torch.no_grad():
        layer.weight.copy_(1.5 + 0.05 * torch.randn(d, d))
        layer.lora_A.fill_(1.0 / d)
        layer.lora_B.fill_(0.05 / r)
    x = 1.0 + 0.1 * torch.randn(n, d)
    with torch.no_grad(), autocast(dtype):
        ours = layer(x).float()
        frozen = F.linear(x, layer.weight).float()
        separate = (F.linear(x, layer.weight) + layer.scaling * F.linear(F.linear(x, layer.lora_A),
                                                                         layer.lora_B)).float()
    delta = (layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()).mean().item()
    if dtype == torch.bfloat16:
        assert torch.equal(separate, frozen)  # the test can tell the two orders apart
    assert abs((ours - frozen).mean().item() / delta - 1) < 0.1


def test_float16_adapter_gradients_do_not_overflow_where_float32_ones_would_not():
    # 4096 tokens of x = 60 and a gradient of 0.3 per output: dA sums to about 4096 * 60 * 0.3 * |B| * scaling,
    # above float16's 65504 when computed in float16.
    n, d, r = 4096, 8, 2
    layer = lora.Linear.from_module(torch.nn.Linear(d, d, bias=False).half(), r=r, lora_alpha=r)
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    x = torch.full((n, d), 60.0, dtype=torch.float16, requires_grad=True)
    dy = torch.full((n, d), 0.3, dtype=torch.float16)
    layer(x).backward(dy)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()  # float32
    expected_dA = layer.scaling * (dy.float() @ B).t() @ x.detach().float()
    expected_dB = layer.scaling * dy.float().t() @ (x.detach().float() @ A.t())
    assert expected_dA.abs().max() > 65504  # what float16 products would overflow
    assert torch.isfinite(layer.lora_A.grad).all() and torch.isfinite(layer.lora_B.grad).all()
    torch.testing.assert_close(layer.lora_A.grad, expected_dA, rtol=5e-3, atol=0)  # from float16 x and xa
    torch.testing.assert_close(layer.lora_B.grad, expected_dB, rtol=5e-3, atol=0)


@given(
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    merged=st.booleans(),
    bias=st.booleans(),
    fan_in_fan_out=st.booleans(),
    fused=st.booleans(),
    n=st.integers(1, 9),
    d_in=st.integers(1, 12),
    r=st.integers(1, 4),
)
def test_linear_layers_under_autocast_property(dtype, p, merged, bias, fan_in_fan_out, fused, n, d_in, r):
    torch.manual_seed(n * 100 + d_in)
    if fused:
        layer = lora.MergedLinear(d_in, 9, r=r, lora_alpha=2 * r, lora_dropout=p, enable_lora=(True, False, True),
                                  fan_in_fan_out=fan_in_fan_out, bias=bias)
    else:
        layer = lora.Linear(d_in, 7, r=r, lora_alpha=2 * r, lora_dropout=p, fan_in_fan_out=fan_in_fan_out, bias=bias)
    randomise(layer)
    if merged:
        layer.merge()
    x = torch.randn(n, d_in)
    y, grads = run(layer, x, dtype)
    want, want_grads = reference_run(layer, x, p, dtype)
    assert y.dtype == dtype
    assert_close(y, want, dtype)
    assert_close(grads[0], want_grads[0], dtype)
    if not merged:
        for got, expected in zip(grads[1:], want_grads[1:], strict=True):
            assert got.dtype == torch.float32
            assert_close(got, expected, dtype)


def test_fp16_autocast_with_grad_scaler_trains_a_patched_phi3_without_overflow_after_the_first_adjustments():
    from lora.phi3 import Phi3Config, Phi3ForCausalLM, patch

    torch.manual_seed(0)
    config = Phi3Config.from_dict({"model_type": "phi3", "vocab_size": 101, "hidden_size": 32,
                                   "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 4, "max_position_embeddings": 256})
    model = Phi3ForCausalLM(config)
    patch(model, r=4, lora_alpha=8, lora_dropout=0.05)
    lora.mark_only_lora_as_trainable(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    # A scale of 2^24 (256x the default): a float16 dA or dB overflows now and then at this scale (it did at
    # steps 0 and 15 when they were float16 products); float32 ones do not.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    ids = torch.randint(3, 101, (4, 64), generator=torch.Generator().manual_seed(1))
    losses, skipped = [], []
    for _ in range(30):
        with autocast(torch.float16):
            loss = model.loss(ids, ids)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        finite = all(torch.isfinite(p.grad).all() for p in params)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
        skipped.append(not finite)
        assert all(p.dtype == torch.float32 for p in params)
    first_good = skipped.index(False)
    assert first_good < 10, skipped  # the first scale adjustments
    assert not any(skipped[first_good:]), skipped  # and none after
    assert losses[-1] < losses[first_good] - 0.1, losses
