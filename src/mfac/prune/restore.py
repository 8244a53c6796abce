"""Restoring weights when a pruning call fails part-way."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

#: ids of the tensors an enclosing :func:`restored_on_error` already snapshots
_GUARDED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "mfac_guarded", default=frozenset()
)


@contextlib.contextmanager
def restored_on_error(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Snapshot ``tensors``; on any exception write them back and re-raise. Nested calls over
    tensors an enclosing call already guards (``oneshot`` around ``sparsegpt``) take no
    second snapshot, so a pruning call holds one backup of the weights, not one per layer."""
    ids = frozenset(id(t) for t in tensors)
    outer = _GUARDED.get()
    if ids <= outer:
        yield
        return
    backup = [t.detach().clone() for t in tensors]
    token = _GUARDED.set(outer | ids)
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, b in zip(tensors, backup, strict=True):
                t.copy_(b)
        raise
    finally:
        _GUARDED.reset(token)
