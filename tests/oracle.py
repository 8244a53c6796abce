"""Dense float64 oracles for the inverse Fisher, shared by the operator tests, and hard inputs
for a top-k selection."""

from __future__ import annotations

import torch

F64 = torch.float64


def dense_inverse_fisher(grads: torch.Tensor, damp: float) -> torch.Tensor:
    """The dense d x d inverse of F = damp*I + G^T G / m, in float64.

    Built spectrally from the thin SVD G = U S V^T, F^-1 = V diag(1/(damp + s^2/m)) V^T +
    (I - V V^T)/damp, which stays accurate where a plain float64 inverse of F loses digits
    (condition numbers up to 1e11 at damp 1e-8).
    """
    g = grads.to(F64)
    m, d = g.shape
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    v = vh.T
    inside = (v * (1.0 / (damp + s**2 / m))) @ v.T
    if v.shape[1] == d:  # d <= m: V is square, I - V V^T is zero but its rounding / damp is not
        return inside
    return inside + (torch.eye(d, dtype=F64) - v @ v.T) / damp


def dense_block_inverse_fisher(grads: torch.Tensor, damp: float, block: int | None) -> torch.Tensor:
    """Block-diagonal oracle with contiguous blocks of ``block`` columns (last one shorter)."""
    d = grads.shape[1]
    if block is None or block >= d:
        return dense_inverse_fisher(grads, damp)
    pieces = [dense_inverse_fisher(grads[:, s : s + block], damp) for s in range(0, d, block)]
    return torch.block_diag(*pieces)


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Norm-wise relative error ||approx - exact|| / ||exact|| in float64."""
    exact = exact.to(F64)
    approx = approx.to(device=exact.device, dtype=F64)  # device-run results vs CPU oracles
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-300))


def hard_vector(d: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A d-vector that is hard for a top-k selection: "normal", "ties" (few distinct
    magnitudes), "sparse" (mostly zeros), "sorted", "spike" (a few huge entries) or
    "constant" (every magnitude tied)."""
    x = torch.randn(d, generator=gen)
    if kind == "ties":
        x = torch.randint(-20, 20, (d,), generator=gen).float()
    elif kind == "sparse":
        x = x * (torch.rand(d, generator=gen) < 0.002)
    elif kind == "sorted":
        x = x.abs().sort().values
    elif kind == "spike":
        x[::997] *= 1e6
    elif kind == "constant":
        x = torch.full((d,), -0.5)
    return x


def dense_fisher(grads: torch.Tensor, damp: float, block: int | None) -> torch.Tensor:
    """F = damp*I + G^T G / m restricted to its diagonal blocks, float64."""
    g = grads.to(F64)
    m, d = g.shape
    full = damp * torch.eye(d, dtype=F64) + g.T @ g / m
    if block is None or block >= d:
        return full
    mask = torch.zeros(d, d, dtype=torch.bool)
    for s in range(0, d, block):
        mask[s : s + block, s : s + block] = True
    return torch.where(mask, full, torch.zeros((), dtype=F64))
