"""Reference check: this library's SparseGPT and Wanda against llm-compressor's on SmolLM2-135M.

llm-compressor (PyPI ``llmcompressor``, the field's reference implementation of both methods)
lives in its own virtual environment, never in this project's: this script runs itself there
(``--ref-child``, only torch, transformers, datasets and llmcompressor imported) to prune the
model with ``oneshot`` and ``SparseGPTModifier`` / ``WandaPruningModifier``, and writes the
pruned block weights to a file. This library's ``sparsegpt`` / ``wanda`` run in a child of this
project's interpreter (``--ours-child``) on the same token windows and write theirs. The parent
then loads each set of weights into the dense checkpoint and scores it with the perplexity
function of :mod:`benchmarks.prune_llm` on the same held-out windows (all of gensim's
``lee.cor`` and 64 windows of its Wikipedia dump, 128 tokens each), and compares the masks and
weights of the matched pairs.

Calibration, as in ``benchmarks/prune_llm.py --seq 128 --calib 32 --seed 0``: the 32 windows
of 128 tokens of ``lee_background.cor`` drawn with ``torch.randperm`` (seed 0), batch 1.

    python -m venv /work/refenv
    /work/refenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl llmcompressor==0.14.0.1
    .venv/bin/python -m benchmarks.prune_reference --ref-python /work/refenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve()

#: (name, side, method, schedule): which pruner, which side, sequential or one pass.
RUNS = {
    "ref-sparsegpt": ("reference", "sparsegpt", "sequential"),
    "ours-sparsegpt-seq": ("ours", "sparsegpt-seq", "sequential"),
    "ref-wanda": ("reference", "wanda", "sequential"),
    "ours-wanda": ("ours", "wanda", "sequential"),
    "ref-sparsegpt-basic": ("reference", "sparsegpt", "one pass"),
    "ours-sparsegpt": ("ours", "sparsegpt", "one pass"),
}
#: numerical perturbations of the sequential runs (not in the default list): the
#: reference with its pruning arithmetic in float64, ours on one thread (other BLAS reduction
#: orders); they measure how far rounding alone moves the perplexity
VARIANTS = {
    "ref-sparsegpt-f64": ("ref-sparsegpt", ["--precision", "float64"]),
    "ours-sparsegpt-seq-t1": ("ours-sparsegpt-seq", ["--child-threads", "1"]),
    "ours-wanda-t1": ("ours-wanda", ["--child-threads", "1"]),
}
#: draws of the sequential SparseGPT runs at float32-sized perturbations: damping
#: damp * (1 + k 1e-6) on both sides, which flips near-tied mask decisions the way rounding
#: does; several draws per side sample the spread that one run of each cannot
JITTERS = (1, 2, 3)
VARIANTS.update(
    {
        f"{base}-j{k}": (base, ["--damp-jitter", f"{k * 1e-6:g}"])
        for base in ("ref-sparsegpt", "ours-sparsegpt-seq")
        for k in JITTERS
    }
)
#: Wanda has no damping to jitter: its draws change the calibration batch (windows per
#: forward), which changes the activations' rounding (GEMM shapes, reduction orders) only
VARIANTS.update(
    {
        f"{base}-b{k}": (base, ["--calib-batch", str(k)])
        for base in ("ref-wanda", "ours-wanda")
        for k in (2, 4)
    }
)
#: our sequential SparseGPT with every layer's Hessian rounded through float32 before it is
#: factored (the reference keeps its Hessian in float32): a test of that rounding as the gap's
#: cause, not a draw of the same computation
HESSIAN32 = {
    "ours-sparsegpt-seq-h32": ("ours-sparsegpt-seq", ["--hessian-float32"]),
    **{
        f"ours-sparsegpt-seq-h32-j{k}": (
            "ours-sparsegpt-seq", ["--hessian-float32", "--damp-jitter", f"{k * 1e-6:g}"]
        )
        for k in JITTERS
    },
}
VARIANTS.update(HESSIAN32)
#: our side run by llm-compressor's environment's interpreter (its transformers computes the
#: calibration activations), on one thread: against ours-sparsegpt-seq-t1, the transformers
#: version as the gap's cause
REF_ENV = {"ours-sparsegpt-seq-refenv": ("ours-sparsegpt-seq", ["--child-threads", "1"])}
VARIANTS.update(REF_ENV)
ALL_RUNS = [*RUNS, *VARIANTS]
#: matched pairs whose masks and weights are compared
PAIRS = [
    ("ours-sparsegpt-seq", "ref-sparsegpt"),
    ("ref-sparsegpt-f64", "ref-sparsegpt"),
    ("ours-sparsegpt-seq-t1", "ours-sparsegpt-seq"),
    ("ours-wanda-t1", "ours-wanda"),
    ("ours-wanda", "ref-wanda"),
    ("ours-sparsegpt", "ref-sparsegpt-basic"),
]


def block_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the pruned layers: every Linear inside ``model.layers``."""
    return {
        f"{name}.weight": m.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in name
    }


