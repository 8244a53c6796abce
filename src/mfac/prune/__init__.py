"""Second-order pruning: one-shot OBS with the M-FAC inverse Fisher (summed single-weight
updates, recomputation, exact per-block OBC), layer-wise OBS (SparseGPT), magnitude and
diagonal-Fisher baselines, I-OBS for networks, N:M patterns, masks that hold, and gradual
pruning. Methods are registered in :mod:`mfac.prune.registry`."""

from .api import METHODS, density_steps, oneshot
from .base import Method
from .collect import collect_gradients, squared_gradient_mean
from .gradual import cubic_schedule, finetune, gradual
from .iobs import IOBSConfig, IOBSPruneResult, iobs_prune
from .layerwise import prune_layer, sparsegpt
from .masks import (
    MaskHolder,
    apply_masks,
    bake,
    hold_masks,
    load_masks,
    load_sparse,
    save_masks,
    save_sparse,
    to_torch_prune,
)
from .patterns import parse_pattern
from .registry import REGISTRY, get_method
from .result import PruneResult

__all__ = [
    "METHODS",
    "REGISTRY",
    "IOBSConfig",
    "IOBSPruneResult",
    "MaskHolder",
    "Method",
    "PruneResult",
    "apply_masks",
    "bake",
    "collect_gradients",
    "cubic_schedule",
    "density_steps",
    "finetune",
    "get_method",
    "gradual",
    "hold_masks",
    "iobs_prune",
    "load_masks",
    "load_sparse",
    "oneshot",
    "parse_pattern",
    "prune_layer",
    "save_masks",
    "save_sparse",
    "sparsegpt",
    "squared_gradient_mean",
    "to_torch_prune",
]
