"""Hugging Face export: save_pretrained_sparse loads without mfac."""

from __future__ import annotations

import pytest
import torch

from mfac.prune.methods.wanda import WandaConfig, wanda


def test_save_pretrained_sparse_loads_without_mfac(tmp_path) -> None:
    """The folder loads with transformers alone (mfac made unimportable in the child), gives the
    pruned model's logits, and reports the sparsity counted from the saved weights."""
    import json
    import os
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    from mfac.prune.export import save_pretrained_sparse

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = [
        torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    masks, _ = wanda(
        model, ids, lambda m, b: m(input_ids=b), None, WandaConfig(2),
        pattern=(2, 4), layers=lambda n, _m: ".layers." in n,
    )  # fmt: skip
    folder = tmp_path / "out"
    rec = save_pretrained_sparse(model, masks, folder, {"method": "wanda", "pattern": "2:4"})
    assert rec["sparsity"] == pytest.approx(0.5)
    assert json.loads((folder / "mfac_recipe.json").read_text())["recipe"]["method"] == "wanda"
    assert "mfac" not in (folder / "config.json").read_text()
    with torch.no_grad():
        expect = model(input_ids=ids[0]).logits
    torch.save(ids[0], tmp_path / "ids.pt")
    code = (
        "import sys, torch; sys.modules['mfac'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expect, atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained_sparse(model, masks, folder)
