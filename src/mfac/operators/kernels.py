"""The two memory-bound passes over an m x d gradient buffer: G @ X and G^T @ C.

float32/float64 buffers use the BLAS matrix-vector kernels directly. For bfloat16/float16
buffers, stock CPU kernels are far slower than float32 (no native bf16 dot products on most
CPUs) and round to 16 bits, so each pass has three paths, fastest first:

1. on the CPU, one vector at a time: a small C kernel (:mod:`mfac.operators.native`, built once
   with the system C compiler) that widens each entry in registers and accumulates in float32;
2. up to four vectors (and any device: Triton on CUDA): a fused upcast-multiply-reduce
   compiled by torch.compile;
3. everywhere else (no compiler, ``MFAC_NO_COMPILE=1``, a compile error, many vectors): a
   column-tiled upcast to float32 and a BLAS product, the same numbers at lower speed.

All three read the buffer once and accumulate in float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from .._validation import LOW_PRECISION
from . import native

F64 = torch.float64

log = logging.getLogger(__name__)

_TILE_COLUMNS = 16384
_compiled: dict[str, Callable[..., object] | None] = {}


def _rows_dot_eager(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(m, d) low precision @ (d, k) float32 by column tiles upcast to float32."""
    m, d = g.shape
    out = torch.zeros(m, x.shape[1], dtype=torch.float32, device=g.device)
    tile = torch.empty(m, min(d, _TILE_COLUMNS), dtype=torch.float32, device=g.device)
    for j in range(0, d, _TILE_COLUMNS):
        e = min(d, j + _TILE_COLUMNS)
        t = tile[:, : e - j]
        t.copy_(g[:, j:e])
        out.addmm_(t, x[j:e])
    return out


def _cols_dot_eager(g: torch.Tensor, c: torch.Tensor, columns: int = _TILE_COLUMNS) -> torch.Tensor:
    """(m, d)^T low precision @ (m, k) float32 by tiles of ``columns`` upcast to float32."""
    m, d = g.shape
    out = torch.empty(d, c.shape[1], dtype=torch.float32, device=g.device)
    tile = torch.empty(m, min(d, columns), dtype=torch.float32, device=g.device)
    for j in range(0, d, columns):
        e = min(d, j + columns)
        t = tile[:, : e - j]
        t.copy_(g[:, j:e])
        torch.mm(t.T, c, out=out[j:e])
    return out


def _rows_dot_fused(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # One fused loop over g for all k columns of x: each column is its own reduction.
    cols = [(g.float() * x[:, i]).sum(1) for i in range(x.shape[1])]
    return torch.stack(cols, 1)


#: Rows per partial sum of the compiled G^T c pass (see _cols_dot_fused).
_ROW_CHUNK = 8


def _cols_dot_fused(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # Summing 8 rows at a time into a float32 accumulator streams G once in row order (the
    # accumulator, 4 bytes per column, is re-read m/8 times from cache/RAM), where a reduction
    # over all m rows at once walks m strided streams per column tile (docs/operators.md).
    cols = []
    for i in range(c.shape[1]):
        acc = (g[:_ROW_CHUNK].float() * c[:_ROW_CHUNK, i, None]).sum(0)
        for r in range(_ROW_CHUNK, g.shape[0], _ROW_CHUNK):
            acc = acc + (g[r : r + _ROW_CHUNK].float() * c[r : r + _ROW_CHUNK, i, None]).sum(0)
        cols.append(acc)
    return torch.stack(cols, 1)


def _get(name: str, fn: Callable[..., object]) -> Callable[..., object] | None:
    if name not in _compiled:
        if os.environ.get("MFAC_NO_COMPILE") == "1":
            _compiled[name] = None
        else:
            try:
                _compiled[name] = torch.compile(fn, dynamic=False)
            except Exception as exc:  # pragma: no cover - depends on the toolchain
                log.warning("torch.compile unavailable (%s); using the tiled fallback", exc)
                _compiled[name] = None
    return _compiled[name]


def _call(name: str, fused: Callable, eager: Callable, g: torch.Tensor, v: torch.Tensor):
    # _compiled[name] set to None selects the tiled fallback (no compiler, or a failed run).
    if v.shape[1] == 1 and _compiled.get(name, True) is not None and native.supports(g):
        single = native.rows_dot if name == "rows" else native.cols_dot
        return single(g, v[:, 0]).unsqueeze(1)
    if v.shape[1] <= 4:
        kernel = _get(name, fused)
        if kernel is not None:
            try:
                return kernel(g, v)
            except Exception as exc:  # pragma: no cover - depends on the toolchain
                log.warning("compiled kernel failed (%s); using the tiled fallback", exc)
                _compiled[name] = None
    return eager(g, v)


def squared_norm(x: torch.Tensor, piece: int = 1024) -> float:
    """|x|^2 of a vector, as float32 norms of ``piece``-entry pieces summed in float64: one
    float32 dot accumulates d positive terms, and its relative error grows with d (a window's
    K diagonal must agree with the rows it is formed from, whatever the model's size)."""
    flat = x.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    n = flat.numel() // piece
    head = torch.linalg.vector_norm(flat[: n * piece].view(n, piece), dim=1).to(F64)
    tail = flat[n * piece :].to(F64)
    return float(head.pow(2).sum() + tail.dot(tail))


def rows_dot(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G @ X for G (m, d) and X (d, k): one pass over G. Low precision returns float32."""
    if g.dtype not in LOW_PRECISION:
        return g @ x.to(g.dtype)
    return _call("rows", _rows_dot_fused, _rows_dot_eager, g, x.float())


def cols_dot(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """G^T @ C for G (m, d) and C (m, k): one pass over G. Low precision returns float32."""
    if g.dtype not in LOW_PRECISION:
        return g.T @ c.to(g.dtype)
    return _call("cols", _cols_dot_fused, _cols_dot_eager, g, c.float())
