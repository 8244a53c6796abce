"""Calibration: statistics of the pruned layers' inputs, gathered stage by stage for the
layer-wise methods.

Layer-wise methods (SparseGPT, Wanda) and the OWL budget need, for every pruned layer, a
statistic of its inputs X (tokens x cols) over the calibration batches: the Gram X^T X
(SparseGPT's Hessian is 2 X^T X / n) or the squared column norms ||X_j||^2 (Wanda). Two
schedules:

- one pass: all statistics from one run of the dense model over the batches;
- sequential: the stages (a transformer block, see :func:`stages`) are pruned one after
  another, and each stage's statistics come from the outputs of the already-pruned stages before
  it. The inputs of the first block are captured once; each block is then run on its own
  (statistics pass, prune, output pass), so the stack costs about two forward passes of the
  model instead of one per stage. Layers outside the stack (an LM head, a pooler) are pruned
  after it (or before it, for an input projection) from one forward each of what lies outside
  the stack (the blocks return their stored outputs). Several stacks (an encoder-decoder's
  encoder and decoder) are replayed one after the other, each from a capture in which the
  stacks before it return their stored outputs; arguments a block receives from the previous
  block's output besides the hidden states (T5's position bias, computed by the first block)
  are threaded through the replay. When the blocks do not form a chain (stage i's output is
  stage i+1's input, checked on one batch), the model is re-run in full for every stage, with
  a warning saying why (see :func:`plan`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice, pairwise

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import PRUNABLE, Target

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
    Sequential); a layer outside any numbered container ("lm_head") is a stage of its own."""
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(stage_name(t.name), []).append(t)
    return list(groups.values())


def stage_name(name: str) -> str:
    """The stage a layer belongs to (see :func:`stages`)."""
    parts = name.split(".")
    cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    return ".".join(parts[: cut + 1])


def _in_stack(name: str) -> bool:
    """Whether a stage is a member of a numbered stack (a block), not a lone layer."""
    return any(p.isdigit() for p in name.split("."))


class _Stop(Exception):
    """Raised by the capture hook to end a calibration forward at the first stage."""


def _first(out: object) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    values = getattr(out, "values", None)
    if callable(values) and hasattr(out, "keys"):  # a ModelOutput: its first field
        first = next(iter(values()), None)
        return first if isinstance(first, torch.Tensor) else None
    return None


#: Keyword names a block may receive its hidden states under (when not positional).
_HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x", "input", "inputs", "inputs_embeds")


def _slot(args: tuple[object, ...], kwargs: dict[str, object]) -> int | str | None:
    """Where a stage call carries its hidden states: positional 0, or a keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return 0
    return next((k for k in _HIDDEN_KWARGS if isinstance(kwargs.get(k), torch.Tensor)), None)


Call = tuple[tuple[object, ...], dict[str, object]]


def _argument(call: Call, key: int | str) -> object:
    """A call's positional (int) or keyword (str) argument."""
    args, kwargs = call
    return args[key] if isinstance(key, int) else kwargs[key]


def _next_call(call: Call, slot: int | str, out: object, threaded: dict[int | str, int]) -> Call:
    """The next block's call: ``call`` with the hidden states (at ``slot``) replaced by the
    block's output ``out`` and every ``threaded`` argument by its element of ``out``."""
    # threaded keys index a tuple or list output (the outputs _threads searched)
    parts = out if isinstance(out, (tuple, list)) else (out,)
    values = {slot: _first(out), **{key: parts[j] for key, j in threaded.items()}}
    args, kwargs = call
    args = tuple(values.get(k, a) for k, a in enumerate(args))
    return args, {k: values.get(k, v) for k, v in kwargs.items()}


@dataclass
class Plan:
    """How sequential calibration runs: ``stack`` (the chained stages, in call order), the
    stages outside it that run ``before`` or ``after`` it, and the hidden-states ``slot`` of a
    stage call; ``reason`` says why the model must be re-run in full for every stage instead
    (``None``: it need not). ``starts``: where in ``stack`` each stack of blocks begins (an
    encoder-decoder has two); ``threaded``: per stack, the arguments (position or keyword) a
    block takes from the previous block's output tuple besides the hidden states, and their
    index there (each stack's own: an encoder's and a decoder's blocks lay out their outputs
    differently)."""

    stack: list[list[Target]]
    before: list[list[Target]]
    after: list[list[Target]]
    slot: int | str | None = 0
    reason: str | None = None
    starts: list[int] = field(default_factory=lambda: [0])
    threaded: list[dict[int | str, int]] = field(default_factory=lambda: [{}])


