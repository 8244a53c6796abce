"""Layer-wise OBS (SparseGPT): prune a linear map y = W x so that ||W X - W' X||^2 stays small.

The loss has Hessian H = 2 X X^T (shared by all rows of W). Columns are processed in order; for
column j the inverse Hessian of the not-yet-processed columns is read off the upper Cholesky
factor U of H^-1 (U^T U = H^-1): its row j is [H_j^-1]_{0,:} / sqrt([H_j^-1]_00), with H_j the
trailing sub-matrix. Removing w_ij leaves error e_i = w_ij / U_jj, spread over the later
columns as -e_i U_{j,k}. The mask is picked per column block (``block`` columns, unstructured)
or per M columns (N:M) by w^2 / U_jj^2, and the column block's errors are pushed to the rest in
one matmul.

``method="sparsegpt"`` runs :func:`sparsegpt` over the targets, stage by stage
(:mod:`mfac.prune.calibration`), at the uniform or a per-layer budget
(:mod:`mfac.prune.budgets`). With ``refine="pcg"`` each layer's weights on its SparseGPT mask are
then refined to the exact layer-wise least squares by batched preconditioned CG
(:mod:`mfac.prune.refine`), warm-started from SparseGPT's; with ``refine="admm"`` a mask of the
same size is first searched by ADMM from SparseGPT's (:mod:`mfac.prune.admm`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..._config import option
from ..._validation import SingularHessianError, check_damp, check_positive_int
from ...operators import GradientBuffer
from ...operators.layout import Segment
from .._layers import LayerFilter, Layout, Target, find_targets
from ..admm import Eig, scaled_eig, search_refine
from ..budgets import BudgetOptions, Sparsity, layer_budgets, resolve_budget
from ..calibration import InputStats, calibration_batches, check_layerwise_targets, run_layerwise
from ..collect import LossFn, gradient_buffer, progress_bar
from ..method import CommonOptions, LayerOptions, Method, Request
from ..patterns import Pattern, check_pattern_fits, lowest
from ..refine import (
    REFINES,
    RefineOptions,
    check_fisher_weight,
    damped_gram,
    pcg_refine,
)
from ..restore import restored_on_error

F64 = torch.float64


#: Columns updated one at a time inside a column block; the rest of the column block is updated
#: per sub-block with a matmul (a multiple of every M used in N:M patterns).
SUB_BLOCK = 16

#: Damping escalation after a failed Cholesky: at most this many retries, each 10x the last.
DAMP_RETRIES = 4

#: ``damp=None`` (the presets' default): below this many calibration tokens per input feature a
#: layer's Gram is poorly determined and the OBS update fits the calibration text, so it gets
#: ``SHORT_CALIBRATION_DAMP``; from there SparseGPT's published 0.01 (docs/prune.md §2g).
TOKENS_PER_INPUT = 10
SHORT_CALIBRATION_DAMP = 0.1
LONG_CALIBRATION_DAMP = 0.01


def calibration_damp(tokens: int, inputs: int) -> float:
    """The relative damping ``damp=None`` gives a layer with ``inputs`` input features calibrated
    on ``tokens`` tokens: 0.1 under ``TOKENS_PER_INPUT`` tokens per input, else 0.01."""
    if tokens < TOKENS_PER_INPUT * inputs:
        return SHORT_CALIBRATION_DAMP
    return LONG_CALIBRATION_DAMP


#: The ``damp`` option's help, shared by SparseGPT and the presets.
DAMP_HELP = (
    f"damping, relative to the Hessian diagonal (auto: per layer, {SHORT_CALIBRATION_DAMP:g} under "
    f"{TOKENS_PER_INPUT} calibration tokens per input feature, else {LONG_CALIBRATION_DAMP:g})"
)


@dataclass(frozen=True, kw_only=True)
class ProjectionOptions(LayerOptions):
    """Options shared by the methods built on SparseGPT projections."""

    damp: float | None = option(
        0.01, DAMP_HELP, low=0, low_open=True, null_words=("auto", "none", "null")
    )  # fmt: skip
    calib_batches: int = option(32, "calibration batches per projection", low=1)
    sequential: bool = option(
        True, "re-run calibration per stage so later layers see the pruned earlier ones"
    )


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(CommonOptions, ProjectionOptions, BudgetOptions, RefineOptions):
    """Options of ``method="sparsegpt"``."""

    block: int = option(128, "columns pruned together: the column block of lazy updates", low=1)


def lower_triangular_inverse(lower: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by 2 x 2 block recursion,
    [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]: n^3 / 3 flops in matmuls, where a
    triangular solve against the identity costs n^3."""
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    k = n // 2
    a_inv = lower_triangular_inverse(lower[:k, :k], leaf)
    d_inv = lower_triangular_inverse(lower[k:, k:], leaf)
    out = torch.zeros_like(lower)
    out[:k, :k] = a_inv
    out[k:, k:] = d_inv
    out[k:, :k] = -(d_inv @ (lower[k:, :k] @ a_inv))
    return out


