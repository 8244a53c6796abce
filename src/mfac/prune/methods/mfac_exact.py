"""M-FAC exact OBS (``method="mfac-exact"``): correlated OBS inside each Fisher block (the
OBC / CAP refinement), run by the group/sub-step runner of :mod:`mfac.prune.methods.mfac_obs`.

Inside every block, weights are removed one at a time, greedily by OBS saliency, each removal
applying its exact update and the inverse downdate
    F^-1 <- F^-1 - F^-1[:, p] F^-1[p, :] / [F^-1]_pp,
so the cumulative loss after j removals is that of removing the whole set jointly. One pass
records every block's loss trace and removal order; a global (or per-layer) threshold on the
increments decides how many weights each block loses; the chosen prefix of each block's order is
then removed jointly with one batched Cholesky solve (the same result as replaying the greedy
steps). All blocks of a chunk advance together (batched torch ops; the loop runs over removal
steps), and the downdates are kept as a growing low-rank factor rather than written into the
B x B inverses (a matrix-vector product per step instead of a rank-one rewrite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...operators import InverseFisher
from .._layers import Layout, Target
from ..method import Method, Request
from ..patterns import Pattern, lowest
from .mfac_obs import FisherOptions, run_steps
from .mfac_obs import check as check_groups

F64 = torch.float64
#: float64 bytes (block inverses + downdate factors) processed at once: small enough to stay
#: cache-resident (a 32 MiB L3), since every removal step rereads the whole chunk.
CHUNK_BYTES = 16 * 2**20

#: Largest float64 block inverse mfac-exact accepts (B = 4096 -> 128 MiB).
EXACT_BLOCK_BYTES = 8 * 4096**2


@dataclass(frozen=True, kw_only=True)
class MFACExactConfig(FisherOptions):
    """Options of ``method="mfac-exact"``."""


def check(req: Request, cfg: MFACExactConfig) -> None:
    """Refuse what needs the model to be known: per-layer budgets, N:M on pruned layers, block
    sizes the dense per-block inverse cannot hold."""
    check_groups(req, cfg)
    nm = req.pattern
    if nm is not None and not all(bool(p.all()) for p in req.priors.values()):
        raise ValueError("mfac-exact with an N:M pattern needs layers without pruned weights")
    if nm is not None and cfg.block_size and cfg.block_size % nm[1]:
        raise ValueError(f"mfac-exact with N:M needs block_size divisible by M={nm[1]}")
    size = cfg.block_size or sum(int(p.sum()) for p in req.priors.values())
    if 8 * size**2 > EXACT_BLOCK_BYTES:
        raise ValueError(
            f"mfac-exact keeps a dense float64 inverse per block; block_size={size} needs "
            f"{8 * size**2 / 2**30:.1f} GiB per block: use block_size <= 4096"
        )


def block_inverses(fisher: InverseFisher, b0: int, b1: int) -> torch.Tensor:
    """Blocks [b0, b1) of F^-1 as a float64 (b1-b0, B, B) tensor (all blocks of size B).
    Read-only: in the direct form it is a view of the operator's stored inverses."""
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
    the stored inverses (direct form, a view: the greedy only reads them) or
    (I - Q_b^T Q_b) / lambda (Woodbury form)."""
    group, size = fisher.groups[0], fisher.block_size
    if group.direct:
        return group.inverse[b0:b1]
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
    pattern: Pattern = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy correlated OBS removal order in a batch of blocks (the trace pass).

    hinv (nb, B, B) float64 block inverses, w (nb, B) weights, removable (nb, B) positions
    that may be removed. Runs up to ``steps`` removals per block; with an N:M ``pattern`` no
    group of M consecutive positions loses more than M - N. Returns (per-step loss increments
    (nb, steps), +inf once a block has nothing left to remove; removed position per step).

    The downdated inverse is never written: after s removals it is hinv - C_s C_s^T with
    C_s = [c_1 .. c_s], c_j = (column p_j of the current inverse) / sqrt(its pivot), so a step
    reads hinv's row p and C_s (a matrix-vector product) instead of rewriting the B x B block.
    """
    nb, size = w.shape
    w = w.to(F64).clone()
    diag = hinv.diagonal(dim1=1, dim2=2).clone()
    factors = torch.zeros(nb, size, steps, dtype=F64)
    removed = ~removable
    rows = torch.arange(nb)
    incs = torch.full((nb, steps), math.inf, dtype=F64)
    order = torch.zeros((nb, steps), dtype=torch.long)
    inf = torch.tensor(math.inf, dtype=F64)
    zero = torch.zeros((), dtype=F64)
    for s in range(steps):
        loss = torch.where(removed, inf, w.square() / (2.0 * diag))
        if pattern is not None:
            n, m = pattern
            full = removed.view(nb, size // m, m).sum(-1) >= (m - n)
            loss = torch.where(full.repeat_interleave(m, dim=1), inf, loss)
        best, p = loss.min(dim=1)
        go = torch.isfinite(best)
        if not bool(go.any()):
            break
        incs[:, s] = torch.where(go, best, inf)
        order[:, s] = p
        col = hinv[rows, p]  # row p == column p (symmetric)
        if s:
            col = col - torch.bmm(factors[:, :, :s], factors[rows, p, :s].unsqueeze(-1))[..., 0]
        pivot = col[rows, p]
        scale = torch.where(go, pivot.clamp_min(1e-300).rsqrt(), zero)
        c = col * scale[:, None]
        factors[:, :, s] = c
        w -= (w[rows, p] * scale)[:, None] * c
        diag -= c.square()
        gi = rows[go]
        w[gi, p[go]] = 0.0
        removed[gi, p[go]] = True
    return incs, order


def joint_removal(
    hinv: torch.Tensor, w: torch.Tensor, order: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the first ``counts[b]`` positions of each block's greedy ``order`` jointly:
    w - hinv[:, S] (hinv[S, S])^-1 w_S, which equals the sequence of single greedy removals.

    One batched Cholesky solve per chunk: rows and columns outside S are replaced by the
    identity so every block solves a B x B system whose S-part is hinv[S, S].
    Returns (new weights (nb, B) float64, removed mask (nb, B)).
    """
    nb, size = w.shape
    w = w.to(F64)
    steps = torch.arange(order.shape[1])
    chosen = steps[None, :] < counts[:, None]
    spill = torch.zeros((nb, size + 1), dtype=torch.bool)  # unchosen steps land in column B
    spill.scatter_(1, torch.where(chosen, order, size), True)
    removed = spill[:, :size]
    both = removed[:, :, None] & removed[:, None, :]
    system = torch.where(both, hinv, torch.zeros((), dtype=F64))
    system.diagonal(dim1=1, dim2=2).add_((~removed).to(F64))
    rhs = torch.where(removed, w, torch.zeros((), dtype=F64))
    factor, info = torch.linalg.cholesky_ex(system)
    if bool(info.any()):  # lost definiteness: fall back to an LU solve
        z = torch.linalg.solve(system, rhs)
    else:
        z = torch.cholesky_solve(rhs.unsqueeze(-1), factor)[..., 0]
    new = w - torch.bmm(hinv, z.unsqueeze(-1))[..., 0]
    return torch.where(removed, torch.zeros((), dtype=F64), new), removed


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
    chunk = max(1, CHUNK_BYTES // (16 * size * size))  # the inverses and the factors C
    w_all = layout.gather([t.param for t in targets], F64).view(nblocks, size)
    real = layout.real.view(nblocks, size)
    steps = size if pattern is None else size * (pattern[1] - pattern[0]) // pattern[1]
    spans = [(b0, min(b0 + chunk, nblocks)) for b0 in range(0, nblocks, chunk)]
    traces = [
        greedy_obs(block_inverses(fisher, b0, b1), w_all[b0:b1], real[b0:b1], steps, pattern)
        for b0, b1 in spans
    ]
    incs = torch.cat([t[0] for t in traces])
    order = torch.cat([t[1] for t in traces])
    if pattern is None:
        block_layer = layout.layer.view(nblocks, size)[:, 0]
        counts = counts_from_increments(
            incs, _budgets(targets, priors, block_layer, sparsity, scope)
        )
    else:
        counts = torch.isfinite(incs).sum(1)
    new_w = torch.empty_like(w_all)
    removed = torch.empty_like(real)
    for b0, b1 in spans:
        new_w[b0:b1], removed[b0:b1] = joint_removal(
            block_inverses(fisher, b0, b1), w_all[b0:b1], order[b0:b1], counts[b0:b1]
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


def run(req: Request, cfg: MFACExactConfig) -> dict[str, torch.Tensor]:
    """``method="mfac-exact"``: the exact greedy step in every sub-step."""

    def step(
        targets: list[Target], priors: list[torch.Tensor], fisher: InverseFisher,
        layout: Layout, sparsity: float,
    ) -> list[torch.Tensor]:  # fmt: skip
        return exact_step(
            targets, priors, fisher, layout, sparsity, scope=cfg.scope, pattern=req.pattern
        )

    return run_steps(req, cfg, step, one_block=True)


METHOD = Method(
    "mfac-exact", MFACExactConfig, run,
    "correlated OBS inside each block of the inverse Fisher", check=check,
)  # fmt: skip
