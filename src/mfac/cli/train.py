"""``mfac train``: train or fine-tune with :class:`mfac.optim.MFAC` (or SGD/Adam to compare),
optionally holding the masks of ``mfac prune``, with checkpoints that resume exactly.

A checkpoint holds the model, the optimizer's ``state_dict`` (M-FAC's whole gradient window),
the torch RNG state, and the position (epoch, batch, step). The batch order of epoch ``e`` is a
permutation drawn from ``seed`` and ``e`` alone, so a resumed run sees the same batches in the
same order and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from .common import (
    CLIError,
    atomic_dir,
    atomic_file,
    emit,
    existing_path,
    one_line,
    progress,
    resolve_device,
    text_table,
    write_json,
)
from .recipe import TRAIN_FIELDS, resolve

log = logging.getLogger("mfac.cli")

#: Options that must match between a checkpoint and the run resuming it.
RESUME_KEYS = ("optimizer", "batch_size", "seed", "ngrads", "model")


def make_optimizer(name: str, params: Any, opts: dict[str, Any]) -> Any:
    """The optimizer named by ``--optimizer`` with the run's hyper-parameters."""
    import torch

    if name == "sgd":
        return torch.optim.SGD(
            params, lr=opts["lr"], momentum=opts["momentum"], weight_decay=opts["weight_decay"]
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    try:
        from ..optim import MFAC
    except ImportError as err:  # pragma: no cover - the optimizer ships with the package
        raise CLIError(f"the M-FAC optimizer is not available: {one_line(err)}", 3) from None
    return MFAC(
        params,
        lr=opts["lr"],
        ngrads=opts["ngrads"],
        damp=opts["damp"],
        momentum=opts["momentum"],
        weight_decay=opts["weight_decay"],
    )


def _masks_path(path: Path) -> Path:
    p = existing_path(path, "masks")
    if p.is_dir():
        p = existing_path(p / "masks.safetensors", "masks")
    return p


def run_train(args: argparse.Namespace) -> int:
    """The training loop with checkpoints; returns the exit code."""
    opts = resolve(args, TRAIN_FIELDS, "train")
    device = resolve_device(opts["device"])
    import torch

    from .data import Objective, load_data
    from .models import load_model
    from .report import line_plot

    resume = existing_path(opts["resume"], "checkpoint to resume") if opts["resume"] else None
    masks_file = _masks_path(opts["masks"]) if opts["masks"] else None
    torch.manual_seed(opts["seed"])
    loaded = load_model(opts["model"], opts["checkpoint"], device)
    model = loaded.model
    data = load_data(opts, loaded)
    objective = Objective(loaded, data, device)
    objective.check_fits(model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(opts["optimizer"], params, opts)
    holder = None
    if masks_file is not None:
        from ..prune import hold_masks, load_masks

        masks = load_masks(str(masks_file))
        holder = hold_masks(model, masks, optimizer)
        if hasattr(optimizer, "set_masks"):
            modules = dict(model.named_modules())
            optimizer.set_masks({modules[n].weight: m.to(device) for n, m in masks.items()})
        log.info("masks: %s (%d layers held at their zeros)", masks_file, len(masks))

    out_dir = Path(opts["output"])
    ckpt_path = out_dir / "checkpoint.pt"
    epoch, batch0, step = 0, 0, 0
    history: list[float] = []
    evals: list[dict[str, Any]] = []
    if resume is not None:
        epoch, batch0, step, history, evals = _load_checkpoint(resume, model, optimizer, opts)
        log.info("resumed from %s at epoch %d, batch %d (step %d)", resume, epoch, batch0, step)

    def save(ep: int, batch: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            },
            "epoch": ep,
            "batch": batch,
            "step": step,
            "history": list(history),
            "evals": list(evals),
            "config": {k: str(opts[k]) for k in RESUME_KEYS},
        }
        with atomic_file(ckpt_path) as tmp:
            torch.save(state, tmp)

    t0 = time.perf_counter()
    stopped = False
    try:
        while epoch < opts["epochs"] and not stopped:
            batches = data.batches(
                opts["batch_size"], shuffle=True, seed=opts["seed"] * 100_003 + epoch
            )
            model.train()
            bar = progress(
                total=len(batches), desc=f"epoch {epoch + 1}/{opts['epochs']}", unit="batch"
            )
            bar.update(batch0)
            for i in range(batch0, len(batches)):
                optimizer.zero_grad(set_to_none=True)
                loss = objective(model, batches[i])
                if not torch.isfinite(loss):
                    raise CLIError(
                        f"the loss is {float(loss)} at step {step + 1}; lower --lr "
                        "(nothing was written for this step)"
                    )
                loss.backward()
                optimizer.step()
                step += 1
                history.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
                if opts["max_steps"] is not None and step >= opts["max_steps"]:
                    save(epoch, i + 1)
                    stopped = True
                    break
                if opts["save_every"] and step % opts["save_every"] == 0:
                    save(epoch, i + 1)
            bar.close()
            if stopped:
                log.info(
                    "stopped after %d steps (--max-steps); resume with --resume %s", step, ckpt_path
                )
                break
            metrics = objective.evaluate(model, opts["batch_size"])
            evals.append({"epoch": epoch + 1, "step": step, **metrics})
            log.info(
                "epoch %d: train loss %.4f, held-out %s",
                epoch + 1,
                sum(history[-len(batches) :]) / max(len(batches), 1),
                ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
            )
            epoch, batch0 = epoch + 1, 0
            save(epoch, 0)
    finally:
        if holder is not None:
            holder.remove()
    wall = time.perf_counter() - t0

    if loaded.kind == "hf":
        with atomic_dir(out_dir / "model") as tmp:
            loaded.model.save_pretrained(str(tmp), safe_serialization=True)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(str(tmp))
        model_name = "model/"
    else:
        from safetensors.torch import save_file

        with atomic_file(out_dir / "model.safetensors") as tmp:
            state = {
                k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
            }
            save_file(state, str(tmp), metadata={"format": "pt", "model": loaded.spec})
        model_name = "model.safetensors"
    summary = {
        "command": "train",
        "model": opts["model"],
        "optimizer": opts["optimizer"],
        "options": {
            k: opts[k]
            for k in (
                "lr",
                "ngrads",
                "damp",
                "momentum",
                "weight_decay",
                "batch_size",
                "epochs",
                "seed",
            )
        },
        "masks": masks_file,
        "steps": step,
        "epochs_done": epoch,
        "stopped_early": stopped,
        "wall_s_this_run": wall,
        "metric": objective.metric_name,
        "evals": evals,
        "loss_history": history,
    }
    write_json(out_dir / "train.json", summary)
    if history:
        with atomic_file(out_dir / "loss.png") as tmp:
            line_plot(
                tmp,
                {opts["optimizer"]: (range(1, len(history) + 1), history)},
                title="training loss",
                xlabel="step",
                ylabel="loss",
            )
    if evals:
        emit(text_table(evals, list(evals[0])))
    emit(f"wrote {out_dir}/ ({model_name}, checkpoint.pt, train.json, loss.png)")
    return 0


def _load_checkpoint(path: Path, model: Any, optimizer: Any, opts: dict[str, Any]) -> tuple:
    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CLIError(f"could not read checkpoint {path}: {one_line(err, 200)}") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "rng", "epoch"} <= set(ckpt):
        raise CLIError(f"{path} is not a checkpoint written by 'mfac train'")
    for key in RESUME_KEYS:
        was = ckpt.get("config", {}).get(key)
        if was is not None and was != str(opts[key]):
            raise CLIError(
                f"--resume {path}: it was written with {key}={was}, this run has {key}={opts[key]}"
            )
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CLIError(
            f"--resume {path} does not fit this model/optimizer: {one_line(err, 200)}"
        ) from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return (
        int(ckpt["epoch"]),
        int(ckpt["batch"]),
        int(ckpt["step"]),
        list(ckpt["history"]),
        list(ckpt["evals"]),
    )
