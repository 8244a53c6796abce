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


def save_sparse(model: nn.Module, masks: Masks, path: str | os.PathLike[str]) -> None:
    """Sparse checkpoint: pruned weights as their kept values plus a bit-packed mask, every
    other state tensor dense (safetensors)."""
    from safetensors.torch import save_file

    bake_names = {f"{n}.weight": n for n in masks}
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer = bake_names.get(key)
        if layer is None and key.endswith(".weight_orig") and key[: -len(".weight_orig")] in masks:
            layer = key[: -len(".weight_orig")]
        if key.endswith(".weight_mask") and key[: -len(".weight_mask")] in masks:
            continue
        if layer is None:
            out[key] = value.detach().contiguous().cpu()
            continue
        keep = masks[layer].bool().cpu().reshape(-1)
        flat = value.detach().cpu().reshape(-1)
        out[f"{key}::values"] = flat[keep].contiguous()
        out[f"{key}::mask"] = torch.from_numpy(np.packbits(keep.numpy()))
        out[f"{key}::shape"] = torch.tensor(list(value.shape), dtype=torch.int64)
    save_file(out, str(path))


def load_sparse(model: nn.Module, path: str | os.PathLike[str]) -> Masks:
    """Load a checkpoint written by :func:`save_sparse` into ``model`` (same architecture);
    returns the keep-masks."""
    from safetensors.torch import load_file

    raw = load_file(str(path))
    state: dict[str, torch.Tensor] = {}
    masks: Masks = {}
    for key, value in raw.items():
        if "::" not in key:
            state[key] = value
        elif key.endswith("::values"):
            base = key[: -len("::values")]
            shape = [int(s) for s in raw[f"{base}::shape"]]
            numel = int(np.prod(shape))
            keep = np.unpackbits(raw[f"{base}::mask"].numpy(), count=numel).astype(bool)
            keep_t = torch.from_numpy(keep)
            dense = torch.zeros(numel, dtype=value.dtype)
            dense[keep_t] = value
            state[base] = dense.view(shape)
            layer = base.rsplit(".", 1)[0]
            masks[layer] = keep_t.view(shape)
    current = model.state_dict()
    for layer, keep in masks.items():
        if f"{layer}.weight_mask" in current:
            state[f"{layer}.weight_mask"] = keep.to(current[f"{layer}.weight_mask"].dtype)
    model.load_state_dict(state)
    return masks
