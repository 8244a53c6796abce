"""Sparse recovery: min f(x) s.t. ||x||_0 <= k with I-OBS and the classic baselines
(IHT, normalised IHT, HTP, CoSaMP, OMP), for least squares and logistic regression.

The network variant of I-OBS (SparseGPT projections) is a pruning method:
:func:`mfac.prune.iobs_prune` / ``mfac.prune.oneshot(..., method="iobs")``."""

from .api import METHODS, solve
from .curvature import DenseCurvature, MFACCurvature, SingularHessianError
from .problems import LeastSquares, Logistic, Problem, make_problem
from .result import RecoveryResult

__all__ = [
    "METHODS",
    "DenseCurvature",
    "LeastSquares",
    "Logistic",
    "MFACCurvature",
    "Problem",
    "RecoveryResult",
    "SingularHessianError",
    "make_problem",
    "solve",
]
