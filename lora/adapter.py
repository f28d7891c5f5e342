"""Adapter files: one safetensors file holding only the LoRA tensors, with what is needed to check them.

The header metadata (strings, as safetensors requires) holds:

- `format`: `"lora-adapter"`, `format_version`: `"1"`;
- `layers`: JSON, for each adapted module its class, `r`, `lora_alpha`, `use_rslora`, `use_dora`, dropout and,
  for a `MergedLinear`, its `split_sizes` and `enable_lora`;
- `fingerprint`: JSON, the base model's architecture fields (`ARCHITECTURE_FIELDS`, from its normalised config:
  the `architecture` a caller passes, else `model.config` when it has one) and the name, shape and dtype of every
  adapted weight: for a 4-bit (QLoRA) base the logical (out, in) shape and the dtype it computes in, so a QLoRA
  adapter loads onto the bf16 base and the other way round.

A model family's own spellings (Phi-3's legacy RoPE names, say) are normalised by its config class, not here:
`lora.phi3.config.architecture(config)` gives the `architecture` of any Phi-3 config.

Loading checks the layout (every tensor's name and shape, every module's r/alpha/slices) before it copies
anything, then the fingerprint; nothing is read with pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from . import quant
from .atomic import atomic_write
from .layers import LoRALayer, MergedLinear, lora_layers
from .sharding import shard_like, writes_files
from .trainable import lora_state_dict

__all__ = ["ARCHITECTURE_FIELDS", "AdapterMismatchError", "adapter_metadata", "check_tensors", "fingerprint",
           "load_adapter", "save_adapter"]

FORMAT = "lora-adapter"
FORMAT_VERSION = "1"
# Fields of a transformer config (transformers' names) that change what an adapter means even when every shape
# agrees (a 4k adapter on a 128k base: same shapes, other positions).
ARCHITECTURE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "original_max_position_embeddings",
    "rope_theta", "rope_type", "partial_rotary_factor", "short_factor", "long_factor", "sliding_window",
    "tie_word_embeddings",
)


_SAME_WAY = "is the model patched the way it was when the adapter was saved?"


class AdapterMismatchError(ValueError):
    """The adapter file does not fit the model it is loaded into."""


def _config_dict(config: Any) -> dict[str, Any]:
    # A config's fields as transformers spells them (4 or 5), with the defaults transformers implies filled in.
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        data = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    elif isinstance(config, dict):
        data = dict(config)
    else:
        data = dict(vars(config))
    # transformers 5 keeps rope settings in `rope_parameters` (4: `rope_scaling` + `rope_theta`).
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if isinstance(rope, dict):
        for key in ("rope_theta", "partial_rotary_factor", "short_factor", "long_factor"):
            if data.get(key) is None and rope.get(key) is not None:
                data[key] = rope[key]
        rope_type = rope.get("rope_type") or rope.get("type")
        if data.get("rope_type") is None and rope_type is not None:
            data["rope_type"] = rope_type
    if data.get("head_dim") is None and data.get("hidden_size") and data.get("num_attention_heads"):
        data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
    if data.get("num_key_value_heads") is None and data.get("num_attention_heads"):
        data["num_key_value_heads"] = data["num_attention_heads"]
    data.setdefault("rope_type", "default")
    return data


def fingerprint(model: nn.Module, *, architecture: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The base model's architecture fields and the name, shape and dtype of every adapted weight (a 4-bit
    weight's logical (out, in) shape and the dtype it dequantizes to, not its packed uint8 storage).

    `architecture`: the base model's normalised config (a mapping, e.g. `lora.phi3.config.architecture(config)`);
    by default `model.config`, read as transformers spells it.
    """
    config = _config_dict(getattr(model, "config", None) if architecture is None else architecture)
    architecture = {key: config.get(key) for key in ARCHITECTURE_FIELDS if key in config}
    weights = {
        name: [list(quant.logical_shape(layer.weight)), str(quant.logical_dtype(layer.weight)).removeprefix("torch.")]
        for name, layer in lora_layers(model, adapted_only=True)
    }
    return {"architecture": architecture, "weights": weights}


def _layer_entry(layer: LoRALayer) -> dict[str, Any]:
    entry = {"class": type(layer).__name__, "r": layer.r, "lora_alpha": layer.lora_alpha,
             "use_rslora": layer.use_rslora, "lora_dropout": layer.dropout_rate, "use_dora": layer.use_dora}
    if isinstance(layer, MergedLinear):
        entry.update(split_sizes=list(layer.split_sizes), enable_lora=list(layer.enable_lora))
    return entry


