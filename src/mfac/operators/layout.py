"""The flat d-vector of several parameters: where each parameter's coordinates live in it.

One type for every flat vector the library builds from a model's parameters (gradient rows,
OBS weight vectors, the optimizer's flat step): parameter ``i`` owns the segment
``[offsets[i], offsets[i] + sizes[i] + pads[i])``. Its first ``sizes[i]`` positions hold the
parameter's surviving coordinates (all of them, or those a keep-mask selects, in flat order);
the ``pads[i]`` positions after them are zero padding up to a multiple of ``block_size`` (when
given), so that no Fisher block straddles two parameters. Padding carries zero gradients and
zero weights and is never pruned.

``flatten``/``unflatten`` check names and shapes and keep the tensors' device and dtype (the
operator's layout for a model); ``gather``/``scatter`` read and write the flat vector on the
CPU by default, next to a gradient buffer, whatever device the model is on (the pruners).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """Where one parameter lives in the flat vector: [offset, offset + size) holds its surviving
    entries (flat indices ``index`` of the parameter; None: every entry, in order), followed by
    ``pad`` zeros."""

    name: str
    shape: torch.Size
    offset: int
    size: int
    pad: int = 0
    index: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        """Entries of the full parameter (surviving or not)."""
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        """One past the segment's last position, padding included."""
        return self.offset + self.size + self.pad


MaskArg = Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor] | None


