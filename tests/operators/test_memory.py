"""Streaming: buffers past the memory budget are memory-mapped, and give identical results."""

from __future__ import annotations

import os
from collections import namedtuple

import pytest
import torch

import mfac
from mfac.operators import build_from_rows, memory


def test_buffer_over_budget_is_memory_mapped_and_exact(tmp_path) -> None:
    torch.manual_seed(0)
    rows = torch.randn(20, 500)
    in_ram = mfac.InverseFisher(rows.clone(), 1e-3, block_size=64)
    paged = build_from_rows(
        iter(rows), 20, 500, damp=1e-3, block_size=64, memory_budget=1024, spill_dir=tmp_path
    )
    assert paged.memory_mapped and not in_ram.memory_mapped
    assert os.listdir(tmp_path) == []  # the file is unlinked at once; it dies with the tensor
    x = torch.randn(500, 2)
    assert torch.equal(paged.ihvp(x), in_ram.ihvp(x))  # same arithmetic, other storage
    assert torch.equal(paged.diag(), in_ram.diag())


def test_direct_block_inverses_also_spill() -> None:
    rows = torch.randn(40, 64)
    op = mfac.InverseFisher(rows, 1e-3, block_size=8, memory_budget=100)
    assert op.groups[0].direct and memory.is_memory_mapped(op.groups[0].inverse)
    assert not memory.is_memory_mapped(op.buffer) and op.memory_mapped  # reported as paged
    in_ram = mfac.InverseFisher(rows.clone(), 1e-3, block_size=8, memory_budget=2**30)
    assert not in_ram.memory_mapped
    x = torch.randn(64)
    assert torch.allclose(op.ihvp(x), in_ram.ihvp(x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's map list")
def test_a_checkpoint_loaded_with_mmap_counts_as_memory_mapped(tmp_path) -> None:
    """torch.load(mmap=True) storages carry no file name; their bytes are a file's pages."""
    rows = torch.randn(8, 4096)
    torch.save({"rows": rows}, tmp_path / "rows.pt")
    loaded = torch.load(tmp_path / "rows.pt", mmap=True)["rows"]
    assert loaded.untyped_storage().filename is None
    assert memory.is_memory_mapped(loaded) and memory.is_memory_mapped(loaded[3])
    assert not memory.is_memory_mapped(loaded.clone()) and not memory.is_memory_mapped(rows)


def test_memory_mapped_reads_the_map_list_once(monkeypatch) -> None:
    """``InverseFisher.memory_mapped`` asks about the buffer and every group's tensors with one
    reading of the process's map list, not one per tensor."""
    op = mfac.InverseFisher(torch.randn(40, 64), 1e-3, block_size=8, memory_budget=2**30)
    tensors = 1 + sum(len(g.tensors()) for g in op.groups)
    assert tensors >= 2  # the buffer and the direct form's block inverses
    reads = []
    real = memory.FileMappings.__init__

    def counted(self) -> None:
        reads.append(1)
        real(self)

    monkeypatch.setattr(memory.FileMappings, "__init__", counted)
    assert not op.memory_mapped
    assert len(reads) == 1


def test_neither_ram_nor_disk_raises_before_allocating(monkeypatch, tmp_path) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda _: usage(10, 10, 0))
    with pytest.raises(MemoryError, match="free on disk"):
        mfac.GradientBuffer(1000, 1000, memory_budget=10, spill_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(MemoryError, match="does not exist"):
        mfac.GradientBuffer(1000, 1000, memory_budget=10, spill_dir=tmp_path / "missing")


def test_gradient_buffer_append_checks() -> None:
    buf = mfac.GradientBuffer(2, 6)
    buf.append(torch.ones(2, 3))  # any shape with the right number of entries
    with pytest.raises(ValueError, match="6"):
        buf.append(torch.ones(5))
    with pytest.raises(mfac.NonFiniteGradientError, match="gradient 1"):
        buf.append(torch.full((6,), float("nan")))
    assert buf.count == 1
    buf.append(torch.zeros(6))
    assert buf.full
    with pytest.raises(ValueError, match="full"):
        buf.append(torch.zeros(6))
    with pytest.raises(ValueError, match="expected 3 gradients, got 2"):
        build_from_rows(iter(torch.ones(2, 6)), 3, 6)


def test_to_moves_and_keeps_results() -> None:
    op = mfac.InverseFisher(torch.randn(5, 30), 1e-2, block_size=4)
    x = torch.randn(30)
    y = op.ihvp(x)
    assert op.to("cpu") is op
    assert torch.equal(op.ihvp(x), y)


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while ``fn`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("block", [None, 512])
def test_no_copy_of_the_buffer(block, monkeypatch) -> None:
    from mfac.operators import blocks

    monkeypatch.setattr(blocks, "TILE_BYTES", 2**20)  # float64 scratch per tile: 1 MiB
    m, d = 32, 2**16
    grads = torch.randn(m, d)
    buffer_bytes = m * d * 4
    largest = _largest_allocation(lambda: mfac.InverseFisher(grads, 1e-3, block))
    assert largest < buffer_bytes / 2  # tiles only, never a second m x d buffer
    op = mfac.InverseFisher(torch.randn(m, d), 1e-3, block)
    x = torch.randn(d)
    assert _largest_allocation(lambda: op.ihvp(x)) < buffer_bytes / 4
    window = mfac.SlidingInverseFisher(d, m, 1e-3)
    window.push(x)  # the first push allocates the window's rows
    assert _largest_allocation(lambda: window.push_ihvp(x)) < buffer_bytes / 4


def test_finite_check_reads_in_chunks_and_is_exact(monkeypatch) -> None:
    """``finite_fast``: a sum that overflows (finite entries) falls back to the exact check,
    chunk by chunk, which finds a NaN or Inf in any chunk, the last one included."""
    from mfac import _validation

    monkeypatch.setattr(_validation, "FINITE_CHUNK", 7)
    big = torch.full((50,), 3e38)  # finite entries whose float32 sum overflows
    assert _validation.finite_fast(big)
    for at in (0, 13, 49):
        for bad in (float("nan"), float("inf")):
            x = big.clone()
            x[at] = bad
            assert not _validation.finite_fast(x.view(5, 10)), (at, bad)


def test_file_mappings_tell_a_loaded_file_from_owned_memory(tmp_path) -> None:
    """``adoptable``: a tensor of ``torch.load(..., mmap=True)`` lies in a file mapping (it is
    copied, not kept); one loaded plainly, or on another device or strided, is decided by
    its own properties."""
    path = tmp_path / "t.pt"
    torch.save({"a": torch.randn(1000, 10)}, path)
    plain = torch.load(path, weights_only=True)["a"]
    mapped = torch.load(path, weights_only=True, mmap=True)["a"]
    cpu = torch.device("cpu")
    assert memory.adoptable(plain, cpu)
    assert not memory.adoptable(mapped, cpu)
    assert not memory.adoptable(plain.T, cpu)  # not contiguous
    assert not memory.adoptable(plain, torch.device("meta"))
