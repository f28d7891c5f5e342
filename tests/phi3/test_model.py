"""Parity of `lora.phi3.Phi3ForCausalLM` with transformers' on the same checkpoint (float32 logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from phi3_tiny import TINY, longrope, tiny_config

from lora.phi3 import Phi3ForCausalLM, chunked_cross_entropy, from_pretrained
from lora.phi3.model import Phi3RMSNorm, document_ids_from_positions

pytest.importorskip("transformers")

TOL = 1e-5

CASES = {
    "mha": ({}, 24),
    "gqa_4to1": ({"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64}, 24),
    "longrope_short": ({**longrope(8, original=16, maximum=64)}, 16),
    "longrope_long": ({**longrope(8, original=16, maximum=64)}, 40),
    "sliding_window": ({"sliding_window": 6}, 24),
    "partial_rotary_tied": ({"partial_rotary_factor": 0.5, "tie_word_embeddings": True}, 24),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(hf_checkpoint, case: str) -> None:
    overrides, seq = CASES[case]
    hf, path = hf_checkpoint(**overrides)
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (2, seq))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == (2, seq, TINY["vocab_size"])
    assert (got - expected).abs().max().item() <= TOL


def test_longrope_switches_factors_at_original_max(hf_checkpoint) -> None:
    # At T = original the short factors apply, at T = original + 1 the long ones: prefixes then differ.
    hf, path = hf_checkpoint(**longrope(8, original=16, maximum=64))
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (1, 17))
    with torch.no_grad():
        short, long = model(ids[:, :16]), model(ids)
        assert (short - hf(ids[:, :16]).logits).abs().max().item() <= TOL
        assert (long - hf(ids).logits).abs().max().item() <= TOL
    assert (short - long[:, :16]).abs().max().item() > 1e-3  # a real difference, far above TOL


def test_right_padding_with_attention_mask(hf_checkpoint) -> None:
    hf, path = hf_checkpoint(num_key_value_heads=2)
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, TINY["pad_token_id"])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL
    # A padded row's real tokens equal the same row run alone, unpadded.
    with torch.no_grad():
        alone = model(ids[1:2, :7])
    assert (got[1, :7] - alone[0]).abs().max().item() <= TOL


def test_packed_documents_match_transformers_and_separate_runs(hf_checkpoint) -> None:
    # transformers blocks attention across documents when position_ids restart, no mask is given and it
    # keeps no cache (its training setup); document_ids derived from the positions ask for the same.
    hf, path = hf_checkpoint(sliding_window=5)
    model = from_pretrained(path)
    ids = torch.randint(3, TINY["vocab_size"], (1, 14))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        expected = hf(ids, position_ids=positions, use_cache=False).logits
        packed = model(ids, position_ids=positions, document_ids=document_ids_from_positions(positions))
        unpacked = model(ids, position_ids=positions)
        second = model(ids[:, 8:11])
    assert (packed - expected).abs().max().item() <= TOL
    assert (packed[:, 8:11] - second).abs().max().item() <= TOL
    assert (unpacked[:, 8:11] - second).abs().max().item() > 1e-3  # a real difference, far above TOL


def test_module_names_and_shapes_match_transformers(hf_checkpoint) -> None:
    hf, path = hf_checkpoint(num_key_value_heads=1)
    model = from_pretrained(path)
    ours = {name: tuple(p.shape) for name, p in model.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in hf.named_parameters()}
    assert ours == theirs
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert type(model.get_submodule(f"model.layers.1.{name}")) is torch.nn.Linear


def test_projections_are_called_as_modules() -> None:
    # The patcher swaps these Linears in place; a forward hook proves forward goes through the module call.
    model = Phi3ForCausalLM(tiny_config(num_key_value_heads=2))
    called = []
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        model.get_submodule(f"model.layers.0.{name}").register_forward_hook(lambda *_, name=name: called.append(name))
    model(torch.randint(0, TINY["vocab_size"], (1, 5)))
    assert sorted(called) == ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"]


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def test_loss_equals_full_logits_cross_entropy_and_transformers(hf_checkpoint) -> None:
    hf, path = hf_checkpoint(num_key_value_heads=2)
    model = from_pretrained(path)
    model.loss_chunk_size = 7  # several chunks, the last one partial
    ids = torch.randint(3, TINY["vocab_size"], (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 10:] = -100
    loss = model.loss(ids, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = _reference_loss(model(ids), labels)
    reference.backward()
    assert abs(loss.item() - reference.item()) <= 1e-6
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6, rtol=1e-5), name
    with torch.no_grad():
        assert abs(hf(ids, labels=labels).loss.item() - loss.item()) <= 1e-5


def test_loss_tied_head_and_sum_reduction() -> None:
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config(tie_word_embeddings=True))
    model.loss_chunk_size = 5
    ids = torch.randint(3, TINY["vocab_size"], (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    total = model.loss(ids, labels, reduction="sum")
    total.backward()
    grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    logits = model(ids)
    count = (labels[:, 1:] != -100).sum()
    reference = _reference_loss(logits, labels) * count
    reference.backward()
    assert abs(total.item() - reference.item()) <= 1e-4
    assert torch.allclose(grad, model.model.embed_tokens.weight.grad, atol=1e-6)


def test_loss_all_ignored_is_zero() -> None:
    model = Phi3ForCausalLM(tiny_config())
    ids = torch.randint(3, TINY["vocab_size"], (1, 6))
    loss = model.loss(ids, torch.full_like(ids, -100))
    assert loss.item() == 0.0
    loss.backward()


def test_chunked_cross_entropy_bf16_matches_full_logits() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy((hidden @ weight.T).float(), targets)
    reference.backward()
    assert abs(loss.item() - reference.item()) <= 1e-5
    assert torch.allclose(grads[0].float(), hidden.grad.float(), atol=1e-2)
    assert torch.allclose(grads[1].float(), weight.grad.float(), atol=1e-2)


def _rmsnorm_by_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' Phi3RMSNorm.forward, op for op
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_transformers_bit_for_bit_and_its_gradients_are_autograds(dtype) -> None:
    torch.manual_seed(0)
    norm = Phi3RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = (torch.randn(2, 7, 64) * 3).to(dtype).requires_grad_()
    dy = torch.randn(2, 7, 64).to(dtype)
    got = norm(x)
    before = x.detach().clone()
    dx, dweight = torch.autograd.grad(got, (x, norm.weight), dy)
    assert torch.equal(x, before)  # backward leaves its saved input as it was
    expected = _rmsnorm_by_autograd(x, norm.weight, 1e-5)
    dx_ref, dweight_ref = torch.autograd.grad(expected, (x, norm.weight), dy)
    assert got.dtype == dtype and torch.equal(got, expected)
    # the same maths in another order: float32 rounding apart, then one rounding to the dtype (bf16: a few ulps of
    # the largest element, since each is a float32 sum rounded once)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for value, reference in ((dx, dx_ref), (dweight, dweight_ref)):
        assert value.dtype == dtype
        assert (value.float() - reference.float()).abs().max() <= tol * reference.float().abs().max()


def test_rmsnorm_saves_its_input_and_one_float_per_row() -> None:
    # not float32 copies of the input (each twice its bytes in bf16): those set a checkpointed layer's peak memory
    x = torch.randn(3, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    norm = Phi3RMSNorm(64).to(torch.bfloat16).requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * 2 + 64 * 2 + 3 * 16 * 4


def test_rmsnorm_refuses_a_second_derivative() -> None:
    x = torch.randn(2, 8, dtype=torch.float32, requires_grad=True)
    y = Phi3RMSNorm(8)(x)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)  # dy = 2y depends on x
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        dx.sum().backward()


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config(num_key_value_heads=2, sliding_window=4))
    ids = torch.randint(3, TINY["vocab_size"], (2, 10))
    model.loss(ids, ids).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    assert model.model.gradient_checkpointing
    calls = []
    layer = model.model.layers[0]
    forward = layer.forward
    # Count forward runs directly: checkpoint's recomputation does not fire module hooks.
    layer.forward = lambda *args: calls.append(1) or forward(*args)
    model.loss(ids, ids).backward()
    assert len(calls) == 2  # forward, then the recomputation in backward
    for name, p in model.named_parameters():
        assert torch.allclose(plain[name], p.grad, atol=1e-6), name


def test_bad_forward_arguments() -> None:
    model = Phi3ForCausalLM(tiny_config())
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, past \+ new tokens\)"):
        model(ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"document_ids must have the shape of input_ids \(2, 4\), got \(2, 3\)"):
        model(ids, document_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model.loss(ids, ids[:, :3])
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        model.loss(ids, ids, reduction="none")