def ref_child(a: argparse.Namespace) -> dict:
    """In llm-compressor's environment: ``oneshot`` with one modifier, pruned weights saved."""
    from importlib.metadata import version

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.child_threads or a.threads)
    a.damp *= 1.0 + a.damp_jitter
    if a.precision == "float64":  # llm-compressor's own precision constant
        import llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify as sg

        sg.SGPT_PRECISION = torch.float64
    ids = torch.load(a.calib_file)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    head = model.lm_head.weight.detach().clone()
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * len(ids)}
    )
    common = {
        "sparsity": 0.5,
        "mask_structure": a.pattern if a.pattern != "none" else "0:0",
        "targets": ["Linear"],
        # a plain "lm_head" does not match: the modifier names each target "<name>." (with a
        # trailing dot), so the regex form that llm-compressor's own warning suggests is needed
        "ignore": ["re:.*lm_head"],
    }
    if a.method == "sparsegpt":
        mod = SparseGPTModifier(**common, block_size=a.block, dampening_frac=a.damp)
    else:
        mod = WandaPruningModifier(**common)
    t0 = time.perf_counter()
    oneshot(
        model=model, processor=tok, dataset=ds, recipe=[mod],
        num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False, batch_size=a.calib_batch, pipeline=a.pipeline,
        log_dir=None,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if not torch.equal(head, model.lm_head.weight):
        raise RuntimeError("llm-compressor pruned the (tied) LM head despite ignore")
    weights = block_weights(model)
    torch.save(weights, a.out)
    zero = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    settings = mod.model_dump(mode="json", exclude_none=False)
    return {
        "prune_wall_s": wall,
        "sparsity": zero / total,
        "lm_head_unchanged": bool(torch.equal(head, model.lm_head.weight)),
        "modifier": type(mod).__name__,
        "modifier_settings": {k: v for k, v in settings.items() if not k.startswith("_")},
        "oneshot": {
            "pipeline": a.pipeline,
            "batch_size": a.calib_batch,
            "num_calibration_samples": len(ids),
            "max_seq_length": int(ids.shape[1]),
            "shuffle_calibration_samples": False,
        },
        "versions": {
            p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers")
        },
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def ours_child(a: argparse.Namespace) -> dict:
    """In this project's environment: ``layerwise`` of benchmarks/prune_llm.py, weights saved."""
    from transformers import AutoModelForCausalLM

    from benchmarks.prune_llm import build_parser, layerwise

    torch.set_num_threads(a.child_threads or a.threads)
    a.damp *= 1.0 + a.damp_jitter
    if a.hessian_float32:
        import mfac.prune.methods.sparsegpt as sg

        exact = sg.damped_inverse_factor
        sg.damped_inverse_factor = lambda h, *args, **kw: exact(h.float().double(), *args, **kw)
    ids = torch.load(a.calib_file)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    calib = list(ids.split(a.calib_batch))
    ns = build_parser().parse_args([])  # every setting layerwise reads, at prune_llm's defaults
    ns.calib, ns.block, ns.damp = len(calib), a.block, a.damp
    out: dict = {}
    pattern = None if a.pattern == "none" else a.pattern
    t0 = time.perf_counter()
    layerwise(model, a.method, 0.5, pattern, calib, ns, out)
    out["prune_wall_s"] = time.perf_counter() - t0
    torch.save(block_weights(model), a.out)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["settings"] = {"block": a.block, "damp": a.damp, "calib_batches": len(calib)}
    return out


@torch.no_grad()
def layer_check(a: argparse.Namespace) -> dict:
    """One layer, same inputs, both implementations in one process (llm-compressor's
    environment with this library on PYTHONPATH): masks, weights and reconstruction error of
    llm-compressor's ``sparsify_weight`` (its float32, and float64 by its precision constant)
    against :func:`mfac.prune.methods.sparsegpt.prune_layer` and Wanda's row rule."""
    import llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify as sg
    import llmcompressor.modifiers.pruning.wanda.wanda_sparsify as wd

    from mfac.prune.methods.sparsegpt import prune_layer
    from mfac.prune.methods.wanda import row_keep
    from mfac.prune.saliency import wanda_scores

    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    rows, cols, tokens = 384, 576, 4096
    # correlated inputs with a few outlier features, as in a transformer's activations
    mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64) / cols**0.5
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64) @ (mix + torch.eye(cols))
    x[:, :8] *= 20.0
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=gen) / cols**0.5)
    w0 = lin.weight.detach().double().clone()
    h = 2.0 * x.T @ x / tokens
    out: dict = {"shape": [rows, cols], "tokens": tokens}

    def err(w: torch.Tensor) -> float:  # relative output error ||(W - W0) X^T|| / ||W0 X^T||
        return float(((w.double() - w0) @ x.T).norm() / (w0 @ x.T).norm())

    for pattern in ("none", "2:4"):
        nm = None if pattern == "none" else (2, 4)
        n, m = (0, 0) if nm is None else nm
        ours, keep = prune_layer(lin.weight.double(), h, 0.5, nm, a.block, damp=a.damp)
        res = {"ours_rel_output_error": err(ours)}
        for prec in (torch.float32, torch.float64):
            sg.SGPT_PRECISION = prec
            _, ref = sg.sparsify_weight(
                lin, {lin: h.to(prec).clone()}, 0.5, n, m, a.block, a.damp, False
            )
            tag = str(prec).rsplit(".", 1)[-1]
            res[f"ref_{tag}_rel_output_error"] = err(ref)
            res[f"ref_{tag}_mask_disagree"] = float(((ref == 0) != ~keep).double().mean())
            res[f"ref_{tag}_weight_rel_diff"] = float((ref.double() - ours).norm() / ours.norm())
            res[f"ref_{tag}_sparsity"] = float((ref == 0).double().mean())
        sg.SGPT_PRECISION = torch.float32
        sqnorm = x.square().sum(0)
        wkeep = row_keep(wanda_scores(lin.weight, sqnorm), 0.5, nm)
        wref = wd.sparsify_weight(lin, {lin: sqnorm.float() / tokens}, 0.5, n, m)
        res["wanda_mask_disagree"] = float(((wref == 0) != ~wkeep).double().mean())
        out[pattern] = res
    return out


