"""Per-stage sparsity budgets set by global curvature, for the layer-wise methods.

The diagonal empirical Fisher F_ii (the mean squared loss gradient over the calibration batches)
gives every weight the OBS saliency w_i^2 F_ii / 2 (docs/algorithms.md, section 1). Ranked over
all pruned layers at once, these saliencies say how much of each stage (transformer block) a
global pruner would keep at the target sparsity S. That kept share replaces OWL's outlier ratio
in :func:`mfac.prune.budgets.owl.owl_budgets`: stages that the loss's curvature protects are
pruned less, each stage's sparsity stays in [S - spread, S + spread], and the
weight-count-weighted mean is exactly S. The layer-wise method (SparseGPT, Wanda) then prunes
each layer to its stage's share.

Unlike a global pruner this keeps every stage near S (a layer is never emptied); unlike OWL it
asks the loss, not the activations, where the sparsity should go.

``saliency="mfac"`` ranks by the OBS saliency with the M-FAC inverse Fisher instead,
w_i^2 / (2 [F^-1]_ii) with F = lam I + (1/m) sum_j g_j g_j^T block-diagonal (``block_size``
coordinates of one layer per block) on the same m = ``calib_batches`` gradients (one per batch,
from the one collector), lam = ``damp`` times the mean of diag(G^T G / m) over all pruned
weights. The diagonal of each block's inverse comes from :class:`mfac.InverseFisher`, built one
layer at a time on that layer's columns of the gradient buffer (blocks never straddle layers, so
this is the model-wide block-diagonal operator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import islice

import torch
from torch import nn

from ..._validation import check_damp, check_positive_int
from ...operators import InverseFisher
from .._layers import LayerFilter, Layout, Target, find_targets
from ..calibration import check_layerwise_targets, stage_name
from ..collect import gradient_buffer
from ..patterns import check_sparsity
from .owl import owl_budgets

#: The saliencies ``fisher_sparsities`` ranks: the diagonal Fisher's or the blocked M-FAC one's.
SALIENCIES = ("diag", "mfac")


@torch.no_grad()
def mfac_saliencies(
    model: nn.Module,
    batches: Sequence[object],
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    targets: Sequence[Target],
    *,
    block_size: int = 128,
    damp: float = 1e-2,
) -> list[torch.Tensor]:
    """Per target, the OBS saliency w^2 / (2 [F^-1]_ii) (float64, the weight's shape) under the
    block-diagonal M-FAC inverse of F = lam I + (1/m) sum_j g_j g_j^T, one gradient per batch,
    lam = ``damp`` * mean(diag(G^T G / m)) over the targets' coordinates (module docstring)."""
    damp = check_damp(damp)  # before the gradients are collected
    check_positive_int(block_size, "block_size")
    layout = Layout(targets, dict.fromkeys((t.name for t in targets), None), block_size)
    buf = gradient_buffer(model, loss_fn, batches, layout, len(batches), progress=False)
    grads, m = buf.tensor, len(batches)
    total = 0.0
    for seg in layout.segments:  # sums of squares one layer at a time (no m x d temporary)
        block = grads[:, seg.offset : seg.offset + seg.size]
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64).square())
    real = sum(seg.size for seg in layout.segments)
    lam = damp * total / (m * real)
    if not lam > 0:
        raise ValueError("fisher_saliency='mfac' needs gradients that are not all zero")
    out = []
    for t, seg in zip(targets, layout.segments, strict=True):
        # the operator overwrites its input; one layer at a time keeps only that layer's
        # block factors (a model-wide operator would hold every block's m x m factor at once)
        own = grads[:, seg.offset : seg.stop].clone()
        inv_diag = InverseFisher(own, lam, block_size).diag()[: seg.size]
        w = t.param.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        out.append((w.square() / (2.0 * inv_diag)).view(t.shape))
    return out


