"""Swap a Phi-3 model's projections for LoRA layers, in place, without copying a weight.

Phi-3 fuses q, k and v into one `qkv_proj` and gate and up into one `gate_up_proj`. A target names
either a whole module (one `lora.Linear` over the fused weight: PEFT's layout and maths) or a
sub-projection (`q`, `k`, `v`, `gate`, `up`, also spelled `q_proj` ... `up_proj` as in Llama
recipes), which makes a `lora.MergedLinear` with one rank-r adapter per named slice: what PEFT cannot
express. It works on `lora.phi3.Phi3ForCausalLM` and on transformers' `Phi3ForCausalLM` alike (same
module names; head counts come from `model.config`).

>>> summary = patch(model, r=16, lora_alpha=32, targets=("q", "v", "o_proj"))  # doctest: +SKIP
>>> print(summary)                                                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora import quant
from lora.layers import (
    Linear,
    LoRALayer,
    MergedLinear,
    check_flags,
    check_hyperparameters,
    check_lora_shapes_on_load,
    lora_layers,
)

__all__ = [
    "DEFAULT_TARGETS", "MODULE_NAMES", "SLICE_NAMES", "ModuleSpec", "PatchSummary", "apply_specs", "is_patchable",
    "patch", "plan_modules", "resolve_targets", "split_sizes",
]

DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# module name -> (parent attribute in a decoder layer, names of its output slices)
MODULE_NAMES = {
    "qkv_proj": ("self_attn", ("q", "k", "v")),
    "o_proj": ("self_attn", ()),
    "gate_up_proj": ("mlp", ("gate", "up")),
    "down_proj": ("mlp", ()),
}
SLICE_NAMES = {"q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "gate": "gate_up_proj", "up": "gate_up_proj"}
_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": "gate", "up_proj": "up"}


@dataclass(frozen=True)
class ModuleSpec:
    """One module to adapt: its full name, its slices (None: one adapter over the whole module)."""

    name: str
    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    split_sizes: tuple[int, ...] | None = None
    enable_lora: tuple[bool, ...] | None = None
    use_dora: bool = False


@dataclass(frozen=True)
class PatchRow:
    module: str
    slices: str
    lora_A: tuple[int, ...]
    lora_B: tuple[int, ...]
    trainable: int


@dataclass(frozen=True)
class PatchSummary:
    """What `patch` did: one row per adapted module, and the parameter counts."""

    rows: tuple[PatchRow, ...]
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        # Modules that differ only by layer index share a line: 32 layers make 4 lines, not 128.
        groups: dict[tuple, list[int]] = {}
        for row in self.rows:
            parts = row.module.split(".")
            layer = next((int(p) for p in parts if p.isdigit()), -1)
            module = ".".join("N" if p.isdigit() else p for p in parts)
            groups.setdefault((module, row.slices, row.lora_A, row.lora_B, row.trainable), []).append(layer)
        lines = [f"{'module':<36} {'layers':>8} {'slices':<10} {'lora_A':>14} {'lora_B':>14} {'trainable':>12}"]
        for (module, slices, a, b, trainable), layers in groups.items():
            span = f"{min(layers)}-{max(layers)}" if len(layers) > 1 else str(layers[0])
            count = trainable * len(layers)
            lines.append(f"{module:<36} {span:>8} {slices:<10} {str(a):>14} {str(b):>14} {count:>12,}")
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.4f}%)")
        return "\n".join(lines)


def is_patchable(module: object) -> bool:
    """A plain `nn.Linear`, or bitsandbytes' 4-bit `Linear4bit` (QLoRA: ours or transformers' quantized load)."""
    return type(module) is nn.Linear or (isinstance(module, nn.Linear) and quant.is_quantized(module.weight))


def _config_value(config: object, name: str) -> int | None:
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return value if isinstance(value, int) else None


def split_sizes(model: nn.Module, module: str) -> tuple[int, ...]:
    """Output slice sizes of a fused module from `model.config`: (q, k, v) or (gate, up)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("the model has no .config; patch needs its head counts to split qkv_proj")
    if module == "gate_up_proj":
        inter = _config_value(config, "intermediate_size")
        return (inter, inter)
    heads = _config_value(config, "num_attention_heads")
    kv_heads = _config_value(config, "num_key_value_heads") or heads
    head_dim = _config_value(config, "head_dim") or _config_value(config, "hidden_size") // heads
    return (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"expected a Phi-3 causal LM with .model.layers (lora.phi3 or transformers' Phi3ForCausalLM); "
            f"got {type(model).__name__}"
        )
    return layers


def resolve_targets(targets: str | Iterable[str]) -> dict[str, tuple[str, ...] | None]:
    """`{module: None}` for whole-module targets, `{module: (slice, ...)}` for sub-projections."""
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    if not names:
        raise ValueError("targets is empty; name at least one of " + _valid_names())
    plan: dict[str, tuple[str, ...] | None] = {}
    for raw in names:
        name = _ALIASES.get(raw, raw)
        if name in MODULE_NAMES:
            if plan.get(name):
                raise ValueError(f"target {raw!r} and its slices {plan[name]} both named; pick one or the other")
            plan[name] = None
        elif name in SLICE_NAMES:
            module = SLICE_NAMES[name]
            if module in plan and plan[module] is None:
                raise ValueError(f"target {raw!r} and its module {module!r} both named; pick one or the other")
            plan[module] = tuple(dict.fromkeys((*(plan.get(module) or ()), name)))
        else:
            raise ValueError(f"unknown target {raw!r}; valid targets are " + _valid_names())
    return plan


