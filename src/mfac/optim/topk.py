"""Backward-compatible import path: the top-k window lives in :mod:`mfac.operators.topk`."""

from ..operators.topk import TopKSlidingInverseFisher, finite_fast, resolve_k, topk_indices

__all__ = ["TopKSlidingInverseFisher", "finite_fast", "resolve_k", "topk_indices"]
