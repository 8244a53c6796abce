"""The spectrum of the damped empirical Fisher F = lambda*I + G^T G / m behind an
`InverseFisher`: its top-k eigenpairs and its trace (and that of F^-1), exact, from the small
matrices of each block and never a d x d one.

What each block form stores, and where its eigenpairs come from (block of B coordinates):

* direct (B <= m): the rows G_b stay in the buffer as given (only F_b^-1 is added), so
  F_b = lambda*I + G_b^T G_b / m is formed in float64 (B x B) and diagonalised: all B
  eigenpairs, exact.
* Woodbury, "g" form (bfloat16/float16 storage): G_b is kept as stored, so with
  G_b G_b^T = V diag(sigma) V^T (m x m, float64) the eigenvalues are lambda + sigma_i / m and
  the eigenvectors G_b^T v_i / sqrt(sigma_i); the other B - m eigenvalues are lambda.
* Woodbury, "q" form (float32/float64 gradients): G_b was overwritten by Q_b = L_b^-1 G_b with
  L_b L_b^T = K_b = m*lambda*I + G_b G_b^T, and L_b was dropped. Then
  Q_b Q_b^T = I - m*lambda*K_b^-1 = W diag(mu) W^T with mu_i = sigma_i / (m*lambda + sigma_i)
  in [0, 1), and F_b^-1 = (I - Q_b^T Q_b) / lambda, so F_b has the eigenvalues
  lambda / (1 - mu_i) (= lambda + sigma_i / m) with eigenvectors Q_b^T w_i / sqrt(mu_i), and
  lambda on the rest. These are exact for the stored Q_b in float64 arithmetic (the
  vectors are orthonormal to rounding); as for log det, float32 storage resolves 1 - mu_i to
  about 1e-7, so eigenvalues above about lambda * 1e7 are only as accurate as the operator's
  own products (build from float64 gradients where they must be exact).

A block-diagonal operator is the direct sum of its blocks: its spectrum is the union of the
blocks' spectra and each eigenvector is a block's eigenvector padded with zeros, so the top k
are the k largest of every block's top k. Eigenvalues at lambda (directions no gradient
touches, sigma_i = 0 to float64 rounding) get orthonormal vectors in the block's null space
of G_b, drawn from a fixed generator.

Cost: O(m^2 d) for the Grams plus O(d k) per block for the vectors (O(m B d) for direct blocks).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validation import check_positive_int

F64 = torch.float64
_TILE_BYTES = 64 << 20

#: A Gram eigenvalue at or below this share of the largest (and, in the q form, of 1) is zero
#: to float64 rounding: the direction's eigenvalue of F is lambda to within that share.
NULL_SHARE = 1e-13


class SpectrumError(ValueError):
    """The Gram matrices of the stored rows are not finite (rows changed after the build)."""


def _check_gram(gram: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(gram).all()):
        raise SpectrumError(
            f"the Gram matrix of {where} is not finite: the stored rows hold NaN/Inf or their "
            "products overflow float64 (was the buffer changed after the build?); the operator "
            "is unchanged"
        )


def _col_tiles(size: int, rows: int, nblocks: int) -> list[tuple[int, int]]:
    width = max(1, min(size, _TILE_BYTES // max(1, 8 * rows * nblocks)))
    return [(c, min(size, c + width)) for c in range(0, size, width)]


def _block_chunks(nblocks: int, per_block: int) -> list[tuple[int, int]]:
    step = max(1, min(nblocks, _TILE_BYTES // max(1, 8 * per_block)))
    return [(b, min(nblocks, b + step)) for b in range(0, nblocks, step)]


def _view(op: Any, group: Any) -> torch.Tensor:
    return op.buffer[:, group.start : group.stop].view(op.num_grads, group.nblocks, group.size)


def _rows_gram(op: Any, group: Any) -> torch.Tensor:
    """R_b R_b^T (nblocks, m, m) in float64 for the rows R_b a Woodbury block stores."""
    view, m = _view(op, group), op.num_grads
    gram = torch.zeros(group.nblocks, m, m, dtype=F64, device=op.device)
    for c0, c1 in _col_tiles(group.size, m, group.nblocks):
        tile = view[:, :, c0:c1].permute(1, 0, 2).to(F64)
        gram.baddbmm_(tile, tile.transpose(1, 2))
    return gram


def _complete(vecs: torch.Tensor, good: torch.Tensor, gen: torch.Generator) -> None:
    """Replace the columns of ``vecs`` (size, j) not in ``good`` by orthonormal vectors
    orthogonal to the good ones (and so to the block's row space, up to the dropped null share)."""
    bad = (~good).nonzero().flatten()
    if not bad.numel():
        return
    keep = vecs[:, good]
    z = torch.randn(vecs.shape[0], bad.numel(), dtype=F64, generator=gen).to(vecs.device)
    for _ in range(2):  # twice: one projection loses orthogonality to rounding
        z -= keep @ (keep.T @ z)
    vecs[:, bad] = torch.linalg.qr(z).Q


def _woodbury_top(
    op: Any, group: Any, j: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``j`` (<= m) eigenpairs of each Woodbury block: (nblocks, j), (nblocks, B, j)."""
    m, lam = op.num_grads, op.damp
    gram = _rows_gram(op, group)
    _check_gram(gram, f"the Woodbury blocks at coordinates {group.start}..{group.stop - 1}")
    a, w = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))
    a, w = a.flip(-1)[:, :j], w.flip(-1)[:, :, :j]
    q_form = group.q_form
    scale = torch.ones_like(a) if q_form else a[:, :1].clamp_min(0.0)
    good = a > NULL_SHARE * scale
    a_pos = torch.where(good, a, torch.ones_like(a))
    if q_form:
        vals = lam / (1.0 - a.clamp(0.0, 1.0 - 1e-16))
    else:
        vals = lam + a.clamp_min(0.0) / m
    vals = torch.where(good, vals, torch.full_like(vals, lam))
    coef = w / a_pos.sqrt()[:, None, :] * good[:, None, :]  # (nb, m, j)
    view = _view(op, group)
    vecs = torch.empty(group.nblocks, group.size, j, dtype=F64, device=op.device)
    for c0, c1 in _col_tiles(group.size, m, group.nblocks):
        tile = view[:, :, c0:c1].permute(1, 0, 2).to(F64)  # (nb, m, w)
        vecs[:, c0:c1] = torch.bmm(tile.transpose(1, 2), coef)
    for b in (~good).any(1).nonzero().flatten().tolist():
        _complete(vecs[b], good[b], gen)
    return vals, vecs


def _direct_top(op: Any, group: Any, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``j`` eigenpairs of each direct block, from F_b formed from the kept rows G_b."""
    m, lam, size = op.num_grads, op.damp, group.size
    view = _view(op, group)
    vals = torch.empty(group.nblocks, j, dtype=F64, device=op.device)
    vecs = torch.empty(group.nblocks, size, j, dtype=F64, device=op.device)
    for b0, b1 in _block_chunks(group.nblocks, m * size + 2 * size * size):
        rows = view[:, b0:b1, :].permute(1, 0, 2).to(F64)  # (nb, m, B)
        fisher = rows.transpose(1, 2) @ rows / m
        _check_gram(fisher, f"the direct blocks {b0}..{b1 - 1} at coordinates {group.start}..")
        fisher.diagonal(dim1=1, dim2=2).add_(lam)
        e, v = torch.linalg.eigh(fisher)
        vals[b0:b1] = e.flip(-1)[:, :j]
        vecs[b0:b1] = v.flip(-1)[:, :, :j]
    return vals, vecs


def rank_bound(op: Any) -> int:
    """The most eigenvalues of F that can differ from lambda: sum over blocks of min(B, m)."""
    return sum(g.nblocks * min(g.size, op.num_grads) for g in op.groups)


def eigenpairs(op: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues of F (descending, float64 (k,)) and orthonormal
    eigenvectors (float64 (d, k), column i for eigenvalue i). See the module docstring."""
    check_positive_int(k, "k")
    bound = rank_bound(op)
    if k > op.dim:
        raise ValueError(f"k = {k} exceeds the dimension d = {op.dim}")
    if k > bound:
        what = (
            f"the window (m = {op.num_grads} gradients)"
            if len(op.groups) == 1 and op.groups[0].nblocks == 1
            else f"the blocks' rank bound (sum of min(B, m) over the blocks = {bound})"
        )
        raise ValueError(
            f"k = {k} exceeds {what}: past it every eigenvalue of F is the damping "
            f"{op.damp:.3g} and the eigenvectors are arbitrary"
        )
    gen = torch.Generator().manual_seed(0)
    parts = []
    for group in op.groups:
        j = min(k, group.size, op.num_grads)
        vals, vecs = _direct_top(op, group, j) if group.direct else _woodbury_top(op, group, j, gen)
        parts.append((group, vals, vecs))
    all_vals = torch.cat([v.reshape(-1) for _, v, _ in parts])
    top = torch.topk(all_vals, k, sorted=True).indices
    out_vals = all_vals[top]
    out_vecs = torch.zeros(op.dim, k, dtype=F64, device=op.device)
    offset = 0
    for group, vals, vecs in parts:
        nb, j = vals.shape
        here = (top >= offset) & (top < offset + nb * j)
        for col in here.nonzero().flatten().tolist():
            block, idx = divmod(int(top[col]) - offset, j)
            lo = group.start + block * group.size
            out_vecs[lo : lo + group.size, col] = vecs[block, :, idx]
        offset += nb * j
    return out_vals, out_vecs


def trace(op: Any, inverse: bool = False) -> float:
    """tr F (default), or tr F^-1 with ``inverse=True``; float64.

    tr F^-1 is the sum of ``diag()`` (O(m d)). tr F is d*lambda + ||G||_F^2 / m where the rows
    G are kept (direct blocks, the g form, O(m d)); for q-form Woodbury blocks it is
    B*lambda + sum_i lambda * mu_i / (1 - mu_i) from the eigenvalues of Q_b Q_b^T (O(m^2 B)),
    resolved as the module docstring says."""
    if inverse:
        diag = op.diag()
        if not bool(torch.isfinite(diag).all()):
            raise SpectrumError(
                "the diagonal of F^-1 is not finite: the stored rows hold NaN/Inf (was the "
                "buffer changed after the build?); the operator is unchanged"
            )
        return float(diag.sum())
    lam, m = op.damp, op.num_grads
    total = op.dim * lam
    for group in op.groups:
        if group.direct or not group.q_form:
            sq = 0.0
            view = _view(op, group)
            for c0, c1 in _col_tiles(group.size, m, group.nblocks):
                sq += float(view[:, :, c0:c1].to(F64).square().sum())
            if not math.isfinite(sq):
                _check_gram(torch.tensor(sq), f"the blocks at coordinates {group.start}..")
            total += sq / m
            continue
        gram = _rows_gram(op, group)
        _check_gram(gram, f"the Woodbury blocks at coordinates {group.start}..{group.stop - 1}")
        mu = torch.linalg.eigvalsh(0.5 * (gram + gram.transpose(1, 2))).clamp(0.0, 1.0 - 1e-16)
        total += float((lam * mu / (1.0 - mu)).sum())
    return total


__all__ = ["SpectrumError", "eigenpairs", "rank_bound", "trace"]
