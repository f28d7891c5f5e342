"""DoRA on lora.Linear and lora.MergedLinear: PEFT's formula and values, the low-rank norm, the hand-written
backward against autograd, dropout with the same positions as a reference, exact merge, clear errors."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora
import lora.lowrank as lowrank
from lora.lowrank import dropout_positions

SEED = 4321


def randomise(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.lora_magnitude.mul_(0.5 + torch.rand(layer.lora_magnitude.shape, generator=g))


def lora_delta(layer):
    """scaling * B @ A per slice, as an (out, in) matrix."""
    W = layer.weight.t() if layer.fan_in_fan_out else layer.weight
    delta = torch.zeros(W.shape, dtype=layer.lora_A.dtype)
    r, row = layer.r, 0
    for j, (offset, size) in enumerate((s.offset, s.size) for s in layer.lora_slices):
        delta[offset : offset + size] = layer.lora_B[row : row + size] @ layer.lora_A[j * r : (j + 1) * r]
        row += size
    return delta * layer.scaling


def explicit(layer, x, x_drop):
    """PEFT's formula written out with the full W + s B A: W x + b + (c - 1) W drop(x) + c s B A drop(x)."""
    W = layer.weight.t() if layer.fan_in_fan_out else layer.weight
    delta = lora_delta(layer).to(W.dtype)
    rows = [i for offset, size in ((s.offset, s.size) for s in layer.lora_slices) for i in range(offset, offset + size)]
    norm = torch.linalg.norm(W + delta, dim=1).detach()
    c = torch.ones(W.shape[0], dtype=W.dtype)
    c = c.index_put((torch.tensor(rows),), layer.lora_magnitude / norm[rows])
    return F.linear(x, W, layer.bias) + (c - 1) * F.linear(x_drop, W) + c * F.linear(x_drop, delta)


def assert_same_in_float64(layer, x, got, want):
    """Outputs, and the gradients of x and every adapter parameter for one cotangent, within 1e-12."""
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(got)
    params = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude)
    for a, b in zip(torch.autograd.grad(got, params, dy), torch.autograd.grad(want, params, dy), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_twin(layer, base, dropout=0.0):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(Holder(copy.deepcopy(base)), peft.LoraConfig(
        r=layer.r, lora_alpha=layer.lora_alpha, lora_dropout=dropout, target_modules=["proj"], use_dora=True))
    twin = model.base_model.model.proj
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
        twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return model, twin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(12, 10), (16, 48)], ids=["linear", "fused-qkv-as-a-whole"])
