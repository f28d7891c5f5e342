"""Phi-3 adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT puts one LoRA over each fused module: `lora_A` (R, in), `lora_B` (out, R), keys
`base_model.model.<module>.lora_A.weight`, scaling `lora_alpha / R` (`/ sqrt(R)` with rslora). A
whole-module `lora.Linear` is exactly that. A per-slice `lora.MergedLinear` (say q and v of
`qkv_proj`) is exported exactly too: its A blocks stacked (R = r * slices), its B blocks placed
block-diagonally (zero rows for the slices without an adapter), and `rank_pattern`/`alpha_pattern`
entries so PEFT's scaling for that module equals ours. `uniform_rank=True` writes one rank for every
module instead (A and B padded with zeros, each module's scaling folded into B, global scaling 1), for
servers that ignore per-module patterns; vLLM is such a server as far as its documentation goes, but
this machine cannot run vLLM, so that path is tested with PEFT only.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lora.adapter import check_tensors
from lora.atomic import atomic_directory
from lora.layers import Linear, LoRALayer, MergedLinear, lora_alpha_for, lora_layers, lora_scaling
from lora.phi3.config import read_json
from lora.phi3.patch import ModuleSpec, apply_specs, is_patchable
from lora.sharding import full_tensor, is_sharded, shard_like, writes_files

__all__ = ["save_peft_adapter", "load_peft_adapter", "peft_tensors", "read_peft_config"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?:(?P<which>[AB])(?:\.[^.]+)?\.weight"
                  r"|magnitude_vector(?:\.[^.]+)?(?:\.weight)?)$")  # which: None for DoRA's magnitude

# PEFT options that change the maths or the saved modules; an adapter using any of them is refused. The
# variants' sub-configs are on as soon as they are not None (PEFT turns even `{}` into a config object).
_UNSUPPORTED = {
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "fan_in_fan_out": (False, None),
    "alora_invocation_tokens": (None, []),  # aLoRA: the adapter acts only from the invocation tokens on
    "use_bdlora": (None,),  # BD-LoRA: block-diagonal A or B
    "kasa_config": (None,),  # KaSA: a learned diagonal between A and B, and an SVD-truncated base
    "monteclora_config": (None,),  # MonteCLoRA: sampled perturbations of A
    "arrow_config": (None,),  # Arrow: per-token routing over several adapters
    "velora_config": (None,),  # VeLoRA: its own backward for A (compressed activations): other gradients
}
# Dtypes a base may have been rounded to before the adapter was saved from it (a bf16 or fp16 copy of the model).
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _peft_pair(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A, B) for one layer: (R, in) and (out, R), float32."""
    A, B = full_tensor(layer.lora_A).detach().float(), full_tensor(layer.lora_B).detach().float()
    if not isinstance(layer, MergedLinear):
        return A.clone(), B.clone()
    B_full = torch.zeros(layer.out_features, A.shape[0])
    for s in layer.lora_slices:
        B_full[s.columns, s.a_rows] = B[s.b_rows]  # block-diagonal
    return A.clone(), B_full


def _peft_magnitude(layer: Linear) -> torch.Tensor:
    """PEFT's DoRA magnitude for the whole module, (out,): ours on the adapted rows, the row norm of W on the
    others (their B rows are zero in PEFT's layout, so their scale m / n is 1 there too)."""
    magnitude = full_tensor(layer.lora_magnitude).detach().float()
    if not isinstance(layer, MergedLinear):
        return magnitude.clone()
    full = torch.linalg.vector_norm(full_tensor(layer.weight).detach().float(), dim=1)
    for s in layer.lora_slices:
        full[s.columns] = magnitude[s.b_rows]
    return full


