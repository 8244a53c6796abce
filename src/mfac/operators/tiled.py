"""The top-k window's rows in a tile-major layout, and the C sweeps over it (CPU).

The d coordinates are cut into tiles (a power of two, 4096 to 65536 coordinates, so that a
tile of a dense float32 vector sits in L1 or L2). Rows are kept in groups of ``B`` consecutive
slots; a group's entries are stored tile by tile, and within a tile row by row, each row's run
in ascending coordinates. A sweep (G x, G^T c) visits a tile once and reads each group's
entries for it as one contiguous segment (prefetched two segments ahead), instead of m short
runs scattered over m row buffers. G x gathers from the tile with AVX-512 where the CPU has it
(a portable loop otherwise); each tile of G^T c is summed in a buffer of its own and stored
once. For a sparse x (the new row's products), a tile of 4096 coordinates is also held as a
bitmap in eight AVX-512 registers: a block of 16 entries gathers from x only where the bitmap
says one of them meets a nonzero of x (about 15 % of blocks at 1 % density), so that G x costs
a few register permutes per block instead of a gather. Only exact zeros are skipped, in the
same order: the sums equal those of x stored densely, bit for bit.

Replacing a row rewrites its group into a spare block (one pass over B k entries) and the
spare becomes the group's block; the ring's order is unchanged. Groups of at most MAX_ROWS
rows keep that rewrite a small part of a sweep (its cost: docs/optim.md), and at least
MIN_GROUPS groups keep the spare block within 1/MIN_GROUPS of the window.

Accumulation order is fixed (rows in slot order within a tile, tiles in order), so results do
not depend on the thread count: threads take disjoint group ranges (G x) or tile ranges (G^T c).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import cbuild

log = logging.getLogger(__name__)

#: Tile lengths (coordinates) a layout may use.
MIN_TILE, MAX_TILE = 4096, 65536
#: Entries per row and tile the tile length aims at (4096 coordinates at 1 % density).
RUN = 32
#: Most rows in a group: replacing a row rewrites its whole group, so groups stay small (and
#: larger groups do not make the sweeps faster: docs/optim.md).
MAX_ROWS = 32
#: Fewest groups: the spare group costs at most 1 / MIN_GROUPS of the window's memory.
MIN_GROUPS = 8

#: The C file of this library (in cbuild.CSRC).
SOURCE_FILE = "tiled.c"

_VALUE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_INDEX_NAMES = {torch.int32: "i32", torch.int16: "i16"}
#: Compiler flag sets tried in order (the first that builds wins). No auto-vectorisation: the
#: scalar loops are indexed gathers and scatters, which the compiler's vector forms do not
#: speed up (G x's AVX-512 gathers are written out with intrinsics in csrc/tiled.c).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-tree-vectorize", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-fno-tree-vectorize", "-fno-math-errno", "-fno-trapping-math"],
)

_state: dict[str, object] = {}


def _load(
    compiler: str, flag_sets: tuple[list[str], ...] = _FLAG_SETS, stem: str = "tiled"
) -> ctypes.CDLL:
    """The kernel library built with the first of ``flag_sets`` that compiles (tests build a
    portable one too), with its argument types set."""
    lib = cbuild.load(SOURCE_FILE, flag_sets, stem, compiler)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    layout = [p, p, p, p, i64, i64, i64, i64, i64, i64]
    extra = {
        "gather": ([i64, i64, p, p, p, i64, p, p, p], ctypes.c_int),
        "scatter": ([i64, i64, p, p, p], ctypes.c_int),
        "replace": ([i64, i64, i64, p, p], None),
        "pack": ([i64, p, p], ctypes.c_int),
        "row": ([i64, i64, p, p], None),
        "check": ([i64], i64),
        "zero": ([i64], None),
    }
    for v in _VALUE_NAMES.values():
        for i in _INDEX_NAMES.values():
            for kernel, (args, restype) in extra.items():
                fn = getattr(lib, f"mfac_tw_{kernel}_{v}_{i}")
                fn.argtypes = layout + args
                fn.restype = restype
    lib.mfac_tw_has_f16.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when it cannot be had."""
    return cbuild.cached_library(
        _state, "tiled top-k kernels", cbuild.find_compiler, _load, log
    )


