"""``mfac prune``: prune a user's model with :func:`mfac.prune.oneshot` (or gradually, or
I-OBS), measure it before and after, and write the outputs atomically."""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any

from .._config import options_of
from ..experiments.report import bar_plot, text_table
from ..prune import REGISTRY
from ..prune.patterns import check_nm_sparsity, parse_pattern
from .common import (
    CLIError,
    atomic_dir,
    check_replaceable,
    emit,
    fmt_bytes,
    peak_memory,
    progress,
    resolve_device,
    set_threads,
    show_progress,
    write_json,
)
from .options import resolve

log = logging.getLogger("mfac.cli")
_NOT_REPORTED = ("progress", "val_data", "val_fn", "callback")


def check_combination(cmd: Any, options: dict[str, Any]) -> None:
    """Options that only make sense together, refused before anything is loaded."""
    if cmd.pattern and cmd.gradual_steps > 1:
        raise CLIError("--gradual-steps > 1 cannot follow a schedule with an N:M --pattern")
    if cmd.gradual_steps > 1 and cmd.method == "iobs":
        raise CLIError("--gradual-steps > 1 is for the one-shot methods, not iobs")
    if cmd.finetune_steps and cmd.gradual_steps == 1:
        raise CLIError("--finetune-steps needs --gradual-steps > 1 (fine-tuning between steps)")
    if options.get("layer_groups") is not None and options.get("scope") != "layer":
        if not cmd.pattern:
            raise CLIError("--layer-groups needs --scope layer or an N:M --pattern")


def run_prune(args: argparse.Namespace) -> int:
    """Load, check, measure, prune, measure again, write the outputs atomically."""
    got = resolve(args, "prune", strict=False)
    cmd, options = got.command, got.method
    if cmd.method == "iobs" and "exclude" in got.ignored:
        raise CLIError("--exclude is not supported by iobs: list the layers to prune with --layers")
    if got.ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in got.ignored)
        log.warning("ignored (not options of %s): %s", cmd.method, flags)
    check_combination(cmd, options)
    try:  # with a pattern the sparsity is 1 - N/M; a contradicting --sparsity is refused
        default = 0.5 if cmd.sparsity is None and not cmd.pattern else cmd.sparsity
        sparsity = check_nm_sparsity(default, parse_pattern(cmd.pattern))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    check_replaceable(cmd.output, probe=True)
    if options.get("spill_dir") is not None:
        options["spill_dir"].mkdir(parents=True, exist_ok=True)
    fields = {o.name for o in options_of(REGISTRY[cmd.method].config)}
    if cmd.memory_budget_gb is not None and "memory_budget" in fields:
        options["memory_budget"] = int(cmd.memory_budget_gb * 2**30)
    if "progress" in fields:
        options["progress"] = show_progress()
    device = resolve_device(cmd.device)
    import torch

    set_threads(cmd.threads)

    from ..experiments.tasks import Objective
    from ..prune import finetune, gradual, oneshot, save_masks, save_sparse
    from ..prune.export import MASKS_FILE, save_pretrained_sparse, saved_sparsity
    from .data import load_data
    from .models import load_model, save_model

    config = REGISTRY[cmd.method].config(**options)
    torch.manual_seed(cmd.seed)
    loaded = load_model(cmd.model, cmd.checkpoint, device)
    data = load_data(cmd, loaded)
    objective = Objective(data, device, hf=loaded.kind == "hf")
    objective.check_fits(loaded.model)
    if cmd.checkpoint is None and loaded.kind == "factory" and not cmd.random_weights:
        raise CLIError(
            "--model is a factory and no --checkpoint was given: this would prune the "
            "factory's initial (random) weights; pass --checkpoint, or --random-weights"
        )

    # text: one token window per calibration batch (or gradient), as the measured recipe
    # (docs/prune.md 2b: 32 windows of 128 tokens, drawn without replacement)
    calib_size = cmd.batch_size or (1 if data.task == "lm" else 32)
    eval_size = cmd.batch_size or 32
    t0 = time.perf_counter()
    before = objective.evaluate(loaded.model, eval_size, "before", progress)
    log.info("before: %s", _fmt_metrics(before))
    count = _batches_needed(config)
    batches = data.sampled(count, calib_size, cmd.seed + 1)
    log.info("calibration: %d batches of %d samples (drawn without replacement from %d)",
             count, min(calib_size, len(data)), len(data))  # fmt: skip
    if cmd.method == "iobs":  # best iterate picked on other training batches, not on val
        options["val_data"] = data.sampled(count, calib_size, cmd.seed + 2)
    log.info(
        "pruning with %s to %.1f%% sparsity%s", cmd.method, 100 * sparsity,
        f" ({cmd.pattern})" if cmd.pattern else "",
    )  # fmt: skip
    common = {"data": batches, "loss_fn": objective, "pattern": cmd.pattern, **options}
    if cmd.gradual_steps > 1:
        tune_batches = data.sampled(max(1, cmd.finetune_steps), calib_size, cmd.seed + 3)

        def tune(model: Any, masks: dict[str, Any], _step: int) -> None:
            if cmd.finetune_steps:
                adam = torch.optim.Adam(model.parameters(), lr=cmd.finetune_lr)
                finetune(model, objective, tune_batches, adam, cmd.finetune_steps, masks)

        steps = {"steps": cmd.gradual_steps, "finetune_fn": tune}
    with warnings.catch_warnings(record=True) as caught:  # the library's warnings as log lines
        warnings.simplefilter("always", UserWarning)
        if cmd.gradual_steps > 1:
            result = gradual(loaded.model, sparsity, cmd.method, **steps, **common)[-1]
        else:
            result = oneshot(loaded.model, sparsity, cmd.method, **common)
    for w in caught:
        if issubclass(w.category, (UserWarning, RuntimeWarning)):
            log.warning("%s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    after = objective.evaluate(loaded.model, eval_size, "after", progress)
    schedule = result.info.get("schedule")
    if schedule:
        why = result.info.get("schedule_reason")
        log.info("calibration schedule: %s%s", schedule, f" ({why})" if why else "")
    memory = peak_memory(device)

    tied: dict[str, list[str]] = result.info.get("tied", {})  # type: ignore[assignment]
    layers = [
        {"layer": name, "weights": int(mask.numel()), "sparsity": result.layer_sparsity[name],
         **({"tied_to": tied[name]} if name in tied else {})}
        for name, mask in result.masks.items()
    ]  # fmt: skip
    report = {
        "command": "prune", "model": cmd.model, "checkpoint": cmd.checkpoint, "data": cmd.data,
        "val_data": cmd.val_data, "data_description": data.description, "method": cmd.method,
        "target_sparsity": sparsity, "pattern": cmd.pattern,
        "achieved_sparsity": result.sparsity,
        "options": {k: v for k, v in config.as_dict().items() if k not in _NOT_REPORTED},
        "gradual_steps": cmd.gradual_steps, "finetune_steps": cmd.finetune_steps,
        "metric": objective.metric_name, "before": before, "after": after,
        "timings_s": {**result.timings, "wall": time.perf_counter() - t0}, "memory": memory,
        "info": {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool))},
        "tied": tied, "calibration": {"batches": count, "batch_size": calib_size},
        "layers": layers,
        "files": {"plot": "sparsity.png", "report": "report.json"},
    }  # fmt: skip
    with atomic_dir(cmd.output) as tmp:
        if loaded.kind == "hf":  # a folder transformers loads without mfac, recipe beside it
            recipe = {k: report[k] for k in ("method", "target_sparsity", "pattern", "options")}
            saved = save_pretrained_sparse(loaded.model, result.masks, tmp / "model", recipe)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(str(tmp / "model"))
            report["files"]["model"] = "model"
            report["files"]["masks"] = f"model/{MASKS_FILE}"  # written once, beside the weights
        else:
            save_model(loaded, tmp / "model.safetensors")
            report["files"]["model"] = "model.safetensors"
            saved = saved_sparsity(tmp, result.masks)
            save_masks(result.masks, tmp / "masks.safetensors")
            report["files"]["masks"] = "masks.safetensors"
        report["saved_sparsity"] = saved["sparsity"]
        if cmd.sparse_file:
            save_sparse(loaded.model, result.masks, tmp / "model.sparse.safetensors")
            report["files"]["sparse"] = "model.sparse.safetensors"
        sparsity_plot(tmp / "sparsity.png", layers, cmd.method, result.sparsity)
        write_json(tmp / "report.json", report)

    name = objective.metric_name
    rows = [
        {"": "before", name: before[name], "loss": before["loss"], "sparsity": 0.0},
        {"": "after", name: after[name], "loss": after["loss"], "sparsity": result.sparsity},
    ]
    emit(text_table(rows, ["", name, "loss", "sparsity"]))
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    emit(f"timings: {timings}; peak memory {fmt_bytes(memory['peak_rss_bytes'])}")
    files = f"{report['files']['model']}, {report['files']['masks']}, report.json, sparsity.png"
    emit(f"wrote {cmd.output}/ ({files})")
    return 0


