"""Which weights can be pruned, their current masks, and the flat layout of the surviving
coordinates that gradient rows and OBS vectors use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..operators.layout import FlatLayout

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


class Layout(FlatLayout):
    """The flat layout (`mfac.operators.layout.FlatLayout`) of the surviving weights of several
    layers, keeping the targets it was built from: layer l contributes its unpruned coordinates
    (``masks[target.name]``), followed by zero padding up to a multiple of ``block_size`` (when
    given), so that no Fisher block straddles two layers. Padding positions carry zero gradients
    and zero weights and are never pruned. Flat vectors (``gather``/``scatter``) live on the
    CPU, next to the gradient buffer, whatever device the model is on."""

    def __init__(
        self,
        targets: Sequence[Target],
        masks: dict[str, torch.Tensor],
        block_size: int | None = None,
    ) -> None:
        self.targets = list(targets)
        super().__init__(
            [t.name for t in self.targets],
            [t.shape for t in self.targets],
            [masks[t.name] for t in self.targets],
            block_size or None,
        )