def supports(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the C kernels take a window of ``dtype`` values on ``device``."""
    if device.type != "cpu" or dtype not in _VALUE_NAMES:
        return False
    lib = library()
    if lib is None:
        return False
    return dtype != torch.float16 or bool(lib.mfac_tw_has_f16())


def plan(m: int, k: int, dim: int) -> tuple[int, int]:
    """(tile, rows per group) of a layout: tiles long enough that a row has about RUN entries
    in one (MIN_TILE..MAX_TILE coordinates); groups of at most MAX_ROWS rows, at least
    MIN_GROUPS of them (where m allows), and a group's entries addressable by int32 offsets."""
    tile = MIN_TILE
    while tile < MAX_TILE and tile * k < RUN * dim:
        tile *= 2
    rows = max(1, min(MAX_ROWS, m // MIN_GROUPS, (2**31 - 1) // k))
    return tile, rows


def layout_bytes(m: int, k: int, dim: int, value_bytes: int, index_bytes: int) -> int:
    """Bytes of a tiled window: the groups' blocks and the spare (values and indices) and the
    int32 run offsets (rows + 1 per group and tile)."""
    tile, rows = plan(m, k, dim)
    groups = -(-m // rows)
    tiles = -(-dim // tile)
    return (groups + 1) * rows * k * (value_bytes + index_bytes) + tiles * groups * (rows + 1) * 4


class TiledRows:
    """m sparse rows of k entries each over d coordinates, in the tile-major group layout.

    ``values``/``indices`` hold groups + 1 blocks of ``rows`` x k entries each (one is the
    spare), ``block_of`` says which block holds each group (its last entry: the spare), and
    ``starts`` (tiles, groups * (rows + 1)) the run offsets, each tile's of all groups
    together. Slot r is row r % rows of group r // rows."""

    def __init__(
        self,
        dim: int,
        window: int,
        k: int,
        dtype: torch.dtype,
        index_dtype: torch.dtype,
        empty: Callable[[tuple[int, int], torch.dtype], torch.Tensor] | None = None,
    ) -> None:
        self._set_shape(dim, window, k)
        blocks = self.groups + 1
        empty = empty or (lambda shape, dt: torch.empty(shape, dtype=dt))
        self.values = empty((blocks * self.rows, k), dtype)
        self.indices = empty((blocks * self.rows, k), index_dtype)
        self.starts = torch.zeros(self.tiles, self.groups * (self.rows + 1), dtype=torch.int32)
        self.block_of = torch.arange(blocks, dtype=torch.int64)  # the last is the spare
        for g in range(self.groups):
            self._call("zero", g)
        spare = slice(self.groups * self.rows, blocks * self.rows)
        self.values[spare].zero_()  # touched now, not in the first replace
        self.indices[spare].zero_()

    @classmethod
    def over(
        cls, dim: int, window: int, k: int, tensors: dict[str, torch.Tensor]
    ) -> TiledRows | None:
        """A layout over existing tensors (``values``, ``indices``, ``starts``, ``block_of``:
        a saved state), without copying; None unless their shapes and dtypes are what this
        version lays out for (dim, window, k) with those value and index dtypes."""
        rows = cls.__new__(cls)
        rows._set_shape(dim, window, k)
        try:
            values, indices = tensors["values"], tensors["indices"]
            starts, block_of = tensors["starts"], tensors["block_of"]
        except KeyError:
            return None
        block_rows = (rows.groups + 1) * rows.rows
        if (
            tuple(values.shape) != (block_rows, k)
            or tuple(indices.shape) != (block_rows, k)
            or tuple(starts.shape) != (rows.tiles, rows.groups * (rows.rows + 1))
            or starts.dtype != torch.int32
            or tuple(block_of.shape) != (rows.groups + 1,)
            or block_of.dtype != torch.int64
            or values.dtype not in _VALUE_NAMES
            or indices.dtype not in _INDEX_NAMES
            or any(
                t.device.type != "cpu" or not t.is_contiguous()
                for t in (values, indices, starts, block_of)
            )
        ):
            return None
        rows.values, rows.indices, rows.starts, rows.block_of = values, indices, starts, block_of
        return rows

    def _set_shape(self, dim: int, window: int, k: int) -> None:
        """The layout's sizes for (dim, window, k): :func:`plan`'s tile and group size, the
        number of tiles and of groups."""
        self.dim, self.window, self.k = dim, window, k
        self.tile, self.rows = plan(window, k, dim)
        self.tiles = -(-dim // self.tile)
        self.groups = -(-window // self.rows)

    # ------------------------------------------------------------------ plumbing
    @property
    def spare(self) -> int:
        """The block no group uses."""
        return int(self.block_of[self.groups])

    def group_rows(self, g: int) -> int:
        """Rows of group g (the last group may hold fewer)."""
        return min(self.rows, self.window - g * self.rows)

    def _fn(self, kernel: str):
        lib = library()
        suffix = f"{_VALUE_NAMES[self.values.dtype]}_{_INDEX_NAMES[self.indices.dtype]}"
        return getattr(lib, f"mfac_tw_{kernel}_{suffix}")

    def _layout(self) -> tuple:
        return (
            self.values.data_ptr(), self.indices.data_ptr(), self.starts.data_ptr(),
            self.block_of.data_ptr(), self.rows, self.window, self.k, self.tiles, self.dim,
            self.tile,
        )  # fmt: skip

    def _call(self, kernel: str, *args: Any) -> Any:
        return self._fn(kernel)(*self._layout(), *args)

    def _run(self, kernel: str, parts: list[tuple]) -> None:
        """One call per part, on the worker threads when there are several."""
        fn, layout = self._fn(kernel), self._layout()
        if len(parts) == 1:
            results = [fn(*layout, *parts[0])]
        else:
            pool = cbuild.worker_pool(_state, len(parts), "mfac-tiled")
            results = [f.result() for f in [pool.submit(fn, *layout, *a) for a in parts]]
        if any(results):
            raise MemoryError("tiled top-k kernel: could not allocate its buffers")

    # ------------------------------------------------------------------ sweeps
    def gather(
        self, x: torch.Tensor | None = None, sparse: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, float]:
        """G x (float64, (m,)) for a dense contiguous float32 x of d entries, or a sparse x
        given as ``(ascending int64 coordinates, float32 values)``; given both, from one sweep
        (the window is read once): (G x, G x_sparse, x . x_sparse)."""
        if x is None and sparse is None:
            raise ValueError("gather needs x, sparse or both")
        both = x is not None and sparse is not None
        out = torch.empty(self.window, dtype=torch.float64)
        out2 = torch.empty(self.window if both else 0, dtype=torch.float64)
        cross = torch.zeros(1, dtype=torch.float64)
        sidx, sval = sparse if sparse is not None else (None, None)
        ptrs = (
            x.data_ptr() if x is not None else None,
            sidx.data_ptr() if sidx is not None else None,
            sval.data_ptr() if sval is not None else None,
            sidx.numel() if sidx is not None else 0,
            out.data_ptr(),
            out2.data_ptr() if both else None,
        )
        parts = cbuild.split_range(self.groups, torch.get_num_threads(), 1)
        # x . x_sparse once, by the part that starts at group 0
        calls = [(a, b, *ptrs, cross.data_ptr() if both and a == 0 else None) for a, b in parts]
        self._run("gather", calls)
        return (out, out2, float(cross)) if both else out

    def scatter(
        self,
        coeff: torch.Tensor,
        out: torch.Tensor | None = None,
        plus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """G^T c (float32, (d,)) for c of shape (m,), plus ``plus`` when given (added per tile
        while the tile is in cache: no extra pass over d), written into ``out`` when given.
        ``out`` and ``plus`` are contiguous float32 vectors of d entries."""
        coeff = coeff.to(torch.float32).contiguous()
        if out is None:
            out = torch.empty(self.dim, dtype=torch.float32)
        add = plus.data_ptr() if plus is not None else None
        parts = cbuild.split_range(self.tiles, torch.get_num_threads(), 1)
        self._run("scatter", [(a, b, coeff.data_ptr(), add, out.data_ptr()) for a, b in parts])
        return out

    # ------------------------------------------------------------------ rows
    def replace(self, slot: int, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """Row ``slot`` := the k entries (ascending int64 ``idx``, ``vals`` in the stored
        dtype): its group is rewritten into the spare block, which then becomes the group's."""
        g, j = divmod(slot, self.rows)
        idx, vals = idx.contiguous(), vals.contiguous()
        spare = self.spare
        self._call("replace", g, spare, j, idx.data_ptr(), vals.data_ptr())
        self.block_of[self.groups], self.block_of[g] = self.block_of[g].clone(), spare

    def row(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of row ``slot``, k each, ascending coordinates."""
        g, j = divmod(slot, self.rows)
        vals = torch.empty(self.k, dtype=self.values.dtype)
        idx = torch.empty(self.k, dtype=self.indices.dtype)
        self._call("row", g, j, vals.data_ptr(), idx.data_ptr())
        return vals, idx

    def group(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of group g's rows, row-major ((rows, k) each)."""
        n = self.group_rows(g)
        vals = torch.empty(n, self.k, dtype=self.values.dtype)
        idx = torch.empty(n, self.k, dtype=self.indices.dtype)
        for j in range(n):
            self._call("row", g, j, vals[j].data_ptr(), idx[j].data_ptr())
        return vals, idx

    def write_group(self, g: int, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Group g := the row-major rows ``values``/``indices`` ((rows of g, k), each row's
        coordinates strictly ascending), written in place."""
        n = self.group_rows(g)
        if tuple(values.shape) != (n, self.k) or tuple(indices.shape) != (n, self.k):
            raise ValueError(f"group {g} holds {n} rows of {self.k} entries")
        values = values.to(self.values.dtype).contiguous()
        indices = indices.to(self.indices.dtype).contiguous()
        if self._call("pack", g, values.data_ptr(), indices.data_ptr()):
            raise MemoryError("tiled top-k kernel: could not allocate its cursors")

    def check(self) -> None:
        """Raise, naming the field, unless every group is a valid layout: ``starts`` (offsets
        from 0, non-decreasing, k entries per row) and ``indices`` (each run inside its tile
        and strictly ascending, so every coordinate lies in [0, d))."""
        for g in range(self.groups):
            bad = int(self._call("check", g))
            if bad < 0:
                raise MemoryError("tiled top-k kernel: could not allocate its counters")
            if bad:
                tile = (bad - 1) // 4
                if bad % 4 == 2:
                    raise ValueError(
                        f"indices: group {g}, tile {tile}: a coordinate outside its tile or "
                        f"out of order (rows need ascending coordinates in [0, {self.dim}))"
                    )
                where = f", tile {tile}" if bad % 4 == 1 else ""
                raise ValueError(f"starts: group {g}{where} does not describe k entries per row")

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (values, indices) and their offsets."""
        return (
            self.values.numel() * self.values.element_size()
            + self.indices.numel() * self.indices.element_size()
            + self.starts.numel() * 4
        )

    def state(self) -> dict[str, torch.Tensor]:
        """The layout's tensors, by reference."""
        return {
            "values": self.values,
            "indices": self.indices,
            "starts": self.starts,
            "block_of": self.block_of,
        }


def state_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(groups, rows per group) of a saved layout, read off its tensors: ``block_of`` names
    groups + 1 blocks, ``starts`` holds rows + 1 offsets per group and tile (rows is 0 when
    there are no groups)."""
    groups = state["block_of"].numel() - 1
    return groups, (state["starts"].shape[-1] // groups - 1 if groups > 0 else 0)


def unpack_group(
    values: torch.Tensor, indices: torch.Tensor, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's rows in row-major order ((rows, k) values and indices) with torch (any
    device), from its block (``values``/``indices``, at least rows x k entries) and its offsets
    ((tiles, rows + 1)): a stable sort of the entries by row keeps each row's tiles in order.
    Raises ValueError naming ``starts`` unless the offsets describe ``k`` entries per row."""
    rows, k = starts.shape[1] - 1, values.shape[-1]
    s = starts.long()
    lengths = (s[:, 1:] - s[:, :-1]).reshape(-1)
    if (
        int(s[0, 0]) != 0
        or bool((lengths < 0).any())
        or not torch.equal(s[1:, 0], s[:-1, -1])
        or int(s[-1, -1]) != rows * k
        or not bool((lengths.view(-1, rows).sum(dim=0) == k).all())
    ):
        raise ValueError(f"starts: a group's offsets do not describe {k} entries per row")
    row_of = torch.arange(lengths.numel(), device=lengths.device) % rows
    entry_row = torch.repeat_interleave(row_of, lengths)
    order = torch.sort(entry_row, stable=True).indices.to(values.device)
    n = entry_row.numel()
    flat_v, flat_i = values.reshape(-1)[:n], indices.reshape(-1)[:n]
    return flat_v[order].view(rows, -1), flat_i[order].view(rows, -1)


__all__ = [
    "TiledRows", "layout_bytes", "library", "plan", "state_shape", "supports", "unpack_group"
]
