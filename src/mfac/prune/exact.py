"""mfac-exact: correlated OBS inside each Fisher block (the OBC / CAP refinement).

Inside every block, weights are removed one at a time, greedily by OBS saliency, each removal
applying its exact update and the inverse downdate
    F^-1 <- F^-1 - F^-1[:, p] F^-1[p, :] / [F^-1]_pp,
so the cumulative loss after j removals is that of removing the whole set jointly. One pass
records every block's loss trace; a global (or per-layer) threshold on the increments decides
how many weights each block loses; a second pass replays the greedy removals up to those counts.
All blocks of a chunk advance together (batched torch ops; the loop runs over removal steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..operators import InverseFisher
from ._layers import Layout, Target
from .patterns import Pattern, lowest

F64 = torch.float64
#: float64 bytes of block inverses processed at once.
CHUNK_BYTES = 256 * 2**20


def block_inverses(fisher: InverseFisher, b0: int, b1: int) -> torch.Tensor:
    """Blocks [b0, b1) of F^-1 as a float64 (b1-b0, B, B) tensor (all blocks of size B)."""
    size = fisher.block_size
    return (
        torch.stack(
            [fisher.submatrix(torch.arange(b * size, (b + 1) * size)) for b in range(b0, b1)]
        )
        if _needs_submatrix(fisher)
        else _batched_blocks(fisher, b0, b1)
    )


def _needs_submatrix(fisher: InverseFisher) -> bool:
    group = fisher.groups[0]
    return len(fisher.groups) != 1 or not (group.direct or group.q_form)


def _batched_blocks(fisher: InverseFisher, b0: int, b1: int) -> torch.Tensor:
    """Same blocks from the operator's stored form in one batched product (no per-block loop):
    the stored inverses (direct form) or (I - Q_b^T Q_b) / lambda (Woodbury form)."""
    group, size = fisher.groups[0], fisher.block_size
    if group.direct:
        return group.inverse[b0:b1].clone()
    q = fisher.buffer[:, b0 * size : b1 * size].to(F64)
    q = q.view(fisher.num_grads, b1 - b0, size).permute(1, 0, 2)
    out = -torch.bmm(q.transpose(1, 2), q)
    out.diagonal(dim1=1, dim2=2).add_(1.0)
    return out.div_(fisher.damp)


def greedy_obs(
    hinv: torch.Tensor,
    w: torch.Tensor,
    removable: torch.Tensor,
    steps: int,
    stop: torch.Tensor | None = None,
    pattern: Pattern = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy correlated OBS removal in a batch of blocks.

    hinv (nb, B, B) float64 block inverses, w (nb, B) weights, removable (nb, B) positions
    that may be removed. Runs ``steps`` removals per block (or ``stop[b]`` for block b);
    with an N:M ``pattern`` no group of M consecutive positions loses more than M - N.
    Returns (weights after the removals, removed mask, per-step loss increments (nb, steps),
    +inf where a block had nothing left to remove).
    """
    h = hinv.clone()
    w = w.to(F64).clone()
    nb, size = w.shape
    removed = ~removable.clone()
    rows = torch.arange(nb)
    incs = torch.full((nb, steps), math.inf, dtype=F64)
    inf = torch.tensor(math.inf, dtype=F64)
    for s in range(steps):
        d = h.diagonal(dim1=1, dim2=2)
        loss = torch.where(removed, inf, w.square() / (2.0 * d))
        if pattern is not None:
            n, m = pattern
            full = removed.view(nb, size // m, m).sum(-1) >= (m - n)
            loss = torch.where(full.repeat_interleave(m, dim=1), inf, loss)
        best, p = loss.min(dim=1)
        go = torch.isfinite(best)
        if stop is not None:
            go &= s < stop
        if not bool(go.any()):
            break
        incs[:, s] = torch.where(go, best, inf)
        col = h[rows, :, p]  # (nb, B): column p of each block
        dp = d[rows, p]
        coef = torch.where(go, w[rows, p] / dp, torch.zeros((), dtype=F64))
        w -= coef[:, None] * col
        scale = torch.where(go, 1.0 / dp, torch.zeros((), dtype=F64))
        h.baddbmm_((col * scale[:, None])[:, :, None], col[:, None, :], alpha=-1.0)
        gi = rows[go]
        w[gi, p[go]] = 0.0
        removed[gi, p[go]] = True
    return w, removed & removable, incs


def counts_from_increments(
    incs: torch.Tensor, budgets: list[tuple[torch.Tensor, int]]
) -> torch.Tensor:
    """How many weights each block loses: within each (block ids, count) budget, the ``count``
    smallest increments, after making every block's increments non-decreasing (so the chosen
    ones form a prefix of that block's greedy order)."""
    mono = torch.cummax(incs, dim=1).values
    counts = torch.zeros(incs.shape[0], dtype=torch.long)
    for blocks, count in budgets:
        vals = mono[blocks].reshape(-1)
        count = min(count, int(torch.isfinite(vals).sum()))
        if count <= 0:
            continue
        chosen = lowest(vals, count)
        counts[blocks] = chosen.view(len(blocks), -1).sum(1)
    return counts


@torch.no_grad()
def exact_step(
    targets: Sequence[Target],
    priors: Sequence[torch.Tensor],
    fisher: InverseFisher,
    layout: Layout,
    sparsity: float,
    *,
    scope: str = "global",
    pattern: Pattern = None,
) -> list[torch.Tensor]:
    """One mfac-exact pruning step to ``sparsity`` (weights updated in place); keep-masks out."""
    size = fisher.block_size
    if layout.dim % size:
        raise ValueError("mfac-exact needs the layout padded to whole blocks")
    nblocks = layout.dim // size
    if pattern is not None and size % pattern[1]:
        raise ValueError(f"mfac-exact with N:M needs block_size divisible by M={pattern[1]}")
    chunk = max(1, CHUNK_BYTES // (8 * size * size))
    w_all = layout.gather([t.param for t in targets], F64).view(nblocks, size)
    real = layout.real.view(nblocks, size)
    if pattern is not None:
        steps = size * (pattern[1] - pattern[0]) // pattern[1]
        stop = None
    else:
        steps = size
        incs = torch.cat(
            [
                greedy_obs(
                    block_inverses(fisher, b0, min(b0 + chunk, nblocks)),
                    w_all[b0 : b0 + chunk],
                    real[b0 : b0 + chunk],
                    steps,
                )[2]
                for b0 in range(0, nblocks, chunk)
            ]
        )
        block_layer = layout.layer.view(nblocks, size)[:, 0]
        stop = counts_from_increments(incs, _budgets(targets, priors, block_layer, sparsity, scope))
    new_w = torch.empty_like(w_all)
    removed = torch.empty_like(real)
    for b0 in range(0, nblocks, chunk):
        b1 = min(b0 + chunk, nblocks)
        s = None if stop is None else stop[b0:b1]
        new_w[b0:b1], removed[b0:b1], _ = greedy_obs(
            block_inverses(fisher, b0, b1), w_all[b0:b1], real[b0:b1], steps, s, pattern
        )
    flat_w = new_w.reshape(-1)
    keep_flat = (layout.real & ~removed.reshape(-1)).to(F64)
    masks = [k > 0 for k in layout.scatter(keep_flat)]
    for target, new, mask in zip(targets, layout.scatter(flat_w), masks, strict=True):
        p = target.param
        p.copy_(torch.where(mask, new.to(p.dtype), torch.zeros((), dtype=p.dtype)))
    return masks


def _budgets(
    targets: Sequence[Target],
    priors: Sequence[torch.Tensor],
    block_layer: torch.Tensor,
    sparsity: float,
    scope: str,
) -> list[tuple[torch.Tensor, int]]:
    """(blocks, weights to remove) per budget: one global, or one per layer."""
    already = [int((~p).sum()) for p in priors]
    if scope == "global":
        total = sum(t.numel for t in targets)
        return [(torch.arange(block_layer.numel()), round(sparsity * total) - sum(already))]
    if scope != "layer":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return [
        ((block_layer == li).nonzero().flatten(), round(sparsity * t.numel) - already[li])
        for li, t in enumerate(targets)
    ]
