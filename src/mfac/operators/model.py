"""Gradients of a model's loss as rows of the M-FAC buffer: per example (torch.func's vmap of
grad over ``functional_call``) or per mini-batch, and the operator built from them.

The model is never written to: gradients are taken with respect to detached copies of the
chosen parameters, buffers are passed as copies, and ``.grad`` fields are left alone. Every
refusal (no trainable parameter, a loss that is not one number per example, a non-finite
gradient) happens before the operator exists, and names its cause.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .._validation import NonFiniteGradientError, check_positive_int
from .linear import ParameterLayout

if TYPE_CHECKING:
    from .static import DampMode, InverseFisher

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


class ModelGradients:
    """Gradients of ``loss_fn(model(inputs), targets)`` with respect to chosen parameters.

    ``params``: None for every parameter that requires grad, else names or the Parameter
    objects themselves. ``loss_fn`` receives a batch's outputs and targets (a batch of one
    example in the per-example mode) and must return one number (mean-reduce it).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: Sequence[str] | Sequence[nn.Parameter] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ValueError("the model has no parameter that requires grad")
        else:
            by_id = {id(p): n for n, p in named.items()}
            names = []
            for p in params:
                name = p if isinstance(p, str) else by_id.get(id(p))
                if name not in named:
                    raise ValueError(
                        f"parameter {p if isinstance(p, str) else '<tensor>'} is "
                        "not a parameter of the model"
                    )
                names.append(name)
            if not names:
                raise ValueError("params is empty: choose at least one parameter")
            if len(set(names)) != len(names):
                raise ValueError("params lists a parameter twice")
        self.model, self.loss_fn = model, loss_fn
        self.layout = ParameterLayout(tuple(names), tuple(named[n].shape for n in names))
        self.device = named[names[0]].device

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        named = dict(self.model.named_parameters())
        chosen = {n: named[n].detach() for n in self.layout.names}
        fixed = {n: p.detach() for n, p in named.items() if n not in chosen}
        fixed.update({n: b.detach().clone() for n, b in self.model.named_buffers()})
        return chosen, fixed

    def _loss(
        self, chosen: dict, fixed: dict, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(self.model, {**fixed, **chosen}, (inputs,))
        loss = self.loss_fn(out, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must reduce to one number per batch (per example when per_sample), "
                f"got shape {shape}: use reduction='mean' or 'sum'"
            )
        return loss.reshape(())

    def per_example(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n, d) per-example gradients of a batch (vmap over examples, float32 or the params')."""
        chosen, fixed = self._state()

        def one(params: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._loss(params, fixed, x.unsqueeze(0), t.unsqueeze(0))

        grads = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(
            chosen, inputs, targets
        )
        return self.layout.flatten(grads, batched=True)

    def batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(d,) gradient of the batch's (mean) loss."""
        chosen, fixed = self._state()
        grads = grad(lambda p: self._loss(p, fixed, inputs, targets))(chosen)
        return self.layout.flatten(grads)


def _batches(data: Any, chunk: int) -> Iterator[Batch]:
    """(inputs, targets) tensors are cut into chunks; any other iterable yields its batches."""
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        inputs, targets = data
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs and targets differ in length: {inputs.shape[0]} and {targets.shape[0]}"
            )
        for start in range(0, inputs.shape[0], chunk):
            yield inputs[start : start + chunk], targets[start : start + chunk]
        return
    if not isinstance(data, Iterable):
        raise TypeError("data must be (inputs, targets) tensors or an iterable of such batches")
    for item in data:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError("every batch of data must be an (inputs, targets) pair")
        yield item[0], item[1]


def collect_gradients(
    model: nn.Module,
    data: Any,
    loss_fn: LossFn,
    num_grads: int,
    *,
    per_sample: bool = True,
    params: Sequence[str] | Sequence[nn.Parameter] | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, ParameterLayout]:
    """The (num_grads, d) gradient rows and their layout: per-example gradients of the first
    ``num_grads`` examples, or (``per_sample=False``) the gradients of the first ``num_grads``
    batches. Raises if ``data`` runs out or a gradient is not finite."""
    check_positive_int(num_grads, "num_grads")
    check_positive_int(chunk_size, "chunk_size")
    source = ModelGradients(model, loss_fn, params)
    rows = torch.empty(num_grads, source.layout.dim, dtype=dtype, device=source.device)
    filled = 0
    for inputs, targets in _batches(data, chunk_size):
        if filled == num_grads:
            break
        if per_sample:
            need = num_grads - filled
            g = source.per_example(inputs[:need], targets[:need])
        else:
            g = source.batch(inputs, targets)[None]
        check_finite_rows(g, source.layout, first=filled)  # the chunk, while it is in cache
        rows[filled : filled + g.shape[0]] = g
        filled += g.shape[0]
    if filled < num_grads:
        unit = "examples" if per_sample else "batches"
        raise ValueError(f"data holds {filled} {unit}, fewer than num_grads={num_grads}")
    return rows, source.layout


def check_finite_rows(rows: torch.Tensor, layout: ParameterLayout, first: int = 0) -> None:
    """Raise NonFiniteGradientError naming the rows (numbered from ``first``) and parameters
    holding NaN or Inf."""
    finite = torch.isfinite(rows)
    if bool(finite.all()):
        return
    bad_rows = (~finite.all(1)).nonzero().flatten() + first
    bad_cols = (~finite.all(0)).nonzero().flatten()
    bounds = torch.tensor(layout.numels).cumsum(0)
    owners = torch.searchsorted(bounds, bad_cols.cpu(), right=True)
    params = sorted({layout.names[int(i)] for i in owners})
    raise NonFiniteGradientError(
        f"gradients {bad_rows[:5].tolist()} ({bad_rows.numel()} in all) hold NaN or Inf, in "
        f"parameters {params[:5]}"
    )


def inverse_fisher_from_model(
    model: nn.Module,
    data: Any,
    loss_fn: LossFn,
    num_grads: int,
    *,
    per_sample: bool = True,
    block_size: int | None = None,
    damp: float = 1e-5,
    damp_mode: DampMode = "absolute",
    params: Sequence[str] | Sequence[nn.Parameter] | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 64,
    memory_budget: int | None = None,
) -> InverseFisher:
    """Build ``InverseFisher`` over ``num_grads`` gradients of ``model``'s loss on ``data``
    (see `collect_gradients`); the operator keeps the parameter layout for
    ``flatten``/``unflatten``."""
    from .static import InverseFisher

    rows, layout = collect_gradients(
        model,
        data,
        loss_fn,
        num_grads,
        per_sample=per_sample,
        params=params,
        dtype=dtype,
        chunk_size=chunk_size,
    )
    op = InverseFisher(rows, damp, block_size, damp_mode=damp_mode, memory_budget=memory_budget)
    op.layout = layout
    return op


__all__ = ["ModelGradients", "check_finite_rows", "collect_gradients", "inverse_fisher_from_model"]
