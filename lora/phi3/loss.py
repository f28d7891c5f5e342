"""Cross-entropy through the output head, chunk by chunk, so float32 logits for all tokens never exist.

For N tokens and a 32064-row head, full float32 logits and their gradient take `2 * N * 32064 * 4` bytes
(2 GB for N = 8192). Here at most one chunk of logits lives at a time: the forward computes each chunk's
loss and, when a gradient is needed, its gradient too (`softmax - onehot`); backward only scales the
stored gradients. Total work is one logits matmul and the two gradient matmuls, as with full logits.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy"]

IGNORE_INDEX = -100  # a label the loss skips (transformers' and PyTorch's convention)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over tokens of `logsumexp(h W^T) - (h W^T)[target]`, with logits in float32."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated in float32 over chunks, cast once at the end (bf16 sums of many chunks drift).
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # (n, hidden)
            y = targets[start : start + chunk_size]  # (n,)
            # Logits in the weight's dtype, then float32: what transformers' head + loss compute.
            logits = (h @ weight.T).float()  # (n, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, reusing the logits' memory
                grad[torch.arange(len(y), device=y.device), y] -= 1
                grad = grad.to(weight.dtype)
                if need_hidden:
                    grad_hidden[start : start + chunk_size] = grad @ weight
                if need_weight:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(
            grad_hidden if need_hidden else None, grad_weight.to(weight.dtype) if need_weight else None
        )
        return total

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_out.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_out.to(grad_weight.dtype),
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Cross-entropy of `logits = hidden @ weight.T` against `targets`, without materialising all logits.

    `hidden` `(N, H)`, `weight` `(V, H)`, `targets` `(N,)` (no ignored entries: select them out first).
    Equals `F.cross_entropy((hidden @ weight.T).float(), targets, reduction=reduction)`; a mean over
    N = 0 tokens is 0 (not NaN), so an all-masked micro-batch does not poison gradient accumulation.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    total = _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size)
    if reduction == "sum":
        return total
    return total / max(targets.numel(), 1)
