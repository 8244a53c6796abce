"""Disk size of a pruned SmolLM2-135M in the two output formats, measured.

Prunes the transformer layers (``model.layers.*``) by magnitude per layer at 50 %, 70 % and 2:4
(the format's size depends only on the mask's density, not on how it was chosen), then writes
``save_pretrained_sparse`` (a Hugging Face folder: dense tensors, zeros stored) and
``save_sparse`` (kept values + bit-packed masks), reads both back, and records the bytes.

    .venv/bin/python -m benchmarks.prune_formats
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.prune_llm import CACHE, RESULTS, convert


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    from transformers import AutoModelForCausalLM

    import mfac.prune as mp
    from mfac.prune.export import save_pretrained_sparse
    from mfac.prune.masks import read_sparse

    torch.set_num_threads(1)
    convert()
    dense_bytes = sum(p.stat().st_size for p in CACHE.glob("*.safetensors"))
    rows = []
    for target, pattern in ((0.5, None), (0.7, None), (0.5, "2:4")):
        model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
        res = mp.oneshot(
            model, target, "magnitude", pattern=pattern, scope="layer",
            layers=lambda name, _m: ".layers." in name,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            rec = save_pretrained_sparse(
                model, res.masks, Path(tmp) / "hf", {"method": "magnitude"}
            )
            t_hf = time.perf_counter() - t0
            hf = folder_bytes(Path(tmp) / "hf")
            t0 = time.perf_counter()
            mp.save_sparse(model, res.masks, Path(tmp) / "model.sparse.safetensors")
            t_sparse = time.perf_counter() - t0
            compact = (Path(tmp) / "model.sparse.safetensors").stat().st_size
            t0 = time.perf_counter()
            state, _ = read_sparse(Path(tmp) / "model.sparse.safetensors")
            t_read = time.perf_counter() - t0
            same = all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        pruned = sum(m.numel() for m in res.masks.values())
        total = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "target": target,
                "pattern": pattern or "none",
                "saved_sparsity": rec["sparsity"],
                "pruned_share_of_params": pruned / total,
                "dense_checkpoint_bytes": dense_bytes,
                "save_pretrained_bytes": hf,
                "save_sparse_bytes": compact,
                "save_pretrained_s": round(t_hf, 2),
                "save_sparse_s": round(t_sparse, 2),
                "read_sparse_s": round(t_read, 2),
                "read_back_identical": same,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_formats.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
