"""Which weights can be pruned, their current masks, and the flat layout of the surviving
coordinates that gradient rows and OBS vectors use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..operators.layout import FlatLayout

#: Module types whose ``weight`` is pruned.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

LayerFilter = Sequence[str] | Callable[[str, nn.Module], bool] | None


@dataclass
class Target:
    """One prunable layer: its qualified name and module; ``tied`` names the other parameters
    holding the same weight tensor (an LM head tied to the input embedding), which pruning
    this layer prunes too."""

    name: str
    module: nn.Module
    tied: tuple[str, ...] = ()

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


def is_hugging_face(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (told by its attributes; transformers is not
    imported)."""
    return hasattr(model, "config") and hasattr(model, "save_pretrained") and hasattr(
        model, "base_model_prefix"
    )


def block_lists(model: nn.Module) -> list[str]:
    """Names of the stacks of stages (transformer blocks): every outermost ``nn.ModuleList``
    whose items are modules of one class, not themselves prunable, each holding a prunable
    layer (``model.layers`` of a Llama, ``bert.encoder.layer``, ``encoder.block`` and
    ``decoder.block`` of a T5)."""
    out: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f"{o}.") for o in out):
            continue  # nested inside a block (e.g. the experts of a mixture)
        items = list(module)
        if len({type(m) for m in items}) != 1 or isinstance(items[0], PRUNABLE):
            continue
        if all(any(isinstance(m, PRUNABLE) for m in item.modules()) for item in items):
            out.append(name)
    return out


def stage_layer_names(model: nn.Module) -> list[str] | None:
    """The prunable layers inside the stacks of stages (:func:`block_lists`), or None when the
    model has no such stack."""
    lists = block_lists(model)
    if not lists:
        return None
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE) and any(name.startswith(f"{b}.") for b in lists)
    ]


def _matches(name: str, pattern: str) -> bool:
    """A layer name matched by a name, a glob pattern (fnmatch), or a containing module."""
    return name == pattern or fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def _unknown(kind: str, pattern: str, model: nn.Module, prunable: list[str]) -> ValueError:
    """One clear error for a layer name or pattern that selects no prunable layer."""
    modules = dict(model.named_modules())
    why = ""
    if pattern in modules:
        what = type(modules[pattern]).__name__
        why = f": its type is {what}, not a prunable layer (nn.Linear / nn.Conv1d/2d/3d)"
        weight = getattr(modules[pattern], "weight", None)
        for other, m in modules.items():
            if other != pattern and isinstance(m, PRUNABLE) and m.weight is weight is not None:
                why += f"; its weight is tied to {other} (select {other} to prune it)"
                break
    else:
        hint = get_close_matches(pattern, prunable, n=1)
        why = f" (did you mean {hint[0]!r}?)" if hint else ""
    sample = ", ".join(prunable[:3] + (["...", prunable[-1]] if len(prunable) > 3 else []))
    return ValueError(
        f"{kind}: {pattern!r} matches no prunable layer of the model{why}; names (globs allowed, "
        f"e.g. 'model.layers.*.mlp.*'): {sample}"
    )


def find_targets(
    model: nn.Module, layers: LayerFilter = None, exclude: Iterable[str] = ()
) -> list[Target]:
    """The prunable layers of ``model`` minus ``exclude``; a weight shared by several modules is
    listed once (its other names in :attr:`Target.tied`).

    ``layers`` None: every Linear/Conv, except for a Hugging Face model with a stack of blocks,
    where only the blocks' layers are pruned (the embeddings and the LM head, tied or not, only
    when named). ``layers`` and ``exclude`` hold module names or glob patterns (fnmatch,
    ``"model.layers.*.mlp.*"``; a container's name selects the layers inside it); a name or
    pattern that selects no prunable layer is refused. ``layers`` may also be a callable
    ``filter(name, module)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    if isinstance(layers, str):
        layers = (layers,)
    excluded = list(exclude)
    modules = dict(model.named_modules())
    prunable = [n for n, m in modules.items() if isinstance(m, PRUNABLE)]
    wanted = None if layers is None or callable(layers) else list(layers)
    for kind, patterns in (("layers", wanted or []), ("exclude", excluded)):
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"{kind}: expected layer names, got {pattern!r}")
            if not any(_matches(n, pattern) for n in prunable):
                raise _unknown(kind, pattern, model, prunable)
    default = None
    if layers is None and is_hugging_face(model):
        default = stage_layer_names(model)
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    seen: set[int] = set()
    out: list[Target] = []
    for name in prunable:
        module = modules[name]
        if any(_matches(name, p) for p in excluded):
            continue
        if wanted is not None and not any(_matches(name, p) for p in wanted):
            continue
        if default is not None and name not in default:
            continue
        if callable(layers) and not layers(name, module):
            continue
        target = Target(name, module)
        if id(target.param) in seen:
            continue
        seen.add(id(target.param))
        own = f"{name}.weight_orig" if hasattr(module, "weight_orig") else f"{name}.weight"
        target.tied = tuple(n for n in names.get(id(target.param), []) if n != own)
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
    (``masks[target.name]``; None: all of them), followed by zero padding up to a multiple of
    ``block_size`` (when given), so that no Fisher block straddles two layers. Padding positions
    carry zero gradients and zero weights and are never pruned. Flat vectors
    (``gather``/``scatter``) live on the CPU, next to the gradient buffer, whatever device the
    model is on."""

    def __init__(
        self,
        targets: Sequence[Target],
        masks: Mapping[str, torch.Tensor | None],
        block_size: int | None = None,
    ) -> None:
        self.targets = list(targets)
        super().__init__(
            [t.name for t in self.targets],
            [t.shape for t in self.targets],
            [masks[t.name] for t in self.targets],
            block_size or None,
        )
