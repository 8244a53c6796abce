"""Masks that hold: keep pruned weights exactly zero through fine-tuning, export them as
``torch.nn.utils.prune`` buffers or bake them in, and save/load masks and sparse checkpoints
with safetensors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.hooks import RemovableHandle

from .._paths import atomic_file

Masks = dict[str, torch.Tensor]


def _modules(model: nn.Module, masks: Masks) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in masks if n not in modules]
    if missing:
        raise ValueError(f"masks name layers the model does not have: {missing[:5]}")
    for name, mask in masks.items():
        w = _weight(modules[name])
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(
                f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(w.shape)}"
            )
    return {n: modules[n] for n in masks}


def _weight(module: nn.Module) -> torch.Tensor:
    orig = getattr(module, "weight_orig", None)
    return orig if orig is not None else module.weight


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights (in place)."""
    for name, module in _modules(model, masks).items():
        w = _weight(module)
        w.mul_(masks[name].to(device=w.device, dtype=w.dtype))
        if hasattr(module, "weight_mask"):
            module.weight_mask.copy_(masks[name].to(module.weight_mask.dtype))


class MaskHolder:
    """Keeps pruned weights exactly zero while training with any optimizer.

    Three guards: a gradient hook zeroes the pruned entries of every gradient (so momentum and
    adaptive statistics of pruned weights stay zero), an optimizer step post-hook re-applies the
    masks after each step (covering stale optimizer state and decoupled weight decay), and a
    forward pre-hook re-applies them before every forward (covering optimizers it was not
    told about). ``remove()`` detaches all three.
    """

    def __init__(
        self, model: nn.Module, masks: Masks, optimizers: Sequence[torch.optim.Optimizer] = ()
    ) -> None:
        self.model = model
        self.masks = {n: m.bool() for n, m in masks.items()}
        self.modules = _modules(model, self.masks)
        apply_masks(model, self.masks)
        self.handles: list[RemovableHandle] = []
        for name, module in self.modules.items():
            w = _weight(module)
            keep = self.masks[name].to(w.device)
            self.handles.append(w.register_hook(lambda g, k=keep: g * k.to(g.dtype)))
            self.handles.append(module.register_forward_pre_hook(self._pre_forward(name)))
        for opt in optimizers:
            self.attach(opt)

    def _pre_forward(self, name: str) -> Callable[[nn.Module, object], None]:
        def hook(module: nn.Module, _args: object) -> None:
            with torch.no_grad():
                w = _weight(module)
                w.mul_(self.masks[name].to(device=w.device, dtype=w.dtype))

        return hook

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every ``optimizer.step()``."""
        self.handles.append(
            optimizer.register_step_post_hook(lambda *_: apply_masks(self.model, self.masks))
        )

    def remove(self) -> None:
        """Detach every hook (the weights stay as they are)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def hold_masks(model: nn.Module, masks: Masks, *optimizers: torch.optim.Optimizer) -> MaskHolder:
    """Zero the pruned weights and keep them zero through training; see :class:`MaskHolder`."""
    return MaskHolder(model, masks, optimizers)


@torch.no_grad()
def to_torch_prune(model: nn.Module, masks: Masks) -> None:
    """Export as ``torch.nn.utils.prune`` reparametrisation (``weight_orig`` + ``weight_mask``).

    Torch recomputes ``weight = weight_orig * weight_mask`` before each forward, so the OBS
    corrections already in the weights are what goes into ``weight_orig``; a layer that is
    already reparametrised has its ``weight_orig`` and ``weight_mask`` overwritten.
    """
    for name, module in _modules(model, masks).items():
        mask = masks[name].to(device=_weight(module).device)
        if hasattr(module, "weight_mask"):
            module.weight_orig.mul_(mask.to(module.weight_orig.dtype))
            module.weight_mask.copy_(mask.to(module.weight_mask.dtype))
            module.weight = module.weight_orig * module.weight_mask
        else:
            torch_prune.custom_from_mask(module, "weight", mask)


def bake(model: nn.Module) -> None:
    """Remove every ``torch.nn.utils.prune`` reparametrisation, leaving plain (zeroed) weights."""
    for module in model.modules():
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")


# --------------------------------------------------------------------------- safetensors
def save_masks(masks: Masks, path: str | os.PathLike[str]) -> None:
    """Write keep-masks to a safetensors file (bool tensors)."""
    from safetensors.torch import save_file

    save_file({n: m.bool().contiguous().cpu() for n, m in masks.items()}, str(path))


def load_masks(path: str | os.PathLike[str]) -> Masks:
    """Read keep-masks written by :func:`save_masks`."""
    from safetensors.torch import load_file

    return {n: t.bool() for n, t in load_file(str(path)).items()}


#: safetensors metadata key listing tied (aliased) state entries: {alias: stored key}.
TIED_KEY = "mfac.tied"


