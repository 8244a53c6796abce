"""The inverse Fisher as a linear operator: ``F_inv @ x``, a SciPy export, log det F, and draws
from N(0, F^-1), plus the parameter layout (`FlatLayout`) of an operator built from a model.

Every query works block by block on the factors the operator already holds, never forming a
d x d matrix. For a block of B coordinates with m gradients:

* direct blocks (B <= m) hold F_b^-1 (B x B, float64): with its Cholesky factor C,
  log det F_b = -2 sum log C_ii, and C z ~ N(0, F_b^-1) for z ~ N(0, I). O(B^3) per block,
  O(d B^2) <= O(d m^2) in all.
* Woodbury blocks (B > m) are F_b^-1 = (I - Q^T Q) / lambda with Q = L^-1 G (m x B). With the
  eigendecomposition Q Q^T = W diag(mu) W^T (m x m, eigenvalues mu in [0, 1)):
  log det F_b = B log(lambda) - sum log(1 - mu_i), and the symmetric square root
  S = lambda^-1/2 (I - Q^T Q)^1/2 = lambda^-1/2 (I + Q^T W diag(c) W^T Q),
  c_i = -1 / (1 + sqrt(1 - mu_i)), satisfies S S^T = F_b^-1. O(m^2 B + m^3) per block.
  When the operator keeps L (low-precision storage), log det uses it directly:
  log det F_b = (B - m) log(lambda) - m log(m) + 2 sum log L_ii.

Precision: the float32 Q form stores 1 - mu_i to about 1e-7 absolute, so eigenvalues of F above
roughly lambda * 1e7 are resolved only as well as the operator's own products resolve them.
Build the operator from float64 gradients when log det must be exact in those directions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._validation import check_positive_int, check_vector
from .layout import FlatLayout

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

F64 = torch.float64
_TILE_BYTES = 64 << 20


class LinearOperatorMixin:
    """Linear-operator queries shared by the static inverse Fisher (full or block-diagonal).

    The host class provides ``dim``, ``damp``, ``num_grads``, ``device``, ``buffer``, ``groups``
    (contiguous groups of equal blocks) and ``ihvp``.
    """

    layout: FlatLayout | None = None

    # ------------------------------------------------------------------ products
    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)  # type: ignore[attr-defined]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 @ x for a (d,) vector or a (d, k) matrix."""
        return self.ihvp(x)  # type: ignore[attr-defined]

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric) applying F^-1."""
        from scipy.sparse.linalg import LinearOperator

        def apply(v: Any) -> Any:
            x = torch.as_tensor(v, dtype=F64).to(self.device)  # type: ignore[attr-defined]
            return self.ihvp(x).cpu().numpy()  # type: ignore[attr-defined]

        return LinearOperator(
            self.shape, matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply, dtype=float
        )

    # ------------------------------------------------------------------ layout
    def flatten(
        self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], batched: bool = False
    ) -> torch.Tensor:
        """Named tensors (or gradients in layout order) to the operator's flat vector."""
        return self._layout().flatten(tensors, batched)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """The operator's flat vector to named tensors, shaped like the model's parameters."""
        return self._layout().unflatten(vector)

    def _layout(self) -> FlatLayout:
        if self.layout is None:
            raise AttributeError(
                "this operator has no parameter layout: build it with InverseFisher.from_model"
            )
        return self.layout

    # ------------------------------------------------------------------ spectrum
    def eigenpairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest eigenvalues of the damped Fisher F (not F^-1), descending, as a
        float64 (k,) tensor, and orthonormal eigenvectors as the columns of a float64 (d, k)
        tensor; exact, from each block's m x m Gram (B x B for direct blocks). A block-diagonal
        operator gives the union of its blocks' eigenpairs. ``k`` may not exceed d nor the
        number of eigenvalues that can differ from the damping (m for the full operator, the
        sum of min(B, m) over the blocks). See :mod:`mfac.operators.spectrum`."""
        from .spectrum import eigenpairs

        return eigenpairs(self, k)

    def trace(self, inverse: bool = False) -> float:
        """tr F of the damped Fisher (``inverse=True``: tr F^-1, the sum of ``diag()``)."""
        from .spectrum import trace

        return trace(self, inverse)

    # ------------------------------------------------------------------ log det and sampling
    def logdet(self) -> float:
        """log det F of the damped Fisher F itself (not of F^-1, whose log det is minus this);
        float64, O(m^2 d) for the full operator and O(d min(B, m)^2) blocked."""
        return float(sum(f.logdet() for f in self._factors()))

    def apply_sqrt(self, z: torch.Tensor) -> torch.Tensor:
        """S z for a square root S with S S^T = F^-1 (z of shape (d,) or (d, k); float64 out).

        Symmetric on Woodbury blocks, lower triangular (Cholesky) on direct blocks."""
        check_vector(z, self.dim, self.device, "z")  # type: ignore[attr-defined]
        zm = (z.unsqueeze(1) if z.ndim == 1 else z).to(F64)
        out = torch.empty_like(zm)
        for group, factor in zip(self.groups, self._factors(), strict=True):  # type: ignore[attr-defined]
            out[group.start : group.stop] = factor.sqrt_apply(zm[group.start : group.stop])
        return out.squeeze(1) if z.ndim == 1 else out

    def _factors(self) -> list[_DirectFactor | _WoodburyFactor]:
        """The per-group factors, computed on first use and kept: m x m per Woodbury block,
        B x B per direct block (as many bytes as the direct blocks' stored inverses)."""
        cached = getattr(self, "_linear_factors", None)
        if cached is None or cached[0] != self.device:  # type: ignore[attr-defined]
            factors = [_factor(self, g) for g in self.groups]  # type: ignore[attr-defined]
            cached = (self.device, factors)  # type: ignore[attr-defined]
            self._linear_factors = cached
        return cached[1]

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = F64
    ) -> torch.Tensor:
        """n independent draws from N(0, F^-1) as an (n, d) tensor: S z for standard normal z."""
        check_positive_int(n, "n")
        z = torch.randn(self.dim, n, dtype=F64, device=self.device, generator=generator)  # type: ignore[attr-defined]
        return self.apply_sqrt(z).T.to(dtype).contiguous()


