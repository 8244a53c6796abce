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
        self.v = torch.empty(m, d, dtype=grads.dtype)
        self.denom = torch.empty(m, dtype=grads.dtype)
        for i in range(m):  # the paper's loop over gradients
            g = grads[i]
            coeff = (self.v[:i] @ g) / self.denom[:i]
            self.v[i] = g / damp - self.v[:i].T @ coeff
            self.denom[i] = m + g @ self.v[i]

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x in two passes over the stored v's."""
        return x / self.damp - self.v.T @ ((self.v @ x) / self.denom)
