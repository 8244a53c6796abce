"""`solve`: one entry point for every sparse solver, numpy or torch in, the same kind out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .classic import cosamp, htp, iht, niht, omp
from .iobs import iobs
from .options import CONFIGS
from .problems import F64, make_problem
from .result import RecoveryResult, Tracker

METHODS: dict[str, Callable[..., Any]] = {
    "iobs": iobs,
    "iht": iht,
    "niht": niht,
    "htp": htp,
    "cosamp": cosamp,
    "omp": omp,
}


def _as_tensor(v: Any, name: str, device: torch.device | None) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        t = v.detach()
    elif isinstance(v, np.ndarray):
        t = torch.from_numpy(np.asarray(v))
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(v).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    return t.to(device=device if device is not None else t.device, dtype=F64)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def solve(
    A: Any,
    y: Any,
    k: int,
    method: str = "iobs",
    max_iter: int = 500,
    tol: float = 1e-10,
    *,
    loss: str = "least_squares",
    x0: Any = None,
    history: bool | str = False,
    callback: Callable[[int, torch.Tensor], Any] | None = None,
    l2: float | None = None,
    intercept: bool = False,
    **options: Any,
) -> RecoveryResult:
    """Minimise f(x) subject to ||x||_0 <= k.

    A (n x d) and y (n,) are numpy arrays or torch tensors; the result's ``x`` and ``support``
    have A's kind (torch: A's dtype and device; numpy: A's float dtype / int64). Computation is
    in float64 whatever the input dtype. ``loss`` is
    "least_squares" (f = 0.5 ||Ax - y||^2) or "logistic" (mean log-loss, labels in {0, 1}, plus
    (l2/2)||x||^2 with l2 = 1e-3 by default; ``intercept=True`` adds an unpenalised bias that
    is not counted in k, returned as ``info["intercept"]``). Stops after ``max_iter``
    iterations, when the relative change ||x_t - x_{t-1}|| <= tol ||x_t||, or when
    ``callback(it, x)`` returns True.

    ``options`` are the fields of the solver's option set in :mod:`mfac.recovery.options`
    (``CONFIGS[method]``; docs/cli.md lists them): unknown names raise TypeError, bad values
    ValueError, before any work.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    config = CONFIGS[method].build(options, f"method {method!r}")
    is_torch = isinstance(A, torch.Tensor)
    device = A.device if is_torch else None
    At = _as_tensor(A, "A", device)
    yt = _as_tensor(y, "y", At.device)
    if At.ndim != 2 or At.shape[0] < 1 or At.shape[1] < 1:
        raise ValueError(f"A must be a non-empty n x d matrix, got shape {tuple(At.shape)}")
    n, d = At.shape
    if yt.ndim == 2 and yt.shape[1] == 1:
        yt = yt.reshape(-1)
    if yt.ndim != 1 or yt.shape[0] != n:
        raise ValueError(
            f"y must have shape ({n},) to match A {tuple(At.shape)}, got {tuple(yt.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= d:
        raise ValueError(f"k must satisfy 1 <= k <= d = {d}, got {k}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    _check_finite(At, "A")
    _check_finite(yt, "y")
    problem = make_problem(loss, At, yt, l2, intercept)
    if x0 is None:
        start = torch.zeros(d, dtype=F64, device=At.device)
    else:
        start = _as_tensor(x0, "x0", At.device).reshape(-1)
        if start.numel() != d:
            raise ValueError(f"x0 must have {d} entries, got {start.numel()}")
        _check_finite(start, "x0")
    tracker = Tracker(problem, float(tol), history, callback)
    x, support, iters, converged, info = METHODS[method](
        problem, k, start, int(max_iter), tracker, **config.as_dict()
    )
    value = problem.value(x)
    if intercept:
        info = {**info, "intercept": problem.bias(x)}
    iterates = tracker.iterates
    if is_torch:
        x_out: Any = x.to(A.dtype if A.dtype.is_floating_point else F64)
        s_out: Any = support.to(torch.long)
        if iterates is not None:
            iterates = [v.to(x_out.dtype) for v in iterates]
    else:
        out_dtype = A.dtype if np.issubdtype(A.dtype, np.floating) else np.float64
        x_out = x.cpu().numpy().astype(out_dtype, copy=False)
        s_out = support.cpu().numpy().astype(np.int64)
        if iterates is not None:
            iterates = [v.cpu().numpy() for v in iterates]
    return RecoveryResult(
        x=x_out,
        support=s_out,
        iterations=iters,
        converged=converged,
        loss=value,
        method=method,
        history=tracker.losses,
        iterates=iterates,
        info=info,
    )
