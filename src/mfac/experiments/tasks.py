"""Supervised tasks on tensors: a dataset split into training and held-out parts, and the
objective (loss for training and pruning, metric for evaluation) that goes with the model:
next-token cross-entropy and perplexity, cross-entropy and accuracy, or MSE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Dataset:
    """Tensors for training and held-out evaluation; ``task`` is "lm", "classification" or
    "regression"; ``y_*`` is None for language modelling."""

    kind: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_val: torch.Tensor
    y_val: torch.Tensor | None
    num_classes: int | None
    description: str

    def __len__(self) -> int:
        return len(self.x_train)

    def batches(
        self, batch_size: int, *, split: str = "train", shuffle: bool = False, seed: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Mini-batches of ``split`` (a fresh permutation from ``seed`` when shuffled)."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_val, self.y_val)
        n = len(x)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        return [(x[i], None if y is None else y[i]) for i in order.split(batch_size)]

    def sampled(self, count: int, batch_size: int, seed: int) -> list[Any]:
        """``count`` random training batches of ``batch_size`` samples, e.g. for Fisher
        gradients or calibration: drawn without replacement (no sample twice) while the
        training part lasts, then from a fresh permutation."""
        gen = torch.Generator().manual_seed(seed)
        n = len(self.x_train)
        size = min(batch_size, n)
        need = count * size
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-need // n))])
        idx = order[:need].view(count, size)
        return [(self.x_train[i], None if self.y_train is None else self.y_train[i]) for i in idx]



def make_dataset(
    kind: str, x: torch.Tensor, y: torch.Tensor | None, *, task: str = "auto",
    val_fraction: float = 0.1, seed: int = 0, n_val: int | None = None, description: str = "",
) -> Dataset:  # fmt: skip
    """Split ``x`` (and targets ``y``; None for language modelling) into training and held-out
    parts: the last ``n_val`` rows when given, else a random ``val_fraction`` (drawn from
    ``seed``). ``task="auto"`` reads integer labels as classification, others as regression."""
    num_classes = None
    if y is None:
        task = "lm"
    else:
        integral = bool(torch.all(y == torch.round(y))) if y.is_floating_point() else True
        if task == "auto":
            task = "classification" if integral and y.ndim == 1 else "regression"
        if task == "classification":
            if not integral or y.ndim != 1:
                raise ValueError("classification needs one integer label per sample")
            if int(y.min()) < 0:
                raise ValueError(f"class labels must be >= 0, found {int(y.min())}")
            y, num_classes = y.long(), int(y.max()) + 1
        else:
            y = y.float()
    n = len(x)
    if n < 2:
        raise ValueError(f"data has {n} sample(s); need at least 2 (training and held out)")
    if n_val is not None:
        order = torch.arange(n).roll(n_val)  # the last n_val rows first
    else:
        share = val_fraction * n
        n_val = min(n - 1, max(1, math.ceil(share) if kind == "text" else round(share)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))
    val, train = order[:n_val], order[n_val:]
    if len(train) == 0:
        raise ValueError("no training samples left after the held-out split")
    y_tr, y_val = (None, None) if y is None else (y[train], y[val])
    return Dataset(kind, task, x[train], y_tr, x[val], y_val, num_classes, description)


class Objective:
    """The loss ``loss_fn(model, batch)`` expected by mfac.prune, and the held-out metric."""

    def __init__(self, data: Dataset, device: torch.device, hf: bool = False) -> None:
        self.hf = hf
        self.data = data
        self.device = device

    def _out(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=x) if self.hf else model(x)
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the model returned {type(out).__name__}, not a tensor of outputs")
        return out

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor | None]) -> Any:
        x, y = batch
        x = x.to(self.device)
        return self.loss(self._out(model, x), x, y)

    def loss(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The task's loss of the model outputs ``out`` on inputs ``x`` (on the device)."""
        task = self.data.task
        if task == "lm":
            logits = out[:, :-1].reshape(-1, out.shape[-1])
            return nn.functional.cross_entropy(logits, x[:, 1:].reshape(-1))
        assert y is not None
        y = y.to(self.device)
        if task == "classification":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.reshape(y.shape) if out.numel() == y.numel() else out, y)

    def check_fits(self, model: nn.Module) -> None:
        """Run one small batch; any failure means the data does not fit the model."""
        x = self.data.x_train[:2]
        y = None if self.data.y_train is None else self.data.y_train[:2]
        model.eval()
        shape = tuple(x.shape)
        try:
            with torch.no_grad():
                out = self._out(model, x.to(self.device))
        except Exception as err:
            raise ValueError(
                f"data does not fit the model: a batch of shape {shape} failed: "
                f"{' '.join(str(err).split())[:200]}"
            ) from None
        task = self.data.task
        if task == "lm" and (out.ndim != 3 or out.shape[:2] != x.shape):
            raise ValueError(
                f"data does not fit the model: a language model must return "
                f"(batch, seq, vocab) logits, got {tuple(out.shape)}"
            )
        if task == "classification":
            nc = self.data.num_classes or 0
            if out.ndim != 2 or out.shape[1] < nc:
                raise ValueError(
                    f"data does not fit the model: {nc} classes need outputs of shape "
                    f"(batch, >= {nc}), got {tuple(out.shape)}"
                )
        if task == "regression" and y is not None and out.numel() != y.numel():
            raise ValueError(
                f"data does not fit the model: targets of shape {tuple(y.shape)}, "
                f"outputs {tuple(out.shape)}"
            )

    @property
    def metric_name(self) -> str:
        return {"lm": "perplexity", "classification": "accuracy", "regression": "mse"}[
            self.data.task
        ]

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batch_size: int, desc: str = "eval", bar: Any = iter
    ) -> dict[str, float]:
        """Held-out loss and metric (accuracy, perplexity or MSE); ``bar(iterable, desc=,
        unit=)`` may wrap the batches in a progress bar."""
        was = model.training
        model.eval()
        total, count, correct = 0.0, 0, 0
        batches = self.data.batches(batch_size, split="val")
        for x, y in batches if bar is iter else bar(batches, desc=desc, unit="batch"):
            xd = x.to(self.device)
            out = self._out(model, xd)  # one forward pass gives the loss and the prediction
            total += float(self.loss(out, xd, y)) * len(x)
            count += len(x)
            if self.data.task == "classification":
                assert y is not None
                correct += int((out.argmax(1).cpu() == y).sum())
        model.train(was)
        loss = total / max(count, 1)
        metric = {
            "lm": math.exp(min(loss, 700.0)),
            "classification": correct / max(count, 1),
            "regression": loss,
        }[self.data.task]
        return {"loss": loss, self.metric_name: metric}