class FlatLayout:
    """Names and shapes of parameters, optional keep-masks and block padding, and the flat
    positions that follow from them (see the module docstring)."""

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        masks: MaskArg = None,
        block_size: int | None = None,
        index_device: torch.device | str = "cpu",
    ) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.shapes: tuple[torch.Size, ...] = tuple(torch.Size(s) for s in shapes)
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} names but {len(self.shapes)} shapes")
        if len(set(self.names)) != len(self.names):
            raise ValueError("a parameter name appears twice in the layout")
        if block_size is not None and (isinstance(block_size, bool) or block_size < 1):
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if isinstance(masks, Mapping):
            mask_list: list[torch.Tensor | None] = [masks.get(n) for n in self.names]
        elif masks is None:
            mask_list = [None] * len(self.names)
        else:
            mask_list = list(masks)
            if len(mask_list) != len(self.names):
                raise ValueError(f"{len(mask_list)} masks for {len(self.names)} parameters")
        self.block_size = block_size
        segments = []
        pos = 0
        for name, shape, mask in zip(self.names, self.shapes, mask_list, strict=True):
            index = None
            size = math.prod(shape)
            if mask is not None:
                if tuple(mask.shape) != tuple(shape) and mask.numel() != size:
                    raise ValueError(
                        f"the mask of {name} has shape {tuple(mask.shape)}, the parameter "
                        f"{tuple(shape)}"
                    )
                index = mask.detach().reshape(-1).cpu().nonzero().flatten().to(index_device)
                size = int(index.numel())
            pad = (-size) % block_size if block_size else 0
            segments.append(Segment(name, shape, pos, size, pad, index))
            pos += size + pad
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.dim = pos
        self._real: torch.Tensor | None = None
        self._layer: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        params: Mapping[str, torch.Tensor],
        masks: MaskArg = None,
        block_size: int | None = None,
    ) -> FlatLayout:
        """The layout of named tensors (e.g. ``dict(model.named_parameters())``, in order)."""
        return cls(list(params), [t.shape for t in params.values()], masks, block_size)

    # ------------------------------------------------------------------ positions
    @property
    def offsets(self) -> list[int]:
        return [s.offset for s in self.segments]

    @property
    def sizes(self) -> list[int]:
        """Surviving coordinates per parameter (padding excluded)."""
        return [s.size for s in self.segments]

    counts = sizes

    @property
    def pads(self) -> list[int]:
        return [s.pad for s in self.segments]

    @property
    def index(self) -> list[torch.Tensor]:
        """Flat indices of each parameter's surviving entries (every entry when unmasked)."""
        return [s.index if s.index is not None else torch.arange(s.numel) for s in self.segments]

    @property
    def numels(self) -> tuple[int, ...]:
        """Entries of each full parameter."""
        return tuple(s.numel for s in self.segments)

    @property
    def dense(self) -> bool:
        """True when the flat vector is the plain concatenation of the parameters."""
        return all(s.index is None and s.pad == 0 for s in self.segments)

    @property
    def real(self) -> torch.Tensor:
        """(d,) bool: True at positions holding a coordinate, False on padding."""
        if self._real is None:
            real = torch.zeros(self.dim, dtype=torch.bool)
            for s in self.segments:
                real[s.offset : s.offset + s.size] = True
            self._real = real
        return self._real

    @property
    def layer(self) -> torch.Tensor:
        """(d,) long: the position's parameter number (padding belongs to its parameter)."""
        if self._layer is None:
            layer = torch.full((self.dim,), -1, dtype=torch.long)
            for i, s in enumerate(self.segments):
                layer[s.offset : s.stop] = i
            self._layer = layer
        return self._layer

    def owners(self, positions: torch.Tensor) -> list[str]:
        """Names of the parameters owning flat ``positions`` (sorted, each once)."""
        stops = torch.tensor([s.stop for s in self.segments])
        found = torch.searchsorted(stops, positions.reshape(-1).cpu(), right=True)
        return sorted({self.names[int(i)] for i in found if int(i) < len(self.names)})

    # ------------------------------------------------------------------ named tensors
    def _items(
        self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        if isinstance(tensors, Mapping):
            missing = [n for n in self.names if n not in tensors]
            extra = [n for n in tensors if n not in self.names]
            if missing or extra:
                raise KeyError(f"flatten: missing {missing[:5]}, unexpected {extra[:5]}")
            return [tensors[n] for n in self.names]
        items = list(tensors)
        if len(items) != len(self.names):
            raise ValueError(f"flatten: expected {len(self.names)} tensors, got {len(items)}")
        return items

    def flatten(
        self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], batched: bool = False
    ) -> torch.Tensor:
        """Named tensors (a dict with exactly these names) or a sequence in layout order (e.g.
        ``torch.autograd.grad``'s output) as a (d,) vector, or an (n, d) matrix when
        ``batched`` (every tensor then has a leading dimension n); device and dtype are kept.
        Masked-out entries are dropped and padding is zero."""
        items = self._items(tensors)
        first = items[0]
        assert first is not None
        lead = first.shape[:1] if batched and first.ndim else ()
        for seg, t in zip(self.segments, items, strict=True):
            if t is None or tuple(t.shape) != (*lead, *seg.shape):
                got = None if t is None else tuple(t.shape)
                raise ValueError(
                    f"flatten: {seg.name} has shape {got}, expected {(*lead, *seg.shape)}"
                )
        rows = [t.reshape(*lead, -1) for t in items]  # type: ignore[union-attr]
        if self.dense:
            return torch.cat(rows, -1)
        out = first.new_zeros(*lead, self.dim)
        for seg, r in zip(self.segments, rows, strict=True):
            part = r if seg.index is None else r[..., seg.index.to(r.device)]
            out[..., seg.offset : seg.offset + seg.size] = part
        return out

    def unflatten(self, vector: torch.Tensor, fill: float = 0.0) -> dict[str, torch.Tensor]:
        """Named tensors shaped like the parameters from a (d,) vector (or an (n, d) matrix,
        row-wise): views for a dense layout, else copies with ``fill`` at masked-out entries."""
        if vector.ndim not in (1, 2) or vector.shape[-1] != self.dim:
            raise ValueError(
                f"unflatten: expected shape ({self.dim},) or (n, {self.dim}), "
                f"got {tuple(vector.shape)}"
            )
        lead = vector.shape[:-1]
        out = {}
        for seg in self.segments:
            part = vector[..., seg.offset : seg.offset + seg.size]
            if seg.index is not None:
                full = vector.new_full((*lead, seg.numel), fill)
                full[..., seg.index.to(vector.device)] = part
                part = full
            out[seg.name] = part.reshape((*lead, *seg.shape))
        return out

    # ------------------------------------------------------------------ buffer side
    def gather(
        self,
        tensors: Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        batched: bool = False,
    ) -> torch.Tensor:
        """The (d,) flat vector (``dtype`` on ``device``) from full-shape per-parameter tensors
        in layout order, None reading as zeros; an (n, d) matrix when ``batched`` (every tensor
        then has a leading dimension n)."""
        items = self._items(tensors)
        lead: tuple[int, ...] = ()
        if batched:
            present = [t for t in items if t is not None]
            if not present:
                raise ValueError("gather: batched needs at least one tensor")
            lead = (int(present[0].shape[0]),)
        out = torch.zeros(*lead, self.dim, dtype=dtype, device=device)
        for t, seg in zip(items, self.segments, strict=True):
            if t is None or not seg.size:
                continue
            flat = t.detach().reshape(*lead, -1)
            if seg.index is not None:
                flat = flat[..., seg.index.to(t.device)]
            out[..., seg.offset : seg.offset + seg.size] = flat.to(device, dtype)
        return out

    def scatter(self, flat: torch.Tensor, fill: float = 0.0) -> list[torch.Tensor]:
        """Full-shape per-parameter tensors (layout order, ``flat``'s dtype and device) from a
        flat vector; masked-out entries get ``fill``."""
        parts = self.unflatten(flat, fill)
        return [parts[n] if s.index is not None else parts[n].clone()
                for n, s in zip(self.names, self.segments, strict=True)]  # fmt: skip

    def __repr__(self) -> str:
        masked = sum(s.index is not None for s in self.segments)
        return (
            f"FlatLayout(params={len(self.names)}, dim={self.dim}, masked={masked}, "
            f"block_size={self.block_size})"
        )


__all__ = ["FlatLayout", "Segment"]
