"""``mfac prune``: one-shot pruning of a user's model with :func:`mfac.prune.oneshot`."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from .common import (
    CLIError,
    atomic_dir,
    check_replaceable,
    emit,
    fmt_bytes,
    peak_memory,
    resolve_device,
    show_progress,
    text_table,
    write_json,
)
from .recipe import PRUNE_FIELDS, resolve

log = logging.getLogger("mfac.cli")


def prune_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The keyword options of :func:`mfac.prune.oneshot` for the chosen method."""
    method = opts["method"]
    out: dict[str, Any] = {"progress": show_progress()}
    if opts["layers"]:
        out["layers"] = opts["layers"]
    if opts["exclude"]:
        out["exclude"] = opts["exclude"]
    if method == "sparsegpt":
        out["calib_batches"] = opts["calib_batches"]
        if opts["damp"] is not None:
            out["damp"] = opts["damp"]
        return out
    out["scope"] = opts["scope"]
    if method in ("diag-fisher", "mfac", "mfac-exact"):
        out["num_grads"] = opts["num_grads"]
        if opts["damp"] is not None:
            out["damp"] = opts["damp"]
    if method in ("mfac", "mfac-exact"):
        out["damp_mode"] = opts["damp_mode"]
        out["block_size"] = opts["block_size"]
        out["recompute"] = opts["recompute"]
    return out


def run_prune(args: argparse.Namespace) -> int:
    """Load, check, measure, prune, measure again, write the outputs atomically."""
    opts = resolve(args, PRUNE_FIELDS, "prune")
    check_replaceable(opts["output"])
    device = resolve_device(opts["device"])
    import torch

    from ..prune import METHODS, oneshot, save_masks
    from .data import Objective, load_data
    from .models import load_model, save_model
    from .report import bar_plot

    if opts["method"] not in METHODS:  # pragma: no cover - schema and library agree
        raise CLIError(f"--method {opts['method']!r} is not available in this mfac.prune")
    torch.manual_seed(opts["seed"])
    loaded = load_model(opts["model"], opts["checkpoint"], device)
    data = load_data(opts, loaded)
    objective = Objective(loaded, data, device)
    objective.check_fits(loaded.model)

    t0 = time.perf_counter()
    before = objective.evaluate(loaded.model, opts["batch_size"])
    log.info("before: %s", _fmt_metrics(before))
    count = opts["calib_batches"] if opts["method"] == "sparsegpt" else opts["num_grads"]
    batches = data.sampled(count, opts["batch_size"], opts["seed"] + 1)
    options = prune_options(opts)
    log.info(
        "pruning with %s to %.1f%% sparsity%s",
        opts["method"],
        100 * opts["sparsity"],
        f" ({opts['pattern']})" if opts["pattern"] else "",
    )
    result = oneshot(
        loaded.model,
        opts["sparsity"],
        opts["method"],
        data=batches,
        loss_fn=objective,
        pattern=opts["pattern"],
        **options,
    )
    after = objective.evaluate(loaded.model, opts["batch_size"])
    memory = peak_memory(device)

    layers = [
        {"layer": name, "weights": int(mask.numel()), "sparsity": result.layer_sparsity[name]}
        for name, mask in result.masks.items()
    ]
    report = {
        "command": "prune",
        "model": opts["model"],
        "checkpoint": opts["checkpoint"],
        "data": opts["data"],
        "data_description": data.description,
        "method": opts["method"],
        "target_sparsity": opts["sparsity"],
        "pattern": opts["pattern"],
        "achieved_sparsity": result.sparsity,
        "options": {k: v for k, v in options.items() if k != "progress"},
        "metric": objective.metric_name,
        "before": before,
        "after": after,
        "timings_s": {**result.timings, "wall": time.perf_counter() - t0},
        "memory": memory,
        "info": {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool))},
        "layers": layers,
        "files": {"masks": "masks.safetensors", "plot": "sparsity.png", "report": "report.json"},
    }
    out_dir = opts["output"]
    with atomic_dir(out_dir) as tmp:
        model_path = save_model(loaded, tmp)
        report["files"]["model"] = model_path.name
        save_masks(result.masks, tmp / "masks.safetensors")
        bar_plot(
            tmp / "sparsity.png",
            [r["layer"] for r in layers],
            [r["sparsity"] for r in layers],
            title=f"{opts['method']}: sparsity per layer ({100 * result.sparsity:.1f}% overall)",
            ylabel="sparsity",
        )
        write_json(tmp / "report.json", report)

    name = objective.metric_name
    emit(
        text_table(
            [
                {"": "before", name: before[name], "loss": before["loss"], "sparsity": 0.0},
                {
                    "": "after",
                    name: after[name],
                    "loss": after["loss"],
                    "sparsity": result.sparsity,
                },
            ],
            ["", name, "loss", "sparsity"],
        )
    )
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    emit(f"timings: {timings}; peak memory {fmt_bytes(memory['peak_rss_bytes'])}")
    emit(
        f"wrote {out_dir}/ ({report['files']['model']}, masks.safetensors, report.json, "
        "sparsity.png)"
    )
    return 0


def _fmt_metrics(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items())
