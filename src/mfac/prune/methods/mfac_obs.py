"""M-FAC OBS pruning (``method="mfac"``): OBS with the blocked inverse of the empirical Fisher
from m gradients, summed single-weight updates, geometric recomputation sub-steps and separately
built Fishers per layer group (docs/algorithms.md section 4). The group/sub-step runner and the
Fisher options are shared with ``mfac-exact`` (:mod:`mfac.prune.methods.mfac_exact`).

For a weight q, rho_q = w_q^2 / (2 [F^-1]_qq). Removing the set P by summing the single-weight
OBS updates gives delta_w = F^-1 t with t_q = -w_q / [F^-1]_qq on P (zero elsewhere): one
batched IHVP, interactions between the removed weights ignored (recomputation compensates).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._config import option
from ...operators import InverseFisher
from .._layers import Layout, Target
from ..collect import LossFn, gradient_buffer
from ..method import GradientOptions, Method, Request
from ..patterns import Pattern, select


@dataclass(frozen=True, kw_only=True)
class FisherOptions(GradientOptions):
    """Options of the methods that build the blocked inverse Fisher."""

    damp_mode: str = option(
        "relative", "how damp is read", choices=("relative", "absolute")
    )  # fmt: skip
    block_size: int | None = option(
        128, "Fisher block size (None or 'full': one block)", low=1,
        null_words=("none", "null", "full"),
    )  # fmt: skip
    recompute: int = option(1, "recomputation sub-steps (geometric density steps)", low=1)
    memory_budget: float | None = option(
        None, "bytes of RAM for the m x d gradient buffer (past it: paged to disk)", low=1,
        cli=False,
    )  # fmt: skip
    spill_dir: Path | None = option(None, "folder for the paged gradient buffer (default: temp)")
    layer_groups: Any = option(
        None, "layers per separately built Fisher (needs scope 'layer' or an N:M pattern)",
        kind="int",
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MFACOBSConfig(FisherOptions):
    """Options of ``method="mfac"``."""

    dtype: Any = option(torch.float32, "storage dtype of the gradient buffer", cli=False)
    update: bool = option(True, "apply the OBS update to the kept weights")


def check(req: Request, cfg: FisherOptions) -> None:
    """Refuse what needs the model to be known: per-layer budgets without per-layer scope."""
    if cfg.layer_groups is not None and req.pattern is None and cfg.scope != "layer":
        raise ValueError("layer_groups needs scope='layer' or an N:M pattern (budgets per layer)")


def groups(targets: list[Target], spec: Any) -> list[list[Target]]:
    """The layer groups: all at once, every ``spec`` layers, or lists of names."""
    if spec is None:
        return [targets]
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"layer_groups must be >= 1, got {spec}")
        return [targets[i : i + spec] for i in range(0, len(targets), spec)]
    names = {t.name: t for t in targets}
    try:
        return [[names[n] for n in group] for group in spec]
    except (KeyError, TypeError) as err:
        raise ValueError(f"layer_groups: an int or lists of layer names, got {spec!r}") from err


def density_steps(d0: float, d_final: float, steps: int) -> list[float]:
    """Geometric density interpolation d_j = d0 (d_final / d0)^(j / k), j = 1..k, as
    sparsities."""
    return [1.0 - d0 * (d_final / d0) ** (j / steps) for j in range(1, steps + 1)]


def _bytes(budget: float | None) -> int | None:
    return None if budget is None else int(budget)


#: One pruning step of a Fisher-based method: (targets, their keep-masks, the inverse Fisher,
#: the layout, the sparsity) -> new keep-masks, weights updated in place.
Step = Callable[
    [list[Target], list[torch.Tensor], InverseFisher, Layout, float], list[torch.Tensor]
]


def run_steps(
    req: Request, cfg: FisherOptions, step: Step, *, one_block: bool = False
) -> dict[str, torch.Tensor]:
    """Prune each layer group with its own inverse Fisher, in recomputation sub-steps, calling
    ``step`` once per sub-step. ``one_block``: ``block_size=None`` means one block over the
    whole layout (the exact solver needs the block size as a number)."""
    out: dict[str, torch.Tensor] = {}
    for group in groups(req.targets, cfg.layer_groups):
        out.update(_prune_group(req, cfg, group, step, one_block))
    return out


def _prune_group(
    req: Request, cfg: FisherOptions, targets: list[Target], step: Step, one_block: bool
) -> dict[str, torch.Tensor]:
    assert req.data is not None and req.loss_fn is not None
    timings = req.timings
    masks = {t.name: req.priors[t.name] for t in targets}
    total = sum(t.numel for t in targets)
    d0 = sum(int(m.sum()) for m in masks.values()) / total
    steps = 1 if req.pattern is not None else cfg.recompute
    schedule = [req.sparsity] if steps == 1 else density_steps(d0, 1.0 - req.sparsity, steps)
    for target in schedule:
        layout = Layout(targets, masks, cfg.block_size)
        block = layout.dim if one_block and cfg.block_size is None else cfg.block_size
        fisher = build_inverse(
            req.model, req.loss_fn, req.data, layout,
            num_grads=cfg.num_grads, block_size=block, damp=cfg.damp, damp_mode=cfg.damp_mode,
            dtype=getattr(cfg, "dtype", torch.float32), memory_budget=_bytes(cfg.memory_budget),
            spill_dir=cfg.spill_dir, progress=cfg.progress, timings=timings,
            per_sample=cfg.per_sample,
        )  # fmt: skip
        req.info["damp"] = fisher.damp
        req.info["memory_mapped"] = bool(req.info.get("memory_mapped")) or fisher.memory_mapped
        t0 = time.perf_counter()
        priors = [masks[t.name] for t in targets]
        new = step(targets, priors, fisher, layout, target)
        timings["prune"] += time.perf_counter() - t0
        masks = dict(zip([t.name for t in targets], new, strict=True))
        del fisher
    return masks


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
    buf = gradient_buffer(
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


def run(req: Request, cfg: MFACOBSConfig) -> dict[str, torch.Tensor]:
    """``method="mfac"``: summed single-weight OBS updates in every sub-step."""

    def step(
        targets: list[Target], priors: list[torch.Tensor], fisher: InverseFisher,
        layout: Layout, sparsity: float,
    ) -> list[torch.Tensor]:  # fmt: skip
        return obs_step(
            targets, priors, fisher, layout, sparsity,
            scope=cfg.scope, pattern=req.pattern, update=cfg.update,
        )  # fmt: skip

    return run_steps(req, cfg, step)


METHOD = Method(
    "mfac", MFACOBSConfig, run, "OBS with the blocked M-FAC inverse Fisher (summed updates)",
    check=check,
)  # fmt: skip
