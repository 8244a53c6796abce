"""``mfac.MFAC``, the optimizer's one entry point, and the two step rules it chooses between.

``MFAC(params, lr)`` builds the rule that trains transformers at AdamW's learning rates
(``mode="adam"``, :class:`mfac.optim.scaled.ScaledMFAC`): AdamW's moments, each parameter
tensor's own sliding window of Adam-whitened gradients with damping relative to the window's
scale, the M-FAC inverse of that window applied to AdamW's direction, and the result grafted to
AdamW's step length. docs/optim_transformers.md has the study that chose it.

``MFAC(params, lr, mode="paper")`` builds the paper's exact step
(:class:`mfac.optim.mfac.PaperMFAC`): SGD preconditioned by (damp I + G^T G / m)^-1 over one
window of the last m raw gradients, with absolute damping; the dense, error-feedback top-k and
sharded windows all serve it.

Both are subclasses of :class:`MFAC`, which only dispatches (as ``pathlib.Path`` does), so
``isinstance(opt, mfac.MFAC)`` holds for either.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

MODES = ("adam", "paper")

def paper_only_options() -> tuple[str, ...]:
    """Options of the paper's step that the default rule has no counterpart for: read off the
    two classes' signatures, so the list cannot drift from them."""
    import inspect

    from .mfac import PaperMFAC
    from .scaled import ScaledMFAC

    paper = inspect.signature(PaperMFAC.__init__).parameters
    adam = inspect.signature(ScaledMFAC.__init__).parameters
    return tuple(name for name in paper if name not in adam)


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


class MFAC(torch.optim.Optimizer):
    """The M-FAC optimizer: a ``torch.optim.Optimizer`` preconditioned by the inverse of a
    damped empirical Fisher over a sliding window of recent gradients.

    Args:
        params: parameters or parameter groups (dicts with ``params``, ``lr`` and
            ``weight_decay``; ``momentum`` too with ``mode="paper"``).
        lr: learning rate. With the default mode, AdamW's scale (1e-3 from scratch, 1e-5 to
            1e-4 for fine-tuning).
        mode: ``"adam"`` (default): per-tensor windows of Adam-whitened gradients, grafted to
            AdamW's step length; options ``ngrads`` (window per tensor, default 32), ``damp``
            (relative to the window's mean eigenvalue, default 1), ``betas``, ``eps``,
            ``weight_decay`` (decoupled), ``graft``, ``power``, ``whiten``, ``blocks``,
            ``history_dtype`` (float32 or bfloat16), ``history`` ("dense", or "topk": one
            error-feedback top-k window over the model, with ``blocks="global"``), ``topk``,
            ``memory_budget``; see :class:`mfac.optim.scaled.ScaledMFAC`.
            ``"paper"``: the paper's step; options ``ngrads`` (default 1024), ``damp``
            (absolute, default 1e-5), ``momentum``, ``weight_decay``,
            ``decoupled_weight_decay``, ``history_dtype``, ``history`` ("dense" or "topk"),
            ``topk``, ``process_group``, ``memory_budget``, ``gradient_scaling``; see
            :class:`mfac.optim.mfac.PaperMFAC`.

    With ``mode="adam"`` every option after ``lr`` is passed by keyword, and an option only the
    paper's step has is refused with an error naming it, before anything is built.
    """

    def __new__(
        cls,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
        lr: float = 1e-3,
        *args: Any,
        mode: str = "adam",
        **options: Any,
    ) -> MFAC:
        if cls is not MFAC:  # a rule's own class, or unpickling: no dispatch
            return super().__new__(cls)
        if _check_mode(mode) == "paper":
            from .mfac import PaperMFAC

            return super().__new__(PaperMFAC)
        if args:
            raise TypeError(
                "MFAC(mode='adam') takes its options after lr by keyword (e.g. ngrads=32); "
                "positional options belong to mode='paper'"
            )
        given = [key for key in options if key in paper_only_options()]
        if given:
            hint = " (mode='adam' takes betas=(b1, b2) instead)" if given[0] == "momentum" else ""
            raise TypeError(
                f"MFAC: {given[0]!r} is an option of mode='paper' (the paper's step on raw "
                f"gradients), not of the default mode='adam'; pass mode='paper' to use it{hint}"
            )
        from .scaled import ScaledMFAC

        return super().__new__(ScaledMFAC)


__all__ = ["MFAC", "MODES", "paper_only_options"]
