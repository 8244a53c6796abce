"""Calibration: statistics of the pruned layers' inputs, gathered stage by stage for the
layer-wise methods.

Layer-wise methods (SparseGPT, Wanda) and the OWL budget need, for every pruned layer, a
statistic of its inputs X (tokens x cols) over the calibration batches: the Gram X^T X
(SparseGPT's Hessian is 2 X^T X / n) or the squared column norms ||X_j||^2 (Wanda). Two
schedules:

- one pass: all statistics from one run of the dense model over the batches;
- sequential: the stages (a transformer block, see :func:`stages`) are pruned one after
  another, and each stage's statistics come from the outputs of the already-pruned stages before
  it. The inputs of the first stage are captured once; each stage is then run on its own
  (statistics pass, prune, output pass), so the whole schedule costs about two forward passes of
  the model instead of one per stage. When the stages do not form a chain (stage i's output is
  stage i+1's input, checked on one batch), the model is re-run in full for every stage.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import Target

F64 = torch.float64
ForwardFn = Callable[[nn.Module, object], object]
#: Keyword arguments of Hugging Face decoder blocks that carry a key/value cache: a captured
#: stage call is replayed without it (the cache would grow at every replay).
_CACHE_KWARGS = {"cache": None, "past_key_values": None, "past_key_value": None, "layer_past": None}


def calibration_batches(data: Iterable[object], count: int) -> list[object]:
    """The first ``count`` batches of ``data``; fewer get a warning (the statistics then come
    from what there is; repeating batches would add no information), none an error."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"calib_batches must be an integer >= 1, got {count!r}")
    batches = list(islice(iter(data), count))
    if not batches:
        raise ValueError("calibration data is empty: pass at least one batch")
    if len(batches) < count:
        warnings.warn(
            f"calibration data holds {len(batches)} batches, fewer than the {count} requested; "
            f"using {len(batches)}",
            UserWarning,
            stacklevel=3,
        )
    return batches


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (tokens, cols) input matrix of a Linear or Conv2d (im2col patches) layer."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError("layer-wise pruning supports Conv2d with groups=1, numeric padding")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    kind = type(module).__name__
    raise ValueError(f"layer-wise pruning supports nn.Linear and nn.Conv2d, got {kind}")


def check_layerwise_targets(targets: Sequence[Target]) -> None:
    """Refuse layers a layer-wise pruner cannot see the inputs of, before anything runs."""
    for t in targets:
        m = t.module
        if isinstance(m, nn.Linear):
            continue
        if (
            isinstance(m, nn.Conv2d)
            and m.groups == 1
            and not isinstance(m.padding, str)
            and (m.padding_mode == "zeros")
        ):
            continue
        raise ValueError(
            f"layer {t.name} ({type(m).__name__}) is not supported by layer-wise pruning "
            "(nn.Linear, or nn.Conv2d with groups=1 and numeric zero padding); exclude it"
        )


def module_key(module: nn.Module) -> tuple[object, ...]:
    """What the input statistic depends on besides the input: Linear layers share it; a Conv2d's
    patches depend on its geometry."""
    if isinstance(module, nn.Conv2d):
        return ("conv", module.kernel_size, module.dilation, module.padding, module.stride)
    return ("linear",)


class InputStats:
    """Forward hooks accumulating, per layer, the float64 Gram X^T X (``kind="gram"``) or the
    squared column norms sum_t X_tj^2 (``kind="sqnorm"``) of its inputs, and the token count."""

    def __init__(self, targets: Sequence[Target], kind: str) -> None:
        if kind not in ("gram", "sqnorm"):
            raise ValueError(f"kind must be 'gram' or 'sqnorm', got {kind!r}")
        self.kind = kind
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._last: tuple[torch.Tensor, tuple[object, int], torch.Tensor, int] | None = None
        self.handles = [t.module.register_forward_hook(self._hook(t.name)) for t in targets]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: object) -> None:
            inp = args[0]
            last = self._last
            if (
                last is not None
                and last[0] is inp
                and last[1] == (module_key(module), inp._version)
            ):
                stat, rows = last[2], last[3]  # q/k/v (gate/up) read one input: one Gram
            else:
                x = layer_inputs(module, inp.detach()).float()
                stat = (x.T @ x).to(F64) if self.kind == "gram" else x.to(F64).square().sum(0)
                rows = x.shape[0]
                self._last = (inp, (module_key(module), inp._version), stat, rows)
            if name in self.sums:
                self.sums[name] += stat
                self.counts[name] += rows
            else:
                self.sums[name] = stat.clone()
                self.counts[name] = rows

        return hook

    def get(self, name: str) -> tuple[torch.Tensor, int]:
        """(summed statistic, token count) of layer ``name``."""
        if name not in self.sums:
            raise ValueError(f"layer {name} saw no calibration input (is it used in forward?)")
        return self.sums[name], self.counts[name]

    def remove(self) -> None:
        """Detach the hooks (and drop the cached last input)."""
        for h in self.handles:
            h.remove()
        self._last = None


