"""``mfac train``: train or fine-tune with :class:`mfac.optim.MFAC` (or SGD/Adam to compare),
optionally holding the masks of ``mfac prune``, with checkpoints that resume exactly.

A checkpoint holds the model, the optimizer's ``state_dict``, the torch RNG state, the
position (epoch, batch, step) and the hyper-parameters in effect. The batch order of epoch
``e`` is a permutation drawn from ``seed`` and ``e`` alone, so a resumed run sees the same
batches in the same order and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ..experiments.training import Position, fit
from .common import (
    MARKER,
    CLIError,
    atomic_dir,
    atomic_file,
    check_replaceable,
    emit,
    existing_path,
    one_line,
    progress,
    resolve_device,
    text_table,
    write_json,
)
from .options import resolve

log = logging.getLogger("mfac.cli")

#: Options that must match between a checkpoint and the run resuming it.
RESUME_KEYS = ("optimizer", "batch_size", "seed", "ngrads", "model")
#: Hyper-parameters a resumed run may change (applied and recorded); damp may not.
HYPER = ("lr", "momentum", "weight_decay", "damp")
RUN_FILES = ("checkpoint.pt", "train.json", "loss.png", "model.safetensors", "model")


def make_optimizer(name: str, params: Any, hp: dict[str, float], ngrads: int) -> Any:
    """The optimizer named by ``--optimizer`` with the run's hyper-parameters."""
    import torch

    lr, mom, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    from ..optim import MFAC

    return MFAC(params, lr=lr, ngrads=ngrads, damp=hp["damp"], momentum=mom, weight_decay=wd)


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
    resume = existing_path(cmd.resume, "checkpoint to resume") if cmd.resume else None
    masks_file = _masks_path(cmd.masks) if cmd.masks else None
    out_dir = prepare_output(cmd.output, resume is not None, cmd.overwrite)
    import torch

    from ..experiments.tasks import Objective
    from .data import load_data
    from .models import load_model
    from .report import line_plot

    torch.manual_seed(cmd.seed)
    loaded = load_model(cmd.model, cmd.checkpoint, device)
    model = loaded.model
    data = load_data(cmd, loaded)
    objective = Objective(data, device, hf=loaded.kind == "hf")
    objective.check_fits(model)
    per_epoch = math.ceil(len(data) / cmd.batch_size)  # batches per epoch, without building them

    hp = {k: getattr(cmd, k) for k in HYPER}
    ckpt = _read_checkpoint(resume, cmd, per_epoch) if resume is not None else None
    changed: dict[str, Any] = {}
    if ckpt is not None:
        hp, changed = _resumed_hyper(ckpt, hp, got.given)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cmd.optimizer, params, hp, cmd.ngrads)
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
    pos = Position()
    if ckpt is not None:
        pos = _restore(ckpt, resume, model, optimizer, hp)
        log.info("resumed from %s at epoch %d, batch %d (step %d)", resume, pos.epoch, pos.batch,
                 pos.step)  # fmt: skip
        for k, (was, now) in changed.items():
            log.warning("--resume: %s changed from %g to %g (applied)", k, was, now)

    def save(p: Position) -> None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}  # fmt: skip
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
            "epoch": p.epoch, "batch": p.batch, "step": p.step, "history": list(p.history),
            "evals": list(p.evals), "config": {k: str(getattr(cmd, k)) for k in RESUME_KEYS},
            "hyper": dict(hp),
        }  # fmt: skip
        with atomic_file(ckpt_path) as tmp:
            torch.save(state, tmp)

    t0 = time.perf_counter()
    try:
        fit(model, optimizer, objective, data, pos, epochs=cmd.epochs, batch_size=cmd.batch_size,
            seed=cmd.seed, max_steps=cmd.max_steps, save_every=cmd.save_every, save=save,
            bar=progress)  # fmt: skip
    finally:
        if holder is not None:
            holder.remove()
    wall = time.perf_counter() - t0
    if pos.stopped:
        log.info("stopped after %d steps (--max-steps); resume with --resume %s", pos.step,
                 ckpt_path)  # fmt: skip

    if loaded.kind == "hf":
        with atomic_dir(out_dir / "model") as tmp:
            loaded.model.save_pretrained(str(tmp), safe_serialization=True)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(str(tmp))
        model_name = "model/"
    else:
        from safetensors.torch import save_file

        with atomic_file(out_dir / "model.safetensors") as tmp:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            save_file(state, str(tmp), metadata={"format": "pt", "model": loaded.spec})
        model_name = "model.safetensors"
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
    p = existing_path(path, "masks")
    return existing_path(p / "masks.safetensors", "masks") if p.is_dir() else p


