"""M-FAC's step at scale: the O(m^2) update of K^-1 against the O(m^3) refactor per push, and
the top-k window's step against its memory floor.

    python -m benchmarks.optim_scale factor            # step()/SGD, m 256..1024, d 10k/100k
    python -m benchmarks.optim_scale topk --dim 50000000
    python -m benchmarks.optim_scale report            # markdown tables for docs/optim.md

``factor``: MLPs of about 10k and 100k parameters on one thread. Three timings per m,
interleaved in one process: SGD's step, MFACSGD.step() with the O(m^2) update (this version),
and MFACSGD.step() with the factor refactored by Cholesky at every push (the previous
implementation, kept below as the baseline class). Also the m x m work alone (``commit``) for both.

``topk``: the EFCP window's push_ihvp on a synthetic full window (random sparse rows, K of
their norms) at dimension d, one subprocess per (m, density) so that each peak RSS is its own.
The floor is what the step cannot avoid: reading the m x k values and indices twice (G c and
G^T y) plus four streaming passes over d (a = e + g, |a| and its threshold test, e = a - c,
the scattered result), timed right after each step in the same process; the ratio is the
median of the per-step ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from mfac.operators.gram import F64, GramFactor
from mfac.operators.threads import single_threaded
from mfac.operators.topk import TopKSlidingInverseFisher
from mfac.optim import MFACSGD

from benchmarks.common import RESULTS, fill_topk_window, git_commit, machine, write_json


class RefactorEachPush(GramFactor):
    """Baseline: the previous implementation, a Cholesky refactor of K at every push."""

    def commit(self, u: torch.Tensor) -> int:
        slot = self.next_slot
        u = u.to(F64)
        self.gram[slot, :] = u
        self.gram[:, slot] = u
        self.gram[slot, slot] += self.shift
        with single_threaded():
            self._chol = torch.linalg.cholesky_ex(self.gram)[0]
        self.next_slot = (slot + 1) % self.window
        self.num_pushed += 1
        return slot

    def slot_coeff(self, slot: int) -> torch.Tensor:
        with single_threaded():
            rhs = torch.zeros(self.window, 1, dtype=F64)
            rhs[slot, 0] = float(self.window)
            return torch.cholesky_solve(rhs, self._chol)


def _mlp(dim: int) -> nn.Module:
    """A 256-h-4 MLP with about ``dim`` parameters (h = 384: 100,228)."""
    torch.manual_seed(0)
    hidden = max(1, round((dim - 4) / 261))
    return nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def _fill(opt: MFACSGD, factor_cls: type[GramFactor]) -> None:
    """A full window of random rows, using ``factor_cls`` for K^-1. Gaussian rows in d >= 10^4
    dimensions are nearly orthogonal, so K is taken as m*damp*I + diag(|g_i|^2), an SPD matrix
    that costs O(m d) instead of the O(m^2 d) Gram product (the timings do not depend on it)."""
    w = opt.window
    g = w.grads
    g.normal_()
    factor = factor_cls(w.window, w.damp, "cpu")
    gram = torch.diag(g.double().square().sum(1)) + w.window * w.damp * torch.eye(
        w.window, dtype=F64
    )
    factor.gram = gram
    factor.inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    factor._chol = torch.linalg.cholesky(gram)
    w.factor = factor


def factor_bench(ms: list[int], dims: list[int], reps: int) -> dict[str, Any]:
    """step() of SGD, MFACSGD (O(m^2) update) and MFACSGD (refactor per push), interleaved."""
    torch.set_num_threads(1)
    rows = []
    for dim, m in [(dim, m) for dim in dims for m in ms]:
        model = _mlp(dim)
        params = list(model.parameters())
        d = sum(p.numel() for p in params)
        sgd = torch.optim.SGD(params, lr=0.0)
        new = MFACSGD(params, lr=0.0, ngrads=m, damp=1e-4)
        old = MFACSGD(params, lr=0.0, ngrads=m, damp=1e-4)
        _fill(new, GramFactor)
        _fill(old, RefactorEachPush)
        gen = torch.Generator().manual_seed(m)
        times: dict[str, list[float]] = {"sgd": [], "mfac": [], "mfac_refactor_each_push": []}
        floors: dict[str, list[float]] = {"mfac": [], "mfac_refactor_each_push": []}
        xs, ys = torch.randn(d), torch.randn(m)
        order = [("sgd", sgd), ("mfac", new), ("mfac_refactor_each_push", old)]
        for rep in range(reps + 2):
            for name, opt in order[rep % 3 :] + order[: rep % 3]:  # rotate: no position bias
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                t = time.perf_counter()
                opt.step()
                if rep >= 2:
                    times[name].append(time.perf_counter() - t)
                if name != "sgd":  # this window's two-pass floor, G x then y G (BLAS)
                    g = opt.window.grads
                    t = time.perf_counter()
                    g @ xs
                    ys @ g
                    if rep >= 2:
                        floors[name].append(time.perf_counter() - t)
        # the m x m work alone, on K of the filled window
        u = torch.randn(m, dtype=F64)
        commit = {}
        for name, opt in (("mfac", new), ("mfac_refactor_each_push", old)):
            f = opt.window.factor
            ts = []
            for _ in range(reps):
                u.normal_()
                u[f.next_slot] = float(f.gram[f.next_slot, f.next_slot]) - f.shift
                t = time.perf_counter()
                slot = f.commit(u)
                f.slot_coeff(slot)
                ts.append(time.perf_counter() - t)
            commit[name] = statistics.median(ts)
        f = new.window.factor
        t = time.perf_counter()
        with single_threaded():
            f._refactor()
        refactor_s = time.perf_counter() - t
        med = {k: statistics.median(v) for k, v in times.items()}
        flo = {k: statistics.median(v) for k, v in floors.items()}
        row = {
            "ngrads": m,
            "dim": d,
            "sgd_step_ms": med["sgd"] * 1e3,
            "mfac_step_ms": med["mfac"] * 1e3,
            "mfac_step_amortised_ms": (med["mfac"] + refactor_s / m) * 1e3,
            "refactor_each_push_step_ms": med["mfac_refactor_each_push"] * 1e3,
            "mfac_mxm_ms": commit["mfac"] * 1e3,
            "refactor_each_push_mxm_ms": commit["mfac_refactor_each_push"] * 1e3,
            "full_refactor_ms": refactor_s * 1e3,
            "mfac_floor_ms": flo["mfac"] * 1e3,
            "refactor_each_push_floor_ms": flo["mfac_refactor_each_push"] * 1e3,
            "mfac_over_floor": (med["mfac"] + refactor_s / m) / flo["mfac"],
            "before_over_floor": med["mfac_refactor_each_push"] / flo["mfac_refactor_each_push"],
            "residual_refactors": f.refactors - 1,
        }
        row["mfac_over_sgd"] = row["mfac_step_amortised_ms"] / row["sgd_step_ms"]
        row["before_over_sgd"] = row["refactor_each_push_step_ms"] / row["sgd_step_ms"]
        row["speedup"] = row["refactor_each_push_step_ms"] / row["mfac_step_amortised_ms"]
        rows.append(row)
        print(
            f"m={m} d={d}: SGD {row['sgd_step_ms']:.3f} ms | MFAC {row['mfac_step_ms']:.2f} ms "
            f"(amortised {row['mfac_step_amortised_ms']:.2f}; m x m {row['mfac_mxm_ms']:.2f}) | "
            f"refactor each push {row['refactor_each_push_step_ms']:.2f} ms "
            f"(m x m {row['refactor_each_push_mxm_ms']:.2f}) | speedup {row['speedup']:.2f}x | "
            f"step/two-pass floor now {row['mfac_over_floor']:.2f}, before "
            f"{row['before_over_floor']:.2f}",
            flush=True,
        )
        del new, old, sgd
    return {"threads": 1, "reps": reps, "rows": rows, "machine": machine()}


# ---------------------------------------------------------------------- top-k
def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read_window(op: TopKSlidingInverseFisher) -> None:
    """One streaming read of m k values and indices (integer max reductions over their bytes:
    vectorised, no conversion); the C layout's spare group and offsets are not counted."""
    ints = {4: torch.int32, 2: torch.int16}
    n = op.window * op.k
    op.values.view(ints[op.values.element_size()]).view(-1)[:n].max()
    op.indices.view(-1)[:n].max()


