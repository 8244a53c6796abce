"""Gradient collection for the Fisher-based pruners: m mini-batch gradients of
``loss_fn(model, batch)``, model in eval mode, restricted to the prunable still-unpruned
weights and streamed row by row into a :class:`mfac.GradientBuffer` (no second m x d copy)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..operators import GradientBuffer
from ._layers import Layout

LossFn = Callable[[nn.Module, object], torch.Tensor]


def progress_bar(iterable: Iterable[object] | None = None, **kwargs: object) -> Any:
    """A tqdm bar when tqdm is installed (an optional dependency), else a silent stand-in."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the dev/bench extras

        class _Silent:
            def __init__(self, it: Iterable[object] | None) -> None:
                self.it = it

            def __iter__(self) -> Iterator[object]:
                return iter(self.it or ())

            def update(self, _n: int = 1) -> None:
                pass

            def close(self) -> None:
                pass

        return _Silent(iterable)
    return tqdm(iterable, **kwargs)


def cycle_batches(data: Iterable[object], count: int) -> Iterator[object]:
    """Yield ``count`` batches, starting ``data`` over when it runs out (it must be re-iterable
    then: a generator that is exhausted raises a clear error)."""
    produced = 0
    while produced < count:
        before = produced
        for batch in data:
            yield batch
            produced += 1
            if produced == count:
                return
        if produced == before:
            raise ValueError(
                f"data ran out after {produced} batches (needed {count}); pass a re-iterable "
                "loader (a list or DataLoader) so it can be started over"
            )


@contextmanager
def eval_with_grads(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Eval mode and requires_grad on ``params`` for the duration; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def checked_loss(loss: object, index: int) -> torch.Tensor:
    """The loss as a finite scalar tensor, or a clear error."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(
            f"loss_fn returned a non-finite loss ({value}) on batch {index}; the model was left "
            "untouched"
        )
    return loss


def iter_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[object],
    layout: Layout,
    num_grads: int,
    *,
    progress: bool = True,
    desc: str = "gradients",
    per_sample: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield ``num_grads`` flat gradient rows (layout order, float32 on the CPU): one per batch,
    or with ``per_sample`` one per sample of each batch (``torch.func`` vmap over the batch's
    leading dimension; every tensor in the batch must share it)."""
    params = [t.param for t in layout.targets]
    with eval_with_grads(model, params):
        bar = progress_bar(total=num_grads, desc=desc, disable=not progress)
        done = 0
        for i, batch in enumerate(cycle_batches(data, num_grads)):
            if per_sample:
                grads, losses = _per_sample_grads(model, loss_fn, batch, params)
                for k in range(losses.numel()):
                    checked_loss(losses[k], i)
                rows = [layout.gather([g[k] for g in grads]) for k in range(losses.numel())]
            else:
                loss = checked_loss(loss_fn(model, batch), i)
                rows = [layout.gather(torch.autograd.grad(loss, params, allow_unused=True))]
            for row in rows[: num_grads - done]:
                done += 1
                bar.update(1)
                yield row
            if done == num_grads:
                break
        bar.close()


class _Objective(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that torch.func can swap its parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: object) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _per_sample_grads(
    model: nn.Module, loss_fn: LossFn, batch: object, params: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients (B, *shape) of ``params`` and the B per-sample losses."""
    from torch.func import functional_call, grad_and_value, vmap
    from torch.utils._pytree import tree_map

    objective = _Objective(model, loss_fn)
    named = dict(objective.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    wanted = [by_id[id(p)] for p in params]
    fixed = {n: p.detach() for n, p in named.items()}
    buffers = dict(objective.named_buffers())

    def one(free: dict[str, torch.Tensor], sample: object) -> torch.Tensor:
        single = tree_map(lambda x: x.unsqueeze(0), sample)
        return functional_call(objective, ({**fixed, **free}, buffers), (single,))

    free = {n: fixed[n] for n in wanted}
    grads, losses = vmap(grad_and_value(one), in_dims=(None, 0))(free, batch)
    return [grads[n] for n in wanted], losses


def collect_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[object],
    layout: Layout,
    num_grads: int,
    *,
    dtype: torch.dtype = torch.float32,
    memory_budget: int | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    per_sample: bool = False,
) -> GradientBuffer:
    """An m x d :class:`mfac.GradientBuffer` (RAM, or memory-mapped past ``memory_budget``)
    filled with ``num_grads`` gradients of the layout's coordinates."""
    buf = GradientBuffer(
        num_grads, layout.dim, dtype, memory_budget=memory_budget, spill_dir=spill_dir
    )
    rows = iter_gradients(
        model, loss_fn, data, layout, num_grads, progress=progress, per_sample=per_sample
    )
    for row in rows:
        buf.append(row)
    return buf


def squared_gradient_mean(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[object],
    layout: Layout,
    num_grads: int,
    *,
    progress: bool = True,
    per_sample: bool = False,
) -> torch.Tensor:
    """diag of the empirical Fisher, (1/m) sum_i g_i^2, in float64 (no buffer kept)."""
    acc = torch.zeros(layout.dim, dtype=torch.float64)
    rows = iter_gradients(
        model, loss_fn, data, layout, num_grads, progress=progress, desc="fisher diag",
        per_sample=per_sample,
    )  # fmt: skip
    for row in rows:
        acc.add_(row.to(torch.float64).square())
    return acc / num_grads
