"""Gradients of a model's loss as rows of the M-FAC buffer: the one collector that
`InverseFisher.from_model`, the curvature queries (influence, Laplace) and the Fisher pruners use.

One loss convention everywhere: ``loss_fn(model, batch)`` returns the batch's mean loss as a
scalar tensor; ``batch`` is whatever ``loss_fn`` understands: an ``(inputs, targets)`` tuple, a
Hugging Face dict (``{"input_ids": ..., "labels": ...}``), ... For per-example gradients the
collector hands ``loss_fn`` batches of one example, cut from a batch along dim 0: that needs a
tuple/list or a dict of tensors (see `slice_batch`).

Gradients are per example (torch.func's vmap of grad over ``functional_call``) or per batch,
with respect to chosen parameters (names, the Parameter objects, optionally keep-masks that
select each parameter's surviving coordinates: the flat rows then hold only those, laid out by a
`FlatLayout`). The model is never written to: gradients are taken with respect to detached
copies of the chosen parameters, buffers are passed as copies, ``.grad`` fields and
``requires_grad`` flags are left alone; only ``eval_mode=True`` switches the model to eval for
the duration and restores its mode. Every refusal (no trainable parameter, a loss that is not a
scalar, a non-finite loss or gradient, a batch that cannot be cut into examples) names its cause
and happens before anything is built from the rows.

A parameter reachable under two names (tied weights, e.g. a language model's ``lm_head.weight``
and ``model.embed_tokens.weight``) is one parameter: either name is accepted and the layout
uses the first name ``model.named_parameters()`` gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from .._validation import NonFiniteGradientError, check_positive_int
from .layout import FlatLayout, MaskArg

#: ``loss_fn(model, batch) -> scalar tensor``: the mean loss of ``batch`` (one example's loss
#: when the batch holds one example), computed by calling ``model`` itself.
LossFn = Callable[[nn.Module, Any], torch.Tensor]

ParamsArg = Sequence[str] | Sequence[torch.Tensor] | None

#: ``sample_fn(model, batch, generator) -> batch``: the batch with its targets replaced by labels
#: drawn from the model's predictive distribution (the Monte Carlo, "true" Fisher); the
#: returned batch is what ``loss_fn`` receives.
SampleFn = Callable[[nn.Module, Any, "torch.Generator | None"], Any]


# ---------------------------------------------------------------------------------- batches
def is_batch(data: object) -> bool:
    """True for one batch that the collector can cut along dim 0: a tensor, a tuple of tensors
    or a dict of tensors (a list is read as a sequence of batches)."""
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, tuple):
        return bool(data) and all(isinstance(t, torch.Tensor) for t in data)
    if isinstance(data, Mapping):
        return bool(data) and all(isinstance(t, torch.Tensor) for t in data.values())
    return False


def _tensors(batch: object) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
        return list(batch)
    if isinstance(batch, Mapping) and all(isinstance(t, torch.Tensor) for t in batch.values()):
        return list(batch.values())
    raise TypeError(
        "per-example gradients cut a batch into examples along dim 0: the batch must be a "
        f"tensor, a tuple/list of tensors or a dict of tensors, got {type(batch).__name__}"
    )


def batch_length(batch: object) -> int:
    """Examples in a batch (the common length of its tensors along dim 0)."""
    tensors = _tensors(batch)
    if not tensors or any(t.ndim == 0 for t in tensors):
        raise ValueError("a batch needs tensors with a leading (example) dimension")
    lengths = {int(t.shape[0]) for t in tensors}
    if len(lengths) != 1:
        raise ValueError(f"the batch's tensors differ in length along dim 0: {sorted(lengths)}")
    return lengths.pop()


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples [start, stop) of a tensor, a tuple/list or a dict of tensors (every tensor
    sliced along dim 0; the container type is kept, named tuples included)."""
    _tensors(batch)
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    parts = [t[start:stop] for t in batch]
    if isinstance(batch, tuple):
        return type(batch)(*parts) if hasattr(batch, "_fields") else tuple(parts)
    return parts


def batches_of(data: Any, chunk_size: int) -> Iterator[Any]:
    """One batch (`is_batch`) cut into chunks of ``chunk_size`` examples, or the batches of any
    other iterable as they are."""
    if is_batch(data):
        n = batch_length(data)
        for start in range(0, n, chunk_size):
            yield slice_batch(data, start, start + chunk_size)
        return
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(
            "data must be one batch (a tensor, a tuple or a dict of tensors) or an iterable of "
            "batches, "
            f"got {type(data).__name__}"
        )
    yield from data


def count_examples(data: Any) -> int:
    """Examples in one batch, or in every batch of a (re-iterable) sequence of batches."""
    if is_batch(data):
        return batch_length(data)
    return sum(batch_length(b) for b in batches_of(data, 1))


