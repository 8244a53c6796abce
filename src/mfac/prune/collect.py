"""Gradient collection for the Fisher-based pruners: m mini-batch (or per-sample) gradients of
``loss_fn(model, batch)``, model in eval mode, restricted to the prunable still-unpruned
weights and streamed row by row into a :class:`mfac.GradientBuffer` (no second m x d copy).
The gradients come from the library's one collector, :mod:`mfac.operators.gradients`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..operators import GradientBuffer
from ..operators.gradients import LossFn, ModelGradients
from ._layers import Layout


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
    """Yield ``num_grads`` flat gradient rows (layout order, float32 on the CPU), the model in
    eval mode: one per batch, or with ``per_sample`` one per sample of each batch (``torch.func``
    vmap over the batch's leading dimension; the batch is a tuple/list or dict of tensors).
    ``data`` is started over when it runs out (`cycle_batches`)."""
    source = ModelGradients(model, loss_fn, [t.param for t in layout.targets], layout=layout)
    bar = progress_bar(total=num_grads, desc=desc, disable=not progress)
    chunks = source.stream(
        cycle_batches(data, num_grads), num_grads, per_sample=per_sample, dtype=torch.float32,
        device="cpu", eval_mode=True, trim=False,
    )  # fmt: skip
    try:
        for rows in chunks:
            for row in rows:
                bar.update(1)
                yield row
    finally:
        chunks.close()
        bar.close()


def gradient_buffer(
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
    filled with ``num_grads`` gradients of the layout's coordinates, streamed row by row from
    :class:`mfac.operators.gradients.ModelGradients` (no second m x d copy)."""
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


__all__ = [
    "LossFn",
    "cycle_batches",
    "gradient_buffer",
    "iter_gradients",
    "progress_bar",
    "squared_gradient_mean",
]
