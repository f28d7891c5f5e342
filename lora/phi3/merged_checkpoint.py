"""`merge_and_save`: merge the adapters into the base weights and write a plain checkpoint that transformers loads.

The merged weights are computed and written one tensor at a time, straight into safetensors files, so
the model is never held twice in memory. Before the directory is renamed into place, the written
checkpoint is loaded back (memory-mapped) and its logits on a fixed probe batch are compared with the
adapted model's; a difference beyond the dtype's tolerance raises instead of leaving a merged model
that behaves differently from adapter + base.

On a 4-bit (QLoRA) base every projection is written as `dequantize(W4) + delta` in the dtype the 4-bit
weights dequantize to (bf16 or float32): the weights the adapters were trained against, in a plain checkpoint
without `quantization_config`. The check then compares that plain model's logits with the 4-bit model +
adapters, at the same tolerances: what differs is one rounding of `W + delta` to the weight's dtype.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora import quant
from lora.atomic import atomic_directory
from lora.layers import lora_layers
from lora.phi3.checkpoint import from_pretrained, parse_size, plan_shards, write_shard_index
from lora.sharding import is_sharded

__all__ = ["merge_and_save", "MergeVerificationError"]

# Files of a checkpoint directory that are not weights, copied beside the merged model.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "byte_tokenizer.json",
)
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# max |merged - adapted| logits allowed, relative to max(1, max |logits|): merging rounds W + delta once
# to the weight's dtype, which the adapted forward never does.
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


class MergeVerificationError(RuntimeError):
    """The merged checkpoint's logits differ from adapter + base beyond tolerance; nothing was written."""


def _tensor_plan(model: nn.Module) -> list[tuple[str, torch.Size, torch.dtype, Callable[[], torch.Tensor]]]:
    """(name, shape, dtype, produce) for every tensor of the plain checkpoint, in state-dict order."""
    adapted = dict(lora_layers(model))
    # 4-bit weights (adapted or not) by their name: written dequantized, their quant-state keys left out
    packed = {f"{name}.weight": m.weight for name, m in model.named_modules()
              if quant.is_quantized(m._parameters.get("weight"))}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    plan = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in adapted and leaf in adapted[module_name].adapter_parameter_names():
            continue
        if tied and name == "lm_head.weight":
            continue
        if any(name.startswith(weight + ".") for weight in packed):
            continue  # `<weight>.absmax` and the rest of a 4-bit weight's quant state
        layer = adapted.get(module_name)
        shape, dtype = quant.logical_shape(tensor), quant.logical_dtype(tensor)
        if layer is not None and leaf == "weight" and (layer.has_lora or name in packed):
            produce = layer.merged_weight_tensor
        elif name in packed:
            produce = functools.partial(quant.dequantize, packed[name])
        else:
            produce = tensor.detach
        plan.append((name, shape, dtype, produce))
    return plan


