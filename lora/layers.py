"""LoRA layers with loralib 0.1.2's names, arguments, defaults, parameter names and shapes.

Each layer *is* the torch layer it extends (`Linear` is an `nn.Linear`), so a base checkpoint's
`weight`/`bias` keys load unchanged and only `lora_A`/`lora_B` are new. The adapted weight is

    W' = W + scaling * B @ A,    scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

defined once per layer type in `delta_weight()`; merge, unmerge, `merged_state_dict` and the
tests all use it.

Merging never writes the frozen weight. `merge()` keeps the merged weight in a separate,
non-persistent buffer that forward uses instead, so unmerging restores the original bits exactly in
every dtype, `state_dict()` always holds the unmerged base weight, and a merged state dict cannot
double-apply the delta when it is loaded. The price: one weight-sized tensor (in the weight's dtype)
per merged layer while it is merged. `unmerge()` frees it.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import lowrank, quant
from .lowrank import autocast_enabled, compute_dtype, lowrank_linear, no_autocast
from .slices import LoRASlice, slice_layout

__all__ = [
    "LoRALayer",
    "Linear",
    "Embedding",
    "MergedLinear",
    "ConvLoRA",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "check_flags",
    "check_hyperparameters",
    "check_lora_shapes",
    "check_lora_shapes_on_load",
    "check_state_dict",
    "lora_alpha_for",
    "lora_layers",
    "lora_scaling",
    "refuse_quantized_merge",
]


def lora_scaling(lora_alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """The factor on `B @ A`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (Kalajdzievski, 2023).

    >>> lora_scaling(32, 16), lora_scaling(32, 16, use_rslora=True)
    (2.0, 8.0)
    """
    return lora_alpha / _rank_divisor(r, use_rslora)


def lora_alpha_for(scaling: float, r: int, *, use_rslora: bool = False) -> float:
    """The `lora_alpha` whose `lora_scaling` at rank `r` is `scaling` (PEFT's per-module `alpha_pattern`)."""
    return scaling * _rank_divisor(r, use_rslora)


def _rank_divisor(r: int, use_rslora: bool) -> float:
    return math.sqrt(r) if use_rslora else r


def check_hyperparameters(r: Any, lora_alpha: Any, lora_dropout: Any) -> None:
    """Raise `TypeError`/`ValueError` unless `r`, `lora_alpha` and `lora_dropout` are valid.

    Any integer or real type is accepted (numpy's too, as loralib does); `bool` is not.
    """
    if isinstance(r, (bool, np.bool_)) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be a non-negative int (0 means no LoRA); got {r!r} of type {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be a non-negative int (0 means no LoRA); got {r}")
    if isinstance(lora_alpha, (bool, np.bool_)) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"lora_alpha must be a positive number; got {lora_alpha!r} of type {type(lora_alpha).__name__}")
    if not lora_alpha > 0 or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a positive, finite number; got {lora_alpha}")
    if isinstance(lora_dropout, (bool, np.bool_)) or not isinstance(lora_dropout, numbers.Real):
        raise TypeError(f"lora_dropout must be a float in [0, 1); got {lora_dropout!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1); got {lora_dropout}")


def check_flags(**flags: Any) -> None:
    """Raise `TypeError` unless each flag is a bool (numpy's too): the string `"false"` is truthy."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False; got {value!r} of type {type(value).__name__}")


def _adapter_dtype(weight: torch.Tensor, adapter_dtype: torch.dtype | None) -> torch.dtype:
    # Adapters train in float32 over a 16-bit base: their updates are far below bf16's resolution.
    if adapter_dtype is not None:
        if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, "
                            f"...) or None; got {adapter_dtype!r}")
        return adapter_dtype
    # ... and over a 4-bit base too: never in the packed dtype (uint8), whatever the weight computes in.
    if weight.dtype in (torch.bfloat16, torch.float16) or quant.is_quantized(weight):
        return torch.float32
    return weight.dtype


class _Hyper(NamedTuple):
    """A layer's LoRA hyperparameters as its constructor and `from_module` take them (checked by `LoRALayer`)."""

    r: Any
    lora_alpha: Any
    lora_dropout: Any
    merge_weights: Any
    use_rslora: Any


class LoRALayer:
    """The LoRA state shared by every layer: `r`, `lora_alpha`, `scaling`, dropout, merging.

    `LoRALayer(r, lora_alpha, lora_dropout, merge_weights)` is loralib's signature; subclasses
    also call it with `use_rslora`.
    """

    r: int
    lora_alpha: float
    scaling: float
    merged: bool
    merge_weights: bool

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool, *, use_rslora: bool = False
                ) -> None:
        check_hyperparameters(r, lora_alpha, lora_dropout)
        check_flags(use_rslora=use_rslora, merge_weights=merge_weights)
        r = int(r)
        use_rslora, merge_weights = bool(use_rslora), bool(merge_weights)
        # Python numbers from numpy's: they go into JSON metadata and into torch ops as scalars
        lora_alpha = int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha)
        lora_dropout = float(lora_dropout)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        if r > 0:
            self.scaling = lora_scaling(lora_alpha, r, use_rslora=use_rslora)
        # A real module, not loralib's lambda: layers pickle, deep-copy and work under DDP.
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merge_weights = merge_weights
        self.merged = False
        self.adapters_disabled = False
        self.use_dora = False  # Linear and MergedLinear set it, with a lora_magnitude
        self.register_buffer("merged_weight", None, persistent=False)

    # -- the delta, defined once per layer type ---------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A` in float32 (float64 for a float64 weight), shaped like `self.weight`.

        Computed with autocast off, so a merge or a conv forward inside `torch.autocast` gets the same
        float32 delta as outside it.
        """
        with no_autocast(self.weight.device):
            return self._delta_weight()

    # -- building: what every kind shares; each states its adapter shapes and its own checks ----------

    def _adapter_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError(f"{type(self).__name__} does not define the shapes of lora_A and lora_B")

    def _attach(self, adapter_dtype: torch.dtype | None, attributes: Mapping[str, Any]) -> None:
        # The kind's own attributes, then zero adapters of its shapes (r > 0) in the adapter dtype.
        for name, value in attributes.items():
            setattr(self, name, value)
        self._init_layout()
        if self.r > 0:
            a_shape, b_shape = self._adapter_shapes()
            _init_adapters(self, a_shape, b_shape, _adapter_dtype(self.weight, adapter_dtype))

    def _init_layout(self) -> None:
        """Derive what the adapter shapes need from the kind's attributes (`Linear`: its `lora_slices`)."""

    def _construct(self, base_init: Any, hyper: _Hyper, adapter_dtype: torch.dtype | None, **attributes: Any) -> None:
        """The constructors' path: `base_init()` builds the torch layer, then the LoRA state and adapters, then
        `reset_parameters()` draws base and adapters in loralib's order."""
        base_init()
        LoRALayer.__init__(self, *hyper[:4], use_rslora=hyper.use_rslora)
        self._attach(adapter_dtype, attributes)
        self.reset_parameters()

    @classmethod
    def _wrap(cls, module: nn.Module, hyper: _Hyper, adapter_dtype: torch.dtype | None, **attributes: Any) -> Any:
        """The `from_module` path: a `cls` sharing `module`'s Parameters (`_adopt`), with adapters at their init."""
        layer = _adopt(cls, module, *hyper)
        layer._attach(adapter_dtype, attributes)
        layer.reset_lora_parameters()
        return layer

    def _delta_weight(self) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} does not define delta_weight(): a LoRALayer subclass must return "
            "scaling * B @ A shaped like its weight (from _delta_weight()) before it can be merged"
        )

    def _delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    @property
    def has_lora(self) -> bool:
        return self._parameters.get("lora_A") is not None

    def adapter_parameter_names(self) -> tuple[str, ...]:
        """The names of the parameters that train and go into adapter files: `lora_A`, `lora_B` (and DoRA's
        `lora_magnitude`); none without an adapter."""
        if not self.has_lora:
            return ()
        return ("lora_A", "lora_B", "lora_magnitude") if self.use_dora else ("lora_A", "lora_B")

    @property
    def dropout_rate(self) -> float:
        """The adapters' dropout probability, `lora_dropout` (0.0 without dropout), whatever the mode."""
        dropout = self.lora_dropout
        return dropout.p if isinstance(dropout, nn.Dropout) else 0.0

    def _lora_dropout_p(self) -> float:
        # forward's rate (0 in eval mode), inline: it runs on every call
        dropout = self.lora_dropout
        return dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0

    # -- merging ----------------------------------------------------------------------------------

    def merged_weight_tensor(self) -> torch.Tensor:
        """The merged weight `W + delta`, computed in float32 and returned in the weight's dtype.

        Over a 4-bit base it is `dequantize(W4) + delta` in the dtype `W4` dequantizes to (bf16 or
        float32): the weights the adapters were trained against, not a 4-bit rounding of the sum.
        """
        weight = self.weight
        if quant.is_quantized(weight):
            with torch.no_grad():
                base = quant.dequantize(weight)
                if not self.has_lora:
                    return base
                delta = self.delta_weight()
                return (base.to(delta.dtype) + delta).to(base.dtype)
        if not self.has_lora:
            return weight.detach()
        with torch.no_grad():
            delta = self.delta_weight()
            return (weight.to(delta.dtype) + delta).to(weight.dtype)

    def merge(self) -> None:
        """Use `W + delta` in forward (recomputed from the current adapters). Idempotent.

        Refused (`lora.quant.QuantizedMergeError`) over a 4-bit base: see `refuse_quantized_merge`.
        """
        refuse_quantized_merge(self, "merge()")
        if self.has_lora:
            # An ordinary tensor even when merged inside inference_mode (an @inference_mode eval or generate calling
            # eval()): an inference tensor could not be saved for a later forward's backward
            with torch.inference_mode(False), torch.no_grad():
                self.merged_weight = self.merged_weight_tensor()
        self.merged = True

    def unmerge(self) -> None:
        """Go back to the separate base + adapter forward. The base weight was never written."""
        self.merged_weight = None
        self.merged = False

    def train(self, mode: bool = True):
        """loralib's behaviour with `merge_weights=True`: `eval()` merges, `train()` unmerges."""
        super().train(mode)
        if self.merge_weights:
            if mode and self.merged:
                self.unmerge()
            elif not mode and not self.merged:
                self.merge()
        return self

    def _effective_weight(self) -> torch.Tensor:
        if self.merged and self.merged_weight is not None and not self.adapters_disabled:
            return self.merged_weight
        return self.weight

    def _uses_lora_path(self) -> bool:
        return self.has_lora and not self.merged and not self.adapters_disabled

    # -- loading ----------------------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Before torch copies anything into this layer.
        check_state_dict(self, state_dict, prefix, strict=_requested_strict())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # New adapters or a new base must reach the merged weight (loralib silently ignores them).
        if self.merged:
            self.merge()

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.r > 0:
            text += f", r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.dropout_rate}"
            if self.use_rslora:
                text += ", use_rslora=True"
            if self.use_dora:
                text += ", use_dora=True"
        return text


