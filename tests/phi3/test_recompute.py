"""What gradient checkpointing recomputes: the frozen GEMM of a layer's last projection is not redone.

Non-reentrant checkpointing stops a layer's recomputation as soon as every tensor its backward needs is back.
The output of `down_proj` is not among them, so its frozen GEMM (a fifth of the layer's GEMM work) must not
run again: for a frozen `nn.Linear` autograd saves W before the GEMM, and a LoRA layer must keep that order.
"""

import pytest
import torch
from phi3_tiny import TINY, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from lora import lowrank
from lora.phi3 import Phi3ForCausalLM, patch

GEMMS = {"aten.mm.default", "aten.mm.out", "aten.addmm.default", "aten.addmm_.default"}


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
    # Selective recomputation keeps gate_up_proj's output: backward then dequantizes it once, for dx.
    model.checkpoint_keep = ["gate_up_proj"]
    loss = model.loss(ids, ids)
    calls.clear()
    loss.backward()
    assert calls.count(down) == calls.count(up) == 1


KEEPABLE = ("qkv_proj", "o_proj", "gate_up_proj")


def _step(keep, checkpointing, dtype, dropout=0.1, use_dora=False):
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config()).to(dtype).requires_grad_(False)
    patch(model, r=2, lora_alpha=4, lora_dropout=dropout, use_dora=use_dora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would hide a wrong adapter output
    model.gradient_checkpointing = checkpointing
    model.checkpoint_keep = keep
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # the same dropout draws in every run
    loss = model.loss(ids, ids)
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# DoRA with dropout in float32 from lora.lowrank.SPARSE_DROPPED_PRODUCT_MIN_ROWS rows: W drop(x) = (W x - W D) /
# (1 - p), one frozen GEMM fewer each way; below, a second GEMM. conftest's dora_route forces either on the tiny batch.
@pytest.mark.parametrize(("dtype", "use_dora", "dropout", "route"), [
    (torch.float32, False, 0.1, "gemm"), (torch.bfloat16, False, 0.1, "gemm"), (torch.float32, True, 0.1, "gemm"),
    (torch.float32, True, 0.1, "sparse"), (torch.bfloat16, True, 0.0, "gemm")])
def test_kept_outputs_give_the_same_loss_and_gradients_bit_for_bit(dora_route, dtype, use_dora, dropout, route):
    dora_route(route)
    _, plain_loss, plain = _step((), False, dtype, dropout, use_dora)
    _, full_loss, full = _step((), True, dtype, dropout, use_dora)
    _, kept_loss, kept = _step(KEEPABLE, True, dtype, dropout, use_dora)
    # A and B (and DoRA's magnitude) of every projection
    assert len(kept) == len(plain) == (3 if use_dora else 2) * 4 * TINY["num_hidden_layers"]
    assert torch.equal(kept_loss, plain_loss) and torch.equal(kept_loss, full_loss)
    for name, grad in kept.items():
        assert torch.equal(grad, full[name]) and torch.equal(grad, plain[name]), name


# Products with the frozen weight in backward: dx (DoRA with dropout: two, for W x and W drop(x), or one on the
# sparse route); recomputed, the forward's GEMMs again (one; DoRA's two, or one on the sparse route). DoRA's norm
# (its (out, r) product W A^T) is never recomputed: the first forward hands it over, kept output or not.
@pytest.mark.parametrize(("use_dora", "route", "kept_count", "recomputed_count"),
                         [(False, "gemm", 1, 2), (True, "gemm", 2, 4), (True, "sparse", 1, 2)])
def test_a_kept_projections_frozen_gemm_runs_once_in_backward(dora_route, use_dora, route, kept_count,
                                                               recomputed_count):
    dora_route(route)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config()).requires_grad_(False)
    patch(model, r=2, lora_alpha=4, lora_dropout=0.1, use_dora=use_dora)
    model.gradient_checkpointing = True
    model.checkpoint_keep = ["gate_up_proj"]
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    layer = model.model.layers[1]
    up, qkv = layer.mlp.gate_up_proj.weight, layer.self_attn.qkv_proj.weight
    loss = model.loss(ids, ids)
    with FrozenGemms(up) as backward_up, FrozenGemms(qkv) as backward_qkv:
        loss.backward()
    assert backward_up.count == kept_count  # the kept output stands in for the recomputed GEMMs
    assert backward_qkv.count == recomputed_count  # not kept