def _tied_groups(state: dict[str, torch.Tensor], prefer: set[str]) -> dict[str, str]:
    """{alias: canonical key} for state entries that are one tensor (tied weights), the
    canonical one being a pruned entry when the group has one."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 value.stride(), value.dtype, value.device)  # fmt: skip
        groups.setdefault(ident, []).append(key)
    aliases: dict[str, str] = {}
    for keys in groups.values():
        if len(keys) < 2:
            continue
        canon = next((k for k in keys if k in prefer), keys[0])
        aliases.update({k: canon for k in keys if k != canon})
    return aliases


def save_sparse(model: nn.Module, masks: Masks, path: str | os.PathLike[str]) -> None:
    """Sparse checkpoint: pruned weights as their kept values plus a bit-packed mask, every
    other state tensor dense (safetensors; read it back with :func:`read_sparse` or
    :func:`load_sparse`).

    ``masks`` must name layers of ``model`` with the weights' shapes (else nothing is written).
    Tied weights (one tensor under several names, e.g. an embedding tied to the LM head) are
    stored once and listed in the file's metadata. The file is written to a temporary name and
    renamed, so a failed save leaves any earlier file as it was.
    """
    import json

    from safetensors.torch import save_file

    if not masks:
        raise ValueError(
            "masks is empty: save_sparse stores pruned layers compactly; save a dense model "
            "with safetensors or save_pretrained instead"
        )
    _modules(model, masks)  # every mask names a layer, with the weight's shape
    state = model.state_dict()
    weight_keys = {}
    for layer in masks:
        key = f"{layer}.weight_orig" if f"{layer}.weight_orig" in state else f"{layer}.weight"
        weight_keys[key] = layer
    aliases = _tied_groups(state, set(weight_keys))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in aliases:
            continue
        if key.endswith(".weight_mask") and key[: -len(".weight_mask")] in masks:
            continue
        layer = weight_keys.get(key)
        if layer is None:
            out[key] = value.detach().contiguous().cpu().clone()
            continue
        keep = masks[layer].bool().cpu().reshape(-1)
        flat = value.detach().cpu().reshape(-1)
        out[f"{key}::values"] = flat[keep].contiguous()
        out[f"{key}::mask"] = torch.from_numpy(np.packbits(keep.numpy()))
        out[f"{key}::shape"] = torch.tensor(list(value.shape), dtype=torch.int64)
    with atomic_file(path) as tmp:
        save_file(out, str(tmp), metadata={TIED_KEY: json.dumps(aliases)})


def read_sparse(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Masks]:
    """Read a :func:`save_sparse` file into a dense state dict and keep-masks; needs only
    safetensors, numpy and torch. Entries ``K::values``, ``K::mask`` (bits, numpy packbits
    order) and ``K::shape`` become the dense tensor ``K`` (zeros where the mask is 0); tied
    names listed in the metadata point to their stored tensor."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(os.fspath(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    raw = load_file(os.fspath(path))
    state: dict[str, torch.Tensor] = {}
    masks: Masks = {}
    for key, value in raw.items():
        if "::" not in key:
            state[key] = value
            continue
        base, part = key.rsplit("::", 1)
        if part != "values":
            continue
        for need in ("mask", "shape"):
            if f"{base}::{need}" not in raw:
                raise ValueError(f"{path}: {base}::values has no {base}::{need}")
        shape = [int(s) for s in raw[f"{base}::shape"]]
        numel = int(np.prod(shape))
        bits = raw[f"{base}::mask"].numpy()
        if bits.size != (numel + 7) // 8:
            raise ValueError(f"{path}: {base}::mask has {bits.size} bytes for {numel} weights")
        keep = torch.from_numpy(np.unpackbits(bits, count=numel).astype(bool))
        if int(keep.sum()) != value.numel():
            raise ValueError(
                f"{path}: {base} keeps {int(keep.sum())} weights but stores {value.numel()}"
            )
        dense = torch.zeros(numel, dtype=value.dtype)
        dense[keep] = value
        state[base] = dense.view(shape)
        layer = base.rsplit(".", 1)[0]
        masks[layer] = keep.view(shape)
    for alias, canon in json.loads(meta.get(TIED_KEY, "{}")).items():
        if canon not in state:
            raise ValueError(f"{path}: tied entry {alias} points to missing {canon}")
        state[alias] = state[canon]
    return state, masks


def load_sparse(model: nn.Module, path: str | os.PathLike[str]) -> Masks:
    """Load a checkpoint written by :func:`save_sparse` into ``model`` (same architecture);
    returns the keep-masks. Every key, shape and dtype kind is checked against
    ``model.state_dict()`` before anything is written: a refused file leaves the model as it
    was."""
    state, masks = read_sparse(path)
    current = model.state_dict()
    for layer, keep in masks.items():
        if f"{layer}.weight_mask" in current:
            state[f"{layer}.weight_mask"] = keep.to(current[f"{layer}.weight_mask"].dtype)
    missing = [k for k in current if k not in state]
    extra = [k for k in state if k not in current]
    if missing or extra:
        raise ValueError(
            f"{path} does not match the model: missing keys {missing[:5]}, extra keys {extra[:5]}"
        )
    for key, value in state.items():
        want = current[key]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model's is {tuple(want.shape)}"
            )
        if value.dtype.is_floating_point != want.dtype.is_floating_point or (
            value.dtype == torch.bool
        ) != (want.dtype == torch.bool):
            raise ValueError(f"{path}: {key} has dtype {value.dtype}, the model's is {want.dtype}")
    model.load_state_dict(state)
    return masks
