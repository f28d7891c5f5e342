"""The hot path: a frozen linear layer plus low-rank adapters, forward and backward by hand.

For input `x` (N, in), frozen weight `W` (out, in), adapters `A_j` (r, in) and `B_j` (size_j, r)
for each adapted slice `j` of the output:

    y = x @ W.T + b,    y[:, slice_j] += scaling * (drop(x) @ A_j.T) @ B_j.T

`drop` zeroes each element with probability `p` and scales the rest by `1 / (1 - p)`.
Autograd on these ops would save a dropout mask and a dropped copy of `x` (two activation-sized
tensors) and spend 7-15 ns per element on `F.dropout`. Here the dropped elements are drawn as a sorted
list of positions (about `p * numel` of them), and the maths uses

    drop(x) @ A.T = (x @ A.T - D @ A.T) / (1 - p)          D: the dropped elements of x, sparse

so no activation-sized mask or copy is built in the forward pass or saved for backward: saved are `x` (which
the caller holds anyway), the rank-r product `drop(x) @ A.T`, the dropped elements' positions (8 bytes
each: 0.4 bytes per element of `x` at p = 0.05, against autograd's 5) and the parameters. The backward
pass zeroes the dropped elements in a copy of `x` for `dA` and reuses that buffer for `dx`, so it
allocates no more than without dropout.

Precision. Every activation-sized product is computed in the *compute dtype*: the input's dtype, or under
`torch.autocast` the dtype autocast would give a frozen `nn.Linear` on this input (`x`, the weight
and the bias are cast to it once, at the boundary, as autocast would; autocast itself is off inside, so
the forward's sparse dropout correction stays a float32 product). The adapters' output is written first
and the frozen GEMM accumulates onto it, so the sum is rounded once: a delta too small to survive a
16-bit rounding of its own still moves the 16-bit output. In float16 the adapter gradients `dA` and
`dB` are computed in float32 (sums over every token of a loss scaled by `GradScaler` overflow
float16's 65504 long before float32); in bfloat16, which has float32's range, in bfloat16. Adapter
gradients are returned in the adapters' dtype.

A 4-bit base (a bitsandbytes `Params4bit`: packed uint8 and a `quant_state`) goes into the Function as it
is, with its quant state: it is dequantized into a temporary in the compute dtype for the frozen GEMM (which
runs just after the Function, see `lowrank_linear`) and freed, and the backward dequantizes it again for
`dx`. Only the packed weight is saved (a quarter of bf16's bytes).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch

from .slices import LoRASlice, pair_layout

__all__ = [
    "KeptOutputs", "autocast_enabled", "compute_dtype", "dropout_positions", "lowrank_linear", "new_seed",
    "no_autocast", "one_thread",
]


def dropout_positions(seed: int, numel: int, p: float, device: torch.device) -> torch.Tensor:
    """Sorted flat indices of the dropped elements: each of `numel` independently with probability `p`.

    The gaps between successive drops of a Bernoulli(p) sequence are Geometric(p), so only about
    `p * numel` random numbers are drawn (one per dropped element, not one per element): a twentieth of
    the work of a dense mask at p = 0.05. The same seed gives the same positions.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    log_keep = math.log1p(-p)
    expected = p * numel
    parts, last = [], -1
    while last < numel:  # one round but for a ~1e-9 chance (6 standard deviations)
        count = int(expected + 6 * math.sqrt(expected) + 16)
        u = torch.rand(count, generator=generator, device=device)
        gaps = torch.log1p(u.neg_()).div_(log_keep).to(torch.int64).add_(1)  # Geometric(p) on 1, 2, ...
        positions = torch.cumsum(gaps, 0).add_(last)
        parts.append(positions)
        last = int(positions[-1])
    positions = torch.cat(parts) if len(parts) > 1 else parts[0]
    # sorted, so the cut is a binary search and a view, not a boolean mask
    return positions[: int(torch.searchsorted(positions, numel))]


class _Dropped(NamedTuple):
    """The dropped elements of an (N, in) matrix, row by row: where each row's start in `col` / `values` is
    (`starts`, (N,)), their columns (`col`) and their values (`values`, float32 or float64)."""

    starts: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor

    def times(self, weight: torch.Tensor) -> torch.Tensor:
        """`D @ weight` for a contiguous `weight` (in, k): each row's sum of `weight`'s rows at its dropped columns,
        weighted by the values, which `embedding_bag` computes in one pass (cheaper than a sparse CSR product,
        which also costs a fixed setup per call)."""
        return torch.nn.functional.embedding_bag(self.col, weight, self.starts, mode="sum",
                                                 per_sample_weights=self.values)