def plan(
    model: nn.Module, groups: list[list[Target]], batch: object, forward: ForwardFn
) -> Plan:
    """Trace one forward of ``batch`` and decide the schedule: the stages inside numbered stacks
    must each run once, in a chain within their stack (stage i's output is stage i+1's input,
    and every other argument of stage i+1 is stage i's or comes from stage i's output); the
    stacks (an encoder's, then a decoder's) may follow each other with work between them; the
    stages outside (an LM head, a pooler, an input projection) must each run wholly before or
    wholly after all the stacks."""
    modules = dict(model.named_modules())
    stage_modules = [modules[stage_name(g[0].name)] for g in groups]
    #: per stage, one [call order, hidden-states slot, input, output, (args, kwargs), the
    #: whole output] per call
    calls: dict[int, list[list[object]]] = {i: [] for i in range(len(groups))}
    order = [0]
    handles = []

    def pre(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            slot = _slot(args, kwargs)
            value = None if slot is None else _argument((args, kwargs), slot)
            calls[i].append([order[0], slot, value, None, (args, kwargs)])
            order[0] += 1

        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: object, out: object) -> None:
            calls[i][-1][3] = _first(out)
            calls[i][-1].append(out)

        return hook

    for i, m in enumerate(stage_modules):
        handles.append(m.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(m.register_forward_hook(post(i)))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    names = [stage_name(g[0].name) for g in groups]
    for i, name in enumerate(names):
        if len(calls[i]) != 1:
            kind = f"runs {len(calls[i])} times" if calls[i] else "does not run"
            return Plan([], [], [], reason=f"stage {name} {kind} in one forward pass")
    step = {i: int(calls[i][0][0]) for i in calls}  # type-narrowed copies of the trace
    ranked = sorted(range(len(groups)), key=lambda i: step[i])
    stack = [i for i in ranked if _in_stack(names[i])]
    if not stack:
        return Plan([], [], [], reason="no stack of numbered blocks among the pruned layers")
    first, last = step[stack[0]], step[stack[-1]]
    outside = [i for i in ranked if not _in_stack(names[i])]
    between = [names[i] for i in outside if first < step[i] < last]
    if between:
        return Plan([], [], [], reason=f"{between[0]} runs between the blocks")
    slot = calls[stack[0]][0][1]
    if not isinstance(slot, (int, str)) or any(calls[i][0][1] != slot for i in stack):
        return Plan([], [], [], reason=f"the inputs of {names[stack[0]]} are not one tensor")
    # the stacks: runs of blocks of one container ("encoder.block", then "decoder.block")
    starts = [k for k in range(len(stack)) if k == 0 or _container(names[stack[k - 1]]) != (
        _container(names[stack[k]]))]  # fmt: skip
    pairs = [(a, b) for k, (a, b) in enumerate(pairwise(stack)) if k + 1 not in starts]
    for a, b in pairs:
        out, nxt = calls[a][0][3], calls[b][0][2]
        if not isinstance(out, torch.Tensor) or not isinstance(nxt, torch.Tensor) or (
            out.shape != nxt.shape or not torch.equal(out, nxt)
        ):
            return Plan([], [], [], reason=(
                f"the output of {names[a]} is not the input of {names[b]} (work between the "
                "blocks)"
            ))  # fmt: skip
    threaded: list[dict[int | str, int]] = []
    for begin, end in pairwise([*starts, len(stack)]):  # each stack threads its own
        own = list(pairwise(stack[begin:end]))
        traced = [(calls[a][0][4], calls[a][0][5], calls[b][0][4]) for a, b in own]
        found, other = _threads(traced, slot)
        if other is not None:
            k, what = other
            a, b = own[k]
            return Plan([], [], [], reason=(
                f"{names[b]} gets another {what} than {names[a]}, which {names[a]}'s output "
                "does not carry"
            ))  # fmt: skip
        threaded.append(found)
    return Plan(
        stack=[groups[i] for i in stack],
        before=[groups[i] for i in outside if step[i] < first],
        after=[groups[i] for i in outside if step[i] > last],
        slot=slot,
        starts=starts,
        threaded=threaded,
    )


def _container(stage: str) -> str:
    """The stack a block belongs to: its stage name without the block's number ("encoder.block"
    for "encoder.block.3"); a top-level block ("3", in an ``nn.Sequential``) is a stack of its
    own, captured from a forward of its own."""
    return stage.rsplit(".", 1)[0]


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
        )  # fmt: skip
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # objects without a plain equality
        return False