def damped_inverse_factor(
    hessian: torch.Tensor, damp: float = 0.01, *, name: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 in float64, after replacing the
    dead inputs (zero diagonal) by unit diagonal; also returns the dead-input mask and the
    relative damping used.

    A factorisation that fails (H indefinite in floating point) is retried with 10x the damping,
    at most ``DAMP_RETRIES`` times, with a warning; a Hessian with NaN/Inf entries (non-finite
    calibration inputs) or one that still does not factor raises, naming ``name`` and the damping.
    """
    h = hessian.to(F64).clone()
    if not bool(torch.isfinite(h).all()):
        raise ValueError(
            f"{name}: the calibration Hessian holds NaN or Inf (non-finite layer inputs); "
            "check the calibration data and the model's activations"
        )
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    mean_diag = float(h.diagonal().mean())
    used = damp
    for attempt in range(DAMP_RETRIES + 1):
        hd = h.clone()
        hd.diagonal().add_(used * mean_diag)
        # H = R R^T with R upper is the Cholesky factor of the reversed H, reversed; then
        # U = R^-1 is upper with U^T U = H^-1: one factorisation and one triangular inverse
        # instead of factor, invert and factor again
        rev, bad = torch.linalg.cholesky_ex(hd.flip(0, 1))
        if int(bad) == 0:
            u = lower_triangular_inverse(rev).flip(0, 1)
            if bool(torch.isfinite(u).all()):
                if attempt:
                    warnings.warn(
                        f"{name}: Cholesky of the damped Hessian failed at damp={damp:g}; "
                        f"succeeded at damp={used:g}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return u, dead, used
        used *= 10.0
    raise SingularHessianError(
        f"{name}: the damped Hessian H + damp*mean(diag H)*I is not positive definite even at "
        f"damp={used / 10:g} (started at {damp:g}, {DAMP_RETRIES} escalations): the calibration "
        "inputs are singular or badly scaled; raise damp or check the calibration data"
    )


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
    name: str = "layer",
    factor: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight matrix (rows x cols; a conv weight is flattened to
    (out, in*k*k)). Returns (new weight with the input's shape and dtype, keep-mask).

    ``sparsity`` is the fraction removed in every column block (ignored for N:M ``pattern``);
    ``prior_mask`` (keep-mask) forces already-pruned weights to stay pruned. Weights on inputs
    that are always zero (zero Hessian diagonal) cost nothing to remove and are removed first;
    the budget counts them like any other, so the mask always matches the weights.
    ``factor`` is :func:`damped_inverse_factor`'s output for this Hessian when already computed
    (layers sharing their input; its last entry is the damping actually used). Raises rather
    than return non-finite weights."""
    shape, dtype = weight.shape, weight.dtype
    w = weight.detach().reshape(shape[0], -1).to(F64).clone()
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"{name}: hessian must be {cols} x {cols} for this weight, got {tuple(hessian.shape)}"
        )
    if pattern is not None and (block % pattern[1] or cols % pattern[1] or SUB_BLOCK % pattern[1]):
        raise ValueError(
            f"{name}: N:M needs block ({block}) and the input width ({cols}) divisible by "
            f"M={pattern[1]}; exclude the layer"
        )
    u, dead, used = (
        factor if factor is not None else damped_inverse_factor(hessian, damp, name=name)
    )
    u = u.to(w.device)
    dead = dead.to(w.device)
    prior = None if prior_mask is None else prior_mask.reshape(rows, cols).to(w.device).bool()
    # a weight on an always-zero input costs nothing to remove: score 0, picked first
    alive = (~dead).to(F64)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for c0 in range(0, cols, block):
        c1 = min(c0 + block, cols)
        wb = w[:, c0:c1].clone()
        ub = u[c0:c1, c0:c1]
        errs = torch.zeros_like(wb)
        kb = torch.ones_like(wb, dtype=torch.bool)
        if pattern is None:
            kb = _keep_columns(
                wb, ub.diagonal(), sparsity, None if prior is None else prior[:, c0:c1],
                alive[c0:c1],
            )  # fmt: skip
        width = c1 - c0
        for s0 in range(0, width, SUB_BLOCK):
            # rank-one updates only inside a sub-block; the rest of the column block gets the
            # sub-block's errors in one matmul (same arithmetic, BLAS-3 instead of BLAS-1)
            s1 = min(s0 + SUB_BLOCK, width)
            for j in range(s0, s1):
                if pattern is not None and j % pattern[1] == 0:
                    n, m = pattern
                    score = wb[:, j : j + m].square() / ub.diagonal()[j : j + m].square()
                    score = score * alive[c0 + j : c0 + j + m]
                    if prior is not None:
                        score = torch.where(prior[:, c0 + j : c0 + j + m], score, -1.0)
                    drop = score.topk(m - n, dim=1, largest=False).indices
                    kb[:, j : j + m].scatter_(1, drop, False)
                    if prior is not None:
                        kb[:, j : j + m] &= prior[:, c0 + j : c0 + j + m]
                err = torch.where(kb[:, j], 0.0, wb[:, j]) / ub[j, j]
                wb[:, j:s1].addr_(err, ub[j, j:s1], alpha=-1.0)
                wb[:, j].masked_fill_(~kb[:, j], 0.0)
                errs[:, j] = err
            if s1 < width:
                wb[:, s1:].addmm_(errs[:, s0:s1], ub[s0:s1, s1:], alpha=-1.0)
        w[:, c0:c1] = wb
        w[:, c1:] -= errs @ u[c0:c1, c1:]
        keep[:, c0:c1] = kb
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError(
            f"{name}: SparseGPT produced non-finite weights at damp={used:g}; nothing written"
        )
    return w.to(dtype).reshape(shape), keep.reshape(shape)


