"""``mfac.prune.oneshot``: one entry point for every pruning method."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .._validation import check_damp, check_positive_int
from ._layers import Layout, Target, current_masks, find_targets
from .collect import LossFn, squared_gradient_mean
from .exact import exact_step
from .layerwise import sparsegpt
from .patterns import Pattern, check_pattern_fits, check_sparsity, parse_pattern, select
from .result import PruneResult, summarize
from .saliency import build_inverse, diag_fisher_scores, magnitude_scores, obs_step

#: Largest float64 block inverse mfac-exact accepts (B = 4096 -> 128 MiB).
EXACT_BLOCK_BYTES = 8 * 4096**2

METHODS = ("magnitude", "diag-fisher", "mfac", "mfac-exact", "sparsegpt", "iobs")

COMMON = {"layers", "exclude", "scope", "progress"}
FISHER = {"num_grads", "damp", "damp_mode", "per_sample"}
OPTIONS = {
    "magnitude": COMMON,
    "diag-fisher": COMMON | {"num_grads", "damp", "per_sample"},
    "mfac": COMMON
    | FISHER
    | {"block_size", "recompute", "dtype", "memory_budget", "spill_dir", "layer_groups", "update"},
    "mfac-exact": COMMON
    | FISHER
    | {"block_size", "recompute", "memory_budget", "spill_dir", "layer_groups"},
    "sparsegpt": {"layers", "exclude", "progress", "block", "damp", "calib_batches", "sequential"},
    "iobs": {
        "val_data",
        "iterations",
        "dense_steps",
        "lr",
        "damp",
        "calib_batches",
        "layers",
        "optimizer",
        "val_fn",
        "callback",
        "sequential",
    },
}
DEFAULTS: dict[str, object] = {
    "scope": "global",
    "progress": True,
    "num_grads": 64,
    "damp": 1e-2,
    "damp_mode": "relative",
    "block_size": 128,
    "recompute": 1,
    "dtype": torch.float32,
    "memory_budget": None,
    "spill_dir": None,
    "layer_groups": None,
    "update": True,
    "per_sample": False,
}


def oneshot(
    model: nn.Module,
    sparsity: float,
    method: str = "mfac",
    *,
    data: Iterable[object] | None = None,
    loss_fn: LossFn | None = None,
    pattern: str | Sequence[int] | None = None,
    **options: object,
) -> PruneResult:
    """Prune the Linear/Conv weights of ``model`` in place to ``sparsity`` with ``method``.

    ``data`` is an iterable of batches and ``loss_fn(model, batch)`` returns a scalar loss
    (sparsegpt only runs it forward, for calibration). ``pattern`` is None (unstructured) or
    "N:M". Options: ``layers``/``exclude`` (names), ``scope`` ("global" or "layer" budget),
    ``num_grads`` (m), ``damp`` (relative by default), ``damp_mode``, ``block_size`` (None =
    full M-FAC), ``recompute`` (sub-steps with geometric density steps), ``dtype``,
    ``memory_budget``/``spill_dir`` (buffer paging), ``layer_groups`` (layers per separately
    built Fisher; needs a per-layer or N:M budget), ``update`` (OBS weight update on/off),
    ``per_sample`` (m per-sample gradients via torch.func instead of m mini-batch ones),
    ``progress``; sparsegpt: ``block``, ``damp``, ``calib_batches``, ``sequential``.

    Everything is validated first; on any error (including a NaN loss) the weights are restored
    and the model is left as it was.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    unknown = set(options) - OPTIONS[method]
    if unknown:
        raise TypeError(f"unknown options for method {method!r}: {sorted(unknown)}")
    sparsity = check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    if method == "iobs":
        return _iobs(model, sparsity, pattern, data, loss_fn, options)
    opts = {**DEFAULTS, **options}
    if method == "sparsegpt":
        opts.setdefault("block", 128)
        opts["damp"] = options.get("damp", 0.01)
    check_damp(opts["damp"])  # type: ignore[arg-type]
    check_positive_int(opts["recompute"], "recompute")  # type: ignore[arg-type]
    check_positive_int(opts["num_grads"], "num_grads")  # type: ignore[arg-type]
    if opts["scope"] not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {opts['scope']!r}")
    targets = find_targets(
        model, opts["layers"] if "layers" in opts else None, opts.get("exclude", ())
    )  # type: ignore[arg-type]
    check_pattern_fits(targets, nm)
    if method != "magnitude" and (data is None or loss_fn is None):
        raise ValueError(f"method {method!r} needs data= (batches) and loss_fn=(model, batch)")
    priors = current_masks(targets)
    if (
        method == "mfac-exact"
        and nm is not None
        and not all(bool(p.all()) for p in priors.values())
    ):
        raise ValueError("mfac-exact with an N:M pattern needs layers without pruned weights")
    if (
        method == "mfac-exact"
        and nm is not None
        and opts["block_size"]
        and opts["block_size"] % nm[1]
    ):  # type: ignore[operator]
        raise ValueError(f"mfac-exact with N:M needs block_size divisible by M={nm[1]}")
    if method == "mfac-exact":
        size = opts["block_size"] or sum(int(p.sum()) for p in priors.values())
        if 8 * int(size) ** 2 > EXACT_BLOCK_BYTES:  # type: ignore[call-overload]
            raise ValueError(
                f"mfac-exact keeps a dense float64 inverse per block; block_size={size} needs "
                f"{8 * int(size) ** 2 / 2**30:.1f} GiB per block: use block_size <= 4096"  # type: ignore[call-overload]
            )
    if opts["layer_groups"] is not None and nm is None and opts["scope"] != "layer":
        raise ValueError("layer_groups needs scope='layer' or an N:M pattern (budgets per layer)")

    backup = [t.param.detach().clone() for t in targets]
    start = time.perf_counter()
    timings = {"collect": 0.0, "precompute": 0.0, "prune": 0.0}
    info: dict[str, object] = {}
    try:
        masks = _run(
            model, targets, priors, sparsity, method, nm, data, loss_fn, opts, timings, info
        )
    except BaseException:
        with torch.no_grad():
            for t, b in zip(targets, backup, strict=True):
                t.param.copy_(b)
        raise
    timings["total"] = time.perf_counter() - start
    per, overall = summarize(masks)
    return PruneResult(method, sparsity, nm, masks, per, overall, timings, info)