@torch.no_grad()
def dense_grams(
    model: torch.nn.Module, calib: torch.Tensor, blocks: tuple[int, ...]
) -> dict[str, tuple[torch.nn.Linear, torch.Tensor]]:
    """Every Linear of the given transformer blocks ("block.name") with its SparseGPT Hessian
    2 X^T X / tokens (float64) on the dense model's inputs from the windows of ``calib``."""
    grams: dict[str, torch.Tensor] = {}
    layers: dict[str, torch.nn.Linear] = {}
    hooks = []
    for b in blocks:
        for name, mod in model.model.layers[b].named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"{b}.{name}"
                layers[key] = mod

                def hook(_m, inp, _o, key: str = key) -> None:
                    x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                    grams[key] = grams.get(key, 0) + (x.T @ x).double()

                hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(calib.shape[0]):
            model(calib[i : i + 1])
    for h in hooks:
        h.remove()
    return {key: (mod, grams[key] * (2.0 / calib.numel())) for key, mod in layers.items()}


def hessian_check(calib: torch.Tensor, blocks: tuple[int, ...] = (0, 5, 15)) -> dict:
    """Per layer of a few blocks, on the dense model's inputs: SparseGPT at 2:4 with the float64
    Hessian and with it rounded through float32 (``ours-sparsegpt-seq-h32``'s change), the
    share of the mask that differs, the ratio of the layer errors (W - W0) H (W - W0)^T under
    the float64 H, and the dead inputs (zero diagonal) of each."""
    from transformers import AutoModelForCausalLM

    from mfac.prune.methods.sparsegpt import prune_layer

    from benchmarks.prune_llm import CACHE

    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    out = {}
    for key, (mod, h) in dense_grams(model, calib, blocks).items():
        w0 = mod.weight.detach().double()
        errs, keeps = [], []
        for hh in (h, h.float().double()):
            new, keep = prune_layer(mod.weight, hh, 0.5, (2, 4), 128, damp=0.01)
            d = new.double() - w0
            errs.append(float(torch.einsum("ij,jk,ik->", d, h, d)))
            keeps.append(keep)
        out[key] = {
            "mask_differs": float((keeps[0] != keeps[1]).double().mean()),
            "error_ratio": errs[1] / errs[0],
            "dead": [int((h.diagonal() == 0).sum()), int((h.float().diagonal() == 0).sum())],
        }
    return out


