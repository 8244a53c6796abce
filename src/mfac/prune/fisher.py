"""M-FAC pruning: OBS with the blocked inverse of the empirical Fisher from m gradients
(``mfac``: summed single-weight updates; ``mfac-exact``: correlated OBS inside each block),
with geometric recomputation sub-steps and separately built Fishers per layer group
(docs/algorithms.md section 4)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._config import option
from ._layers import Layout, Target
from .base import Method, Request
from .diag_fisher import GradientOptions
from .exact import exact_step
from .saliency import build_inverse, obs_step

#: Largest float64 block inverse mfac-exact accepts (B = 4096 -> 128 MiB).
EXACT_BLOCK_BYTES = 8 * 4096**2


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
class MFACConfig(FisherOptions):
    """Options of ``method="mfac"``."""

    dtype: Any = option(torch.float32, "storage dtype of the gradient buffer", cli=False)
    update: bool = option(True, "apply the OBS update to the kept weights")


@dataclass(frozen=True, kw_only=True)
class MFACExactConfig(FisherOptions):
    """Options of ``method="mfac-exact"``."""


def check(req: Request, cfg: FisherOptions) -> None:
    """Refuse what needs the model to be known: per-layer budgets, exact block sizes."""
    nm = req.pattern
    if cfg.layer_groups is not None and nm is None and cfg.scope != "layer":
        raise ValueError("layer_groups needs scope='layer' or an N:M pattern (budgets per layer)")
    if not isinstance(cfg, MFACExactConfig):
        return
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


def run(req: Request, cfg: FisherOptions) -> dict[str, torch.Tensor]:
    """Prune each layer group with its own inverse Fisher, in recomputation sub-steps."""
    out: dict[str, torch.Tensor] = {}
    for group in groups(req.targets, cfg.layer_groups):
        out.update(_prune_group(req, cfg, group))
    return out


def _prune_group(
    req: Request, cfg: FisherOptions, targets: list[Target]
) -> dict[str, torch.Tensor]:
    assert req.data is not None and req.loss_fn is not None
    timings = req.timings
    masks = {t.name: req.priors[t.name] for t in targets}
    total = sum(t.numel for t in targets)
    d0 = sum(int(m.sum()) for m in masks.values()) / total
    steps = 1 if req.pattern is not None else cfg.recompute
    schedule = [req.sparsity] if steps == 1 else density_steps(d0, 1.0 - req.sparsity, steps)
    exact = isinstance(cfg, MFACExactConfig)
    for target in schedule:
        layout = Layout(targets, masks, cfg.block_size)
        block = layout.dim if exact and cfg.block_size is None else cfg.block_size
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
        if isinstance(cfg, MFACConfig):
            new = obs_step(
                targets, priors, fisher, layout, target,
                scope=cfg.scope, pattern=req.pattern, update=cfg.update,
            )  # fmt: skip
        else:
            new = exact_step(
                targets, priors, fisher, layout, target, scope=cfg.scope, pattern=req.pattern
            )
        timings["prune"] += time.perf_counter() - t0
        masks = dict(zip([t.name for t in targets], new, strict=True))
        del fisher
    return masks


MFAC = Method(
    "mfac", MFACConfig, run, "OBS with the blocked M-FAC inverse Fisher (summed updates)",
    check=check,
)  # fmt: skip
MFAC_EXACT = Method(
    "mfac-exact", MFACExactConfig, run,
    "correlated OBS inside each block of the inverse Fisher", check=check,
)  # fmt: skip