def _threads(
    traced: list[tuple[Call, object, Call]], slot: int | str
) -> tuple[dict[int | str, int], tuple[int, str] | None]:
    """From consecutive blocks' (call of a, output of a, call of b): the arguments besides the
    hidden states that b takes from a's output tuple (argument -> index there, found by
    identity: the stack passes the very tensor on, as T5 passes its position bias), so that a
    replay derives each block's call from the previous one. ``(pair, what)`` names the first
    argument that differs and is not in the output (None when all are accounted for)."""
    threaded: dict[int | str, int] = {}
    for verify in (False, True):  # find the threaded arguments, then check every pair
        for k, (a, out, b) in enumerate(traced):
            (a_args, a_kw), (b_args, b_kw) = a, b
            if len(a_args) != len(b_args) or set(a_kw) != set(b_kw):
                return {}, (k, "argument list")
            keys = [i for i in range(len(b_args)) if i != slot]
            keys += [key for key in b_kw if key != slot and key not in _CACHE_KWARGS]
            for key in keys:
                given = _argument(b, key)
                if key in threaded:
                    j = threaded[key]
                    if isinstance(out, (tuple, list)) and j < len(out) and _same(out[j], given):
                        continue
                elif _same(_argument(a, key), given):
                    continue
                elif not verify and isinstance(out, (tuple, list)):
                    j = next((j for j in range(1, len(out)) if out[j] is given), -1)
                    if j > 0:
                        threaded[key] = j
                        continue
                what = f"positional argument {key}" if isinstance(key, int) else (
                    f"keyword argument {key!r}")  # fmt: skip
                return {}, (k, what)
    return threaded, None


@contextmanager
def _blocks_return(stacks: list[tuple[list[nn.Module], list[object]]]) -> Iterator[None]:
    """Within the block, for every (blocks, outputs) of ``stacks``, the n-th call of each of
    the blocks returns ``outputs[n]`` (that stack's output on batch n) without computing: a
    forward of the model then runs only what lies outside these stacks."""
    blocks = [b for members, _ in stacks for b in members]
    saved = {id(b): b.__dict__.get("forward") for b in blocks}
    for b, outputs in ((b, outputs) for members, outputs in stacks for b in members):
        count = [0]

        def forward(
            *_args: object, _count: list[int] = count, _outputs: list[object] = outputs,
            **_kwargs: object,
        ) -> object:  # fmt: skip
            out = _outputs[_count[0] % len(_outputs)]
            _count[0] += 1
            return out

        vars(b)["forward"] = forward  # an instance attribute: nn.Module calls self.forward
    try:
        yield
    finally:
        for b in blocks:
            vars(b).pop("forward", None)
            if saved[id(b)] is not None:
                vars(b)["forward"] = saved[id(b)]


