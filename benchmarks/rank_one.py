"""The M-FAC paper's rank-one recursion, written plainly (a loop over the m gradients), as the
baseline the BLAS-3 operator is measured against.

F_0^-1 = I / lambda;  v_i = F_{i-1}^-1 g_i;  d_i = m + g_i^T v_i;
F_i^-1 = F_{i-1}^-1 - v_i v_i^T / d_i.
Each v_i is computed from the previous v_j (a matrix-vector product over the i x d matrix of
earlier v's), so the precompute is m BLAS-2 passes: O(m^2 d) flops at memory speed.
"""

from __future__ import annotations

import torch


class RankOneInverseFisher:
    """F^-1 = I/lambda - sum_i v_i v_i^T / d_i, built by the paper's recursion."""

    def __init__(self, grads: torch.Tensor, damp: float) -> None:
        m, d = grads.shape
        self.damp = damp
        self.v = torch.empty(m, d, dtype=grads.dtype, device=grads.device)
        self.denom = torch.empty(m, dtype=grads.dtype, device=grads.device)
        for i in range(m):  # the paper's loop over gradients
            g = grads[i]
            coeff = (self.v[:i] @ g) / self.denom[:i]
            self.v[i] = g / damp - self.v[:i].T @ coeff
            self.denom[i] = m + g @ self.v[i]

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x in two passes over the stored v's."""
        return x / self.damp - self.v.T @ ((self.v @ x) / self.denom)


class BlockRankOneInverseFisher:
    """The same recursion for a block-diagonal F (contiguous blocks of ``block_size``), run for
    every block at once (batched over blocks) while looping over the m gradients."""

    def __init__(self, grads: torch.Tensor, damp: float, block_size: int) -> None:
        m, d = grads.shape
        if d % block_size:
            raise ValueError(f"block_size {block_size} must divide d = {d}")
        nblocks = d // block_size
        self.damp = damp
        rows = grads.view(m, nblocks, block_size)
        self.v = torch.empty(nblocks, m, block_size, dtype=grads.dtype, device=grads.device)
        self.denom = torch.empty(nblocks, m, dtype=grads.dtype, device=grads.device)
        for i in range(m):  # the paper's loop over gradients, all blocks in one batched op
            g = rows[i]  # (nblocks, B)
            earlier = self.v[:, :i]  # (nblocks, i, B)
            coeff = torch.bmm(earlier, g.unsqueeze(2)).squeeze(2) / self.denom[:, :i]
            self.v[:, i] = g / damp - torch.bmm(coeff.unsqueeze(1), earlier).squeeze(1)
            self.denom[:, i] = m + (g * self.v[:, i]).sum(1)

    def diag(self) -> torch.Tensor:
        """diag(F^-1) = 1/lambda - sum_i v_i^2 / d_i, per block, flattened."""
        return (1.0 / self.damp - (self.v.square() / self.denom[:, :, None]).sum(1)).reshape(-1)