def draw_masks(work: Path, pattern: str) -> dict:
    """The share of the keep-mask that differs between every two sequential SparseGPT runs
    (the base runs and their rounding draws, both sides) whose weights are in ``work``: how
    close the draws are to independent samples."""
    names = [
        n for n in ALL_RUNS
        if RUNS[VARIANTS.get(n, (n, []))[0]][1] in ("sparsegpt", "sparsegpt-seq")
        and RUNS[VARIANTS.get(n, (n, []))[0]][2] == "sequential"
        and (work / f"{n}_{pattern.replace(':', '-')}.pt").exists()
    ]  # fmt: skip
    zeros = {}
    for n in names:
        weights = torch.load(work / f"{n}_{pattern.replace(':', '-')}.pt")
        zeros[n] = torch.cat([(w == 0).flatten() for _, w in sorted(weights.items())])
    pairs = {
        f"{a} vs {b}": float((zeros[a] != zeros[b]).double().mean())
        for i, a in enumerate(names) for b in names[i + 1 :]
    }  # fmt: skip
    values = list(pairs.values())
    return {"runs": names, "pairs": pairs, "min": min(values, default=None),
            "max": max(values, default=None)}  # fmt: skip


def compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """Mask disagreement (share of weights pruned on one side only; overall and per transformer
    block) and the relative gap of the pruned weights."""
    differ = total = 0
    num = den = 0.0
    per_block: dict[int, list[int]] = {}
    for k, w in ref.items():
        o = ours[k]
        d = int(((o == 0) != (w == 0)).sum())
        differ += d
        total += w.numel()
        num += float((o.double() - w.double()).square().sum())
        den += float(w.double().square().sum())
        cell = per_block.setdefault(int(k.split(".layers.")[1].split(".")[0]), [0, 0])
        cell[0] += d
        cell[1] += w.numel()
    return {
        "mask_disagree": differ / total,
        "weight_rel_diff": (num / den) ** 0.5,
        "mask_disagree_by_block": [round(d / n, 6) for _, (d, n) in sorted(per_block.items())],
    }


def table(path: Path) -> str:
    """Markdown table of a results file: perplexity Lee / Wiki per run and setting, the gap of
    ours to the reference, and the pruning wall time."""
    doc = json.loads(path.read_text())
    rows = {(r["run"], r["pattern"]): r for r in doc["rows"] if "error" not in r}
    match = {
        "ours-sparsegpt-seq": "ref-sparsegpt", "ours-wanda": "ref-wanda",
        "ours-sparsegpt": "ref-sparsegpt-basic",
    }  # fmt: skip
    lines = [
        "| run | setting | Lee | Wiki | vs reference: Lee / Wiki | pruning s |",
        "|---|---|---|---|---|---|",
    ]
    for (run, pattern), r in rows.items():
        setting = "-" if run == "dense" else "50 %" if pattern == "none" else pattern
        gap = ""
        base = VARIANTS.get(run, (run, []))[0]  # a variant compares with its base's reference
        ref = rows.get((match.get(base, ""), pattern))
        if ref is not None:
            gap = " / ".join(f"{100 * (r[k] / ref[k] - 1):+.1f} %" for k in ("ppl_lee", "ppl_wiki"))
        secs = f"{r['prune_wall_s']:.0f}" if "prune_wall_s" in r else ""
        lines.append(
            f"| {run} | {setting} | {r['ppl_lee']:.2f} | {r['ppl_wiki']:.2f} | {gap} | {secs} |"
        )
    tables = [draws_table(rows, p) for p in ("2:4", "none")]
    return "\n\n".join(["\n".join(lines), *tables])


