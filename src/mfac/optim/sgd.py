"""``mfac.MFACSGD``, the paper's M-FAC step: SGD preconditioned by the inverse empirical Fisher
of a sliding window of the last m gradients (docs/algorithms.md section 3).

The step itself is :func:`mfac.optim.functional.mfac_step`; this class keeps the state where
:class:`mfac.optim.base.WindowOptimizer` keeps it for both rules and checks every option.
Behaviour to know (all tested in tests/optim/):

- One preconditioner over the flattened concatenation of every parameter that requires grad,
  across all parameter groups (groups laid out one after another). Per-group ``lr``,
  ``momentum`` and ``weight_decay`` are read (and checked) at every step, so LR schedulers
  work.
- Step: g (+ wd*p when weight decay is coupled) -> s = F^-1 g via ``push_ihvp``;
  v = momentum*v + s (the paper's exponential average of preconditioned steps; v = s when
  momentum is 0); p -= lr*v; with ``decoupled_weight_decay`` p *= 1 - lr*wd first.
  The first step is m*g/(m*lambda + |g|^2) (empty window slots are zero rows).
- Parameters whose ``.grad`` is None in a step: their gradient enters the window as zeros, and
  they are not updated. If no parameter has a gradient, ``step`` does nothing.
- NaN/Inf in a gradient raises :class:`mfac.NonFiniteGradientError` naming the parameter;
  the window, momentum and parameters are left exactly as they were.
- Masks (``set_masks``, a ``mask`` attribute on a parameter, or a module pruned with
  ``torch.nn.utils.prune``): the window covers the surviving coordinates only and masked
  entries stay exactly zero. Setting masks resets the window and the momentum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._validation import check_damp
from ..operators.topk import resolve_k
from ..operators.window import window_bytes
from .base import Params, Plan, WindowOptimizer, local
from .config import MFACSGDConfig, check_group_option
from .functional import mfac_step


class MFACSGD(WindowOptimizer):
    """The paper's M-FAC: SGD preconditioned by the inverse of F = damp*I + G^T G / m over the
    last ``ngrads`` gradients of the whole model.

    Args:
        params: parameters or parameter groups (dicts with ``params`` and optional ``lr``,
            ``momentum``, ``weight_decay``).
        lr: learning rate (>= 0).
        momentum: exponential average of preconditioned steps, in [0, 1).
        weight_decay: L2 coefficient; coupled (added to the gradient before preconditioning,
            as in the paper) unless ``decoupled_weight_decay``.
        **options: :class:`mfac.optim.MFACSGDConfig` (``ngrads``, default 1024; ``damp``,
            absolute, default 1e-5; ``decoupled_weight_decay``, ``layout`` ("dense" or
            "topk"), ``topk``, ``window_dtype``, ``process_group`` (shard the dense window by
            coordinates over this torch.distributed group), ``memory_budget``,
            ``gradient_scaling``), by keyword; an unknown name is refused by name.

    FSDP2 parameters (``fully_shard``: DTensors with ``Shard(0)``) need nothing more: each rank
    keeps its shards' columns of the window and all-reduces the m x m products (docs/optim.md,
    "FSDP2 and distributed checkpoints"); ``process_group`` is for plain (DDP) parameters.
    """

    group_options = ("lr", "momentum", "weight_decay")
    param_tensors = ("momentum_buffer",)
    anchor_fields = ("gradient_scaling",)
    supports_masks = True
    cfg: MFACSGDConfig

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> None:
        cfg = MFACSGDConfig.build(options, "MFACSGD")
        check_damp(cfg.damp)
        defaults = {
            "lr": check_group_option(lr, "lr"),
            "momentum": check_group_option(momentum, "momentum"),
            "weight_decay": check_group_option(weight_decay, "weight_decay"),
        }
        self._flat: torch.Tensor | None = None
        super().__init__(params, defaults, cfg)

    def _window_damp(self) -> float:
        return self.cfg.damp

    @property
    def damp(self) -> float:
        """The absolute damping lambda."""
        return self.cfg.damp

    @property
    def ngrads(self) -> int:
        """The window size m."""
        return self.cfg.ngrads

    @property
    def gradient_scaling(self) -> Any:
        """The optional transform around the preconditioner (None: the paper's step)."""
        return self.cfg.gradient_scaling

    @property
    def dim(self) -> int:
        """The number of coordinates the window covers."""
        return self._layout.dim

    @property
    def window(self) -> Any:
        """The sliding window (dense, top-k or sharded)."""
        return self.windows[0]

    def required_bytes(
        self, sizes: list[int], *, windows: int | None = None, unwindowed: Sequence[int] = ()
    ) -> int:
        """Bytes of the window (with its m x m matrices and step buffers) and this rule's own
        d-vectors: the flat gradient, the momentum and the direction (parameter dtype). This
        rule has one window and steps every parameter through it."""
        cfg, dim = self.cfg, sum(sizes)
        world = 1
        if cfg.process_group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(cfg.process_group) if dist.is_initialized() else 1
        window = window_bytes(
            dim,
            cfg.ngrads,
            layout=cfg.layout,
            dtype=cfg.window_dtype,
            topk=resolve_k(cfg.topk, dim) if cfg.layout == "topk" else None,
            world=world,
        )
        dtypes = {p.dtype for g in self.param_groups for p in g["params"] if p.requires_grad}
        elem = torch.empty((), dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
        return window + 3 * dim * elem.element_size()

    def _like(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A new per-parameter tensor: a DTensor sharded like ``p`` under FSDP2 (``t`` is this
        rank's piece), else ``t``."""
        if self._layout.mesh is None:
            return t
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )

    def _initial_tensors(self, p: torch.Tensor, group: Any, plan: Plan) -> dict[str, torch.Tensor]:
        """The momentum buffer, zero, when the group uses momentum (else made when needed)."""
        if float(group.get("momentum", 0.0)) == 0.0:
            return {}
        return {"momentum_buffer": torch.zeros_like(p, dtype=plan.dtype)}

    def _state_dtype(self, plan: Plan) -> torch.dtype:
        return plan.dtype

    @property
    def state_nbytes(self) -> int:
        """Bytes of state: the window (+K, K^-1, error feedback), momentum, the flat buffer."""
        flat = 0 if self._flat is None else self._flat.numel() * self._flat.element_size()
        return super().state_nbytes + flat

    def set_masks(self, masks: Mapping[torch.Tensor, torch.Tensor] | nn.Module) -> None:
        """Restrict the preconditioner to surviving coordinates; masked entries become and stay 0.

        ``masks`` maps parameters to boolean (or 0/1) tensors of their shape, or is a module
        pruned with ``torch.nn.utils.prune``: every ``<name>_orig`` parameter with a
        ``<name>_mask`` buffer is masked (the optimizer updates ``weight_orig``, whose gradient
        torch already masks). Parameters not named keep their previous mask. The window and
        momentum restart from empty (the coordinate set changed).
        """
        if isinstance(masks, nn.Module):
            found: dict[torch.Tensor, torch.Tensor] = {}
            for module in masks.modules():
                for name, p in module.named_parameters(recurse=False):
                    if name.endswith("_orig"):
                        buf = getattr(module, name[: -len("_orig")] + "_mask", None)
                        if isinstance(buf, torch.Tensor):
                            found[p] = buf
            masks = found
        known = set(self._all_params())
        new = self._current_masks()
        for p, mask in masks.items():
            if p not in known:
                raise ValueError(
                    f"a mask was given for a parameter of shape {tuple(p.shape)} "
                    "that this optimizer does not hold"
                )
            new[p] = self._check_mask(p, mask)
        self._install(self._plan(new), new, keep=False)

    def _step(self, options: list[dict[str, float]]) -> None:
        """One step with the groups' checked options (see the module docstring)."""
        plan = self._layout
        params = plan.params
        if self._flat is None or self._flat.numel() != plan.dim or self._flat.dtype != plan.dtype:
            self._flat = torch.zeros(plan.dim, dtype=plan.dtype, device=plan.device)
        saved = [self.state[p].get("momentum_buffer") for p in params]
        # under FSDP2 the step runs on this rank's shards (local views, written in place)
        buffers = [None if b is None else local(b) for b in saved]

        def describe(i: int) -> str:
            return f"#{i} (shape {tuple(params[i].shape)}, group {plan.groups[i]})"

        stepped = mfac_step(
            [local(p) for p in params],
            [None if p.grad is None else local(p.grad) for p in params],
            buffers,
            window=self.window,
            segments=plan.segments,
            flat=self._flat,
            lrs=[options[g]["lr"] for g in plan.groups],
            momentums=[options[g]["momentum"] for g in plan.groups],
            weight_decays=[options[g]["weight_decay"] for g in plan.groups],
            decoupled_weight_decay=self.cfg.decoupled_weight_decay,
            gradient_scaling=self.gradient_scaling,
            describe=describe,
        )
        if stepped:
            for p, buf, old in zip(params, buffers, saved, strict=True):
                if buf is not None and old is None:
                    self.state[p]["momentum_buffer"] = self._like(p, buf)
            self._count_step()

    # ------------------------------------------------------------------ checkpoints
    def _packed_state_dict(self) -> dict[str, Any]:
        """The common state dict, plus the gradient scaling's own state when it has one."""
        sd = super()._packed_state_dict()
        scaling = self.gradient_scaling
        if scaling is not None and hasattr(scaling, "state_dict"):
            index = {id(p): i for i, p in enumerate(self._all_params())}[
                id(self._layout.params[0])
            ]
            sd["state"][index] = {**sd["state"][index], "gradient_scaling": scaling.state_dict()}
        return sd

    def _load_extra_check(self, entry: Mapping[str, Any]) -> None:
        if entry.get("gradient_scaling") is not None and self.gradient_scaling is None:
            raise ValueError("state has a 'gradient_scaling' entry, but this optimizer has none")

    def _load_extra(self, entry: Mapping[str, Any]) -> None:
        scaling = entry.get("gradient_scaling")
        if scaling is not None:
            self.gradient_scaling.load_state_dict(scaling)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"MFACSGD(dim={self.dim}, ngrads={c.ngrads}, damp={c.damp:g}, "
            f"layout={c.layout!r}, groups={len(self.param_groups)})"
        )


__all__ = ["MFACSGD"]