def adapter_metadata(model: nn.Module, *, architecture: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The header metadata `save_adapter` writes for `model` (`architecture`: see `fingerprint`)."""
    layers = {name: _layer_entry(layer) for name, layer in lora_layers(model, adapted_only=True)}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": json.dumps(layers, sort_keys=True),
            "fingerprint": json.dumps(fingerprint(model, architecture=architecture), sort_keys=True)}


def save_adapter(model: nn.Module, path: str | os.PathLike, *, architecture: Mapping[str, Any] | None = None) -> None:
    """Write `model`'s adapters (`lora_A`/`lora_B` of every LoRA layer) to one safetensors file.

    `architecture`: the base model's normalised config for the fingerprint (see `fingerprint`).

    On a model sharded with FSDP2, call it on every rank: the adapters are gathered whole and rank 0
    writes `path` (the other ranks write nothing).

    >>> lora.save_adapter(model, "adapter.safetensors")  # doctest: +SKIP
    """
    tensors = {k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA layers with r > 0: there is no adapter to save")
    metadata = adapter_metadata(model, architecture=architecture)
    if writes_files(model):
        atomic_write(path, lambda tmp: _write(tensors, metadata, tmp))


def _write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    # safetensors writes the metadata in a hash map's order, which changes from call to call: the header is
    # rewritten with sorted keys, so that the same adapter always gives the same bytes (the data offsets are
    # relative to the header's end, so its length may change)
    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    header += " " * (-len(header.encode()) % 8)  # safetensors pads the header to 8 bytes
    encoded = header.encode()
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        f.write(memoryview(data)[8 + size :])


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file (corrupt or truncated?): {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lora adapter file (metadata format is {metadata.get('format')!r}, "
                         f"expected {FORMAT!r}); for PEFT adapters use lora.phi3.load_peft_adapter")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {metadata.get('format_version')!r} is not supported "
                         f"(this library reads version {FORMAT_VERSION})")
    for key in ("layers", "fingerprint"):
        if key not in metadata:
            raise ValueError(f"{path}: metadata lacks {key!r}; not a complete adapter file")
        try:
            value = json.loads(metadata[key])
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({error})") from error
        if not isinstance(value, dict):
            raise ValueError(f"{path}: metadata {key!r} is not valid JSON of an object")
        # one level down, what load_adapter reads: an object per module, and the fingerprint's two sections
        sections = [k for k in ("architecture", "weights") if k in value]
        entries = value.items() if key == "layers" else ((k, value[k]) for k in sections)
        for name, entry in entries:
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: metadata {key!r}: {name!r} is {type(entry).__name__} {entry!r}, "
                                 "expected an object")
    check_tensors(path, tensors)
    return metadata, tensors


def check_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """A ValueError naming `path` and the key unless every adapter tensor is floating point and finite."""
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; adapters are floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name!r} holds NaN or inf")


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    ignore_fingerprint: bool = False,
    architecture: Mapping[str, Any] | None = None,
) -> None:
    """Load an adapter file written by `save_adapter` into an identically patched `model`.

    Raises `AdapterMismatchError` naming the first tensor or module that does not match, and, when every
    shape matches but the base model differs (say a 4k adapter onto a 128k base), naming the differing
    fields; `ignore_fingerprint=True` loads anyway. Nothing is copied unless everything matches.
    `architecture`: the base model's normalised config, compared with the file's (see `fingerprint`).
    On a model sharded with FSDP2 (call it on every rank) each rank copies its slice of each tensor.
    """
    path = Path(path)
    metadata, tensors = _read(path)
    saved_layers = json.loads(metadata["layers"])
    own = lora_state_dict(model, full=False)
    for name in sorted(set(tensors) | set(own)):
        if name not in own:
            raise AdapterMismatchError(f"{path}: tensor {name!r} has no place in the model ({_SAME_WAY})")
        if name not in tensors:
            raise AdapterMismatchError(f"{path}: the model's {name!r} is not in the file ({_SAME_WAY})")
        if tensors[name].shape != own[name].shape:
            raise AdapterMismatchError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                       f"the model's is {tuple(own[name].shape)}")
    current = {name: _layer_entry(layer) for name, layer in lora_layers(model, adapted_only=True)}
    for name in sorted(current):
        for key in ("class", "r", "lora_alpha", "use_rslora", "split_sizes", "enable_lora", "use_dora"):
            # files written before DoRA existed have no use_dora: they are plain LoRA
            saved = saved_layers.get(name, {}).get(key, False if key == "use_dora" else None)
            have = current[name].get(key)
            if saved != have:
                raise AdapterMismatchError(f"{path}: module {name!r} was saved with {key}={saved!r}, "
                                           f"the model has {key}={have!r}")
    if not ignore_fingerprint:
        saved_print, have_print = json.loads(metadata["fingerprint"]), fingerprint(model, architecture=architecture)
        differing = []
        for section in ("architecture", "weights"):
            a, b = saved_print.get(section, {}), have_print.get(section, {})
            differing += [f"{key}: file {a.get(key)!r}, model {b.get(key)!r}"
                          for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
        if differing:
            raise AdapterMismatchError(
                f"{path}: the adapter was trained on a different base model; differing fields: "
                + "; ".join(differing) + ". Pass ignore_fingerprint=True to load it anyway")
    model.load_state_dict({name: shard_like(tensor, own[name]) for name, tensor in tensors.items()}, strict=False)
