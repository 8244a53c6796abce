"""The M-FAC pruner: OBS saliency from the blocked static inverse Fisher, summed single-weight
updates, and recomputation sub-steps (driven from :mod:`mfac.prune.api`).

For a weight q, rho_q = w_q^2 / (2 [F^-1]_qq). Removing the set P by summing the single-weight
OBS updates gives delta_w = F^-1 t with t_q = -w_q / [F^-1]_qq on P (zero elsewhere): one
batched IHVP, interactions between the removed weights ignored (recomputation compensates).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ...operators import InverseFisher
from .._layers import Layout, Target
from ..collect import LossFn, collect_gradients
from ..patterns import Pattern, select


def build_inverse(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[object],
    layout: Layout,
    *,
    num_grads: int,
    block_size: int | None,
    damp: float,
    damp_mode: str,
    dtype: torch.dtype,
    memory_budget: int | None,
    spill_dir: str | os.PathLike[str] | None,
    progress: bool,
    timings: dict[str, float],
    per_sample: bool = False,
) -> InverseFisher:
    """Collect ``num_grads`` gradients of the layout's coordinates and build the (blocked)
    static inverse Fisher over them in place."""
    t0 = time.perf_counter()
    buf = collect_gradients(
        model,
        loss_fn,
        data,
        layout,
        num_grads,
        dtype=dtype,
        memory_budget=memory_budget,
        spill_dir=spill_dir,
        progress=progress,
        per_sample=per_sample,
    )
    t1 = time.perf_counter()
    fisher = InverseFisher(
        buf.tensor, damp, block_size, damp_mode=damp_mode, memory_budget=memory_budget
    )
    timings["collect"] = timings.get("collect", 0.0) + t1 - t0
    timings["precompute"] = timings.get("precompute", 0.0) + time.perf_counter() - t1
    return fisher


@torch.no_grad()
def obs_step(
    targets: Sequence[Target],
    priors: Sequence[torch.Tensor],
    fisher: InverseFisher,
    layout: Layout,
    sparsity: float,
    *,
    scope: str = "global",
    pattern: Pattern = None,
    update: bool = True,
) -> list[torch.Tensor]:
    """Rank by OBS saliency, drop to ``sparsity``, apply the summed single-weight updates to the
    surviving weights (in place), and return the new keep-masks."""
    w = layout.gather([t.param for t in targets], torch.float64)
    diag = fisher.diag()
    rho = w.square() / (2.0 * diag)
    masks = select(layout.scatter(rho), priors, sparsity, scope, pattern)
    keep = layout.gather([m.to(torch.float64) for m in masks], torch.float64) > 0
    drop = layout.real & ~keep
    if update and bool(drop.any()):
        t = torch.zeros_like(w)
        t[drop] = -w[drop] / diag[drop]
        w = w + fisher.ihvp(t).to(torch.float64)
    w[drop] = 0.0
    for target, new, mask in zip(targets, layout.scatter(w), masks, strict=True):
        p = target.param
        p.copy_(torch.where(mask, new.to(p.dtype), torch.zeros((), dtype=p.dtype)))
    return masks
