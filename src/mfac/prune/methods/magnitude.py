"""Magnitude pruning: drop the smallest |w| (the baseline every method is compared with)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._layers import Target
from ..method import Method, Request, ScopedOptions, zero_pruned
from ..patterns import select


@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(ScopedOptions):
    """Options of ``method="magnitude"``."""


def magnitude_scores(targets: Sequence[Target]) -> list[torch.Tensor]:
    """|w| for every weight of every layer."""
    return [t.param.detach().abs().cpu() for t in targets]


def run(req: Request, cfg: MagnitudeConfig) -> dict[str, torch.Tensor]:
    """Keep the largest magnitudes (globally or per layer)."""
    t0 = time.perf_counter()
    priors = [req.priors[t.name] for t in req.targets]
    new = select(magnitude_scores(req.targets), priors, req.sparsity, cfg.scope, req.pattern)
    zero_pruned(req.targets, new)
    req.timings["prune"] = time.perf_counter() - t0
    return dict(zip([t.name for t in req.targets], new, strict=True))


METHOD = Method(
    "magnitude", MagnitudeConfig, run, "smallest |w| first (no data needed)", needs_data=False
)
