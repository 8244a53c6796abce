"""Second-order pruning: one-shot OBS with the M-FAC inverse Fisher (summed single-weight
updates, recomputation, exact per-block OBC), layer-wise OBS (SparseGPT), magnitude and
diagonal-Fisher baselines, Wanda and OWL budgets for transformers, I-OBS for networks, N:M
patterns, masks that hold, Hugging Face export, and gradual pruning. Methods are registered in
:mod:`mfac.prune.registry`."""

from .api import METHODS, density_steps, oneshot
from .base import Method
from .collect import collect_gradients, squared_gradient_mean
from .export import save_pretrained_sparse
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
    read_sparse,
    save_masks,
    save_sparse,
    to_torch_prune,
)
from .owl import OWLConfig, owl_sparsities
from .patterns import parse_pattern
from .registry import REGISTRY, get_method
from .result import PruneResult
from .wanda import WandaConfig, wanda

__all__ = [
    "METHODS",
    "REGISTRY",
    "IOBSConfig",
    "IOBSPruneResult",
    "MaskHolder",
    "Method",
    "OWLConfig",
    "PruneResult",
    "WandaConfig",
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
    "owl_sparsities",
    "parse_pattern",
    "prune_layer",
    "read_sparse",
    "save_masks",
    "save_pretrained_sparse",
    "save_sparse",
    "sparsegpt",
    "squared_gradient_mean",
    "to_torch_prune",
    "wanda",
]
