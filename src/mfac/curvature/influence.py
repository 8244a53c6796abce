"""Influence functions with the M-FAC inverse Fisher: how much a training example moves a test
example's loss, -grad_test^T F^-1 grad_train (Koh & Liang's I_up,loss with F, the damped
empirical Fisher, in place of the Hessian).

One product with F^-1 per test example (all test examples in one batched ``ihvp``, O(m d) each),
then one matrix product per chunk of training gradients: the cost is that of computing the
training gradients, and no d x d matrix is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._validation import check_positive_int
from ..operators.gradients import (
    LossFn,
    batch_length,
    collect_gradients,
    resolve_params,
    slice_batch,
    tied_to,
)
from ..operators.static import InverseFisher


def example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    params: Sequence[str],
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-example gradients (n, d) of ``loss_fn(model, batch)`` on ``data`` (one batch: a
    tuple or dict of tensors, e.g. ``(inputs, targets)``) with respect to the named parameters
    (tied aliases accepted), in chunks of ``batch_size`` examples; refuses NaN/Inf."""
    check_positive_int(batch_size, "batch_size")
    data = tuple(data) if isinstance(data, list) else data  # one batch, not a list of batches
    n = batch_length(data)
    if dtype is None:  # the gradients' own precision
        named = dict(model.named_parameters())
        dtype = named[resolve_params(model, list(params))[0]].dtype
    rows, _ = collect_gradients(
        model, data, loss_fn, n, params=list(params), dtype=dtype, chunk_size=batch_size
    )
    return rows


def influence(
    inverse: InverseFisher,
    model: nn.Module,
    loss_fn: LossFn,
    train: Any,
    test: Any,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Influence scores I[t, i] = -g_t^T F^-1 g_i of training example i on test example t,
    an (n_test, n_train) tensor.

    ``inverse`` comes from `InverseFisher.from_model` on the same model (its parameter layout
    chooses the parameters); ``loss_fn(model, batch)`` is the per-batch mean loss used there,
    ``train`` and ``test`` are one batch each (a tuple or dict of tensors, cut into examples
    along dim 0). Following Koh & Liang, I[t, i] is the derivative of test loss t with respect
    to up-weighting training example i: negative scores mark helpful examples, positive ones
    harmful; removing example i of n changes test loss t by about -I[t, i] / n.
    """
    layout = inverse._layout()
    named = dict(model.named_parameters())
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if name not in named or named[name].shape != shape:
            tied = tied_to(model, name)
            note = f" (in this model {name} is tied to {tied})" if tied else ""
            raise ValueError(
                f"the model's parameter {name} does not match the operator's layout{note}"
            )
    dtype = inverse.dtype if inverse.dtype in (torch.float32, torch.float64) else torch.float32
    g_test = example_gradients(model, loss_fn, test, layout.names, batch_size, dtype)
    solved = inverse @ g_test.T.contiguous()  # (d, n_test): one batched product with F^-1
    scores = []
    n_train = batch_length(train)
    for s in range(0, n_train, batch_size):
        chunk = slice_batch(train, s, s + batch_size)
        g_train = example_gradients(model, loss_fn, chunk, layout.names, batch_size, dtype)
        scores.append(-(g_train @ solved).T)
    return torch.cat(scores, 1)


__all__ = ["example_gradients", "influence"]