# ---------------------------------------------------------------------------------- parameters
def resolve_params(model: nn.Module, params: ParamsArg = None) -> list[str]:
    """Canonical names (``model.named_parameters()``'s) of the chosen parameters: every one
    that requires grad by default, else the given names (a tied alias resolves to its canonical
    name) or Parameter objects."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError("the model has no parameter that requires grad")
        return names
    by_id = {id(p): n for n, p in named.items()}
    alias = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    names: list[str] = []
    for p in params:
        name = alias.get(p) if isinstance(p, str) else by_id.get(id(p))
        if name is None:
            label = p if isinstance(p, str) else f"<tensor of shape {tuple(p.shape)}>"
            raise ValueError(f"parameter {label} is not a parameter of the model")
        if name in names:
            tied = f" ({p} is tied to {name})" if isinstance(p, str) and p != name else ""
            raise ValueError(f"params lists a parameter twice{tied}")
        names.append(name)
    if not names:
        raise ValueError("params is empty: choose at least one parameter")
    return names


def tied_to(model: nn.Module, name: str) -> str | None:
    """The canonical name of the parameter ``name`` is tied to, or None when ``name`` is
    canonical (or not a parameter)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters(remove_duplicate=False):
        if n == name and canonical[id(p)] != name:
            return canonical[id(p)]
    return None


def _copies(fixed: dict[str, torch.Tensor], buffers: set[str]) -> dict[str, torch.Tensor]:
    """``fixed`` with its buffers copied inside the transformed function, so that a module that
    updates a buffer in place (BatchNorm in train mode) writes to a copy of its own."""
    return {k: v.clone() if k in buffers else v for k, v in fixed.items()}