def _write_safetensors(path: Path, items: list[tuple[str, torch.Size, torch.dtype, Callable[[], torch.Tensor]]]):
    """Write a safetensors file, computing each tensor just before its bytes are written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in items:
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written (float32, bfloat16 or float16 expected)")
        nbytes = shape.numel() * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, dtype, produce in items:
            tensor = produce().detach().to("cpu").contiguous()
            if tensor.shape != shape or tensor.dtype != dtype:
                raise RuntimeError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"expected {tuple(shape)} {dtype}")
            f.write(memoryview(tensor.view(torch.uint8).numpy()))
            del tensor
        f.flush()
        os.fsync(f.fileno())


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def merge_and_save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    probe_ids: torch.Tensor | None = None,
    tolerance: float | None = None,
    overwrite: bool = False,
) -> float:
    """Write `model` with every adapter merged as a plain Phi-3 checkpoint directory at `path`.

    `model` itself stays unmerged. Tokenizer files and `generation_config.json` of the directory the
    model was loaded from are copied beside it. Returns the largest |logit| difference between the
    written checkpoint and adapter + base on `probe_ids` (default: a fixed 2 x 16 batch); raises
    `MergeVerificationError` and writes nothing when it exceeds `tolerance` (default by dtype:
    1e-4 for float32, 3e-2 for bfloat16, relative to the logits' scale). `path` must not exist yet,
    or be an empty directory; `overwrite=True` replaces an earlier merged checkpoint there, as a whole and
    only once the new one is complete and verified (`lora.atomic.atomic_directory`).

    >>> diff = merge_and_save(model, "phi3-merged")  # doctest: +SKIP
    """
    root = Path(path)
    if root.exists() and (not root.is_dir() or (not overwrite and any(root.iterdir()))):
        raise FileExistsError(f"{root}: already exists and is not an empty directory; choose a new path "
                              "(or pass overwrite=True to replace a directory)")
    if not any(lora_layers(model, adapted_only=True)):
        raise ValueError("the model has no adapters to merge (patch it or load an adapter first)")
    if is_sharded(model):
        raise ValueError("merge_and_save needs the whole model in one process, not one sharded with FSDP2: after "
                         "training, load the base (from_pretrained), patch it the same way, load_adapter the saved "
                         "adapter file and merge that")
    parse_size(max_shard_size)  # a bad size is refused before anything else
    plan = {item[0]: item for item in _tensor_plan(model)}
    sizes = {name: shape.numel() * dtype.itemsize for name, shape, dtype, _ in plan.values()}
    files = plan_shards(sizes, max_shard_size)

    vocab = int(model.config.vocab_size)
    ids = probe_ids if probe_ids is not None else (torch.arange(32).view(2, 16) * 7919 + 11) % vocab
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"probe_ids must be a non-empty 2-D integer tensor (batch, length), got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"probe_ids must be token ids in [0, {vocab}) (the model's vocab_size), got ids from "
                         f"{int(ids.min())} to {int(ids.max())}")
    was_training = model.training
    model.eval()
    try:
        with atomic_directory(root, replace=overwrite) as tmp:
            # unadapted bnb 4-bit projections as in training, not through bnb's bf16 eval kernel: the merged
            # checkpoint holds their dequantized weights, computed in the model's dtype
            with torch.no_grad(), quant.no_cpu_repack(model):
                expected = _logits(model, ids)
            for file, names in files.items():
                _write_safetensors(tmp / file, [plan[name] for name in names])
            write_shard_index(tmp, files, sizes)
            config = model.config.to_dict()
            dtypes = {item[2] for item in plan.values()}
            if len(dtypes) == 1:
                config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
            config.pop("torch_dtype", None)
            config.pop("quantization_config", None)  # a 4-bit base is written dequantized, + delta
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            source = getattr(model, "name_or_path", None)
            source = Path(source) if source and Path(source).is_dir() else None
            for side in SIDE_FILES:
                if source is not None and (source / side).is_file():
                    shutil.copy2(source / side, tmp / side)
            if not (tmp / "generation_config.json").exists():
                generation = getattr(model, "generation_config", None)
                generation = generation.to_dict() if hasattr(generation, "to_dict") else dict(generation or {})
                (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")

            merged = from_pretrained(tmp)
            with torch.no_grad():
                actual = _logits(merged, ids)
            del merged
            difference = (actual - expected).abs().max().item()
            weight_dtype = next(item[2] for item in plan.values() if item[0].endswith("proj.weight"))
            limit = (tolerance if tolerance is not None
                     else _TOLERANCE[weight_dtype] * max(1.0, expected.abs().max().item()))
            if not difference <= limit:
                raise MergeVerificationError(
                    f"merged checkpoint's logits differ from adapter + base by {difference:.3g} on the probe "
                    f"batch (allowed {limit:.3g}); nothing was written to {root}")
        return difference
    finally:
        model.train(was_training)
