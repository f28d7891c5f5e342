"""bf16 LoRA keeps deltas below half an ulp of the output (the property behind benchmarks/bf16_fidelity.py),
and the full-size benchmarks' quick modes run, so they cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lora

ROOT = Path(__file__).resolve().parents[1]


class Passthrough(torch.nn.Module):
    """A dropout module of a user's own (here keeping everything): the layer's plain-autograd path."""

    def forward(self, x):
        return x


@pytest.mark.parametrize("custom_dropout", [False, True])
def test_a_bf16_layer_keeps_a_delta_below_half_an_ulp_of_its_output(custom_dropout):
    # Outputs near 96, where a bf16 ulp is 0.5, and a LoRA delta of 0.05: a tenth of an ulp. Rounding the
    # frozen output first and adding the delta after (PEFT's order) loses it in every element, so that
    # output is low by the delta on average; ours rounds the sum once and is unbiased against float64.
    torch.manual_seed(0)
    n, d, r = 4096, 64, 4
    layer = lora.Linear.from_module(torch.nn.Linear(d, d, bias=False).bfloat16(), r=r, lora_alpha=r)
    if custom_dropout:
        layer.lora_dropout = Passthrough()
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.weight.copy_(1.5 + 0.05 * torch.randn(d, d))
        layer.lora_A.fill_(1.0 / d)
        layer.lora_B.fill_(0.05 / r)
    layer.train()  # unmerged (a merged bf16 weight cannot hold the delta: docs/layers.md)
    x = (1.0 + 0.1 * torch.randn(n, d)).bfloat16()
    x64, w64 = x.double(), layer.weight.double()
    a64, b64 = layer.lora_A.double(), layer.lora_B.double()
    delta = layer.scaling * (x64 @ a64.t()) @ b64.t()
    reference = x64 @ w64.t() + delta
    with torch.no_grad():
        ours = layer(x)
        separate = F.linear(x, layer.weight) + layer.scaling * F.linear(F.linear(x.float(), layer.lora_A),
                                                                        layer.lora_B).bfloat16()
    assert ours.dtype == torch.bfloat16
    assert delta.mean().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(separate, F.linear(x, layer.weight))  # the delta vanished from PEFT's order
    assert (separate.double() - reference).mean().item() == pytest.approx(-0.05, rel=0.1)
    assert abs((ours.double() - reference).mean().item()) < 0.005  # a tenth of the delta at most
    assert (ours.double() - reference).abs().max().item() <= 0.5  # one ulp: one rounding of the sum


@pytest.mark.parametrize("change", ["delta", "magnitude"])
def test_a_bf16_dora_layer_keeps_a_sub_ulp_delta_but_not_a_sub_ulp_magnitude_change(change):
    # The exception docs/layers.md states: DoRA's LoRA part is summed with the frozen GEMM before its one rounding,
    # but the scaling by m / n rounds again, so a change of m / n of a tenth of an ulp is lost (as in PEFT's).
    torch.manual_seed(0)
    n, d, r = 4096, 64, 4
    layer = lora.Linear.from_module(torch.nn.Linear(d, d, bias=False).bfloat16(), r=r, lora_alpha=r, use_dora=True)
    with torch.no_grad():
        layer.weight.copy_(1.5 + 0.05 * torch.randn(d, d))
        layer.lora_A.fill_(1.0 / d)
        layer.lora_B.fill_(0.05 / r if change == "delta" else 0.0)
        adapted = layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        # m / n = 1 for the delta (only B moves the output); 1 + a tenth of an ulp at 96 for the magnitude
        layer.lora_magnitude.copy_(adapted.norm(dim=1) * (1.0 if change == "delta" else 1 + 0.05 / 96))
    layer.train()
    x = (1.0 + 0.1 * torch.randn(n, d)).bfloat16()
    reference = (x.double() @ adapted.t()) * (layer.lora_magnitude.double() / adapted.norm(dim=1))
    frozen = F.linear(x, layer.weight).double()
    with torch.no_grad():
        ours = layer(x).double()
    expected = (reference - x.double() @ layer.weight.double().t()).mean().item()
    assert expected == pytest.approx(0.05, rel=0.05)
    kept = (ours - frozen).mean().item() / expected
    assert kept == pytest.approx(1.0, abs=0.05) if change == "delta" else abs(kept) < 0.05


@pytest.mark.parametrize("script", ["fullsize.py", "bf16_fidelity.py"])
def test_quick_mode_runs(script):
    pytest.importorskip("peft")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("mode: ")
    if script == "fullsize.py":
        assert "float32 check (2 layers, dropout 0)" in out
        rows = [line.split() for line in out.splitlines() if line.startswith("  16 ")]
        assert [row[1] for row in rows] == ["True", "False"]  # seq 16 with and without checkpointing
        assert out.count("floor with checkpointing") == out.count("floor without checkpointing") == 1
    else:
        for run in ("float32", "peft float32", "ours bf16", "peft bf16", "ours autocast", "peft autocast"):
            assert any(line.startswith(run + " ") for line in out.splitlines()), run
        assert "ours: largest gap to float32" in out
