"""M-FAC in a Hugging Face ``Trainer``: a tiny BERT classifies scikit-learn digits read as
token sequences (each of the 64 pixels, 0..16, is one token). No network access is needed:
the model is built from a config with random weights.

    .venv/bin/python examples/hf_trainer.py --optimizer mfac         # mfac.MFAC(params, lr)
    .venv/bin/python examples/hf_trainer.py --optimizer mfac-paper   # the paper's step, MFACSGD
    .venv/bin/python examples/hf_trainer.py --optimizer adamw        # Trainer's own AdamW
    .venv/bin/python examples/hf_trainer.py --threads 1              # CPU threads for torch

Trainer hands the optimizer two parameter groups (with and without weight decay), clips
gradients to ``max_grad_norm`` and calls ``step()`` without a closure; nothing else is needed.
The script ends by printing the test accuracy and loss, and the size of the optimizer's state
(what each Trainer checkpoint's optimizer.pt would hold). What it prints, per optimizer, is in
docs/optim_transformers.md.
"""

from __future__ import annotations

import argparse
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from sklearn.datasets import load_digits

from mfac import MFAC, MFACSGD

# The lr chosen on validation data in docs/optim_transformers.md (Trainer's default 5e-5 is for
# fine-tuning): MFAC's default rule and AdamW share it. The paper's step fails here at every lr.
LR = {"mfac": 3e-3, "mfac-paper": 1e-3, "adamw": 3e-3}


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
    ap.add_argument("--optimizer", choices=list(LR), default="mfac")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--ngrads", type=int, default=None, help="window size m")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--output-dir", default="/tmp/mfac-hf-example")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
    decay = [n for n, _ in model.named_parameters() if "bias" not in n and "LayerNorm" not in n]
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    # An optimizer built here (or through Trainer's optimizer_cls_and_kwargs) takes its own lr:
    # TrainingArguments.learning_rate only reaches Trainer's built-in optimizers.
    if args.optimizer == "mfac":  # every option but lr at its default
        window = {"ngrads": args.ngrads} if args.ngrads else {}
        opt = MFAC(groups, lr=args.lr or LR["mfac"], **window)
    elif args.optimizer == "mfac-paper":
        opt = MFACSGD(
            groups, lr=args.lr or LR["mfac-paper"], ngrads=args.ngrads or 128, damp=1e-4
        )
    else:
        opt = None
        targs.learning_rate = args.lr or LR["adamw"]
    if opt is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.max_steps)
        optimizers = (opt, sched)
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
    metrics = trainer.evaluate()
    state = io.BytesIO()
    torch.save(trainer.optimizer.state_dict(), state)
    print(
        f"{args.optimizer}: test accuracy {metrics['eval_accuracy']:.3f}, "
        f"test loss {metrics['eval_loss']:.3f}, optimizer state {state.tell() / 2**20:.1f} MiB "
        "(the size of each checkpoint's optimizer.pt)"
    )


if __name__ == "__main__":
    main()
