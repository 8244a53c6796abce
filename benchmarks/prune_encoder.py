"""Sequential calibration on an encoder: a small BERT (built from a config, random weights,
masked-LM head) pruned with SparseGPT in one pass and sequentially, block by block.

The sequential schedule captures the first block's inputs once and replays the blocks
(``sequential-blocks``), as for decoders; the masked-LM head's dense layer, outside the blocks,
is calibrated from one more forward. The row "full passes" forces the fallback (the whole model
re-run for every stage, what an encoder got before), to show the cost it avoids. Calibration:
32 windows of 128 byte tokens of gensim's Lee corpus (vocabulary 256).

    .venv/bin/python -m benchmarks.prune_encoder --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def windows(count: int, seq: int) -> list[torch.Tensor]:
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        data = Path(spec.submodule_search_locations[0]) / "test" / "test_data"
        path = data / "lee_background.cor"
        raw = list(path.read_bytes()[: count * seq])
        ids = torch.tensor(raw, dtype=torch.long).view(count, seq)
    else:  # no gensim: random tokens (timings only)
        ids = torch.randint(0, 256, (count, seq), generator=torch.Generator().manual_seed(0))
    return [ids[i : i + 1] for i in range(count)]


def build(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg).eval()


def run(args: argparse.Namespace, schedule: str) -> dict:
    from mfac.prune import calibration, oneshot

    model = build(args)
    calib = windows(args.calib, args.seq)
    fwd = lambda m, ids: m(input_ids=ids)  # noqa: E731
    layers = ["bert.encoder.layer.*", "cls.predictions.transform.dense"]
    old = calibration.plan
    if schedule == "full passes":
        calibration.plan = lambda *a: calibration.Plan([], [], [], reason="forced")  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        res = oneshot(
            model, 0.5, "sparsegpt", data=calib, loss_fn=fwd, layers=layers,
            sequential=schedule != "one pass", calib_batches=args.calib, progress=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        calibration.plan = old  # type: ignore[assignment]
    return {
        "schedule_asked": schedule, "schedule": res.info["schedule"], "wall_s": round(wall, 2),
        "timings": {k: round(v, 2) for k, v in res.timings.items()},
        "sparsity": round(res.sparsity, 4), "layers": len(res.masks),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-full", action="store_true", help="skip the forced full-pass row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for schedule in ("one pass", "sequential", *(() if args.skip_full else ("full passes",))):
        rows.append(run(args, schedule))
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
    print(f"sequential / one pass: {ratio:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = {"args": vars(args), "rows": rows, "sequential_over_one_pass": round(ratio, 3)}
    (RESULTS / "prune_encoder.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
