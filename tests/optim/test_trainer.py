"""MFAC and MFACSGD inside a Hugging Face Trainer: two parameter groups, gradient clipping, no
closure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from mfac.optim import MFAC, MFACSGD  # noqa: E402


class _Toy(torch.utils.data.Dataset):
    """Sequences whose label is whether token 5 occurs: learnable, no download."""

    def __init__(self, n: int = 64, length: int = 12) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(6, 50, (n, length), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)
        self.ids[self.labels == 1, 3] = 5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _tiny_bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _decay_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    no_decay = [n for n, _ in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    return [
        {
            "params": [p for n, p in model.named_parameters() if n not in no_decay],
            "weight_decay": wd,
        },
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]


def test_trainer_runs_mfac(tmp_path: Path) -> None:
    model = _tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MFACSGD(_decay_groups(model, 0.01), lr=1e-4, ngrads=8, damp=1e-4, momentum=0.9)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Toy(), optimizers=(opt, None)
    )
    out = trainer.train()
    assert out.global_step == 4
    assert opt.window.num_pushed == 4
    assert torch.isfinite(torch.tensor(out.training_loss))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "classifier.weight" in changed and "bert.embeddings.word_embeddings.weight" in changed


@pytest.mark.parametrize(
    ("cls", "options"),
    [(MFAC, {"ngrads": 4, "relative_damp": 1.0}), (MFACSGD, {"ngrads": 4, "damp": 1e-4})],
    ids=["MFAC", "MFACSGD"],
)
def test_trainer_optimizer_cls_and_kwargs(tmp_path: Path, cls: type, options: dict) -> None:
    """Trainer builds either rule from (class, kwargs) with its two weight-decay groups; the
    windows see every step."""
    model = _tiny_bert()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        weight_decay=0.01,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_Toy(),
        optimizer_cls_and_kwargs=(cls, options),
    )
    trainer.train()
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps it
    assert type(inner) is cls and len(inner.param_groups) == 2
    assert inner.steps == 2 and all(w.num_pushed == 2 for w in inner.windows)
    if cls is MFAC:
        # a window per tensor of >= 1024 entries, one shared by the smaller tensors
        sizes = [p.numel() for g in inner.param_groups for p in g["params"]]
        big = sum(n >= 1024 for n in sizes)
        assert len(inner.windows) == big + (big < len(sizes))
    else:
        assert inner.window.num_pushed == 2
