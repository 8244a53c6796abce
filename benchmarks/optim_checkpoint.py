"""Optimizer checkpoints that grow with the window, and a resume whose peak memory stays near
training's.

A model of about ``--params`` parameters (a stack of square linear layers) is trained for
``--steps`` steps with ``mfac.MFAC`` on one error-feedback top-k window over the whole model
(the fine-tuning setting of docs/optim_transformers.md), then its ``state_dict`` is saved with
``torch.save``. Two more processes each build the same model and optimizer, load the checkpoint
(one with ``torch.load(path, weights_only=True)``, the documented resume recipe, whose
tensors the optimizer adopts; one with ``mmap=True`` as well, whose file-backed tensors it
copies) and take one step. Each process reports its peak RSS (``ru_maxrss``:
every resident page, the mapped checkpoint's page cache included) and its peak anonymous
memory (resident minus file-backed pages, sampled every 0.5 ms by a thread: what the process
owns, the page cache the kernel can drop left out), so the peaks are compared on one machine in
one run:

    PYTHONPATH=src python -m benchmarks.optim_checkpoint --params 20000000 --ngrads 256 \
        --topk 0.01 --steps 3 32 256

Writes results/optim_checkpoint.json: per step count k, the optimizer checkpoint's bytes
against (k/m) x the full window plus AdamW's state (two float32 moments per parameter, what
``torch.optim.AdamW`` saves), and both resumes' peaks against the training peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .common import RESULTS

OUT = RESULTS / "optim_checkpoint.json"


def build(
    params: int, ngrads: int, topk: float, layout: str = "topk"
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (layers of width w with about ``params`` weights) and its optimizer (a dense
    window with ``layout="dense"``)."""
    import mfac

    width = 1024
    depth = max(1, round(params / (width * width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(depth)))
    rows = {"layout": "topk", "topk": topk} if layout == "topk" else {"layout": "dense"}
    opt = mfac.MFAC(model.parameters(), lr=1e-4, ngrads=ngrads, window_scope="model", **rows)
    return model, opt


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, model[0].in_features, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonPeak:
    """Peak anonymous resident memory of this process (resident minus file-backed and shared
    pages, from ``/proc/self/statm``), sampled by a daemon thread every ``interval`` seconds
    (torch releases the GIL inside its kernels, so the samples land during copies)."""

    def __init__(self, interval: float = 5e-4) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def sample(self) -> int:
        """Anonymous resident bytes now."""
        with open("/proc/self/statm") as fh:
            fields = fh.read().split()
        return (int(fields[1]) - int(fields[2])) * self.page

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.sample())


def child(args: argparse.Namespace) -> None:
    """One side of the measurement, in its own process: ``train``, ``resume`` or
    ``resume-mmap``."""
    torch.set_num_threads(1)
    anon = AnonPeak()
    model, opt = build(args.params, args.ngrads, args.topk, args.layout)
    if args.child == "train":
        train_steps(model, opt, args.steps[0])
        torch.save(model.state_dict(), args.path + ".model")
        torch.save(opt.state_dict(), args.path)
        window = opt.windows[0]
        out = {"window_bytes": int(window.window_nbytes), "dim": int(window.dim)}
    else:
        mmap = args.child == "resume-mmap"
        model.load_state_dict(torch.load(args.path + ".model", weights_only=True, mmap=mmap))
        state = torch.load(args.path, weights_only=True, mmap=mmap)
        opt.load_state_dict(state)
        del state
        train_steps(model, opt, 1)
        out = {}
    out["peak_anon"] = anon.stop()
    out["peak_rss"] = peak_rss()
    print(json.dumps(out))


def run_child(args: argparse.Namespace, side: str, steps: int, path: str) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.optim_checkpoint", "--child", side, "--path", path,
        "--params", str(args.params), "--ngrads", str(args.ngrads), "--topk", str(args.topk),
        "--steps", str(steps), "--layout", args.layout,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=20_000_000)
    ap.add_argument("--ngrads", type=int, default=256)
    ap.add_argument("--topk", type=float, default=0.01)
    ap.add_argument("--steps", type=int, nargs="+", default=[3, 32, 256])
    ap.add_argument("--layout", choices=["topk", "dense"], default="topk", help="window rows")
    ap.add_argument("--out", default=str(OUT), help="results file")
    ap.add_argument("--child", choices=["train", "resume", "resume-mmap"])
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            path = str(Path(tmp) / f"ckpt-{steps}.pt")
            train = run_child(args, "train", steps, path)
            resume = run_child(args, "resume", steps, path)
            mapped = run_child(args, "resume-mmap", steps, path)
            size = Path(path).stat().st_size
            dim = train["dim"]
            adamw = 2 * 4 * dim  # AdamW's two float32 moments
            filled = min(steps, args.ngrads)
            bound = filled / args.ngrads * train["window_bytes"] + adamw
            rows.append({
                "steps": steps, "filled_rows": filled, "checkpoint_bytes": size,
                "bound_bytes": int(bound), "checkpoint_over_bound": size / bound,
                "train_peak_rss": train["peak_rss"], "resume_peak_rss": resume["peak_rss"],
                "resume_over_train": resume["peak_rss"] / train["peak_rss"],
                "mmap_resume_peak_rss": mapped["peak_rss"],
                "mmap_resume_over_train": mapped["peak_rss"] / train["peak_rss"],
                "train_peak_anon": train["peak_anon"], "resume_peak_anon": resume["peak_anon"],
                "resume_anon_over_train": resume["peak_anon"] / train["peak_anon"],
                "mmap_resume_peak_anon": mapped["peak_anon"],
                "mmap_resume_anon_over_train": mapped["peak_anon"] / train["peak_anon"],
            })  # fmt: skip
            print(json.dumps(rows[-1]))
    result = {
        "params": dim, "ngrads": args.ngrads, "layout": args.layout,
        "topk": args.topk if args.layout == "topk" else None,
        "threads": 1, "rows": rows,
        "note": "checkpoint = the optimizer's state_dict alone (torch.save); bound = "
        "(filled/m) x the full window + AdamW's two float32 moments (the error-feedback "
        "vector, d float32, is state AdamW does not have); every peak is of a fresh process; "
        "peak_rss = ru_maxrss (a mapped checkpoint's touched pages count), peak_anon = resident "
        "minus file-backed pages, sampled every 0.5 ms (memory the process owns); resume = "
        "torch.load(path, weights_only=True), mmap_resume = the same with mmap=True",
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
