"""The M-FAC optimizer: preconditioned steps with the inverse empirical Fisher of a sliding
window of the last m gradients (docs/algorithms.md section 3), as a ``torch.optim.Optimizer``.

Behaviour to know (all tested in tests/test_optim.py):

- One preconditioner over the flattened concatenation of every parameter that requires grad,
  across all parameter groups (groups laid out one after another). Per-group ``lr``,
  ``momentum`` and ``weight_decay`` are read at every step, so LR schedulers work.
- Step: g (+ wd*p when weight decay is coupled) -> s = F^-1 g via ``push_ihvp``;
  v = momentum*v + s (the paper's exponential average of preconditioned steps; v = s when
  momentum is 0); p -= lr*v; with ``decoupled_weight_decay`` p *= 1 - lr*wd first.
  The first step is m*g/(m*lambda + |g|^2) (empty window slots are zero rows).
- Parameters whose ``.grad`` is None in a step: their gradient enters the window as zeros, and
  they are not updated (no step, no weight decay, their momentum is left as it was). If no
  parameter has a gradient, ``step`` does nothing.
- NaN/Inf in a gradient raises :class:`mfac.NonFiniteGradientError` naming the parameter;
  the window, momentum and parameters are left exactly as they were.
- Masks (``set_masks``, a ``mask`` attribute on a parameter, or a module pruned with
  ``torch.nn.utils.prune``): the window covers the surviving coordinates only and masked
  entries stay exactly zero. Setting masks (or adding a parameter group) resets the window.
- ``state_dict`` carries the window, momentum, masks and error feedback: resumed training is
  bit-identical to uninterrupted training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validation import (
    NonFiniteGradientError,
    check_damp,
    check_float_dtype,
    check_positive_int,
)
from ..operators.sliding import SlidingInverseFisher
from .topk import TopKSlidingInverseFisher, resolve_k

HISTORIES = ("dense", "topk")


@dataclass(eq=False)
class _Slot:
    """Where one parameter lives in the flat vector: [offset, offset+size) and its mask."""

    param: torch.Tensor
    group: int
    offset: int
    size: int
    index: torch.Tensor | None  # flat indices of surviving entries (None: all survive)


def _check_nonneg(value: float, name: str, upper: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0.0 or (upper is not None and v >= upper):
        bound = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


class MFAC(torch.optim.Optimizer):
    """M-FAC: SGD preconditioned by the inverse of F = damp*I + G^T G / m over the last
    ``ngrads`` gradients.

    Args:
        params: parameters or parameter groups (dicts with ``params`` and optional ``lr``,
            ``momentum``, ``weight_decay``).
        lr: learning rate (>= 0).
        ngrads: window size m (number of past gradients kept).
        damp: absolute damping lambda > 0.
        momentum: exponential average of preconditioned steps, in [0, 1).
        weight_decay: L2 coefficient; coupled (added to the gradient before preconditioning,
            as in the paper) unless ``decoupled_weight_decay`` (p *= 1 - lr*wd).
        history_dtype: storage dtype of the window (float32, bfloat16, float16).
        history: ``"dense"`` (m x d window) or ``"topk"`` (EFCP error-feedback top-k rows).
        topk: for ``history="topk"``: entries kept per row, an int or a density in (0, 1].
        process_group: shard the dense window by coordinates over this torch.distributed
            group (use ``torch.distributed.group.WORLD`` for all ranks).
        memory_budget: bytes the window may take (default: half the available RAM).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        ngrads: int = 1024,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        history_dtype: torch.dtype = torch.float32,
        history: str = "dense",
        topk: int | float | None = None,
        process_group: Any = None,
        *,
        memory_budget: int | None = None,
    ) -> None:
        lr = _check_nonneg(lr, "lr")
        momentum = _check_nonneg(momentum, "momentum", upper=1.0)
        weight_decay = _check_nonneg(weight_decay, "weight_decay")
        self.ngrads = check_positive_int(ngrads, "ngrads")
        self.damp = check_damp(damp)
        self.history_dtype = check_float_dtype(history_dtype, "history_dtype")
        if history not in HISTORIES:
            raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
        if history == "topk":
            resolve_k(topk, 1)  # validates the type/range early
            if process_group is not None:
                raise NotImplementedError("history='topk' cannot be combined with process_group")
        elif topk is not None:
            raise ValueError("topk is only used with history='topk'")
        self.history, self.topk = history, topk
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.process_group = process_group
        self.memory_budget = memory_budget
        self._masks: dict[torch.Tensor, torch.Tensor] = {}
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                mask = getattr(p, "mask", None)
                if isinstance(mask, torch.Tensor):
                    self._masks[p] = self._check_mask(p, mask)
        self._rebuild()

    # ------------------------------------------------------------------ layout
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; the layout grows, so the window and momentum restart from empty."""
        for key in ("lr", "momentum", "weight_decay"):
            if key in param_group:
                upper = 1.0 if key == "momentum" else None
                param_group[key] = _check_nonneg(param_group[key], key, upper)
        super().add_param_group(param_group)
        if hasattr(self, "_window"):
            self._rebuild()

    @staticmethod
    def _check_mask(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, parameter {tuple(p.shape)}")
        return (mask != 0).to(device=p.device)

    def _rebuild(self) -> None:
        """Lay out trainable parameters in a flat vector and create an empty window."""
        slots: list[_Slot] = []
        offset = 0
        self._group_bounds: list[tuple[int, int]] = []
        dtypes = set()
        for gi, group in enumerate(self.param_groups):
            start = offset
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                dtypes.add(p.dtype)
                mask = self._masks.get(p)
                index = None
                size = p.numel()
                if mask is not None:
                    index = mask.reshape(-1).nonzero().squeeze(1)
                    size = index.numel()
                    with torch.no_grad():
                        p.masked_fill_(~mask, 0.0)
                slots.append(_Slot(p, gi, offset, size, index))
                offset += size
            self._group_bounds.append((start, offset))
        if offset == 0:
            raise ValueError("MFAC got no trainable coordinates (no parameter requires grad)")
        devices = {s.param.device for s in slots}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters must live on one device, got {sorted(map(str, devices))}"
            )
        self._slots = slots
        self.dim = offset
        self.device = devices.pop()
        self._dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self._window = self._make_window()
        self._flat = torch.zeros(self.dim, dtype=self._dtype, device=self.device)
        self._momentum_buf: torch.Tensor | None = None
        self._steps = 0

    def _make_window(self) -> Any:
        if self.history == "topk":
            return TopKSlidingInverseFisher(
                self.dim,
                self.ngrads,
                resolve_k(self.topk, self.dim),
                self.damp,
                self.history_dtype,
                self.device,
                memory_budget=self.memory_budget,
            )
        if self.process_group is not None:
            from .distributed import ShardedSlidingInverseFisher

            return ShardedSlidingInverseFisher(
                self.dim,
                self.ngrads,
                self.damp,
                self.history_dtype,
                self.process_group,
                device=self.device,
                memory_budget=self.memory_budget,
            )
        return SlidingInverseFisher(
            self.dim,
            self.ngrads,
            self.damp,
            self.history_dtype,
            self.device,
            memory_budget=self.memory_budget,
        )

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
        new = {}
        for p, mask in masks.items():
            if p not in known:
                raise ValueError(
                    f"a mask was given for a parameter of shape {tuple(p.shape)} "
                    "that this optimizer does not hold"
                )
            new[p] = self._check_mask(p, mask)
        self._masks.update(new)
        self._rebuild()

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ properties
    @property
    def window(self) -> Any:
        """The sliding-window operator (dense, top-k or sharded)."""
        return self._window

    @property
    def state_nbytes(self) -> int:
        """Bytes of optimizer state: window (+K, factor, error feedback), momentum, scratch."""
        extra = self._flat.numel() * self._flat.element_size()
        if self._momentum_buf is not None:
            extra += self._momentum_buf.numel() * self._momentum_buf.element_size()
        return int(self._window.nbytes) + extra

    # ------------------------------------------------------------------ step
    def _gather_grads(self) -> list[_Slot]:
        """Copy gradients (+ coupled weight decay) into the flat buffer; return slots with grads."""
        flat = self._flat
        live = []
        for s in self._slots:
            view = flat[s.offset : s.offset + s.size]
            g = s.param.grad
            if g is None:
                view.zero_()
                continue
            if g.is_sparse:
                raise RuntimeError("MFAC does not support sparse gradients")
            live.append(s)
            src = g.reshape(-1) if s.index is None else g.reshape(-1).index_select(0, s.index)
            view.copy_(src)
            wd = self.param_groups[s.group]["weight_decay"]
            if wd != 0.0 and not self.decoupled_weight_decay:
                p = s.param.detach().reshape(-1)
                view.add_(p if s.index is None else p.index_select(0, s.index), alpha=wd)
        return live

    def _raise_nonfinite(self, live: list[_Slot], exc: Exception) -> None:
        """Re-raise the window's NaN/Inf error naming the first offending parameter."""
        for i, s in enumerate(self._slots):
            if s in live and not bool(
                torch.isfinite(self._flat[s.offset : s.offset + s.size]).all()
            ):
                raise NonFiniteGradientError(
                    f"MFAC.step: the gradient of parameter #{i} (shape {tuple(s.param.shape)}, "
                    f"group {s.group}) contains NaN or Inf; window, momentum and parameters are "
                    "unchanged"
                ) from exc
        raise exc

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One M-FAC step; ``closure`` re-evaluates the loss (called with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = self._gather_grads()
        if not live:
            return loss
        try:  # the window checks finiteness for free (g.g) and changes nothing on error
            direction = self._window.push_ihvp(self._flat)
        except NonFiniteGradientError as exc:
            self._raise_nonfinite(live, exc)
        all_live = len(live) == len(self._slots)
        if any(g["momentum"] != 0.0 for g in self.param_groups):
            if self._momentum_buf is None:
                self._momentum_buf = torch.zeros_like(direction)
            buf = self._momentum_buf
            for gi, (a, b) in enumerate(self._group_bounds):
                mu = self.param_groups[gi]["momentum"]
                if all_live:
                    buf[a:b].mul_(mu).add_(direction[a:b])
                else:
                    for s in live:
                        if s.group == gi:
                            seg = slice(s.offset, s.offset + s.size)
                            buf[seg].mul_(mu).add_(direction[seg])
            direction = buf
        self._apply(direction, live)
        self._steps += 1
        return loss

    def _apply(self, direction: torch.Tensor, live: list[_Slot]) -> None:
        """p -= lr * direction (scattered through masks), with decoupled decay first."""
        for gi, group in enumerate(self.param_groups):
            lr, wd = group["lr"], group["weight_decay"]
            dense_p, dense_d = [], []
            for s in live:
                if s.group != gi:
                    continue
                p = s.param
                if self.decoupled_weight_decay and wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                seg = direction[s.offset : s.offset + s.size]
                if s.index is None:
                    dense_p.append(p)
                    dense_d.append(seg.view_as(p).to(p.dtype))
                else:
                    p.view(-1).index_add_(0, s.index, seg.to(p.dtype), alpha=-lr)
            if dense_p:
                torch._foreach_add_(dense_p, dense_d, alpha=-lr)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``"mfac"``: window, momentum, masks, step count."""
        sd = super().state_dict()
        params = self._all_params()
        sd["mfac"] = {
            "window": self._window.state_dict(),
            "momentum": None if self._momentum_buf is None else self._momentum_buf.clone(),
            "masks": [self._masks[p].clone() if p in self._masks else None for p in params],
            "steps": self._steps,
            "dim": self.dim,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same parameters, same history settings)."""
        sd = dict(state_dict)
        extra = sd.pop("mfac", None)
        super().load_state_dict(sd)
        if extra is None:
            return
        params = self._all_params()
        if len(extra["masks"]) != len(params):
            raise ValueError(
                f"state holds masks for {len(extra['masks'])} parameters, "
                f"this optimizer has {len(params)}"
            )
        self._masks = {
            p: self._check_mask(p, m)
            for p, m in zip(params, extra["masks"], strict=True)
            if m is not None
        }
        self._rebuild()
        if extra["dim"] != self.dim:
            raise ValueError(f"state has {extra['dim']} coordinates, this optimizer {self.dim}")
        self._window.load_state_dict(extra["window"])
        if extra["momentum"] is not None:
            self._momentum_buf = extra["momentum"].to(self.device).clone()
        self._steps = int(extra["steps"])

    def __repr__(self) -> str:
        return (
            f"MFAC(dim={self.dim}, ngrads={self.ngrads}, damp={self.damp:g}, "
            f"history={self.history!r}, groups={len(self.param_groups)})"
        )


__all__ = ["MFAC"]
