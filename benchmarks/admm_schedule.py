"""ADMM mask search: penalty schedules compared layer by layer on SmolLM2-135M.

For a dozen Linear layers of the dense model (blocks 3, 15, 27: q, o, gate, down; k, v and up
share q's and gate's input), on the SparseGPT Hessian of the calibration windows of
``benchmarks.prune_llm`` (seed 0), each schedule searches the mask from SparseGPT's and the CG
solves the weights on it (:func:`mfac.prune.admm.search_refine`). Reported per schedule and
first penalty: the layer error relative to SparseGPT's (geometric mean over the layers), the
ADMM iterations, the layers that settled, and the seconds. The eigendecomposition each layer
needs once is shared by all schedules and left out of the seconds.

    python -m benchmarks.admm_schedule --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mfac.prune.admm import FAST, SLOW, grow, scaled_eig, search_refine, two_speed
from mfac.prune.methods.sparsegpt import prune_layer
from mfac.prune.refine import damped_gram

from benchmarks.prune_llm import CACHE, DATA, windows
from benchmarks.prune_reference import dense_grams

RESULTS = Path(__file__).parent / "results" / "admm_schedule.json"
KINDS = ("q_proj", "o_proj", "gate_proj", "down_proj")

#: (setting, sparsity, pattern, damping): each at the damping chosen on validation for it.
SETTINGS = (("70%", 0.7, None, 0.1), ("2:4", 0.5, (2, 4), 0.01))


class Tiered:
    """The tiered rule of the ALPS paper as we read it (its Section 3.2; their code was not
    consulted): every third iteration rho grows by 1.3, 1.2 or 1.1 when those three iterations
    changed at least 10 %, 0.5 % of the kept weights, or any weight, and stays otherwise."""

    def __init__(self) -> None:
        self.calls = 0
        self.changed = 0

    def __call__(self, rho: float, changed: int, kept: int) -> float:
        self.calls += 1
        self.changed += changed
        if self.calls % 3:
            return rho
        moved, self.changed = self.changed, 0
        if moved >= 0.1 * kept:
            return rho * 1.3
        if moved >= 0.005 * kept:
            return rho * 1.2
        return rho * 1.1 if moved > 0 else rho


SCHEDULES = {
    f"default ({FAST}/{SLOW})": lambda: grow,
    "faster (1.5/1.2)": lambda: two_speed(1.5, 1.2),
    "slower (1.2/1.05)": lambda: two_speed(1.2, 1.05),
    "every iteration x1.1": lambda: two_speed(1.1, 1.1),
    "tiered, every 3rd (ALPS as read)": Tiered,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--blocks", default="3,15,27")
    parser.add_argument("--rhos", default="0.1,0.3", help="first penalties")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CACHE)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    train = windows(DATA / "lee_background.cor", tok, args.seq)
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))
    calib = train[pick[: args.calib]]
    blocks = tuple(int(b) for b in args.blocks.split(","))
    layers = {
        k: v for k, v in dense_grams(model, calib, blocks).items() if k.endswith(KINDS)
    }  # fmt: skip
    rhos = [float(r) for r in args.rhos.split(",")]
    rows = []
    for setting, sparsity, pattern, damp in SETTINGS:
        per: dict[tuple[str, float], list[dict]] = {}
        for key, (mod, h) in layers.items():
            dense = mod.weight.detach()
            start, keep = prune_layer(dense, h, sparsity, pattern, damp=damp)
            gram = damped_gram(h, damp)
            eig = scaled_eig(gram)
            alive = (h.diagonal() > 0)[None, :].expand_as(keep)
            for name, make in SCHEDULES.items():
                for rho in rhos:
                    t0 = time.perf_counter()
                    _, _, rep, _ = search_refine(
                        dense, gram, start * keep, keep, pattern, allowed=alive,
                        iters=args.iters, rho=rho, eig=eig, growth=make(),
                    )  # fmt: skip
                    per.setdefault((name, rho), []).append({
                        "layer": key, "ratio": rep.error_end / rep.error_start,
                        "iterations": rep.iterations, "settled": rep.settled,
                        "fallback": rep.fallback, "seconds": time.perf_counter() - t0,
                    })  # fmt: skip
            print(setting, key, flush=True)
        for (name, rho), found in per.items():
            rows.append({
                "setting": setting, "schedule": name, "rho": rho, "damp": damp,
                "error_vs_sparsegpt": math.exp(
                    sum(math.log(f["ratio"]) for f in found) / len(found)
                ),
                "mean_iterations": sum(f["iterations"] for f in found) / len(found),
                "settled": sum(f["settled"] for f in found), "layers": len(found),
                "fallback": sum(f["fallback"] for f in found),
                "seconds": sum(f["seconds"] for f in found),
            })  # fmt: skip
    meta = {"calib": args.calib, "seq": args.seq, "blocks": blocks, "iters": args.iters,
            "threads": args.threads, "layers": list(layers)}  # fmt: skip
    RESULTS.write_text(json.dumps({"args": meta, "rows": rows}, indent=1) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The markdown table of docs/prune.md §2g."""
    out = [
        "| setting | schedule | first rho | layer error / SparseGPT's | ADMM iterations | "
        "settled | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['setting']} | {r['schedule']} | {r['rho']} | {r['error_vs_sparsegpt']:.3f} | "
            f"{r['mean_iterations']:.1f} | {r['settled']}/{r['layers']} | {r['seconds']:.0f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