def refuse_quantized_merge(layer: LoRALayer, what: str) -> None:
    """Raise `lora.quant.QuantizedMergeError` (naming `what`) if `layer`'s base weight is 4-bit.

    W + delta has no 4-bit form equal to it: quantizing it again would move every weight by up to half a
    4-bit step (the model would no longer be the one the adapters were trained on), and holding it in bf16
    beside the packed weight would cost 4x the base. A merged model is written instead, in bf16 or float32.
    """
    if quant.is_quantized(getattr(layer, "weight", None)):
        raise quant.QuantizedMergeError(
            f"{type(layer).__name__}: {what} over a 4-bit (bitsandbytes) base weight is not supported: the merged "
            "weight has no 4-bit form that equals dequantize(W4) + delta. Keep the adapters separate, or write a "
            "merged bf16/float32 model with lora.phi3.merge_and_save (or lora.merged_state_dict)")


def lora_layers(
    model: nn.Module, *, adapted_only: bool = False, prefix: str = "", remove_duplicate: bool = True
) -> Iterator[tuple[str, LoRALayer]]:
    """`(name, layer)` for each `LoRALayer` in `model`, as `model.named_modules` names them; with
    `adapted_only`, only those with an adapter (`r > 0`).

    >>> [name for name, _ in lora_layers(nn.Sequential(Linear(4, 4, r=2), nn.ReLU(), Linear(4, 4)))]
    ['0', '2']
    """
    for name, module in model.named_modules(prefix=prefix, remove_duplicate=remove_duplicate):
        if isinstance(module, LoRALayer) and (module.has_lora or not adapted_only):
            yield name, module


