"""Issue 25: M-FAC optimizer designs against AdamW, Muon and SOAP on two transformers trained
from scratch (docs/optim_designs.md).

Tasks:
  bert  the tiny BERT of benchmarks/optim_transformers.py on scikit-learn digits read as 64
        pixel tokens (accuracy; 1200 train / 200 val / 397 test images)
  gpt   a tiny GPT-2 (2 layers, width 64, 2 heads, context 64) trained as a character model on
        gensim's lee_background.cor (first 80% train, next 10% val, last 10% test; test metric:
        cross entropy per character, lower is better)

Every optimizer gets linear warm-up (10% of the steps) and cosine decay to 0, gradient clipping
at 1.0, weight decay 0.01 (Trainer's groups: none on biases and LayerNorm). The candidate designs
are prototyped here (class Design), outside the library's public surface.

    PYTHONPATH=src python -m benchmarks.optim_designs sweep --task bert --opt adamw
    PYTHONPATH=src python -m benchmarks.optim_designs seeds --task bert --opt adamw
    PYTHONPATH=src python -m benchmarks.optim_designs timing --task bert
    PYTHONPATH=src python -m benchmarks.optim_designs report

``sweep`` runs seed 0 over an lr grid (factor ~3.16 apart) and extends the grid until the best
validation lr is interior; ``seeds`` runs seeds 1 and 2 at that lr. Records are appended to
results/optim_designs.json; ``report`` prints the markdown tables and writes
results/optim_designs.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from torch.optim._muon import _zeropower_via_newtonschulz

from mfac.operators.window import make_window
from mfac.optim import MFAC, hidden_groups
from mfac.optim.functional import window_coeffs

from .common import RESULTS, interleaved_medians
from .optim_transformers import Paired, digits_splits

OUT = RESULTS / "optim_designs.json"
TIMING = RESULTS / "optim_designs_timing.json"
WEIGHT_DECAY = 0.01
STEPS = {"bert": 300, "gpt": 300}
BATCH = 32
CTX = 64
NS = (3.4445, -4.7750, 2.0315)

# ----------------------------------------------------------------------------------------------
# tasks


def text_splits() -> tuple[dict[str, torch.Tensor], int]:
    """lee_background.cor as characters: 80/10/10 split by position."""
    from gensim.test.utils import datapath

    text = open(datapath("lee_background.cor"), encoding="utf8").read()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    n = len(ids)
    a, b = int(0.8 * n), int(0.9 * n)
    return {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}, len(chars)


class Task:
    """Model, batches and evaluation of one task."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "bert":
            self.data = digits_splits()
        else:
            self.data, self.vocab = text_splits()

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        if self.name == "bert":
            cfg = transformers.BertConfig(
                vocab_size=18, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, max_position_embeddings=65, num_labels=10,
            )  # fmt: skip
            return transformers.BertForSequenceClassification(cfg)
        cfg = transformers.GPT2Config(
            vocab_size=self.vocab, n_positions=CTX, n_embd=64, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)

    def hidden(self, model: torch.nn.Module) -> set[str]:
        """The 2-D hidden matrices (Muon's share): not embeddings, not the head."""
        skip = ("embeddings", "classifier", "wte", "wpe", "lm_head")
        return {
            n for n, p in model.named_parameters() if p.ndim == 2 and not any(s in n for s in skip)
        }

    def batches(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        if self.name == "bert":
            ids, labels = self.data["train"]
            while True:
                order = torch.randperm(len(labels), generator=gen)
                for i in range(0, len(order) - BATCH + 1, BATCH):
                    idx = order[i : i + BATCH]
                    yield {"input_ids": ids[idx], "labels": labels[idx]}
        train = self.data["train"]
        while True:
            starts = torch.randint(0, len(train) - CTX, (BATCH,), generator=gen)
            x = torch.stack([train[s : s + CTX] for s in starts])
            yield {"input_ids": x, "labels": x}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        model.eval()
        if self.name == "bert":
            ids, labels = self.data[split]
            out = model(input_ids=ids, labels=labels)
            res = {"accuracy": float((out.logits.argmax(-1) == labels).float().mean()),
                   "loss": float(out.loss)}  # fmt: skip
        else:
            ids = self.data[split]
            n = (len(ids) // CTX) * CTX
            x = ids[:n].view(-1, CTX)
            out = model(input_ids=x, labels=x)
            res = {"loss": float(out.loss)}
        model.train()
        return res

    def score(self, metrics: dict[str, float]) -> float:
        """Higher is better: accuracy (bert), minus the loss (gpt)."""
        return metrics["accuracy"] if self.name == "bert" else -metrics["loss"]


# ----------------------------------------------------------------------------------------------
# the candidate designs


def orthogonalize(x: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz step (bfloat16, 5 iterations), float32 result."""
    return _zeropower_via_newtonschulz(x, NS, 5, 1e-7).float()


class Design(torch.optim.Optimizer):
    """AdamW / Muon base directions with an M-FAC sliding-window inverse on top.

    Per parameter p (flat), with Adam's moments ea, es and D = sqrt(es_hat) + eps:
      base   "adam": u = ea_hat / D;   "muon" (hidden 2-D matrices only): u = NS(nesterov
             momentum) * 0.2 sqrt(max(A, B)) (torch.optim.Muon with match_rms_adamw)
      rows   what each window keeps: "z" = g / D, "g" = g, "mz" = ea / D (whitened momentum)
      window s = (I + Z^T Z / (m lam))^-p u,  lam = relative_damp * tr(ZZ^T/m) / filled
             order "pre" (muon): s = NS(W(nesterov momentum)) instead, the window before the
             orthogonalisation (the window sees the momentum's matrix, NS sets the scale)
      graft  s *= |u| / |s| per tensor (the base direction's step length)
    ``scope``: "tensor" (one window per windowed tensor), "model" (one over all of them) or
    "split" (one per hidden matrix and one shared by all the other tensors) or "big" (one per
    tensor of at least 1024 entries, one shared by the smaller ones);
    ``windowed``: "all", "hidden" (only Muon's share; the rest takes the base step) or "rest"
    (all but Muon's share).
    """

    def __init__(
        self, groups: list[dict[str, Any]], lr: float, *, base: str = "adam", rows: str = "z",
        power: float = 1.0, relative_damp: float = 1.0, ngrads: int = 32, scope: str = "tensor",
        windowed: str = "all", order: str = "post", betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, momentum: float = 0.95,
    ) -> None:  # fmt: skip
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0, "hidden": False})
        self.o = dict(base=base, rows=rows, power=power, damp=relative_damp, m=ngrads,
                      scope=scope, windowed=windowed, order=order, betas=betas, eps=eps,
                      momentum=momentum)  # fmt: skip
        self.t = 0
        self.windows: dict[Any, Any] = {}

    def _window(self, key: Any, dim: int):
        if key not in self.windows:
            self.windows[key] = make_window(dim, self.o["m"], None)
        return self.windows[key]

    @torch.no_grad()
    def step(self, closure=None):
        o = self.o
        b1, b2 = o["betas"]
        self.t += 1
        bc1, bc2 = 1 - b1**self.t, math.sqrt(1 - b2**self.t)
        items = []  # (p, group, base u (flat), window row (flat) or None, pre-NS input or None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.reshape(-1).float()
                st = self.state[p]
                if not st:
                    st["ea"] = torch.zeros_like(g)
                    st["es"] = torch.zeros_like(g)
                ea, es = st["ea"], st["es"]
                ea.lerp_(g, 1 - b1)
                es.mul_(b2).addcmul_(g, g, value=1 - b2)
                den = (es.sqrt() / bc2).add_(o["eps"])
                muon = o["base"] == "muon" and group["hidden"]
                if muon:
                    if "buf" not in st:
                        st["buf"] = torch.zeros_like(p)
                    buf = st["buf"]
                    buf.lerp_(p.grad, 1 - o["momentum"])
                    nest = p.grad.lerp(buf, o["momentum"])
                    scale = 0.2 * math.sqrt(max(p.shape[0], p.shape[1]))
                    if o["order"] == "pre":
                        u, pre = nest.reshape(-1).float(), (nest.shape, scale)
                    else:
                        u, pre = orthogonalize(nest).reshape(-1) * scale, None
                else:
                    u, pre = ea / bc1 / den, None
                win = o["windowed"] == "all" or group["hidden"] == (o["windowed"] == "hidden")
                row = None
                if win:
                    row = {"z": g / den, "g": g, "mz": ea / den}[o["rows"]]
                items.append((p, group, u, row, pre))
        wins = [it for it in items if it[3] is not None]
        dirs = {id(it[0]): it[2] for it in items}
        if wins:
            if o["scope"] == "split":  # hidden matrices one window each, the rest one window
                wins = [it for it in wins if it[1]["hidden"]] + [
                    it for it in wins if not it[1]["hidden"]
                ]
                nh = sum(1 for it in wins if it[1]["hidden"])
                groups_ = [[it] for it in wins[:nh]] + ([wins[nh:]] if wins[nh:] else [])
            elif o["scope"] == "big":  # a window per tensor of >= 1024 entries, one for the rest
                big = [[it] for it in wins if it[2].numel() >= 1024]
                small = [it for it in wins if it[2].numel() < 1024]
                groups_ = big + ([small] if small else [])
                wins = [it for gr in groups_ for it in gr]
            elif o["scope"] == "model":
                groups_ = [wins]
            else:
                groups_ = [[it] for it in wins]
            zs = [torch.cat([it[3] for it in gr]) if len(gr) > 1 else gr[0][3] for gr in groups_]
            us = [torch.cat([it[2] for it in gr]) if len(gr) > 1 else gr[0][2] for gr in groups_]
            keys = [id(gr[0][0]) if len(gr) == 1 else "rest" for gr in groups_]
            ws = [self._window(k, z.numel()) for k, z in zip(keys, zs, strict=False)]
            projs = [w.push_gather(z, u) for w, z, u in zip(ws, zs, us, strict=False)]
            grams = torch.stack([w.gram for w in ws]) / o["m"]
            coeff, lams = window_coeffs(grams, [w.filled for w in ws], o["damp"], o["power"])
            cs = (coeff @ torch.stack(projs)[:, :, None])[:, :, 0]
            outs = [
                w.scatter(c, plus=u) if lam > 0 else u.clone()
                for w, c, u, lam in zip(ws, cs, us, lams, strict=False)
            ]
            outs = [
                piece
                for gr, out in zip(groups_, outs, strict=False)
                for piece in (out.split([it[2].numel() for it in gr]) if len(gr) > 1 else [out])
            ]
            for it, s in zip(wins, outs, strict=False):
                p, _, u, _, pre = it
                if pre is not None:  # window, then orthogonalise: NS sets the length
                    shape, scale = pre
                    s = orthogonalize(s.view(shape)).reshape(-1) * scale
                else:
                    sn, un = s.norm(), u.norm()
                    s = s * torch.where(sn > 0, un / sn, torch.ones_like(sn))
                dirs[id(p)] = s
        for p, group, u, _, pre in items:
            d = dirs[id(p)]
            if pre is not None and d is u:  # unwindowed "pre" entry
                shape, scale = pre
                d = orthogonalize(u.view(shape)).reshape(-1) * scale
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(d.view_as(p).to(p.dtype), alpha=-lr)


class KronWindow(torch.optim.Optimizer):
    """The Kronecker-sided window (a sliding-window Shampoo) on the hidden matrices, AdamW on
    the rest. Each hidden matrix keeps its last m gradients G_i (r x c) and the window's two
    side Grams L = sum G_i G_i^T / m, R = sum G_i^T G_i / m (updated by adding the new and
    subtracting the evicted gradient's product: O(rc(r+c)) a step). Every ``every`` steps the
    roots (I + L/lam_L)^-1/4, (I + R/lam_R)^-1/4 are refreshed (eigh; lam = relative_damp *
    the side's mean eigenvalue, the M-FAC window's scale-relative damping); the step is
    PL M_hat PR, M_hat Adam's bias-corrected momentum, grafted to AdamW's step length."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, *, ngrads: int = 32,
                 relative_damp: float = 1.0, every: int = 10, power: float = 0.25,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:  # fmt: skip
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0, "hidden": False})
        self.o = dict(m=ngrads, damp=relative_damp, every=every, power=power, betas=betas, eps=eps)
        self.t = 0

    def _root(self, gram: torch.Tensor, filled: int) -> torch.Tensor:
        g = gram.double() / self.o["m"]
        lam = self.o["damp"] * float(torch.diagonal(g).sum()) / g.shape[0]
        if lam <= 0:
            return torch.eye(g.shape[0], dtype=torch.float32)
        ev, vec = torch.linalg.eigh(g)
        h = (1 + ev.clamp_min(0) / lam) ** -self.o["power"]
        return ((vec * h) @ vec.T).float()

    @torch.no_grad()
    def step(self, closure=None):
        o = self.o
        b1, b2 = o["betas"]
        self.t += 1
        bc1, bc2 = 1 - b1**self.t, math.sqrt(1 - b2**self.t)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["ea"] = torch.zeros_like(g)
                    st["es"] = torch.zeros_like(g)
                ea, es = st["ea"], st["es"]
                ea.lerp_(g, 1 - b1)
                es.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = ea / bc1 / ((es.sqrt() / bc2).add_(o["eps"]))
                if group["hidden"]:
                    if "win" not in st:
                        r, c = g.shape
                        st["win"] = torch.zeros(o["m"], r, c)
                        st["L"], st["R"] = torch.zeros(r, r), torch.zeros(c, c)
                        st["PL"], st["PR"] = torch.eye(r), torch.eye(c)
                    slot = (self.t - 1) % o["m"]
                    old = st["win"][slot]
                    st["L"].addmm_(g, g.T).addmm_(old, old.T, alpha=-1)
                    st["R"].addmm_(g.T, g).addmm_(old.T, old, alpha=-1)
                    old.copy_(g)
                    if (self.t - 1) % o["every"] == 0:
                        filled = min(self.t, o["m"])
                        st["PL"], st["PR"] = (
                            self._root(st["L"], filled),
                            self._root(st["R"], filled),
                        )
                    s = st["PL"] @ (ea / bc1) @ st["PR"]
                    sn = s.norm()
                    u = s * torch.where(sn > 0, u.norm() / sn, torch.ones_like(sn))
                lr, wd = group["lr"], group["weight_decay"]
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u.to(p.dtype), alpha=-lr)


DESIGNS: dict[str, dict[str, Any]] = {
    # AdamW direction (the library default's rule, re-implemented: a check of the prototype)
    "d-adam": {},
    "d-adam-mz": {"rows": "mz"},  # windows of (whitened) momentum
    "d-adam-root": {"power": 0.5},  # inverse root
    "d-adam-model": {"scope": "model"},  # one model-wide window
    # Muon direction on the hidden matrices, AdamW elsewhere; windows on all tensors
    "d-muon": {"base": "muon"},  # W(NS(momentum)) of whitened-gradient windows, Muon's length
    "d-muon-g": {"base": "muon", "rows": "g"},  # windows of raw gradients
    "d-muon-hidden": {"base": "muon", "windowed": "hidden"},  # windows on Muon's share only
    "d-muon-pre": {"base": "muon", "rows": "g", "order": "pre"},  # NS(W(momentum))
    "d-muon-root": {"base": "muon", "power": 0.5},
    # windows: one per hidden matrix, one shared by all the other tensors (fewer small windows)
    "d-muon-split": {"base": "muon", "scope": "split"},
    "d-muon-split-d3": {"base": "muon", "scope": "split", "relative_damp": 3.0},  # weaker
    "d-muon-split-mz": {"base": "muon", "scope": "split", "rows": "mz"},  # momentum windows
    "d-muon-rest": {"base": "muon", "windowed": "rest"},  # Muon + the M-FAC rule elsewhere
    # ... with one window shared by all those tensors (fewer small windows: cheaper)
    "d-muon-rest1": {"base": "muon", "windowed": "rest", "scope": "model"},
    # ... a window per large tensor (embeddings, head), one shared by the small ones
    "d-muon-restbig": {"base": "muon", "windowed": "rest", "scope": "big"},
    # what a default rule can do without parameter names: Muon's direction and the windows on
    # every 2-D tensor (embeddings and head included), AdamW on the rest
    "d-muon-2d": {"base": "muon", "windowed": "hidden"},
}
KRON: dict[str, dict[str, Any]] = {
    "d-kron": {},  # sliding-window Shampoo, roots -1/4 per side, refreshed every 10 steps
    "d-kron-inv": {"power": 0.5},  # -1/2 per side (the M-FAC inverse, split over the sides)
}


# ----------------------------------------------------------------------------------------------
# optimizers


def decay_groups(model: torch.nn.Module, names: set[str] | None = None) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    decay = [p for n, p in named if "bias" not in n and "LayerNorm" not in n and "ln_" not in n]
    rest = [p for n, p in named if "bias" in n or "LayerNorm" in n or "ln_" in n]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(name: str, task: Task, model: torch.nn.Module, lr: float) -> Any:
    named = dict(model.named_parameters())
    hidden = task.hidden(model)
    if name == "adamw":
        return torch.optim.AdamW(decay_groups(model), lr=lr)
    if name == "muon":
        muon = torch.optim.Muon(
            [named[n] for n in named if n in hidden], lr=lr, weight_decay=WEIGHT_DECAY,
            adjust_lr_fn="match_rms_adamw",
        )  # fmt: skip
        return Paired(muon, torch.optim.AdamW(decay_groups(model, set(named) - hidden), lr=lr))
    if name == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    if name == "mfac":  # the library's rule on a flat parameter list, every option at its default
        return MFAC(decay_groups(model), lr=lr)
    if name == "mfac-hidden":  # the library: MFAC(hidden_groups(model), lr), weight decay split
        ortho = {id(p) for g in hidden_groups(model) if g.get("orthogonalize") for p in g["params"]}
        groups = [{"params": [p for p in named.values() if id(p) in ortho],
                   "orthogonalize": True, "weight_decay": WEIGHT_DECAY}]  # fmt: skip
        groups += decay_groups(model, {n for n, p in named.items() if id(p) not in ortho})
        return MFAC([g for g in groups if g["params"]], lr=lr)
    if name.endswith("-2d"):
        hidden = {n for n, p in named.items() if p.ndim == 2}
    if name in DESIGNS or name in KRON:
        groups = [{**g, "hidden": False} for g in decay_groups(model, set(named) - hidden)]
        groups.append({"params": [named[n] for n in named if n in hidden],
                       "weight_decay": WEIGHT_DECAY, "hidden": True})  # fmt: skip
        cls, opts = (Design, DESIGNS[name]) if name in DESIGNS else (KronWindow, KRON[name])
        return cls([g for g in groups if g["params"]], lr, **opts)
    raise ValueError(f"unknown optimizer {name!r}")


def schedule(steps: int):
    warm = max(1, steps // 10)

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    return f


def train_one(task: Task, name: str, lr: float, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    steps = STEPS[task.name]
    model = task.model(seed)
    model.train()
    opt = make_optimizer(name, task, model, lr)
    inner = opt.opts if isinstance(opt, Paired) else (opt,)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule(steps)) for o in inner]
    batches = task.batches(seed)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for s in scheds:
            s.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            break
    diverged = not np.isfinite(losses[-1])
    nan = {"accuracy": 0.0, "loss": float("inf")}
    return {
        "task": task.name, "optimizer": name, "lr": lr, "seed": seed, "steps": steps,
        "train_loss_last30": float(np.mean(losses[-30:])),
        "loss_curve": [float(np.mean(losses[i : i + 10])) for i in range(0, len(losses), 10)],
        "val": nan if diverged else task.evaluate(model, "val"),
        "test": nan if diverged else task.evaluate(model, "test"),
        "wall_s": time.perf_counter() - start,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# records


def load() -> list[dict[str, Any]]:
    return json.loads(OUT.read_text())["runs"] if OUT.exists() else []


def append(rec: dict[str, Any]) -> None:
    runs = load()
    runs.append(rec)
    OUT.write_text(json.dumps({"issue": 25, "runs": runs}, indent=0))


def score(task: Task, metrics: dict[str, float]) -> float:
    v = task.score(metrics)
    return v if math.isfinite(v) else -1e9


def val_by_lr(task: Task, name: str, seeds: tuple[int, ...] = (0,)) -> dict[float, float]:
    by: dict[float, list[float]] = {}
    for r in load():
        if r["task"] == task.name and r["optimizer"] == name and r["seed"] in seeds:
            by.setdefault(r["lr"], []).append(score(task, r["val"]))
    return {lr: statistics.mean(v) for lr, v in sorted(by.items())}


def done(task: Task, name: str, lr: float, seed: int) -> bool:
    return any(
        r["task"] == task.name and r["optimizer"] == name and r["lr"] == lr and r["seed"] == seed
        for r in load()
    )


def run(task: Task, name: str, lr: float, seed: int) -> None:
    if done(task, name, lr, seed):
        return
    rec = train_one(task, name, lr, seed)
    append(rec)
    m = rec["val"]
    print(f"{task.name} {name} lr={lr:g} seed={seed}: val {m} ({rec['wall_s']:.0f} s)", flush=True)


GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


def sweep(task: Task, name: str, start: list[float]) -> float:
    """Seed 0 over ``start``; extend by one grid point past the edge until the best is interior."""
    for lr in start:
        run(task, name, lr, 0)
    while True:
        vals = val_by_lr(task, name)
        lrs = sorted(vals)
        best = max(lrs, key=lambda x: vals[x])
        i = GRID.index(best)
        if best == lrs[0] and i > 0:
            run(task, name, GRID[i - 1], 0)
        elif best == lrs[-1] and i + 1 < len(GRID):
            run(task, name, GRID[i + 1], 0)
        else:
            return best


def chosen_lr(task: Task, name: str) -> float:
    vals = val_by_lr(task, name)
    return max(vals, key=lambda x: vals[x])


# ----------------------------------------------------------------------------------------------
# timing


def timing(task: Task, names: list[str], reps: int) -> dict[str, Any]:
    """step() of every optimizer in one process, round-robin, on the same fixed gradients."""
    torch.set_num_threads(1)
    fns, dim = {}, 0
    for name in names:
        model = task.model(0)
        dim = sum(p.numel() for p in model.parameters())
        opt = make_optimizer(name, task, model, 1e-6)
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2

        def step(opt: Any = opt) -> None:
            for _ in range(10):
                opt.step()

        step()  # windows filled past the first steps
        fns[name] = step
    ms = {k: 1e3 * v / 10 for k, v in interleaved_medians(fns, reps).items()}
    return {
        "dim": dim,
        "step_ms": ms,
        "ratio_vs_adamw": {k: v / ms["adamw"] for k, v in ms.items()},
        "ratio_vs_muon": {k: v / ms["muon"] for k, v in ms.items()},
    }


# ----------------------------------------------------------------------------------------------
# report


def summarize(task: Task, seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict[str, Any]]:
    runs = [r for r in load() if r["task"] == task.name]
    rows = []
    for name in sorted({r["optimizer"] for r in runs}):
        vals = val_by_lr(task, name)
        lr = max(vals, key=lambda x: vals[x])
        at = [r for r in runs if r["optimizer"] == name and r["lr"] == lr and r["seed"] in seeds]
        key = "accuracy" if task.name == "bert" else "loss"
        test = [r["test"][key] for r in at]
        rows.append({
            "optimizer": name, "lr": lr, "lrs": sorted(vals),
            "edge": lr in (min(vals), max(vals)) and len(vals) > 1,
            "val_by_lr": {
                f"{k:g}": round(v if task.name == "bert" else -v, 4) for k, v in vals.items()
            },
            "seeds": sorted(r["seed"] for r in at), "test": test,
            "mean": statistics.mean(test),
            "std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "min": min(test), "max": max(test),
        })  # fmt: skip
    better = -1 if task.name == "bert" else 1
    return sorted(rows, key=lambda r: better * r["mean"] if math.isfinite(r["mean"]) else 1e9)


def report() -> str:
    timing_all = json.loads(TIMING.read_text()) if TIMING.exists() else {}
    lines = []
    for tname in ("bert", "gpt"):
        task = Task(tname)
        rows = summarize(task)
        if not rows:
            continue
        t = timing_all.get(tname, {})
        metric = "test accuracy" if tname == "bert" else "test loss (nats/char)"
        lines += [f"### {tname}: {metric}, lr chosen on validation (seed 0)", "",
                  f"| optimizer | lr | {metric}: mean ± std (min..max) | seeds "
                  "| step / AdamW | step / Muon |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in rows:
            ra = t.get("ratio_vs_adamw", {}).get(r["optimizer"])
            rm = t.get("ratio_vs_muon", {}).get(r["optimizer"])
            lines.append(
                f"| {r['optimizer']} | {r['lr']:g}{' (edge)' if r['edge'] else ''} | "
                f"{r['mean']:.3f} ± {r['std']:.3f} ({r['min']:.3f}..{r['max']:.3f}) | "
                f"{len(r['seeds'])} | {f'{ra:.1f}' if ra else '-'} | {f'{rm:.2f}' if rm else '-'} |"
            )
        many = [r for r in summarize(task, tuple(range(10))) if len(r["seeds"]) > 3]
        if many:
            lines += ["", f"All seeds run at the same lr ({metric}):", "",
                      "| optimizer | lr | mean ± std (min..max) | seeds |",
                      "| --- | --- | --- | --- |"]  # fmt: skip
            for r in many:
                lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['mean']:.3f} ± {r['std']:.3f} "
                             f"({r['min']:.3f}..{r['max']:.3f}) | {len(r['seeds'])} |")  # fmt: skip
        lines += ["", "| optimizer | validation per lr (seed 0) |", "| --- | --- |"]
        for r in rows:
            lines.append(
                f"| {r['optimizer']} | "
                + ", ".join(f"{k}: {v:.3f}" for k, v in r["val_by_lr"].items())
                + " |"
            )
        if t:
            lines += ["", f"step() in one process (d = {t['dim']:,}, one thread, median of "
                      "interleaved reps):", "",
                      "| optimizer | step ms | / AdamW | / Muon |",
                      "| --- | --- | --- | --- |"]  # fmt: skip
            for k, v in sorted(t["step_ms"].items(), key=lambda kv: kv[1]):
                ra, rm = t["ratio_vs_adamw"][k], t["ratio_vs_muon"][k]
                lines.append(f"| {k} | {v:.2f} | {ra:.1f} | {rm:.2f} |")
        lines.append("")
    plot()
    return "\n".join(lines)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, tname in zip(axes, ("bert", "gpt"), strict=False):
        task = Task(tname)
        rows = summarize(task)
        peers = ("adamw", "muon", "soap", "mfac")
        shown = [r for r in rows if r["optimizer"] in peers]
        shown += [r for r in rows if r["optimizer"] not in peers and len(r["seeds"]) >= 3][:4]
        for r in shown:
            curves = [x["loss_curve"] for x in load() if x["task"] == tname
                      and x["optimizer"] == r["optimizer"] and x["lr"] == r["lr"]
                      and x["seed"] in (0, 1, 2)]  # fmt: skip
            n = min(len(c) for c in curves)
            ax.plot(np.arange(n) * 10, np.mean([c[:n] for c in curves], 0),
                    ls="--" if r["optimizer"] in peers else "-",
                    label=f"{r['optimizer']} ({r['mean']:.3f})")  # fmt: skip
        ax.set_title(f"{tname}: train loss at the chosen lr (mean of seeds 0-2; test metric)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "optim_designs.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["sweep", "seeds", "timing", "report", "check"])
    ap.add_argument("--task", default="bert")
    ap.add_argument("--opt", nargs="*", default=[])
    ap.add_argument("--lrs", nargs="*", type=float, default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2])
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.cmd == "report":
        print(report())
        return
    task = Task(a.task)
    if a.cmd == "sweep":
        for name in a.opt:
            print(f"{a.task} {name}: chosen lr {sweep(task, name, a.lrs):g}", flush=True)
    elif a.cmd == "seeds":
        for name in a.opt:
            lr = chosen_lr(task, name)
            for seed in a.seeds:
                run(task, name, lr, seed)
    elif a.cmd == "timing":
        res = timing(task, a.opt, a.reps)
        allt = json.loads(TIMING.read_text()) if TIMING.exists() else {}
        allt[a.task] = res
        TIMING.write_text(json.dumps(allt, indent=1))
        print(json.dumps(res, indent=1))
    elif a.cmd == "check":  # a library optimizer against its prototype (--opt LIB PROTO)
        lib, proto = a.opt or ["mfac", "d-adam"]
        models = [task.model(0), task.model(0)]
        opts = [make_optimizer(lib, task, models[0], 1e-3),
                make_optimizer(proto, task, models[1], 1e-3)]  # fmt: skip
        for seed in range(20):
            for model, opt in zip(models, opts, strict=False):
                torch.manual_seed(seed)
                opt.zero_grad()
                model(**next(task.batches(seed))).loss.backward()
                opt.step()
        diff = max(float((p - q).abs().max()) for p, q in
                   zip(models[0].parameters(), models[1].parameters(), strict=False))  # fmt: skip
        print(f"max |{lib} - {proto}| after 20 steps: {diff:.3g}")


if __name__ == "__main__":
    main()