def test_equals_peft_dora_without_dropout(shape, bias):
    torch.manual_seed(0)
    base = nn.Linear(*shape, bias=bias)
    layer = lora.Linear.from_module(copy.deepcopy(base), r=3, lora_alpha=6, use_dora=True)
    randomise(layer)
    model, twin = peft_twin(layer, base)
    x = torch.randn(3, 4, shape[0], requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    ours, theirs = layer(x), model(x_twin)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    dy = torch.randn_like(ours)
    ours.backward(dy)
    theirs.backward(dy)
    pairs = [(x.grad, x_twin.grad), (layer.lora_A.grad, twin.lora_A["default"].weight.grad),
             (layer.lora_B.grad, twin.lora_B["default"].weight.grad),
             (layer.lora_magnitude.grad, twin.lora_magnitude_vector["default"].weight.grad)]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_magnitude_starts_at_the_row_norms_so_the_layer_starts_as_the_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = lora.Linear.from_module(copy.deepcopy(base), r=3, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude, torch.linalg.norm(base.weight, dim=1).detach())
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    assert "lora_magnitude" in dict(layer.named_parameters())


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_low_rank_norm_equals_the_norm_of_the_full_matrix(fan_in_fan_out):
    torch.manual_seed(0)
    layer = lora.MergedLinear(16, 24, r=4, lora_alpha=8, enable_lora=(True, False, True), split_sizes=(8, 8, 8),
                              fan_in_fan_out=fan_in_fan_out, use_dora=True)
    randomise(layer)
    W = layer.weight.t() if fan_in_fan_out else layer.weight
    full = torch.linalg.norm(W + lora_delta(layer), dim=1)
    torch.testing.assert_close(layer.dora_norm(), torch.cat([full[:8], full[16:]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_hand_written_backward_equals_autograd_in_float64(fused, bias):
    torch.manual_seed(0)
    if fused:
        layer = lora.MergedLinear(6, 9, r=2, lora_alpha=3, enable_lora=(True, False, True), use_dora=True, bias=bias)
    else:
        layer = lora.Linear(6, 7, r=2, lora_alpha=3, use_dora=True, bias=bias)
    layer = layer.double()
    randomise(layer)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    # n is a constant in backward (DoRA's section 4.3), so only x and m have finite-difference gradients;
    # A and B are checked against autograd through the explicit formula, which detaches n the same way.
    assert torch.autograd.gradcheck(lambda *_: layer(x), (x, layer.lora_magnitude))
    got, want = layer(x), explicit(layer, x, x)
    assert_same_in_float64(layer, x, got, want)


def test_a_zero_magnitude_row_still_gets_its_gradient():
    # The backward recovers W x + s B A x from the output divided by m / n; where m is 0 it keeps a copy.
    torch.manual_seed(0)
    layer = lora.Linear(6, 4, r=2, use_dora=True).double()
    randomise(layer)
    with torch.no_grad():
        layer.lora_magnitude[1] = 0.0
    x = torch.randn(5, 6, dtype=torch.float64)
    layer(x).sum().backward()
    want = torch.autograd.grad(explicit(layer, x, x).sum(), layer.lora_magnitude)[0]
    torch.testing.assert_close(layer.lora_magnitude.grad, want)


# DoRA's W drop(x): a second frozen GEMM, or (W x - W D) / (1 - p) with the sparse product W D (conftest's dora_route)
ROUTES = ("gemm", "sparse")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fused", [False, True])
def test_with_dropout_equals_the_formula_on_the_same_dropped_elements(monkeypatch, dora_route, fused, route):
    monkeypatch.setattr(lowrank, "new_seed", lambda: SEED)
    dora_route(route)
    torch.manual_seed(0)
    p = 0.3
    if fused:
        layer = lora.MergedLinear(8, 12, r=2, lora_alpha=4, lora_dropout=p, enable_lora=(False, True, True),
                                  use_dora=True)
    else:
        layer = lora.Linear(8, 6, r=2, lora_alpha=4, lora_dropout=p, use_dora=True)
    layer = layer.double()
    randomise(layer)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask.view(-1)[dropout_positions(SEED, x.numel(), p, x.device)] = True
    got = layer(x)
    want = explicit(layer, x, x.masked_fill(mask, 0) / (1 - p))
    assert_same_in_float64(layer, x, got, want)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_base_weight_left_trainable_gets_the_formulas_gradient(monkeypatch, dora_route, dropout, route):
    monkeypatch.setattr(lowrank, "new_seed", lambda: SEED)
    dora_route(route)
    torch.manual_seed(0)
    layer = lora.MergedLinear(8, 12, r=2, lora_alpha=4, lora_dropout=dropout, enable_lora=(True, False, True),
                              use_dora=True, fan_in_fan_out=True).double()
    randomise(layer)
    layer.weight.requires_grad_(True)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    if dropout:
        mask.view(-1)[dropout_positions(SEED, x.numel(), dropout, x.device)] = True
    dy = torch.randn(5, 12, dtype=torch.float64)
    got = torch.autograd.grad(layer(x), (layer.weight, x), dy)
    want = torch.autograd.grad(explicit(layer, x, x.masked_fill(mask, 0) / (1 - dropout)), (layer.weight, x), dy)
    for a, b in zip(got, want, strict=True):  # the weight's gradient, and dx beside it
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
def test_with_dropout_saves_one_output_sized_tensor_and_no_copy_or_mask_of_the_input(dora_route, route):
    dora_route(route)
    layer = lora.Linear(16, 12, r=2, lora_dropout=0.1, use_dora=True)
    x = torch.randn(40, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [t.data_ptr() for t in saved if t.shape == x.shape] == [x.data_ptr()]
    assert sum(t.shape == y.shape for t in saved) == 1  # W drop(x) + s B A drop(x), c's gradient factor
    assert not any(t.dtype == torch.bool for t in saved)
    y.sum().backward()
    assert x.grad is not None and layer.lora_magnitude.grad is not None


@pytest.mark.parametrize(("dtype", "rows", "p", "sparse"), [
    (torch.float32, 256, 0.1, True), (torch.float64, 300, 0.2, True), (torch.float32, 255, 0.1, False),
    (torch.float32, 512, 0.21, False), (torch.bfloat16, 512, 0.1, False), (torch.float16, 512, 0.1, False)])
def test_the_sparse_route_runs_in_float32_and_float64_from_256_rows_up_to_dropout_0_2(monkeypatch, dtype, rows, p,
                                                                                      sparse):
    # In 16 bits a CPU's GEMM is several times faster than float32's and the sparse products are not; with fewer
    # rows transposing W's tiles costs about what the GEMM saves, and above p = 0.2 the sparse products' work does
    # (`benchmarks/lora_linear.py --dora-routes` times both routes).
    calls = []
    forward, backward = lowrank._subtract_dropped_product, lowrank._dropped_positions_product
    monkeypatch.setattr(lowrank, "_subtract_dropped_product", lambda *a: calls.append("forward") or forward(*a))
    monkeypatch.setattr(lowrank, "_dropped_positions_product", lambda *a: calls.append("backward") or backward(*a))
    layer = lora.Linear(8, 6, r=2, lora_dropout=p, use_dora=True).to(dtype)
    layer(torch.randn(rows, 8, dtype=dtype, requires_grad=True)).float().sum().backward()
    assert calls == (["forward", "backward"] if sparse else [])


@pytest.mark.parametrize(("width", "rows", "tiles"), [(4096, 500, [128, 128, 128, 116]), (2**19 + 1, 20, [16, 4])],
                         ids=["4096-wide", "wider-than-a-tile"])
def test_the_sparse_product_tiles_wide_layers(monkeypatch, dora_route, width, rows, tiles):
    # Tiles of 2^19 elements of W's transpose, in rows rounded down to a power of two (the last tile shorter), and
    # at least 16 rows where those are wider than 2^19 elements.
    monkeypatch.setattr(lowrank, "new_seed", lambda: SEED)
    dora_route("sparse")
    calls = []
    tiles_of = lowrank._transposed_tiles
    monkeypatch.setattr(lowrank, "_transposed_tiles",
                        lambda weight: ((i, calls.append(t.shape) or t) for i, t in tiles_of(weight)))
    torch.manual_seed(0)
    layer = lora.Linear(width, rows, r=2, lora_dropout=0.2, use_dora=True).double()
    randomise(layer)
    x = torch.randn(2, width, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask.view(-1)[dropout_positions(SEED, x.numel(), 0.2, x.device)] = True
    got = layer(x)
    assert calls == [(width, size) for size in tiles]
    assert_same_in_float64(layer, x, got, explicit(layer, x, x.masked_fill(mask, 0) / 0.8))


def test_with_a_custom_dropout_module_equals_the_formula():
    class Half(nn.Module):
        def forward(self, x):
            return x * 0.5

    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4, lora_dropout=0.3, use_dora=True).double()
    randomise(layer)
    layer.lora_dropout = Half()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert_same_in_float64(layer, x, layer(x), explicit(layer, x, x * 0.5))


def test_with_dropout_has_peft_dora_statistics():
    # The same values through PEFT (its nn.Dropout) and ours (dropped positions), many draws each.
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = lora.Linear.from_module(copy.deepcopy(base), r=2, lora_alpha=4, lora_dropout=0.4, use_dora=True)
    randomise(layer)
    model, _ = peft_twin(layer, base, dropout=0.4)
    model.train()
    x = torch.randn(1, 6)
    with torch.no_grad():
        ours = torch.stack([layer(x) for _ in range(4000)])
        theirs = torch.stack([model(x) for _ in range(4000)])
    spread = theirs.std(0)
    assert (ours.mean(0) - theirs.mean(0)).abs().max() < 5 * (spread / math.sqrt(4000)).max()
    torch.testing.assert_close(ours.std(0), spread, rtol=0.08, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_is_the_formula_and_unmerge_restores_the_exact_bits(dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 24).to(dtype)
    layer = lora.MergedLinear.from_module(base, (8, 8, 8), r=2, lora_alpha=4, enable_lora=(True, False, True),
                                          use_dora=True)
    randomise(layer)
    original = layer.weight.detach().clone()
    x = torch.randn(3, 16, dtype=dtype)
    unmerged = layer(x)
    for _ in range(3):
        layer.eval()
        merged = layer(x)
        layer.train()
    assert torch.equal(layer.weight, original)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=tolerance, atol=tolerance)
    W = original.float()
    c = torch.ones(24)
    c[:8], c[16:] = (layer.lora_magnitude / layer.dora_norm()).detach().split(8)
    expected = c[:, None] * (W + lora_delta(layer))
    torch.testing.assert_close(layer.merged_weight_tensor().float(), expected.to(dtype).float(), rtol=0, atol=0)


def test_under_autocast_dora_computes_in_autocasts_dtype_with_float32_magnitude():
    torch.manual_seed(0)
    layer = lora.Linear(12, 10, r=3, use_dora=True)
    randomise(layer)
    x = torch.randn(4, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_magnitude.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), explicit(layer, x, x).detach(), rtol=3e-2, atol=3e-2)


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"^use_dora=True needs an adapter \(r > 0\)"):
        lora.Linear(4, 4, r=0, use_dora=True)
    with pytest.raises(TypeError, match=r"^use_dora must be True or False; got 'yes'"):
        lora.MergedLinear.from_module(nn.Linear(4, 6), (3, 3), r=2, use_dora="yes")
    with torch.device("meta"):
        base = nn.Linear(4, 4)
    layer = lora.Linear.from_module(base, r=2, use_dora=True)  # built on meta: no row norms to start from
    layer.load_state_dict({"weight": torch.eye(4), "bias": torch.zeros(4), "lora_A": torch.ones(2, 4),
                           "lora_B": torch.zeros(4, 2)}, strict=False, assign=True)
    with pytest.raises(RuntimeError, match=r"^Linear: DoRA's lora_magnitude is on the meta device: load it"):
        layer(torch.randn(2, 4))
    layer.lora_magnitude = nn.Parameter(torch.empty(4))
    layer.init_dora_magnitude()
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), x)


def tiny_phi3(**overrides):
    from lora.phi3 import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config.from_dict({"model_type": "phi3", "vocab_size": 101, "hidden_size": 32, "intermediate_size": 48,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                   "max_position_embeddings": 64, **overrides})
    return Phi3ForCausalLM(config)


def randomise_model(model):
    layers = [m for m in model.modules() if isinstance(m, lora.LoRALayer) and m.use_dora]
    for seed, module in enumerate(layers):
        randomise(module, seed=seed)


def test_patched_phi3_with_dora_merges_into_a_plain_checkpoint(tmp_path):
    from lora.phi3 import from_pretrained, merge_and_save, patch

    model = tiny_phi3()
    summary = patch(model, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "o_proj", "gate_up_proj"),
                    use_dora=True)
    magnitudes = [m for m in model.modules() if isinstance(m, lora.LoRALayer) and m.use_dora]
    assert magnitudes and all(m.lora_magnitude.requires_grad for m in magnitudes)
    assert summary.trainable == sum(m.lora_A.numel() + m.lora_B.numel() + m.lora_magnitude.numel() for m in magnitudes)
    randomise_model(model)
    difference = merge_and_save(model, tmp_path / "merged")
    assert difference < 1e-4
    plain = from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), rtol=0, atol=1e-4)


