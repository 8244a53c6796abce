"""Influence functions with the M-FAC inverse Fisher: how much a training example moves a test
example's loss, -grad_test^T F^-1 grad_train (Koh & Liang's I_up,loss with F, the damped
empirical Fisher, in place of the Hessian).

One product with F^-1 per test example (all test examples in one batched ``ihvp``, O(m d) each),
then one matrix product per chunk of training gradients: the cost is that of computing the
training gradients, and no d x d matrix is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_positive_int
from ..operators.model import LossFn, collect_gradients
from ..operators.static import InverseFisher

Data = tuple[torch.Tensor, torch.Tensor]


def example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    params: Sequence[str],
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-example gradients (n, d) of ``loss_fn`` on ``data`` = (inputs, targets) with respect
    to the named parameters, in chunks of ``batch_size`` examples; refuses NaN/Inf."""
    check_positive_int(batch_size, "batch_size")
    inputs, targets = data
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets differ in length: {inputs.shape[0]} and {targets.shape[0]}"
        )
    if dtype is None:  # the gradients' own precision
        dtype = next(p for n, p in model.named_parameters() if n in set(params)).dtype
    rows, _ = collect_gradients(
        model, data, loss_fn, inputs.shape[0], params=list(params), dtype=dtype,
        chunk_size=batch_size,
    )  # fmt: skip
    return rows


def influence(
    inverse: InverseFisher,
    model: nn.Module,
    loss_fn: LossFn,
    train: Data,
    test: Data,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Influence scores I[t, i] = -g_t^T F^-1 g_i of training example i on test example t,
    an (n_test, n_train) tensor.

    ``inverse`` comes from `InverseFisher.from_model` on the same model (its parameter layout
    chooses the parameters); ``loss_fn`` is the per-batch mean loss used there. Following
    Koh & Liang, I[t, i] is the derivative of test loss t with respect to up-weighting training
    example i: negative scores mark helpful examples, positive ones harmful; removing example i
    of n changes test loss t by about -I[t, i] / n.
    """
    layout = inverse._layout()
    named = dict(model.named_parameters())
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if name not in named or named[name].shape != shape:
            raise ValueError(f"the model's parameter {name} does not match the operator's layout")
    dtype = inverse.dtype if inverse.dtype in (torch.float32, torch.float64) else torch.float32
    g_test = example_gradients(model, loss_fn, test, layout.names, batch_size, dtype)
    solved = inverse @ g_test.T.contiguous()  # (d, n_test): one batched product with F^-1
    scores = []
    n_train = train[0].shape[0]
    for s in range(0, n_train, batch_size):
        chunk = (train[0][s : s + batch_size], train[1][s : s + batch_size])
        g_train = example_gradients(model, loss_fn, chunk, layout.names, batch_size, dtype)
        scores.append(-(g_train @ solved).T)
    return torch.cat(scores, 1)


__all__ = ["example_gradients", "influence"]