# ---------------------------------------------------------------------- per-group factors
def _column_tiles(size: int, rows: int, nblocks: int) -> list[tuple[int, int]]:
    width = max(1, min(size, _TILE_BYTES // max(1, 8 * rows * nblocks)))
    return [(c, min(size, c + width)) for c in range(0, size, width)]


class _DirectFactor:
    """Cholesky factors C of the stored block inverses: C C^T = F_b^-1."""

    def __init__(self, op: Any, group: Any) -> None:
        size, nb = group.size, group.nblocks
        blocks = getattr(group, "inverse", None)
        if not (isinstance(blocks, torch.Tensor) and blocks.shape == (nb, size, size)):
            blocks = self._read_blocks(op, group)
        blocks = 0.5 * (blocks.to(F64) + blocks.to(F64).transpose(1, 2))
        self.chol = torch.linalg.cholesky(blocks)

    @staticmethod
    def _read_blocks(op: Any, group: Any) -> torch.Tensor:
        """The blocks of F^-1 through the public product: column j of every block at once,
        a few columns per product so the (d, c) float64 probe stays within a tile."""
        size, nb = group.size, group.nblocks
        out = torch.empty(nb, size, size, dtype=F64, device=op.device)
        rows = torch.arange(group.start, group.stop, device=op.device)
        local = torch.arange(size, device=op.device).repeat(nb)
        for c0, c1 in _column_tiles(size, op.dim, 1):
            probe = torch.zeros(op.dim, c1 - c0, dtype=F64, device=op.device)
            hit = (local >= c0) & (local < c1)
            probe[rows[hit], local[hit] - c0] = 1.0
            out[:, :, c0:c1] = op.ihvp(probe)[group.start : group.stop].view(nb, size, c1 - c0)
        return out

    def logdet(self) -> float:
        return float(-2.0 * self.chol.diagonal(dim1=1, dim2=2).log().sum())

    def sqrt_apply(self, z: torch.Tensor) -> torch.Tensor:
        nb, size, _ = self.chol.shape
        k = z.shape[1]
        return torch.bmm(self.chol, z.reshape(nb, size, k)).reshape(-1, k)


class _WoodburyFactor:
    """Q = T R with R the stored (m x B) rows of each block (Q itself, or G with T = L^-1)."""

    def __init__(self, op: Any, group: Any) -> None:
        self.op, self.group = op, group
        self.m, self.damp = op.num_grads, op.damp
        self.view = op.buffer[:, group.start : group.stop].view(self.m, group.nblocks, group.size)
        self.tiles = _column_tiles(group.size, self.m, group.nblocks)
        gram = torch.zeros(group.nblocks, self.m, self.m, dtype=F64, device=op.device)
        for c0, c1 in self.tiles:
            tile = self._tile(c0, c1)
            gram.baddbmm_(tile, tile.transpose(1, 2))
        self.chol = None if group.q_form else group.chol.to(F64)
        if self.chol is not None:  # Q Q^T = L^-1 (G G^T) L^-T
            linv = torch.linalg.solve_triangular(
                self.chol,
                torch.eye(self.m, dtype=F64, device=op.device).expand_as(gram),
                upper=False,
            )
            gram = linv @ gram @ linv.transpose(1, 2)
        mu, w = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))
        self.mu = mu.clamp(0.0, 1.0 - 1e-15)
        c = -1.0 / (1.0 + torch.sqrt(1.0 - self.mu))
        core = w @ (c[:, :, None] * w.transpose(1, 2))  # W diag(c) W^T
        if self.chol is not None:  # fold T = L^-1 in: M = T^T W c W^T T
            core = linv.transpose(1, 2) @ core @ linv
        self.core = core

    def _tile(self, c0: int, c1: int) -> torch.Tensor:
        src = self.view[:, :, c0:c1].permute(1, 0, 2)
        return torch.empty(src.shape, dtype=F64, device=src.device).copy_(src)

    def logdet(self) -> float:
        g = self.group
        if self.chol is not None:
            diag_log = self.chol.diagonal(dim1=1, dim2=2).log().sum()
            per_block = (g.size - self.m) * math.log(self.damp) - self.m * math.log(self.m)
            return float(g.nblocks * per_block + 2.0 * diag_log)
        return float(g.nblocks * g.size * math.log(self.damp) - torch.log1p(-self.mu).sum())

    def sqrt_apply(self, z: torch.Tensor) -> torch.Tensor:
        g, k = self.group, z.shape[1]
        zv = z.reshape(g.nblocks, g.size, k)
        rz = torch.zeros(g.nblocks, self.m, k, dtype=F64, device=z.device)
        for c0, c1 in self.tiles:
            rz.baddbmm_(self._tile(c0, c1), zv[:, c0:c1])
        y = torch.bmm(self.core, rz)
        out = zv.clone()
        for c0, c1 in self.tiles:
            out[:, c0:c1].baddbmm_(self._tile(c0, c1).transpose(1, 2), y)
        return out.reshape(-1, k).div_(math.sqrt(self.damp))


def _factor(op: Any, group: Any) -> _DirectFactor | _WoodburyFactor:
    return _DirectFactor(op, group) if group.direct else _WoodburyFactor(op, group)


__all__ = ["LinearOperatorMixin"]
