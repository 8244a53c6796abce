"""Named recipes: combinations of the layer-wise pieces that a user should get by one name.

``owl-sparsegpt``: OWL budgets (outlier-rich transformer blocks pruned less, mean sparsity
kept) measured on the dense model, then SparseGPT's layer-wise OBS reconstruction block by
block, each block calibrated on the outputs of the already-pruned ones. With an N:M pattern
every layer's sparsity is fixed by the pattern, so the budgets are skipped and it is sequential
SparseGPT.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._validation import check_damp
from ._layers import LayerFilter, Target, find_targets
from .layerwise import sparsegpt
from .owl import OWLConfig, owl_sparsities
from .patterns import Pattern, check_nm_sparsity


@dataclass(frozen=True)
class OWLSparseGPTConfig:
    """Options of :func:`owl_sparsegpt`."""

    calib_batches: int = 32
    """Calibration batches (the same ones measure the OWL outliers and the Hessians)."""
    block: int = 128
    """SparseGPT column block: the mask is chosen per block of this many input columns."""
    damp: float = 0.01
    """Relative damping of each layer Hessian (times the mean of its diagonal)."""
    sequential: bool = True
    """Calibrate each transformer block on the outputs of the already-pruned blocks."""
    threshold: float = 5.0
    """OWL's M: a score is an outlier above M times its block's mean score."""
    spread: float = 0.08
    """OWL's lambda: largest deviation of a block's sparsity from the target."""

    def __post_init__(self) -> None:
        for name in ("calib_batches", "block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        check_damp(self.damp)
        if not isinstance(self.sequential, bool):
            raise TypeError(f"sequential must be a bool, got {self.sequential!r}")
        OWLConfig(self.threshold, self.spread, self.calib_batches)  # validates M and lambda


@torch.no_grad()
def owl_sparsegpt(
    model: nn.Module,
    data: Iterable[object],
    forward_fn: Callable[[nn.Module, object], object],
    sparsity: float | None,
    config: OWLSparseGPTConfig | None = None,
    *,
    pattern: Pattern = None,
    targets: Sequence[Target] | None = None,
    layers: LayerFilter = None,
    priors: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
    info: dict[str, object] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Prune ``model`` in place with the ``owl-sparsegpt`` recipe (module docstring); returns
    (keep-masks, timings with ``owl`` seconds added). ``info`` receives the OWL budgets
    (``owl_group_sparsity``, ``owl_ratios``) and SparseGPT's schedule and damping."""
    config = config or OWLSparseGPTConfig()
    target = check_nm_sparsity(sparsity, pattern)
    if targets is None:
        targets = find_targets(model, layers)
    info = {} if info is None else info
    t0 = time.perf_counter()
    budget: float | dict[str, float] = target
    if pattern is None:
        owl = OWLConfig(config.threshold, config.spread, config.calib_batches)
        budget = owl_sparsities(model, data, forward_fn, target, owl, targets=targets, info=info)
    else:
        info["owl"] = "skipped: the N:M pattern fixes every layer's sparsity"
    t_owl = time.perf_counter() - t0
    masks, timings = sparsegpt(
        model, data, forward_fn, budget, targets=targets, pattern=pattern, block=config.block,
        damp=config.damp, calib_batches=config.calib_batches, sequential=config.sequential,
        priors=priors, progress=progress, info=info,
    )  # fmt: skip
    timings["owl"] = t_owl
    return masks, timings
