"""The typed options of the two optimizer rules: one frozen dataclass each (the mechanism of
:mod:`mfac._config`), so that every option is named, typed, bounded and documented once.

The names say what differs: :class:`MFACConfig` damps relative to the window's scale
(``relative_damp``), :class:`MFACSGDConfig` absolutely (``damp``, the paper's lambda).
``layout`` is how a window stores its rows (``"dense"`` or error-feedback ``"topk"``) and
``window_dtype`` the dtype of its values.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._config import Options, option
from ..operators.topk import resolve_k

LAYOUTS = ("dense", "topk")
SCOPES = ("tensor", "model")
WHITENINGS = ("adam", "none")
POWERS = (1.0, 0.5)
GROUP_OPTIONS = ("lr", "weight_decay")


def check_group_option(value: Any, name: str, key: str | None = None) -> float:
    """``lr``, ``weight_decay`` (finite, >= 0) or ``momentum`` (in [0, 1)) as a float;
    ``key`` is the option (default: ``name``), ``name`` what the error calls it."""
    upper = 1.0 if (key or name) == "momentum" else None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or (upper is not None and v >= upper):
        bound = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


@dataclass(frozen=True, kw_only=True)
class WindowConfig(Options):
    """What both rules' windows share: size, storage and where they live."""

    #: The dtypes ``window_dtype`` may take.
    WINDOW_DTYPES: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32, torch.bfloat16, torch.float16
    )  # fmt: skip

    ngrads: int = option(32, "window size m: gradients kept per window", low=1)
    layout: str = option(
        "dense", "how a window stores its rows: dense, or error-feedback top-k", choices=LAYOUTS
    )
    topk: Any = option(
        None, "layout='topk': entries kept per row, an int k or a density in (0, 1]", kind="any"
    )
    window_dtype: Any = option(
        torch.float32,
        "dtype of the windows' values: float32, bfloat16 or float16 (MFACSGD: also float64)",
        kind="any",
    )
    memory_budget: int | None = option(
        None, "bytes the state may take (default: half the available memory)", low=1
    )
    process_group: Any = option(
        None, "shard every dense window by coordinates over this process group", cli=False
    )

    def validate(self) -> None:
        """Checks across fields."""
        if self.window_dtype not in self.WINDOW_DTYPES:
            names = ", ".join(str(d) for d in self.WINDOW_DTYPES)
            raise ValueError(f"window_dtype must be one of {names}, got {self.window_dtype!r}")
        if self.layout == "topk":
            if getattr(self, "window_scope", "model") != "model":
                raise ValueError(
                    "layout='topk' needs window_scope='model' (one top-k window over the whole "
                    "model; per-tensor windows are dense)"
                )
            if self.process_group is not None:
                raise ValueError("layout='topk' cannot be sharded over process_group")
            resolve_k(self.topk, 1)  # type and range, before any dimension is known
        elif self.topk is not None:
            raise ValueError(f"topk is only used with layout='topk', got topk={self.topk!r}")


@dataclass(frozen=True, kw_only=True)
class MFACConfig(WindowConfig):
    """The options of :class:`mfac.MFAC`, the default rule (module docstring of
    :mod:`mfac.optim.mfac` for the formulas)."""

    window_scope: str = option(
        "tensor", "one window per parameter tensor, or one for the whole model", choices=SCOPES
    )
    share_below: int = option(
        1024,
        "window_scope='tensor': tensors with fewer entries share one window (1: every tensor "
        "its own)",
        low=1,
    )
    orthogonal_momentum: float = option(
        0.95,
        "momentum of the orthogonalized matrices (groups with orthogonalize=True: Muon's step)",
        low=0,
        high=1,
        high_open=True,
    )
    relative_damp: float = option(
        1.0, "damping relative to the window's mean eigenvalue", low=0, low_open=True
    )
    power: float = option(1.0, "1: the M-FAC inverse; 0.5: the inverse square root")
    whiten: str = option(
        "adam", "gradients whitened by Adam's statistics, or raw", choices=WHITENINGS
    )
    betas: Any = option((0.9, 0.999), "Adam's decay rates (b1, b2), each in [0, 1)", kind="any")
    eps: float = option(1e-8, "Adam's epsilon", low=0, low_open=True)
    graft: bool = option(
        True, "rescale each tensor's step to the length of AdamW's step (AdamW's lr scale)"
    )

    def validate(self) -> None:
        """Checks across fields."""
        super().validate()
        if self.power not in POWERS:
            raise ValueError(f"power must be one of {POWERS}, got {self.power!r}")
        if self.whiten == "none" and self.power != 0.5:
            raise ValueError(
                "whiten='none' needs power=0.5: only the inverse square root of the raw "
                "gradients' second moment gives a step independent of the gradient's scale"
            )
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= float(b) < 1.0
            for b in betas
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))


@dataclass(frozen=True, kw_only=True)
class MFACSGDConfig(WindowConfig):
    """The options of :class:`mfac.MFACSGD`, the paper's step."""

    #: float64 windows too, for float64 models (and the float64 oracle tests).
    WINDOW_DTYPES: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32, torch.bfloat16, torch.float16, torch.float64
    )  # fmt: skip

    ngrads: int = option(1024, "window size m: gradients kept in the window", low=1)
    damp: float = option(1e-5, "absolute damping lambda of F = lambda I + G^T G / m", low=0,
                         low_open=True)  # fmt: skip
    decoupled_weight_decay: bool = option(
        False, "p *= 1 - lr*wd (AdamW-style) instead of adding wd*p to the gradient"
    )
    gradient_scaling: Any = option(
        None, "an object with before_push/after_ihvp around the preconditioner", cli=False
    )

    def validate(self) -> None:
        """Checks across fields."""
        super().validate()
        scaling = self.gradient_scaling
        if scaling is not None and not (
            callable(getattr(scaling, "before_push", None))
            and callable(getattr(scaling, "after_ihvp", None))
        ):
            raise TypeError("gradient_scaling must have before_push and after_ihvp methods")


__all__ = [
    "GROUP_OPTIONS",
    "LAYOUTS",
    "SCOPES",
    "MFACConfig",
    "MFACSGDConfig",
    "WindowConfig",
    "check_group_option",
]
