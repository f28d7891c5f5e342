"""Load and save Phi-3 checkpoint directories in the Hugging Face layout, without transformers.

Layout: `config.json`, optional `generation_config.json`, and either `model.safetensors` or shards
`model-0000N-of-0000M.safetensors` listed by `model.safetensors.index.json` (`{"weight_map": {name: file}}`).

Loading builds the model on the meta device, checks every tensor's name, shape and dtype against the
config before reading any data, then materialises each tensor once. On CPU in the checkpoint's dtype the
parameters are zero-copy views of the memory-mapped files (private mappings: writing to a parameter
never touches the file), so peak memory is the weights' size and pages are read on first use. Otherwise
each tensor is read into its own buffer, converted or moved, and the buffer freed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora.atomic import atomic_directory
from lora.phi3.config import Phi3Config
from lora.phi3.model import Phi3ForCausalLM
from lora.sharding import is_sharded

__all__ = ["CheckpointPlan", "from_pretrained", "plan_checkpoint", "save_pretrained"]

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype strings this model can hold.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _open(path: Path, backend: str = "mmap") -> Any:
    """`safe_open` whose errors (a truncated or corrupt file) name the file."""
    try:
        return safe_open(path, framework="pt", backend=backend)
    except Exception as err:  # safetensors raises its own SafetensorError and OSErrors
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def _read_json(path: Path) -> Any:
    """`json.loads` of a file; a malformed one is a ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _weight_files(root: Path) -> dict[str, Path]:
    """Map each tensor name to its file, from the index when there is one; errors name the missing file."""
    index = root / INDEX_NAME
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        for name, shard in weight_map.items():
            # A shard is a file of this directory: never a path elsewhere (`../x.safetensors`, `/etc/...`).
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise ValueError(f"{index}: tensor {name!r} maps to {shard!r}, not a file name in {root}")
        files = {name: root / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: shard listed in {index} is missing")
        return files
    single = root / SINGLE_FILE_NAME
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(f"{root}: neither {INDEX_NAME} nor {SINGLE_FILE_NAME} found")


def _read_headers(files: dict[str, Path]) -> dict[str, tuple[list[int], str]]:
    """Shape and safetensors dtype string of every tensor the index promises, checked against the files."""
    headers: dict[str, tuple[list[int], str]] = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            present = set(f.keys())
            for name in (n for n, p in files.items() if p == path):
                if name not in present:
                    raise ValueError(f"{path}: tensor {name!r} listed in the index is not in the file")
                tensor = f.get_slice(name)
                headers[name] = (tensor.get_shape(), tensor.get_dtype())
    return headers


def _check_tensors(model: Phi3ForCausalLM, headers: dict[str, tuple[list[int], str]], root: Path) -> None:
    """Raise unless the checkpoint holds exactly the model's tensors, with the config's shapes."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    # A tied head is the embedding; transformers' save omits it, but a file that also stores it is fine.
    optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(headers) - optional)
    unexpected = sorted(set(headers) - set(expected) - optional)
    if missing:
        raise ValueError(f"{root}: {len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:5])}")
    if unexpected:
        raise ValueError(
            f"{root}: {len(unexpected)} unexpected tensor(s) in the checkpoint: {', '.join(unexpected[:5])}"
        )
    for name, (shape, dtype) in sorted(headers.items()):
        if name in expected and tuple(shape) != expected[name]:
            raise ValueError(
                f"{root}: tensor {name!r} has shape {tuple(shape)}, but config.json implies {expected[name]}"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"{root}: tensor {name!r} has dtype {dtype}; supported: {', '.join(sorted(_DTYPES))}")


def _resolve_dtype(
    dtype: torch.dtype | str | None, headers: dict[str, tuple[list[int], str]], config: Phi3Config
) -> torch.dtype:
    """The requested dtype, else the checkpoint's (config.json's `dtype` if the file mixes dtypes)."""
    if isinstance(dtype, str):
        name = dtype
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {name!r} is not supported; expected one of {', '.join(_DTYPE_NAMES.values())}")
    if dtype is None:
        stored = {d for _, d in headers.values()}
        if len(stored) == 1:
            return _DTYPES[stored.pop()]
        dtype = getattr(torch, config.dtype or "", None)
        if dtype is None:
            raise ValueError(f"checkpoint mixes dtypes {sorted(stored)} and config.json names none; pass dtype=")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} is not supported; expected one of {', '.join(_DTYPE_NAMES.values())}")
    return dtype


@dataclass
class CheckpointPlan:
    """A checked checkpoint directory: the model on the meta device (in `dtype`) and where each tensor lives.

    Every tensor's name, shape and dtype has been checked against config.json; no data has been read.
    """

    root: Path
    model: Phi3ForCausalLM
    dtype: torch.dtype
    files: dict[str, Path]
    headers: dict[str, tuple[list[int], str]]
    generation: dict[str, Any]

    def read_rows(self, name: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows `[start, stop)` (dim 0) of tensor `name`, read from its file alone, in `dtype` on `device`."""
        with _open(self.files[name], "pread") as f:
            return f.get_slice(name)[start:stop].to(device=device, dtype=self.dtype)


