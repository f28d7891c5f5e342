"""The hand-written forward/backward against autograd, and the dropout mask's statistics."""

import math

import pytest
import torch

from lora.lowrank import _LowRankLinear, dropout_mask, dropout_threshold


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
@pytest.mark.parametrize("slices", [((0, 7),), ((0, 3), (5, 2)), ((3, 2), (5, 2))])
def test_gradcheck_against_autograd(p, fan_in_fan_out, slices):
    torch.manual_seed(0)
    n, d_in, d_out, r = 6, 5, 7, 2
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True)
    if fan_in_fan_out:
        W = W.detach().t().contiguous().requires_grad_()
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r * len(slices), d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(sum(s for _, s in slices), r, dtype=torch.float64, requires_grad=True)

    def fn(x, W, b, A, B):
        return _LowRankLinear.apply(x, W, b, A, B, 1.5, p, 1234, slices, fan_in_fan_out)

    assert torch.autograd.gradcheck(fn, (x, W, b, A, B))
    mask = dropout_mask(1234, x.shape, p, x.device) if p else None
    keep = dropout_threshold(p)[1]
    expected = reference(x, W, b, A, B, 1.5, mask, keep, slices, fan_in_fan_out)
    torch.testing.assert_close(fn(x, W, b, A, B), expected, rtol=1e-12, atol=1e-12)


def test_mask_replays_from_seed_and_differs_between_seeds():
    a = dropout_mask(7, (64, 33), 0.25, torch.device("cpu"))
    assert torch.equal(a, dropout_mask(7, (64, 33), 0.25, torch.device("cpu")))
    assert not torch.equal(a, dropout_mask(8, (64, 33), 0.25, torch.device("cpu")))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_rate_and_independence(p):
    n = 400_000
    mask = dropout_mask(99, (n,), p, torch.device("cpu")).double()
    dropped, keep = dropout_threshold(p)
    assert abs(keep - (1 - p)) < 2**-16
    # The rate: within 5 standard errors of p.
    se = math.sqrt(p * (1 - p) / n)
    assert abs(mask.mean().item() - p) < 5 * se
    # Independence: neighbours (the 4 lanes of one 64-bit draw, and across draws) are uncorrelated,
    # and each lane position alone has the right rate.
    for lag in (1, 2, 3, 4, 5):
        corr = torch.corrcoef(torch.stack([mask[:-lag], mask[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)
    for lane in range(4):
        assert abs(mask[lane::4].mean().item() - p) < 5 * se * 2
    # Pairs: P(both dropped) = p^2.
    both = (mask[0::2] * mask[1::2]).mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n / 2))
