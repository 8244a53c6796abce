"""Hugging Face out: save a pruned model as a plain ``save_pretrained`` folder, with the recipe
and the masks beside it.

The folder loads with ``transformers.AutoModel*.from_pretrained`` alone: the weights are the
model's own dense tensors (pruned entries exactly zero), the config is the model's, and
nothing in it names this library. Beside them, ``mfac_recipe.json`` records how it was pruned
and the sparsity counted from the saved files, and ``mfac_masks.safetensors`` the keep-masks
(for fine-tuning with masks that hold). A dense folder takes the dense model's disk size: the
zeros are stored. :func:`mfac.prune.masks.save_sparse` is the compact format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .masks import Masks, _modules, save_masks

RECIPE_FILE = "mfac_recipe.json"
MASKS_FILE = "mfac_masks.safetensors"


def saved_sparsity(
    folder: str | os.PathLike[str], masks: Masks, names: Mapping[str, str] | None = None
) -> dict[str, object]:
    """Sparsity of the masked layers as counted from the safetensors files in ``folder``:
    the share of exact zeros in each layer's saved weight, and over all of them. ``names``
    maps saved keys to layers (default ``{layer}.weight``; a tied weight is saved once, under
    any of its names)."""
    from safetensors import safe_open

    per: dict[str, float] = {}
    zeros = total = 0
    wanted = dict(names) if names else {f"{layer}.weight": layer for layer in masks}
    for file in sorted(Path(folder).glob("*.safetensors")):
        if file.name == MASKS_FILE:
            continue
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                layer = wanted.get(key)
                if layer is None or layer in per:
                    continue
                w = fh.get_tensor(key)
                z = int((w == 0).sum())
                per[layer] = z / w.numel()
                zeros += z
                total += w.numel()
    missing = [layer for layer in masks if layer not in per]
    if missing:
        raise ValueError(f"the saved folder holds no weights for the masked layers {missing[:5]}")
    return {"sparsity": zeros / max(total, 1), "layer_sparsity": per}


@torch.no_grad()
def save_pretrained_sparse(
    model: nn.Module,
    masks: Masks,
    folder: str | os.PathLike[str],
    recipe: Mapping[str, object] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, object]:
    """Save a pruned Hugging Face ``model`` with ``model.save_pretrained(folder)`` (safetensors),
    the keep-masks (``mfac_masks.safetensors``) and ``recipe`` plus the sparsity counted from
    the saved weights (``mfac_recipe.json``). Returns that recipe record.

    Refused, writing nothing: a model without ``save_pretrained``, masks that name no layer of
    the model or whose pruned weights are not zero (bake them first), a recipe that is not JSON,
    and an existing non-empty ``folder`` unless ``overwrite``.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError("save_pretrained_sparse needs a Hugging Face model (save_pretrained)")
    if not masks:
        raise ValueError("masks is empty: nothing marks pruned weights")
    modules = _modules(model, masks)
    for name, module in modules.items():
        if hasattr(module, "weight_orig"):
            raise ValueError(f"{name} is under torch.nn.utils.prune: call mfac.prune.bake first")
        w = module.weight
        if bool((w[~masks[name].to(w.device)] != 0).any()):
            raise ValueError(f"{name}: weights outside the mask are not zero (apply_masks first)")
    record: dict[str, object] = {"recipe": dict(recipe or {})}
    try:
        json.dumps(record)
    except TypeError as err:
        raise TypeError(f"recipe must be JSON-serialisable: {err}") from None
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace its files")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_masks(masks, out / MASKS_FILE)
    state = model.state_dict()
    names = {
        key: name
        for name, module in modules.items()
        for key, value in state.items()
        if value.data_ptr() == module.weight.data_ptr() and value.shape == module.weight.shape
    }
    record.update(saved_sparsity(out, masks, names))
    record["format"] = "save_pretrained (dense tensors, pruned weights stored as zeros)"
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=1))
    return record
