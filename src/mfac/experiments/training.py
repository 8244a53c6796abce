"""A resumable training loop: epochs of shuffled mini-batches whose order depends only on the
seed and the epoch, so that a run resumed at (epoch, batch, step) with the same model,
optimizer and RNG states sees the same batches and ends bit-identical to an uninterrupted one.

A checkpoint (:func:`save_checkpoint`) holds the model, the optimizer's ``state_dict``, the
torch RNG state, the position, the settings that must match on resume and the
hyper-parameters in effect; :func:`read_checkpoint` refuses one that does not fit the run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._paths import atomic_file
from .tasks import Dataset, Objective

log = logging.getLogger("mfac.experiments")

#: Settings that must match between a checkpoint and the run resuming it.
RESUME_KEYS = ("optimizer", "batch_size", "seed", "ngrads", "model")
#: Hyper-parameters a resumed run may change (applied and recorded); damp may not.
HYPER = ("lr", "momentum", "weight_decay", "damp")


@dataclass
class Position:
    """Where a run stands: ``batch`` batches of epoch ``epoch`` done, ``step`` optimizer steps
    in all, the loss of every step and the held-out metrics after every epoch."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False


def fit(
    model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, data: Dataset,
    pos: Position, *, epochs: int, batch_size: int, seed: int, max_steps: int | None = None,
    save_every: int = 0, save: Callable[[Position], None] = lambda pos: None, bar: Any = None,
) -> Position:  # fmt: skip
    """Train from ``pos`` up to ``epochs`` (or ``max_steps`` steps in all), calling
    ``save(pos)`` after every ``save_every`` steps, at the end of every epoch and when
    stopping; a non-finite loss raises ValueError before the step is taken. ``bar`` is a
    tqdm-like progress-bar factory (None: no bar)."""
    while pos.epoch < epochs and not pos.stopped:
        batches = data.batches(batch_size, shuffle=True, seed=seed * 100_003 + pos.epoch)
        model.train()
        desc, n = f"epoch {pos.epoch + 1}/{epochs}", len(batches)
        progress = bar(total=n, desc=desc, unit="batch", initial=pos.batch) if bar else None
        for i in range(pos.batch, len(batches)):
            optimizer.zero_grad(set_to_none=True)
            loss = objective(model, batches[i])
            if not torch.isfinite(loss):
                raise ValueError(
                    f"the loss is {float(loss)} at step {pos.step + 1}: lower the learning rate "
                    "(this step was not taken)"
                )
            loss.backward()
            optimizer.step()
            pos.step, pos.batch = pos.step + 1, i + 1
            pos.history.append(float(loss.detach()))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{pos.history[-1]:.4f}")
            pos.stopped = max_steps is not None and pos.step >= max_steps
            if pos.stopped or (save_every and pos.step % save_every == 0):
                save(pos)
            if pos.stopped:
                break
        if progress is not None:
            progress.close()
        if pos.stopped:
            break
        metrics = objective.evaluate(model, batch_size, "held-out", bar or iter)
        pos.evals.append({"epoch": pos.epoch + 1, "step": pos.step, **metrics})
        mean = sum(pos.history[-len(batches) :]) / max(len(batches), 1)
        log.info("epoch %d: train loss %.4f, held-out %s", pos.epoch + 1, mean,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
        pos.epoch, pos.batch = pos.epoch + 1, 0
        save(pos)
    return pos


def make_optimizer(name: str, params: Any, hp: dict[str, float], ngrads: int) -> Any:
    """The optimizer ``name`` ("mfac", "sgd" or "adam") with the hyper-parameters ``hp``."""
    lr, mom, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    from ..optim import MFACSGD

    return MFACSGD(
        params, lr=lr, momentum=mom, weight_decay=wd, ngrads=ngrads, damp=hp["damp"]
    )


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: Any, pos: Position, settings: dict[str, Any],
    hp: dict[str, float],
) -> None:  # fmt: skip
    """Write the checkpoint of ``pos`` atomically: a killed run leaves the previous one whole.
    ``settings``: the values of :data:`RESUME_KEYS`; ``hp``: the hyper-parameters in effect."""
    cuda = any(p.is_cuda for p in model.parameters())
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []}
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
        "epoch": pos.epoch, "batch": pos.batch, "step": pos.step, "history": list(pos.history),
        "evals": list(pos.evals), "config": {k: str(v) for k, v in settings.items()},
        "hyper": dict(hp),
    }  # fmt: skip
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path, settings: dict[str, Any], per_epoch: int) -> dict[str, Any]:
    """The checkpoint's contents, refused (ValueError) unless written by ``mfac train`` with
    the same ``settings`` and a valid position (epoch, batch, step, history) for epochs of
    ``per_epoch`` batches."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read checkpoint {path}: {_squeeze(err)}") from None
    need = {"model", "optimizer", "rng", "epoch", "batch", "step", "history", "evals"}
    if not isinstance(ckpt, dict) or not need <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint written by 'mfac train'")
    for key, now in settings.items():
        was = ckpt.get("config", {}).get(key)
        if was is not None and was != str(now):
            raise ValueError(
                f"--resume {path}: it was written with {key}={was}, this run has {key}={now}"
            )
    pos = {k: ckpt[k] for k in ("epoch", "batch", "step")}
    for key, value in pos.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"--resume {path}: {key} must be an integer >= 0, got {value!r}")
    if pos["batch"] > per_epoch:
        raise ValueError(
            f"--resume {path}: batch {pos['batch']} is past the {per_epoch} batches of an epoch"
        )
    history = ckpt["history"]
    if not isinstance(history, list) or len(history) != pos["step"]:
        raise ValueError(f"--resume {path}: step {pos['step']} does not match its loss history")
    if pos["step"] < pos["batch"] or pos["step"] > per_epoch * pos["epoch"] + pos["batch"]:
        raise ValueError(
            f"--resume {path}: step {pos['step']} is inconsistent with epoch {pos['epoch']}, "
            f"batch {pos['batch']}"
        )
    return ckpt


def resumed_hyper(
    ckpt: dict[str, Any], hp: dict[str, float], given: set[str]
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """The hyper-parameters in effect after a resume, and those changed (name -> (was, now)):
    the checkpoint's, except those ``given`` by the user (lr, momentum, weight decay; a
    different damp is refused, as the window was built with it)."""
    saved = ckpt.get("hyper") or {}
    out, changed = dict(hp), {}
    for key in HYPER:
        if key not in saved:
            continue
        was = float(saved[key])
        if key not in given or hp[key] == was:
            out[key] = was
        elif key == "damp":
            raise ValueError(
                f"--resume: the checkpoint's window was built with damp={was:g}; a different "
                f"--damp ({hp[key]:g}) needs a fresh run (or --damp {was:g})"
            )
        else:
            changed[key] = (was, hp[key])
    return out, changed


def restore(
    ckpt: dict[str, Any], path: Path, model: nn.Module, optimizer: Any, hp: dict[str, float]
) -> Position:
    """Load the checkpoint's states into ``model``, ``optimizer`` and torch's RNG, apply the
    hyper-parameters ``hp`` in effect, and return its position."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        msg = f"--resume {path} does not fit this model/optimizer: {_squeeze(err)}"
        raise ValueError(msg) from None
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


def _squeeze(err: BaseException, limit: int = 200) -> str:
    """An error message on one line, at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
