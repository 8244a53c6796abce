"""What both optimizer rules share: the parameters' flat layout, the windows, and the state
kept where ``torch.optim`` keeps it.

A rule subclasses :class:`WindowOptimizer` and supplies its options (a :mod:`mfac.optim.config`
dataclass), the per-parameter tensors it keeps, how many bytes it needs, and ``step``. The
base class does the rest, the same way for both rules:

- Layout: every parameter that requires grad, group after group; with masks (the paper's rule)
  only the surviving coordinates. ``window_scope="tensor"`` gives each parameter its own
  window (tensors smaller than the rule's ``share_below`` share one), ``"model"`` one window
  over the whole flat vector. A rule may step some groups without any window (the default
  rule's orthogonalized matrices): those parameters keep their state but are not laid out.
- State: ``self.state[p]`` holds each parameter's tensors (Adam's moments, momentum, its mask)
  and, with per-tensor windows, its window (a shared window sits with its first tensor); the
  model's window and the step count sit with the first windowed parameter (as torch's LBFGS
  keeps its history). ``state_dict()`` replaces every window by the window's own state dict.
- ``load_state_dict`` checks every field (group options, per-parameter tensors, each window
  against its rows) before anything changes, then installs copies: resuming is bit-identical
  and a refused load leaves the optimizer exactly as it was.
- ``add_param_group`` keeps every existing parameter's state and own windows; a shared or
  model-wide window restarts empty (its coordinates changed).

The windows are the operators' (:func:`mfac.operators.window.make_window`): this package keeps
no ring, Gram matrix or factor of its own.

FSDP2 (``torch.distributed.fsdp.fully_shard``): when the parameters are DTensors, all on one
1-D device mesh with FSDP2's placement ``(Shard(0),)``, the layout is of their local pieces
(``p.to_local()``), the windows are local sharded windows over the mesh
(:mod:`mfac.operators.fsdp`: each rank keeps its columns, the m x m products are all-reduced),
the rules read ``p.grad.to_local()`` and update ``p.to_local()`` in place, and the
per-parameter tensors are DTensors sharded like the parameters (as torch.optim keeps them), so
that ``torch.distributed.checkpoint`` shards the whole state. Any other placement is refused by
name at construction, before any state exists.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .._validation import NonFiniteGradientError, finite_fast
from ..operators.layout import FlatLayout, Segment
from ..operators.memory import FileMappings, adoptable, check_fits
from ..operators.topk import resolve_k
from ..operators.window import SlidingWindow, make_window
from .config import WindowConfig, check_group_option

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@dataclass
class Plan:
    """A laid-out set of parameters and its (empty) windows; building one changes nothing."""

    params: list[torch.Tensor]
    groups: list[int]
    segments: list[Segment]
    dim: int
    device: torch.device
    dtype: torch.dtype
    windows: list[SlidingWindow]
    #: The 1-D device mesh of FSDP2 parameters (their local pieces are laid out), else None.
    mesh: Any = None
    #: Which parameters (positions in ``params``) each window covers, in window order.
    members: list[list[int]] = field(default_factory=list)
    #: Trainable parameters the rule steps without a window (not in ``params``), and their
    #: groups.
    unwindowed: list[torch.Tensor] = field(default_factory=list)
    unwindowed_groups: list[int] = field(default_factory=list)


def _dtensor_type() -> type | None:
    """torch's DTensor class, or None where torch.distributed is not built."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (a view: writes reach the DTensor), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class WindowOptimizer(torch.optim.Optimizer):
    """Base of :class:`mfac.MFAC` and :class:`mfac.MFACSGD` (see the module docstring)."""

    #: Per-group numeric options, checked at construction and at every step.
    group_options: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")
    #: Per-parameter tensors a rule keeps in ``self.state[p]`` (besides ``window``).
    param_tensors: ClassVar[tuple[str, ...]] = ()
    #: A rule's own fields in the first parameter's state entry (besides ``step``).
    anchor_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether the rule restricts itself to masked coordinates.
    supports_masks: ClassVar[bool] = False

    cfg: WindowConfig

    def __init__(self, params: Params, defaults: dict[str, Any], cfg: WindowConfig) -> None:
        self.cfg = cfg
        self._ready = False
        super().__init__(params, defaults)
        masks: dict[torch.Tensor, torch.Tensor] = {}
        if self.supports_masks:
            for p in self._all_params():
                mask = getattr(p, "mask", None)
                if isinstance(mask, torch.Tensor):
                    masks[p] = self._check_mask(p, mask)
        self._install(self._plan(masks), masks, keep=False)
        self._ready = True

    def __getstate__(self) -> dict[str, Any]:
        """torch's fields (defaults, state, groups) and this class's own (options, layout,
        windows), so that deepcopy and pickle give a working copy; torch's hooks are left out,
        as torch leaves them out."""
        own = {
            k: v
            for k, v in self.__dict__.items()
            if not k.startswith("_optimizer_") and k != "_zero_grad_profile_name"
        }
        return {**own, **super().__getstate__()}

    # ------------------------------------------------------------------ options
    @property
    def window_scope(self) -> str:
        """``"tensor"`` (one window per parameter) or ``"model"`` (one window)."""
        return getattr(self.cfg, "window_scope", "model")

    def _window_damp(self) -> float | None:
        """The damping the rule's windows keep (None: undamped, the rule does the algebra)."""
        return None

    def required_bytes(
        self, sizes: list[int], *, windows: int | None = None, unwindowed: Sequence[int] = ()
    ) -> int:
        """Bytes a step needs for windowed parameters of these sizes in ``windows`` windows
        (default: one per size, or one with a model-wide scope) and for parameters of the
        (whole, global) sizes ``unwindowed`` stepped without a window (windows, state,
        temporaries)."""
        raise NotImplementedError

    def _check_groups(self) -> list[dict[str, float]]:
        """Every group's options, checked (a scheduler or a user may have changed them)."""
        return [
            {
                k: check_group_option(group[k], f"param_groups[{gi}][{k!r}]", k)
                for k in self.group_options
            }
            for gi, group in enumerate(self.param_groups)
        ]

    # ------------------------------------------------------------------ layout
    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @staticmethod
    def _check_mask(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, parameter {tuple(p.shape)}")
        return (mask != 0).to(device=p.device)

    def _current_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        return {p: s["mask"] for p, s in self.state.items() if "mask" in s}

    def _plan(
        self,
        masks: Mapping[torch.Tensor, torch.Tensor],
        keep: Mapping[torch.Tensor, SlidingWindow] | None = None,
    ) -> Plan:
        """Lay out the trainable parameters and build their windows (per-tensor windows in
        ``keep`` are reused); checks the memory first and changes nothing."""
        params, groups, others, other_groups = [], [], [], []
        for gi, group in enumerate(self.param_groups):
            windowed = self._windowed(group, gi)
            for p in group["params"]:
                if p.requires_grad:
                    (params if windowed else others).append(p)
                    (groups if windowed else other_groups).append(gi)
        name = type(self).__name__
        mesh = self._fsdp_mesh(params + others)
        if mesh is not None and masks:
            raise ValueError(f"{name}: masks are not supported with FSDP2 (DTensor) parameters")
        if not params:
            if others:
                raise ValueError(
                    f"{name} got no parameter outside the orthogonalized groups; the rule needs "
                    "at least one windowed parameter (for Muon alone use torch.optim.Muon)"
                )
            raise ValueError(f"{name} got no trainable coordinates (no parameter requires grad)")
        devices = {p.device for p in params + others}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters must live on one device, got {sorted(map(str, devices))}"
            )
        device = devices.pop()
        dtypes = {p.dtype for p in params}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        layout = FlatLayout(
            [str(i) for i in range(len(params))],  # positions: optimizers hold no names
            [p.shape if mesh is None else local(p).shape for p in params],  # FSDP2: shards
            [masks.get(p) for p in params],
            index_device=device,
        )
        segments, offset = list(layout.segments), layout.dim
        if offset == 0 and mesh is None:
            raise ValueError(f"{name} got no trainable coordinates (every entry is masked)")
        sizes = [s.size for s in segments]
        members = self._window_members(params)
        cfg = self.cfg
        check_fits(
            self.required_bytes(
                sizes, windows=len(members), unwindowed=[p.numel() for p in others]
            ),  # the unwindowed (orthogonalized) matrices whole: FSDP2 gathers them
            f"{name} over {offset} coordinates in {len(sizes)} tensors with "
            f"{self._describe_windows(offset)} (windows, their float64 m x m matrices, the "
            "rule's state and the step's buffers)",
            cfg.memory_budget,
            device,
            hint="use a smaller window (ngrads), window_dtype=torch.bfloat16, or one top-k "
            "window (window_scope='model', layout='topk', a small topk)",
        )
        keep = keep or {}
        windows = []
        for member in members:
            p = params[member[0]]
            if len(member) == 1 and p in keep:
                windows.append(keep[p])
            else:
                size, shapes = sum(sizes[i] for i in member), [params[i].shape for i in member]
                windows.append(self._make_window(size, device, mesh, shapes))
        return Plan(
            params, groups, segments, offset, device, dtype, windows, mesh, members, others,
            other_groups,
        )  # fmt: skip

    def _windowed(self, group: Mapping[str, Any], index: int) -> bool:
        """Whether a group's parameters are stepped through the windows (all, by default)."""
        return True

    def _kept_tensors(self, windowed: bool) -> tuple[str, ...]:
        """The per-parameter tensors a windowed (or, with ``windowed=False``, an unwindowed)
        parameter may hold: a saved entry with any other is refused (all of
        ``param_tensors`` by default)."""
        return self.param_tensors

    def _window_members(self, params: list[torch.Tensor]) -> list[list[int]]:
        """Which parameters each window covers: one window for the model, or one per tensor,
        where tensors of fewer than ``share_below`` entries (global sizes, so that every FSDP2
        rank agrees) share one window placed after the others."""
        if self.window_scope == "model":
            return [list(range(len(params)))]
        below = int(getattr(self.cfg, "share_below", 1))
        big = [[i] for i, p in enumerate(params) if p.numel() >= below]
        small = [i for i, p in enumerate(params) if p.numel() < below]
        return big + ([small] if small else [])

    def _fsdp_mesh(self, params: list[torch.Tensor]) -> Any:
        """The 1-D device mesh of FSDP2 parameters (None for plain tensors). Any placement other
        than FSDP2's ``(Shard(0),)`` on one 1-D mesh is refused by name (before anything
        changes)."""
        dtensor = _dtensor_type()
        if dtensor is None or not any(isinstance(p, dtensor) for p in params):
            return None
        from torch.distributed.tensor import Shard

        name, mesh = type(self).__name__, None
        for i, p in enumerate(params):
            what = f"{name}: parameter #{i} (shape {tuple(p.shape)})"
            if not isinstance(p, dtensor):
                raise ValueError(
                    f"{what} is a plain tensor while others are DTensors; every parameter must "
                    "be sharded by FSDP2 (fully_shard the root module too)"
                )
            pm = p.device_mesh
            if pm.ndim != 1:
                raise ValueError(
                    f"{what} lives on a {pm.ndim}-D device mesh {tuple(pm.shape)}; only FSDP2's "
                    "(Shard(0),) on a 1-D mesh is supported (not HSDP, tensor or 2-D parallel)"
                )
            if tuple(p.placements) != (Shard(0),) or p.dim() == 0:
                raise ValueError(
                    f"{what} has placements {tuple(p.placements)}; only FSDP2's (Shard(dim=0),) "
                    "is supported (not tensor parallel, Replicate or Partial)"
                )
            if mesh is None:
                mesh = pm
            elif pm != mesh:
                raise ValueError(f"{what} lives on another device mesh than parameter #0")
        if getattr(self.cfg, "process_group", None) is not None:
            raise ValueError(
                f"{name}: process_group shards plain (DDP) parameters; FSDP2 parameters bring "
                "their own device mesh, leave process_group unset"
            )
        return mesh

    def _describe_windows(self, dim: int) -> str:
        cfg = self.cfg
        if cfg.layout == "topk":
            return f"one top-k window of {cfg.ngrads} rows x {resolve_k(cfg.topk, dim)} entries"
        return f"{self.window_scope}-wide windows of {cfg.ngrads} gradients"

    def _make_window(
        self, dim: int, device: torch.device, mesh: Any = None, shapes: Any = None
    ) -> SlidingWindow:
        cfg = self.cfg
        full = dim if mesh is None else sum(math.prod(s) for s in shapes)
        return make_window(
            dim,
            cfg.ngrads,
            self._window_damp(),
            layout=cfg.layout,
            dtype=cfg.window_dtype,
            topk=resolve_k(cfg.topk, full) if cfg.layout == "topk" else None,
            process_group=cfg.process_group,
            device=device,
            memory_budget=cfg.memory_budget,
            mesh=mesh,
            shapes=None if mesh is None else [tuple(s) for s in shapes],
        )

    def _holders(self, plan: Plan | None = None) -> list[torch.Tensor]:
        """The parameters whose state entry holds a window, in window order."""
        plan = plan or self._layout
        return [plan.params[member[0]] for member in plan.members]

    def _install(
        self, plan: Plan, masks: Mapping[torch.Tensor, torch.Tensor], keep: bool
    ) -> None:
        """Adopt a plan: its windows go into the state; with ``keep`` every parameter's
        tensors and the step count stay, else the state starts empty. Masked entries are
        zeroed."""
        old = {p: dict(s) for p, s in self.state.items()}
        step = 0
        if keep and hasattr(self, "_layout"):
            step = old.get(self._layout.params[0], {}).get("step", 0)
        self._layout = plan
        self.state.clear()
        for p in plan.params + plan.unwindowed:
            entry = self.state[p]
            if keep:
                entry.update({k: v for k, v in old.get(p, {}).items() if k in self.param_tensors})
            if p in masks:
                entry["mask"] = masks[p]
                with torch.no_grad():
                    p.masked_fill_(~masks[p], 0.0)
        for p, window in zip(self._holders(plan), plan.windows, strict=True):
            self.state[p]["window"] = window
        self.state[plan.params[0]]["step"] = step
        if plan.mesh is not None:  # DCP loads only what the fresh state holds: all of it
            everyone = zip(
                plan.params + plan.unwindowed, plan.groups + plan.unwindowed_groups, strict=True
            )
            for p, gi in everyone:
                for key, t in self._initial_tensors(p, self.param_groups[gi], plan).items():
                    self.state[p].setdefault(key, t)

    def _initial_tensors(
        self, p: torch.Tensor, group: Mapping[str, Any], plan: Plan
    ) -> dict[str, torch.Tensor]:
        """The per-parameter tensors a rule starts from (zeros; DTensors like ``p`` under
        FSDP2), made at construction under FSDP2 so that a fresh optimizer's state dict is the
        template ``torch.distributed.checkpoint`` loads into (none by default)."""
        return {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (options checked first). Existing parameters keep their state and
        own windows; a shared or model-wide window restarts empty, since its coordinates
        change."""
        checked = dict(param_group)
        for key in self.group_options:
            if key in checked:
                checked[key] = check_group_option(checked[key], key)
        if not getattr(self, "_ready", False):
            super().add_param_group(checked)
            return
        old_groups = list(self.param_groups)
        super().add_param_group(checked)  # torch's own checks (duplicates, types)
        try:
            masks = self._current_masks()
            keep = {
                self._layout.params[member[0]]: window
                for member, window in zip(self._layout.members, self.windows, strict=True)
                if len(member) == 1 and self.window_scope == "tensor"
            }
            plan = self._plan(masks, keep)
        except BaseException:
            self.param_groups[:] = old_groups
            raise
        self._install(plan, masks, keep=True)

    # ------------------------------------------------------------------ properties
    @property
    def windows(self) -> list[SlidingWindow]:
        """The sliding windows (one per parameter, or one for the model)."""
        return [self.state[p]["window"] for p in self._holders()]

    @property
    def steps(self) -> int:
        """Steps the windows took (a step in which no windowed parameter had a gradient does not
        count, even if an unwindowed one had)."""
        return int(self.state[self._layout.params[0]]["step"])

    @property
    def state_nbytes(self) -> int:
        """Bytes of state held between steps: windows (with their m x m matrices and any
        error feedback) and the per-parameter tensors."""
        held = sum(int(w.nbytes) for w in self.windows)
        for s in self.state.values():
            for key in self.param_tensors:
                t = s.get(key)
                if isinstance(t, torch.Tensor):
                    held += local(t).numel() * t.element_size()
        return held

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step; ``closure`` re-evaluates the loss (called with grad enabled). The groups'
        options are checked before anything changes."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step(self._check_groups())
        return loss

    def _step(self, options: list[dict[str, float]]) -> None:
        """The rule's step, given every group's checked options."""
        raise NotImplementedError

    def _count_step(self) -> None:
        self.state[self._layout.params[0]]["step"] += 1

    def _check_finite(self, params: list[torch.Tensor]) -> None:
        """Refuse NaN/Inf in any gradient, naming the parameter, before anything changes (with
        FSDP2, on every rank together: one all-reduce of a flag per parameter)."""
        mesh = self._layout.mesh
        if mesh is None:
            bad = [p.grad is not None and not finite_fast(p.grad) for p in params]
        else:
            flags = torch.tensor(
                [float(p.grad is not None and not finite_fast(local(p.grad))) for p in params],
                dtype=torch.float64,
            )
            dist.all_reduce(flags, group=mesh.get_group())
            bad = (flags > 0).tolist()
        if not any(bad):
            return
        # named by its place among all the groups' parameters (the state dict's index), not by
        # its place in the layout (a rule lays the windowed parameters out first)
        p = params[bad.index(True)]
        groups = enumerate(self.param_groups)
        places = [(gi, j) for gi, g in groups for j in range(len(g["params"]))]
        i = next(k for k, q in enumerate(self._all_params()) if q is p)
        gi, j = places[i]
        raise NonFiniteGradientError(
            f"{type(self).__name__}.step: the gradient of parameter #{i} "
            f"(param_groups[{gi}]['params'][{j}], shape {tuple(p.shape)}) contains NaN or Inf; "
            "nothing was changed"
        )

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the FSDP2 mesh in place (nothing without one); returns ``t``."""
        if self._layout.mesh is not None:
            dist.all_reduce(t, group=self._layout.mesh.get_group())
        return t

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict, every window replaced by its own state dict. torch's
        state-dict post hooks run on the finished dict (windows as dicts) and may replace it."""
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = self._packed_state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks
        for hook in hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _packed_state_dict(self) -> dict[str, Any]:
        """The state dict before torch's post hooks (a rule adds its own fields here)."""
        sd = super().state_dict()
        sd["state"] = {
            index: {**entry, "window": entry["window"].state_dict()}
            if "window" in entry
            else entry
            for index, entry in sd["state"].items()
        }
        return sd

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Check every field of a saved state against this optimizer; return what to install.
        Raises naming the field; changes nothing (a new layout's windows are built, unused,
        when the saved masks differ from the current ones)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
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
            for key in self.group_options:
                if key not in saved:
                    raise KeyError(f"state is missing the field param_groups[{gi}][{key!r}]")
                check_group_option(saved[key], f"param_groups[{gi}][{key!r}]", key)
            ids.extend(saved["params"])
        by_id = dict(zip(ids, self._all_params(), strict=True))
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError("state_dict['state'] must be a mapping")
        masks: dict[torch.Tensor, torch.Tensor] = {}
        for pid, entry in saved_state.items():
            if pid not in by_id:
                raise ValueError(f"state[{pid!r}] names no parameter of this optimizer")
            if not isinstance(entry, Mapping):
                raise TypeError(f"state[{pid!r}] must be a mapping")
            if "mask" in entry:
                p, mask = by_id[pid], entry["mask"]
                if not self.supports_masks:
                    raise ValueError(f"state[{pid!r}] has a mask; {type(self).__name__} has none")
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                    raise TypeError(f"state[{pid!r}]['mask'] must be a bool tensor")
                if tuple(mask.shape) != tuple(p.shape):
                    raise ValueError(
                        f"state[{pid!r}]['mask'] has shape {tuple(mask.shape)}, the parameter "
                        f"{tuple(p.shape)}"
                    )
                masks[p] = mask.to(p.device)
        current = self._current_masks()
        same_layout = {id(p) for p in masks} == {id(p) for p in current} and all(
            torch.equal(masks[p], current[p]) for p in masks
        )
        plan = self._layout if same_layout else self._plan(masks)
        holders = {id(p): w for p, w in zip(self._holders(plan), plan.windows, strict=True)}
        pid_of = {id(p): pid for pid, p in by_id.items()}
        anchor = pid_of[id(plan.params[0])]
        tensors: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        windows: list[tuple[SlidingWindow, Mapping[str, Any]]] = []
        laid_out = {id(p) for p in plan.params}
        for pid, entry in saved_state.items():
            p = by_id[pid]
            kept = self._kept_tensors(id(p) in laid_out)
            allowed = (*kept, "mask")
            allowed += ("window",) if id(p) in holders else ()
            allowed += ("step", *self.anchor_fields) if pid == anchor else ()
            for key in entry:
                if key not in allowed:
                    hint = self._window_hint() if key == "window" else ""
                    raise ValueError(f"state[{pid!r}] has an unexpected field {key!r}{hint}")
            for key in kept:
                if key in entry:
                    self._check_param_tensor(entry[key], p, f"state[{pid!r}][{key!r}]", plan)
                    tensors.setdefault(p, {})[key] = entry[key]
        for p in self._holders(plan):
            pid = pid_of[id(p)]
            entry = saved_state.get(pid, {})
            if "window" not in entry:
                raise KeyError(
                    f"state is missing the field state[{pid!r}]['window']{self._window_hint()}"
                )
            window = holders[id(p)]
            try:
                window.check_state(entry["window"])
            except (KeyError, ValueError, TypeError) as exc:
                msg = exc.args[0] if exc.args else str(exc)
                raise type(exc)(f"state[{pid!r}]['window']: {msg}{self._window_hint()}") from None
            windows.append((window, entry["window"]))
        step = saved_state.get(anchor, {}).get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state[{anchor!r}]['step'] must be an int >= 0, got {step!r}")
        return {
            "plan": plan,
            "masks": masks,
            "tensors": tensors,
            "windows": windows,
            "step": step,
            "extra": saved_state.get(anchor, {}),
        }

    def _window_hint(self) -> str:
        """What a saved state's windows that do not match this optimizer's may come from
        (appended to the refusal; none by default)."""
        return ""

    def _check_param_tensor(self, t: Any, p: torch.Tensor, field: str, plan: Plan) -> None:
        """A saved per-parameter tensor must be finite, of the parameter's shape and of the
        dtype this rule keeps (:meth:`_state_dtype`)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{field} must be a tensor")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{field} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
        dtype = self._state_dtype(plan)
        if t.dtype != dtype:
            raise TypeError(f"{field} has dtype {t.dtype}, this optimizer keeps {dtype}")
        if plan.mesh is not None:
            dtensor = _dtensor_type()
            if not isinstance(t, dtensor) or tuple(t.placements) != tuple(p.placements):
                raise TypeError(f"{field} must be a DTensor sharded like the parameter (Shard(0))")
            if tuple(t.to_local().shape) != tuple(local(p).shape):
                raise ValueError(
                    f"{field} has local shape {tuple(t.to_local().shape)}, the parameter's "
                    f"shard {tuple(local(p).shape)}"
                )
        if not finite_fast(local(t)):
            raise ValueError(f"{field} contains NaN or Inf")

    def _state_dtype(self, plan: Plan) -> torch.dtype:
        """The dtype of the per-parameter tensors this rule keeps."""
        return torch.float32

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same parameters and options). All-or-nothing:
        every field is checked first, and a refusal raises one error naming the field with
        the optimizer and the given state unchanged. Once loaded, the state's tensors that
        are already as this optimizer keeps them (moments of its dtype on the parameter's
        device, a full window's rows and error vector, contiguous, in memory this process
        owns: :func:`~mfac.operators.memory.adoptable`) are adopted, not copied, as
        ``torch.optim`` adopts them: later steps write into them, and a resume holds one copy
        of the window. Load a copy (``copy.deepcopy``) to keep the given state, e.g. when it
        comes from another live optimizer. Tensors mapped from a file (``torch.load(...,
        mmap=True)``) are copied.
        torch's load pre hooks see the given dict (state included) before anything is checked,
        and the dict a hook returns is the one loaded; the post hooks run once everything is
        installed. Under FSDP2 every rank refuses together (a rank's shard may be the bad one:
        one all-reduce of a flag)."""
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # shallow copy, as torch.optim does
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        mesh = self._layout.mesh
        try:
            todo = self._check_state_dict(state_dict)
            self._load_extra_check(todo["extra"])
            failed: BaseException | None = None
        except (KeyError, ValueError, TypeError) as exc:
            if mesh is None:
                raise
            failed = exc
        if mesh is not None:
            flag = torch.tensor([0.0 if failed is None else 1.0], dtype=torch.float64)
            dist.all_reduce(flag, group=mesh.get_group())
            if failed is not None:
                raise failed
            if float(flag) > 0:
                raise ValueError(
                    "another rank refused its shard of the state (its error names the field); "
                    "nothing was changed"
                )
        hooks = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:  # the groups' options (the hooks run here, around everything)
            super().load_state_dict({**state_dict, "state": {}})
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks[0]
            self._optimizer_load_state_dict_post_hooks = hooks[1]
        plan = todo["plan"]
        self._install(plan, todo["masks"], keep=False)
        for p, mask in todo["masks"].items():
            self.state[p]["mask"] = mask.clone()
        for window, saved in todo["windows"]:
            window.load_state_dict(saved)
        mappings, taken = FileMappings(), set()
        for p, entries in todo["tensors"].items():
            for key, t in entries.items():
                # adopted as torch.optim adopts; one tensor given twice is adopted once
                own = plan.mesh is None and adoptable(t, p.device, mappings)
                if own and t.data_ptr() not in taken:
                    taken.add(t.data_ptr())
                    self.state[p][key] = t
                else:
                    self.state[p][key] = t.to(device=p.device, copy=True)
        self.state[plan.params[0]]["step"] = todo["step"]
        self._load_extra(todo["extra"])
        for post_hook in hooks[1].values():
            post_hook(self)

    def _load_extra_check(self, entry: Mapping[str, Any]) -> None:
        """Check a rule's own fields of the first parameter's saved entry (none by default)."""

    def _load_extra(self, entry: Mapping[str, Any]) -> None:
        """Install a rule's own fields of the first parameter's saved entry."""


__all__ = ["Plan", "WindowOptimizer", "local"]