def plan_checkpoint(path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None) -> CheckpointPlan:
    """Check a Phi-3 checkpoint directory and build its model on the meta device; read no tensor data."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory; expected a Hugging Face checkpoint directory")
    config = Phi3Config.from_json(root / CONFIG_NAME)
    generation_path = root / GENERATION_CONFIG_NAME
    generation = _read_json(generation_path) if generation_path.is_file() else {}
    if not isinstance(generation, dict):
        raise ValueError(f"{generation_path}: expected a JSON object")
    files = _weight_files(root)
    headers = _read_headers(files)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    _check_tensors(model, headers, root)
    dtype = _resolve_dtype(dtype, headers, config)
    config.dtype = _DTYPE_NAMES[dtype]
    model.name_or_path = str(root)
    model.generation_config = generation
    return CheckpointPlan(root, model.to(dtype), dtype, files, headers, generation)


def from_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> Phi3ForCausalLM:
    """Load a Phi-3 checkpoint directory; parameters in `dtype` (default: the checkpoint's) on `device`.

    Every name, shape and dtype is checked before any data is read, so an error leaves nothing behind.
    Example: `model = from_pretrained("Phi-3-mini-4k-instruct")` (bf16 on CPU, memory-mapped).
    """
    plan = plan_checkpoint(path, dtype=dtype)
    model, dtype, files, headers = plan.model, plan.dtype, plan.files, plan.headers
    device = torch.device(device if device is not None else "cpu")

    params = dict(model.named_parameters())
    for path_ in sorted(set(files.values())):
        names = [n for n, p in files.items() if p == path_ and n in params]
        zero_copy = device.type == "cpu" and all(_DTYPES[headers[n][1]] == dtype for n in names)
        # mmap gives views of the page cache; pread gives a private buffer per tensor that dies after
        # conversion, so a cast or a device move never keeps a second copy of the file mapped.
        with _open(path_, "mmap" if zero_copy else "pread") as f:
            for name in names:
                tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string such as "5GB" (10^9) or "2GiB" (2^30)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
        if match is None:
            raise ValueError(f"max_shard_size must be an int or a size like '5GB' or '500MiB', got {size!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split in order into groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_pretrained(model: Phi3ForCausalLM, path: str | os.PathLike[str], *, max_shard_size: int | str = "5GB") -> None:
    """Write `model` as a checkpoint directory that transformers' and our `from_pretrained` load.

    One `model.safetensors` when everything fits in `max_shard_size`, else numbered shards plus
    `model.safetensors.index.json`. Written with `lora.atomic.atomic_directory`: the directory is replaced
    as a whole (a crash leaves the old save or the new one, never new weights beside an old config);
    other files of an existing `path`, such as the tokenizer's, are carried over.
    """
    root = Path(path)
    if is_sharded(model):
        raise ValueError("save_pretrained needs the whole model in one process, not one sharded with FSDP2 (save "
                         "the adapter with lora.save_adapter, on every rank; the base is the checkpoint it came from)")
    max_bytes = _parse_size(max_shard_size)
    tensors = {
        name: tensor.detach()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_word_embeddings and name == "lm_head.weight")
    }
    dtypes = {t.dtype for t in tensors.values()}
    config = model.config.to_dict()
    config["dtype"] = _DTYPE_NAMES.get(dtypes.pop()) if len(dtypes) == 1 else model.config.dtype
    generation = model.generation_config or {
        k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    # The files of an earlier save are replaced as a whole; anything else there (a tokenizer) is carried over.
    ours = {INDEX_NAME, CONFIG_NAME, GENERATION_CONFIG_NAME}
    with atomic_directory(root, carry=lambda name: name not in ours and not _WEIGHT_FILE.fullmatch(name)) as tmp:
        for name, shard in zip(names, shards, strict=True):
            # One shard at a time on the host: a GPU model never needs a full CPU copy.
            host = {k: t.contiguous().cpu() for k, t in shard.items()}
            save_file(host, tmp / name, metadata={"format": "pt"})
        if len(shards) > 1:
            weight_map = {t: name for name, shard in zip(names, shards, strict=True) for t in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / CONFIG_NAME, config)
        _write_json(tmp / GENERATION_CONFIG_NAME, generation)
