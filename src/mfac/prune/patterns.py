"""Sparsity budgets and patterns: turning per-weight scores into keep-masks, globally, per
layer, or N:M (keep at most N of every M consecutive weights along a layer's input)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._layers import Target

Pattern = tuple[int, int] | None


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as a float in [0, 1), or raise."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
    return value


def parse_pattern(pattern: str | Sequence[int] | None) -> Pattern:
    """``None``/"unstructured" -> None; "2:4" or (2, 4) -> (2, 4) with 1 <= N < M."""
    if pattern is None or pattern == "unstructured":
        return None
    try:
        if isinstance(pattern, str):
            n_str, m_str = pattern.split(":")
            n, m = int(n_str), int(m_str)
        else:
            n, m = (int(v) for v in pattern)
    except (ValueError, TypeError):
        raise ValueError(f"pattern must be 'N:M' (e.g. '2:4') or (N, M), got {pattern!r}") from None
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern needs 1 <= N < M, got {n}:{m}")
    return n, m


def check_pattern_fits(targets: Sequence[Target], pattern: Pattern) -> None:
    """Every layer's input width must be divisible by M."""
    if pattern is None:
        return
    m = pattern[1]
    bad = [(t.name, t.row_width) for t in targets if t.row_width % m]
    if bad:
        raise ValueError(
            f"N:M pattern {pattern[0]}:{m} needs layer input widths divisible by {m}; "
            f"these are not: {bad[:5]}; exclude them (exclude=[...], --exclude NAME)"
        )


def check_nm_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The sparsity to use: ``sparsity`` itself without a pattern; with N:M, 1 - N/M, refusing
    any other value (2:4 removes exactly half, so 0.8 with 2:4 is a contradiction). ``None``
    with a pattern means "whatever the pattern gives"."""
    if pattern is None:
        if sparsity is None:
            raise ValueError("sparsity is required without an N:M pattern")
        return check_sparsity(sparsity)
    implied = 1.0 - pattern[0] / pattern[1]
    if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
        raise ValueError(
            f"sparsity {sparsity} contradicts the N:M pattern {pattern[0]}:{pattern[1]}, which "
            f"removes exactly {implied:g}; pass sparsity={implied:g} (or none) with this pattern"
        )
    return implied


def nm_keep(scores: torch.Tensor, prior: torch.Tensor, pattern: tuple[int, int]) -> torch.Tensor:
    """Keep the N best-scoring of every M consecutive weights (prior zeros count as dropped)."""
    n, m = pattern
    s = torch.where(prior, scores.to(torch.float64), -math.inf).reshape(-1, m)
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(1, s.topk(n, dim=1).indices, True)
    return (keep.view(scores.shape) & prior).view(scores.shape)


def select(
    scores: Sequence[torch.Tensor],
    priors: Sequence[torch.Tensor],
    sparsity: float,
    scope: str = "global",
    pattern: Pattern = None,
) -> list[torch.Tensor]:
    """Keep-masks from per-weight scores (higher = keep). Already-pruned weights stay pruned,
    and count towards the budget."""
    if pattern is not None:
        return [nm_keep(s, p, pattern) for s, p in zip(scores, priors, strict=True)]
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    masked = [
        torch.where(p, s.to(torch.float64), -math.inf).reshape(-1)
        for s, p in zip(scores, priors, strict=True)
    ]
    if scope == "layer":
        return [
            _drop_lowest(v, round(sparsity * v.numel())).view(p.shape)
            for v, p in zip(masked, priors, strict=True)
        ]
    flat = torch.cat(masked)
    keep = _drop_lowest(flat, round(sparsity * flat.numel()))
    return [
        k.view(p.shape)
        for k, p in zip(keep.split([v.numel() for v in masked]), priors, strict=True)
    ]


def lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` smallest entries of a 1-D tensor, ties broken by position.

    A selection (``kthvalue``, linear time) rather than ``topk`` or a sort: ``count`` is often a
    large fraction of the entries (50 % per-layer pruning), where those do the most work.
    """
    out = torch.zeros_like(values, dtype=torch.bool)
    if count <= 0:
        return out
    if count >= values.numel():
        return ~out
    thr = values.kthvalue(count).values
    out = values < thr
    ties = (values == thr).nonzero().flatten()[: count - int(out.sum())]
    out[ties] = True
    return out


def _drop_lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask dropping the ``count`` lowest values and every -inf (already pruned) one."""
    count = max(count, int(torch.isneginf(values).sum()))
    keep = torch.ones_like(values, dtype=torch.bool)
    if count:
        keep &= ~lowest(values, count)
    return keep