def test_an_output_changed_in_place_is_recomputed_not_put_back():
    # A kept output edited after the layer no longer holds the layer's output: the recomputation runs the GEMM.
    from torch.utils.checkpoint import checkpoint

    import lora
    from lora.lowrank import KeptOutputs

    torch.manual_seed(0)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4, merge_weights=False)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8, requires_grad=True)

    def block(x):
        y = layer(x)
        return y.mul_(3.0).tanh()

    expected = torch.autograd.grad(block(x).sum(), (x, layer.lora_A, layer.lora_B))
    out = checkpoint(block, x, use_reentrant=False, context_fn=lambda: KeptOutputs([layer]).contexts())
    with FrozenGemms(layer.weight) as backward:
        got = torch.autograd.grad(out.sum(), (x, layer.lora_A, layer.lora_B))
    assert backward.count == 2  # recomputed, and dx
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_checkpoint_keep_takes_projection_names_only():
    model = Phi3ForCausalLM(tiny_config())
    with pytest.raises(ValueError, match=r"\['down_proj'\] not among \['qkv_proj', 'o_proj', 'gate_up_proj'\] "
                                         r"\(the recomputation never reaches down_proj's frozen GEMM"):
        model.checkpoint_keep = ("qkv_proj", "down_proj")
    with pytest.raises(ValueError, match=r"\['q_proj'\] not among"):
        model.checkpoint_keep = ["q_proj"]
    with pytest.raises(TypeError, match="a sequence of projection names, got the string 'qkv_proj'"):
        model.checkpoint_keep = "qkv_proj"
    assert model.checkpoint_keep == ()
    model.checkpoint_keep = ["o_proj", "qkv_proj", "o_proj"]
    assert model.checkpoint_keep == model.model.checkpoint_keep == ("o_proj", "qkv_proj")
    model.checkpoint_keep = None
    assert model.checkpoint_keep == ()


def test_kept_outputs_in_transformers_checkpointing():
    # transformers hands gradient_checkpointing_kwargs to torch.utils.checkpoint: one KeptOutputs over the whole
    # model's kept projections serves every layer (each checkpointed call makes its own and touches its layer's).
    transformers = pytest.importorskip("transformers")
    from lora.lowrank import KeptOutputs

    def step(keep: bool):
        torch.manual_seed(0)
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY))
        patch(model, r=2, lora_alpha=4, lora_dropout=0.1)
        kept = [m for name, m in model.named_modules() if name.endswith(("qkv_proj", "gate_up_proj"))]
        kwargs = {"use_reentrant": False, **({"context_fn": lambda: KeptOutputs(kept).contexts()} if keep else {})}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
        model.train()
        ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        with FrozenGemms(model.model.layers[1].mlp.gate_up_proj.weight) as backward_up:
            loss.backward()
        return loss.detach(), backward_up.count, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (full_loss, full_count, full), (kept_loss, kept_count, kept) = step(False), step(True)
    assert (full_count, kept_count) == (2, 1)
    assert torch.equal(full_loss, kept_loss) and full.keys() == kept.keys()
    for name, grad in kept.items():
        assert torch.equal(grad, full[name]), name


def test_a_second_backward_recomputes_what_the_first_took():
    # Each kept output is put back once; a second backward through the retained graph recomputes the GEMM instead.
    model, _, _ = _step(KEEPABLE, True, torch.float32)
    model.zero_grad()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    loss = model.loss(ids, ids)
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with FrozenGemms(model.model.layers[1].mlp.gate_up_proj.weight) as second:
        loss.backward()
    assert second.count == 2  # recomputed, and dx
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, 2 * once[name], rtol=0, atol=1e-6, msg=name)


