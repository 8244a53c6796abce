"""``mfac prune``: prune a user's model with :func:`mfac.prune.oneshot` (or gradually, or
I-OBS), measure it before and after, and write the outputs atomically."""

from __future__ import annotations

import argparse
import logging
import time
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

    from ..experiments.tasks import Objective
    from ..prune import finetune, gradual, oneshot, save_masks, save_sparse
    from ..prune.export import save_pretrained_sparse, saved_sparsity
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

    t0 = time.perf_counter()
    before = objective.evaluate(loaded.model, cmd.batch_size, "before", progress)
    log.info("before: %s", _fmt_metrics(before))
    count = _batches_needed(config)
    batches = data.sampled(count, cmd.batch_size, cmd.seed + 1)
    if cmd.method == "iobs":  # best iterate picked on other training batches, not on val
        options["val_data"] = data.sampled(count, cmd.batch_size, cmd.seed + 2)
    log.info(
        "pruning with %s to %.1f%% sparsity%s", cmd.method, 100 * sparsity,
        f" ({cmd.pattern})" if cmd.pattern else "",
    )  # fmt: skip
    common = {"data": batches, "loss_fn": objective, "pattern": cmd.pattern, **options}
    if cmd.gradual_steps > 1:
        tune_batches = data.sampled(max(1, cmd.finetune_steps), cmd.batch_size, cmd.seed + 3)

        def tune(model: Any, masks: dict[str, Any], _step: int) -> None:
            if cmd.finetune_steps:
                adam = torch.optim.Adam(model.parameters(), lr=cmd.finetune_lr)
                finetune(model, objective, tune_batches, adam, cmd.finetune_steps, masks)

        steps = {"steps": cmd.gradual_steps, "finetune_fn": tune}
        result = gradual(loaded.model, sparsity, cmd.method, **steps, **common)[-1]
    else:
        result = oneshot(loaded.model, sparsity, cmd.method, **common)
    after = objective.evaluate(loaded.model, cmd.batch_size, "after", progress)
    memory = peak_memory(device)

    layers = [
        {"layer": name, "weights": int(mask.numel()), "sparsity": result.layer_sparsity[name]}
        for name, mask in result.masks.items()
    ]
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
        "layers": layers,
        "files": {"masks": "masks.safetensors", "plot": "sparsity.png", "report": "report.json"},
    }  # fmt: skip
    with atomic_dir(cmd.output) as tmp:
        if loaded.kind == "hf":  # a folder transformers loads without mfac, recipe beside it
            recipe = {k: report[k] for k in ("method", "target_sparsity", "pattern", "options")}
            saved = save_pretrained_sparse(loaded.model, result.masks, tmp / "model", recipe)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(str(tmp / "model"))
            report["files"]["model"] = "model"
        else:
            save_model(loaded, tmp / "model.safetensors")
            report["files"]["model"] = "model.safetensors"
            saved = saved_sparsity(tmp, result.masks)
        report["saved_sparsity"] = saved["sparsity"]
        save_masks(result.masks, tmp / "masks.safetensors")
        if cmd.sparse_file:
            save_sparse(loaded.model, result.masks, tmp / "model.sparse.safetensors")
            report["files"]["sparse"] = "model.sparse.safetensors"
        bar_plot(
            tmp / "sparsity.png", [r["layer"] for r in layers], [r["sparsity"] for r in layers],
            title=f"{cmd.method}: sparsity per layer ({100 * result.sparsity:.1f}% overall)",
            ylabel="sparsity",
        )  # fmt: skip
        write_json(tmp / "report.json", report)

    name = objective.metric_name
    rows = [
        {"": "before", name: before[name], "loss": before["loss"], "sparsity": 0.0},
        {"": "after", name: after[name], "loss": after["loss"], "sparsity": result.sparsity},
    ]
    emit(text_table(rows, ["", name, "loss", "sparsity"]))
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    emit(f"timings: {timings}; peak memory {fmt_bytes(memory['peak_rss_bytes'])}")
    files = f"{report['files']['model']}, masks.safetensors, report.json, sparsity.png"
    emit(f"wrote {cmd.output}/ ({files})")
    return 0


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