def stages(targets: Sequence[Target]) -> list[list[Target]]:
    """The stages, the groups pruned together in sequential mode: layers sharing the name prefix
    up to the first numeric component ("model.layers.3" for a transformer block, "0" in a
    Sequential)."""
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(stage_name(t.name), []).append(t)
    return list(groups.values())


def stage_name(name: str) -> str:
    """The stage a layer belongs to (see :func:`stages`)."""
    parts = name.split(".")
    cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    return ".".join(parts[: cut + 1])


class _Stop(Exception):
    """Raised by the capture hook to end a calibration forward at the first stage."""


def _first(out: object) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _is_chain(
    model: nn.Module, stage_modules: list[nn.Module], batch: object, forward: ForwardFn
) -> bool:
    """True when, on ``batch``, every stage runs once and stage i's output is stage i+1's
    first input (so the stages can be replayed one after another on captured inputs)."""
    inputs: dict[int, list[torch.Tensor | None]] = {i: [] for i in range(len(stage_modules))}
    outputs: dict[int, list[torch.Tensor | None]] = {i: [] for i in range(len(stage_modules))}
    handles = []
    for i, b in enumerate(stage_modules):
        handles.append(
            b.register_forward_pre_hook(
                lambda _m, a, i=i: inputs[i].append(a[0] if a else None)
            )
        )
        handles.append(b.register_forward_hook(lambda _m, _a, o, i=i: outputs[i].append(_first(o))))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    if any(len(inputs[i]) != 1 or len(outputs[i]) != 1 for i in inputs):
        return False
    for i in range(len(stage_modules) - 1):
        a, b = outputs[i][0], inputs[i + 1][0]
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return False
        if a.shape != b.shape or not torch.equal(a, b):
            return False
    return isinstance(inputs[0][0], torch.Tensor)


def _capture(
    model: nn.Module, stage: nn.Module, batches: list[object], forward: ForwardFn
) -> list[tuple[tuple[object, ...], dict[str, object]]]:
    """(args, kwargs) of ``stage``'s call for every batch; the forward stops at the stage."""
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def hook(_m: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        kw = {k: (_CACHE_KWARGS[k] if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
        if "use_cache" in kw:
            kw["use_cache"] = False
        calls.append((args, kw))
        raise _Stop

    handle = stage.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                forward(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    targets: Sequence[Target],
    batches: list[object],
    forward: ForwardFn,
    kind: str,
    prune_group: Callable[[list[Target], InputStats], None],
    *,
    sequential: bool,
    timings: dict[str, float],
    info: dict[str, object] | None = None,
    on_stage: Callable[[], None] | None = None,
) -> None:
    """Gather ``kind`` statistics and call ``prune_group(group, stats)`` for every group of
    ``targets``: one group after a single dense pass, or (``sequential``) one group per stage,
    with inputs propagated through the already-pruned stages. ``timings['collect']`` adds the
    calibration passes; ``info['schedule']`` says which schedule ran."""
    was_training = model.training
    model.eval()
    try:
        if not sequential:
            t0 = time.perf_counter()
            rec = InputStats(targets, kind)
            try:
                for batch in batches:
                    forward(model, batch)
            finally:
                rec.remove()
            timings["collect"] = timings.get("collect", 0.0) + time.perf_counter() - t0
            prune_group(list(targets), rec)
            if info is not None:
                info["schedule"] = "one-pass"
            return
        groups = stages(targets)
        modules = dict(model.named_modules())
        stage_modules = [modules[stage_name(g[0].name)] for g in groups]
        t0 = time.perf_counter()
        chain = _is_chain(model, stage_modules, batches[0], forward)
        calls = _capture(model, stage_modules[0], batches, forward) if chain else []
        timings["collect"] = timings.get("collect", 0.0) + time.perf_counter() - t0
        if info is not None:
            info["schedule"] = "sequential-blocks" if chain else "sequential-full-passes"
        for group, stage in zip(groups, stage_modules, strict=True):
            t0 = time.perf_counter()
            rec = InputStats(group, kind)
            try:
                if chain:
                    for args, kwargs in calls:
                        stage(*args, **kwargs)
                else:
                    for batch in batches:
                        forward(model, batch)
            finally:
                rec.remove()
            timings["collect"] += time.perf_counter() - t0
            prune_group(group, rec)
            if chain and stage is not stage_modules[-1]:  # the last stage's outputs feed nothing
                t0 = time.perf_counter()
                calls = [
                    ((_first(stage(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in calls
                ]
                timings["collect"] += time.perf_counter() - t0
            if on_stage is not None:
                on_stage()
    finally:
        model.train(was_training)
