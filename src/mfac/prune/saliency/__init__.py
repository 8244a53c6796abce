"""Per-weight scores and updates: magnitude, diagonal Fisher, Wanda, and OBS with the M-FAC
inverse."""

from .baselines import diag_fisher_scores, magnitude_scores, wanda_scores
from .obs import build_inverse, obs_step

__all__ = ["build_inverse", "diag_fisher_scores", "magnitude_scores", "obs_step", "wanda_scores"]
