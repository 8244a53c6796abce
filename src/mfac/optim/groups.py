"""Parameter groups for :class:`mfac.MFAC` from a model: which matrices take the orthogonalized
step and which take the window rule.

A flat list of parameters cannot say which 2-D tensors are a network's hidden matrices and
which are its embeddings or output head, and the split matters: orthogonalizing the embeddings
and the head too loses clearly on a language model (docs/optim_designs.md, ``d-muon-2d``). The
rule here is the one Muon's users follow: the 2-D ``weight`` of every layer other than an
``nn.Embedding`` (or ``nn.EmbeddingBag``) and the output head is hidden, and so are the input
projections of an ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q_proj_weight``,
``k_proj_weight`` and ``v_proj_weight`` when the key and value sizes differ: 2-D parameters
not called ``weight``, which torch.optim.Muon's own example, ``p.ndim == 2``, orthogonalizes);
everything else (embeddings, the head, biases, norms) goes to the window rule.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

#: Embedding tables (lookups, not hidden matrices): never orthogonalized.
_TABLES = (nn.Embedding, nn.EmbeddingBag)

#: nn.MultiheadAttention's input projections (raw 2-D parameters, not a submodule's weight).
_ATTENTION_MATRICES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _head(model: nn.Module) -> nn.Parameter | None:
    """The output head's weight: Hugging Face's ``get_output_embeddings()`` when the model has
    one, else the last layer registered with a 2-D weight (a classifier's last Linear)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(getattr(head, "weight", None), nn.Parameter):
        return head.weight
    last = None
    for module in model.modules():
        if isinstance(module, _TABLES):  # an input table, wherever it is registered
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2:
            last = weight
    return last


def hidden_groups(model: nn.Module, exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Two parameter groups of ``model``'s trainable parameters: the hidden matrices with
    ``orthogonalize=True``, and the rest. Hidden: the 2-D ``weight`` of every module other than
    an ``nn.Embedding`` or ``nn.EmbeddingBag`` and the output head (a weight tied to an
    embedding counts as the embedding) and the input projections of every
    ``nn.MultiheadAttention``, minus the parameter names matching a glob in ``exclude``. A
    pattern that matches no parameter name is refused by name. Add options (``weight_decay``,
    ``lr``) to the returned dicts as to any parameter group."""
    if isinstance(exclude, str):
        exclude = [exclude]
    named = dict(model.named_parameters())  # tied weights once, under their first name
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in named):
            raise ValueError(f"exclude pattern {pattern!r} matches no parameter of the model")
    skip = {id(m.weight) for m in model.modules() if isinstance(m, _TABLES)}
    head = _head(model)
    if head is not None:
        skip.add(id(head))
    candidates = set()
    for module in model.modules():
        if isinstance(module, _TABLES):
            continue
        names = {"weight"}
        if isinstance(module, nn.MultiheadAttention):
            names.update(_ATTENTION_MATRICES)
        for key, weight in module.named_parameters(recurse=False):
            if key in names and weight.dim() == 2 and id(weight) not in skip:
                candidates.add(id(weight))
    hidden, rest = [], []
    for name, p in named.items():
        if not p.requires_grad:
            continue
        excluded = any(fnmatch.fnmatchcase(name, pat) for pat in exclude)
        (hidden if id(p) in candidates and not excluded else rest).append(p)
    groups: list[dict[str, Any]] = []
    if hidden:
        groups.append({"params": hidden, "orthogonalize": True})
    if rest:
        groups.append({"params": rest})
    return groups


__all__ = ["hidden_groups"]