def check_lora_shapes(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Raise `ValueError` naming the first `lora_A`/`lora_B` in `state_dict` whose shape differs
    from the one in `model` (keys under `prefix`). Keys the model lacks are left to `load_state_dict`.
    """
    for name, module in lora_layers(model, prefix=prefix.rstrip("."), remove_duplicate=False):
        for param_name in ("lora_A", "lora_B", "lora_magnitude"):
            param = module._parameters.get(param_name)
            key = f"{name}.{param_name}" if name else param_name
            if param is not None and key in state_dict and tuple(state_dict[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"shape mismatch for {key}: this layer expects {tuple(param.shape)} "
                    f"(r={module.r}), the state dict has {tuple(state_dict[key].shape)}"
                )


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "", *, strict: bool = True) -> None:
    """Raise unless `model.load_state_dict(state_dict, strict=strict)` would load completely.

    Every tensor's shape must match (LoRA or not; a `ValueError` naming the first key), and with `strict`
    no key under `prefix` may be missing or unexpected (a `RuntimeError`, as torch's). Without this check
    torch copies module by module and raises only at the end, leaving the model half-loaded.

    A model with load hooks of its own (a pre-hook renaming keys, a post-hook forgiving missing ones, lazy
    modules) is left to torch's loading as it is: what those hooks do cannot be foreseen here. A BatchNorm's
    `num_batches_tracked` is not missing where torch fills it in (a state dict without version metadata).
    """
    if _has_own_load_hooks(model):
        return
    check_lora_shapes(model, state_dict, prefix)
    expected = {prefix + name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    optional = set()  # keys torch fills in when absent
    metadata = getattr(state_dict, "_metadata", None) or {}
    for name, module in model.named_modules(prefix=prefix.rstrip("."), remove_duplicate=False):
        version = metadata.get(name, {}).get("version")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (version is None or version < 2):
            optional.add(f"{name}.num_batches_tracked" if name else "num_batches_tracked")
    given = {key: key for key in state_dict if key.startswith(prefix)}
    for name, module in model.named_modules(prefix=prefix.rstrip("."), remove_duplicate=False):
        if isinstance(module, ConvLoRA):  # loralib 0.1.2's `conv.weight`, accepted on load
            head = f"{name}." if name else ""
            for leaf in ("weight", "bias"):
                if head + "conv." + leaf in given and head + leaf not in given:
                    given[head + leaf] = given.pop(head + "conv." + leaf)
    for key in sorted(set(given) & set(expected)):
        have, want = getattr(state_dict[given[key]], "shape", None), expected[key].shape
        if have is not None and tuple(have) != tuple(want) and not (tuple(want) == () and tuple(have) == (1,)):
            raise ValueError(f"shape mismatch for {given[key]}: the model's is {tuple(want)}, the state dict "
                             f"has {tuple(have)}; nothing was loaded")
    if strict:
        missing = sorted(set(expected) - set(given) - optional)
        unexpected = sorted(given[k] for k in set(given) - set(expected))
        if missing or unexpected:
            parts = [f"Missing key(s) in state_dict: {', '.join(map(repr, missing[:10]))}"] if missing else []
            parts += [f"Unexpected key(s) in state_dict: {', '.join(map(repr, unexpected[:10]))}"] if unexpected else []
            raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: {'; '.join(parts)}; "
                               "nothing was loaded (strict=False allows missing and unexpected keys)")


def _has_own_load_hooks(model: nn.Module) -> bool:
    """Whether a module of `model` has state-dict load hooks other than ours (`check_lora_shapes_on_load`'s, and
    the loralib conv keys' rename, which `check_state_dict` applies itself)."""
    ours = (_check_lora_shapes_hook, _accept_loralib_conv_keys)
    for module in model.modules():
        hooks = [*module._load_state_dict_pre_hooks.values(), *module._load_state_dict_post_hooks.values()]
        for hook in (getattr(hook, "hook", hook) for hook in hooks):
            # FSDP2's own hooks (fully_shard) neither rename keys nor forgive missing ones
            if hook not in ours and not getattr(hook, "__module__", "").startswith("torch.distributed.fsdp"):
                return True
    return False


def _requested_strict() -> bool:
    """The `strict` of the `Module.load_state_dict` call under way (torch passes its hooks and
    `_load_from_state_dict` `strict=True` whatever the caller asked); False when there is none."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is nn.Module.load_state_dict.__code__:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return False


def _check_lora_shapes_hook(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    check_state_dict(module, state_dict, prefix, strict=_requested_strict())


def check_lora_shapes_on_load(model: nn.Module) -> None:
    """Make `model.load_state_dict` check the whole state dict (`check_state_dict`: every shape, and with
    `strict` every key) before it loads anything. Idempotent.

    Each LoRA layer checks its own keys anyway, but torch loads module by module, so without this a
    mismatch in a late layer would be raised after earlier modules were overwritten.
    `mark_only_lora_as_trainable` and the Phi-3 patcher call it on the model they are given.
    """
    hooks = model._load_state_dict_pre_hooks.values()
    if not any(getattr(hook, "hook", None) is _check_lora_shapes_hook for hook in hooks):
        model.register_load_state_dict_pre_hook(_check_lora_shapes_hook)


def _refuse_lora_layer(cls: type, module: nn.Module) -> None:
    if isinstance(module, LoRALayer) and module.r > 0:
        raise TypeError(f"{cls.__name__}.from_module: the module is already a LoRA layer ({type(module).__name__}, "
                        f"r={module.r}); wrapping it again would drop its adapter. Use it as it is")


def _adopt(cls: type, module: nn.Module, r, lora_alpha, lora_dropout, merge_weights, use_rslora) -> Any:
    """A new `cls` instance holding `module`'s attributes and its very Parameter objects, with LoRA state.

    `module` is not modified: bad hyperparameters raise before anything is shared.
    """
    _refuse_lora_layer(cls, module)
    layer = cls.__new__(cls)
    for key, value in module.__dict__.items():
        # Containers are copied shallowly: the layer adds lora_A/lora_B to its own dicts only.
        layer.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value
    LoRALayer.__init__(layer, r, lora_alpha, lora_dropout, merge_weights, use_rslora=use_rslora)
    return layer


def _check_weight_layout(module: nn.Linear, fan_in_fan_out: bool) -> None:
    # An nn.Linear stores (out, in); only loralib-style layers built with fan_in_fan_out=True store
    # (in, out), and they say so. A mismatch would be silently wrong on a square layer.
    check_flags(fan_in_fan_out=fan_in_fan_out)
    stored = bool(getattr(module, "fan_in_fan_out", False))
    if fan_in_fan_out != stored:
        layout = "(in_features, out_features)" if stored else "(out_features, in_features)"
        raise ValueError(
            f"fan_in_fan_out={fan_in_fan_out} does not match the module: its weight is stored as {layout} "
            f"{tuple(module.weight.shape)}; pass fan_in_fan_out={stored}"
        )


def _row_squares(weight: torch.Tensor) -> torch.Tensor:
    wide = torch.promote_types(weight.dtype, torch.float32)
    return torch.cat([chunk.to(wide).square().sum(1) for chunk in weight.detach().split(4096)])


def _check_dora(r: int, use_dora: Any) -> None:
    check_flags(use_dora=use_dora)
    if use_dora and r == 0:
        raise ValueError("use_dora=True needs an adapter (r > 0): DoRA rescales the rows of W + scaling * B @ A")


def _check_quantized(cls: type, module: nn.Linear, r: int, merge_weights: Any, use_dora: Any) -> None:
    """Over a 4-bit base (a bitsandbytes `Linear4bit`): no merge-on-eval, no DoRA; said before anything is built."""
    if not quant.is_quantized(module.weight):
        return
    check_flags(merge_weights=merge_weights, use_dora=use_dora)
    if merge_weights and r > 0:
        raise quant.QuantizedMergeError(
            f"{cls.__name__}.from_module: merge_weights=True would merge the adapters into the 4-bit base weight "
            "at eval(), which has no 4-bit form that equals dequantize(W4) + delta; pass merge_weights=False, and "
            "write a merged bf16/float32 model with lora.phi3.merge_and_save when training is done")
    if use_dora:
        raise ValueError(f"{cls.__name__}.from_module: use_dora=True over a 4-bit base weight is not supported "
                         "(DoRA's row norms of W + s B A would need the dequantized weight at every step); use plain "
                         "LoRA on a 4-bit base, or DoRA on a bf16 one")


def _init_adapters(layer: LoRALayer, a_shape: Sequence[int], b_shape: Sequence[int], dtype: torch.dtype) -> None:
    if 0 in (*a_shape, *b_shape):
        sizes = ", ".join(f"{name}={getattr(layer, name)}" for name in (
            "in_features", "out_features", "num_embeddings", "embedding_dim", "in_channels", "out_channels")
            if hasattr(layer, name))
        raise ValueError(f"{type(layer).__name__}: a rank-{layer.r} adapter needs every size positive; got {sizes}")
    device = layer.weight.device
    layer.lora_A = nn.Parameter(torch.zeros(a_shape, device=device, dtype=dtype))
    layer.lora_B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
    layer.weight.requires_grad = False


class Linear(LoRALayer, nn.Linear):
    """`nn.Linear` plus a rank-`r` adapter: `y = x W^T + b + scaling * dropout(x) A^T B^T`.

    `lora_A` is (r, in_features), kaiming-uniform; `lora_B` is (out_features, r), zeros.
    `fan_in_fan_out=True` is for a weight stored as (in_features, out_features) (GPT-2's Conv1D).

    >>> layer = Linear(64, 32, r=8, lora_alpha=16)
    >>> layer(torch.randn(4, 64)).shape
    torch.Size([4, 32])
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True, *,
                 use_rslora: bool = False, use_dora: bool = False, adapter_dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        check_hyperparameters(r, lora_alpha, lora_dropout)
        hyper = _Hyper(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self._construct_linear(in_features, out_features, kwargs, hyper, fan_in_fan_out, use_dora, adapter_dtype, {})

    def _construct_linear(self, in_features, out_features, kwargs, hyper, fan_in_fan_out, use_dora, adapter_dtype,
                          layout: Mapping[str, Any]) -> None:
        # Linear's and MergedLinear's constructors; `layout`: MergedLinear's enable_lora and split_sizes
        check_flags(fan_in_fan_out=fan_in_fan_out, merge_weights=hyper.merge_weights, use_rslora=hyper.use_rslora)
        _check_dora(hyper.r, use_dora)
        self._construct(lambda: nn.Linear.__init__(self, in_features, out_features, **kwargs), hyper, adapter_dtype,
                        fan_in_fan_out=fan_in_fan_out, **layout)
        if fan_in_fan_out:
            self.weight.data = self.weight.data.t()
        if use_dora:
            self._enable_dora()

    @classmethod
    def from_module(cls, module: nn.Linear, *, r: int, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    fan_in_fan_out: bool = False, merge_weights: bool = True, use_rslora: bool = False,
                    use_dora: bool = False, adapter_dtype: torch.dtype | None = None) -> Linear:
        """Wrap `module` without copying: the layer shares its `weight` and `bias` Parameters.

        The base is not re-initialised; the adapters start as in the constructor (B = 0, so the
        output is unchanged). Works for meta-device and 16-bit weights.

        >>> base = nn.Linear(64, 32)
        >>> layer = Linear.from_module(base, r=8, lora_alpha=16)
        >>> layer.weight is base.weight
        True
        """
        cls._check_linear(module, fan_in_fan_out)
        _check_dora(r, use_dora)
        _check_quantized(cls, module, r, merge_weights, use_dora)
        quant.standard_layout(module.weight)  # the layer dequantizes the standard layout (bnb may have repacked it)
        return cls._wrap_linear(module, _Hyper(r, lora_alpha, lora_dropout, merge_weights, use_rslora), fan_in_fan_out,
                                use_dora, adapter_dtype, {})

    @classmethod
    def _check_linear(cls, module: nn.Module, fan_in_fan_out: bool) -> None:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_module expects an nn.Linear; got {type(module).__name__}")
        _check_weight_layout(module, fan_in_fan_out)

    @classmethod
    def _wrap_linear(cls, module, hyper, fan_in_fan_out, use_dora, adapter_dtype, layout: Mapping[str, Any]):
        layer = cls._wrap(module, hyper, adapter_dtype, fan_in_fan_out=fan_in_fan_out, **layout)
        if use_dora:
            layer._enable_dora()
        return layer

    def _adapter_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # lora_A stacks an (r, in) block per slice, lora_B a (size, r) block per slice
        return (self.r * len(self.lora_slices), self.in_features), (sum(s.size for s in self.lora_slices), self.r)

    def _split(self) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return (self.out_features,), (True,)

    def _init_layout(self) -> None:
        self.lora_slices: tuple[LoRASlice, ...] = slice_layout(*self._split(), self.r)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        self.reset_lora_parameters()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Over a 4-bit base, the quant state beside the packed weight, under bnb's Linear4bit's names: a patched
        # model's state dict holds what the unpatched one held, plus the adapters.
        if quant.is_quantized(self.weight):
            for key, value in quant.quant_state_entries(self.weight).items():
                destination[f"{prefix}weight.{key}"] = value

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if quant.is_quantized(self.weight):  # the packed bytes were copied; their scales come with them
            head = f"{prefix}weight."
            entries = {key[len(head):]: value for key, value in state_dict.items() if key.startswith(head)}
            if entries:
                self.weight.quant_state = quant.quant_state_from_entries(entries, self.weight.device)
                unexpected_keys[:] = [key for key in unexpected_keys if not key.startswith(head)]

    def reset_lora_parameters(self) -> None:
        """A as `nn.Linear` initialises its weight, B zero (and DoRA's magnitude the row norms of W): the
        layer starts as the base."""
        if self._parameters.get("lora_A") is not None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        if self._parameters.get("lora_magnitude") is not None:
            self.init_dora_magnitude()

    def _weight_out_in(self) -> torch.Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _lora_delta(self) -> torch.Tensor:
        # scaling * B_j @ A_j in each slice's rows, (out, in), in float32 (float64 for a float64 weight)
        A, B = self._delta_factors()
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device, dtype=A.dtype)
        for s in self.lora_slices:
            delta[s.columns] = B[s.b_rows] @ A[s.a_rows]
        return delta.mul_(self.scaling)

    def _dora_weight(self) -> torch.Tensor:
        # W' = m / n * (W + delta) on the adapted rows, W elsewhere; (out, in), in the delta's dtype
        delta = self._lora_delta()
        merged = self._weight_out_in().to(delta.dtype).clone()
        scale = (self.lora_magnitude.to(delta.dtype) / self.dora_norm().to(delta.dtype)).detach()
        for s in self.lora_slices:
            merged[s.columns] = scale[s.b_rows, None] * (merged[s.columns] + delta[s.columns])
        return merged

    def _delta_weight(self) -> torch.Tensor:
        if self.use_dora:  # W' - W
            merged = self._dora_weight()
            delta = merged - self._weight_out_in().to(merged.dtype)
        else:
            delta = self._lora_delta()
        return delta.t() if self.fan_in_fan_out else delta

    def merged_weight_tensor(self) -> torch.Tensor:
        """The merged weight: `W + delta`, or DoRA's `m / n * (W + delta)` on the adapted rows, computed in
        float32 and returned in the weight's dtype."""
        if not (self.use_dora and self.has_lora):
            return super().merged_weight_tensor()
        with torch.no_grad(), no_autocast(self.weight.device):
            merged = self._dora_weight().to(self.weight.dtype)
            return merged.t() if self.fan_in_fan_out else merged

    # -- DoRA ---------------------------------------------------------------------------------------

    def _enable_dora(self) -> None:
        rows = sum(s.size for s in self.lora_slices)
        self.lora_magnitude = nn.Parameter(torch.zeros(rows, device=self.weight.device, dtype=self.lora_A.dtype))
        self.use_dora = True
        if not self.weight.is_meta:
            self.init_dora_magnitude()

    def init_dora_magnitude(self) -> None:
        """Set DoRA's magnitude to the current row norms of `W + scaling * B @ A` (so `m / n = 1`).

        The constructors and `reset_lora_parameters` call it; call it yourself after loading a base weight
        into a layer built on the meta device (unless the adapter file you load holds the magnitude).
        """
        with torch.no_grad():
            self.lora_magnitude.copy_(self.dora_norm())

    def _weight_row_squares(self) -> torch.Tensor:
        # ||W_i||^2 of every row in float32, kept while the frozen weight is the same tensor, unmodified. A trainable
        # base weight is an optimizer's to write, and a fused one writes without bumping the version counter: its
        # squares are recomputed every call (a pass over W, small beside W's own gradient GEMM).
        weight = self._weight_out_in()
        if self.weight.requires_grad:  # forward drops what was kept before (stale once frozen again)
            return _row_squares(weight)
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape), weight.device)
        cached = self.__dict__.get("_dora_row_squares")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_dora_row_squares"] = (key, _row_squares(weight))
        return cached[1]

    def dora_norm(self) -> torch.Tensor:
        """DoRA's `n`: the row norms of `W + scaling * B @ A` for the adapted rows, detached, in float32.

        Computed in low rank, never building `B @ A`: `n_i^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i +
        s^2 B_i (A A^T) B_i^T`, with `W A^T` an (out, r) product in the weight's dtype and the rest in float32.
        `||W_i||^2`, and without grad `n` itself, are kept
        while the frozen weight is the same tensor with the same version counter (every in-place op bumps it; an
        edit through `.data` is not seen) and `A`, `B` hold the same values; a trainable weight (`requires_grad`)
        is never cached, since a fused optimizer writes it without bumping its version counter.
        """
        # Without grad (generation, evaluation, merging) n is kept while W (its identity and version) and A and B
        # (their values: fused optimizers update parameters without bumping version counters) are unchanged; with
        # one token at a time the (out, r) product would cost r times the frozen GEMM. Training recomputes it.
        if torch.is_grad_enabled() or self.weight.requires_grad:  # a trainable W: see _weight_row_squares
            return self._compute_dora_norm()
        weight = self._weight_out_in()
        # the Parameter's identity: with fan_in_fan_out, `weight` is a new transposed view at every call
        key = (id(self.weight), weight.data_ptr(), weight._version, weight.dtype, weight.stride(), self.scaling)
        cached = self.__dict__.get("_dora_norm")
        if (cached is not None and cached[0] == key and torch.equal(cached[1], self.lora_A)
                and torch.equal(cached[2], self.lora_B)):
            return cached[3]
        norm = self._compute_dora_norm()
        self.__dict__["_dora_norm"] = (key, self.lora_A.detach().clone(), self.lora_B.detach().clone(), norm)
        return norm

    def _drop_dora_caches(self) -> None:
        self.__dict__.pop("_dora_row_squares", None)
        self.__dict__.pop("_dora_norm", None)

    def _compute_dora_norm(self) -> torch.Tensor:
        with torch.no_grad(), no_autocast(self.weight.device):
            weight, squares = self._weight_out_in(), self._weight_row_squares()
            (A, B), s = self._delta_factors(), self.scaling
            WAs = [(weight[part.columns] @ A[part.a_rows].t().to(weight.dtype)).to(A.dtype)
                   for part in self.lora_slices]  # (size, r) each: the only real GEMMs
            with lowrank.one_thread(weight.device):  # the rest is rank-r sized
                parts = []
                for part, WA in zip(self.lora_slices, WAs, strict=True):
                    A_j, B_j = A[part.a_rows], B[part.b_rows]
                    # rowsum(B_j * (2 s W A_j^T + s^2 B_j A_j A_j^T)) = the two terms of n^2 beyond ||W_i||^2
                    inner = torch.addmm(WA, B_j, A_j @ A_j.t(), beta=2 * s, alpha=s * s)
                    parts.append(torch.linalg.vecdot(B_j, inner).add_(squares[part.columns]))
                squared = torch.cat(parts) if len(parts) > 1 else parts[0]
                return squared.clamp_min_(0).sqrt_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.use_dora and self.weight.requires_grad:
            self._drop_dora_caches()  # a trainable W may change unseen (fused optimizers keep its version)
        if not self._uses_lora_path():
            weight = self._effective_weight()
            if quant.is_quantized(weight):
                return _linear4bit(x, weight, self.bias)
            return F.linear(x, weight.t() if self.fan_in_fan_out else weight, self.bias)
        custom_dropout = type(self.lora_dropout) not in (nn.Dropout, nn.Identity)
        p = self._lora_dropout_p()
        col_scale = None
        kept = lowrank.KeptOutputs.for_module(self)
        if self.use_dora:
            # In a checkpointed call's recomputation, the first forward's n (the same W, A, B): no second W A^T
            earlier = kept.take_rank_product() if kept is not None else None
            norm = earlier[0] if earlier is not None else self.dora_norm()
            if kept is not None and earlier is None:
                kept.put_rank_product(norm)
            col_scale = self.lora_magnitude / norm  # m / n, n detached (DoRA, section 4.3)
            if custom_dropout:
                return self._dora_with_dropout(x, col_scale)
        elif custom_dropout:
            return self._forward_reference(x)
        return lowrank_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            p=p,
            slices=self.lora_slices,
            fan_in_fan_out=self.fan_in_fan_out,
            col_scale=col_scale,
            kept=kept,
        )

    def _dora_with_dropout(self, x: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA with a custom `lora_dropout` module, in plain autograd: `W x + b + (c - 1) W drop(x) +
        c s B A drop(x)` per adapted column, `c = m / n`."""
        dtype = compute_dtype(x)
        with no_autocast(x.device):
            x = x.to(dtype)
            weight = self._weight_out_in().to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            x_drop = self.lora_dropout(x)
            base, on_dropped = F.linear(x, weight, bias), F.linear(x_drop, weight)
            xa = x_drop @ self.lora_A.to(dtype).t()
            scale = col_scale.to(dtype)
            out = self.out_features
            pieces, last = [], 0
            for s in self.lora_slices:
                if s.offset > last:
                    pieces.append(base[..., last : s.offset])
                cols, c = s.columns, scale[s.b_rows]
                lora = xa[..., s.a_rows] @ self.lora_B[s.b_rows].to(dtype).t()
                pieces.append(base[..., cols] + (c - 1) * on_dropped[..., cols] + c * self.scaling * lora)
                last = s.offset + s.size
            if last < out:
                pieces.append(base[..., last:out])
            return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def _check_input(self, x: torch.Tensor) -> None:
        # What F.linear would reject anyway, said in the layer's terms (torch's message names lora_A's shape).
        name = type(self).__name__
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{name}: the input's last dimension must be in_features={self.in_features}; "
                             f"got an input of shape {tuple(x.shape)}")
        if self.weight.is_meta and not x.is_meta:
            raise RuntimeError(f"{name}: the weight is on the meta device (shape {tuple(self.weight.shape)}, no "
                               "values): materialise it before forward, e.g. model.to_empty(device='cpu') and "
                               "load_state_dict, or load the model with lora.phi3.from_pretrained")
        if self.use_dora and self.lora_magnitude.is_meta and not x.is_meta:
            raise RuntimeError(f"{name}: DoRA's lora_magnitude is on the meta device: load it (an adapter file) "
                               "or call layer.init_dora_magnitude() once the base weight is loaded")
        dtype = quant.logical_dtype(self.weight)  # a 4-bit weight's: the dtype it dequantizes to
        if x.dtype != dtype and not autocast_enabled(x.device):
            raise TypeError(f"{name}: the input is {x.dtype} but the weight is {dtype}; cast the input "
                            f"(x.to({dtype})) or run under torch.autocast")

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same maths with plain autograd ops (used for a custom `lora_dropout` module): the bias and the
        adapters' output first, then the frozen GEMM accumulated onto them, one rounding of the sum as in the
        hand-written path (over a 4-bit base, bitsandbytes' output plus the adapters')."""
        xa = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()
        delta = torch.zeros(*x.shape[:-1], self.out_features, dtype=xa.dtype, device=x.device)
        for s in self.lora_slices:
            delta[..., s.columns] = xa[..., s.a_rows] @ self.lora_B[s.b_rows].t()
        delta = delta * self.scaling
        if quant.is_quantized(self.weight):
            result = _linear4bit(x, self.weight, self.bias)
            return result + delta.to(result.dtype)
        dtype = compute_dtype(x)
        first = delta if self.bias is None else delta + self.bias
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        with no_autocast(x.device):
            y = torch.addmm(first.to(dtype).reshape(-1, self.out_features), x.to(dtype).reshape(-1, self.in_features),
                            weight.to(dtype).t())
        return y.view(*x.shape[:-1], self.out_features)


def _linear4bit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ dequantize(W4).T + b` by bitsandbytes' `matmul_4bit`, whose autograd Function dequantizes again in
    backward rather than saving the dequantized weight. Computes in `compute_dtype(x)`, as the LoRA path does."""
    bnb = quant.require_bitsandbytes()
    dtype = compute_dtype(x)
    with no_autocast(x.device):
        x = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        return bnb.matmul_4bit(x, weight, quant.quant_state_of(weight), bias=bias)


class MergedLinear(Linear):
    """One `nn.Linear` computing several projections (fused q|k|v), one adapter per enabled slice.

    `enable_lora` says which of the equal output slices get an adapter (loralib's layout);
    `split_sizes` gives unequal slice sizes instead (grouped-query attention: q larger than k, v).
    `lora_A` stacks one (r, in) block per enabled slice; `lora_B` one (size, r) block per enabled
    slice. Forward computes `x @ A^T` once and one small product per slice: the full (out, in)
    delta is never built.

    >>> qkv = MergedLinear(64, 128, r=4, enable_lora=(True, False, True), split_sizes=(64, 32, 32))
    >>> tuple(qkv.lora_A.shape), tuple(qkv.lora_B.shape)
    ((8, 64), (96, 4))
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, *, split_sizes: Sequence[int] | None = None, use_rslora: bool = False,
                 use_dora: bool = False, adapter_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        check_hyperparameters(r, lora_alpha, lora_dropout)
        enable_lora, split_sizes = self._check_slices(out_features, r, enable_lora, split_sizes)
        hyper = _Hyper(r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self._construct_linear(in_features, out_features, kwargs, hyper, fan_in_fan_out, use_dora, adapter_dtype,
                               {"enable_lora": enable_lora, "split_sizes": split_sizes})

    @classmethod
    def from_module(  # type: ignore[override]
        cls, module: nn.Linear, split_sizes: Sequence[int], *, r: int, lora_alpha: float = 1,
        lora_dropout: float = 0.0, enable_lora: Sequence[bool] | None = None, fan_in_fan_out: bool = False,
        merge_weights: bool = True, use_rslora: bool = False, use_dora: bool = False,
        adapter_dtype: torch.dtype | None = None,
    ) -> MergedLinear:
        """Wrap a fused `nn.Linear` without copying; `split_sizes` are its output slices.

        `enable_lora` defaults to every slice.

        >>> qkv = nn.Linear(64, 128)  # q: 64, k: 32, v: 32
        >>> layer = MergedLinear.from_module(qkv, (64, 32, 32), r=4, enable_lora=(True, False, True))
        >>> layer.weight is qkv.weight
        True
        """
        cls._check_linear(module, fan_in_fan_out)
        check_hyperparameters(r, lora_alpha, lora_dropout)
        _check_quantized(cls, module, r, merge_weights, use_dora)
        if enable_lora is None:
            enable_lora = (True,) * len(split_sizes)
        enable_lora, split_sizes = cls._check_slices(module.out_features, r, enable_lora, split_sizes)
        _check_dora(r, use_dora)
        quant.standard_layout(module.weight)  # as in Linear.from_module
        return cls._wrap_linear(module, _Hyper(r, lora_alpha, lora_dropout, merge_weights, use_rslora), fan_in_fan_out,
                                use_dora, adapter_dtype, {"enable_lora": enable_lora, "split_sizes": split_sizes})

    @staticmethod
    def _check_slices(
        out_features: int, r: int, enable_lora: Sequence[bool], split_sizes: Sequence[int] | None
    ) -> tuple[tuple[bool, ...], tuple[int, ...]]:
        enable = tuple(enable_lora)
        if not enable or not all(isinstance(e, (bool, np.bool_)) for e in enable):
            raise TypeError(f"enable_lora must be a non-empty sequence of bools; got {enable_lora!r}")
        enable = tuple(bool(e) for e in enable)  # numpy bools too, as loralib takes them
        if split_sizes is None:
            if out_features % len(enable) != 0:
                raise ValueError(
                    f"len(enable_lora)={len(enable)} must divide out_features={out_features}; "
                    "pass split_sizes for unequal slices"
                )
            sizes = (out_features // len(enable),) * len(enable)
        else:
            sizes = tuple(split_sizes)
            if len(sizes) != len(enable):
                raise ValueError(
                    f"split_sizes has {len(sizes)} entries but enable_lora has {len(enable)}; they must match"
                )
            if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
                raise ValueError(f"split_sizes must be positive ints; got {sizes}")
            if sum(sizes) != out_features:
                raise ValueError(f"split_sizes {sizes} sum to {sum(sizes)}, not out_features={out_features}")
        if r > 0 and not any(enable):
            raise ValueError(
                f"enable_lora={enable} enables no slice, so r={r} would add no adapter; "
                "enable at least one slice or use r=0"
            )
        return enable, sizes

    def _split(self) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return self.split_sizes, self.enable_lora


class Embedding(LoRALayer, nn.Embedding):
    """`nn.Embedding` plus a rank-`r` adapter: `E' = E + scaling * (B @ A)^T`.

    As in loralib, `lora_A` is (r, num_embeddings), zeros, and `lora_B` is (embedding_dim, r),
    normal: the reverse of `Linear`'s init, since a lookup has no input to project. The
    `padding_idx` row's delta is always zero, `max_norm` renormalises the looked-up rows of
    `E'` (merged or not) without writing the weight or `lora_A`, and `sparse=True` is refused
    with `r > 0`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, *, use_rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        self._check_sparse(r, lora_alpha, kwargs.get("sparse"))
        padding_idx = kwargs.get("padding_idx")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx must be in [-num_embeddings, num_embeddings) = [{-num_embeddings}, "
                             f"{num_embeddings}); got {padding_idx}")
        self._construct(lambda: nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs),
                        _Hyper(r, lora_alpha, 0.0, merge_weights, use_rslora), adapter_dtype)

    @classmethod
    def from_module(cls, module: nn.Embedding, *, r: int, lora_alpha: float = 1, merge_weights: bool = True,
                    use_rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> Embedding:
        """Wrap `module` without copying: the layer shares its `weight` Parameter."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"Embedding.from_module expects an nn.Embedding; got {type(module).__name__}")
        _refuse_lora_layer(cls, module)
        cls._check_sparse(r, lora_alpha, module.sparse)
        return cls._wrap(module, _Hyper(r, lora_alpha, 0.0, merge_weights, use_rslora), adapter_dtype)

    @staticmethod
    def _check_sparse(r: int, lora_alpha: float, sparse: bool | None) -> None:
        check_hyperparameters(r, lora_alpha, 0.0)
        if r > 0 and sparse:
            raise ValueError("sparse=True is not supported with r > 0: the adapters get dense gradients")

    def _adapter_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.r, self.num_embeddings), (self.embedding_dim, self.r)

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self._parameters.get("lora_A") is not None:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _delta_weight(self) -> torch.Tensor:
        A, B = self._delta_factors()
        delta = (B @ A).t() * self.scaling  # (num_embeddings, dim)
        if self.padding_idx is not None:
            delta[self.padding_idx] = 0
        return delta

    def _lookup(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)

    def _renorm(self, rows: torch.Tensor) -> torch.Tensor:
        # torch renormalises the weight in place; we scale the looked-up rows of W + delta instead, so the
        # weight and lora_A are never written and merged and unmerged forwards agree.
        if self.max_norm is None:
            return rows
        norms = rows.detach().float().norm(p=self.norm_type, dim=-1, keepdim=True)
        scale = torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), torch.ones_like(norms))
        return rows * scale.to(rows.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._uses_lora_path():
            return self._renorm(self._lookup(x, self._effective_weight()))
        rows = self._lookup(x, self.weight)
        with no_autocast(self.weight.device):  # a frozen lookup is not autocast either: the delta in float32
            A, B = self._delta_factors()  # float32 (float64 over a float64 base) whatever the adapters' dtype
            after_A = F.embedding(x, A.t(), None, None, 2.0, self.scale_grad_by_freq)  # (..., r)
            if self.padding_idx is not None:
                after_A = after_A.masked_fill((x == self.padding_idx).unsqueeze(-1), 0)
            delta = (after_A @ B.t()) * self.scaling
        # The sum rounded once to a 16-bit weight's dtype, so that a delta below its resolution still counts.
        wide = torch.promote_types(rows.dtype, delta.dtype)
        return self._renorm((rows.to(wide) + delta.to(wide)).to(rows.dtype))


class ConvLoRA(LoRALayer):
    """What the conv layers share. `ConvLoRA(nn.Conv2d, in, out, kernel_size, r=...)` builds a
    `Conv2d` (loralib's spelling); `layer.conv` is the layer itself, so loralib code that reads
    `layer.conv.weight` keeps working.

    Parameterisation, with `K` the product of the kernel sizes and `g` the groups:

    - `Conv2d` with an int kernel `k` and any conv with kernel 1: loralib's layout,
      `lora_A` (r*k, in*k), `lora_B` (out/g*k, r*k), `delta = (B @ A).view(weight.shape)`, so
      loralib checkpoints load. Its rank as an (out, in/g*K) matrix can exceed r.
    - Any other kernel (tuples, `Conv1d`/`Conv3d` with kernel > 1, where loralib crashes):
      `lora_A` (r, in/g*K), `lora_B` (out, r), `delta = (B @ A).view(weight.shape)`: the weight
      seen as an (out, in/g*K) matrix gets a delta of rank at most r (PEFT's conv layout).

    Dropout applies to the adapter's input: `y = conv(x, W) + conv(dropout(x), delta)`; without
    dropout (or in eval mode) that is one `conv(x, W + delta)`.
    """

    _conv_types: dict[type, type] = {}

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is ConvLoRA:
            conv_module = args[0] if args else kwargs.get("conv_module")
            if conv_module not in ConvLoRA._conv_types:
                raise TypeError(f"ConvLoRA expects nn.Conv1d, nn.Conv2d or nn.Conv3d first; got {conv_module!r}")
            cls = ConvLoRA._conv_types[conv_module]
        return super().__new__(cls)

    def __init__(self, conv_module: type, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...],
                 r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0, merge_weights: bool = True, *,
                 use_rslora: bool = False, adapter_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        check_hyperparameters(r, lora_alpha, lora_dropout)
        self._construct(lambda: conv_module.__init__(self, in_channels, out_channels, kernel_size, **kwargs),
                        _Hyper(r, lora_alpha, lora_dropout, merge_weights, use_rslora), adapter_dtype,
                        loralib_layout=self._is_loralib_layout(kernel_size))
        self._register_load_state_dict_pre_hook(_accept_loralib_conv_keys)

    @classmethod
    def _is_loralib_layout(cls, kernel_size: int | tuple[int, ...]) -> bool:
        return isinstance(kernel_size, int) and (issubclass(cls, nn.Conv2d) or kernel_size == 1)

    @classmethod
    def from_module(cls, module: nn.Module, *, r: int, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    merge_weights: bool = True, use_rslora: bool = False, adapter_dtype: torch.dtype | None = None):
        """Wrap an `nn.Conv1d/2d/3d` without copying; uses the true-rank parameterisation
        unless the kernel is square (and 2d) or 1, as the constructor does."""
        _refuse_lora_layer(cls, module)
        target = ConvLoRA._conv_types.get(type(module))
        if target is None or cls not in (ConvLoRA, target):
            expected = "an nn.Conv1d, nn.Conv2d or nn.Conv3d" if cls is ConvLoRA else f"an nn.{cls.__name__}"
            raise TypeError(f"{cls.__name__}.from_module expects {expected}; got {type(module).__name__}")
        ks = module.kernel_size
        square = ks[0] if len(set(ks)) == 1 else ks
        layer = target._wrap(module, _Hyper(r, lora_alpha, lora_dropout, merge_weights, use_rslora), adapter_dtype,
                             loralib_layout=target._is_loralib_layout(square))
        layer._register_load_state_dict_pre_hook(_accept_loralib_conv_keys)
        return layer

    @property
    def conv(self):
        """The layer itself: loralib 0.1.2 kept the conv in `self.conv`."""
        return self

    def _adapter_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        r = self.r
        if self.loralib_layout:
            k = self.kernel_size[0]
            return (r * k, self.in_channels * k), (self.out_channels // self.groups * k, r * k)
        return (r, self.weight[0].numel()), (self.out_channels, r)  # weight[0].numel(): in/groups * K

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self._parameters.get("lora_A") is not None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _delta_weight(self) -> torch.Tensor:
        A, B = self._delta_factors()
        return (B @ A).view(self.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._uses_lora_path():
            return self._conv_forward(x, self._effective_weight(), self.bias)
        delta = self.delta_weight().to(self.weight.dtype)
        if self._lora_dropout_p() == 0.0:
            return self._conv_forward(x, self.weight + delta, self.bias)
        return self._conv_forward(x, self.weight, self.bias) + self._conv_forward(self.lora_dropout(x), delta, None)


def _accept_loralib_conv_keys(state_dict, prefix, *args: Any) -> None:
    # loralib 0.1.2 saved the base conv as `conv.weight` / `conv.bias`; ours are `weight` / `bias`.
    for name in ("weight", "bias"):
        old = prefix + "conv." + name
        if old in state_dict and prefix + name not in state_dict:
            state_dict[prefix + name] = state_dict.pop(old)


class Conv1d(ConvLoRA, nn.Conv1d):
    """`nn.Conv1d` with LoRA; see `ConvLoRA` for the parameterisation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ConvLoRA.__init__(self, nn.Conv1d, *_strip_conv_type(args, kwargs, nn.Conv1d), **kwargs)


class Conv2d(ConvLoRA, nn.Conv2d):
    """`nn.Conv2d` with LoRA; see `ConvLoRA` for the parameterisation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ConvLoRA.__init__(self, nn.Conv2d, *_strip_conv_type(args, kwargs, nn.Conv2d), **kwargs)


class Conv3d(ConvLoRA, nn.Conv3d):
    """`nn.Conv3d` with LoRA; see `ConvLoRA` for the parameterisation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ConvLoRA.__init__(self, nn.Conv3d, *_strip_conv_type(args, kwargs, nn.Conv3d), **kwargs)


def _strip_conv_type(args: tuple, kwargs: dict[str, Any], conv_type: type) -> tuple:
    # `ConvLoRA(nn.Conv2d, ...)` returns a Conv2d, and Python then calls Conv2d.__init__ with the
    # same arguments, conv type included (positional or `conv_module=`).
    if "conv_module" in kwargs:
        given = kwargs.pop("conv_module")
        if given is not conv_type:
            raise TypeError(f"conv_module={given!r} contradicts the layer type, which is a {conv_type.__name__}")
        return args
    return args[1:] if args and args[0] is conv_type else args


ConvLoRA._conv_types.update({nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d})