class _Objective(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that torch.func can swap the model's
    parameters while ``loss_fn`` calls the model."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: object) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _scalar(loss: object, per_sample: bool) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            "loss_fn must return a scalar tensor, one number per batch (per example when "
            f"per_sample), got {got}: reduce it with mean (reduction='mean')"
        )
    return loss.reshape(())


@contextmanager
def eval_mode_of(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """The model in eval mode for the duration (when ``enabled``); its mode restored after."""
    was_training = model.training
    if enabled:
        model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def kept_intact(model: nn.Module) -> Iterator[None]:
    """Every module's parameters, buffers and plain tensor attributes (e.g. the ``weight`` that
    ``torch.nn.utils.prune``'s hook computes in forward) put back after a functional call, so
    that no tensor of the transformed call stays on the model (torch's ``functional_call`` does
    not restore a module registered under two names)."""
    kept = [
        (
            m,
            dict(m._parameters),
            dict(m._buffers),
            {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)},
        )
        for m in model.modules(remove_duplicate=False)
    ]
    try:
        yield
    finally:
        for m, params, buffers, attrs in kept:
            for store, saved in ((m._parameters, params), (m._buffers, buffers)):
                for k, v in saved.items():
                    if store.get(k) is not v:
                        store[k] = v
            for k, v in attrs.items():
                if m.__dict__.get(k) is not v:
                    setattr(m, k, v)


# ---------------------------------------------------------------------------------- MC labels
def _logits(out: object) -> object:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    return logits


def sample_labels(model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Any:
    """The default ``sample_fn``: class labels drawn from softmax(logits) of a classifier.

    ``(inputs, targets, ...)`` tuples/lists are called as ``model(inputs)``; dicts with a
    ``"labels"`` key (Hugging Face) as ``model(**rest)``, reading ``.logits`` from the output.
    The logits must be (n, C) and the targets integer labels of shape (n,); anything else is
    refused by name (pass a ``sample_fn`` of your own, e.g. for sequence models). The model
    runs without gradients on copies of its buffers, so nothing on it changes."""
    if isinstance(batch, Mapping) and "labels" in batch:
        targets = batch["labels"]
        args: tuple[Any, ...] = ()
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
    elif (
        isinstance(batch, (tuple, list))
        and len(batch) >= 2
        and all(isinstance(t, torch.Tensor) for t in batch)
    ):
        targets, args, kwargs = batch[1], (batch[0],), {}
    else:
        raise TypeError(
            "the default label sampler (fisher='mc') takes (inputs, targets, ...) tuples or dicts "
            f"with 'labels', got {type(batch).__name__}; pass sample_fn(model, batch, generator)"
        )
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.no_grad(), kept_intact(model):
        logits = _logits(functional_call(model, buffers, args, kwargs))
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            "the default label sampler (fisher='mc') needs classification logits of shape "
            f"(n, C), got {got}; pass sample_fn(model, batch, generator) for other outputs"
        )
    if targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(
            "the default label sampler (fisher='mc') needs integer class targets of shape "
            f"({logits.shape[0]},), got {targets.dtype} of shape {tuple(targets.shape)}; pass "
            "sample_fn(model, batch, generator) for other targets"
        )
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteGradientError("the model's logits hold NaN or Inf: no label can be drawn")
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    drawn = drawn.to(device=targets.device, dtype=targets.dtype)
    if isinstance(batch, Mapping):
        return {**batch, "labels": drawn}
    parts = [batch[0], drawn, *batch[2:]]
    if isinstance(batch, tuple):
        return type(batch)(*parts) if hasattr(batch, "_fields") else tuple(parts)
    return parts


def sampled_batches(
    model: nn.Module,
    batches: Iterable[Any],
    sample_fn: SampleFn,
    generator: torch.Generator | None = None,
) -> Iterator[Any]:
    """``batches`` with their targets drawn by ``sample_fn`` (lazily, batch by batch); refuses a
    sampled batch whose length differs from the batch it came from."""
    if not callable(sample_fn):
        raise TypeError(f"sample_fn must be callable, got {type(sample_fn).__name__}")
    for i, batch in enumerate(batches):
        drawn = sample_fn(model, batch, generator)
        if batch_length(drawn) != batch_length(batch):
            raise ValueError(
                f"sample_fn returned a batch of {batch_length(drawn)} examples for batch {i} of "
                f"{batch_length(batch)}: it must keep the examples and replace the targets"
            )
        yield drawn


# ---------------------------------------------------------------------------------- collector
class ModelGradients:
    """Gradients of ``loss_fn(model, batch)`` with respect to chosen parameters, as flat rows.

    ``params``: None for every parameter that requires grad, else names (tied aliases accepted)
    or the Parameter objects. ``masks`` (one keep-mask per chosen parameter, or a dict by
    name) restricts the rows to the surviving coordinates; ``block_size`` pads each segment (see
    `FlatLayout`). ``layout`` gives a prebuilt layout for the chosen parameters instead (same
    order and shapes; its names are labels of the caller's choosing).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: ParamsArg = None,
        *,
        masks: MaskArg = None,
        block_size: int | None = None,
        layout: FlatLayout | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        names = resolve_params(model, params)
        named = dict(model.named_parameters())
        shapes = [named[n].shape for n in names]
        if layout is None:
            layout = FlatLayout(names, shapes, masks, block_size)
        elif list(layout.shapes) != [torch.Size(s) for s in shapes]:
            raise ValueError("the layout's shapes do not match the chosen parameters")
        self.model, self.loss_fn = model, loss_fn
        self.names = names
        self.layout = layout
        self.device = named[names[0]].device
        self.dtype = named[names[0]].dtype
        self._objective = _Objective(model, loss_fn)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Detached copies of the chosen parameters (free) and everything else (fixed),
        named as inside the objective module."""
        named = dict(self.model.named_parameters())
        free = {f"model.{n}": named[n].detach() for n in self.names}
        fixed = {f"model.{n}": p.detach() for n, p in named.items() if f"model.{n}" not in free}
        fixed.update({f"model.{n}": b.detach() for n, b in self.model.named_buffers()})
        return free, fixed

    def _rows(
        self, grads: dict[str, torch.Tensor], batched: bool, dtype: Any, device: Any
    ) -> torch.Tensor:
        items = [grads[f"model.{n}"] for n in self.names]
        return self.layout.gather(
            items, dtype or self.dtype, self.device if device is None else device, batched
        )

    def per_example(
        self, batch: Any, *, dtype: torch.dtype | None = None, device: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) per-example gradients of a batch (vmap over its examples) and the n losses;
        rows in ``dtype`` on ``device`` (default: the parameters')."""
        _tensors(batch)
        batch_length(batch)
        free, fixed = self._state()
        buffers = {f"model.{n}" for n, _ in self.model.named_buffers()}
        objective = self._objective

        def one(params: dict, sample: Any) -> torch.Tensor:
            single = tree_map(lambda t: t.unsqueeze(0), sample)
            state = {**_copies(fixed, buffers), **params}
            return _scalar(functional_call(objective, state, (single,)), True)

        with kept_intact(self.model):
            grads, losses = vmap(grad_and_value(one), in_dims=(None, 0), randomness="different")(
                free, batch
            )
        return self._rows(grads, True, dtype, device), losses.detach()

    def batch(
        self, batch: Any, *, dtype: torch.dtype | None = None, device: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(d,) gradient of the batch's (mean) loss and the loss."""
        free, fixed = self._state()
        buffers = {f"model.{n}" for n, _ in self.model.named_buffers()}
        objective = self._objective

        def whole(params: dict) -> torch.Tensor:
            state = {**_copies(fixed, buffers), **params}
            return _scalar(functional_call(objective, state, (batch,)), False)

        with kept_intact(self.model):
            grads, loss = grad_and_value(whole)(free)
        return self._rows(grads, False, dtype, device), loss.detach()

    def stream(
        self,
        batches: Iterable[Any],
        num_grads: int,
        *,
        per_sample: bool = True,
        dtype: torch.dtype | None = None,
        device: Any = None,
        eval_mode: bool = False,
        trim: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield chunks (k, d) of gradient rows, ``num_grads`` rows in all (fewer only when
        ``batches`` runs out): per-example gradients of the batches' examples in order, or one
        row per batch. Non-finite losses and gradients are refused, naming batch and rows.
        ``trim``: the last batch is cut to the examples still needed before its gradients are
        taken (else all of them are taken and the surplus dropped, as the pruners do)."""
        check_positive_int(num_grads, "num_grads")
        filled = 0
        with eval_mode_of(self.model, eval_mode):
            for i, batch in enumerate(batches):
                if per_sample:
                    need = num_grads - filled
                    if trim and batch_length(batch) > need:
                        batch = slice_batch(batch, 0, need)
                    rows, losses = self.per_example(batch, dtype=dtype, device=device)
                    rows, losses = rows[:need], losses[:need]
                else:
                    row, losses = self.batch(batch, dtype=dtype, device=device)
                    rows = row[None]
                check_finite_losses(losses, i, first=filled, per_sample=per_sample)
                check_finite_rows(rows, self.layout, first=filled)  # the chunk, while in cache
                filled += rows.shape[0]
                yield rows
                if filled == num_grads:
                    break


def check_finite_losses(losses: torch.Tensor, batch: int, first: int, per_sample: bool) -> None:
    """Raise NonFiniteGradientError when a loss is NaN or Inf (naming the batch)."""
    finite = torch.isfinite(losses.reshape(-1))
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten()
    value = float(losses.reshape(-1)[bad[0]])
    where = (
        f"examples {(bad + first)[:5].tolist()} of batch {batch}"
        if per_sample
        else (f"batch {batch}")
    )
    raise NonFiniteGradientError(
        f"loss_fn returned a non-finite loss ({value}) on {where}; the model was left untouched"
    )


def check_finite_rows(rows: torch.Tensor, layout: FlatLayout, first: int = 0) -> None:
    """Raise NonFiniteGradientError naming the rows (numbered from ``first``) and parameters
    holding NaN or Inf."""
    finite = torch.isfinite(rows)
    if bool(finite.all()):
        return
    bad_rows = (~finite.all(1)).nonzero().flatten() + first
    bad_cols = (~finite.all(0)).nonzero().flatten()
    params = layout.owners(bad_cols)
    raise NonFiniteGradientError(
        f"gradients {bad_rows[:5].tolist()} ({bad_rows.numel()} in all) hold NaN or Inf, in "
        f"parameters {params[:5]}"
    )


def collect_gradients(
    model: nn.Module,
    data: Any,
    loss_fn: LossFn,
    num_grads: int,
    *,
    per_sample: bool = True,
    params: ParamsArg = None,
    masks: MaskArg = None,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 64,
    eval_mode: bool = False,
) -> tuple[torch.Tensor, FlatLayout]:
    """The (num_grads, d) gradient rows (on the parameters' device) and their layout:
    per-example gradients of the first ``num_grads`` examples of ``data``, or
    (``per_sample=False``) the gradients of its first ``num_grads`` batches. ``data`` is one
    batch (cut into chunks of ``chunk_size`` examples) or an iterable of batches. Raises if
    ``data`` runs out or a loss or gradient is not finite."""
    check_positive_int(num_grads, "num_grads")
    check_positive_int(chunk_size, "chunk_size")
    source = ModelGradients(model, loss_fn, params, masks=masks, block_size=block_size)
    rows = torch.empty(num_grads, source.layout.dim, dtype=dtype, device=source.device)
    filled = 0
    chunks = source.stream(
        batches_of(data, chunk_size), num_grads, per_sample=per_sample, dtype=dtype,
        device=source.device, eval_mode=eval_mode,
    )  # fmt: skip
    for g in chunks:
        rows[filled : filled + g.shape[0]] = g
        filled += g.shape[0]
    if filled < num_grads:
        unit = "examples" if per_sample else "batches"
        raise ValueError(f"data holds {filled} {unit}, fewer than num_grads={num_grads}")
    return rows, source.layout


__all__ = [
    "LossFn",
    "ModelGradients",
    "SampleFn",
    "batch_length",
    "batches_of",
    "check_finite_losses",
    "check_finite_rows",
    "collect_gradients",
    "count_examples",
    "eval_mode_of",
    "is_batch",
    "kept_intact",
    "resolve_params",
    "sample_labels",
    "sampled_batches",
    "slice_batch",
    "tied_to",
]
