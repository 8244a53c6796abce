"""Layer-wise OBS (SparseGPT): prune a linear map y = W x so that ||W X - W' X||^2 stays small.

The loss has Hessian H = 2 X X^T (shared by all rows of W). Columns are processed in order; for
column j the inverse Hessian of the not-yet-processed columns is read off the upper Cholesky
factor U of H^-1 (U^T U = H^-1): its row j is [H_j^-1]_{0,:} / sqrt([H_j^-1]_00), with H_j the
trailing sub-matrix. Removing w_ij leaves error e_i = w_ij / U_jj, spread over the later
columns as -e_i U_{j,k}. The mask is picked per block of ``block`` columns (unstructured) or per
M columns (N:M) by w^2 / U_jj^2, and the block's errors are pushed to the rest in one matmul.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import LayerFilter, Target, find_targets
from .collect import cycle_batches, progress_bar
from .patterns import Pattern, lowest

F64 = torch.float64


def damped_inverse_factor(
    hessian: torch.Tensor, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 in float64, after replacing the
    dead inputs (zero diagonal) by unit diagonal; also returns the dead-input mask."""
    h = hessian.to(F64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True), dead


@torch.no_grad()
def prune_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern = None,
    block: int = 128,
    *,
    damp: float = 0.01,
    prior_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight matrix (rows x cols; a conv weight is flattened to
    (out, in*k*k)). Returns (new weight with the input's shape and dtype, keep-mask).

    ``sparsity`` is the fraction removed in every column block (ignored for N:M ``pattern``);
    ``prior_mask`` (keep-mask) forces already-pruned weights to stay pruned.
    """
    shape, dtype = weight.shape, weight.dtype
    w = weight.detach().reshape(shape[0], -1).to(F64).clone()
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be {cols} x {cols} for this weight, got {tuple(hessian.shape)}"
        )
    if pattern is not None and (block % pattern[1] or cols % pattern[1]):
        raise ValueError(
            f"N:M needs block and the input width ({cols}) divisible by M={pattern[1]}"
        )
    u, dead = damped_inverse_factor(hessian, damp)
    w[:, dead] = 0.0
    prior = None if prior_mask is None else prior_mask.reshape(rows, cols).to(w.device)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for c0 in range(0, cols, block):
        c1 = min(c0 + block, cols)
        wb = w[:, c0:c1].clone()
        ub = u[c0:c1, c0:c1]
        errs = torch.zeros_like(wb)
        kb = torch.ones_like(wb, dtype=torch.bool)
        if pattern is None:
            kb = _keep_block(
                wb, ub.diagonal(), sparsity, None if prior is None else prior[:, c0:c1]
            )
        for j in range(c1 - c0):
            if pattern is not None and j % pattern[1] == 0:
                n, m = pattern
                score = wb[:, j : j + m].square() / ub.diagonal()[j : j + m].square()
                if prior is not None:
                    score = torch.where(prior[:, c0 + j : c0 + j + m], score, -1.0)
                drop = score.topk(m - n, dim=1, largest=False).indices
                kb[:, j : j + m].scatter_(1, drop, False)
            col = wb[:, j]
            err = torch.where(kb[:, j], 0.0, col) / ub[j, j]
            wb[:, j:] -= err[:, None] * ub[j, j:][None, :]
            wb[:, j] = torch.where(kb[:, j], wb[:, j], 0.0)
            errs[:, j] = err
        w[:, c0:c1] = wb
        w[:, c1:] -= errs @ u[c0:c1, c1:]
        keep[:, c0:c1] = kb
    return w.to(dtype).reshape(shape), keep.reshape(shape)


def _keep_block(
    wb: torch.Tensor, udiag: torch.Tensor, sparsity: float, prior: torch.Tensor | None
) -> torch.Tensor:
    """Keep-mask of one column block: drop the lowest w^2 / U_jj^2 (prior zeros first)."""
    score = wb.square() / udiag.square()[None, :]
    if prior is not None:
        score = torch.where(prior, score, -1.0)
    count = round(sparsity * score.numel())
    if prior is not None:
        count = max(count, int((~prior).sum()))
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if count:
        keep &= ~lowest(score.reshape(-1), count)
    return keep.view(score.shape)


# --------------------------------------------------------------------------- activations
def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (tokens, cols) input matrix whose Gram gives the layer's Hessian."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError("sparsegpt supports Conv2d with groups=1, zero numeric padding")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise ValueError(f"sparsegpt supports nn.Linear and nn.Conv2d, got {type(module).__name__}")


class HessianRecorder:
    """Forward hooks accumulating H = 2 X^T X / n (float64) per layer from calibration passes."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [t.module.register_forward_hook(self._hook(t.name)) for t in targets]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: object) -> None:
            x = layer_inputs(module, args[0].detach()).float()
            gram = (x.T @ x).to(F64)
            if name in self.hessians:
                self.hessians[name] += gram
                self.counts[name] += x.shape[0]
            else:
                self.hessians[name] = gram
                self.counts[name] = x.shape[0]

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        """2 X^T X / n for layer ``name``."""
        if name not in self.hessians:
            raise ValueError(f"layer {name} saw no calibration input (is it used in forward?)")
        return self.hessians[name] * (2.0 / max(self.counts[name], 1))

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self.handles:
            h.remove()


def stages(targets: Sequence[Target]) -> list[list[Target]]:
    """Groups pruned together in sequential mode: layers sharing the name prefix up to the first
    numeric component ("model.layers.3" for a transformer block, "0" in a Sequential)."""
    groups: dict[str, list[Target]] = {}
    for t in targets:
        parts = t.name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        groups.setdefault(".".join(parts[: cut + 1]), []).append(t)
    return list(groups.values())


@torch.no_grad()
def sparsegpt(
    model: nn.Module,
    data: Iterable[object],
    forward_fn: Callable[[nn.Module, object], object],
    sparsity: float,
    *,
    targets: Sequence[Target] | None = None,
    layers: LayerFilter = None,
    pattern: Pattern = None,
    block: int = 128,
    damp: float = 0.01,
    calib_batches: int = 32,
    sequential: bool = True,
    priors: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Prune ``targets`` of ``model`` in place with SparseGPT from ``calib_batches`` batches of
    ``data`` (``forward_fn(model, batch)`` runs the model). Sequential mode re-runs calibration
    per stage, so later layers see the inputs of the already-pruned earlier ones.
    Returns (keep-masks, timings)."""
    if targets is None:
        targets = find_targets(model, layers)
    batches = list(cycle_batches(data, calib_batches))
    timings = {"collect": 0.0, "precompute": 0.0, "prune": 0.0}
    was_training = model.training
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    try:
        groups = stages(targets) if sequential else [list(targets)]
        for group in progress_bar(groups, desc="sparsegpt", disable=not progress):
            t0 = time.perf_counter()
            rec = HessianRecorder(group)
            try:
                for batch in batches:
                    forward_fn(model, batch)
            finally:
                rec.remove()
            timings["collect"] += time.perf_counter() - t0
            for t in group:
                t1 = time.perf_counter()
                h = rec.hessian(t.name)
                t2 = time.perf_counter()
                prior = None if priors is None else priors[t.name]
                new, keep = prune_layer(
                    t.param, h, sparsity, pattern, block, damp=damp, prior_mask=prior
                )
                t.param.copy_(new)
                masks[t.name] = keep.cpu()
                timings["precompute"] += t2 - t1
                timings["prune"] += time.perf_counter() - t2
    finally:
        model.train(was_training)
    return masks, timings
