"""The path of a language-model user, end to end and offline, on a tiny Hugging Face causal LM
built from a config: ``mfac prune`` with its defaults (the transformer blocks only: the tied
embedding / LM head untouched), the output loaded with plain ``transformers``, a few steps of
HF ``Trainer`` with ``mfac.MFAC`` (pruned weights held at zero), a checkpoint and an exact
resume of the optimizer state, and an influence query with the same ``loss_fn(model, batch)``
as pruning."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from mfac import MFAC, InverseFisher, influence  # noqa: E402
from mfac.cli import main  # noqa: E402
from mfac.prune import hold_masks, load_masks  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog while the farmer counts his sheep. "
    "Rain fell on the hills all night and the river rose over the old stone bridge. "
    "A small boat drifted past the mill, carrying two children and a basket of apples. "
)


def _lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The one loss of the path: pruning's calibration, fine-tuning and influence."""
    return model(input_ids=batch, labels=batch).loss


def _differences(a: object, b: object, where: str = "") -> list[str]:
    """Where two nested state dicts differ (tensors compared by value, dtype and shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        )  # fmt: skip
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _differences(x, y, f"{where}/{i}")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


class Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_language_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True,
    )  # fmt: skip
    dense = transformers.LlamaForCausalLM(cfg)
    dense.save_pretrained(tmp_path / "hf")
    embed = dense.model.embed_tokens.weight.detach().clone()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 24, encoding="utf-8")  # ~6 kB of bytes: 46 windows of 128

    # 1. prune with the CLI's defaults: nothing but model, data, sparsity and output
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tmp_path / "hf"), "--data", str(corpus),
                 "--sparsity", "0.5", "-q", "-o", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "fisher-sparsegpt"
    assert report["info"]["schedule"] == "sequential-blocks"
    assert report["calibration"] == {"batches": 32, "batch_size": 1}
    assert report["tied"] == {}
    layers = [r["layer"] for r in report["layers"]]
    assert len(layers) == 14 and all(n.startswith("model.layers.") for n in layers)
    assert abs(report["achieved_sparsity"] - 0.5) < 0.01
    assert not (out / "masks.safetensors").exists()  # the masks are written once
    assert report["files"]["masks"] == "model/mfac_masks.safetensors"

    # 2. load with plain transformers: the tied embedding / LM head are untouched
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embed)
    masks = load_masks(str(out / "model" / "mfac_masks.safetensors"))
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q == 0, ~masks["model.layers.0.self_attn.q_proj"])

    # 3. fine-tune with Trainer + mfac.MFAC, masks held; checkpoint after 2 of 4 steps
    ids = torch.tensor(list(corpus.read_bytes()[: 24 * 32]), dtype=torch.long).view(24, 32)
    data = Windows(ids)

    holders = []

    def trainer(model: torch.nn.Module, run: str) -> transformers.Trainer:
        opt = MFAC(model.parameters(), lr=1e-3, ngrads=4)
        holders.append(hold_masks(model, masks, opt))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / run), max_steps=4, per_device_train_batch_size=4,
            save_strategy="steps", save_steps=2, logging_steps=100, report_to=[],
            use_cpu=True, seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        return transformers.Trainer(model=model, args=args, train_dataset=data,
                                    optimizers=(opt, None))  # fmt: skip

    first = trainer(model, "tuned")
    first.train()
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        assert not bool(weight[~keep].any()), f"{name}: a pruned weight moved"
    ckpt = tmp_path / "tuned" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=False)

    # 4. resume from the checkpoint: the optimizer state it loads equals the saved one
    seen: dict[str, object] = {}

    class Check(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if "state" not in seen:
                seen["state"] = copy.deepcopy(kw["optimizer"].state_dict())  # live tensors
                seen["step"] = state.global_step

    resumed_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    again = trainer(resumed_model, "tuned")
    again.add_callback(Check())
    again.train(resume_from_checkpoint=str(ckpt))
    assert seen["step"] == 2
    assert _differences(seen["state"], saved) == []
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # the resumed run ends where the first did

    # 5. curvature with the same loss_fn(model, batch): influence of training windows
    for holder in holders:  # its forward hook writes the weights: not inside torch.func
        holder.remove()
    model.eval()
    params = ["model.layers.1.mlp.down_proj.weight"]
    inverse = InverseFisher.from_model(model, [ids[i : i + 1] for i in range(8)], _lm_loss, 8,
                                       per_sample=False, params=params, damp=1e-3)  # fmt: skip
    scores = influence(inverse, model, _lm_loss, ids[:6], ids[6:8], batch_size=2)
    assert scores.shape == (2, 6) and bool(torch.isfinite(scores).all())
    assert os.environ["HF_HUB_OFFLINE"] == "1"
