"""One option set per sparse solver: the single source of the options ``solve(**options)``
accepts, of ``mfac recover``'s solver flags and of the tables in docs/cli.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._config import Options, option
from .iobs import RULES


@dataclass(frozen=True, kw_only=True)
class IOBSSolverConfig(Options):
    """Options of ``solve(method="iobs")``."""

    rule: str = option("topk", "support rule", choices=RULES)
    correction: bool = option(True, "OBS correction of the kept coordinates")
    step: float = option(1.0, "step eta of the Newton direction", low=0, low_open=True)
    damp: float | None = option(
        None, "Hessian damping (default: 0 exact, 1e-4 relative for mfac)", low=0
    )
    damp_mode: str = option("absolute", "how damp is read", choices=("absolute", "relative"))
    curvature: str = option(
        "exact", "dense Hessian or matrix-free M-FAC inverse", choices=("exact", "mfac")
    )
    refresh: int = option(1, "rebuild the curvature every r iterations (non-quadratic f)", low=1)
    block_size: int | None = option(None, "M-FAC block size (mfac curvature)", low=1)
    mfac_dtype: Any = option(torch.float32, "M-FAC buffer dtype", cli=False)
    backtrack: bool = option(False, "halve eta until f does not increase (damped Newton)")


@dataclass(frozen=True, kw_only=True)
class StepConfig(Options):
    """Options of ``solve(method="iht")`` and ``"htp"``: the gradient step."""

    step: float | None = option(None, "absolute step (overrides step_scale)", low=0, low_open=True)
    step_scale: float = option(1.0, "step as a multiple of 1/L", low=0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class NIHTConfig(Options):
    """Options of ``solve(method="niht")``: the adaptive step's safeguards."""

    kappa: float = option(2.0, "step shrink factor", low=1, low_open=True)
    c: float = option(0.01, "safeguard constant", low=0, low_open=True, high=1, high_open=True)


@dataclass(frozen=True, kw_only=True)
class CoSaMPConfig(Options):
    """``solve(method="cosamp")`` takes no options."""


@dataclass(frozen=True, kw_only=True)
class OMPConfig(Options):
    """Options of ``solve(method="omp")``."""

    grad_tol: float = option(
        1e-12, "stop when max |grad| falls below grad_tol times its start", low=0
    )


CONFIGS: dict[str, type[Options]] = {
    "iobs": IOBSSolverConfig,
    "iht": StepConfig,
    "niht": NIHTConfig,
    "htp": StepConfig,
    "cosamp": CoSaMPConfig,
    "omp": OMPConfig,
}