def _iobs(
    model: nn.Module,
    sparsity: float,
    pattern: str | Sequence[int] | None,
    data: Iterable[object] | None,
    loss_fn: LossFn | None,
    options: dict[str, object],
) -> PruneResult:
    """I-OBS (the DNN variant of mfac.recovery.dnn): dense steps on the calibration loss
    alternating with a SparseGPT projection, keeping the best validation iterate. Without
    ``val_data`` the calibration batches double as the validation set."""
    from ..recovery.dnn import iobs_prune

    if data is None or loss_fn is None:
        raise ValueError("method 'iobs' needs data= (batches) and loss_fn=(model, batch)")
    batches = list(data)
    opts = dict(options)
    val = opts.pop("val_data", None)
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    try:
        out = iobs_prune(
            model,
            sparsity,
            data=batches,
            loss_fn=loss_fn,
            val_data=batches if val is None else val,
            pattern=pattern,
            **opts,  # type: ignore[arg-type]
        )
    except BaseException:
        model.load_state_dict(backup)
        raise
    per, overall = summarize(out.masks)
    info: dict[str, object] = {
        "val_losses": out.val_losses,
        "best_iteration": out.best_iteration,
        "train_losses": out.train_losses,
    }
    timings = {"total": time.perf_counter() - start}
    return PruneResult(
        "iobs", sparsity, parse_pattern(pattern), out.masks, per, overall, timings, info
    )


def _run(
    model: nn.Module,
    targets: list[Target],
    priors: dict[str, torch.Tensor],
    sparsity: float,
    method: str,
    nm: Pattern,
    data: Iterable[object] | None,
    loss_fn: LossFn | None,
    opts: dict[str, object],
    timings: dict[str, float],
    info: dict[str, object],
) -> dict[str, torch.Tensor]:
    scope = str(opts["scope"])
    prior_list = [priors[t.name] for t in targets]
    if method == "magnitude":
        t0 = time.perf_counter()
        new = select(magnitude_scores(targets), prior_list, sparsity, scope, nm)
        _zero(targets, new)
        timings["prune"] = time.perf_counter() - t0
        return dict(zip([t.name for t in targets], new, strict=True))
    assert data is not None and loss_fn is not None
    if method == "sparsegpt":
        masks, t = sparsegpt(
            model,
            data,
            loss_fn,
            sparsity,
            targets=targets,
            pattern=nm,
            block=int(opts["block"]),  # type: ignore[call-overload]
            damp=float(opts["damp"]),  # type: ignore[arg-type]
            calib_batches=int(opts.get("calib_batches", 32)),  # type: ignore[call-overload]
            sequential=bool(opts.get("sequential", True)),
            priors=priors,
            progress=bool(opts["progress"]),
        )
        timings.update(t)
        return masks
    if method == "diag-fisher":
        layout = Layout(targets, priors)
        t0 = time.perf_counter()
        fdiag = squared_gradient_mean(
            model,
            loss_fn,
            data,
            layout,
            int(opts["num_grads"]),  # type: ignore[call-overload]
            progress=bool(opts["progress"]),
            per_sample=bool(opts["per_sample"]),
        )
        t1 = time.perf_counter()
        new = select(
            diag_fisher_scores(layout, fdiag, float(opts["damp"])), prior_list, sparsity, scope, nm
        )  # type: ignore[arg-type]
        _zero(targets, new)
        timings["collect"], timings["prune"] = t1 - t0, time.perf_counter() - t1
        return dict(zip([t.name for t in targets], new, strict=True))
    # mfac / mfac-exact: optional layer groups, each with recomputation sub-steps
    groups = _groups(targets, opts["layer_groups"])
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        out.update(
            _fisher_prune(
                model, group, priors, sparsity, method, nm, data, loss_fn, opts, timings, info
            )
        )
    return out


