"""FlatLayout: the one flat layout of several parameters (names, shapes, keep-masks, block
padding) against plain per-entry bookkeeping, with hypothesis over shapes, masks and blocks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac.operators import FlatLayout
from mfac.operators.layout import Segment


@st.composite
def layouts(draw: st.DrawFn) -> tuple[FlatLayout, list[torch.Tensor], list[torch.Tensor | None]]:
    count = draw(st.integers(1, 4))
    shapes = [
        tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))) for _ in range(count)
    ]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    masked = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    masks = [
        (torch.rand(s, generator=gen) < draw(st.floats(0.0, 1.0))) if m else None
        for s, m in zip(shapes, masked, strict=True)
    ]
    block = draw(st.one_of(st.none(), st.integers(1, 7)))
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    layout = FlatLayout([f"p{i}" for i in range(count)], shapes, masks, block)
    return layout, tensors, masks


def reference(tensors, masks, block):
    """The flat vector entry by entry: surviving entries in flat order, then zero padding."""
    out = []
    for t, m in zip(tensors, masks, strict=True):
        flat = t.reshape(-1)
        keep = [flat[i] for i in range(flat.numel()) if m is None or bool(m.reshape(-1)[i])]
        pad = (-len(keep)) % block if block else 0
        out += keep + [torch.zeros((), dtype=t.dtype)] * pad
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_flatten_gather_and_round_trips_match_the_reference(case):
    layout, tensors, masks = case
    expect = reference(tensors, masks, layout.block_size)
    assert layout.dim == expect.numel()
    flat = layout.flatten(tensors)
    assert torch.equal(flat, expect)
    assert torch.equal(layout.flatten(dict(zip(layout.names, tensors, strict=True))), expect)
    assert torch.equal(layout.gather(tensors, torch.float64), expect)
    # unflatten / scatter: the surviving entries back in place, fill elsewhere
    for fill in (0.0, -1.0):
        parts = layout.unflatten(flat, fill)
        scattered = layout.scatter(flat, fill)
        for name, t, m, s in zip(layout.names, tensors, masks, scattered, strict=True):
            want = t if m is None else torch.where(m, t, torch.full_like(t, fill))
            assert torch.equal(parts[name], want) and torch.equal(s, want)
    # positions: contiguous segments, padded to the block, real marks the coordinates
    pos = 0
    for seg in layout.segments:
        assert seg.offset == pos
        if layout.block_size:
            assert (seg.size + seg.pad) % layout.block_size == 0 and seg.pad < layout.block_size
        pos = seg.stop
    assert pos == layout.dim
    assert int(layout.real.sum()) == sum(layout.sizes)
    for i, seg in enumerate(layout.segments):
        assert bool((layout.layer[seg.offset : seg.stop] == i).all())


@settings(max_examples=30, deadline=None)
@given(layouts(), st.integers(1, 3))
def test_batched_flatten_and_gather_are_row_wise(case, n):
    layout, tensors, _ = case
    gen = torch.Generator().manual_seed(n)
    stacks = [torch.randn(n, *t.shape, generator=gen, dtype=torch.float64) for t in tensors]
    rows = torch.stack([layout.flatten([s[k] for s in stacks]) for k in range(n)])
    assert torch.equal(layout.flatten(stacks, batched=True), rows)
    assert torch.equal(layout.gather(stacks, torch.float64, batched=True), rows)
    parts = layout.unflatten(rows)
    for k in range(n):
        single = layout.unflatten(rows[k])
        assert all(torch.equal(parts[name][k], single[name]) for name in layout.names)


def test_dense_layout_is_the_concatenation_with_views():
    a, b = torch.arange(6.0).view(2, 3), torch.arange(4.0)
    layout = FlatLayout.of({"a": a, "b": b})
    assert layout.dense and layout.dim == 10 and layout.numels == (6, 4)
    assert layout.offsets == [0, 6] and layout.sizes == [6, 4] and layout.pads == [0, 0]
    flat = layout.flatten([a, b])
    parts = layout.unflatten(flat)
    assert parts["a"].data_ptr() == flat.data_ptr()  # a view, no copy
    assert layout.segments[1] == Segment("b", torch.Size([4]), 6, 4)
    assert layout.owners(torch.tensor([0, 7])) == ["a", "b"]


def test_gather_reads_none_as_zeros_and_keeps_dtype_device():
    layout = FlatLayout(["a", "b"], [(2,), (3,)], {"b": torch.tensor([True, False, True])}, 4)
    assert layout.dim == 8 and layout.pads == [2, 2]
    out = layout.gather([None, torch.tensor([1.0, 2.0, 3.0])], torch.float64)
    assert out.dtype == torch.float64 and out.tolist() == [0, 0, 0, 0, 1, 3, 0, 0]
    assert layout.real.tolist() == [True, True, False, False, True, True, False, False]
    assert layout.index[1].tolist() == [0, 2] and layout.index[0].tolist() == [0, 1]


def test_layout_refusals():
    with pytest.raises(ValueError, match="2 names but 1 shapes"):
        FlatLayout(["a", "b"], [(2,)])
    with pytest.raises(ValueError, match="twice"):
        FlatLayout(["a", "a"], [(2,), (2,)])
    with pytest.raises(ValueError, match="block_size"):
        FlatLayout(["a"], [(2,)], block_size=0)
    with pytest.raises(ValueError, match="mask of a"):
        FlatLayout(["a"], [(2, 3)], [torch.ones(4, dtype=torch.bool)])
    layout = FlatLayout(["a", "b"], [(2,), (3,)])
    with pytest.raises(KeyError, match="missing"):
        layout.flatten({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="expected 2 tensors"):
        layout.flatten([torch.zeros(2)])
    with pytest.raises(ValueError, match=r"b has shape \(4,\)"):
        layout.flatten([torch.zeros(2), torch.zeros(4)])
    with pytest.raises(ValueError, match="expected shape"):
        layout.unflatten(torch.zeros(6))
    assert "dim=5" in repr(layout) and math.prod(layout.shapes[1]) == 3