#: (reference run, our run) of each sequential method compared over calibration draws
CALIBRATION_PAIRS = {
    "SparseGPT": ("ref-sparsegpt", "ours-sparsegpt-seq"),
    "Wanda": ("ref-wanda", "ours-wanda"),
}


def calibration_table(paths: list[Path]) -> str:
    """Markdown tables of the sequential methods, reference against ours, one line per results
    file (each one calibration draw, ``--seed``), with the mean, the std and the paired mean
    log-ratio of ours over the reference; one table per method and setting that every file
    holds."""
    import math
    import statistics

    keys = ("ppl_lee", "ppl_wiki")
    docs = [json.loads(path.read_text()) for path in paths]
    tables = []
    for method, (ref_run, our_run) in CALIBRATION_PAIRS.items():
        for pattern in ("none", "2:4"):
            pairs, lines = [], [
                f"{method}, {'50 %' if pattern == 'none' else pattern}, sequential:",
                "",
                "| calibration draw | reference: Lee / Wiki | ours: Lee / Wiki | ours over the "
                "reference |",
                "|---|---|---|---|",
            ]  # fmt: skip
            for doc in docs:
                rows = {r["run"]: r for r in doc["rows"] if r["pattern"] == pattern}
                ref, ours = rows.get(ref_run), rows.get(our_run)
                if ref is None or ours is None or "error" in ref or "error" in ours:
                    break
                pairs.append((ref, ours))
                lines.append(
                    f"| {doc['args']['seed']} | {' / '.join(f'{ref[k]:.2f}' for k in keys)} | "
                    f"{' / '.join(f'{ours[k]:.2f}' for k in keys)} | "
                    f"{' / '.join(f'{100 * (ours[k] / ref[k] - 1):+.1f} %' for k in keys)} |"
                )
            if len(pairs) < max(len(docs), 2):
                continue  # a file without this pair: no table

            columns = [[[pair[side][k] for pair in pairs] for k in keys] for side in (0, 1)]
            cells = [
                " / ".join(f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" for v in side)
                for side in columns
            ]
            paired = []
            for k in keys:
                logs = [math.log(o[k] / r[k]) for r, o in pairs]
                mean, se = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
                paired.append(f"{100 * mean:+.1f} % (t {mean / se:.1f})")
            lines.append(f"| mean ± std; paired log-ratio | {cells[0]} | {cells[1]} | "
                         f"{' / '.join(paired)} |")  # fmt: skip
            tables.append("\n".join(lines))
    return "\n\n".join(tables)


def welch_t(mine: list[dict], theirs: list[dict], key: str) -> str:
    """Welch's t of the difference of the two sides' means ("-" with fewer than 2 a side)."""
    import statistics

    a, b = [r[key] for r in mine], [r[key] for r in theirs]
    if len(a) < 2 or len(b) < 2:
        return "-"
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return f"{(statistics.mean(a) - statistics.mean(b)) / se:.1f}"


def draws_table(rows: dict[tuple[str, str], dict], pattern: str = "2:4") -> str:
    """Mean ± std over every rounding-sized draw of a sequential run (the base run and its
    variants), per side, and the gap of the means (ours over the reference); our float32-Hessian
    runs are a row of their own."""
    import statistics

    def draws(base: str, hessian32: bool = False) -> list[dict]:
        names = list(HESSIAN32) if hessian32 else [base] + [
            v for v, (b, _) in VARIANTS.items()
            if b == base and v not in HESSIAN32 and v not in REF_ENV
        ]  # fmt: skip
        return [rows[n, pattern] for n in names if (n, pattern) in rows]

    setting = "50 %" if pattern == "none" else pattern
    lines = [
        f"| method ({setting}, sequential) | draws: ours / reference | ours: Lee / Wiki | "
        "reference: Lee / Wiki | gap of the means: Lee / Wiki | Welch t: Lee / Wiki |",
        "|---|---|---|---|---|---|",
    ]
    for method, mine, theirs in (
        ("SparseGPT", draws("ours-sparsegpt-seq"), draws("ref-sparsegpt")),
        ("SparseGPT, ours with a float32 Hessian", draws("", True), draws("ref-sparsegpt")),
        ("Wanda", draws("ours-wanda"), draws("ref-wanda")),
    ):  # fmt: skip
        if len(mine) < 2 or len(theirs) < 1:
            continue
        cells, means = [], []
        for side in (mine, theirs):
            cell = []
            for key in ("ppl_lee", "ppl_wiki"):
                vals = [r[key] for r in side]
                spread = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
                cell.append(f"{statistics.mean(vals):.1f}{spread}")
                means.append(statistics.mean(vals))
            cells.append(" / ".join(cell))
        gap = f"{100 * (means[0] / means[2] - 1):+.1f} % / {100 * (means[1] / means[3] - 1):+.1f} %"
        welch = " / ".join(welch_t(mine, theirs, key) for key in ("ppl_lee", "ppl_wiki"))
        lines.append(
            f"| {method} | {len(mine)} / {len(theirs)} | {cells[0]} | {cells[1]} | {gap} | "
            f"{welch} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ref-python", default="/work/refenv/bin/python")
    p.add_argument("--runs", default=",".join(RUNS), help="comma list of " + ", ".join(ALL_RUNS))
    p.add_argument("--patterns", default="none,2:4")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--eval-windows", type=int, default=39)
    p.add_argument("--wiki-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for the pruned weights (default: temp)")
    p.add_argument("--out", default=str(RESULTS / "prune_reference.json"))
    p.add_argument("--table", action="store_true", help="print the markdown table of --out")
    p.add_argument(
        "--calib-table", nargs="+", default=None, metavar="JSON",
        help="print the sequential methods, ours against the reference, one line per results "
        "file (a calibration draw each), then stop",
    )  # fmt: skip
    # child modes
    p.add_argument("--ref-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ours-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--layer-check", action="store_true",
        help="one layer, both implementations (run with the reference interpreter, "
        "PYTHONPATH=src); prints JSON",
    )  # fmt: skip
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--calib-file", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--pattern", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--child-out", dest="out_weights", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--child-threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--damp-jitter", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--calib-batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--hessian-float32", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--hessian-check", action="store_true",
        help="per layer of blocks 0, 5, 15: SparseGPT 2:4 with the Hessian in float64 and rounded "
        "through float32 (stored under 'hessian_check'), then stop",
    )  # fmt: skip
    p.add_argument(
        "--draw-masks", action="store_true",
        help="the mask share differing between every two sequential SparseGPT runs in --work "
        "(stored under 'draw_masks'), then stop",
    )  # fmt: skip
    a = p.parse_args()
    if a.calib_table:
        print(calibration_table([Path(f) for f in a.calib_table]))
        return
    if a.table:
        print(table(Path(a.out)))
        return
    if a.layer_check:
        print(json.dumps(layer_check(a), indent=1))
        return
    if a.ref_child or a.ours_child:
        a.out = a.out_weights
        res = ref_child(a) if a.ref_child else ours_child(a)
        print("RESULT " + json.dumps(res), flush=True)
        return
    parent(a)