def test_a_module_called_twice_gets_its_own_outputs_back_in_every_backward():
    # The second call is the block's last saver: the recomputation stops inside it. Its kept output must not be
    # left over and handed to the first call by the next backward through the retained graph.
    from torch.utils.checkpoint import checkpoint

    import lora
    from lora.lowrank import KeptOutputs

    torch.manual_seed(0)
    layer = lora.Linear(8, 8, r=2, lora_alpha=4, merge_weights=False)
    torch.nn.init.normal_(layer.lora_B)
    x0 = torch.randn(5, 8)

    def grads(keep: bool):
        x = x0.clone().requires_grad_()
        options = {"context_fn": lambda: KeptOutputs([layer]).contexts()} if keep else {}
        loss = checkpoint(lambda v: layer(layer(v)), x, use_reentrant=False, **options).square().sum()
        first = torch.autograd.grad(loss, (x, layer.lora_A, layer.lora_B), retain_graph=True)
        return first, torch.autograd.grad(loss, (x, layer.lora_A, layer.lora_B))

    for full, kept in zip(grads(False), grads(True), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(full, kept, strict=True))


def test_keptoutputs_misuse_is_a_clear_error():
    from torch.utils.checkpoint import checkpoint

    import lora
    from lora.lowrank import KeptOutputs

    with pytest.raises(TypeError, match="KeptOutputs takes the layer modules whose outputs to keep, got 'qkv_proj'"):
        KeptOutputs(["qkv_proj"])
    layer = lora.Linear(4, 4, r=2, merge_weights=False)
    shared = KeptOutputs([layer])  # one instance for two checkpointed calls would mix up their outputs
    x = torch.randn(3, 4, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False, context_fn=shared.contexts)
    with pytest.raises(RuntimeError, match="KeptOutputs: one instance per checkpointed call"):
        checkpoint(layer, x, use_reentrant=False, context_fn=shared.contexts)


def test_the_recomputation_takes_the_rank_r_product_and_its_dropout_from_the_forward(monkeypatch):
    # A checkpointed forward hands drop(x) @ A.T (N x r) to its recomputation, which then runs neither x @ A.T nor
    # the dropout's correction; backward draws the positions again from the forward's seed.
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config()).requires_grad_(False)
    patch(model, r=2, lora_alpha=4, lora_dropout=0.1)
    model.gradient_checkpointing = True
    model.train()
    drawn, corrected = [], []
    positions, dropped = lowrank.dropout_positions, lowrank._dropped
    monkeypatch.setattr(lowrank, "dropout_positions", lambda *a: drawn.append(a[0]) or positions(*a))
    monkeypatch.setattr(lowrank, "_dropped", lambda *a: corrected.append(a) or dropped(*a))
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    A = model.model.layers[0].self_attn.o_proj.lora_A
    with FrozenGemms(A) as forward_a:
        loss = model.loss(ids, ids)
    with FrozenGemms(A) as backward_a:
        loss.backward()
    projections = 4 * TINY["num_hidden_layers"]
    assert forward_a.count == 1  # x @ A.T
    assert backward_a.count == 1  # g @ A for dx only: nothing recomputed
    assert len(corrected) == projections  # the first forward's
    assert len(drawn) == 2 * projections
    assert sorted(drawn[projections:]) == sorted(drawn[:projections])  # backward's seeds are the forward's


@pytest.mark.parametrize("keep", [(), ("gate_up_proj",)])
def test_a_compiled_checkpointed_step_equals_eager(keep):
    # torch.compile traces checkpoint only without a context_fn: compiled, the recomputation redoes the rank-r
    # products as before; with kept outputs each checkpointed layer runs eagerly, outside the graph, and still
    # skips the kept frozen GEMM. Loss and gradients are eager's either way.
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config()).requires_grad_(False)
    patch(model, r=2, lora_alpha=4, lora_dropout=0.1)
    model.gradient_checkpointing = True
    model.checkpoint_keep = keep
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    up = model.model.layers[1].mlp.gate_up_proj.weight
    results = []
    for loss_fn in (model.loss, torch.compile(model.loss, backend="aot_eager")):
        torch.manual_seed(3)  # the same dropout
        loss = loss_fn(ids, ids)
        with FrozenGemms(up) as backward_up:
            loss.backward()
        if keep:
            assert backward_up.count == 1  # dx only: the recomputation took the kept output
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (eager_loss, eager), (compiled_loss, compiled) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert eager.keys() == compiled.keys() and eager
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, msg=name)
