"""Groups of equal-size diagonal blocks of the static inverse Fisher.

A group covers a contiguous coordinate range split into ``nblocks`` blocks of ``size``
coordinates. It stores one of two exact forms of each block's inverse, chosen by cost:

* Woodbury (``size > m``): F_b^-1 = (I - Q_b^T Q_b) / lambda with Q_b = L_b^-1 G_b and
  L_b L_b^T = m*lambda*I + G_b G_b^T. For float32/float64 gradients Q overwrites G in place
  ("q" form); for bfloat16/float16 storage G stays as stored and the float64 factors L_b are
  kept ("g" form), because rounding Q to 8 mantissa bits would break exactness.
* direct (``size <= m``): F_b = lambda*I + G_b^T G_b / m is formed and inverted (float64).

The build runs in two phases so that a failure never leaves the caller's buffer half written:
:meth:`BlockGroup.form` forms every block's Gram and :meth:`BlockGroup.factor` damps and
factors it (both only read the buffer); :meth:`BlockGroup.finish` then overwrites G by Q.
All small matrices are formed and factored in float64, a cache-sized tile at a time, through
one reused scratch tile, so the float64 scratch stays within ``TILE_BYTES`` and the m x d
buffer is never copied whole. On the CPU, float32/float64 gradients take C kernels instead
(:func:`native_build_enabled`), which do the same per block in cache-sized float64 panels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from . import native
from .threads import single_threaded

F64 = torch.float64

#: Bytes of float64 scratch in one tile of gradients (cache-sized: the tile is reused).
TILE_BYTES = 8 * 2**20

#: On a GPU a tile is a launch, not a cache line: tiles this large keep each batched call
#: (Gram, Cholesky, inverse) wide enough to fill the device instead of paying launch latency
#: and one host synchronisation per few blocks.
GPU_TILE_BYTES = 512 * 2**20


def tile_bytes(device: torch.device) -> int:
    """Float64 bytes of one tile of the build on ``device``."""
    return TILE_BYTES if device.type == "cpu" else GPU_TILE_BYTES


#: A pivot of a block's Cholesky factor must keep at least this share of its lower bound
#: (lambda for F_b, m*lambda for K_b); below it, float64 rounding of the Gram dominates.
PIVOT_SHARE = 0.5


def inverse_from_cholesky(
    chol: torch.Tensor, out: torch.Tensor, triangular: bool | None = None
) -> torch.Tensor:
    """(L L^T)^-1 for a batch of lower Cholesky factors, written into ``out``.

    On the CPU LAPACK potri needs 2B^3/3 flops, a third of a solve against I's. On a GPU
    potri is not a batched call, so the inverse is W^T W with W = L^-1 from one batched
    triangular solve (``triangular`` forces either path, for the tests)."""
    if triangular is None:
        triangular = chol.device.type != "cpu"
    if not triangular:
        return torch.cholesky_inverse(chol, out=out)
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    inv_l = torch.linalg.solve_triangular(chol, eye, upper=False)
    return torch.bmm(inv_l.transpose(1, 2), inv_l, out=out)


#: Woodbury blocks take the C build up to this m (their m x m float64 Gram stays in cache);
#: past it, tiles through the BLAS product, which blocks for cache itself.
NATIVE_WOODBURY_MAX_M = 256


def native_build_enabled() -> bool:
    """Whether blocks of float32/float64 gradients on the CPU may take the C build
    (:mod:`mfac.operators.native`): the direct form's Gram and inverse, the Woodbury form's
    Gram, Cholesky factor and solve (m <= ``NATIVE_WOODBURY_MAX_M``). ``MFAC_NATIVE_BUILD=0``
    leaves them to batched torch/LAPACK calls, as do ``MFAC_NO_COMPILE=1`` and a machine
    without a C compiler."""
    return os.environ.get("MFAC_NATIVE_BUILD", "1") != "0"


class FisherFactorError(ValueError):
    """A block of the damped Fisher does not factor in float64; nothing was written."""


def _chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    step = max(1, step)
    for start in range(0, n, step):
        yield start, min(n, start + step)


class BlockGroup:
    """``nblocks`` blocks of ``size`` coordinates starting at ``start`` of the flat vector."""

    def __init__(
        self,
        start: int,
        nblocks: int,
        size: int,
        num_grads: int,
        damp: float,
        tile_bytes: int = TILE_BYTES,
    ) -> None:
        self.start = start
        self.nblocks = nblocks
        self.size = size
        self.stop = start + nblocks * size
        self.m = num_grads
        self.damp = damp
        self.direct = size <= num_grads
        self.q_form = True
        self.tile_bytes = tile_bytes
        self.native = False

    # ----------------------------------------------------------------- tiles of the buffer
    def _view(self, buffer: torch.Tensor) -> torch.Tensor:
        """The group's columns as an (m, nblocks, size) view of the m x d buffer."""
        return buffer[:, self.start : self.stop].view(self.m, self.nblocks, self.size)

    def _plan(self) -> tuple[int, int, int]:
        """(blocks, rows, columns) per tile so that a float64 tile stays within
        ``self.tile_bytes``."""
        tile = self.tile_bytes
        if self.direct:  # whole columns of a block, chunked over rows when m is large
            rows = min(self.m, max(1, tile // (8 * self.size)))
            return min(self.nblocks, max(1, tile // (8 * self.size * rows))), rows, self.size
        cols = min(self.size, max(1, tile // (8 * self.m)))
        blocks = max(1, tile // (8 * self.m * cols)) if cols == self.size else 1
        return min(self.nblocks, blocks), self.m, cols

    def scratch_bytes(self) -> int:
        """Float64 scratch of the build: one tile, plus one tile's worth of m x m (Woodbury) or
        B x B (direct) matrices and their factors."""
        blocks, rows, cols = self._plan()
        small = self.size if self.direct else self.m
        return 8 * (blocks * rows * cols + 3 * blocks * small * small)

    def stored_bytes(self) -> int:
        """Float64 bytes the group holds after the build (block inverses or g-form factors)."""
        if self.direct:
            return 8 * self.nblocks * self.size**2
        return 0 if self.q_form else 8 * self.nblocks * self.m**2

    def factor_bytes(self) -> int:
        """Float64 bytes held between the two build phases (every block's factor)."""
        return 0 if self.direct else 8 * self.nblocks * self.m**2

    def _tile(
        self, buffer: torch.Tensor, scratch: torch.Tensor, b0: int, b1: int, c0: int, c1: int
    ) -> torch.Tensor:
        """Blocks [b0, b1), columns [c0, c1) of each, as a float64 (nb, m, w) view of scratch."""
        src = self._view(buffer)[:, b0:b1, c0:c1].permute(1, 0, 2)
        return scratch[: src.numel()].view(src.shape).copy_(src)

    @staticmethod
    def new_scratch(groups: list[BlockGroup], device: torch.device) -> torch.Tensor:
        """One flat float64 tile shared by every pass of the build and the queries."""
        elems = max(g._plan()[0] * g._plan()[1] * g._plan()[2] for g in groups)
        return torch.empty(elems, dtype=F64, device=device)

    # ----------------------------------------------------------------- precompute
    def form(self, buffer: torch.Tensor, scratch: torch.Tensor, store: torch.Tensor) -> float:
        """Phase one, part one: form every block's Gram into ``store``, reading the buffer only;
        return the sum of squares of the group's gradient entries (float64; NaN or Inf when an
        entry is non-finite or the sum overflows), read off the Grams' diagonals.

        ``store`` is (nblocks, B, B) for the direct form (G_b^T G_b / m, later inverted in
        place) and (nblocks, m, m) for Woodbury (G_b G_b^T, later factored in place)."""
        self.q_form = buffer.dtype in (torch.float32, torch.float64)
        self.store = store
        self.native = (
            native_build_enabled()
            and (self.direct or self.m <= NATIVE_WOODBURY_MAX_M)
            and native.supports_build(buffer)
        )
        if self.native:
            gram = native.direct_gram if self.direct else native.woodbury_gram
            gram(buffer, self.start, self.size, store)
            return float(store.diagonal(dim1=1, dim2=2).sum()) * (self.m if self.direct else 1)
        blocks, rows, cols = self._plan()
        view = self._view(buffer)
        total = torch.zeros((), dtype=F64, device=buffer.device)
        for b0, b1 in _chunks(self.nblocks, blocks):
            gram = store[b0:b1]
            if self.direct:
                for r0, r1 in _chunks(self.m, rows):
                    # (nb, rows, size): rows of each block stay contiguous, so the copy streams.
                    src = view[r0:r1, b0:b1, :].permute(1, 0, 2)
                    tile = scratch[: src.numel()].view(src.shape).copy_(src)
                    # beta = 0 on the first rows: the store's old contents are ignored.
                    beta = 0.0 if r0 == 0 else 1.0
                    torch.baddbmm(
                        gram, tile.transpose(1, 2), tile, beta=beta, alpha=1.0 / self.m, out=gram
                    )
            else:
                for c0, c1 in _chunks(self.size, cols):
                    tile = self._tile(buffer, scratch, b0, b1, c0, c1)
                    beta = 0.0 if c0 == 0 else 1.0
                    torch.baddbmm(gram, tile, tile.transpose(1, 2), beta=beta, out=gram)
            total += gram.diagonal(dim1=1, dim2=2).sum()
        return float(total) * (self.m if self.direct else 1)

    def factor(self, buffer: torch.Tensor, damp: float) -> None:
        """Phase one, part two: add the damping and factor every block in place (direct form:
        then invert); raise FisherFactorError, naming the block, the damping and the cause,
        when a block does not factor."""
        self.damp = damp
        floor = damp if self.direct else self.m * damp
        if self.native:
            # Direct: the inverses (C Cholesky, inverse of the factor, its Gram). Woodbury: the
            # upper factors U (K_b = U^T U) that finish() solves with.
            invert = native.direct_invert if self.direct else native.woodbury_factor
            pivots = invert(self.store, floor)
            ok = (torch.isfinite(pivots) & (pivots >= PIVOT_SHARE * floor)).all(1)
            if not bool(ok.all()):
                bad = int((~ok).nonzero()[0])
                raise FisherFactorError(
                    self._failure(self._damped_gram(buffer, bad, floor), bad, floor, buffer)
                )
            if self.direct:
                self.inverse = self.store
            else:
                self.upper = self.store
            del self.store
            return
        blocks = self._plan()[0]
        for b0, b1 in _chunks(self.nblocks, blocks):
            mats = self.store[b0:b1]
            mats.diagonal(dim1=1, dim2=2).add_(floor)
            with single_threaded(b1 - b0 > 1, buffer.device):
                chol = self._cholesky(mats, b0, floor, buffer)
                if self.direct:
                    inverse_from_cholesky(chol, out=mats)
                else:
                    mats.copy_(chol)
        if self.direct:
            self.inverse = self.store
        else:
            self.chol = self.store
        del self.store

    def _cholesky(
        self, mats: torch.Tensor, b0: int, floor: float, buffer: torch.Tensor
    ) -> torch.Tensor:
        """Cholesky factors of a batch of blocks whose smallest eigenvalue is at least ``floor``
        in exact arithmetic; raise FisherFactorError when float64 rounding breaks that."""
        chol, info = torch.linalg.cholesky_ex(mats)
        pivots = chol.diagonal(dim1=1, dim2=2)
        ok = (info == 0) & (pivots.square() >= PIVOT_SHARE * floor).all(1)
        ok &= torch.isfinite(pivots).all(1)
        if bool(ok.all()):
            return chol
        bad = int((~ok).nonzero()[0])
        raise FisherFactorError(self._failure(mats[bad], b0 + bad, floor, buffer))

    def _damped_gram(self, buffer: torch.Tensor, block: int, floor: float) -> torch.Tensor:
        """One block's damped matrix, formed again (float64) for a message: lambda*I +
        G_b^T G_b / m (direct) or m*lambda*I + G_b G_b^T (Woodbury)."""
        cols = self._view(buffer)[:, block, :].to(F64)
        mat = cols.T @ cols / self.m if self.direct else cols @ cols.T
        mat.diagonal().add_(floor)
        return mat

    def _failure(self, mat: torch.Tensor, block: int, floor: float, buffer: torch.Tensor) -> str:
        lo = self.start + block * self.size
        where = f"block {block} of size {self.size} (coordinates {lo}..{lo + self.size - 1})"
        kind = "B x B matrix lambda*I + G_b^T G_b/m" if self.direct else "m x m matrix K_b"
        head = f"the damped Fisher's {kind} for {where} does not factor in float64 at damp="
        head += f"{self.damp:.3g}: "
        if not bool(torch.isfinite(mat).all()):
            cols = buffer[:, lo : lo + self.size]
            peak = float(cols.abs().max())
            cause = (
                f"the products of its gradients overflow float64 (largest |entry| {peak:.3g}); "
                "rescale the gradients"
            )
        else:
            top = float(mat.diagonal().abs().max())
            cause = (
                "its gradients are linearly dependent to float64 precision: the largest "
                f"diagonal entry {top:.3g} rounds away the damping term {floor:.3g}; increase "
                f"damp to at least {top * 1e-13:.3g}"
            )
        return head + cause + ". Nothing was written: the gradient buffer is unchanged."

    def finish(self, buffer: torch.Tensor, scratch: torch.Tensor) -> None:
        """Phase two (after every group factored): overwrite G by Q = L^-1 G in place (q form)
        and drop the factors; nothing to do for the direct and g forms."""
        if self.direct or not self.q_form:
            return
        if self.native:  # q form from float32/float64: the C solve, tile by tile in cache
            native.woodbury_solve(buffer, self.start, self.size, self.upper)
            del self.upper
            return
        blocks, _, cols = self._plan()
        view = self._view(buffer)
        for b0, b1 in _chunks(self.nblocks, blocks):
            for c0, c1 in _chunks(self.size, cols):
                tile = self._tile(buffer, scratch, b0, b1, c0, c1)
                with single_threaded(b1 - b0 > 1, buffer.device):
                    torch.linalg.solve_triangular(self.chol[b0:b1], tile, upper=False, out=tile)
                view[:, b0:b1, c0:c1].copy_(tile.permute(1, 0, 2))
        del self.chol

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
        blocks, _, cols = self._plan()
        scratch = BlockGroup.new_scratch([self], x.device)
        for b0, b1 in _chunks(self.nblocks, blocks):
            gx = torch.zeros(b1 - b0, self.m, k, dtype=F64, device=x.device)
            for c0, c1 in _chunks(self.size, cols):
                gx.baddbmm_(self._tile(buffer, scratch, b0, b1, c0, c1), xv[b0:b1, c0:c1])
            c = torch.cholesky_solve(gx, self.chol[b0:b1])
            for c0, c1 in _chunks(self.size, cols):
                tile = self._tile(buffer, scratch, b0, b1, c0, c1)
                out[b0:b1, c0:c1] = xv[b0:b1, c0:c1] - tile.transpose(1, 2) @ c
        return out.view(-1, k).div_(self.damp)

    def diag(self, buffer: torch.Tensor) -> torch.Tensor:
        """The group's part of diag(F^-1), float64."""
        if self.direct:
            return self.inverse.diagonal(dim1=1, dim2=2).reshape(-1).clone()
        sq = torch.empty(self.nblocks, self.size, dtype=F64, device=buffer.device)
        blocks, _, cols = self._plan()
        scratch = BlockGroup.new_scratch([self], buffer.device)
        for b0, b1 in _chunks(self.nblocks, blocks):
            for c0, c1 in _chunks(self.size, cols):
                tile = self._tile(buffer, scratch, b0, b1, c0, c1)
                if not self.q_form:
                    torch.linalg.solve_triangular(self.chol[b0:b1], tile, upper=False, out=tile)
                torch.linalg.vector_norm(tile, dim=1, out=sq[b0:b1, c0:c1])
        return sq.view(-1).square_().neg_().add_(1.0).div_(self.damp)

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
