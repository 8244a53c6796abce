"""Sparse recovery: min f(x) s.t. ||x||_0 <= k with I-OBS and the classic baselines
(IHT, normalised IHT, HTP, CoSaMP, OMP), for least squares and logistic regression.

I-OBS here is the solver for one sparse vector (:mod:`mfac.recovery.iobs`). The pruning method
``iobs`` (:mod:`mfac.prune.methods.iobs`: dense training steps alternating with SparseGPT
projections of a network) shares the idea, not the code: :func:`mfac.prune.iobs_prune` /
``mfac.prune.oneshot(..., method="iobs")``."""

from .._validation import SingularHessianError
from .api import METHODS, solve
from .curvature import DenseCurvature, MFACCurvature
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