def _dropped(positions: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> _Dropped:
    """The dropped elements of an (N, in) matrix from their sorted flat `positions` and their `values`: each row's
    start is a binary search of its first flat index."""
    n, d = shape
    starts = torch.searchsorted(positions, torch.arange(0, n * d, d, dtype=torch.int64, device=positions.device))
    return _Dropped(starts, positions % d, values)


def _csr_pattern(positions: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The dropped positions of an (N, in) matrix as a sparse CSR matrix of zeros: a sampled product's pattern."""
    dropped = _dropped(positions, torch.zeros(positions.shape, dtype=dtype, device=positions.device), shape)
    crow = torch.cat([dropped.starts, dropped.starts.new_tensor([positions.numel()])]).to(torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, dropped.col.to(torch.int32), dropped.values, shape, check_invariants=False)


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run small ops (the dropout bookkeeping: a few dozen on ~p x numel elements) on one CPU thread.

    Each of those ops is too small to gain from a second thread, but as a parallel region it waits for
    that thread, and on a busy machine (other processes, data loaders) the waits cost far more than the
    work itself.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def autocast_enabled(device: torch.device) -> bool:
    """Whether `torch.autocast` is on for `device`'s type (never for a type it does not know: meta)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a frozen `nn.Linear` computes in on `x`: autocast's, when autocast is on for `x`'s
    device and would cast `x` (a floating tensor other than float64), else `x`'s own."""
    if autocast_enabled(x.device) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Autocast off for `device`'s type (a no-op when it is off already): for maths whose dtypes are chosen
    by hand, which autocast would otherwise re-cast op by op."""
    if autocast_enabled(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def new_seed() -> int:
    # Drawn from torch's default CPU generator, so torch.manual_seed makes runs repeatable and
    # torch.utils.checkpoint (which restores that generator) replays the same mask.
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))


class _LowRankLinear(torch.autograd.Function):
    # Every tensor arrives in the compute dtype but the adapters (float32 by default); both passes run with
    # autocast off, since the dtypes below are chosen by hand.

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, slices, fan_in_fan_out, col_scale=None,
                quant_state=None, keep=None):
        with no_autocast(x.device):
            return _LowRankLinear._forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, slices,
                                           fan_in_fan_out, col_scale, quant_state, keep)

    @staticmethod
    def backward(ctx, dy):
        with no_autocast(dy.device):
            return _LowRankLinear._backward(ctx, dy)

    @staticmethod
    def _forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, slices, fan_in_fan_out, col_scale,
                 quant_state, keep):
        # x: (N, in); slices: the LoRASlices of the adapted output columns (lora.slices), in B's row order;
        # col_scale: DoRA's m / n for those columns (in B's row order), or None; quant_state: the bitsandbytes
        # state of a packed 4-bit weight, which is dequantized here into a temporary (and again in backward);
        # keep: this module's slot in a checkpointed call (KeptOutputs): for LoRA the first forward's rank-r product,
        # which the recomputation takes instead of redoing it (and its dropout); for DoRA the kept outputs of
        # selective recomputation too, whose frozen GEMMs run in here
        dtype = x.dtype
        wide = torch.promote_types(dtype, torch.float32)
        A = lora_A.to(dtype)
        B = lora_B.to(dtype)
        positions = kept = dropped = None
        lora_slot, dora_slot = (keep, None) if col_scale is None else (None, keep)
        earlier_xa = lora_slot.take_rank_product() if lora_slot is not None else None
        if earlier_xa is not None:
            # the recomputation: the first forward's drop(x) @ A.T / (1 - p), bit for bit (the same x and seed);
            # backward draws the positions again from the seed
            (xa,) = earlier_xa
        elif p > 0.0 and col_scale is not None and not _sparse_dropped_product_pays(x, p):
            # DoRA with dropout multiplies W too by x with the dropped elements zeroed, so that copy is made anyway
            with one_thread(x.device):
                positions = dropout_positions(seed, x.numel(), p, x.device)
            kept = x.clone(memory_format=torch.contiguous_format)  # viewed flat below, whatever x's strides
            kept.view(-1).index_fill_(0, positions, 0)
            xa = kept @ A.t()
        else:
            xa = x @ A.t()  # (N, r * len(slices)); A.T as a view: a contiguous copy costs more than it saves
            if p > 0.0:
                # drop(x) @ A.T = (x @ A.T - D @ A.T) / (1 - p); D, the dropped elements, is a fraction p of x.
                with one_thread(x.device):
                    positions = dropout_positions(seed, x.numel(), p, x.device)
                    dropped = _dropped(positions, torch.take(x, positions).to(wide), x.shape)
                    correction = dropped.times((A if wide == dtype else lora_A.to(wide)).t().contiguous())
                xa -= correction.to(dtype)
        if p > 0.0 and earlier_xa is None:
            xa *= 1.0 / (1.0 - p)
        if lora_slot is not None and earlier_xa is None:
            lora_slot.put_rank_product(xa)

        # The adapters' output first, then the frozen GEMM accumulates onto it (beta = 1): one rounding of the
        # sum, and one pass over y fewer than adding the adapters' output afterwards. When the slices cover
        # every column and there is no bias, the first write ignores y's contents (beta = 0), so y needs no
        # initialisation.
        n = x.shape[0]
        out = quant_state.shape[0] if quant_state is not None else weight.shape[1 if fan_in_fan_out else 0]
        # DoRA without dropout scales W x + s B A x, and not the bias; with dropout it scales neither (below)
        first_bias = bias if col_scale is None or p > 0.0 else None
        covered = first_bias is None and sum(s.size for s in slices) == out
        if covered:
            y = torch.empty(n, out, dtype=dtype, device=x.device)
        elif first_bias is None:
            y = torch.zeros(n, out, dtype=dtype, device=x.device)
        else:
            y = torch.empty(n, out, dtype=dtype, device=x.device).copy_(first_bias)
        beta = 0.0 if covered else 1.0
        for s in slices:
            y[:, s.offset : s.offset + s.size].addmm_(xa[:, s.index * s.r : (s.index + 1) * s.r],
                                                      B[s.row : s.row + s.size].t(), beta=beta, alpha=scaling)
        unscaled = None
        earlier = dora_slot.take() if dora_slot is not None else None
        if earlier is not None:
            # DoRA's recomputation with the first forward's output (and v or the unscaled copy): no frozen GEMM
            y.copy_(earlier[0])
            unscaled = earlier[1] if len(earlier) > 1 else None
        elif col_scale is not None and p > 0.0:
            # DoRA with dropout: the frozen GEMM runs here too, and v (W drop(x) + s B A drop(x), whose product
            # with dy is c's gradient) is saved in place of the output: the only activation-sized tensor saved.
            unscaled = _dora_dropout_forward(y, x, kept, dropped, weight.t() if fan_in_fan_out else weight, xa, B,
                                             scaling, p, slices, col_scale)
            del kept, dropped
        elif col_scale is not None:
            # DoRA scales the frozen GEMM's output, so that GEMM runs here (otherwise just after the Function)
            frozen = weight if quant_state is None else _dequantized(weight, quant_state, dtype)
            y.addmm_(x, frozen if fan_in_fan_out else frozen.t())
            del frozen
            # DoRA: y = c * (W x + s B A x) + b per adapted column. Its gradient for c needs W x + s B A x,
            # which is (y - b) / c: the output, which the next op usually keeps anyway, is saved instead of
            # a copy (unless some c is 0, where that division cannot recover it).
            if bool((col_scale == 0).any()):
                unscaled = y.clone()
            _scale_columns(y, col_scale.to(dtype), slices)
            if bias is not None:
                y += bias
        if dora_slot is not None and earlier is None:
            dora_slot.put(y, *([] if unscaled is None else [unscaled]))
        if lora_slot is not None:
            # In a checkpointed call backward draws the positions again from the seed, and neither forward saves
            # them: checkpoint wants the same saved tensors from both, and the recomputation has none.
            positions = None
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, positions, col_scale,
                              y if col_scale is not None and unscaled is None else unscaled, bias)
        ctx.scaling, ctx.p, ctx.slices, ctx.fan_in_fan_out = scaling, p, slices, fan_in_fan_out
        ctx.has_bias, ctx.saved_unscaled = bias is not None, unscaled is not None
        ctx.quant_state = quant_state
        ctx.seed = seed if p > 0.0 and positions is None else None  # positions to draw again in backward
        return y

    @staticmethod
    def _backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, positions, col_scale, y, bias = ctx.saved_tensors
        scaling, p, slices = ctx.scaling, ctx.p, ctx.slices
        if ctx.seed is not None:
            with one_thread(x.device):
                positions = dropout_positions(ctx.seed, x.numel(), p, x.device)
        dy = dy.contiguous()
        dtype = dy.dtype
        dscale = None
        dy_out = dy  # the bias's gradient, which DoRA does not scale
        dy_frozen = dy  # what the frozen weight's input gradient is taken of
        if col_scale is not None:
            # dy * c: the gradient the LoRA maths below sees (and, without dropout, the frozen GEMM too)
            dscale, dy = _dora_backward(dy, y, bias, col_scale, slices, ctx.saved_unscaled)
            if p == 0.0:
                dy_frozen = dy
        # float16's range is too small for dA, dB (sums over every token of a scaled loss): float32 there.
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        A = lora_A.to(dtype)
        B = lora_B.to(dtype)

        # G_j = scaling / (1 - p) * dy[:, slice_j] @ B_j side by side, and dB_j = scaling * dy[:, slice_j].T @ xa_j,
        # each written in place with the scale as the GEMM's alpha: no concatenation, no scaling pass.
        g = torch.empty(dy.shape[0], A.shape[0], dtype=dtype, device=dy.device)
        dB = torch.empty(B.shape, dtype=grad_dtype, device=dy.device)
        xa_grad = xa.to(grad_dtype)
        for s in slices:
            dy_j = dy[:, s.offset : s.offset + s.size]
            cols, rows = slice(s.index * s.r, (s.index + 1) * s.r), slice(s.row, s.row + s.size)  # A block, B rows
            g[:, cols].addmm_(dy_j, B[rows], beta=0.0, alpha=scaling / (1.0 - p))
            dB[rows].t().addmm_(xa_grad[:, cols].t(), dy_j.to(grad_dtype), beta=0.0, alpha=scaling)
        dB = dB.to(lora_B.dtype)

        dropped_x = x
        if positions is not None:
            # x with the dropped elements zeroed, in a buffer that becomes dx below: a dense copy and a scattered
            # fill cost less here than sorting the drops into a transposed sparse matrix.
            dropped_x = torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)
            dropped_x.view(-1).index_fill_(0, positions, 0)
        # (r * len(slices), in), as g.T @ x: contiguous, the parameter's layout, so AccumulateGrad keeps it as it is
        dA = (g.t().to(grad_dtype) @ dropped_x.to(grad_dtype)).to(lora_A.dtype)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[1]:  # a base weight left trainable; before dropped_x becomes dx
            dweight = dy_frozen.t() @ x  # (out, in)
            if col_scale is not None and p > 0.0:  # DoRA's (c - 1) * W drop(x)
                minus_one = col_scale.to(dtype) - 1
                for s in slices:
                    columns = slice(s.offset, s.offset + s.size)
                    dweight[columns].addmm_((dy_out[:, columns] * minus_one[s.row : s.row + s.size]).t(), dropped_x,
                                            alpha=1.0 / (1.0 - p))
            if ctx.fan_in_fan_out:
                dweight = dweight.t()
        if ctx.needs_input_grad[0]:
            if ctx.quant_state is not None:
                weight = _dequantized(weight, ctx.quant_state, dtype)
            frozen = weight.t() if ctx.fan_in_fan_out else weight
            if positions is None and dtype in (torch.bfloat16, torch.float16):
                # In 16 bits the frozen GEMM runs faster writing (beta = 0) than accumulating, and the skinny
                # adapter GEMM accumulates instead: 0.3-1% of a step at o_proj and down_proj in an A/B.
                dx = dy_frozen @ frozen
                dx.addmm_(g, A)
            elif positions is None:
                # The frozen layer's input gradient accumulates onto the adapter's: one GEMM, no extra pass.
                dx = (g @ A).addmm_(dy_frozen, frozen)
            elif col_scale is not None and _sparse_dropped_product_pays(dropped_x, p):
                # dy (dy * c) is spent: its buffer takes the one GEMM's dy * (1 + (c - 1) / (1 - p)), and the
                # dropped positions then get their own value, dy W there, as a sampled product
                dx = torch.mm(g, A, out=dropped_x)
                _scale_columns(dy, 1.0 + (col_scale.to(dtype) - 1) / (1.0 - p), slices, source=dy_out)
                dx.addmm_(dy, frozen)
                dx.view(-1).put_(positions, _dropped_positions_product(dy_out, frozen, positions, dx.shape))
            else:
                dx = torch.mm(g, A, out=dropped_x)
                if col_scale is not None:  # dy (dy * c) is spent: its buffer takes dy * (c - 1)
                    _add_dora_dropout_grad(dx, dy_out, frozen, col_scale, slices, p, buffer=dy)
                dx.view(-1).index_fill_(0, positions, 0)
                dx.addmm_(dy_frozen, frozen)  # onto the masked adapter gradient, as above
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy_out.sum(0)
        return dx, dweight, dbias, dA, dB, None, None, None, None, None, dscale, None, None


def _dequantized(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    from lora.quant import dequantize  # bitsandbytes is imported only for a 4-bit weight

    return dequantize(packed, quant_state).to(dtype)


# DoRA with dropout computes W drop(x) as (W x - W D) / (1 - p), D the dropped elements (see
# _dora_dropout_forward), where that beats a second frozen GEMM: on a CPU in float32 / float64, from this many rows
# of x (transposing W's tiles is a pass over W whatever the rows) and up to this dropout rate (the sparse products'
# work grows with p, the GEMM's does not). `python benchmarks/lora_linear.py --dora-routes` times both routes: at
# 256 tokens the sparse one was faster at p = 0.05-0.2, at 128 about even, at 512 slower from p = 0.3. In 16 bits a
# CPU's GEMM is several times faster and the sparse products are not, so the GEMM stays.
SPARSE_DROPPED_PRODUCT_MIN_ROWS = 256
SPARSE_DROPPED_PRODUCT_MAX_P = 0.2


def _sparse_dropped_product_pays(x: torch.Tensor, p: float) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.shape[0] >= SPARSE_DROPPED_PRODUCT_MIN_ROWS and p <= SPARSE_DROPPED_PRODUCT_MAX_P)


def _dora_dropout_forward(y, x, kept, dropped, frozen, xa, B, scaling, p, slices, col_scale):
    """Complete `y`, which holds the bias and `s B A drop(x)`, to PEFT's DoRA with dropout: per adapted column
    `y = W x + b + (c - 1) * W drop(x) + c * s B A drop(x)` (`c = m / n`, `frozen` is W as (out, in)). Returns
    `v = W drop(x) + s B A drop(x)` on the adapted columns (y's shape; other columns unset, or `W x` given
    `dropped`): `y` adds
    `(c - 1) * v + s B A drop(x)`, the same sum, and `v` is the gradient's factor for `c`.

    `W drop(x)` is a second frozen GEMM on `kept` (`x` with the dropped elements zeroed), or, given `dropped` (the
    dropped elements D, where `_sparse_dropped_product_pays`), `(W x - W D) / (1 - p)` from
    the one GEMM `W x` and the sparse product `W D` (a fraction p of the multiply-adds).
    """
    v = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    minus_one = col_scale.to(x.dtype) - 1
    if dropped is not None:
        torch.mm(x, frozen.t(), out=v)
        y += v
    for s in slices:
        rows, columns = slice(s.row, s.row + s.size), slice(s.offset, s.offset + s.size)
        v_j = v[:, columns]
        if dropped is None:
            v_j.addmm_(kept, frozen[columns].t(), beta=0.0)
        else:
            _subtract_dropped_product(v_j, dropped, frozen[columns])
        v_j.addmm_(xa[:, s.index * s.r : (s.index + 1) * s.r], B[rows].t(), beta=1.0 / (1.0 - p), alpha=scaling)
        y[:, columns].addcmul_(v_j, minus_one[rows])
    if dropped is None:
        y.addmm_(x, frozen.t())  # last, onto the rest: where c = 1 the sum is rounded once, as for LoRA
    return v


def _transposed_tiles(weight: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """`weight` (rows, in) as tiles of rows, each transposed into one reused contiguous buffer of 2^19 elements (2 MB of
    float32, which stays in cache while it is used; more where 16 rows are wider): (first row, tile (in, size)). The
    sparse products with W (below) need its columns, which are strided in W's stored layout."""
    rows, width = weight.shape
    budget = max(16, (1 << 19) // width)  # rows per tile, rounded down to a power of two; at least 16
    tile = min(rows, 1 << (budget.bit_length() - 1))
    buffer = torch.empty(tile * width, dtype=weight.dtype, device=weight.device)
    for i in range(0, rows, tile):
        size = min(tile, rows - i)
        transposed = buffer[: size * width].view(width, size)
        transposed.copy_(weight[i : i + size].t())
        yield i, transposed


def _subtract_dropped_product(out: torch.Tensor, dropped: _Dropped, weight: torch.Tensor) -> None:
    """`out -= D @ weight.T` for the dropped elements D of an (N, in) matrix and a dense `weight` (rows, in).

    Each dropped element adds its value times a column of `weight`, so the product runs per transposed tile of W
    (`_Dropped.times`). MKL's sparse-times-dense product on W as it is stored (a strided W.T) runs close to a
    dense GEMM's time.
    """
    for i, transposed in _transposed_tiles(weight):
        out[:, i : i + transposed.shape[1]].sub_(dropped.times(transposed))


def _dropped_positions_product(dy: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor,
                               shape: tuple[int, int]) -> torch.Tensor:
    """`(dy @ weight).view(-1)[positions]` for `weight` (out, in) and the sorted flat `positions` of an (N, in)
    matrix, without the rest of the product: a sampled product per transposed tile of W (`sampled_addmm` on W as
    stored runs at a dense GEMM's time)."""
    pattern = _csr_pattern(positions, shape, dy.dtype)
    total = None
    for i, transposed in _transposed_tiles(weight):
        part = torch.sparse.sampled_addmm(pattern, dy[:, i : i + transposed.shape[1]], transposed.t(),
                                          beta=0.0).values()
        total = part if total is None else total.add_(part)
    return total


def _add_dora_dropout_grad(dx, dy, frozen, col_scale, slices, p, buffer):
    """Add the input gradient of DoRA's `(c - 1) * W drop(x)` term, before the dropped elements are zeroed;
    `buffer` (dy's shape) is overwritten."""
    minus_one = col_scale.to(dy.dtype) - 1
    for s in slices:
        columns = slice(s.offset, s.offset + s.size)
        scaled = torch.mul(dy[:, columns], minus_one[s.row : s.row + s.size], out=buffer[:, columns])
        dx.addmm_(scaled, frozen[columns], alpha=1.0 / (1.0 - p))


def _scale_columns(y: torch.Tensor, scale: torch.Tensor, slices: tuple[LoRASlice, ...],
                   source: torch.Tensor | None = None) -> None:
    """Multiply each slice's columns of `y` in place by its part of `scale` (in the slices' order); given `source`
    (y's shape), write `source`'s columns times the scale into `y`'s instead (other columns are left as they are)."""
    source = y if source is None else source
    if _whole(slices, y.shape[1]):
        torch.mul(source, scale, out=y)
        return
    for s in slices:
        columns = slice(s.offset, s.offset + s.size)
        torch.mul(source[:, columns], scale[s.row : s.row + s.size], out=y[:, columns])


def _whole(slices: tuple[LoRASlice, ...], out: int) -> bool:
    return len(slices) == 1 and slices[0].offset == 0 and slices[0].size == out


def _dora_backward(dy, y, bias, col_scale, slices, y_is_unscaled):
    """DoRA's gradient for its column scale c, and dy * c (what the LoRA maths below then sees).

    dc = sum over tokens of dy * (W x + s B A x), with W x + s B A x = (y - b) / c from the saved output (or
    saved as it is where some c is 0, or with dropout the saved v), summed in float32 for a float16 dy and in
    dy's dtype otherwise, as the adapters' gradients are.
    """
    unscaled = y if y_is_unscaled else (y - bias if bias is not None else y)
    scale, wide = col_scale.to(dy.dtype), torch.promote_types(dy.dtype, torch.float32)
    # float16's range is too small for a sum over tokens of a scaled loss's gradient; bfloat16 sums keep their
    # dtype (accumulated in float32 inside), since a float32 result would first copy the whole product to float32
    sum_dtype = torch.float32 if dy.dtype == torch.float16 else dy.dtype
    dscale = torch.empty(col_scale.shape, dtype=sum_dtype, device=dy.device)
    # One buffer holds the product dy * (W x + s B A x) for the sum, then dy * c: a fresh activation-sized
    # tensor costs its page faults on first write, as much as the multiplication itself.
    scaled = torch.empty_like(dy) if _whole(slices, dy.shape[1]) else dy.clone()
    for s in slices:
        cols, rows = slice(s.offset, s.offset + s.size), slice(s.row, s.row + s.size)
        product = torch.mul(dy[:, cols], unscaled[:, cols], out=scaled[:, cols])
        dscale[rows] = product.sum(0, dtype=sum_dtype)
        torch.mul(dy[:, cols], scale[rows], out=scaled[:, cols])
    if not y_is_unscaled:
        dscale = dscale.to(wide) / col_scale.to(wide)
    return dscale.to(col_scale.dtype), scaled


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    p: float = 0.0,
    slices: Sequence[LoRASlice] | Sequence[tuple[int, int]],
    fan_in_fan_out: bool = False,
    col_scale: torch.Tensor | None = None,
    kept: _KeptSlot | None = None,
) -> torch.Tensor:
    """`x @ W.T + b` plus `scaling * (drop(x) @ A_j.T) @ B_j.T` added to each slice of the output.

    `col_scale` (DoRA): `c`, one value for each adapted output column (in `lora_B`'s row order), which gets its
    gradient: without dropout the column is `c * (W x + s B A x) + b`, with dropout PEFT's
    `W x + b + (c - 1) * W drop(x) + c * s B A drop(x)`.

    `x` may have any leading dimensions. `p` is the dropout rate (0 in eval mode).
    `slices` lists the adapted output columns: a layer's `lora_slices` (`lora.slices.LoRASlice`), or
    `(offset, size)` pairs; `lora_A` stacks one (r, in) block per slice and `lora_B` one (size, r) block
    per slice, in the same order. Computes in
    `compute_dtype(x)`: under autocast, `x`, `weight` and `bias` are cast to autocast's dtype (the
    output and `dx` are in it, as a frozen `nn.Linear`'s would be), the adapters are not.
    `kept`: where a checkpointed forward keeps this call's output for its recomputation (`KeptOutputs.for_module`).
    """
    dtype = compute_dtype(x)
    # Casts outside the Function, so that autograd takes dx (and a trainable weight's gradient) back to
    # the caller's dtype; each is a no-op when the dtype already fits. A packed 4-bit weight (a bitsandbytes
    # Params4bit, its bytes stored as uint8 or bf16) goes in as it is: the Function dequantizes it straight into the
    # compute dtype.
    from lora.quant import is_quantized  # lora.quant imports this module

    quant_state = None
    if is_quantized(weight):
        quant_state = _quant_state(weight, fan_in_fan_out)
    else:
        weight = weight.to(dtype)
    x = x.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    seed = new_seed() if p > 0.0 else 0
    y = _apply(x2d, weight, bias, lora_A, lora_B, scaling, p, seed, slices, fan_in_fan_out, col_scale, quant_state,
               kept)
    return y.view(*lead, y.shape[-1])


def _apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, slices, fan_in_fan_out, col_scale=None, quant_state=None,
           kept=None):
    """The layer on a 2-D `x` already in the compute dtype: the Function, then (but for DoRA) the frozen GEMM.

    The frozen GEMM (and a 4-bit weight's dequantization) runs just after the Function, accumulating onto the
    adapters' output as it would inside (still one rounding of the sum), on detached operands: the Function's
    backward computes dx and autograd records no second use of W. The Function's saved tensors are then the
    last a checkpointed layer saves, so its recomputation, which stops once every saved tensor is back, skips
    the last projection's frozen GEMM and dequantization (backward never needs that output), as it does for a
    frozen nn.Linear. DoRA scales that GEMM's output, so it keeps it in the Function. `slices`: LoRASlices, or
    `(offset, size)` pairs in `lora_B`'s row order. `kept` (`KeptOutputs.for_module`): in a checkpointed forward
    that keeps this layer's output, the output is kept; in its recomputation it is put back in place of the frozen
    GEMM (for DoRA, whose frozen GEMMs run inside the Function, there).
    """
    slices = pair_layout(slices, lora_A.shape[0] // max(len(slices), 1))
    # Taken before the Function runs: a recomputation may stop inside it (once the block's last saved tensor is
    # back), and an untaken output would be handed to an earlier call of the same module in the next one.
    earlier = kept.take() if kept is not None and col_scale is None else None
    y = _LowRankLinear.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, slices, fan_in_fan_out, col_scale,
                             quant_state, kept)
    if col_scale is None:
        if earlier is not None:  # the recomputation: the first forward's output, bit for bit, without the GEMM
            return _Restore.apply(y, earlier[0].detach())
        frozen = weight.detach() if quant_state is None else _dequantized(weight, quant_state, x.dtype)
        with no_autocast(x.device):
            y.addmm_(x.detach(), frozen if fan_in_fan_out else frozen.t())
        del frozen  # a 4-bit weight's dequantized copy dies here: backward dequantizes again
        if kept is not None:
            kept.put(y)
    return y


class _Restore(torch.autograd.Function):
    """`y`'s values replaced in place by `earlier`'s, the gradient passed to `y` unchanged: the frozen GEMM's
    part of the output adds nothing to the gradient of what `y` depends on (the adapters, `x`), since the
    Function's backward already takes `dx` through the frozen weight."""

    @staticmethod
    def forward(ctx, y, earlier):
        ctx.mark_dirty(y)
        return y.copy_(earlier)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


_KEPT: contextvars.ContextVar[tuple[KeptOutputs, bool] | None] = contextvars.ContextVar("lora_kept_outputs",
                                                                                        default=None)


class KeptOutputs:
    """What a checkpointed forward hands its recomputation in backward, bit for bit: the outputs of chosen LoRA
    layers (selective recomputation: the recomputation skips their frozen GEMMs; each costs its size in memory until
    that backward), and for every LoRA layer the rank-sized products the recomputation would otherwise redo.

    One instance per checkpointed call, through `torch.utils.checkpoint`'s `context_fn` (non-reentrant)::

        checkpoint(block, x, use_reentrant=False,
                   context_fn=lambda: KeptOutputs([block.qkv_proj, block.gate_up_proj]).contexts())

    `KeptOutputs([])` keeps only the rank-sized products: LoRA's `drop(x) @ A.T` (N x r per layer, so the
    recomputation runs neither that GEMM nor the dropout's bookkeeping; backward draws the dropped positions again
    from their seed) and DoRA's row norms `n` (one float per adapted row: no second `W A^T`).

    Only the hand-written path of `lora.Linear` / `lora.MergedLinear` keeps outputs (LoRA and DoRA, not a custom
    dropout module); other layers are recomputed as before. DoRA with dropout also keeps `v` (see
    `_dora_dropout_forward`), which its backward needs: twice the output's size. An output changed in place after
    the layer (its version counter moved) is not put back: that layer is recomputed instead.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        modules = list(modules)
        wrong = [m for m in modules if not isinstance(m, torch.nn.Module)]
        if wrong:
            raise TypeError(f"KeptOutputs takes the layer modules whose outputs to keep, got {wrong[0]!r} "
                            f"({type(wrong[0]).__name__})")
        self._ids = {id(m) for m in modules}
        self._outputs: dict[int, list[tuple[tuple[torch.Tensor, ...], tuple[int, ...]]]] = {}  # module id: kept
        self._rank_products: dict[int, list[tuple[torch.Tensor, ...]]] = {}  # module id: kept, every LoRA layer
        self._forwarded = False

    def contexts(self) -> tuple[_Active, _Active]:
        """The (forward, recomputation) context managers that `torch.utils.checkpoint`'s `context_fn` returns."""
        return _Active(self, replaying=False), _Active(self, replaying=True)

    @staticmethod
    def for_module(module: torch.nn.Module) -> _KeptSlot | None:
        """Where `module` keeps what its recomputation takes back, inside a checkpointed forward (or its
        recomputation) with a `KeptOutputs`; else None."""
        active = _KEPT.get()
        if active is None:
            return None
        kept, replaying = active
        outputs = kept._outputs.setdefault(id(module), []) if id(module) in kept._ids else None
        return _KeptSlot(outputs, kept._rank_products.setdefault(id(module), []), replaying)


class _Active:
    """Makes a `KeptOutputs` the active one while entered; re-enterable, since each backward through a retained
    graph runs the recomputation (and enters its context) again."""

    def __init__(self, kept: KeptOutputs, replaying: bool) -> None:
        self._state, self._tokens = (kept, replaying), []

    def __enter__(self) -> None:
        kept, replaying = self._state
        if not replaying:
            if kept._forwarded:  # backward would hand one call's outputs to another call of the same module
                raise RuntimeError("KeptOutputs: one instance per checkpointed call; give checkpoint "
                                   "context_fn=lambda: KeptOutputs(modules).contexts(), not one instance's contexts")
            kept._forwarded = True
        self._tokens.append(_KEPT.set(self._state))

    def __exit__(self, *exc: object) -> None:
        _KEPT.reset(self._tokens.pop())


class _KeptSlot(NamedTuple):
    """One module's kept outputs (None where they are not kept) and rank-sized products, each in call order, and
    whether this is the recomputation."""

    outputs: list[tuple[tuple[torch.Tensor, ...], tuple[int, ...]]] | None
    rank_products: list[tuple[torch.Tensor, ...]]
    replaying: bool

    def put(self, *tensors: torch.Tensor) -> None:
        """Keep a forward's output (DoRA: and the tensor its backward saves in its place), with their versions."""
        if self.outputs is not None and not self.replaying:
            self.outputs.append((tensors, tuple(t._version for t in tensors)))

    def take(self) -> tuple[torch.Tensor, ...] | None:
        """In the recomputation, the next kept tensors; None if there are none or one was changed in place since
        (then the layer is recomputed)."""
        if not (self.replaying and self.outputs):
            return None
        tensors, versions = self.outputs.pop(0)
        return tensors if tuple(t._version for t in tensors) == versions else None

    def put_rank_product(self, *tensors: torch.Tensor) -> None:
        """Keep a forward's rank-sized products (internal tensors, never changed in place)."""
        if not self.replaying:
            self.rank_products.append(tensors)

    def take_rank_product(self) -> tuple[torch.Tensor, ...] | None:
        """In the recomputation, the next kept rank-sized products; None if there are none."""
        return self.rank_products.pop(0) if self.replaying and self.rank_products else None


def _quant_state(weight: torch.Tensor, fan_in_fan_out: bool):
    from lora.quant import quant_state_of

    state = quant_state_of(weight)
    if fan_in_fan_out:
        raise ValueError("lowrank_linear: a 4-bit weight is stored as (out, in); fan_in_fan_out=True does not apply")
    return state
