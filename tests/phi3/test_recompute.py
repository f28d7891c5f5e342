"""What gradient checkpointing recomputes: the frozen GEMM of a layer's last projection is not redone.

Non-reentrant checkpointing stops a layer's recomputation as soon as every tensor its backward needs is back.
The output of `down_proj` is not among them, so its frozen GEMM (a fifth of the layer's GEMM work) must not
run again: for a frozen `nn.Linear` autograd saves W before the GEMM, and a LoRA layer must keep that order.
"""

import pytest
import torch
from phi3_tiny import TINY, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from lora.phi3 import Phi3ForCausalLM, patch

GEMMS = {"aten.mm.default", "aten.addmm.default", "aten.addmm_.default"}


class FrozenGemms(TorchDispatchMode):
    """Counts the GEMMs whose right operand is (a transpose of) one given weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.ptr, self.count = weight.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in GEMMS and any(isinstance(a, torch.Tensor) and a.layout == torch.strided
                                      and a.untyped_storage().data_ptr() == self.ptr for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("adapted", [False, True])
def test_the_last_projections_frozen_gemm_runs_once_in_backward(adapted, dropout):
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config()).requires_grad_(False)
    if adapted:
        patch(model, r=2, lora_alpha=4, lora_dropout=dropout)
    else:
        model.model.embed_tokens.register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    model.gradient_checkpointing = True
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    down = model.model.layers[1].mlp.down_proj.weight
    up = model.model.layers[1].mlp.gate_up_proj.weight
    with FrozenGemms(down) as forward_down:
        loss = model.loss(ids, ids)
    with FrozenGemms(down) as backward_down, FrozenGemms(up) as backward_up:
        loss.backward()
    assert forward_down.count == 1
    assert backward_down.count == 1  # dx only: the recomputation stopped before the frozen GEMM
    assert backward_up.count == 2  # gate_up's output is needed: recomputed, and its dx


def test_a_4bit_last_projection_is_dequantized_once_in_backward(hf_checkpoint, monkeypatch):
    # bitsandbytes dequantizes a 4-bit weight for each use; the recomputation must skip down_proj's as it skips
    # its GEMM, so backward dequantizes it once (for dx) and gate_up_proj twice (recomputed output, dx).
    pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
    from lora import lowrank
    from lora.phi3 import from_pretrained

    _, path = hf_checkpoint(hidden_size=64, intermediate_size=128, num_key_value_heads=2)
    model = from_pretrained(path, dtype=torch.float32, quantize="nf4")
    patch(model, r=2, lora_alpha=4, lora_dropout=0.1)
    model.gradient_checkpointing = True
    model.train()
    calls: list[int] = []
    real = lowrank._dequantized
    monkeypatch.setattr(lowrank, "_dequantized", lambda w, state, dtype: calls.append(w.data_ptr()) or real(w, state,
                                                                                                          dtype))
    down = model.model.layers[1].mlp.down_proj.weight.data_ptr()
    up = model.model.layers[1].mlp.gate_up_proj.weight.data_ptr()
    ids = torch.randint(3, TINY["vocab_size"], (2, 9))
    loss = model.loss(ids, ids)
    assert calls.count(down) == calls.count(up) == 1
    calls.clear()
    loss.backward()
    assert calls.count(down) == 1
    assert calls.count(up) == 2
