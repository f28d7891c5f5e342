"""4-bit base weights (QLoRA): bitsandbytes' NF4/FP4 `Params4bit`, recognised and dequantized here.

A quantized projection is bitsandbytes' own `bnb.nn.Linear4bit`: its `weight` is a `Params4bit`, a
uint8 tensor of shape `(out * in / 2, 1)` (two 4-bit codes a byte) with a `quant_state` holding the
per-block scales (`absmax`, one per block of 64 weights, themselves quantized to 8 bits with
`double_quant`), the code book, the logical `(out, in)` shape and the dtype it was quantized from. Using
bitsandbytes' classes rather than our own keeps its kernels, its `.to("cuda")` semantics and
transformers' serialisation (`weight.absmax`, `weight.quant_map`, ... keys; `quantization_config`).

bitsandbytes is optional (`pip install "purelora[qlora]"`) and imported only when a weight is quantized
or a quantization is asked for: the rest of `lora` never needs it.

>>> packed = quantize_weight(torch.randn(64, 128), quant_type="nf4")  # doctest: +SKIP
>>> dequantize(packed).shape                                           # doctest: +SKIP
torch.Size([64, 128])
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

from .lowrank import one_thread

__all__ = [
    "BLOCKSIZE",
    "QUANT_TYPES",
    "QuantizedMergeError",
    "check_quantizable",
    "dequantize",
    "is_quantized",
    "linear4bit",
    "logical_dtype",
    "logical_shape",
    "no_cpu_repack",
    "quant_state_entries",
    "quant_state_from_entries",
    "quant_state_of",
    "quantize_weight",
    "require_bitsandbytes",
    "standard_layout",
]

# bitsandbytes' default block (and the QLoRA paper's): one absmax scale per 64 weights.
BLOCKSIZE = 64
QUANT_TYPES = ("nf4", "fp4")
QuantType = Literal["nf4", "fp4"]
# Packed weights up to this size (1 M weights) are dequantized on one CPU thread (see dequantize).
SMALL_PACKED_BYTES = 2**19
# Weights quantized at a time (whole rows; see quantize_weight): 4 M, a transient of about 30 MB.
QUANT_CHUNK = 2**22
EXTRA = 'pip install "purelora[qlora]" (or pip install bitsandbytes)'


class QuantizedMergeError(RuntimeError):
    """An in-model merge was asked of a layer whose base weight is 4-bit: `W + delta` has no 4-bit form that
    equals it, and rounding it back to 4 bits would change the model; use `lora.phi3.merge_and_save`."""


def require_bitsandbytes() -> ModuleType:
    """`bitsandbytes`, imported now; an `ImportError` naming the `qlora` extra when it is missing."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"4-bit (QLoRA) base weights need bitsandbytes, which is not installed: {EXTRA}") from err
    return bitsandbytes


def is_quantized(weight: Any) -> bool:
    """Whether `weight` is a packed 4-bit bitsandbytes weight (a tensor with a `quant_state`), whatever the
    dtype its bytes are stored as (uint8, or transformers' `bnb_4bit_quant_storage=torch.bfloat16` for FSDP)."""
    return isinstance(weight, torch.Tensor) and getattr(weight, "quant_state", None) is not None


def quant_state_of(weight: torch.Tensor) -> Any:
    """The bitsandbytes `QuantState` of a packed weight; a `TypeError` for anything else."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise TypeError(f"expected a bitsandbytes 4-bit weight (Params4bit with a quant_state); got a "
                        f"{type(weight).__name__} of dtype {weight.dtype}")
    return state


def logical_shape(weight: torch.Tensor) -> torch.Size:
    """The (out, in) shape a weight computes with: its own, or the one a packed 4-bit weight was quantized from."""
    return torch.Size(quant_state_of(weight).shape) if is_quantized(weight) else weight.shape


def logical_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a weight computes in: its own, or the one a packed 4-bit weight dequantizes to (the one it was
    quantized from, also after bnb's CPU repack, which labels its state bfloat16)."""
    if not is_quantized(weight):
        return weight.dtype
    state = quant_state_of(weight)
    return state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype


