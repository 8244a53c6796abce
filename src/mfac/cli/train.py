"""``mfac train``: train or fine-tune with :class:`mfac.MFACSGD`, the paper's step (or SGD/Adam
to compare), optionally holding the masks of ``mfac prune``, with checkpoints that resume
exactly (the loop and the checkpoints are those of :mod:`mfac.experiments.training`)."""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ..experiments import training
from ..experiments.report import text_table
from .common import (
    MARKER,
    CLIError,
    atomic_file,
    check_replaceable,
    emit,
    existing_path,
    progress,
    resolve_device,
    set_threads,
    write_json,
)
from .options import resolve

log = logging.getLogger("mfac.cli")

RUN_FILES = ("checkpoint.pt", "train.json", "loss.png", "model.safetensors", "model")


def prepare_output(out: Path, resume: bool, overwrite: bool) -> Path:
    """Refuse a folder mfac did not write, the current folder, and an earlier run (unless
    resuming or overwriting); check it is writable; remove temporary files a killed run left."""
    target = check_replaceable(out, probe=True)
    earlier = [n for n in RUN_FILES if (target / n).exists()]
    if earlier and not (resume or overwrite):
        raise CLIError(
            f"output folder {target} holds an earlier run ({', '.join(earlier)}); "
            "continue it with --resume, or replace it with --overwrite"
        )
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER).write_text("written by the mfac command line; safe to replace\n")
    for name in RUN_FILES:
        for stale in target.glob(f".{name}.*.tmp"):
            log.info("removing %s (left by an interrupted run)", stale.name)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return target


def run_train(args: argparse.Namespace) -> int:
    """The training loop with checkpoints; returns the exit code."""
    got = resolve(args, "train", strict=False)
    cmd = got.command
    device = resolve_device(cmd.device)
    set_threads(cmd.threads)
    resume = existing_path(cmd.resume, "checkpoint to resume") if cmd.resume else None
    masks_file = _masks_path(cmd.masks) if cmd.masks else None
    out_dir = prepare_output(cmd.output, resume is not None, cmd.overwrite)
    import torch

    from ..experiments.report import line_plot
    from ..experiments.tasks import Objective
    from .data import load_data
    from .models import load_model, save_model

    torch.manual_seed(cmd.seed)
    loaded = load_model(cmd.model, cmd.checkpoint, device)
    model = loaded.model
    data = load_data(cmd, loaded)
    objective = Objective(data, device, hf=loaded.kind == "hf")
    objective.check_fits(model)
    per_epoch = math.ceil(len(data) / cmd.batch_size)  # batches per epoch, without building them

    hp = {k: getattr(cmd, k) for k in training.HYPER}
    settings = {k: getattr(cmd, k) for k in training.RESUME_KEYS}
    ckpt = training.read_checkpoint(resume, settings, per_epoch) if resume is not None else None
    changed: dict[str, Any] = {}
    if ckpt is not None:
        hp, changed = training.resumed_hyper(ckpt, hp, got.given)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = training.make_optimizer(cmd.optimizer, params, hp, cmd.ngrads)
    holder = None
    if masks_file is not None:
        from ..prune import hold_masks, load_masks

        masks = load_masks(str(masks_file))
        holder = hold_masks(model, masks, optimizer)
        if hasattr(optimizer, "set_masks"):
            modules = dict(model.named_modules())
            optimizer.set_masks({modules[n].weight: m.to(device) for n, m in masks.items()})
        log.info("masks: %s (%d layers held at their zeros)", masks_file, len(masks))

    ckpt_path = out_dir / "checkpoint.pt"
    pos = training.Position()
    if ckpt is not None:
        pos = training.restore(ckpt, resume, model, optimizer, hp)
        log.info("resumed from %s at epoch %d, batch %d (step %d)", resume, pos.epoch, pos.batch,
                 pos.step)  # fmt: skip
        for k, (was, now) in changed.items():
            log.warning("--resume: %s changed from %g to %g (applied)", k, was, now)

    t0 = time.perf_counter()
    try:
        training.fit(
            model, optimizer, objective, data, pos, epochs=cmd.epochs, batch_size=cmd.batch_size,
            seed=cmd.seed, max_steps=cmd.max_steps, save_every=cmd.save_every, bar=progress,
            save=lambda p: training.save_checkpoint(ckpt_path, model, optimizer, p, settings, hp),
        )  # fmt: skip
    finally:
        if holder is not None:
            holder.remove()
    wall = time.perf_counter() - t0
    if pos.stopped:
        log.info("stopped after %d steps (--max-steps); resume with --resume %s", pos.step,
                 ckpt_path)  # fmt: skip

    model_name = "model/" if loaded.kind == "hf" else "model.safetensors"
    save_model(loaded, out_dir / model_name)
    summary = {
        "command": "train", "model": cmd.model, "optimizer": cmd.optimizer,
        "options": {**hp, "ngrads": cmd.ngrads, "batch_size": cmd.batch_size,
                    "epochs": cmd.epochs, "seed": cmd.seed},
        "changed_on_resume": {k: {"was": a, "now": b} for k, (a, b) in changed.items()},
        "masks": masks_file, "steps": pos.step, "epochs_done": pos.epoch,
        "stopped_early": pos.stopped, "wall_s_this_run": wall, "metric": objective.metric_name,
        "evals": pos.evals, "loss_history": pos.history,
    }  # fmt: skip
    write_json(out_dir / "train.json", summary)
    if pos.history:
        with atomic_file(out_dir / "loss.png") as tmp:
            line_plot(
                tmp, {cmd.optimizer: (range(1, len(pos.history) + 1), pos.history)},
                title="training loss", xlabel="step", ylabel="loss",
            )  # fmt: skip
    if pos.evals:
        emit(text_table(pos.evals, list(pos.evals[0])))
    emit(f"wrote {cmd.output}/ ({model_name}, checkpoint.pt, train.json, loss.png)")
    return 0


def _masks_path(path: Path) -> Path:
    """A masks file, or the one inside a ``mfac prune`` output (``masks.safetensors``, or
    ``model/mfac_masks.safetensors`` for a Hugging Face model) or a pruned model folder."""
    p = existing_path(path, "masks")
    if not p.is_dir():
        return p
    for name in ("masks.safetensors", "model/mfac_masks.safetensors", "mfac_masks.safetensors"):
        if (p / name).is_file():
            return p / name
    return existing_path(p / "masks.safetensors", "masks")
