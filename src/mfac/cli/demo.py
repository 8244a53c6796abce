"""``mfac demo``: runs the tour of :mod:`mfac.experiments.demo` (a table per part on stdout)
and writes the report folder (index.html, report.md, PNG plots, results.json). ``--tiny`` (or
``MFAC_DEMO_TINY=1``) runs a seconds-long version for tests."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .._paths import cache_dir
from .common import atomic_dir, check_replaceable, emit, progress, write_json

log = logging.getLogger("mfac.cli")


def run_demo(args: argparse.Namespace) -> int:
    """Run the parts, print their tables, write the report folder; exit code 0."""
    import torch

    from ..experiments.demo import Config, pick_threads, report, tour

    tiny = bool(args.tiny) or os.environ.get("MFAC_DEMO_TINY", "") not in ("", "0")
    threads = pick_threads()
    torch.set_num_threads(threads)
    cache = None if args.no_cache else cache_dir(args.cache_dir)
    out = Path(args.output)
    check_replaceable(out, probe=True)
    log.info(
        "mfac demo%s: %d torch thread(s); report -> %s/", " (tiny)" if tiny else "", threads, out
    )
    results = tour(Config.make(tiny), args.parts, args.seed, cache, progress, emit)
    with atomic_dir(out) as tmp:
        report(results, tmp).write(tmp)
        write_json(tmp / "results.json", results)
    emit(
        f"\ndone in {results['wall_s']:.0f} s; report: {out.resolve() / 'index.html'} "
        f"(also report.md, PNGs, results.json)"
    )
    return 0
