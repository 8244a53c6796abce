"""``mfac prune``: one-shot pruning of a user's model with :func:`mfac.prune.oneshot`."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
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


#: Options left out when not set (``None`` or empty); ``block_size=None`` means one full block.
_UNSET_MEANS_DEFAULT = {"layers", "exclude", "damp", "memory_budget", "spill_dir", "layer_groups"}


def prune_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The keyword options of :func:`mfac.prune.oneshot` for the chosen method: every value
    the command line knows, kept where the library's own table ``OPTIONS`` accepts it."""
    from ..prune.api import OPTIONS

    budget = opts["memory_budget_gb"]
    values: dict[str, Any] = {
        "progress": show_progress(),
        "layers": opts["layers"],
        "exclude": opts["exclude"],
        "scope": opts["scope"],
        "num_grads": opts["num_grads"],
        "damp": opts["damp"],
        "damp_mode": opts["damp_mode"],
        "block_size": opts["block_size"],
        "recompute": opts["recompute"],
        "calib_batches": opts["calib_batches"],
        "memory_budget": None if budget is None else int(budget * 2**30),
        "spill_dir": None if opts["spill_dir"] is None else str(opts["spill_dir"]),
        "layer_groups": opts["layer_groups"],
        "iterations": opts["iterations"],
        "dense_steps": opts["dense_steps"],
        "lr": opts["lr"],
    }
    accepted = OPTIONS[opts["method"]]
    return {
        k: v
        for k, v in values.items()
        if k in accepted and not (k in _UNSET_MEANS_DEFAULT and not v)
    }


def check_combination(opts: dict[str, Any]) -> None:
    """Options that only make sense together, refused before anything is loaded."""
    if opts["method"] == "iobs" and opts["exclude"]:
        raise CLIError("--exclude is not supported by iobs: list the layers to prune with --layers")
    if opts["gradual_steps"] > 1 and opts["method"] == "iobs":
        raise CLIError("--gradual-steps > 1 is for the one-shot methods, not iobs")
    if opts["finetune_steps"] and opts["gradual_steps"] == 1:
        raise CLIError("--finetune-steps needs --gradual-steps > 1 (fine-tuning between steps)")
    if opts["layer_groups"] is not None and opts["scope"] != "layer" and not opts["pattern"]:
        raise CLIError("--layer-groups needs --scope layer or an N:M --pattern")


def run_prune(args: argparse.Namespace) -> int:
    """Load, check, measure, prune, measure again, write the outputs atomically."""
    opts = resolve(args, PRUNE_FIELDS, "prune")
    check_combination(opts)
    check_replaceable(opts["output"])
    if opts["spill_dir"] is not None:
        Path(opts["spill_dir"]).mkdir(parents=True, exist_ok=True)
    device = resolve_device(opts["device"])
    import torch

    from ..prune import METHODS, finetune, gradual, oneshot, save_masks
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
    layerwise = opts["method"] in ("sparsegpt", "iobs")
    count = opts["calib_batches"] if layerwise else opts["num_grads"]
    batches = data.sampled(count, opts["batch_size"], opts["seed"] + 1)
    options = prune_options(opts)
    if opts["method"] == "iobs":  # best iterate picked on other training batches, not on val
        options["val_data"] = data.sampled(count, opts["batch_size"], opts["seed"] + 2)
    log.info(
        "pruning with %s to %.1f%% sparsity%s",
        opts["method"],
        100 * opts["sparsity"],
        f" ({opts['pattern']})" if opts["pattern"] else "",
    )
    common = {"data": batches, "loss_fn": objective, "pattern": opts["pattern"], **options}
    if opts["gradual_steps"] > 1:
        tune_batches = data.sampled(
            max(1, opts["finetune_steps"]), opts["batch_size"], opts["seed"] + 3
        )

        def tune(model: Any, masks: dict[str, Any], _step: int) -> None:
            if opts["finetune_steps"]:
                adam = torch.optim.Adam(model.parameters(), lr=opts["lr"])
                finetune(model, objective, tune_batches, adam, opts["finetune_steps"], masks)

        steps = {"steps": opts["gradual_steps"], "finetune_fn": tune}
        result = gradual(loaded.model, opts["sparsity"], opts["method"], **steps, **common)[-1]
    else:
        result = oneshot(loaded.model, opts["sparsity"], opts["method"], **common)
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
        "options": {k: v for k, v in options.items() if k not in ("progress", "val_data")},
        "gradual_steps": opts["gradual_steps"],
        "finetune_steps": opts["finetune_steps"],
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