#: Past this many layers the plot shows one bar per stage (a transformer block), not per layer.
PLOT_LAYERS = 48


def sparsity_plot(path: Any, layers: list[dict[str, Any]], method: str, overall: float) -> None:
    """Sparsity per layer as horizontal bars, the figure's height growing with their count; past
    :data:`PLOT_LAYERS` layers, one bar per stage (weight-weighted mean of its layers) with the
    spread of its layers marked."""
    from ..prune.calibration import stage_name

    labels = [r["layer"] for r in layers]
    values = [r["sparsity"] for r in layers]
    spread = None
    what = "layer"
    if len(layers) > PLOT_LAYERS:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in layers:
            groups.setdefault(stage_name(r["layer"]), []).append(r)
        labels = [f"{k} ({len(g)})" for k, g in groups.items()]
        values = [sum(r["sparsity"] * r["weights"] for r in g) / sum(r["weights"] for r in g)
                  for g in groups.values()]  # fmt: skip
        spread = [(min(r["sparsity"] for r in g), max(r["sparsity"] for r in g))
                  for g in groups.values()]  # fmt: skip
        what = "stage (its layers in parentheses, whiskers: their range)"
    bar_plot(
        path, labels, values, title=f"{method}: {100 * overall:.1f}% overall\nsparsity per {what}",
        ylabel="sparsity", horizontal=True, spread=spread,
    )  # fmt: skip


def _batches_needed(config: Any) -> int:
    """Batches to draw for the method: m gradients, or the calibration batches (I-OBS
    without its own count uses SparseGPT's default)."""
    from ..prune.methods.sparsegpt import SparseGPTConfig

    if hasattr(config, "num_grads"):
        return int(config.num_grads)
    count = getattr(config, "calib_batches", None)
    return int(count if count is not None else SparseGPTConfig.calib_batches)


def _fmt_metrics(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items())