def _read_checkpoint(path: Path, cmd: Any, per_epoch: int) -> dict[str, Any]:
    """The checkpoint's contents, refused unless written by ``mfac train`` for this run's
    settings with a valid position (epoch, batch, step, history)."""
    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CLIError(f"could not read checkpoint {path}: {one_line(err, 200)}") from None
    need = {"model", "optimizer", "rng", "epoch", "batch", "step", "history", "evals"}
    if not isinstance(ckpt, dict) or not need <= set(ckpt):
        raise CLIError(f"{path} is not a checkpoint written by 'mfac train'")
    for key in RESUME_KEYS:
        was = ckpt.get("config", {}).get(key)
        if was is not None and was != str(getattr(cmd, key)):
            raise CLIError(
                f"--resume {path}: it was written with {key}={was}, this run has "
                f"{key}={getattr(cmd, key)}"
            )
    pos = {k: ckpt[k] for k in ("epoch", "batch", "step")}
    for key, value in pos.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CLIError(f"--resume {path}: {key} must be an integer >= 0, got {value!r}")
    if pos["batch"] > per_epoch:
        raise CLIError(
            f"--resume {path}: batch {pos['batch']} is past the {per_epoch} batches of an epoch"
        )
    history = ckpt["history"]
    if not isinstance(history, list) or len(history) != pos["step"]:
        raise CLIError(f"--resume {path}: step {pos['step']} does not match its loss history")
    if pos["step"] < pos["batch"] or pos["step"] > per_epoch * pos["epoch"] + pos["batch"]:
        raise CLIError(
            f"--resume {path}: step {pos['step']} is inconsistent with epoch {pos['epoch']}, "
            f"batch {pos['batch']}"
        )
    return ckpt


def _resumed_hyper(
    ckpt: dict[str, Any], hp: dict[str, float], given: set[str]
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """The hyper-parameters in effect after a resume: the checkpoint's, except those given on
    the command line or recipe (lr, momentum, weight decay; a different damp is refused)."""
    saved = ckpt.get("hyper") or {}
    out, changed = dict(hp), {}
    for key in HYPER:
        if key not in saved:
            continue
        was = float(saved[key])
        if key not in given or hp[key] == was:
            out[key] = was
        elif key == "damp":
            raise CLIError(
                f"--resume: the checkpoint's window was built with damp={was:g}; a different "
                f"--damp ({hp[key]:g}) needs a fresh run (or --damp {was:g})"
            )
        else:
            changed[key] = (was, hp[key])
    return out, changed


def _restore(
    ckpt: dict[str, Any], path: Path | None, model: Any, optimizer: Any, hp: dict[str, float]
) -> Position:
    import torch

    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        msg = f"--resume {path} does not fit this model/optimizer: {one_line(err, 200)}"
        raise CLIError(msg) from None
    for group in optimizer.param_groups:  # the values in effect (possibly changed on resume)
        for key in ("lr", "momentum", "weight_decay"):
            if key in group:
                group[key] = hp[key]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    history = [float(v) for v in ckpt["history"]]
    position = (int(ckpt[k]) for k in ("epoch", "batch", "step"))
    return Position(*position, history, list(ckpt["evals"]))