def fisher_sparsities(
    model: nn.Module,
    data: Iterable[object],
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    sparsity: float,
    *,
    spread: float = 0.08,
    calib_batches: int = 32,
    targets: Sequence[Target] | None = None,
    layers: LayerFilter = None,
    info: dict[str, object] | None = None,
    saliency: str = "diag",
    block_size: int = 128,
    damp: float = 1e-2,
) -> dict[str, float]:
    """Budgets (layer name -> sparsity) for ``targets`` of ``model`` at overall ``sparsity`` from
    ``calib_batches`` batches of ``data`` (``loss_fn(model, batch)`` must return a scalar loss).
    The model's weights, its ``.grad`` attributes and its train/eval mode are left as they
    were. ``info`` receives each stage's kept share (``fisher_kept_share``) and budget
    (``fisher_group_sparsity``). ``saliency``: ``"diag"`` (w^2 F_ii) or ``"mfac"`` (w^2 /
    (2 [F^-1]_ii) with the block-diagonal M-FAC inverse, blocks of ``block_size``, relative
    damping ``damp``; :func:`mfac_saliencies`)."""
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency must be one of {', '.join(SALIENCIES)}, got {saliency!r}")
    s = check_sparsity(sparsity)
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"spread must be in [0, 1), got {spread}")
    if targets is None:
        targets = find_targets(model, layers)
    check_layerwise_targets(targets)
    batches = list(islice(iter(data), calib_batches))
    if not batches:
        raise ValueError("data must hold at least one calibration batch")
    if saliency == "mfac":
        scores = [
            f.reshape(-1)
            for f in mfac_saliencies(
                model, batches, loss_fn, targets, block_size=block_size, damp=damp
            )
        ]
    else:
        scores = _diag_saliencies(model, batches, loss_fn, targets)
    return _budgets_from_scores(targets, scores, s, spread, info)


def _diag_saliencies(
    model: nn.Module,
    batches: list[object],
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    targets: Sequence[Target],
) -> list[torch.Tensor]:
    """Per target (flat), w^2 sum_b g_b^2 from one backward pass per batch; the model's .grad
    and train/eval mode restored."""
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    was_training = model.training
    fisher = [  # float32 at least (float64 weights keep float64)
        torch.zeros_like(t.param, dtype=torch.promote_types(t.param.dtype, torch.float32))
        for t in targets
    ]
    try:
        model.eval()
        for batch in batches:
            for p in params:
                p.grad = None
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(
                        "budget='fisher' needs loss_fn(model, batch) to return a scalar loss "
                        f"tensor, got {type(loss).__name__}"
                    )
                loss.backward()
            for f, t in zip(fisher, targets, strict=True):
                if t.param.grad is not None:
                    f.add_(t.param.grad.to(f.dtype).square())
    finally:
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
        model.train(was_training)
    for f, t in zip(fisher, targets, strict=True):  # saliency w^2 F_ii, in the Fisher's place
        f.mul_(t.param.detach().to(f.dtype).square())
    return [f.reshape(-1) for f in fisher]


def _budgets_from_scores(
    targets: Sequence[Target],
    scores: list[torch.Tensor],
    s: float,
    spread: float,
    info: dict[str, object] | None,
) -> dict[str, float]:
    """Each stage's share kept by the global ranking of ``scores`` at sparsity ``s``, mapped
    into OWL's band by :func:`owl_budgets`."""
    flat = torch.cat(scores)
    count = max(1, int(s * flat.numel()))
    threshold = float(flat.kthvalue(count).values)
    del flat
    kept: dict[str, list[int]] = {}
    for t, score in zip(targets, scores, strict=True):
        group = kept.setdefault(stage_name(t.name), [0, 0])
        group[0] += int((score > threshold).sum())
        group[1] += score.numel()
    keys = list(kept)
    shares = [kept[k][0] / kept[k][1] for k in keys]
    budgets = owl_budgets(shares, [kept[k][1] for k in keys], s, spread)
    if info is not None:
        info["fisher_kept_share"] = dict(zip(keys, shares, strict=True))
        info["fisher_group_sparsity"] = dict(zip(keys, budgets, strict=True))
    by_group = dict(zip(keys, budgets, strict=True))
    return {t.name: by_group[stage_name(t.name)] for t in targets}