def peft_tensors(model: nn.Module, *, uniform_rank: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the `adapter_config.json` content of `model`'s adapters in PEFT's format."""
    layers = list(lora_layers(model, adapted_only=True))
    if not layers:
        raise ValueError("the model has no LoRA layers: patch it (lora.phi3.patch) before saving an adapter")
    for name, layer in layers:
        if type(layer) not in (Linear, MergedLinear) or layer.fan_in_fan_out:
            raise ValueError(f"{name}: only lora.Linear / lora.MergedLinear without fan_in_fan_out export to PEFT")
    dora = {layer.use_dora for _, layer in layers}
    if len(dora) > 1:
        raise ValueError("PEFT has one use_dora per adapter; this model mixes DoRA and plain LoRA layers")
    use_dora = dora.pop()
    if use_dora and uniform_rank:
        raise ValueError("uniform_rank=True folds each module's scaling into B, which DoRA's norm does not allow; "
                         "save a DoRA adapter without it")
    pairs = {name: _peft_pair(layer) for name, layer in layers}
    ranks = {name: A.shape[0] for name, (A, _) in pairs.items()}
    scalings = {name: layer.scaling for name, layer in layers}
    rslora = {layer.use_rslora for _, layer in layers}
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if uniform_rank:
        R = max(ranks.values())
        for name, (A, B) in pairs.items():
            A_pad = torch.zeros(R, A.shape[1])
            A_pad[: A.shape[0]] = A
            B_pad = torch.zeros(B.shape[0], R)
            B_pad[:, : B.shape[1]] = B * scalings[name]  # scaling folded in; global scaling is R / R = 1
            pairs[name] = (A_pad, B_pad)
        r, alpha, use_rslora = R, R, False
    else:
        first = layers[0][1]
        r, alpha, use_rslora = first.r, first.lora_alpha, first.use_rslora
        if len(rslora) > 1:
            raise ValueError("PEFT has one use_rslora per adapter; this model mixes rslora and plain scaling")
        for name in pairs:
            global_scaling = lora_scaling(alpha, ranks[name], use_rslora=use_rslora)
            if ranks[name] != r or not math.isclose(scalings[name], global_scaling, rel_tol=1e-12):
                rank_pattern[name] = ranks[name]
                # PEFT computes alpha / R (or / sqrt(R)); choose alpha so that equals our scaling.
                alpha_pattern[name] = lora_alpha_for(scalings[name], ranks[name], use_rslora=use_rslora)
    for name, (A, B) in pairs.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous()
    if use_dora:
        for name, layer in layers:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = _peft_magnitude(layer)
    modules = sorted(pairs)
    short = sorted({name.rsplit(".", 1)[-1] for name in modules})
    # PEFT targets each module whose name is a target or ends in "." + a target.
    matched = {name for name, _ in model.named_modules()
               if any(name == s or name.endswith(f".{s}") for s in short)}
    dropouts = {layer.dropout_rate for _, layer in layers}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "name_or_path", None),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "use_rslora": use_rslora,
        # Short names when they select exactly the adapted modules (what vLLM expects); full names otherwise.
        "target_modules": short if matched == set(modules) else modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": use_dora,
        "lora_bias": False,
    }
    return tensors, config


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, *, uniform_rank: bool = False) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` into the directory `path`.

    `peft.PeftModel.from_pretrained(transformers_phi3, path)` then reproduces this model's logits.
    The directory is replaced as a whole (`lora.atomic.atomic_directory`): a crash leaves the old adapter
    or the new one, never new weights beside an old config. Other files of an existing `path` stay.
    On a model sharded with FSDP2, call it on every rank: the adapters are gathered and rank 0 writes.
    """
    tensors, config = peft_tensors(model, uniform_rank=uniform_rank)
    if not writes_files(model):
        return
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    ours = {WEIGHTS_NAME, CONFIG_NAME, PICKLE_WEIGHTS_NAME}
    with atomic_directory(path, carry=lambda name: name not in ours) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(text)


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checked `adapter_config.json` of PEFT adapter directory `path` (errors name the file and key)."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no PEFT adapter config (expected {CONFIG_NAME} in {path})")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object of PEFT settings, got {type(config).__name__} "
                         f"{config!r:.80}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported; only 'LORA' is")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key) not in allowed:
            raise ValueError(f"{config_path}: {key}={config[key]!r} is not supported by lora.phi3")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={config['bias']!r} is not supported by lora.phi3 (only 'none')")
    _check_config_types(config, config_path)
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config_types(config: dict[str, Any], path: Path) -> None:
    """Each value PEFT's loader would use, of its type: a ValueError naming the file and key otherwise."""
    def fail(key: str, expected: str) -> None:
        raise ValueError(f"{path}: {key} must be {expected}, got {config[key]!r} ({type(config[key]).__name__})")

    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        fail("target_modules", "a list of module names or a regex string")
    if "r" in config and not (_is_int(config["r"]) and config["r"] > 0):
        fail("r", "a positive integer")
    if "lora_alpha" in config and not (_is_number(config["lora_alpha"]) and config["lora_alpha"] > 0):
        fail("lora_alpha", "a positive number")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        fail("lora_dropout", "a number in [0, 1)")
    for key in ("use_rslora", "use_dora"):
        if key in config and not isinstance(config[key], bool):
            fail(key, "true or false (a boolean, not a string)")
    # Inits that change the base weights (PiSSA, OLoRA, CorDA, LoftQ, EVA...) make an adapter that is only
    # right on that changed base; only the plain ones leave the base as it was.
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        fail("init_lora_weights", "true, false or \"gaussian\" (other inits change the base weights, which "
             "lora.phi3 does not reproduce)")
    for key, valid in (("rank_pattern", lambda v: _is_int(v) and v > 0), ("alpha_pattern", _is_number)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            fail(key, "an object of {regex: value}")
        for regex, value in pattern.items():
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"{path}: {key} key {regex!r} is not a valid regular expression ({err})") from err
            if not valid(value):
                raise ValueError(f"{path}: {key}[{regex!r}] must be a positive "
                                 f"{'integer' if key == 'rank_pattern' else 'number'}, got {value!r}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, each floating point and finite (as `lora.load_adapter` requires of its files)."""
    weights, legacy = path / WEIGHTS_NAME, path / PICKLE_WEIGHTS_NAME
    if weights.is_file():
        try:
            with safe_open(weights, framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{weights}: not a readable safetensors file (corrupt or truncated?): {error}") from error
    elif legacy.is_file():
        weights = legacy
        try:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{weights}: cannot be read with torch.load(weights_only=True): {error}") from error
        if not (isinstance(tensors, dict)
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())):
            raise ValueError(f"{weights}: expected a dict of name -> tensor, got {type(tensors).__name__}")
    else:
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {PICKLE_WEIGHTS_NAME} found")
    check_tensors(weights, tensors)
    return dict(tensors)


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches a pattern key against the end of the module name, as a regex.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a PEFT LoRA adapter for Phi-3 from the directory `path`.

    Onto an unpatched model it patches first, from `adapter_config.json` (whole-module `lora.Linear`
    layers, PEFT's layout, with `rank_pattern`/`alpha_pattern` honoured). Onto a patched model the
    layout must match: the same modules with the same rank and scaling (a `MergedLinear` accepts the
    block-diagonal layout `save_peft_adapter` writes for it). Options this library does not implement
    (`lora_bias`, `modules_to_save`, ...) are refused by name; DoRA adapters (`use_dora`) load into DoRA
    layers. On a patched model sharded
    with FSDP2 (call it on every rank) each rank copies its slice of each tensor.
    """
    path = Path(path)
    config = read_peft_config(path)
    raw = _read_tensors(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA weight of the form "
                             f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
        pairs.setdefault(match["module"], {})[match["which"] or "magnitude"] = tensor
    use_dora = bool(config.get("use_dora", False))
    for module, pair in sorted(pairs.items()):
        if not {"A", "B"} <= set(pair):
            raise ValueError(f"{path}: module {module!r} has lora_{'B' if 'A' in pair else 'A'} missing")
        for which, dims in (("A", "(rank, in_features)"), ("B", "(out_features, rank)")):
            if pair[which].dim() != 2:
                raise ValueError(f"{path}: {module}.lora_{which} has shape {tuple(pair[which].shape)}; "
                                 f"expected 2-D {dims}")
        if use_dora != ("magnitude" in pair):
            raise ValueError(f"{path}: module {module!r} " + ("has no lora_magnitude_vector, which use_dora=true "
                             "needs" if use_dora else "has a lora_magnitude_vector but the config says use_dora=false"))
        magnitude = pair.get("magnitude")
        if magnitude is not None and tuple(magnitude.shape) != (pair["B"].shape[0],):
            raise ValueError(f"{path}: {module}.lora_magnitude_vector has shape {tuple(magnitude.shape)}; its "
                             f"lora_B has {pair['B'].shape[0]} rows")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    use_rslora = bool(config.get("use_rslora", False))
    scaling = {}
    for module, pair in pairs.items():
        rank = pair["A"].shape[0]
        expected_rank = _pattern_value(config.get("rank_pattern") or {}, module, r_default)
        if rank != expected_rank:
            raise ValueError(f"{path}: {module}.lora_A has rank {rank}, the config says {expected_rank}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha_default)
        scaling[module] = lora_scaling(alpha, rank, use_rslora=use_rslora)

    named = dict(model.named_modules())
    patched = any(lora_layers(model))
    if not patched and is_sharded(model):
        raise ValueError(f"{path}: the model is sharded (FSDP2) and not patched; patch it before sharding "
                         "(lora.phi3.fsdp.from_pretrained_sharded(prepare=...)), then load the adapter")
    if not patched:
        for module in sorted(pairs):
            if not is_patchable(named.get(module)):
                raise ValueError(f"{path}: adapter module {module!r} is not an nn.Linear (or a bitsandbytes "
                                 "Linear4bit) of this model")
        specs = []
        for module, pair in sorted(pairs.items()):
            rank = pair["A"].shape[0]
            # lora_alpha chosen so that our scaling (alpha / r, or / sqrt(r)) is PEFT's.
            alpha = lora_alpha_for(scaling[module], rank, use_rslora=use_rslora)
            specs.append(ModuleSpec(module, rank, alpha, float(config.get("lora_dropout") or 0.0), use_rslora,
                                    use_dora=use_dora))
        _check_shapes(path, pairs, named)
        apply_specs(model, specs, torch.float32)
        named = dict(model.named_modules())
    own = {name for name, _ in lora_layers(model, adapted_only=True)}
    if own != set(pairs):
        missing = sorted(own - set(pairs)) or sorted(set(pairs) - own)
        raise ValueError(f"{path}: the adapter's modules differ from the model's LoRA layers, first: {missing[0]!r}")
    updates, magnitudes = {}, {}
    for module, pair in sorted(pairs.items()):
        layer = named[module]
        if layer.use_dora != use_dora:
            raise ValueError(f"{path}: the adapter is {'DoRA' if use_dora else 'plain LoRA'} (use_dora={use_dora}) "
                             f"but the model's {module} is {'DoRA' if layer.use_dora else 'plain LoRA'}")
        updates[module] = _to_layer(path, module, layer, pair["A"], pair["B"], scaling[module])
        if use_dora:
            magnitudes[module] = _magnitude_to_layer(path, module, layer, pair["magnitude"])
    with torch.no_grad():
        for module, (A, B) in updates.items():
            named[module].lora_A.copy_(shard_like(A, named[module].lora_A))
            named[module].lora_B.copy_(shard_like(B, named[module].lora_B))
            if module in magnitudes:
                named[module].lora_magnitude.copy_(shard_like(magnitudes[module], named[module].lora_magnitude))
            if named[module].merged:
                named[module].merge()


def _check_shapes(path: Path, pairs: dict[str, dict[str, torch.Tensor]], named: dict[str, nn.Module]) -> None:
    for module, pair in sorted(pairs.items()):
        base = named[module]
        a_ok = pair["A"].shape[1] == base.in_features
        b_ok = pair["B"].shape == (base.out_features, pair["A"].shape[0])
        if not (a_ok and b_ok):
            a_shape, b_shape = tuple(pair["A"].shape), tuple(pair["B"].shape)
            raise ValueError(f"{path}: {module} has lora_A {a_shape} and lora_B {b_shape}; the model's layer "
                             f"is ({base.out_features}, {base.in_features})")


def _to_layer(path: Path, module: str, layer: LoRALayer, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """This layer's (lora_A, lora_B) from PEFT's (A, B), or an error if the layouts differ."""
    if not math.isclose(layer.scaling, scaling, rel_tol=1e-6):
        raise ValueError(f"{path}: {module} has scaling {scaling} in the adapter, {layer.scaling} in the model")
    if isinstance(layer, MergedLinear):
        stacked = layer.lora_A.shape[0]  # r * slices
        if A.shape != layer.lora_A.shape or B.shape != (layer.out_features, stacked):
            raise ValueError(f"{path}: {module} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}; the model's "
                             f"per-slice layer needs {tuple(layer.lora_A.shape)} / {(layer.out_features, stacked)}")
        blocks, mask = [], torch.zeros_like(B, dtype=torch.bool)
        for s in layer.lora_slices:
            blocks.append(B[s.columns, s.a_rows])
            mask[s.columns, s.a_rows] = True
        outside = B.masked_select(~mask)
        if outside.numel() and outside.abs().max() > 0:
            raise ValueError(f"{path}: {module}'s lora_B is not block-diagonal over the model's slices, so it "
                             "cannot load into a per-slice layer; load it onto an unpatched model instead")
        return A, torch.cat(blocks, dim=0)
    if A.shape != layer.lora_A.shape or B.shape != layer.lora_B.shape:
        raise ValueError(f"{path}: {module} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}; the model's "
                         f"layer has {tuple(layer.lora_A.shape)} / {tuple(layer.lora_B.shape)}")
    return A, B


def _magnitude_to_layer(path: Path, module: str, layer: LoRALayer, magnitude: torch.Tensor) -> torch.Tensor:
    """This layer's lora_magnitude from PEFT's whole-module one: the adapted rows; every other row must be its
    own row norm (scale 1), or the per-slice layer could not reproduce PEFT's output.

    "Its own row norm" is that of this model's weight or of the weight rounded to bf16 or fp16 (an adapter saved
    from a half-precision copy of the base), to two ulps of the coarser of the file's and the weight's dtypes
    (but no tighter than 1e-5, float32's rounding in the sum over a row).
    """
    if not isinstance(layer, MergedLinear):
        return magnitude
    keep = torch.zeros(layer.out_features, dtype=torch.bool)
    for s in layer.lora_slices:
        keep[s.columns] = True
    others, rows = magnitude.float()[~keep], full_tensor(layer.weight).detach()[~keep]  # (unadapted,), (., in)
    coarse = max(torch.finfo(magnitude.dtype).eps, torch.finfo(rows.dtype).eps)
    rtol = max(2 * coarse, 1e-5)
    candidates = (rows, *(rows.to(dtype) for dtype in _HALF_DTYPES if dtype != rows.dtype))
    own = (torch.linalg.vector_norm(w.float(), dim=1) for w in candidates)
    if others.numel() and not any(torch.allclose(others, norms, rtol=rtol, atol=1e-7) for norms in own):
        raise ValueError(f"{path}: {module}'s lora_magnitude_vector rescales rows the model's per-slice layer "
                         "does not adapt; load it onto an unpatched model instead")
    return magnitude[keep]
