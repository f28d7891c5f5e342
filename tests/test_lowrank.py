"""The hand-written forward/backward against autograd, and the dropout mask's statistics."""

import math

import pytest
import torch

from lora.lowrank import _apply, dropout_positions


def dropout_mask(seed, shape, p):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[dropout_positions(seed, mask.numel(), p, mask.device)] = True
    return mask


def reference(x, W, b, A, B, scaling, mask, keep, slices, fan_in_fan_out):
    y = x @ W if fan_in_fan_out else x @ W.t()
    if b is not None:
        y = y + b
    xd = x if mask is None else x.masked_fill(mask, 0) / keep
    r = A.shape[0] // len(slices)
    row = 0
    out = torch.zeros_like(y)
    for j, (offset, size) in enumerate(slices):
        d = (xd @ A[j * r : (j + 1) * r].t()) @ B[row : row + size].t() * scaling
        row += size
        pad = torch.nn.functional.pad(d, (offset, y.shape[1] - offset - size))
        out = out + pad
    return y + out


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("slices", [((0, 7),), ((0, 3), (5, 2)), ((3, 2), (5, 2)), ((0, 4), (4, 3))])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_against_autograd(p, fan_in_fan_out, slices, with_bias):
    torch.manual_seed(0)
    n, d_in, d_out, r = 6, 5, 7, 2
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True)
    if fan_in_fan_out:
        W = W.detach().t().contiguous().requires_grad_()
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if with_bias else None
    A = torch.randn(r * len(slices), d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(sum(s for _, s in slices), r, dtype=torch.float64, requires_grad=True)

    def fn(x, W, b, A, B):
        return _apply(x, W, b, A, B, 1.5, p, 1234, slices, fan_in_fan_out)

    assert torch.autograd.gradcheck(fn, (x, W, b, A, B))
    mask = dropout_mask(1234, x.shape, p) if p else None
    keep = 1 - p
    expected = reference(x, W, b, A, B, 1.5, mask, keep, slices, fan_in_fan_out)
    torch.testing.assert_close(fn(x, W, b, A, B), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n", "p"), [(0, 0.3), (1, 0.999999), (3, 1e-9), (5, 0.5)],
                         ids=["no-rows", "all-dropped", "none-dropped", "half"])
def test_the_dropout_correction_at_the_edges(n, p):
    # drop(x) @ A.T comes from x @ A.T minus the dropped elements' product: rows with no drops, with every element
    # dropped, and no rows at all take the same maths as the reference's masked copy.
    torch.manual_seed(0)
    x = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    out = _apply(x, W, None, A, B, 2.0, p, 77, ((0, 4),), False)
    expected = reference(x, W, None, A, B, 2.0, dropout_mask(77, x.shape, p), 1 - p, ((0, 4),), False)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, (x, A, B), dy), torch.autograd.grad(expected, (x, A, B), dy),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_nothing_reads_uninitialised_memory(monkeypatch, p):
    # Buffers written with beta = 0 are allocated uninitialised: without a bias, when the adapter slices cover
    # every output column, the output; in backward, G and dB. NaN garbage there must not leak through.
    torch.manual_seed(0)
    x, W = torch.randn(4, 5, requires_grad=True), torch.randn(6, 5)
    A, B = torch.randn(4, 5, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    slices = ((0, 3), (3, 3))
    mask = dropout_mask(99, x.shape, p) if p else None
    expected = reference(x, W, None, A, B, 0.5, mask, 1 - p, slices, False)
    dy = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, A, B), dy)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    out = _apply(x, W, None, A, B, 0.5, p, 99, slices, False)
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out, (x, A, B), dy), expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_positions_cover_small_and_edge_cases():
    assert dropout_positions(0, 0, 0.5, torch.device("cpu")).numel() == 0
    assert dropout_positions(0, 10, 1e-9, torch.device("cpu")).numel() == 0
    # Far more drops than one round of draws expects still ends at numel: every element dropped at p ~ 1.
    assert torch.equal(dropout_positions(3, 1000, 0.999999, torch.device("cpu")), torch.arange(1000))


def test_mask_replays_from_seed_and_differs_between_seeds():
    a = dropout_positions(7, 64 * 33, 0.25, torch.device("cpu"))
    assert torch.equal(a, dropout_positions(7, 64 * 33, 0.25, torch.device("cpu")))
    assert not torch.equal(a, dropout_positions(8, 64 * 33, 0.25, torch.device("cpu")))
    assert torch.all(a[1:] > a[:-1]) and a[0] >= 0 and a[-1] < 64 * 33


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_mask_rate_and_independence(p):
    n = 400_000
    mask = dropout_mask(99, (n,), p).double()
    # The rate: within 5 standard errors of p.
    se = math.sqrt(p * (1 - p) / n)
    assert abs(mask.mean().item() - p) < 5 * se
    # Independence: neighbours are uncorrelated, and every residue class mod 4 has the right rate.
    for lag in (1, 2, 3, 4, 5):
        corr = torch.corrcoef(torch.stack([mask[:-lag], mask[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)
    for lane in range(4):
        assert abs(mask[lane::4].mean().item() - p) < 5 * se * 2
    # Pairs: P(both dropped) = p^2.
    both = (mask[0::2] * mask[1::2]).mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n / 2))


def test_thread_count_is_restored_after_forward_backward_and_on_error(monkeypatch):
    import lora
    import lora.lowrank as lowrank

    before = torch.get_num_threads()
    layer = lora.Linear(8, 8, r=2, lora_dropout=0.3)
    x = torch.randn(4, 8, requires_grad=True)
    layer(x).sum().backward()
    assert torch.get_num_threads() == before

    def fail(*args):
        assert torch.get_num_threads() == 1  # inside the one-thread section
        raise RuntimeError("boom")

    monkeypatch.setattr(lowrank, "dropout_positions", fail)
    with pytest.raises(RuntimeError, match="boom"):
        layer(x)
    assert torch.get_num_threads() == before
