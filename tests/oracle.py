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


def assert_state_equal(s1: object, s2: object, path: str = "state") -> None:
    """Equality of two (nested) optimizer states: tensors of equal dtype and shape equal
    entry by entry (NaN matching NaN), everything else with ==."""
    if isinstance(s1, torch.Tensor):
        assert isinstance(s2, torch.Tensor) and s1.dtype == s2.dtype, path
        assert s1.shape == s2.shape, path
        same = s1 == s2
        if s1.is_floating_point():
            same |= s1.isnan() & s2.isnan()
        assert bool(same.all()), path
    elif isinstance(s1, dict):
        assert isinstance(s2, dict) and s1.keys() == s2.keys(), path
        for key in s1:
            assert_state_equal(s1[key], s2[key], f"{path}[{key!r}]")
    elif isinstance(s1, (list, tuple)):
        assert type(s1) is type(s2) and len(s1) == len(s2), path
        for i, (a, b) in enumerate(zip(s1, s2, strict=True)):
            assert_state_equal(a, b, f"{path}[{i}]")
    else:
        assert s1 == s2 or (s1 != s1 and s2 != s2), path
