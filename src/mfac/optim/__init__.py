"""The M-FAC optimizers, one class per rule, as torch.optim does them.

- :class:`MFAC` (``mfac.MFAC(params, lr)``), the default: AdamW's direction preconditioned by
  a sliding window's inverse Fisher of Adam-whitened gradients, with damping relative to the
  window's scale, grafted to AdamW's step length; groups marked ``orthogonalize=True``
  (:func:`hidden_groups` marks a model's hidden matrices) take Muon's orthogonalized step
  (docs/optim_designs.md has the study).
- :class:`MFACSGD`, the paper's step: SGD preconditioned by (damp I + G^T G / m)^-1 over one
  window of the last m raw gradients.

Both keep their windows, from :mod:`mfac.operators.window` (dense, bfloat16, top-k, sharded),
in ``self.state`` through :class:`mfac.optim.base.WindowOptimizer`, and validate their options
through one typed config each (:mod:`mfac.optim.config`).
"""

from .base import WindowOptimizer
from .config import MFACConfig, MFACSGDConfig
from .functional import GradientScaling, mfac_step, newton_schulz, window_coeffs
from .groups import hidden_groups
from .mfac import MFAC
from .sgd import MFACSGD

__all__ = [
    "MFAC",
    "MFACSGD",
    "GradientScaling",
    "MFACConfig",
    "MFACSGDConfig",
    "WindowOptimizer",
    "hidden_groups",
    "mfac_step",
    "newton_schulz",
    "window_coeffs",
]
