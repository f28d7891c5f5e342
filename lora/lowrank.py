"""The hot path: a frozen linear layer plus low-rank adapters, forward and backward by hand.

For input ``x`` (N, in), frozen weight ``W`` (out, in), adapters ``A_j`` (r, in) and ``B_j`` (size_j, r)
for each adapted slice ``j`` of the output:

    y = x @ W.T + b,    y[:, slice_j] += scaling * (drop(x) @ A_j.T) @ B_j.T

``drop`` zeroes each element with probability ``p`` and scales the rest by ``1 / (1 - p)``.
Autograd on these ops would save a dropout mask and a dropped copy of ``x`` (two activation-sized
tensors). Here backward replays the mask from a seed instead, so the only tensors saved are ``x``
(which the caller holds anyway), the rank-r product ``drop(x) @ A.T`` and the parameters.
Every activation-sized product is computed in the input's dtype; adapter gradients are returned
in the adapters' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["dropout_mask", "dropout_threshold", "lowrank_linear"]

_BITS = 16
_LEVELS = 1 << _BITS


def dropout_threshold(p: float) -> tuple[int, float]:
    """The 16-bit drop threshold for rate ``p`` and the matching keep probability.

    ``p`` is rounded to a multiple of 2**-16 (an error below 8e-6); the rest are scaled by the exact
    inverse of the rounded keep probability, so the expectation is preserved exactly.
    """
    dropped_levels = round(p * _LEVELS)
    return dropped_levels - (_LEVELS >> 1), 1.0 - dropped_levels / _LEVELS


def dropout_mask(seed: int, shape: torch.Size | Sequence[int], p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask, True where an element is dropped, drawn from ``seed``.

    Each element takes its own 16 bits of one 64-bit draw: about 1.5 ns per element on a CPU,
    against 7-10 ns for ``torch.nn.functional.dropout``. The same seed gives the same mask.
    """
    numel = 1
    for size in shape:
        numel *= size
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # The full int64 range: torch's default range for int64 leaves the top bit at zero.
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=generator)
    threshold, _ = dropout_threshold(p)
    return (words.view(torch.int16)[:numel] < threshold).view(shape)


def _new_seed() -> int:
    # Drawn from torch's default CPU generator, so torch.manual_seed makes runs repeatable and
    # torch.utils.checkpoint (which restores that generator) replays the same mask.
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, slices, fan_in_fan_out):
        # x: (N, in); slices: ((out_offset, size), ...) of the adapted output columns, in B's row order
        dtype = x.dtype
        A = lora_A.to(dtype)
        B = lora_B.to(dtype)
        if fan_in_fan_out:
            y = x @ weight if bias is None else torch.addmm(bias, x, weight)
        else:
            y = torch.nn.functional.linear(x, weight, bias)
        if p > 0.0:
            _, keep = dropout_threshold(p)
            dropped = x.masked_fill(dropout_mask(seed, x.shape, p, x.device), 0)
            xa = dropped @ A.t()  # (N, r * len(slices))
            xa *= 1.0 / keep
            del dropped
        else:
            xa = x @ A.t()
        r = A.shape[0] // len(slices)
        row = 0
        for j, (offset, size) in enumerate(slices):
            y[:, offset : offset + size].addmm_(xa[:, j * r : (j + 1) * r], B[row : row + size].t(), alpha=scaling)
            row += size
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.slices, ctx.fan_in_fan_out = scaling, p, seed, slices, fan_in_fan_out
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        scaling, p, slices = ctx.scaling, ctx.p, ctx.slices
        dy = dy.contiguous()
        dtype = dy.dtype
        A = lora_A.to(dtype)
        B = lora_B.to(dtype)
        r = A.shape[0] // len(slices)
        keep = dropout_threshold(p)[1] if p > 0.0 else 1.0

        # G_j = scaling / keep * dy[:, slice_j] @ B_j, side by side: (N, r * len(slices))
        g_parts, dB_parts = [], []
        row = 0
        for j, (offset, size) in enumerate(slices):
            dy_j = dy[:, offset : offset + size]
            g_parts.append(dy_j @ B[row : row + size])
            dB_parts.append(dy_j.t() @ xa[:, j * r : (j + 1) * r])
            row += size
        g = g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts, dim=1)
        g *= scaling / keep
        dB = dB_parts[0] if len(dB_parts) == 1 else torch.cat(dB_parts, dim=0)
        dB = (dB * scaling).to(lora_B.dtype)

        dx = dweight = dbias = None
        if p > 0.0:
            mask = dropout_mask(ctx.seed, x.shape, p, x.device)
            dA = (g.t() @ x.masked_fill(mask, 0)).to(lora_A.dtype)
            if ctx.needs_input_grad[0]:
                dx = (g @ A).masked_fill_(mask, 0)
            del mask
        else:
            dA = (g.t() @ x).to(lora_A.dtype)
            if ctx.needs_input_grad[0]:
                dx = g @ A
        if dx is not None:
            # Accumulate the frozen layer's input gradient into the adapter's: one GEMM, no extra pass.
            dx.addmm_(dy, weight.t() if ctx.fan_in_fan_out else weight)
        if ctx.needs_input_grad[1]:
            dweight = x.t() @ dy if ctx.fan_in_fan_out else dy.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum(0)
        return dx, dweight, dbias, dA, dB, None, None, None, None, None


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    p: float = 0.0,
    slices: tuple[tuple[int, int], ...],
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``x @ W.T + b`` plus ``scaling * (drop(x) @ A_j.T) @ B_j.T`` added to each slice of the output.

    ``x`` may have any leading dimensions. ``p`` is the dropout rate (0 in eval mode).
    ``slices`` lists ``(offset, size)`` of the adapted output columns; ``lora_A`` stacks one (r, in)
    block per slice and ``lora_B`` one (size, r) block per slice, in the same order.
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    seed = _new_seed() if p > 0.0 else 0
    y = _LowRankLinear.apply(x2d, weight, bias, lora_A, lora_B, scaling, p, seed, slices, fan_in_fan_out)
    return y.view(*lead, y.shape[-1])
