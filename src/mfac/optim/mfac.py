"""The paper's M-FAC step, ``MFAC(..., mode="paper")``: SGD preconditioned by the inverse
empirical Fisher of a sliding window of the last m gradients (docs/algorithms.md section 3).

The step itself is :func:`mfac.optim.functional.mfac_step`; this class lays the parameters
out in one flat vector, keeps the state in ``self.state`` (torch's convention) and checks
every option. Behaviour to know (all tested in tests/test_optim*.py):

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
  entries stay exactly zero. Setting masks (or adding a parameter group) resets the window.
- State: ``self.state[p]`` holds ``momentum_buffer`` and ``mask`` per parameter; the global
  state (``window``, the sliding-window operator, and ``step``) sits with the first
  parameter, ``self.state[param_groups[0]["params"][0]]``, as torch's LBFGS does.
  ``state_dict()`` stores the window as its own state dict; ``load_state_dict`` checks
  everything before changing anything, and resumed training is bit-identical.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._validation import check_damp, check_float_dtype, check_positive_int
from ..operators.memory import check_fits
from ..operators.sliding import SlidingInverseFisher
from ..operators.topk import TopKSlidingInverseFisher, resolve_k
from ..operators.window import SlidingWindow
from .base import MFAC
from .functional import GradientScaling, Segment, mfac_step

HISTORIES = ("dense", "topk")
GROUP_OPTIONS = ("lr", "momentum", "weight_decay")
PARAM_STATE_KEYS = ("momentum_buffer", "mask")
GLOBAL_STATE_KEYS = ("window", "step", "gradient_scaling")


def check_option(value: Any, name: str, key: str | None = None) -> float:
    """``lr``, ``weight_decay`` (finite, >= 0) or ``momentum`` (in [0, 1)) as a float;
    ``key`` is the option (default: ``name``), ``name`` what the error calls it."""
    upper = 1.0 if (key or name) == "momentum" else None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or (upper is not None and v >= upper):
        bound = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


class PaperMFAC(MFAC):
    """The paper's M-FAC: SGD preconditioned by the inverse of F = damp*I + G^T G / m over the
    last ``ngrads`` gradients. Built by ``MFAC(..., mode="paper")`` (or directly).

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
        memory_budget: bytes the window and the step's buffers may take (default: half the
            available RAM); checked before anything is allocated.
        gradient_scaling: optional transform around the preconditioner
            (:class:`mfac.optim.functional.GradientScaling`); None is the paper's step.
        mode: ``"paper"`` only (``mfac.MFAC`` passes its ``mode`` through).
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
        gradient_scaling: GradientScaling | None = None,
        mode: str = "paper",
    ) -> None:
        if mode != "paper":
            raise ValueError(f"PaperMFAC is mode='paper', got mode={mode!r}; use mfac.MFAC")
        defaults = {
            "lr": check_option(lr, "lr"),
            "momentum": check_option(momentum, "momentum"),
            "weight_decay": check_option(weight_decay, "weight_decay"),
        }
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
        if memory_budget is not None:
            check_positive_int(memory_budget, "memory_budget")
        if gradient_scaling is not None and not isinstance(gradient_scaling, GradientScaling):
            raise TypeError("gradient_scaling must have before_push and after_ihvp methods")
        self.history, self.topk = history, topk
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.process_group = process_group
        self.memory_budget = memory_budget
        self.gradient_scaling = gradient_scaling
        self._ready = False
        super().__init__(params, defaults)
        masks = {}
        for p in self._all_params():
            mask = getattr(p, "mask", None)
            if isinstance(mask, torch.Tensor):
                masks[p] = self._check_mask(p, mask)
        self._install_layout(self._plan_layout(masks), masks)
        self._ready = True

    # ------------------------------------------------------------------ layout
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; the layout grows, so the window and momentum restart from empty.
        Options are checked, and the new window sized, before anything changes."""
        checked = dict(param_group)
        for key in GROUP_OPTIONS:
            if key in checked:
                checked[key] = check_option(checked[key], key)
        if not self._ready:
            super().add_param_group(checked)
            return
        old_groups = list(self.param_groups)
        super().add_param_group(checked)  # torch's own checks (duplicates, types)
        try:
            masks = self._current_masks()
            plan = self._plan_layout(masks)
        except BaseException:
            self.param_groups[:] = old_groups
            raise
        self._install_layout(plan, masks)

    @staticmethod
    def _check_mask(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, parameter {tuple(p.shape)}")
        return (mask != 0).to(device=p.device)

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def _state_key(self) -> torch.Tensor:
        """The parameter whose state entry holds the global state (window, step)."""
        return self._all_params()[0]

    def _current_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        return {p: s["mask"] for p, s in self.state.items() if "mask" in s}

    def _plan_layout(self, masks: Mapping[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        """Lay out trainable parameters and build an empty window for them; changes nothing."""
        params, groups, segments = [], [], []
        offset = 0
        dtypes = set()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                dtypes.add(p.dtype)
                mask = masks.get(p)
                index = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
                size = p.numel() if index is None else index.numel()
                params.append(p)
                groups.append(gi)
                segments.append(Segment(offset, size, index))
                offset += size
        if offset == 0:
            raise ValueError("MFAC got no trainable coordinates (no parameter requires grad)")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters must live on one device, got {sorted(map(str, devices))}"
            )
        device = devices.pop()
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        elem = torch.empty((), dtype=dtype).element_size()
        own = 3 * offset * elem  # flat gradient, momentum, direction
        check_fits(
            self._window_bytes(offset) + own,
            f"M-FAC over {offset} coordinates with a window of {self.ngrads} gradients "
            f"({self.history} history; window, its float64 {self.ngrads} x {self.ngrads} "
            "matrices and the step's buffers)",
            self.memory_budget,
            device,
        )
        return {
            "params": params,
            "groups": groups,
            "segments": segments,
            "dim": offset,
            "device": device,
            "dtype": dtype,
            "window": self._make_window(offset, device),
        }

    def _window_bytes(self, dim: int) -> int:
        if self.history == "topk":
            k = resolve_k(self.topk, dim)
            return TopKSlidingInverseFisher.required_bytes(dim, self.ngrads, k, self.history_dtype)
        if self.process_group is not None:  # this rank's column shard, plus the gathered step
            import torch.distributed as dist

            from ..operators.sharded import ShardedSlidingInverseFisher

            world = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
            return ShardedSlidingInverseFisher.required_bytes(
                dim, self.ngrads, world, self.history_dtype
            )
        return SlidingInverseFisher.required_bytes(dim, self.ngrads, self.history_dtype)

    def _make_window(self, dim: int, device: torch.device) -> SlidingWindow:
        if self.history == "topk":
            return TopKSlidingInverseFisher(
                dim,
                self.ngrads,
                resolve_k(self.topk, dim),
                self.damp,
                self.history_dtype,
                device,
                memory_budget=self.memory_budget,
            )
        if self.process_group is not None:
            from ..operators.sharded import ShardedSlidingInverseFisher

            return ShardedSlidingInverseFisher(
                dim,
                self.ngrads,
                self.damp,
                self.history_dtype,
                self.process_group,
                device=device,
                memory_budget=self.memory_budget,
            )
        return SlidingInverseFisher(
            dim,
            self.ngrads,
            self.damp,
            self.history_dtype,
            device,
            memory_budget=self.memory_budget,
        )

    def _install_layout(
        self, plan: dict[str, Any], masks: Mapping[torch.Tensor, torch.Tensor]
    ) -> None:
        """Adopt a planned layout: fresh window, no momentum, masked entries zeroed."""
        self._params: list[torch.Tensor] = plan["params"]
        self._groups: list[int] = plan["groups"]
        self._segments: list[Segment] = plan["segments"]
        self.dim: int = plan["dim"]
        self.device: torch.device = plan["device"]
        self._dtype: torch.dtype = plan["dtype"]
        self._flat = torch.zeros(self.dim, dtype=self._dtype, device=self.device)
        self.state.clear()
        for p, mask in masks.items():
            self.state[p]["mask"] = mask
            with torch.no_grad():
                p.masked_fill_(~mask, 0.0)
        self.state[self._state_key].update({"window": plan["window"], "step": 0})

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
        self._install_layout(self._plan_layout(new), new)

    # ------------------------------------------------------------------ properties
    @property
    def window(self) -> SlidingWindow:
        """The sliding-window operator (dense, top-k or sharded)."""
        return self.state[self._state_key]["window"]

    @property
    def steps(self) -> int:
        """Steps taken (steps without any gradient are not counted)."""
        return int(self.state[self._state_key]["step"])

    @property
    def state_nbytes(self) -> int:
        """Bytes of optimizer state: window (+K, K^-1, error feedback), momentum, scratch."""
        extra = self._flat.numel() * self._flat.element_size()
        for s in self.state.values():
            buf = s.get("momentum_buffer")
            if buf is not None:
                extra += buf.numel() * buf.element_size()
        return int(self.window.nbytes) + extra

    # ------------------------------------------------------------------ step
    def _check_groups(self) -> list[dict[str, float]]:
        """Every group's options, checked (a scheduler or a user may have changed them)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            out.append(
                {k: check_option(group[k], f"param_groups[{gi}][{k!r}]", k) for k in GROUP_OPTIONS}
            )
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One M-FAC step; ``closure`` re-evaluates the loss (called with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        options = self._check_groups()  # before anything is touched
        params = self._params
        buffers = [self.state[p].get("momentum_buffer") for p in params]

        def describe(i: int) -> str:
            return f"#{i} (shape {tuple(params[i].shape)}, group {self._groups[i]})"

        stepped = mfac_step(
            params,
            [p.grad for p in params],
            buffers,
            window=self.window,
            segments=self._segments,
            flat=self._flat,
            lrs=[options[g]["lr"] for g in self._groups],
            momentums=[options[g]["momentum"] for g in self._groups],
            weight_decays=[options[g]["weight_decay"] for g in self._groups],
            decoupled_weight_decay=self.decoupled_weight_decay,
            gradient_scaling=self.gradient_scaling,
            describe=describe,
        )
        if stepped:
            for p, buf in zip(params, buffers, strict=True):
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf
            self.state[self._state_key]["step"] += 1
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict; the window entry is the window's own state dict."""
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(self._all_params())}[id(self._state_key)]
        entry = dict(sd["state"][index])
        entry["window"] = entry["window"].state_dict()
        scaling = self.gradient_scaling
        if scaling is not None and hasattr(scaling, "state_dict"):
            entry["gradient_scaling"] = scaling.state_dict()
        sd["state"] = {**sd["state"], index: entry}
        return sd

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Check every field of a saved state against this optimizer; return what to install.

        Raises naming the field; nothing is changed here (a window for a different mask
        layout is built, unused, when the saved masks differ from the current ones)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if "mfac" in state_dict:
            raise ValueError(
                "state_dict has the field 'mfac' of an older torch-mfac format; it cannot be "
                "loaded by this version"
            )
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise KeyError(f"state_dict is missing the field {key!r}")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            n = len(saved_groups) if isinstance(saved_groups, list) else saved_groups
            raise ValueError(
                f"param_groups: state has {n} parameter groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        ids = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f"param_groups[{gi}] is not a parameter group")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param_groups[{gi}]['params']: state has {len(saved['params'])} parameters, "
                    f"this optimizer {len(group['params'])}"
                )
            for key in GROUP_OPTIONS:
                if key not in saved:
                    raise KeyError(f"state is missing the field param_groups[{gi}][{key!r}]")
                check_option(saved[key], f"param_groups[{gi}][{key!r}]", key)
            ids.extend(saved["params"])
        params = self._all_params()
        by_id = dict(zip(ids, params, strict=True))
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError("state_dict['state'] must be a mapping")
        key_id = ids[0]
        masks: dict[torch.Tensor, torch.Tensor] = {}
        momentum: dict[torch.Tensor, torch.Tensor] = {}
        for pid, entry in saved_state.items():
            if pid not in by_id:
                raise ValueError(f"state[{pid!r}] names no parameter of this optimizer")
            p = by_id[pid]
            allowed = PARAM_STATE_KEYS + (GLOBAL_STATE_KEYS if pid == key_id else ())
            for key in entry:
                if key not in allowed:
                    raise ValueError(f"state[{pid!r}] has an unexpected field {key!r}")
            if "mask" in entry:
                mask = entry["mask"]
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                    raise TypeError(f"state[{pid!r}]['mask'] must be a bool tensor")
                if tuple(mask.shape) != tuple(p.shape):
                    raise ValueError(
                        f"state[{pid!r}]['mask'] has shape {tuple(mask.shape)}, the parameter "
                        f"{tuple(p.shape)}"
                    )
                masks[p] = mask.to(p.device)
        if key_id not in saved_state or "window" not in saved_state[key_id]:
            raise KeyError(f"state is missing the field state[{key_id!r}]['window']")
        glob = saved_state[key_id]
        step = glob.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state[{key_id!r}]['step'] must be an int >= 0, got {step!r}")
        current = self._current_masks()
        same_layout = {id(p) for p in masks} == {id(p) for p in current} and all(
            torch.equal(masks[p], current[p]) for p in masks
        )
        plan = None if same_layout else self._plan_layout(masks)
        dtype = self._dtype if plan is None else plan["dtype"]
        for pid, entry in saved_state.items():
            if "momentum_buffer" not in entry:
                continue
            p, buf = by_id[pid], entry["momentum_buffer"]
            field = f"state[{pid!r}]['momentum_buffer']"
            if not isinstance(buf, torch.Tensor):
                raise TypeError(f"{field} must be a tensor")
            if tuple(buf.shape) != tuple(p.shape):
                raise ValueError(
                    f"{field} has shape {tuple(buf.shape)}, the parameter {tuple(p.shape)}"
                )
            if buf.dtype != dtype:
                raise TypeError(f"{field} has dtype {buf.dtype}, this optimizer keeps {dtype}")
            if not bool(torch.isfinite(buf).all()):
                raise ValueError(f"{field} contains NaN or Inf")
            momentum[p] = buf
        window = self.window if plan is None else plan["window"]
        try:
            window.check_state(glob["window"])
        except (KeyError, ValueError, TypeError) as exc:
            msg = exc.args[0] if exc.args else str(exc)
            raise type(exc)(f"state[{key_id!r}]['window']: {msg}") from None
        scaling = glob.get("gradient_scaling")
        if scaling is not None and self.gradient_scaling is None:
            raise ValueError(
                f"state[{key_id!r}]['gradient_scaling'] given, but this optimizer has none"
            )
        return {
            "key_id": key_id,
            "plan": plan,
            "masks": masks,
            "momentum": momentum,
            "window": glob["window"],
            "step": step,
            "scaling": scaling,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same parameters and window settings).

        All-or-nothing: every field is checked first (keys, shapes, dtypes, finiteness, the
        ring pointer, damping, option values, masks, the window's K against its rows), and a
        refusal raises one error naming the field with the optimizer unchanged. Tensors are
        copied, so the given state is never written to later."""
        todo = self._check_state_dict(state_dict)
        window = self.window
        key_index = todo["key_id"]
        stripped = dict(state_dict["state"])
        stripped[key_index] = {
            k: v for k, v in stripped[key_index].items() if k not in GLOBAL_STATE_KEYS
        }
        super().load_state_dict({**state_dict, "state": stripped})
        # torch cast every tensor to its parameter's dtype; install the checked originals
        if todo["plan"] is not None:
            self._install_layout(todo["plan"], todo["masks"])
        else:
            self.state.clear()
            for p, mask in todo["masks"].items():
                self.state[p]["mask"] = mask.clone()
            self.state[self._state_key].update({"window": window, "step": 0})
        self.window.load_state_dict(todo["window"])
        for p, buf in todo["momentum"].items():
            self.state[p]["momentum_buffer"] = buf.to(self.device).clone()
        self.state[self._state_key]["step"] = todo["step"]
        if todo["scaling"] is not None:
            self.gradient_scaling.load_state_dict(todo["scaling"])  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return (
            f"MFAC(mode='paper', dim={self.dim}, ngrads={self.ngrads}, damp={self.damp:g}, "
            f"history={self.history!r}, groups={len(self.param_groups)})"
        )


__all__ = ["MFAC", "PaperMFAC", "check_option"]
