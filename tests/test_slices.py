"""The one description of a layer's adapter blocks: `lora.slices`."""

from __future__ import annotations

import pytest
import torch

import lora
from lora.slices import LoRASlice, pair_layout, slice_layout


def test_slice_layout_places_each_enabled_slice():
    slices = slice_layout((64, 32, 32), (True, False, True), 4)
    assert slices == (LoRASlice(0, 0, 64, 0, 4), LoRASlice(1, 96, 32, 64, 4))
    assert [(s.columns, s.a_rows, s.b_rows) for s in slices] == [
        (slice(0, 64), slice(0, 4), slice(0, 64)), (slice(96, 128), slice(4, 8), slice(64, 96))]


def test_pair_layout_matches_slice_layout_and_keeps_a_layout():
    layout = slice_layout((3, 2, 2), (False, True, True), 2)
    assert pair_layout(((3, 2), (5, 2)), 2) == layout
    assert pair_layout(layout, 2) == layout
    assert pair_layout((), 2) == ()


@pytest.mark.parametrize("make", [
    lambda: lora.Linear(6, 5, r=2),
    lambda: lora.MergedLinear(6, 7, r=2, enable_lora=(True, False, True), split_sizes=(3, 2, 2)),
    lambda: lora.MergedLinear.from_module(torch.nn.Linear(6, 8), (4, 2, 2), r=3, enable_lora=(False, True, True)),
])
def test_a_layers_slices_describe_its_adapters_and_its_delta(make):
    torch.manual_seed(0)
    layer = make()
    torch.nn.init.normal_(layer.lora_B)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    assert A.shape[0] == layer.r * len(layer.lora_slices)
    assert B.shape[0] == sum(s.size for s in layer.lora_slices)
    expected = torch.zeros(layer.out_features, layer.in_features)
    for s in layer.lora_slices:
        expected[s.columns] = layer.scaling * B[s.b_rows] @ A[s.a_rows]
    torch.testing.assert_close(layer.delta_weight(), expected)