def topk_one(
    dim: int,
    m: int,
    density: float,
    reps: int,
    memory_budget: int | None = None,
    value_dtype: torch.dtype = torch.float32,
    compare_torch: bool = False,
    threads: tuple[int, ...] = (1,),
) -> list[dict[str, Any]]:
    """One configuration, in this process: step time, floor, peak RSS (and, with
    ``compare_torch``, the torch path's step on the same window, timed after the peak RSS is
    read), one row per thread count in ``threads``. The thread counts take turns within each
    repetition, and the floor is read with the same thread count as the step it is compared to.
    ``memory_budget`` (bytes) overrides the window's default ceiling."""
    torch.set_num_threads(max(threads))
    k = round(density * dim)
    rss0 = _peak_rss()
    op = TopKSlidingInverseFisher(
        dim, m, k, damp=1e-4, dtype=value_dtype, memory_budget=memory_budget
    )
    gen = torch.Generator().manual_seed(0)
    fill_topk_window(op, gen)  # a full window of random sparse rows, K from their norms
    grads = [torch.randn(dim, generator=gen) for _ in range(2)]
    op.push_ihvp(grads[0])  # warm-up
    # step and floor interleaved (each step is followed by its floor's reads and pass), so
    # that a drift of the machine's load moves both; the ratio is the median of per-rep ratios
    times = {n: {"step": [], "read": [], "pass": []} for n in threads}
    x, y, z = grads[0], grads[1], torch.empty(dim)
    for i in range(reps):
        for n in threads:
            torch.set_num_threads(n)
            t = time.perf_counter()
            op.push_ihvp(grads[i % 2])
            times[n]["step"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _read_window(op)
            times[n]["read"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.add(x, y, out=z)
            times[n]["pass"].append(time.perf_counter() - t)
    del z
    peak = _peak_rss()
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        rows.append(_topk_row(op, gen, times[n], peak, rss0, value_dtype, density, n))
    if compare_torch and op.native:  # the torch path, at the largest thread count (its row)
        torch.set_num_threads(max(threads))
        op.to_torch_path()
        op.push_ihvp(grads[0])  # warm-up (allocates the torch path's dense row)
        torch_t = []
        for i in range(reps):
            t = time.perf_counter()
            op.push_ihvp(grads[i % 2])
            torch_t.append(time.perf_counter() - t)
        row = rows[threads.index(max(threads))]
        row["torch_step_s"] = statistics.median(torch_t)
        row["speedup_over_torch"] = row["torch_step_s"] / row["step_s"]
    return rows


def _topk_row(
    op: TopKSlidingInverseFisher,
    gen: torch.Generator,
    times: dict[str, list[float]],
    peak: int,
    rss0: int,
    value_dtype: torch.dtype,
    density: float,
    threads: int,
) -> dict[str, Any]:
    """One thread count's row: its step and floor times, and (C path) each sweep timed alone."""
    dim, m, k = op.dim, op.window, op.k
    step_t, read_t, pass_t = times["step"], times["read"], times["pass"]
    floors = [2 * r + 4 * p for r, p in zip(read_t, pass_t, strict=True)]
    step = statistics.median(step_t)
    floor = statistics.median(floors)
    row = {
        "dim": dim,
        "ngrads": m,
        "density": density,
        "k": k,
        "value_dtype": str(value_dtype).replace("torch.", ""),
        "native": op.native,
        "threads": threads,
        "step_s": step,
        "steps_s": step_t,
        "floor_s": floor,
        "ratio": statistics.median(s / f for s, f in zip(step_t, floors, strict=True)),
        "read_window_s": statistics.median(read_t),
        "pass_over_d_s": statistics.median(pass_t),
        "window_bytes": op.window_nbytes,
        "state_bytes": op.nbytes,
        "required_bytes": TopKSlidingInverseFisher.required_bytes(dim, m, k, value_dtype),
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss0,
        "benchmark_vectors_bytes": 2 * dim * 4,  # its two gradients (x, y of the floor)
    }
    if op.native:  # where the step's time goes: its two sweeps over the window, alone
        slot = (op.factor.next_slot - 1) % m
        sval, sidx = op.row(slot)
        sidx, sval = sidx.long(), sval.float()
        coeff = torch.randn(m, dtype=F64, generator=gen)
        out = op._result_buffer()
        gather_t, scatter_t, replace_t = [], [], []
        for _ in range(3):
            t = time.perf_counter()
            op.rows.gather(sparse=(sidx, sval))
            gather_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            op.rows.scatter(coeff, out)
            scatter_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            op.rows.replace(slot, sidx, sval.to(op.dtype))  # the same row again
            replace_t.append(time.perf_counter() - t)
        row["gather_sweep_s"] = statistics.median(gather_t)
        row["scatter_sweep_s"] = statistics.median(scatter_t)
        row["replace_row_s"] = statistics.median(replace_t)
        row["ns_per_entry_gather"] = row["gather_sweep_s"] / (m * k) * 1e9
        row["ns_per_entry_scatter"] = row["scatter_sweep_s"] / (m * k) * 1e9
        row["ns_per_entry_read"] = row["read_window_s"] / (m * k) * 1e9
        del sidx, sval, out
    return row


def topk_bench(
    dim: int,
    ms: list[int],
    densities: list[float],
    reps: int,
    max_bytes: int,
    value_dtype: str = "float32",
    compare_torch: bool = False,
    threads: tuple[int, ...] = (1,),
) -> dict[str, Any]:
    rows, skipped = [], []
    dtype = getattr(torch, value_dtype)
    for m in ms:
        for density in densities:
            need = TopKSlidingInverseFisher.required_bytes(dim, m, round(density * dim), dtype)
            if need > max_bytes:  # what the optimizer's own check would refuse under this cap
                skipped.append(
                    {"dim": dim, "ngrads": m, "density": density, "required_bytes": need,
                     "value_dtype": value_dtype, "max_bytes": max_bytes}
                )  # fmt: skip
                print(f"topk d={dim} m={m} density={density}: needs {need / 2**30:.2f} GiB, "
                      f"over the {max_bytes / 2**30:.2f} GiB cap: not run", flush=True)  # fmt: skip
                continue
            cmd = [sys.executable, "-m", "benchmarks.optim_scale", "_topk_one"]
            cmd += ["--dim", str(dim), "--m", str(m), "--density", str(density)]
            cmd += ["--reps", str(reps), "--value-dtype", value_dtype]
            cmd += ["--budget-gib", str(max_bytes / 2**30)]  # the cap is the window's budget
            cmd += ["--compare-torch"] if compare_torch else []
            cmd += ["--threads", *map(str, threads)]
            most = str(max(threads))
            env = {**os.environ, "OMP_NUM_THREADS": most, "MKL_NUM_THREADS": most}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            for row in json.loads(out.stdout.strip().splitlines()[-1]):
                row["commit"] = git_commit()
                rows.append(row)
                print(
                    f"topk d={dim} m={m} density={density} threads={row['threads']}: step "
                    f"{row['step_s'] * 1e3:.0f} ms, floor {row['floor_s'] * 1e3:.0f} ms, ratio "
                    f"{row['ratio']:.2f}, torch path "
                    f"{row.get('torch_step_s', float('nan')) * 1e3:.0f} ms, peak RSS "
                    f"{row['peak_rss_bytes'] / 2**30:.2f} GiB (window "
                    f"{row['window_bytes'] / 2**30:.2f} GiB, estimate "
                    f"{row['required_bytes'] / 2**30:.2f} GiB)",
                    flush=True,
                )
    return {"threads": list(threads), "reps": reps, "rows": rows, "skipped": skipped,
            "max_bytes": max_bytes, "machine": machine()}  # fmt: skip


def _merge_topk(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Rows of earlier runs stay unless this run measured the same configuration (d, m,
    density, value dtype, threads: 1 for rows that predate the field); a replaced row's step,
    floor and ratio stay in the new row under "previous" (with the command that measured
    them); rows without a value dtype (older runs) are dropped; a "not run" note stays only
    while no row measures its configuration."""

    def key(r: dict[str, Any]) -> tuple:
        return (r["dim"], r["ngrads"], r["density"], r.get("value_dtype", "float32"),
                r.get("threads", 1))  # fmt: skip

    old = old or {"rows": [], "skipped": []}
    replaced = {key(r): r for r in old.get("rows", []) if "value_dtype" in r}
    kept_fields = ("step_s", "floor_s", "ratio", "peak_rss_bytes", "command", "commit")
    for r in new["rows"]:
        if key(r) in replaced:
            r["previous"] = {f: replaced[key(r)][f] for f in kept_fields if f in replaced[key(r)]}
    done = {key(r) for r in new["rows"]}
    keep = [r for r in old.get("rows", []) if "value_dtype" in r and key(r) not in done]
    rows = sorted(keep + new["rows"], key=key)
    measured = {key(r) for r in rows}  # a measured row outranks any "not run" note
    skipped = {key(r): r for r in old.get("skipped", []) + new["skipped"]}
    skipped = [r for k, r in skipped.items() if k not in measured]
    return {**new, "rows": rows, "skipped": skipped}


def plot(factor: dict[str, Any] | None, topk: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    if factor:
        for dim in sorted({r["dim"] for r in factor["rows"]}):
            rows = [r for r in factor["rows"] if r["dim"] == dim]
            ms = [r["ngrads"] for r in rows]
            before = [r["before_over_sgd"] for r in rows]
            axes[0].plot(ms, before, "o--", label=f"d={dim:,}: refactor each push")
            axes[0].plot(ms, [r["mfac_over_sgd"] for r in rows], "o-", label=f"d={dim:,}: O(m^2)")
        axes[0].set(xlabel="m", ylabel="MFACSGD.step() / SGD.step()", xscale="log", yscale="log",
                    title="1 thread")  # fmt: skip
        axes[0].legend(fontsize=7)
    if topk and topk["rows"]:
        labels = [f"m={r['ngrads']}\n{r['density']:.1%}\n{r['value_dtype'].replace('float', 'f')}"
                  f"\n{r.get('threads', 1)} thr" for r in topk["rows"]]  # fmt: skip
        xs = range(len(labels))
        axes[1].bar([x - 0.2 for x in xs], [r["step_s"] for r in topk["rows"]], 0.4, label="step")
        axes[1].bar([x + 0.2 for x in xs], [r["floor_s"] for r in topk["rows"]], 0.4, label="floor")
        axes[1].set_xticks(list(xs), labels, fontsize=8)
        axes[1].set(ylabel="seconds", title=f"top-k push_ihvp, d = {topk['rows'][0]['dim']:,}")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "optim_scale.png", dpi=90)
    plt.close(fig)


def report() -> str:
    path = RESULTS / "optim_scale.json"
    res = json.loads(path.read_text())
    out = []
    if res.get("factor"):
        out.append("| m | d | SGD step ms | MFAC step ms (before) | MFAC step ms (now, amortised) "
                   "| m x m ms before / now | step/SGD before | step/SGD now "
                   "| step/floor before | step/floor now |")  # fmt: skip
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in res["factor"]["rows"]:
            out.append(
                f"| {r['ngrads']} | {r['dim']:,} | {r['sgd_step_ms']:.3f} | "
                f"{r['refactor_each_push_step_ms']:.2f} | {r['mfac_step_amortised_ms']:.2f} | "
                f"{r['refactor_each_push_mxm_ms']:.2f} / {r['mfac_mxm_ms']:.2f} | "
                f"{r['before_over_sgd']:.0f} | {r['mfac_over_sgd']:.0f} | "
                f"{r['before_over_floor']:.2f} | {r['mfac_over_floor']:.2f} |"
            )
    if res.get("topk"):
        for r in res["topk"].get("skipped", []):
            cap = r.get("max_bytes", res["topk"]["max_bytes"])
            out.append(f"\nNot run (needs {r['required_bytes'] / 2**30:.1f} GiB, over the "
                       f"{cap / 2**30:.1f} GiB cap): d = {r['dim']:,}, "
                       f"m = {r['ngrads']}, density {r['density']:.1%}, "
                       f"{r.get('value_dtype', 'float32')} values.")  # fmt: skip
        out.append("")
        out.append("| d | m | density | values | threads | step s | floor s | step/floor "
                   "| previous step s / floor s / step/floor | torch path s | peak RSS GiB "
                   "| window GiB | estimate GiB |")  # fmt: skip
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
                   "| --- |")  # fmt: skip
        for r in res["topk"]["rows"]:
            torch_s = f"{r['torch_step_s']:.2f}" if "torch_step_s" in r else "-"
            prev = r.get("previous")
            before = (f"{prev['step_s']:.2f} / {prev['floor_s']:.2f} / {prev['ratio']:.2f}"
                      if prev else "-")  # fmt: skip
            out.append(
                f"| {r['dim']:,} | {r['ngrads']} | {r['density']:.1%} | {r['value_dtype']} | "
                f"{r.get('threads', 1)} | {r['step_s']:.2f} | {r['floor_s']:.2f} | "
                f"{r['ratio']:.2f} | {before} | "
                f"{torch_s} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                f"{r['window_bytes'] / 2**30:.2f} | {r['required_bytes'] / 2**30:.2f} |"
            )
        swept = [r for r in res["topk"]["rows"] if "ns_per_entry_gather" in r]
        if swept:
            out.append("\nWhere the step's time goes (ns per kept entry, each sweep timed alone on "
                       "the same window after the steps):\n")  # fmt: skip
            out.append("| m | density | values | threads | G c sweep s | G^T y sweep s | G c ns "
                       "| G^T y ns | streaming read ns | row replace s |")  # fmt: skip
            out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for r in swept:
                replace = f"{r['replace_row_s']:.3f}" if "replace_row_s" in r else "-"
                out.append(
                    f"| {r['ngrads']} | {r['density']:.1%} | {r['value_dtype']} | "
                    f"{r.get('threads', 1)} | {r['gather_sweep_s']:.2f} | "
                    f"{r['scatter_sweep_s']:.2f} | "
                    f"{r['ns_per_entry_gather']:.2f} | {r['ns_per_entry_scatter']:.2f} | "
                    f"{r['ns_per_entry_read']:.2f} | {replace} |"
                )
        out.append("\nCommands (one process per row; `--compare-torch` also times the torch path "
                   "on the same window after the peak RSS is read):")  # fmt: skip
        for command in sorted({r["command"] for r in res["topk"]["rows"] if "command" in r}):
            out.append(f"`{command}`  ")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["factor", "topk", "all", "report", "_topk_one"])
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dims", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=50_000_000)
    ap.add_argument("--topk-ms", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.001])
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--max-gib", type=float, default=7.0, help="skip top-k runs needing more")
    ap.add_argument(
        "--budget-gib", type=float, default=None, help="_topk_one: the window's memory budget"
    )
    ap.add_argument("--value-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compare-torch", action="store_true", help="also time the torch path's step")
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[1],
        help="top-k: thread counts, taking turns on the same window (one row each)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.what == "report":
        print(report())
        return
    if args.what == "_topk_one":
        budget = None if args.budget_gib is None else int(args.budget_gib * 2**30)
        rows = topk_one(
            args.dim, args.m, args.density, args.reps, budget,
            getattr(torch, args.value_dtype), args.compare_torch, tuple(args.threads),
        )  # fmt: skip
        print(json.dumps(rows))
        return
    path = RESULTS / "optim_scale.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if args.what in ("factor", "all"):
        res["factor"] = factor_bench(args.ms, args.dims, args.reps)
        res["factor"]["command"] = " ".join(["python -m benchmarks.optim_scale", *sys.argv[1:]])
    if args.what in ("topk", "all"):
        cap = int(args.max_gib * 2**30)
        new = topk_bench(
            args.dim, args.topk_ms, args.densities, max(3, args.reps // 3), cap,
            args.value_dtype, args.compare_torch, tuple(args.threads),
        )  # fmt: skip
        command = " ".join(["python -m benchmarks.optim_scale", *sys.argv[1:]])
        for entry in new["rows"] + new["skipped"]:
            entry["command"] = command
        res["topk"] = _merge_topk(res.get("topk"), new)
    write_json("optim_scale", res)
    plot(res.get("factor"), res.get("topk"))


if __name__ == "__main__":
    main()
