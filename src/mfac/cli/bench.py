"""``mfac bench``: run the benchmark scripts of a source checkout (``python -m
benchmarks.NAME --quick``), which refresh ``benchmarks/results/``. The benchmarks ship with
the source tree, not with the installed package."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import EXIT_FAILURE, CLIError, EnvironmentProblem, emit, text_table

log = logging.getLogger("mfac.cli")

KNOWN = ("operators", "optim", "prune", "recovery")


def find_root(explicit: str | None) -> Path:
    """The source checkout holding ``benchmarks/``: --root, $MFAC_SOURCE, the current folder,
    or the folder above the installed ``src/mfac`` (editable installs)."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit).expanduser())
    elif os.environ.get("MFAC_SOURCE"):
        candidates.append(Path(os.environ["MFAC_SOURCE"]).expanduser())
    else:
        candidates.append(Path.cwd())
        candidates.append(Path(__file__).resolve().parents[3])
    for c in candidates:
        if (c / "benchmarks" / "__init__.py").is_file():
            return c
    where = candidates[0]
    raise EnvironmentProblem(
        f"no benchmarks found (looked in {', '.join(str(c) for c in candidates)}): the benchmark "
        "scripts ship with the source tree; run 'mfac bench' inside a checkout of torch-mfac "
        f"or pass --root{'' if explicit else ' DIR'}"
        + (f" (no {where}/benchmarks/__init__.py)" if explicit else "")
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run each benchmark in a subprocess from the checkout; a table of exit codes and times."""
    root = find_root(args.root)
    present = [n for n in KNOWN if (root / "benchmarks" / f"{n}.py").is_file()]
    names = list(args.names) or present
    unknown = [n for n in names if n not in present]
    if unknown:
        raise CLIError(f"unknown benchmark(s) {unknown}; present in {root}/benchmarks: {present}")
    if not names:
        raise EnvironmentProblem(f"{root}/benchmarks holds none of {list(KNOWN)}")
    flag = [] if args.full else ["--quick"]
    if args.list:
        for n in names:
            emit(f"{n}: {sys.executable} -m benchmarks.{n} {' '.join(flag)}".rstrip())
        return 0
    rows = []
    for n in names:
        cmd = [sys.executable, "-m", f"benchmarks.{n}", *flag]
        log.info("running %s (in %s)", " ".join(cmd[1:]), root)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                cwd=root,
                timeout=args.timeout,
                check=False,
                stdout=subprocess.DEVNULL if args.quiet else None,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        rows.append(
            {
                "benchmark": n,
                "exit": "timeout" if code is None else code,
                "seconds": time.perf_counter() - t0,
            }
        )
    emit(text_table(rows, ["benchmark", "exit", "seconds"]))
    emit(f"results in {root / 'benchmarks' / 'results'}/")
    failed = [r["benchmark"] for r in rows if r["exit"] != 0]
    if failed:
        raise CLIError(f"benchmark(s) failed: {failed}", code=EXIT_FAILURE)
    return 0