def test_dora_with_dropout_under_gradient_checkpointing_equals_without(monkeypatch):
    from lora.phi3 import patch

    grads = []
    for checkpointing in (False, True):
        model = tiny_phi3()
        patch(model, r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True)
        randomise_model(model)
        model.train()
        model.gradient_checkpointing = checkpointing
        ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(4))
        torch.manual_seed(7)  # the dropout positions come from torch's generator, which checkpointing restores
        model.loss(ids, ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.endswith("lora_magnitude") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_a_trainable_base_weight_gets_its_current_norm(fused):
    # A fused optimizer writes W without bumping its version counter, so nothing about a trainable W is cached.
    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4, use_dora=True)
    randomise(layer)
    layer.weight.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=fused)
    x = torch.randn(4, 8)
    for _ in range(3):
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        fresh = torch.linalg.norm(layer.weight + lora_delta(layer), dim=1).detach()
        torch.testing.assert_close(layer.dora_norm(), fresh, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(layer.dora_norm(), fresh, rtol=1e-6, atol=1e-6)
        want = (F.linear(x, layer.weight) + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()) \
            * (layer.lora_magnitude / fresh) + layer.bias
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_on_a_transposed_input_equals_dropout_on_its_contiguous_copy(dtype):
    torch.manual_seed(0)
    layer = lora.Linear(10, 6, r=2, lora_alpha=4, lora_dropout=0.3, use_dora=True).to(dtype).train()
    randomise(layer)
    x = torch.randn(10, 5, dtype=dtype).t()  # (5, 10), strides (1, 5)
    outputs = []
    for given in (x.contiguous(), x):
        torch.manual_seed(1)  # the same dropped positions
        outputs.append(layer(given))
    torch.testing.assert_close(outputs[1], outputs[0])  # the same positions: GEMM rounding differs at most


def test_the_norm_is_kept_while_nothing_changes_and_recomputed_when_anything_does():
    torch.manual_seed(0)
    layer = lora.Linear(12, 10, r=3, use_dora=True)
    randomise(layer)

    def fresh():
        return torch.linalg.norm(layer.weight + lora_delta(layer), dim=1).detach()

    with torch.no_grad():
        norm = layer.dora_norm()
        assert layer.dora_norm() is norm  # generation: one token at a time would pay the (out, r) product each time
    # A fused optimizer writes the parameters without bumping their version counters; the values still count.
    for optimizer in (torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1),
                      torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1, fused=True)):
        layer(torch.randn(4, 12)).square().sum().backward()
        optimizer.step()
        with torch.no_grad():
            torch.testing.assert_close(layer.dora_norm(), fresh(), rtol=1e-6, atol=1e-6)

    def scale_weight():
        with torch.no_grad():  # an in-place change bumps the version counter (one through .data would not)
            layer.weight.mul_(2)

    for change in (scale_weight, lambda: setattr(layer, "lora_B", nn.Parameter(layer.lora_B * 3))):
        change()
        with torch.no_grad():
            torch.testing.assert_close(layer.dora_norm(), fresh(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("adapters_on", [True, False])
def test_a_base_weight_trained_then_frozen_again_gets_its_current_norm(adapters_on):
    # the caches of a frozen W are dropped while it is trainable: a fused optimizer leaves its version as it was
    # (adapters off: no norm is computed while W is trainable, and the kept one must go all the same)
    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4, use_dora=True)
    randomise(layer)
    x = torch.randn(4, 8)
    with torch.no_grad():
        layer.dora_norm()  # kept for the frozen W
    layer.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([layer.weight], lr=0.1, fused=True)
    with contextlib.nullcontext() if adapters_on else lora.disable_adapters(layer):
        layer(x).square().sum().backward()
    optimizer.step()
    layer.weight.requires_grad_(False)
    fresh = torch.linalg.norm(layer.weight + lora_delta(layer), dim=1).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer.dora_norm(), fresh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.dora_norm(), fresh, rtol=1e-6, atol=1e-6)


def test_the_kept_norm_is_found_again_with_fan_in_fan_out():
    layer = lora.Linear(8, 6, r=2, lora_alpha=4, use_dora=True, fan_in_fan_out=True)
    randomise(layer)
    with torch.no_grad():
        assert layer.dora_norm() is layer.dora_norm()  # one (out, r) product, not one a generated token
