"""Load and save Phi-3 checkpoint directories in the Hugging Face layout, without transformers.

Layout: `config.json`, optional `generation_config.json`, and either `model.safetensors` or shards
`model-0000N-of-0000M.safetensors` listed by `model.safetensors.index.json` (`{"weight_map": {name: file}}`).

Loading builds the model on the meta device, checks every tensor's name, shape and dtype against the
config before reading any data, then materialises each tensor once. On CPU in the checkpoint's dtype the
parameters are zero-copy views of the memory-mapped files (private mappings: writing to a parameter
never touches the file), so peak memory is the weights' size and pages are read on first use. Otherwise
each tensor is read into its own buffer, converted or moved, and the buffer freed.

QLoRA: `from_pretrained(path, quantize="nf4")` (or `"fp4"`) quantizes the four projections of every layer
to 4 bits as they are read, one tensor at a time (read, cast, quantize, free), so the bf16 model is never held;
they become bitsandbytes' own `Linear4bit` modules (`lora.quant`). Embeddings, norms and `lm_head` stay in
`dtype`. `save_pretrained` of such a model writes transformers' bitsandbytes serialisation (packed weights,
their quant states, `quantization_config` in config.json), which the next `from_pretrained` (ours or
transformers') loads as it is, without quantizing again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora import quant
from lora.atomic import atomic_directory
from lora.layers import check_flags
from lora.phi3.config import Phi3Config, read_json
from lora.phi3.model import Phi3ForCausalLM
from lora.sharding import is_sharded

__all__ = [
    "CheckpointPlan", "from_pretrained", "parse_size", "plan_checkpoint", "plan_shards", "save_pretrained",
    "write_shard_index",
]

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype strings this model can hold.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
# The projections a 4-bit load quantizes (transformers' too: every nn.Linear but lm_head).
_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))\.weight")
# What transformers and bitsandbytes save beside each packed weight (`<name>.weight.<suffix>`).
_QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_QUANT_STATE_BLOB = "quant_state.bitsandbytes__"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _open(path: Path, backend: str = "mmap") -> Any:
    """`safe_open` whose errors (a truncated or corrupt file) name the file."""
    try:
        return safe_open(path, framework="pt", backend=backend)
    except Exception as err:  # safetensors raises its own SafetensorError and OSErrors
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def _weight_files(root: Path) -> dict[str, Path]:
    """Map each tensor name to its file; errors name the missing file.

    `model.safetensors` wins over an index, as in transformers' `from_pretrained`: a directory that transformers
    re-saved in the other layout can keep the stale one, and both stacks must load the same weights from it.
    """
    single = root / SINGLE_FILE_NAME
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    index = root / INDEX_NAME
    if index.is_file():
        data = read_json(index)
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
    raise FileNotFoundError(f"{root}: neither {SINGLE_FILE_NAME} nor {INDEX_NAME} found")


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


def _check_tensors(model: Phi3ForCausalLM, headers: dict[str, tuple[list[int], str]], root: Path,
                   quant_type: str | None = None) -> None:
    """Raise unless the checkpoint holds exactly the model's tensors, with the config's shapes.

    With `quant_type` (a 4-bit checkpoint) each projection weight is packed uint8 of (out * in / 2, 1)
    with its quant-state tensors beside it.
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if quant_type is not None:
        headers = dict(headers)
        for name in [n for n in expected if _PROJECTION.fullmatch(n)]:
            out_features, in_features = expected[name]
            packed = headers.get(name)
            if packed is None:
                continue  # reported as missing below
            if packed[1] != "U8" or tuple(packed[0]) != ((out_features * in_features + 1) // 2, 1):
                raise ValueError(f"{root}: tensor {name!r} is {packed[1]} {tuple(packed[0])}; a 4-bit checkpoint "
                                 f"holds it packed, U8 {((out_features * in_features + 1) // 2, 1)}")
            blob = f"{name}.{_QUANT_STATE_BLOB}{quant_type}"
            needed = [f"{name}.absmax", f"{name}.quant_map", blob]
            absent = [key for key in needed if key not in headers]
            if absent:
                raise ValueError(f"{root}: the 4-bit weight {name!r} lacks its quant state ({', '.join(absent)}); "
                                 f"config.json says bnb_4bit_quant_type={quant_type!r}")
            for key in [*needed, *(f"{name}.{suffix}" for suffix in _QUANT_SUFFIXES[2:])]:
                headers.pop(key, None)
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
        if quant_type is not None and _PROJECTION.fullmatch(name):
            continue  # checked packed, above
        if name in expected and tuple(shape) != expected[name]:
            raise ValueError(
                f"{root}: tensor {name!r} has shape {tuple(shape)}, but config.json implies {expected[name]}"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"{root}: tensor {name!r} has dtype {dtype}; supported: {', '.join(sorted(_DTYPES))}")


def _saved_quantization(config: Phi3Config, root: Path) -> dict[str, Any] | None:
    """config.json's bitsandbytes 4-bit `quantization_config` (transformers' keys), checked; None without one."""
    saved = config.extra.get("quantization_config")
    if saved is None:
        return None
    if not isinstance(saved, dict) or saved.get("quant_method") != "bitsandbytes" or not saved.get("load_in_4bit"):
        raise ValueError(f"{root / CONFIG_NAME}: quantization_config {saved!r} is not a bitsandbytes 4-bit one "
                         "(quant_method 'bitsandbytes', load_in_4bit true); only those load here")
    if saved.get("bnb_4bit_quant_type") not in quant.QUANT_TYPES:
        raise ValueError(f"{root / CONFIG_NAME}: bnb_4bit_quant_type {saved.get('bnb_4bit_quant_type')!r} is not one "
                         f"of {', '.join(quant.QUANT_TYPES)}")
    return saved


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict[str, Any]:
    """transformers' `BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()` for these settings, as config.json
    holds it (so transformers' `from_pretrained` loads the directory as a prequantized 4-bit model)."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": _DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


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


def plan_checkpoint(
    path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None, allow_quantized: bool = False
) -> CheckpointPlan:
    """Check a Phi-3 checkpoint directory and build its model on the meta device; read no tensor data.

    A 4-bit directory (`quantization_config` in config.json) is refused unless `allow_quantized`: its packed
    weights cannot be read as rows of `dtype` (what `lora.phi3.fsdp` does with a plan).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory; expected a Hugging Face checkpoint directory")
    config = Phi3Config.from_json(root / CONFIG_NAME)
    generation_path = root / GENERATION_CONFIG_NAME
    generation = read_json(generation_path) if generation_path.is_file() else {}
    if not isinstance(generation, dict):
        raise ValueError(f"{generation_path}: expected a JSON object")
    files = _weight_files(root)
    headers = _read_headers(files)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    saved = _saved_quantization(config, root)
    if saved is not None and not allow_quantized:
        raise ValueError(f"{root}: a 4-bit (bitsandbytes) checkpoint; load it whole with lora.phi3.from_pretrained "
                         "(FSDP2 cannot shard packed 4-bit weights)")
    _check_tensors(model, headers, root, None if saved is None else saved["bnb_4bit_quant_type"])
    if saved is not None:  # the packed weights' U8 says nothing of the model's dtype
        headers = {name: header for name, header in headers.items() if header[1] in _DTYPES}
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
    quantize: str | None = None,
    double_quant: bool = True,
) -> Phi3ForCausalLM:
    """Load a Phi-3 checkpoint directory; parameters in `dtype` (default: the checkpoint's) on `device`.

    Every name, shape and dtype is checked before any data is read, so an error leaves nothing behind.
    Example: `model = from_pretrained("Phi-3-mini-4k-instruct")` (bf16 on CPU, memory-mapped).

    `quantize="nf4"` or `"fp4"` (QLoRA; needs the `qlora` extra) stores the four projections of every layer in
    4 bits (bitsandbytes `Linear4bit`, blocks of 64, the block scales quantized too with `double_quant`), each
    quantized right after it is read; they dequantize to `dtype`, the dtype everything else keeps. A directory
    written by `save_pretrained` of a 4-bit model (or by transformers) loads as it is, without quantizing
    again; `quantize` may then be omitted or must name its type.
    Example: `model = from_pretrained("Phi-3-mini-4k-instruct", dtype=torch.bfloat16, quantize="nf4")`.
    """
    if quantize is not None and quantize not in quant.QUANT_TYPES:
        raise ValueError(f"quantize={quantize!r} is not a 4-bit type; expected one of {', '.join(quant.QUANT_TYPES)} "
                         "(or None for no quantization)")
    check_flags(double_quant=double_quant)
    plan = plan_checkpoint(path, dtype=dtype, allow_quantized=True)
    model, dtype, files, headers = plan.model, plan.dtype, plan.files, plan.headers
    device = torch.device(device if device is not None else "cpu")
    saved = _saved_quantization(model.config, plan.root)
    if saved is not None and quantize not in (None, saved["bnb_4bit_quant_type"]):
        raise ValueError(f"{plan.root}: the checkpoint is already quantized to {saved['bnb_4bit_quant_type']}; "
                         f"quantize={quantize!r} would need the original weights (pass quantize=None to load it)")
    if saved is not None or quantize is not None:
        quant.require_bitsandbytes()
    if quantize is not None and saved is None:
        for name, (shape, _) in sorted(headers.items()):
            if _PROJECTION.fullmatch(name):
                quant.check_quantizable(name, tuple(shape), quantize)
        model.config.extra["quantization_config"] = quantization_config(quantize, bool(double_quant), dtype)
    if saved is not None:
        _load_prequantized(model, plan, device)
        return model

    params = dict(model.named_parameters())
    for path_ in sorted(set(files.values())):
        names = [n for n, p in files.items() if p == path_ and n in params]
        zero_copy = (quantize is None and device.type == "cpu"
                     and all(_DTYPES[headers[n][1]] == dtype for n in names))
        # mmap gives views of the page cache; pread gives a private buffer per tensor that dies after
        # conversion, so a cast or a device move never keeps a second copy of the file mapped (and a 4-bit
        # load never holds more than one projection in `dtype`).
        with _open(path_, "mmap" if zero_copy else "pread") as f:
            for name in names:
                tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                module_name, _, attr = name.rpartition(".")
                if quantize is not None and _PROJECTION.fullmatch(name):
                    packed = quant.quantize_weight(tensor, quant_type=quantize, double_quant=bool(double_quant))
                    del tensor
                    _set_module(model, module_name, quant.linear4bit(packed, None, compute_dtype=dtype))
                    _return_freed_memory()
                else:
                    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`; nothing elsewhere).

    glibc serves allocations below its mmap threshold from the heap, and the threshold grows to 32 MB as large
    buffers are freed: the bf16 buffers a 4-bit load reads and frees one by one then stay resident between the
    packed weights it keeps (0.15 GB of a 1.3 GB 4-layer load's peak, measured).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _load_prequantized(model: Phi3ForCausalLM, plan: CheckpointPlan, device: torch.device) -> None:
    """Fill `model` from a 4-bit checkpoint: each packed projection with its quant state becomes a `Linear4bit`
    (bitsandbytes' `Params4bit.from_prequantized`), everything else a Parameter in `plan.dtype`."""
    bnb = quant.require_bitsandbytes()
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, file in plan.files.items():
        by_file.setdefault(file, []).append(name)
    stats: dict[str, dict[str, torch.Tensor]] = {}
    packed: dict[str, torch.Tensor] = {}
    for file in sorted(by_file):
        with _open(file, "pread") as f:
            for name in by_file[file]:
                # the packed weight itself, `<weight>.absmax` and the like, `<weight>.quant_state.bitsandbytes__nf4`
                candidates = (name, *(name.rsplit(".", k)[0] for k in (1, 2)))
                owner = next((p for p in candidates if _PROJECTION.fullmatch(p)), None)
                if owner is not None and owner != name:  # `<projection>.weight.<quant state key>`
                    stats.setdefault(owner, {})[name[len(owner) + 1:]] = f.get_tensor(name)
                elif owner is not None:
                    packed[name] = f.get_tensor(name)
                elif name in params:
                    tensor = f.get_tensor(name).to(device=device, dtype=plan.dtype)
                    module_name, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor))
    for name, data in packed.items():
        weight = bnb.nn.Params4bit.from_prequantized(data, stats[name], device=device)
        weight.quant_state.dtype = plan.dtype  # what it dequantizes to: the model's dtype, as a fresh quantization
        _set_module(model, name.rpartition(".")[0], quant.linear4bit(weight, None, compute_dtype=plan.dtype))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def parse_size(size: int | str) -> int:
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


def plan_shards(sizes: dict[str, int], max_shard_size: int | str) -> dict[str, list[str]]:
    """The checkpoint's files and the tensors each holds: `sizes` (name: bytes) split in order into files of at
    most `max_shard_size` bytes (a larger tensor gets a file of its own), named `model.safetensors` when one
    file holds everything, else `model-0000i-of-0000n.safetensors`.

    Example: `plan_shards({"a": 6, "b": 6}, 10) == {"model-00001-of-00002.safetensors": ["a"], ...}`.
    """
    max_bytes = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        return {SINGLE_FILE_NAME: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": names for i, names in enumerate(shards)}


def write_shard_index(directory: Path, files: dict[str, list[str]], sizes: dict[str, int]) -> None:
    """Write `model.safetensors.index.json` for the files of `plan_shards` (nothing for a single file)."""
    if len(files) > 1:
        weight_map = {name: file for file, names in files.items() for name in names}
        _write_json(directory / INDEX_NAME, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_pretrained(model: Phi3ForCausalLM, path: str | os.PathLike[str], *, max_shard_size: int | str = "5GB") -> None:
    """Write `model` as a checkpoint directory that transformers' and our `from_pretrained` load.

    One `model.safetensors` when everything fits in `max_shard_size`, else numbered shards plus
    `model.safetensors.index.json`. A 4-bit model (`from_pretrained(..., quantize="nf4")`) is written packed, in
    transformers' bitsandbytes layout (`quantization_config` in config.json). Written with
    `lora.atomic.atomic_directory`: the directory is replaced
    as a whole (a crash leaves the old save or the new one, never new weights beside an old config);
    other files of an existing `path`, such as the tokenizer's, are carried over.
    """
    root = Path(path)
    if is_sharded(model):
        raise ValueError("save_pretrained needs the whole model in one process, not one sharded with FSDP2 (save "
                         "the adapter with lora.save_adapter, on every rank; the base is the checkpoint it came from)")
    parse_size(max_shard_size)  # a bad size is refused before anything else
    tensors = {
        name: tensor.detach()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_word_embeddings and name == "lm_head.weight")
    }
    dtypes = {t.dtype for t in tensors.values()}
    config = model.config.to_dict()
    config["dtype"] = _DTYPE_NAMES.get(dtypes.pop()) if len(dtypes) == 1 else model.config.dtype
    config.pop("quantization_config", None)
    states = {(s.quant_type, bool(s.nested)) for s in (quant.quant_state_of(m.weight) for m in model.modules()
                                                       if quant.is_quantized(getattr(m, "weight", None)))}
    if len(states) > 1:
        raise ValueError(f"save_pretrained: the model mixes 4-bit settings {sorted(states)} (quant type, double "
                         "quant); transformers' quantization_config holds one")
    if states:  # packed weights and their quant states are in `tensors` (bitsandbytes' state-dict keys)
        quant_type, double_quant = states.pop()
        config["quantization_config"] = quantization_config(quant_type, double_quant, getattr(torch, config["dtype"]))
    generation = model.generation_config or {
        k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    sizes = {name: tensor.numel() * tensor.element_size() for name, tensor in tensors.items()}
    files = plan_shards(sizes, max_shard_size)

    # The files of an earlier save are replaced as a whole; anything else there (a tokenizer) is carried over.
    ours = {INDEX_NAME, CONFIG_NAME, GENERATION_CONFIG_NAME}
    with atomic_directory(root, carry=lambda name: name not in ours and not _WEIGHT_FILE.fullmatch(name)) as tmp:
        for file, names in files.items():
            # One shard at a time on the host: a GPU model never needs a full CPU copy.
            host = {name: tensors[name].contiguous().cpu() for name in names}
            save_file(host, tmp / file, metadata={"format": "pt"})
        write_shard_index(tmp, files, sizes)
        _write_json(tmp / CONFIG_NAME, config)
        _write_json(tmp / GENERATION_CONFIG_NAME, generation)
