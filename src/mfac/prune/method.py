"""What every pruning method shares: the option sets common to several methods, the request a
method runs on, and :class:`Method`, the registry entry naming a method's config and its run
function."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._config import Options, option
from ._layers import Target
from .collect import LossFn
from .patterns import Pattern


@dataclass(frozen=True, kw_only=True)
class LayerOptions(Options):
    """Which layers a method prunes."""

    layers: Any = option(
        None, "only prune these layers (module names; Python: also a filter(name, module))",
        kind="list",
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CommonOptions(LayerOptions):
    """Options of every one-shot method."""

    exclude: tuple[str, ...] = option((), "never prune these layers (module names)")
    progress: bool = option(True, "draw progress bars", cli=False)


@dataclass(frozen=True, kw_only=True)
class ScopedOptions(CommonOptions):
    """Methods that rank weights across layers (one global budget) or per layer."""

    scope: str = option(
        "global", "one global budget or the same sparsity per layer", choices=("global", "layer")
    )


@dataclass(frozen=True, kw_only=True)
class GradientOptions(ScopedOptions):
    """Methods that estimate the Fisher from m gradients."""

    num_grads: int = option(64, "gradients m for the Fisher estimate", low=1)
    damp: float = option(1e-2, "damping lambda (relative to the diagonal)", low=0, low_open=True)
    per_sample: bool = option(
        False, "m per-sample gradients (torch.func) instead of m mini-batch gradients"
    )


@dataclass
class Request:
    """One pruning call after validation: the layers to prune, their current keep-masks (a
    method must keep pruned weights pruned), the target and the data; methods add their
    timings (seconds) and extra facts (``info``) in place."""

    model: nn.Module
    targets: list[Target]
    priors: dict[str, torch.Tensor]
    sparsity: float
    pattern: Pattern
    data: Iterable[object] | None
    loss_fn: LossFn | None
    timings: dict[str, float] = field(
        default_factory=lambda: {"collect": 0.0, "precompute": 0.0, "prune": 0.0}
    )
    info: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered pruning method: its option set and the function that prunes.

    ``run(request, config)`` prunes ``request.targets`` in place and returns the keep-masks by
    layer name; ``check(request, config)`` refuses combinations that need the model (before
    any weight changes). ``restores`` is what is backed up for the error path: the pruned
    weights ("targets") or the whole state ("model", for methods that train). ``patterns``:
    whether the method takes an N:M pattern (:func:`mfac.prune.oneshot` refuses one otherwise,
    naming the method).
    """

    name: str
    config: type[Options]
    run: Callable[[Request, Any], dict[str, torch.Tensor]]
    summary: str
    needs_data: bool = True
    check: Callable[[Request, Any], None] | None = None
    restores: str = "targets"
    patterns: bool = True


@torch.no_grad()
def zero_pruned(targets: list[Target], masks: list[torch.Tensor]) -> None:
    """Multiply each target's weights by its keep-mask."""
    for t, m in zip(targets, masks, strict=True):
        t.param.mul_(m.to(t.param.device, t.param.dtype))
