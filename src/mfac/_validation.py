"""Input checks shared by every sub-package: each raises an error that names the problem."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)


class NonFiniteGradientError(ValueError):
    """A gradient (or vector) holds NaN or Inf; nothing was written."""


class SingularHessianError(ValueError):
    """A Hessian is singular or not positive definite at the damping given (a layer's Hessian in
    layer-wise pruning even after escalating the damping; a recovery problem's undamped
    Hessian): the message says which damping to raise."""


#: Entries one exact finiteness check reads at a time (its temporaries are a chunk's).
FINITE_CHUNK = 1 << 22


def finite_fast(x: torch.Tensor) -> bool:
    """True when x holds no NaN/Inf, in one summing pass (NaN and +-Inf propagate through a
    sum); only a non-finite sum (NaN/Inf, or a float overflow) runs the exact elementwise check,
    a chunk at a time. ``torch.isfinite(x).all()`` alone costs about five passes over x, and
    temporaries about twice x's size (a checkpoint's window checked that way at load time
    raised the resume's peak memory by that much)."""
    if math.isfinite(float(x.sum())):
        return True
    flat = x.reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + FINITE_CHUNK]).all())
        for i in range(0, flat.numel(), FINITE_CHUNK)
    )


def check_damp(damp: float, name: str = "damp") -> float:
    """Return ``damp`` as a float, or raise if it is not a positive finite number."""
    try:
        value = float(damp)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {damp!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a positive finite number, got {damp!r}")
    return value


def check_positive_int(value: int, name: str) -> int:
    """Return ``value`` if it is an integer >= 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_float_dtype(dtype: torch.dtype, name: str) -> torch.dtype:
    """Accept only the floating dtypes the operators store."""
    if dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must have one of the dtypes {allowed}; got {dtype}")
    return dtype


def check_vector(
    x: torch.Tensor, dim: int, device: torch.device, name: str = "x", allow_matrix: bool = True
) -> None:
    """Check that ``x`` is a finite float tensor of shape (dim,) or (dim, k) on ``device``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_float_dtype(x.dtype, f"{name}")
    shape_ok = x.ndim == 1 or (allow_matrix and x.ndim == 2)
    if not shape_ok or x.shape[0] != dim:
        want = f"({dim},) or ({dim}, k)" if allow_matrix else f"({dim},)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on device {x.device}, but the operator lives on {device}")
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteGradientError(f"{name} contains NaN or Inf")