def _valid_names() -> str:
    return ", ".join([*MODULE_NAMES, *SLICE_NAMES, *_ALIASES])


def plan_modules(
    model: nn.Module,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    targets: str | Iterable[str],
    use_rslora: bool,
    layers: Iterable[int] | None,
    use_dora: bool = False,
) -> list[ModuleSpec]:
    """The modules `patch` would adapt, checked against the model, without changing anything."""
    check_hyperparameters(r, lora_alpha, lora_dropout)
    check_flags(use_rslora=use_rslora, use_dora=use_dora)
    if r == 0:
        raise ValueError("r must be at least 1 to patch a model; got 0")
    plan = resolve_targets(targets)
    decoder = _decoder_layers(model)
    indices = range(len(decoder)) if layers is None else tuple(layers)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(decoder):
            raise ValueError(f"layers must hold layer indices in [0, {len(decoder)}); got {index!r}")
    specs = []
    for index in sorted(set(indices)):
        # in the model's module order, whatever the targets' order: the adapters are drawn in this order, and
        # lora.phi3.fsdp draws them in module order too (the same targets must start from the same values)
        for module in (m for m in MODULE_NAMES if m in plan):
            slices = plan[module]
            parent, slice_names = MODULE_NAMES[module]
            name = f"model.layers.{index}.{parent}.{module}"
            sizes = split_sizes(model, module) if slices else None
            enable = tuple(s in slices for s in slice_names) if slices else None
            specs.append(ModuleSpec(name, r, lora_alpha, lora_dropout, use_rslora, sizes, enable, use_dora))
    return specs


def apply_specs(model: nn.Module, specs: Sequence[ModuleSpec], adapter_dtype: torch.dtype | None) -> PatchSummary:
    """Swap each named `nn.Linear` for its LoRA layer; freeze everything but the adapters.

    Every module is checked and every new layer built before the first swap, so an error leaves the
    model as it was.
    """
    if any(lora_layers(model)):
        raise ValueError("the model is already patched (it has LoRA layers); load a fresh model to patch again")
    if not specs:
        raise ValueError("nothing to patch: no module matches the targets and layers given")
    modules = dict(model.named_modules())
    for spec in specs:
        module = modules.get(spec.name)
        if not is_patchable(module):
            raise TypeError(f"{spec.name}: expected an nn.Linear (or a bitsandbytes Linear4bit) to patch, found "
                            f"{type(module).__name__}")
        if spec.split_sizes is not None and sum(spec.split_sizes) != module.out_features:
            raise ValueError(f"{spec.name}: the config's slices {spec.split_sizes} do not add up to its "
                             f"{module.out_features} output features")
    built: list[tuple[nn.Module, str, LoRALayer]] = []
    for spec in specs:
        module = modules[spec.name]
        common = dict(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, merge_weights=False,
                      use_rslora=spec.use_rslora, use_dora=spec.use_dora, adapter_dtype=adapter_dtype)
        if spec.split_sizes is None:
            layer: LoRALayer = Linear.from_module(module, **common)
        else:
            layer = MergedLinear.from_module(module, spec.split_sizes, enable_lora=spec.enable_lora, **common)
        parent_name, _, attr = spec.name.rpartition(".")
        built.append((modules[parent_name], attr, layer))
    for param in model.parameters():
        param.requires_grad = False
    rows = []
    for parent, attr, layer in built:
        setattr(parent, attr, layer)
        for name in layer.adapter_parameter_names():
            getattr(layer, name).requires_grad = True
    check_lora_shapes_on_load(model)
    for spec, (_, _, layer) in zip(specs, built, strict=True):
        slices = "all"
        if spec.enable_lora is not None:
            names = MODULE_NAMES[spec.name.rsplit(".", 1)[1]][1]
            slices = ",".join(n for n, on in zip(names, spec.enable_lora, strict=True) if on)
        count = sum(getattr(layer, name).numel() for name in layer.adapter_parameter_names())
        rows.append(PatchRow(spec.name, slices, tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), count))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return PatchSummary(tuple(rows), trainable, total)


def patch(
    model: nn.Module,
    *,
    r: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.05,
    targets: str | Iterable[str] = DEFAULT_TARGETS,
    use_rslora: bool = False,
    use_dora: bool = False,
    layers: Iterable[int] | None = None,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> PatchSummary:
    """Put LoRA on `targets` of every decoder layer (or of `layers`), in place; return a summary.

    The base weights are shared, not copied; everything but the adapters is frozen; the layers use
    `merge_weights=False` (merge explicitly, for export). Default targets are the four projections,
    as PEFT's `target_modules="all-linear"`. `use_dora=True` makes every adapter DoRA (a trainable
    `lora_magnitude` per adapted row; docs/layers.md). Errors (unknown target, a module named with one of its
    slices, an already patched model, bad r/alpha/dropout) are raised before anything is swapped.

    >>> summary = patch(model, targets=("q", "v"))  # doctest: +SKIP
    >>> summary.trainable                           # doctest: +SKIP
    """
    specs = plan_modules(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, targets=targets,
                         use_rslora=use_rslora, layers=layers, use_dora=use_dora)
    return apply_specs(model, specs, adapter_dtype)
