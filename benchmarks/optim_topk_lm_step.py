"""step() time and memory of MFAC's default rule on one model-wide top-k window at language-model
scale (SmolLM2-135M, d = 134.5M), against AdamW's step on the same real gradient, in one process.

    PYTHONPATH=src python -m benchmarks.optim_topk_lm_step --ngrads 256 --topk 0.01

One gradient of 4 windows of 64 tokens of gensim's Lee background corpus (clipped at 1.0);
AdamW steps on it first (median of 3 after the first), then the default rule
(``MFAC(params, lr, window_scope="model", layout="topk", topk=..., ngrads=...)``) takes 4 real
steps (1 to 4 rows filled), then the remaining rows of its window are set to strictly ascending
coordinates spread over the model with random values (the cost of a gather or scatter depends
on where the rows point, not on their values), and 4 more steps time a full window. Writes
results/optim_topk_lm_step.json; peak RSS is this process's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mfac import MFAC

from .common import RESULTS, fill_topk_window, peak_rss_gib
from .prune_llm import CACHE, DATA, convert, windows


def timed(fn, reps: int) -> list[float]:
    """Wall time of each of ``reps`` calls of ``fn``."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ngrads", type=int, default=256)
    ap.add_argument("--topk", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    convert()
    tok = AutoTokenizer.from_pretrained(CACHE)
    ids = windows(DATA / "lee_background.cor", tok, 64)[:4]
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    model.config.use_cache = False
    model(input_ids=ids, labels=ids).loss.backward()
    params = list(model.parameters())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    out: dict = {"ngrads": args.ngrads, "topk": args.topk, "threads": torch.get_num_threads()}
    saved = [p.detach().clone() for p in params]
    adamw = torch.optim.AdamW(params, lr=1e-6)
    out["adamw_step_s"] = statistics.median(timed(adamw.step, 4)[1:])
    del adamw
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    del saved
    t0 = time.perf_counter()
    opt = MFAC(params, lr=1e-6, window_scope="model", layout="topk", topk=args.topk,
               ngrads=args.ngrads)  # fmt: skip
    out["build_s"] = time.perf_counter() - t0
    op = opt.windows[0]
    out.update(dim=op.dim, k=op.k)
    need = opt.required_bytes([p.numel() for p in params])
    out["checked_gib"] = need / 2**30
    out["first_steps_s"] = timed(opt.step, 4)
    fill_topk_window(op, torch.Generator().manual_seed(0))
    out["full_steps_s"] = timed(opt.step, 4)
    out["full_step_s"] = statistics.median(out["full_steps_s"])
    out["early_step_s"] = statistics.median(out["first_steps_s"][1:])
    out["full_vs_adamw"] = out["full_step_s"] / out["adamw_step_s"]
    out["early_vs_adamw"] = out["early_step_s"] / out["adamw_step_s"]
    for m in (args.ngrads, 1024):
        g = torch.randn(m, m, dtype=torch.float64)
        g = g @ g.T
        out[f"eigh_{m}_s"] = statistics.median(timed(lambda g=g: torch.linalg.eigh(g), 3))
    out["state_gib"] = opt.state_nbytes / 2**30
    out["window_gib"] = op.window_nbytes / 2**30
    out["peak_rss_gib"] = peak_rss_gib()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optim_topk_lm_step.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