def _unpacked_for_cpu(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    # bnb's Linear4bit repacks its weight in place into an AVX512-BF16 layout the first time it runs in eval mode
    # without grad on such a CPU; dequantize_4bit reads only the standard layout, so undo it: into a new tensor and
    # a copy of the state, since bnb's inverse rewrites the state it is given (the weight's own, still packed).
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    return data, state


def standard_layout(weight: torch.Tensor) -> None:
    """Put a packed 4-bit weight that bnb's CPU repack rewrote back into the standard layout, in place (as bnb's
    own `Linear4bit` does before it saves or moves to a GPU); a no-op for anything else."""
    if is_quantized(weight) and getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _unpacked_for_cpu(weight.data, weight.quant_state)


@contextlib.contextmanager
def no_cpu_repack(model: nn.Module) -> Iterator[None]:
    """bnb's `Linear4bit` modules of `model` compute as in training for the duration (dequantized, in their
    compute dtype) instead of through the AVX512-BF16 kernel bnb switches to in eval mode without grad (bf16
    whatever the model's dtype); their weights are left in the standard layout."""
    modules = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for module in modules:
        standard_layout(module.weight)
        module.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for module in modules:
            module.support_avx512bf16_for_cpu = True


def dequantize(weight: torch.Tensor, state: Any = None) -> torch.Tensor:
    """The (out, in) weight a packed 4-bit one stands for, in its `logical_dtype`: a new tensor each call.

    `state` defaults to `weight.quant_state` (pass it where `weight` is the packed data alone, as
    autograd hands saved tensors back). Costs one pass over the weight (bitsandbytes' kernel).
    """
    bnb = require_bitsandbytes()
    state = quant_state_of(weight) if state is None else state
    data, state = _unpacked_for_cpu(weight.detach(), state)
    if data.numel() > SMALL_PACKED_BYTES:
        return bnb.functional.dequantize_4bit(data, state)
    # A small weight on one CPU thread: its two kernels (the nested scales, then the weights) each open a
    # parallel region, and on a busy 2-core machine waiting for the second thread cost 8 ms a kernel where the
    # work takes 0.04 ms (a 768 x 128 weight: 15 ms with 2 threads, 0.04 ms with 1, measured under load).
    with one_thread(data.device):
        return bnb.functional.dequantize_4bit(data, state)


def quant_state_entries(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes (and transformers) save beside a packed weight, by name under `weight.`:
    `absmax`, `quant_map`, `nested_absmax`, `nested_quant_map`, `quant_state.bitsandbytes__nf4`
    (the last one a JSON blob of the shape, dtype, block size and type, as uint8)."""
    standard_layout(weight)  # as bnb's Linear4bit does before it saves
    return {key: value.detach() for key, value in quant_state_of(weight).as_dict(packed=True).items()}


def quant_state_from_entries(entries: dict[str, torch.Tensor], device: torch.device | str) -> Any:
    """A bitsandbytes `QuantState` rebuilt from `quant_state_entries`' tensors (keys without `weight.`)."""
    bnb = require_bitsandbytes()
    return bnb.functional.QuantState.from_dict(qs_dict=dict(entries), device=torch.device(device))


def check_quantizable(name: str, shape: tuple[int, ...], quant_type: Any, *, blocksize: int = BLOCKSIZE) -> None:
    """Raise `ValueError` unless `quant_type` is known and `blocksize` divides each row of the (out, in)
    weight `name`: bitsandbytes' CPU kernel (the AVX512-BF16 layout its `Linear4bit` switches to in
    inference) reads every row as whole blocks, and a block spanning two rows would mix their scales."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantize={quant_type!r} is not a 4-bit type; expected one of {', '.join(QUANT_TYPES)} "
                         "(or None for no quantization)")
    if len(shape) != 2 or shape[1] % blocksize:
        raise ValueError(f"{name}: a weight of shape {tuple(shape)} cannot be quantized in blocks of {blocksize}: "
                         f"its in_features must be a multiple of {blocksize} (leave this model unquantized)")


def quantize_weight(
    weight: torch.Tensor, *, quant_type: QuantType = "nf4", double_quant: bool = True, blocksize: int = BLOCKSIZE
) -> nn.Parameter:
    """A frozen bitsandbytes `Params4bit` holding `weight` (out, in) in 4 bits, on `weight`'s device.

    `double_quant` quantizes the per-block scales too (bitsandbytes' `compress_statistics`): 8 bits per block
    of 64 plus a float32 per 256 blocks, 0.127 bits per weight, instead of a float32 per block, 0.5 bits. The
    packed weight dequantizes to `weight`'s dtype. The bits are those of one bitsandbytes `quantize_4bit`
    call, computed QUANT_CHUNK weights at a time: its CPU kernel's temporaries are several times its input (a
    probe: 0.71 GB for Phi-3-mini's 100 MB gate_up_proj), and a chunk of whole rows holds whole blocks.
    """
    check_quantizable("weight", tuple(weight.shape), quant_type, blocksize=blocksize)
    bnb = require_bitsandbytes()
    functional = bnb.functional
    weight = weight.detach()
    rows = max(1, QUANT_CHUNK // weight.shape[1])
    packed_parts, absmax_parts = [], []
    for chunk in weight.split(rows):  # (rows, in): whole blocks, since blocksize divides in
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(chunk.contiguous(), blocksize, quant_type,
                                                                      torch.uint8)
        packed_parts.append(packed)
        absmax_parts.append(absmax)
    packed = torch.cat(packed_parts) if len(packed_parts) > 1 else packed_parts[0]  # (out * in / 2, 1)
    absmax = torch.cat(absmax_parts) if len(absmax_parts) > 1 else absmax_parts[0]  # (out * in / blocksize,)
    del packed_parts, absmax_parts
    code = functional.get_4bit_type(quant_type, device=weight.device)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type=quant_type)
    if double_quant:  # as quantize_4bit does it: the scales less their mean, in blocks of 256, 8 bits each
        offset = absmax.mean()
        scales, nested = functional.quantize_blockwise(absmax - offset, blocksize=256)
        state = functional.QuantState(absmax=scales, offset=offset, state2=nested, **common)
    else:
        state = functional.QuantState(absmax=absmax, **common)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                             compress_statistics=double_quant, quant_type=quant_type, bnb_quantized=True)


def linear4bit(
    weight: nn.Parameter, bias: torch.Tensor | None, *, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """bitsandbytes' `Linear4bit` around a packed `weight` (from `quantize_weight` or a saved checkpoint).

    `compute_dtype` (transformers' `bnb_4bit_compute_dtype`) defaults to the dtype the weight dequantizes to.
    """
    bnb = require_bitsandbytes()
    state = quant_state_of(weight)
    out_features, in_features = state.shape
    with torch.device("meta"):  # no throwaway (out, in) allocation
        module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                                   compute_dtype=compute_dtype or state.dtype, quant_type=state.quant_type,
                                   compress_statistics=state.nested)
    # bnb's Linear4bit repacks its weight for an AVX512-BF16 kernel at its first eval-mode forward without grad
    # on such a CPU, and that kernel computes in bf16 whatever the model's dtype (logits 1e-2 off in a float32
    # tiny Phi-3). Off here: the unadapted projections compute as the LoRA layers do, dequantized, in the
    # model's dtype, so a merged model and base + adapters can be compared to float32 precision.
    module.support_avx512bf16_for_cpu = False
    weight.module = module
    module.weight = weight
    module.quant_state = state
    module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return module