def _keep_columns(
    wb: torch.Tensor,
    udiag: torch.Tensor,
    sparsity: float,
    prior: torch.Tensor | None,
    alive: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep-mask of one column block: drop the lowest w^2 / U_jj^2 (prior zeros first; weights
    on dead inputs, ``alive`` = 0, score 0)."""
    score = wb.square() / udiag.square()[None, :]
    if alive is not None:
        score = score * alive[None, :]
    if prior is not None:
        score = torch.where(prior, score, -1.0)
    count = round(sparsity * score.numel())
    if prior is not None:
        count = max(count, int((~prior).sum()))
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if count:
        keep &= ~lowest(score.reshape(-1), count)
    return keep.view(score.shape)


class HessianRecorder(InputStats):
    """Forward hooks accumulating H = 2 X^T X / n (float64) per layer from calibration passes."""

    def __init__(self, targets: Sequence[Target]) -> None:
        super().__init__(targets, "gram")

    def hessian(self, name: str) -> torch.Tensor:
        """2 X^T X / n for layer ``name``."""
        gram, count = self.get(name)
        return gram * (2.0 / max(count, 1))


@torch.no_grad()
def sparsegpt(
    model: nn.Module,
    data: Iterable[object],
    forward_fn: Callable[[nn.Module, object], object],
    sparsity: Sparsity | None,
    *,
    targets: Sequence[Target] | None = None,
    layers: LayerFilter = None,
    pattern: Pattern = None,
    block: int = 128,
    damp: float | None = 0.01,
    calib_batches: int = 32,
    sequential: bool = True,
    priors: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    info: dict[str, object] | None = None,
    refine: str = "none",
    pcg_iters: int = 50,
    pcg_tol: float = 1e-3,
    admm_iters: int = 40,
    admm_rho: float = 0.3,
    loss_fn: LossFn | None = None,
    fisher_weight: float = 0.0,
    fisher_grads: int = 32,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Prune ``targets`` of ``model`` in place with SparseGPT from ``calib_batches`` batches of
    ``data`` (``forward_fn(model, batch)`` runs the model). Returns (keep-masks, timings).

    ``sparsity``: one fraction for every layer, or a mapping layer name -> fraction (per-layer
    budgets such as :func:`mfac.prune.budgets.owl_sparsities`); with an N:M ``pattern`` it is
    None or 1 - N/M (:func:`mfac.prune.patterns.check_nm_sparsity` refuses anything else).
    Sequential mode prunes stage by stage, each stage calibrated on the outputs of the
    already-pruned stages before it (inputs captured once and propagated; see
    :mod:`mfac.prune.calibration`). ``damp=None`` sets each layer's damping from its calibration
    size (:func:`calibration_damp`; ``info["damp"]`` records it per layer). ``info``, when given,
    receives the schedule that ran and the damping used per layer where a failed Cholesky
    escalated it (``damp_escalated``). On any error the weights are restored.

    ``refine="pcg"`` refines every layer's weights on its SparseGPT mask by at most
    ``pcg_iters`` Jacobi-preconditioned CG iterations on the same damped Hessian
    (:func:`mfac.prune.refine.pcg_refine`); ``info["pcg"]`` gets each layer's report and
    ``info["pcg_not_converged"]`` the layers whose relative residual stayed above ``pcg_tol``
    (``pcg_max_iterations`` / ``pcg_max_residual``: the largest over the layers)
    (also one RuntimeWarning naming them). The CG time is ``timings["refine"]``.

    ``refine="admm"`` first searches each layer's mask by ADMM from SparseGPT's, keeping its
    size (or the N:M pattern) and never an input the calibration leaves at zero, in at most
    ``admm_iters`` iterations from the penalty ``admm_rho`` (:mod:`mfac.prune.admm`), then
    runs the same CG on the mask found; a layer whose result ends above SparseGPT's own layer
    error keeps SparseGPT's mask, refined (``info["admm_fallback"]``); layers whose mask was
    still changing after ``admm_iters`` are named in ``info["admm_unsettled"]`` and one
    RuntimeWarning. ``info["admm"]`` gets
    each layer's :class:`mfac.prune.admm.SearchReport` (``admm_max_iterations``, and
    ``admm_moved``: the mean share of a layer's kept weights the search moved).

    ``fisher_weight`` beta > 0 (with ``refine="pcg"`` or ``"admm"``) adds the empirical-Fisher
    loss model of ``fisher_grads`` gradients of ``loss_fn(model, batch)`` (a scalar loss), one per
    calibration batch, taken at the dense model before anything is pruned
    (:func:`mfac.prune.collect.gradient_buffer`; memory-mapped past half the free RAM), to
    every layer's CG objective (:mod:`mfac.prune.refine`); their time is
    ``timings["fisher_grads"]``.
    """
    if refine not in REFINES:
        raise ValueError(f"refine must be one of {', '.join(REFINES)}, got {refine!r}")
    if refine == "admm":
        check_positive_int(admm_iters, "admm_iters")
        check_damp(admm_rho, "admm_rho")
    joint = fisher_weight != 0
    if joint:
        check_fisher_request(refine, loss_fn, fisher_weight, fisher_grads)
    if targets is None:
        targets = find_targets(model, layers)
    check_layerwise_targets(targets)
    check_pattern_fits(targets, pattern)
    budgets = layer_budgets(targets, sparsity, pattern)
    if damp is not None:
        check_damp(damp)
    batches = calibration_batches(data, calib_batches)
    if joint and len(batches) < fisher_grads:
        raise ValueError(
            f"fisher_weight > 0 asks for fisher_grads={fisher_grads} gradients, one per "
            f"calibration batch, but the calibration data holds {len(batches)} batches; lower "
            "fisher_grads or pass more batches"
        )
    timings = {"collect": 0.0, "precompute": 0.0, "prune": 0.0}
    if refine != "none":
        timings["refine"] = 0.0
    grads: GradientBuffer | None = None
    segments: dict[str, Segment] = {}
    if joint:
        assert loss_fn is not None
        t0 = time.perf_counter()
        layout = Layout(targets, dict.fromkeys((t.name for t in targets), None))  # every entry
        grads = gradient_buffer(
            model, loss_fn, batches[:fisher_grads], layout, fisher_grads, progress=progress
        )
        segments = {t.name: seg for t, seg in zip(targets, layout.segments, strict=True)}
        timings["fisher_grads"] = time.perf_counter() - t0
    reports: dict[str, dict[str, object]] = {}
    masks: dict[str, torch.Tensor] = {}
    escalated: dict[str, float] = {}
    chosen: dict[str, float] = {}  # damp=None: each layer's damping from its calibration size
    bar = progress_bar(total=len(targets), desc="sparsegpt", disable=not progress)
    # the previous layer's Hessian and factor (q/k/v and gate/up read one input)
    last_h: torch.Tensor | None = None
    last_factor: tuple[torch.Tensor, torch.Tensor, float] | None = None
    seconds: dict[str, float] = {}

    # the ADMM search's eigendecomposition of the same damped Hessian
    last_eig: Eig | None = None
    searches: dict[str, dict[str, object]] = {}

    def prune_group(group: list[Target], stats: InputStats) -> None:
        nonlocal last_h, last_factor, last_eig
        for t in group:
            t1 = time.perf_counter()
            gram, count = stats.get(t.name)
            h = gram * (2.0 / max(count, 1))
            if damp is None:
                layer_damp = chosen[t.name] = calibration_damp(count, h.shape[0])
            else:
                layer_damp = damp
            prior = None if priors is None else priors[t.name]
            if last_h is None or last_factor is None or not torch.equal(last_h, h):
                last_h, last_factor = h, damped_inverse_factor(h, layer_damp, name=t.name)
                last_eig = None
            t2 = time.perf_counter()  # the Hessian and its factor are the precompute
            new, keep = prune_layer(
                t.param, h, budgets[t.name], pattern, block, damp=layer_damp, prior_mask=prior,
                name=t.name, factor=last_factor,
            )  # fmt: skip
            if refine != "none":
                t3 = time.perf_counter()
                rows = new.shape[0]
                g = None
                if grads is not None:  # this layer's m gradients, (m, rows * cols)
                    seg = segments[t.name]
                    g = grads.tensor[:, seg.offset : seg.offset + seg.size]
                a_damped = damped_gram(h, last_factor[2])
                dense = t.param.detach().reshape(rows, -1)
                start, start_keep = new.reshape(rows, -1), keep.reshape(rows, -1)
                if refine == "admm":
                    if last_eig is None:
                        last_eig = scaled_eig(a_damped)
                    allowed = ~last_factor[1].to(start_keep.device)[None, :].expand_as(start_keep)
                    if prior is not None:
                        allowed = allowed & prior.reshape(rows, -1).to(allowed.device).bool()
                    refined, found, search, report = search_refine(
                        dense, a_damped, start, start_keep, pattern, allowed=allowed,
                        iters=admm_iters, rho=admm_rho, eig=last_eig, pcg_iters=pcg_iters,
                        pcg_tol=pcg_tol, grads=g, fisher_weight=fisher_weight,
                    )  # fmt: skip
                    searches[t.name] = dataclasses.asdict(search)
                    keep = found.reshape(keep.shape)
                else:
                    refined, report = pcg_refine(
                        dense, start_keep, a_damped, start, iters=pcg_iters, tol=pcg_tol, grads=g,
                        fisher_weight=fisher_weight,
                    )  # fmt: skip
                if not bool(torch.isfinite(refined).all()):
                    raise FloatingPointError(f"{t.name}: PCG produced non-finite weights")
                new = refined.to(new.dtype).reshape(new.shape)
                reports[t.name] = dataclasses.asdict(report)
                timings["refine"] += time.perf_counter() - t3
            t.param.copy_(new)
            masks[t.name] = keep.cpu()
            if last_factor[2] != layer_damp:  # the damping the factor was escalated to
                escalated[t.name] = last_factor[2]
            timings["precompute"] += t2 - t1
            timings["prune"] += time.perf_counter() - t2
            seconds[t.name] = time.perf_counter() - t1
            bar.update(1)

    try:
        with restored_on_error([t.param for t in targets]):
            run_layerwise(
                model, targets, batches, forward_fn, "gram", prune_group,
                sequential=sequential, timings=timings, info=info,
            )  # fmt: skip
    finally:
        bar.close()
    if refine != "none":
        stuck = [name for name, r in reports.items() if not r["converged"]]
        if stuck:
            warnings.warn(
                f"PCG did not reach pcg_tol={pcg_tol:g} within {pcg_iters} iterations on "
                f"{_named(stuck)} (their weights are still no worse than SparseGPT's)",
                RuntimeWarning,
                stacklevel=2,
            )
        unsettled = [name for name, r in searches.items() if not r["settled"]]
        if unsettled:
            warnings.warn(
                f"the ADMM search's mask was still changing after admm_iters={admm_iters} on "
                f"{_named(unsettled)} (its last mask was used; never worse than SparseGPT's)",
                RuntimeWarning,
                stacklevel=2,
            )
        if info is not None:
            info["pcg"] = reports
            info["pcg_not_converged"] = stuck
            done = list(reports.values())
            info["pcg_max_iterations"] = max((int(r["iterations"]) for r in done), default=0)
            info["pcg_max_residual"] = max((float(r["residual"]) for r in done), default=0.0)
            if refine == "admm":
                info["admm"] = searches
                info["admm_fallback"] = [n for n, r in searches.items() if r["fallback"]]
                info["admm_unsettled"] = unsettled
                found = list(searches.values())
                info["admm_max_iterations"] = max((int(r["iterations"]) for r in found), default=0)
                info["admm_moved"] = sum(float(r["moved"]) for r in found) / max(len(found), 1)
    if info is not None:
        info["damp_escalated"] = escalated
        if damp is None:
            info["damp"] = chosen
        info["layer_seconds"] = seconds
        info["calib_batches"] = len(batches)
    return masks, timings


def _named(layers: list[str]) -> str:
    """'N layer(s): a, b, ...' naming at most eight of ``layers``."""
    more = " ..." if len(layers) > 8 else ""
    return f"{len(layers)} layer(s): {', '.join(layers[:8])}{more}"


def check_fisher_request(
    refine: str, loss_fn: LossFn | None, fisher_weight: float, fisher_grads: int
) -> None:
    """Refuse the Fisher term of the refinement without what it needs, before anything runs."""
    check_fisher_weight(fisher_weight)
    if refine == "none":
        raise ValueError(
            "fisher_weight > 0 is a term of the CG refinement: it needs refine='pcg' or 'admm'"
        )
    if loss_fn is None or not callable(loss_fn):
        raise ValueError(
            "fisher_weight > 0 needs loss_fn(model, batch) returning a scalar loss (the "
            "gradients of the Fisher term)"
        )
    check_positive_int(fisher_grads, "fisher_grads")


def run(req: Request, cfg: SparseGPTConfig) -> dict[str, torch.Tensor]:
    """``method="sparsegpt"``: one sequential (or single-pass) SparseGPT sweep over the targets,
    at the uniform or a per-layer budget."""
    assert req.data is not None and req.loss_fn is not None
    budget = resolve_budget(req, cfg, cfg.calib_batches)
    masks, timings = sparsegpt(
        req.model, req.data, req.loss_fn, budget,
        targets=req.targets, pattern=req.pattern, block=cfg.block, damp=cfg.damp,
        calib_batches=cfg.calib_batches, sequential=cfg.sequential, priors=req.priors,
        progress=cfg.progress, info=req.info, refine=cfg.refine, pcg_iters=cfg.pcg_iters,
        pcg_tol=cfg.pcg_tol, admm_iters=cfg.admm_iters, admm_rho=cfg.admm_rho,
        loss_fn=req.loss_fn, fisher_weight=cfg.fisher_weight, fisher_grads=cfg.fisher_grads,
    )  # fmt: skip
    req.timings.update(timings)
    return masks


METHOD = Method("sparsegpt", SparseGPTConfig, run, "layer-wise OBS from calibration inputs")
