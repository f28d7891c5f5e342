"""Learning-rate schedules: linear warmup to the peak, then cosine, linear or constant decay to 0.

>>> factor = make_schedule("cosine", warmup=2, total=10)
>>> [round(factor(s), 3) for s in (0, 1, 2, 6, 9)]
[0.5, 1.0, 1.0, 0.5, 0.038]
>>> scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

__all__ = ["SCHEDULES", "make_schedule", "replan"]

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(kind: Literal["cosine", "linear", "constant"], warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor of step s (0-based): `(s + 1) / warmup` in the warmup, then `0.5 (1 + cos(pi p))`,
    `1 - p` or 1, with `p = (s - warmup) / (total - warmup)` the progress through the decay."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if not 0 <= warmup <= total:
        raise ValueError(f"warmup must be in [0, total={total}], got {warmup}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    return factor


def replan(scheduler: torch.optim.lr_scheduler.LambdaLR, factor: Callable[[int], float], step: int) -> float:
    """Continue a restored `LambdaLR` at `step` on another schedule `factor` (a run extended to more steps):
    each group's rate becomes its base rate times `factor(step)`; returns the first group's."""
    scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return scheduler.optimizer.param_groups[0]["lr"]