def _groups(targets: list[Target], spec: object) -> list[list[Target]]:
    if spec is None:
        return [targets]
    if isinstance(spec, int):
        check_positive_int(spec, "layer_groups")
        return [targets[i : i + spec] for i in range(0, len(targets), spec)]
    names = {t.name: t for t in targets}
    return [[names[n] for n in group] for group in spec]  # type: ignore[attr-defined]


def density_steps(d0: float, d_final: float, steps: int) -> list[float]:
    """Geometric density interpolation d_j = d0 (d_final / d0)^(j / k), j = 1..k, as
    sparsities."""
    return [1.0 - d0 * (d_final / d0) ** (j / steps) for j in range(1, steps + 1)]


def _fisher_prune(
    model: nn.Module,
    targets: list[Target],
    priors: dict[str, torch.Tensor],
    sparsity: float,
    method: str,
    nm: Pattern,
    data: Iterable[object],
    loss_fn: LossFn,
    opts: dict[str, object],
    timings: dict[str, float],
    info: dict[str, object],
) -> dict[str, torch.Tensor]:
    masks = {t.name: priors[t.name] for t in targets}
    total = sum(t.numel for t in targets)
    d0 = sum(int(m.sum()) for m in masks.values()) / total
    steps = 1 if nm is not None else int(opts["recompute"])  # type: ignore[call-overload]
    schedule = [sparsity] if steps == 1 else density_steps(d0, 1.0 - sparsity, steps)
    for target in schedule:
        block = opts["block_size"]
        layout = Layout(targets, masks, block if block is not None else None)  # type: ignore[arg-type]
        if method == "mfac-exact" and block is None:
            block = layout.dim
        fisher = build_inverse(
            model,
            loss_fn,
            data,
            layout,
            num_grads=int(opts["num_grads"]),  # type: ignore[call-overload]
            block_size=block,  # type: ignore[arg-type]
            damp=float(opts["damp"]),  # type: ignore[arg-type]
            damp_mode=str(opts["damp_mode"]),
            dtype=opts.get("dtype", torch.float32),  # type: ignore[arg-type]
            memory_budget=opts["memory_budget"],  # type: ignore[arg-type]
            spill_dir=opts["spill_dir"],  # type: ignore[arg-type]
            progress=bool(opts["progress"]),
            timings=timings,
            per_sample=bool(opts["per_sample"]),
        )
        info["damp"] = fisher.damp
        info["memory_mapped"] = bool(info.get("memory_mapped")) or fisher.memory_mapped
        t0 = time.perf_counter()
        prior_list = [masks[t.name] for t in targets]
        scope = str(opts["scope"])
        if method == "mfac":
            new = obs_step(
                targets,
                prior_list,
                fisher,
                layout,
                target,
                scope=scope,
                pattern=nm,
                update=bool(opts["update"]),
            )
        else:
            new = exact_step(targets, prior_list, fisher, layout, target, scope=scope, pattern=nm)
        timings["prune"] += time.perf_counter() - t0
        masks = dict(zip([t.name for t in targets], new, strict=True))
        del fisher
    return masks


@torch.no_grad()
def _zero(targets: list[Target], masks: list[torch.Tensor]) -> None:
    for t, m in zip(targets, masks, strict=True):
        t.param.mul_(m.to(t.param.device, t.param.dtype))