def parent(a: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.prune_llm import CACHE, DATA, convert, perplexity, wiki_windows, windows

    torch.set_num_threads(a.threads)
    convert()
    tok = AutoTokenizer.from_pretrained(CACHE)
    train = windows(DATA / "lee_background.cor", tok, a.seq)
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(a.seed))
    calib = train[pick[: a.calib]].contiguous()  # the windows prune_llm's layer-wise runs use
    lee = windows(DATA / "lee.cor", tok, a.seq)[: a.eval_windows]
    wiki = wiki_windows(tok, a.seq, a.wiki_windows)
    work = Path(a.work or tempfile.mkdtemp(prefix="prune_reference_"))
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / "calib.pt"
    torch.save(calib, calib_file)
    out_path = Path(a.out)
    doc = json.loads(out_path.read_text()) if out_path.exists() else {"rows": []}
    doc["args"] = {k: v for k, v in vars(a).items() if k in (
        "seq", "calib", "seed", "block", "damp", "eval_windows", "wiki_windows", "threads"
    )}  # fmt: skip
    doc["calib_windows"] = pick[: a.calib].tolist()
    rows: dict[tuple[str, str], dict] = {(r["run"], r["pattern"]): r for r in doc["rows"]}

    def score(weights: dict[str, torch.Tensor] | None) -> dict:
        model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
        if weights is not None:
            missing = set(weights) - set(model.state_dict())
            if missing:
                raise RuntimeError(f"unknown weights {sorted(missing)[:3]}")
            model.load_state_dict(weights, strict=False)
        t0 = time.perf_counter()
        res = {"ppl_lee": perplexity(model, lee), "ppl_wiki": perplexity(model, wiki)}
        res["eval_s"] = time.perf_counter() - t0
        return res

    def save() -> None:
        doc["rows"] = list(rows.values())
        out_path.write_text(json.dumps(doc, indent=1))

    if a.hessian_check or a.draw_masks:
        if a.hessian_check:
            doc["hessian_check"] = hessian_check(calib)
            print(json.dumps(doc["hessian_check"]), flush=True)
        if a.draw_masks:
            doc["draw_masks"] = {p: draw_masks(work, p) for p in a.patterns.split(",")}
            print(json.dumps({p: {k: v for k, v in d.items() if k != "pairs"}
                              for p, d in doc["draw_masks"].items()}), flush=True)  # fmt: skip
        save()
        return

    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent / "src")}
    check = subprocess.run(
        [a.ref_python, str(HERE), "--layer-check", "--block", str(a.block), "--damp", str(a.damp)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if check.returncode == 0:
        doc["layer_check"] = json.loads(check.stdout[check.stdout.index("{") :])
        print("layer check", json.dumps(doc["layer_check"]), flush=True)
    else:
        print(check.stderr[-2000:], file=sys.stderr)
    if ("dense", "none") not in rows:
        rows["dense", "none"] = {"run": "dense", "pattern": "none", **score(None)}
        print(json.dumps(rows["dense", "none"]), flush=True)
        save()
    runs = a.runs.split(",")
    order = [(r, p) for r in runs[:4] for p in a.patterns.split(",")]  # sequential first
    order += [(r, p) for r in runs[4:] for p in a.patterns.split(",")]
    for run, pattern in order:
        base, extra = VARIANTS.get(run, (run, []))
        side, method, schedule = RUNS[base]
        weights_file = work / f"{run}_{pattern.replace(':', '-')}.pt"
        py = a.ref_python if side == "reference" or run in REF_ENV else sys.executable
        cmd = [py, str(HERE) if side == "reference" else "-m", *(
            [] if side == "reference" else ["benchmarks.prune_reference"]
        )]  # fmt: skip
        cmd += ["--ref-child" if side == "reference" else "--ours-child"]
        cmd += ["--model", str(CACHE), "--calib-file", str(calib_file), "--pattern", pattern]
        cmd += ["--method", method, "--block", str(a.block), "--damp", str(a.damp)]
        cmd += ["--threads", str(a.threads), "--child-out", str(weights_file)]
        cmd += ["--pipeline", "basic" if schedule == "one pass" else "sequential", *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row: dict = {"run": run, "side": side, "method": method, "schedule": schedule}
        row["child_args"] = extra
        row["pattern"] = pattern
        row["process_wall_s"] = time.perf_counter() - start
        if line is None:
            row["error"] = proc.stderr[-3000:]
            print(row["error"], file=sys.stderr)
        else:
            row.update(json.loads(line[len("RESULT ") :]))
            row.update(score(torch.load(weights_file)))
        rows[run, pattern] = row
        print(json.dumps({k: v for k, v in row.items() if "settings" not in k}), flush=True)
        save()
    for pattern in a.patterns.split(","):
        for mine, theirs in PAIRS:
            files = [work / f"{r}_{pattern.replace(':', '-')}.pt" for r in (mine, theirs)]
            if all(f.exists() for f in files):
                cmp = compare(torch.load(files[0]), torch.load(files[1]))
                doc.setdefault("pairs", {})[f"{mine} vs {theirs} @ {pattern}"] = cmp
                print(mine, theirs, pattern, cmp, flush=True)
                save()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
