"""Second-order pruning: one-shot OBS with the M-FAC inverse Fisher (summed single-weight
updates, recomputation, exact OBC inside each Fisher block), layer-wise OBS (SparseGPT),
magnitude and diagonal-Fisher baselines, exact weights on a fixed mask by batched PCG
(:mod:`.refine`), a mask searched by ADMM (:mod:`.admm`), Wanda, OWL and Fisher budgets for
transformers, I-OBS for networks, N:M patterns, masks that hold, Hugging Face export, and
gradual pruning.

One module per method in :mod:`mfac.prune.methods`, registered in :mod:`mfac.prune.registry`;
the shared pieces each in their own module: targets (:mod:`._layers`), N:M patterns
(:mod:`.patterns`), masks (:mod:`.masks`), budgets (:mod:`.budgets`), calibration
(:mod:`.calibration`), gradients (:mod:`.collect`), export (:mod:`.export`), the result
(:mod:`.result`). No name below is also a submodule.
"""

from .._validation import SingularHessianError
from .admm import SearchReport, search_mask
from .api import METHODS, oneshot
from .budgets import OWLConfig, fisher_sparsities, owl_sparsities
from .collect import gradient_buffer, squared_gradient_mean
from .export import save_pretrained_sparse
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
from .method import Method
from .methods.iobs import IOBSConfig, IOBSPruneResult, iobs_prune
from .methods.mfac_obs import density_steps
from .methods.sparsegpt import prune_layer, sparsegpt
from .methods.wanda import WandaConfig, wanda
from .patterns import parse_pattern
from .refine import RefineReport, refine_weights
from .registry import REGISTRY, get_method
from .result import PruneResult
from .schedule import cubic_schedule, finetune, gradual

__all__ = [
    "METHODS",
    "REGISTRY",
    "IOBSConfig",
    "IOBSPruneResult",
    "MaskHolder",
    "Method",
    "OWLConfig",
    "PruneResult",
    "RefineReport",
    "SearchReport",
    "SingularHessianError",
    "WandaConfig",
    "apply_masks",
    "bake",
    "cubic_schedule",
    "density_steps",
    "finetune",
    "fisher_sparsities",
    "get_method",
    "gradient_buffer",
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
    "refine_weights",
    "save_masks",
    "save_pretrained_sparse",
    "save_sparse",
    "search_mask",
    "sparsegpt",
    "squared_gradient_mean",
    "to_torch_prune",
    "wanda",
]