def _capture(
    model: nn.Module, stage: nn.Module, batches: list[object], forward: ForwardFn
) -> list[tuple[tuple[object, ...], dict[str, object]]]:
    """(args, kwargs) of ``stage``'s call for every batch; the forward stops at the stage."""
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def hook(_m: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        # the cache is dropped but ``use_cache`` kept: a block's output layout may depend on
        # it (T5 blocks in transformers 4.40 put their cache before the position bias), and
        # plan() found the threaded arguments' indices, and the stack reads the stored outputs,
        # in the layout of the traced forward
        kw = {k: (_CACHE_KWARGS[k] if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
        calls.append((args, kw))
        raise _Stop

    handle = stage.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _forward_all(model, batches, forward)
    finally:
        handle.remove()
    return calls


def _forward_all(model: nn.Module, batches: list[object], forward: ForwardFn) -> None:
    """Run every batch; a forward that a hook stops (``_Stop``) ends there."""
    for batch in batches:
        try:
            forward(model, batch)
        except _Stop:
            pass


def _stats_pass(
    model: nn.Module, group: list[Target], batches: list[object], forward: ForwardFn,
    kind: str, stop_at: nn.Module | None = None,
) -> InputStats:  # fmt: skip
    """Statistics of ``group`` from forwards of the whole model (stopped at ``stop_at``)."""
    rec = InputStats(group, kind)
    handle = None
    if stop_at is not None:
        def stop(*_a: object) -> None:
            raise _Stop

        handle = stop_at.register_forward_pre_hook(stop)
    try:
        _forward_all(model, batches, forward)
    finally:
        rec.remove()
        if handle is not None:
            handle.remove()
    return rec


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
    calibration passes; ``info['schedule']`` says which schedule ran (and
    ``info['schedule_reason']`` why, when the model had to be re-run for every stage).

    Sequential: stages outside the stacks of blocks that run before them (an input projection)
    are pruned first, from forwards stopped at the first block; then, stack after stack (an
    encoder's, a decoder's), the first block's inputs are captured once, from forwards in which
    the stacks before return their stored outputs, and the blocks replayed one by one; stages
    after the stacks (an LM head, a pooler, a classifier) are pruned last, each from one forward
    of the model in which every block returns its stack's stored output (no stack runs
    again)."""
    was_training = model.training
    model.eval()
    try:
        if not sequential:
            t0 = time.perf_counter()
            rec = _stats_pass(model, list(targets), batches, forward, kind)
            timings["collect"] = timings.get("collect", 0.0) + time.perf_counter() - t0
            prune_group(list(targets), rec)
            if info is not None:
                info["schedule"] = "one-pass"
            return
        groups = stages(targets)
        modules = dict(model.named_modules())

        def module_of(group: list[Target]) -> nn.Module:
            return modules[stage_name(group[0].name)]

        def full(group: list[Target], stop_at: nn.Module | None = None) -> None:
            t0 = time.perf_counter()
            rec = _stats_pass(model, group, batches, forward, kind, stop_at)
            timings["collect"] = timings.get("collect", 0.0) + time.perf_counter() - t0
            prune_group(group, rec)
            if on_stage is not None:
                on_stage()

        t0 = time.perf_counter()
        how = plan(model, groups, batches[0], forward)
        timings["collect"] = timings.get("collect", 0.0) + time.perf_counter() - t0
        if info is not None:
            info["schedule"] = "sequential-full-passes" if how.reason else "sequential-blocks"
            if how.reason:
                info["schedule_reason"] = how.reason
        if how.reason:
            blocks = [g for g in groups if not isinstance(module_of(g), PRUNABLE)]
            if len(blocks) > 1:  # single layers as stages (an MLP): full passes cost little
                warnings.warn(
                    f"sequential calibration re-runs the whole model for each of the "
                    f"{len(groups)} stages (cost grows with depth squared) because {how.reason}",
                    UserWarning,
                    stacklevel=4,
                )
            for group in groups:
                full(group)
            return
        for group in how.before:
            full(group, stop_at=module_of(how.stack[0]))
        slot = how.slot
        assert slot is not None
        done: list[tuple[list[nn.Module], list[object]]] = []  # replayed stacks, their outputs
        bounds = [*how.starts, len(how.stack)]
        for s, (first, end) in enumerate(pairwise(bounds)):
            t0 = time.perf_counter()
            with _blocks_return(done):  # the stacks before run no more
                calls = _capture(model, module_of(how.stack[first]), batches, forward)
            timings["collect"] += time.perf_counter() - t0
            outputs: list[object] = []
            for k in range(first, end):
                group = how.stack[k]
                stage = module_of(group)
                t0 = time.perf_counter()
                rec = InputStats(group, kind)
                try:
                    for args, kwargs in calls:
                        stage(*args, **kwargs)
                finally:
                    rec.remove()
                timings["collect"] += time.perf_counter() - t0
                prune_group(group, rec)
                t0 = time.perf_counter()
                if k + 1 < end:
                    threads = how.threaded[s]
                    calls = [_next_call(c, slot, stage(*c[0], **c[1]), threads) for c in calls]
                elif end < len(how.stack) or how.after:  # the stack's outputs, for what follows
                    outputs = [stage(*args, **kwargs) for args, kwargs in calls]
                timings["collect"] += time.perf_counter() - t0
                if on_stage is not None:
                    on_stage()
            del calls
            done.append(([module_of(g) for g in how.stack[first:end]], outputs))
        if how.after:  # the model's forward with every block returning its stored output
            with _blocks_return(done):
                for group in how.after:
                    full(group)
    finally:
        model.train(was_training)
