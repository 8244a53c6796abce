"""Which weights can be pruned, their current masks, and the flat layout of the surviving
coordinates that gradient rows and OBS vectors use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Module types whose ``weight`` is pruned.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

LayerFilter = Sequence[str] | Callable[[str, nn.Module], bool] | None


@dataclass
class Target:
    """One prunable layer: its qualified name and module."""

    name: str
    module: nn.Module

    @property
    def param(self) -> torch.Tensor:
        """The trainable tensor holding the weights (``weight_orig`` under torch pruning)."""
        orig = getattr(self.module, "weight_orig", None)
        return orig if orig is not None else self.module.weight

    @property
    def shape(self) -> torch.Size:
        """Shape of the weight."""
        return self.param.shape

    @property
    def numel(self) -> int:
        """Number of weights."""
        return self.param.numel()

    @property
    def row_width(self) -> int:
        """Weights per output unit: the input width that N:M groups run along."""
        return self.numel // self.shape[0]


def find_targets(
    model: nn.Module, layers: LayerFilter = None, exclude: Iterable[str] = ()
) -> list[Target]:
    """The prunable layers of ``model``: every Linear/Conv (or those ``layers`` names/accepts),
    minus ``exclude``; a weight shared by several modules is listed once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    excluded = set(exclude)
    wanted = None if layers is None or callable(layers) else list(layers)
    modules = dict(model.named_modules())
    if wanted is not None:
        missing = [n for n in wanted if n not in modules]
        if missing:
            raise ValueError(f"layers not found in the model: {missing[:5]}")
    seen: set[int] = set()
    out: list[Target] = []
    for name, module in modules.items():
        if not isinstance(module, PRUNABLE) or name in excluded:
            continue
        if wanted is not None and name not in wanted:
            continue
        if callable(layers) and not layers(name, module):
            continue
        target = Target(name, module)
        if id(target.param) in seen:
            continue
        seen.add(id(target.param))
        out.append(target)
    if not out:
        raise ValueError(
            "the model has no prunable layers (nn.Linear / nn.Conv1d/2d/3d weights) "
            "matching the layer selection"
        )
    return out


def current_masks(targets: Sequence[Target]) -> dict[str, torch.Tensor]:
    """Keep-masks (on the CPU) of the weights as they stand: torch pruning's ``weight_mask``
    when present, else the non-zero pattern (a weight that is exactly zero counts as pruned)."""
    masks = {}
    for t in targets:
        buf = getattr(t.module, "weight_mask", None)
        mask = buf.bool() if buf is not None else t.param.detach() != 0
        masks[t.name] = mask.cpu().clone()
    return masks


class Layout:
    """Flat positions of the surviving weights of several layers (flat vectors live on the CPU,
    next to the gradient buffer, whatever device the model is on).

    Layer l contributes its ``n_l`` unpruned coordinates, followed by zero padding up to a
    multiple of ``block_size`` (when given), so that no Fisher block straddles two layers.
    Padding positions carry zero gradients and zero weights and are never pruned.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        masks: dict[str, torch.Tensor],
        block_size: int | None = None,
    ) -> None:
        self.targets = list(targets)
        self.index = [masks[t.name].reshape(-1).nonzero().flatten() for t in self.targets]
        self.counts = [int(i.numel()) for i in self.index]
        pads = [((-n) % block_size) if block_size else 0 for n in self.counts]
        self.pads = pads
        self.offsets = []
        pos = 0
        for n, p in zip(self.counts, pads, strict=True):
            self.offsets.append(pos)
            pos += n + p
        self.dim = pos
        real = torch.zeros(pos, dtype=torch.bool)
        layer = torch.full((pos,), -1, dtype=torch.long)
        for li, (o, n) in enumerate(zip(self.offsets, self.counts, strict=True)):
            real[o : o + n] = True
            layer[o : o + n + pads[li]] = li
        self.real = real
        self.layer = layer

    def gather(
        self, tensors: Sequence[torch.Tensor | None], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The layout's flat vector from full-shape per-layer tensors (None reads as zeros)."""
        out = torch.zeros(self.dim, dtype=dtype)
        for t, idx, o, n in zip(tensors, self.index, self.offsets, self.counts, strict=True):
            if t is not None and n:
                out[o : o + n] = t.detach().reshape(-1)[idx.to(t.device)].to("cpu", dtype)
        return out

    def scatter(self, flat: torch.Tensor, fill: float = 0.0) -> list[torch.Tensor]:
        """Full-shape per-layer tensors from a flat vector; pruned coordinates get ``fill``."""
        out = []
        for t, idx, o, n in zip(self.targets, self.index, self.offsets, self.counts, strict=True):
            full = torch.full((t.numel,), fill, dtype=flat.dtype)
            full[idx] = flat[o : o + n]
            out.append(full.view(t.shape))
        return out
