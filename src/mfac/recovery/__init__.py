"""Sparse recovery: min f(x) s.t. ||x||_0 <= k with I-OBS and the classic baselines
(IHT, normalised IHT, HTP, CoSaMP, OMP), for least squares and logistic regression."""

from .api import METHODS, solve
from .curvature import DenseCurvature, MFACCurvature, SingularHessianError
from .dnn import IOBSPruneResult, iobs_prune
from .problems import LeastSquares, Logistic, Problem, make_problem
from .result import RecoveryResult

__all__ = [
    "METHODS",
    "DenseCurvature",
    "IOBSPruneResult",
    "LeastSquares",
    "Logistic",
    "MFACCurvature",
    "Problem",
    "RecoveryResult",
    "SingularHessianError",
    "iobs_prune",
    "make_problem",
    "solve",
]
