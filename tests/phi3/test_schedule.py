"""lora.phi3.schedule: warmup, then cosine, linear or constant decay; re-planning a resumed run."""

from __future__ import annotations

import math

import pytest
import torch

from lora.phi3.schedule import make_schedule, replan


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_the_peak(kind):
    factor = make_schedule(kind, warmup=4, total=10)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0  # the first step after the warmup is at the peak


def test_decays():
    cosine, linear, constant = (make_schedule(kind, warmup=2, total=10) for kind in ("cosine", "linear", "constant"))
    for s in range(2, 10):
        progress = (s - 2) / 8
        assert cosine(s) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-15)
        assert linear(s) == pytest.approx(1 - progress, abs=1e-15)
        assert constant(s) == 1.0
    assert cosine(6) == pytest.approx(0.5) and linear(9) == pytest.approx(1 / 8)


def test_no_warmup_and_a_single_step():
    assert make_schedule("cosine", warmup=0, total=5)(0) == 1.0
    assert make_schedule("linear", warmup=0, total=1)(0) == 1.0
    assert make_schedule("cosine", warmup=1, total=1)(0) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule must be one of cosine, linear, constant, got 'step'"):
        make_schedule("step", warmup=0, total=4)
    with pytest.raises(ValueError, match=r"warmup must be in \[0, total=4\], got 5"):
        make_schedule("cosine", warmup=5, total=4)


def test_the_number_of_steps_matches_lambdalr():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    factor = make_schedule("cosine", warmup=2, total=6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [2.0 * factor(s) for s in range(6)]


def test_replan_continues_a_restored_scheduler_on_the_longer_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule("linear", warmup=0, total=4))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    longer = make_schedule("linear", warmup=0, total=8)
    assert replan(scheduler, longer, 2) == 0.75 == optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [longer(3)]
