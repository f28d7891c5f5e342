"""Where each adapter block of a layer sits: one `LoRASlice` per adapted slice of the output.

A `lora.Linear` has one slice, the whole output. A `lora.MergedLinear` (a fused q|k|v) has one per enabled
slice, in output order; its `lora_A` stacks one (r, in) block per slice and its `lora_B` (and DoRA's
`lora_magnitude`) one (size, r) block (size rows) per slice, in the same order:

    y[..., s.columns] += scaling * x @ lora_A[s.a_rows].T @ lora_B[s.b_rows].T    for s in layer.lora_slices

>>> [tuple(s) for s in slice_layout((64, 32, 32), (True, False, True), r=4)]
[(0, 0, 64, 0, 4), (1, 96, 32, 64, 4)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["LoRASlice", "pair_layout", "slice_layout"]


class LoRASlice(NamedTuple):
    """One adapted slice: output features `[offset, offset + size)`, block `index` of `lora_A` (rows
    `[index * r, (index + 1) * r)`), rows `[row, row + size)` of `lora_B`."""

    index: int
    offset: int
    size: int
    row: int
    r: int

    @property
    def columns(self) -> slice:
        """The slice's output features: columns of the output, rows of the (out, in) weight."""
        return slice(self.offset, self.offset + self.size)

    @property
    def a_rows(self) -> slice:
        """The slice's (r, in) block of `lora_A`."""
        return slice(self.index * self.r, (self.index + 1) * self.r)

    @property
    def b_rows(self) -> slice:
        """The slice's (size, r) block of `lora_B`, and its part of `lora_magnitude`."""
        return slice(self.row, self.row + self.size)


def slice_layout(split_sizes: Sequence[int], enable_lora: Sequence[bool], r: int) -> tuple[LoRASlice, ...]:
    """The adapted slices of an output split into `split_sizes`, of which `enable_lora` are adapted."""
    pairs, offset = [], 0
    for size, on in zip(split_sizes, enable_lora, strict=True):
        if on:
            pairs.append((offset, size))
        offset += size
    return pair_layout(pairs, r)


def pair_layout(pairs: Sequence[tuple[int, int]] | Sequence[LoRASlice], r: int) -> tuple[LoRASlice, ...]:
    """The `LoRASlice`s of `(offset, size)` pairs listed in `lora_B`'s row order (`lowrank_linear`'s `slices`,
    which takes either); a layout of `LoRASlice`s already is one and comes back as it is."""
    if pairs and isinstance(pairs[0], LoRASlice):
        return tuple(pairs)
    slices, row = [], 0
    for index, (offset, size) in enumerate(pairs):
        slices.append(LoRASlice(index, offset, size, row, r))
        row += size
    return tuple(slices)
