"""Groups of equal-size diagonal blocks of the static inverse Fisher.

A group covers a contiguous coordinate range split into ``nblocks`` blocks of ``size``
coordinates. It stores one of two exact forms of each block's inverse, chosen by cost:

* Woodbury (``size > m``): F_b^-1 = (I - Q_b^T Q_b) / lambda with Q_b = L_b^-1 G_b and
  L_b L_b^T = m*lambda*I + G_b G_b^T. For float32/float64 gradients Q overwrites G in place
  ("q" form); for bfloat16/float16 storage G stays as stored and the float64 factors L_b are
  kept ("g" form), because rounding Q to 8 mantissa bits would break exactness.
* direct (``size <= m``): F_b = lambda*I + G_b^T G_b / m is formed and inverted (float64).

All small matrices are formed and factored in float64, tile by tile, so the float64 scratch never
exceeds ``TILE_BYTES`` and the m x d buffer is never copied whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .memory import TILE_BYTES, allocate
from .threads import single_threaded

F64 = torch.float64


def _chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    step = max(1, step)
    for start in range(0, n, step):
        yield start, min(n, start + step)


class BlockGroup:
    """``nblocks`` blocks of ``size`` coordinates starting at ``start`` of the flat vector."""

    def __init__(self, start: int, nblocks: int, size: int, num_grads: int, damp: float) -> None:
        self.start = start
        self.nblocks = nblocks
        self.size = size
        self.stop = start + nblocks * size
        self.m = num_grads
        self.damp = damp
        self.direct = size <= num_grads

    # ----------------------------------------------------------------- tiles of the buffer
    def _view(self, buffer: torch.Tensor) -> torch.Tensor:
        """The group's columns as an (m, nblocks, size) view of the m x d buffer."""
        return buffer[:, self.start : self.stop].view(self.m, self.nblocks, self.size)

    def _tile(self, buffer: torch.Tensor, b0: int, b1: int, c0: int, c1: int) -> torch.Tensor:
        """Blocks [b0, b1), columns [c0, c1) of each, as a contiguous float64 (nb, m, w) tile."""
        src = self._view(buffer)[:, b0:b1, c0:c1].permute(1, 0, 2)
        return torch.empty(src.shape, dtype=F64, device=buffer.device).copy_(src)

    def _plan(self) -> tuple[int, int]:
        """Blocks per tile and columns per tile so a float64 tile stays within TILE_BYTES."""
        per_column = self.m * 8
        cols = min(self.size, max(1, TILE_BYTES // per_column))
        blocks = max(1, TILE_BYTES // (per_column * cols)) if cols == self.size else 1
        return blocks, cols

    # ----------------------------------------------------------------- precompute
    def build(self, buffer: torch.Tensor, memory_budget: int | None) -> None:
        """Factor every block of the group (BLAS-3, batched over blocks, tile by tile)."""
        self.q_form = buffer.dtype in (torch.float32, torch.float64)
        if self.direct:
            self._build_direct(buffer, memory_budget)
        else:
            self._build_woodbury(buffer)

    def _build_direct(self, buffer: torch.Tensor, memory_budget: int | None) -> None:
        self.inverse = allocate(
            (self.nblocks, self.size, self.size),
            F64,
            memory_budget=memory_budget,
            what="block inverses",
        ).to(buffer.device)
        rows_per_tile = max(1, TILE_BYTES // (8 * self.size))
        blocks_per_tile = max(1, TILE_BYTES // (8 * self.size * min(self.m, rows_per_tile)))
        eye = torch.eye(self.size, dtype=F64, device=buffer.device)
        view = self._view(buffer)
        for b0, b1 in _chunks(self.nblocks, blocks_per_tile):
            fisher = torch.zeros(b1 - b0, self.size, self.size, dtype=F64, device=buffer.device)
            for r0, r1 in _chunks(self.m, rows_per_tile):
                # (nb, rows, size): rows of each block stay contiguous, so the copy streams.
                src = view[r0:r1, b0:b1, :].permute(1, 0, 2)
                tile = torch.empty(src.shape, dtype=F64, device=buffer.device).copy_(src)
                fisher.baddbmm_(tile.transpose(1, 2), tile)
            fisher.div_(self.m).add_(eye, alpha=self.damp)
            with single_threaded(b1 - b0 > 1):
                # LAPACK potri (2B^3/3 flops): 1.6x faster than cholesky_solve against I.
                self.inverse[b0:b1] = torch.cholesky_inverse(torch.linalg.cholesky(fisher))

    def _build_woodbury(self, buffer: torch.Tensor) -> None:
        blocks_per_tile, cols = self._plan()
        if not self.q_form:
            self.chol = torch.empty(self.nblocks, self.m, self.m, dtype=F64, device=buffer.device)
        view = self._view(buffer)
        for b0, b1 in _chunks(self.nblocks, blocks_per_tile):
            gram = torch.zeros(b1 - b0, self.m, self.m, dtype=F64, device=buffer.device)
            tile = None
            for c0, c1 in _chunks(self.size, cols):
                tile = self._tile(buffer, b0, b1, c0, c1)
                gram.baddbmm_(tile, tile.transpose(1, 2))
            gram.diagonal(dim1=1, dim2=2).add_(self.m * self.damp)
            with single_threaded(b1 - b0 > 1):
                chol = torch.linalg.cholesky(gram)
            del gram
            if not self.q_form:
                self.chol[b0:b1] = chol
                continue
            for c0, c1 in _chunks(self.size, cols):
                if cols < self.size or tile is None:
                    tile = self._tile(buffer, b0, b1, c0, c1)
                with single_threaded(b1 - b0 > 1):
                    q = torch.linalg.solve_triangular(chol, tile, upper=False)
                view[:, b0:b1, c0:c1].copy_(q.permute(1, 0, 2))
                tile = None

    # ----------------------------------------------------------------- queries
    def ihvp(self, buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for the group's coordinates; x is (nblocks*size, k)."""
        k = x.shape[1]
        if self.direct:
            xb = x.to(F64).reshape(self.nblocks, self.size, k)
            return torch.bmm(self.inverse, xb).view(-1, k)
        if self.q_form:
            xb = x.to(buffer.dtype)
            if self.nblocks == 1:
                q = buffer[:, self.start : self.stop]
                y = xb - q.T @ (q @ xb)
            else:
                q = self._view(buffer).permute(1, 0, 2)  # (nb, m, size), strided view
                xv = xb.reshape(self.nblocks, self.size, k)
                y = (xv - torch.bmm(q.transpose(1, 2), torch.bmm(q, xv))).view(-1, k)
            return y.div_(self.damp)
        return self._ihvp_g_form(buffer, x)

    def _ihvp_g_form(self, buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        xv = x.to(F64).reshape(self.nblocks, self.size, k)
        out = torch.empty_like(xv)
        blocks_per_tile, cols = self._plan()
        for b0, b1 in _chunks(self.nblocks, blocks_per_tile):
            gx = torch.zeros(b1 - b0, self.m, k, dtype=F64, device=x.device)
            for c0, c1 in _chunks(self.size, cols):
                gx.baddbmm_(self._tile(buffer, b0, b1, c0, c1), xv[b0:b1, c0:c1])
            c = torch.cholesky_solve(gx, self.chol[b0:b1])
            for c0, c1 in _chunks(self.size, cols):
                tile = self._tile(buffer, b0, b1, c0, c1)
                out[b0:b1, c0:c1] = xv[b0:b1, c0:c1] - tile.transpose(1, 2) @ c
        return out.view(-1, k).div_(self.damp)

    def diag(self, buffer: torch.Tensor) -> torch.Tensor:
        """The group's part of diag(F^-1), float64."""
        if self.direct:
            return self.inverse.diagonal(dim1=1, dim2=2).reshape(-1).clone()
        sq = torch.zeros(self.nblocks, self.size, dtype=F64, device=buffer.device)
        blocks_per_tile, cols = self._plan()
        for b0, b1 in _chunks(self.nblocks, blocks_per_tile):
            for c0, c1 in _chunks(self.size, cols):
                tile = self._tile(buffer, b0, b1, c0, c1)
                if not self.q_form:
                    tile = torch.linalg.solve_triangular(self.chol[b0:b1], tile, upper=False)
                sq[b0:b1, c0:c1] = tile.square().sum(1)
        return (1.0 - sq.view(-1)) / self.damp

    def submatrix(self, buffer: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """F^-1 restricted to the group-local coordinates ``local`` (float64, p x p)."""
        block = torch.div(local, self.size, rounding_mode="floor")
        offset = local - block * self.size
        same = block[:, None] == block[None, :]
        if self.direct:
            vals = self.inverse[block[:, None], offset[:, None], offset[None, :]]
            return torch.where(same, vals, torch.zeros((), dtype=F64, device=vals.device))
        cols = self._q_columns(buffer, local, block)  # (m, p) float64
        # delta_ij compares coordinates, so a coordinate listed twice still gets its diagonal.
        delta = (local[:, None] == local[None, :]).to(F64)
        return torch.where(same, (delta - cols.T @ cols) / self.damp, torch.zeros_like(delta))

    def _q_columns(
        self, buffer: torch.Tensor, local: torch.Tensor, block: torch.Tensor
    ) -> torch.Tensor:
        """Columns of Q (= L_b^-1 G_b) for the given coordinates, float64 (m, p)."""
        g = buffer[:, self.start + local].to(F64)  # (m, p)
        if self.q_form:
            return g
        # Sort the coordinates by block, pad each block's columns, solve all blocks at once.
        order = torch.argsort(block, stable=True)
        sorted_blocks = block[order]
        uniq, counts = torch.unique_consecutive(sorted_blocks, return_counts=True)
        slot = torch.repeat_interleave(torch.arange(uniq.numel(), device=g.device), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        pos = torch.arange(local.numel(), device=g.device) - first
        padded = torch.zeros(uniq.numel(), self.m, int(counts.max()), dtype=F64, device=g.device)
        padded[slot, :, pos] = g[:, order].T
        solved = torch.linalg.solve_triangular(self.chol[uniq], padded, upper=False)
        out = torch.empty_like(g)
        out[:, order] = solved[slot, :, pos].T
        return out

    # ----------------------------------------------------------------- bookkeeping
    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the group owns (not the shared buffer)."""
        owned = {}
        if self.direct:
            owned["inverse"] = self.inverse
        elif not self.q_form:
            owned["chol"] = self.chol
        return owned

    def to(self, device: torch.device) -> None:
        """Move the owned tensors to ``device``."""
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.to(device))
