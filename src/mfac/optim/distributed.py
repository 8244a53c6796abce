"""Backward-compatible import path: the sharded window lives in :mod:`mfac.operators.sharded`."""

from ..operators.sharded import ShardedSlidingInverseFisher, shard_bounds

__all__ = ["ShardedSlidingInverseFisher", "shard_bounds"]
