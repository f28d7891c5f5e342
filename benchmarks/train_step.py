"""One LoRA training step (forward + backward) of a 2-layer Phi-3 at Phi-3-mini's widths: ours against PEFT.

Model: hidden 3072, intermediate 8192, 32 heads, vocab 32064, 2 decoder layers, float32, one sequence of
256 tokens; LoRA r=16, alpha=32 on qkv_proj, o_proj, gate_up_proj, down_proj (PEFT's "all-linear"), with
dropout 0.05 (the recipe's) and 0. Rows:

- `floor`: our frozen model's forward + backward, with backward stopped where LoRA's gradients stop (the
  output of layer 0's qkv_proj, the first adapted projection): no adapter work at all;
- `floor (transformers)`: the same for transformers' Phi3ForCausalLM (same weights, SDPA attention);
- `ours`: `lora.phi3.patch` on our model, `model.loss` (chunked cross-entropy);
- `peft`: `get_peft_model` on transformers' Phi3ForCausalLM, `model(ids, labels=ids).loss`;
- `+ ckpt`: with gradient checkpointing (non-reentrant, per decoder layer), as the recipe trains. PEFT's is
  transformers' `gradient_checkpointing_enable`, which also makes the embedding output require grad, as PEFT's
  users get it (so that row also computes layer 0's input gradient); the rows without checkpointing drop that
  hook again.

Variants run interleaved, round after round, so the machine's noise hits them alike. `x floor` is the
median over rounds of the ratio to our floor's time in the same round, with its spread (25th-75th
percentile); `x peft` likewise against PEFT with the same dropout and checkpointing. `saved MB` is what
autograd keeps for backward after the forward (once per storage; parameters excluded; with checkpointing
the tensors saved inside the recomputed layers are not kept and not counted).

    python benchmarks/train_step.py            # full size (needs ~4 GB, a few minutes on 2 cores)
    python benchmarks/train_step.py --quick    # tiny widths, 2 rounds: checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from lora_linear import saved_bytes  # benchmarks/ is on sys.path when a script here runs
from torch import nn

import lora
from lora.phi3 import DEFAULT_TARGETS, Phi3Config, Phi3ForCausalLM, patch

FULL = {"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32}
QUICK = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
R, ALPHA = 16, 32


def build(widths: dict[str, int]) -> tuple[Phi3ForCausalLM, nn.Module, nn.Module, nn.Module]:
    """Our patched and frozen models, PEFT's and transformers' frozen one: one set of weights, shared."""
    import transformers
    from peft import LoraConfig, get_peft_model

    common = {**widths, "num_hidden_layers": 2, "num_key_value_heads": widths["num_attention_heads"],
              "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "pad_token_id": 0}
    torch.manual_seed(0)
    frozen = Phi3ForCausalLM(Phi3Config(**common)).requires_grad_(False)
    ours = Phi3ForCausalLM(Phi3Config(**common))
    ours.load_state_dict(frozen.state_dict(), assign=True)  # shares the tensors: no second copy
    patch(ours, r=R, lora_alpha=ALPHA, lora_dropout=0.05, targets=DEFAULT_TARGETS)
    hf_config = transformers.Phi3Config(**common, attn_implementation="sdpa", use_cache=False)
    with torch.device("meta"):
        hf_frozen = transformers.Phi3ForCausalLM(hf_config)
        hf = transformers.Phi3ForCausalLM(hf_config)
    for model in (hf_frozen, hf):
        model.load_state_dict(frozen.state_dict(), assign=True)
        model.requires_grad_(False)
        model.model.rotary_emb.inv_freq = model.model.rotary_emb.original_inv_freq = 1.0 / (
            10000.0 ** (torch.arange(0, common["hidden_size"] // common["num_attention_heads"], 2).float()
                        / (common["hidden_size"] // common["num_attention_heads"])))
    peft_model = get_peft_model(hf, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05,
                                               target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"))
    with torch.no_grad():  # equal, non-zero adapters in both, so both do the same work
        for name, layer in ours.named_modules():
            if isinstance(layer, lora.Linear):
                peft_layer = peft_model.base_model.model.get_submodule(name)
                layer.lora_B.normal_(0, 0.01)
                peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
                peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    return ours, frozen, peft_model, hf_frozen


def _require_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # Backward reaches this output and stops: what LoRA on the first projection needs, and nothing more.
    return output.detach().requires_grad_()


def set_dropout(ours: nn.Module, peft_model: nn.Module, p: float) -> None:
    """The same LoRA dropout in both models (an Identity at 0: no dropout work at all)."""
    for layer in ours.modules():
        if isinstance(layer, lora.Linear):
            layer.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
    for layer in peft_model.modules():
        if hasattr(layer, "lora_dropout") and isinstance(layer.lora_dropout, nn.ModuleDict):
            layer.lora_dropout["default"] = nn.Dropout(p) if p > 0 else nn.Identity()


def set_checkpointing(ours: Phi3ForCausalLM, peft_model: nn.Module, enabled: bool) -> None:
    """Gradient checkpointing per decoder layer, non-reentrant, in both models."""
    ours.gradient_checkpointing = enabled
    hf = peft_model.base_model.model
    if enabled:
        # transformers also hooks the embedding output to require grad here, as its users get it: PEFT then
        # computes layer 0's input gradient too, which ours does not need
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_disable()
        if hasattr(hf, "_require_grads_hook"):  # which disable leaves on a PEFT model: the rows without must not pay
            hf.disable_input_require_grads()


def main() -> None:
    """Build, check that both sides give the same loss, time the variants interleaved, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths and 2 rounds: checks that it runs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--seq", type=int, default=256, help="tokens in the one training sequence")
    args = parser.parse_args()
    widths, rounds, seq = (QUICK, 2, 32) if args.quick else (FULL, args.rounds, args.seq)
    # transformers 5 renames gradient_checkpointing_*; the old names are what PEFT and its users call today.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    ours, frozen, peft_model, hf_frozen = build(widths)
    ids = torch.randint(0, widths["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    set_dropout(ours, peft_model, 0.0)
    with torch.no_grad():  # the same model and adapters on both sides: the same loss
        torch.testing.assert_close(ours.loss(ids, ids), peft_model(input_ids=ids, labels=ids).loss,
                                   rtol=1e-4, atol=1e-4)
    ours.train()
    peft_model.train()
    frozen.model.layers[0].self_attn.qkv_proj.register_forward_hook(_require_grad)
    hf_frozen.model.layers[0].self_attn.qkv_proj.register_forward_hook(_require_grad)

    # (name, dropout, checkpointing, forward returning the loss)
    variants = [
        ("floor", None, False, lambda: frozen.loss(ids, ids)),
        ("floor (transformers)", None, False, lambda: hf_frozen(ids, labels=ids).loss),
        ("ours", 0.05, False, lambda: ours.loss(ids, ids)),
        ("peft", 0.05, False, lambda: peft_model(input_ids=ids, labels=ids).loss),
        ("ours", 0.0, False, lambda: ours.loss(ids, ids)),
        ("peft", 0.0, False, lambda: peft_model(input_ids=ids, labels=ids).loss),
        ("ours + ckpt", 0.05, True, lambda: ours.loss(ids, ids)),
        ("peft + ckpt", 0.05, True, lambda: peft_model(input_ids=ids, labels=ids).loss),
    ]
    params = [*ours.parameters(), *peft_model.parameters(), *frozen.parameters(), *hf_frozen.parameters()]
    times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    saved: dict[int, int] = {}
    for round_ in range(rounds + 1):  # round 0 warms up (allocator, kernels) and measures memory
        for i, (_, dropout, ckpt, forward) in enumerate(variants):
            if dropout is not None:
                set_dropout(ours, peft_model, dropout)
                set_checkpointing(ours, peft_model, ckpt)
            if round_ == 0:
                saved[i] = saved_bytes(forward, params)
            start = time.perf_counter()
            forward().backward()
            elapsed = time.perf_counter() - start
            for p in params:
                p.grad = None
            if round_ > 0:
                times[i].append(elapsed)

    def ratios(i: int, j: int) -> list[float]:
        return sorted(a / b for a, b in zip(times[i], times[j], strict=True))

    def spread(values: list[float]) -> str:
        if len(values) < 4:
            return f"{values[0]:.2f}-{values[-1]:.2f}"
        q = statistics.quantiles(values, n=4)
        return f"{q[0]:.2f}-{q[2]:.2f}"

    print(f"2 layers, hidden {widths['hidden_size']}, intermediate {widths['intermediate_size']}, "
          f"{widths['num_attention_heads']} heads, vocab {widths['vocab_size']}, seq {seq}, float32, r={R}, "
          f"alpha={ALPHA}; {rounds} interleaved rounds, {torch.get_num_threads()} threads\n")
    print("| variant | dropout | median ms | tokens/s | x floor | spread (IQR) | x peft | saved MB | x floor saved |")
    print("|---|---|---|---|---|---|---|---|---|")
    peft_of = {2: 3, 4: 5, 6: 7}
    for i, (name, dropout, _, _) in enumerate(variants):
        median = statistics.median(times[i])
        to_floor = ratios(i, 0)
        vs_peft = f"{statistics.median(ratios(i, peft_of[i])):.3f}" if i in peft_of else ""
        print(f"| {name} | {'' if dropout is None else dropout} | {1000 * median:.0f} | {seq / median:,.0f} | "
              f"{statistics.median(to_floor):.3f} | {spread(to_floor)} | {vs_peft} | {saved[i] / 2**20:.1f} | "
              f"{saved[i] / saved[0]:.2f} |")


if __name__ == "__main__":
    main()
