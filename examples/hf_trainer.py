"""M-FAC in a Hugging Face ``Trainer``: a tiny BERT classifies scikit-learn digits read as
token sequences (each of the 64 pixels, 0..16, is one token). No network access is needed:
the model is built from a config with random weights.

    .venv/bin/python examples/hf_trainer.py --optimizer mfac --max-steps 300
    .venv/bin/python examples/hf_trainer.py --optimizer adamw --lr 1e-3    # the usual default

Trainer hands MFAC two parameter groups (with and without weight decay), clips gradients to
``max_grad_norm`` and calls ``step()`` without a closure; MFAC needs nothing else.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from sklearn.datasets import load_digits

from mfac.optim import MFAC


class Digits(torch.utils.data.Dataset):
    """Digits images as sequences of 64 pixel tokens (ids 1..17; 0 is the [CLS] token)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        ids = torch.tensor(x, dtype=torch.long) + 1
        self.ids = torch.cat([torch.zeros(len(ids), 1, dtype=torch.long), ids], 1)
        self.labels = torch.tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=["mfac", "adamw"], default="mfac")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--ngrads", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--output-dir", default="/tmp/mfac-hf-example")
    args = ap.parse_args()

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm].astype(int), y[perm]
    train, test = Digits(x[:1400], y[:1400]), Digits(x[1400:], y[1400:])

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=18,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=65,
        num_labels=10,
    )
    model = transformers.BertForSequenceClassification(cfg)
    targs = transformers.TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    optimizers = (None, None)
    if args.optimizer == "mfac":
        decay = [n for n, _ in model.named_parameters() if "bias" not in n and "LayerNorm" not in n]
        groups = [
            {
                "params": [p for n, p in model.named_parameters() if n in decay],
                "weight_decay": 0.01,
            },
            {
                "params": [p for n, p in model.named_parameters() if n not in decay],
                "weight_decay": 0.0,
            },
        ]
        opt = MFAC(groups, lr=args.lr or 1e-3, ngrads=args.ngrads, damp=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.max_steps)
        optimizers = (opt, sched)
    else:
        targs.learning_rate = args.lr or 1e-3
    trainer = transformers.Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=test,
        optimizers=optimizers,
        compute_metrics=lambda p: {
            "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())
        },
    )
    trainer.train()
    print(trainer.evaluate())


if __name__ == "__main__":
    main()
