"""Building and loading the operators' small C kernels, shared by :mod:`.native` (the
low-precision passes and the static build), :mod:`.sparse_native` and :mod:`.tiled` (the
top-k window).

Each kernel library is compiled once with the system C compiler (``$CC``, ``cc``, ``gcc`` or
``clang``) into the cache folder (:func:`mfac._paths.cache_dir`), under a name hashed from its
source, the compiler and its version, the flags and the CPU (``-march=native`` code runs only
where it was built), and loaded with ctypes. ``MFAC_NO_COMPILE=1``, Windows, a missing or
failing compiler all give ``None``, and the callers fall back to torch. Work is split over a
thread pool that is made again in a forked child.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .._paths import atomic_file, cache_dir

log = logging.getLogger(__name__)

#: C prelude of every kernel source: 16-bit floats widened to float32 in registers (bfloat16
#: by a shift; IEEE half through the compiler's _Float16, where it has one: MFAC_HAS_F16).
HALF_FLOATS = r"""
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__FLT16_MAX__)
#define MFAC_HAS_F16 1
static inline float from_f16(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}
#else
#define MFAC_HAS_F16 0
static inline float from_f16(uint16_t h) { (void)h; return 0.0f; }
#endif
"""


def find_compiler() -> str | None:
    """The first C compiler found: ``$CC``, then ``cc``, ``gcc``, ``clang``."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_signature() -> str:
    """What the built code depends on: the machine and its instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def build(source: str, flag_sets: Sequence[Sequence[str]], compiler: str, target: Path) -> None:
    """Compile ``source`` into the shared library ``target`` (written atomically), trying each
    flag set in turn; raise with the compiler's messages when none builds."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "kernel.c", Path(tmp) / "kernel.so"
        src.write_text(source)
        for flags in flag_sets:
            cmd = [compiler, *flags, "-fPIC", "-shared", str(src), "-o", str(lib)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                with atomic_file(target) as out:
                    shutil.copyfile(lib, out)
                return
            errors.append(done.stderr.strip()[-300:])
    raise RuntimeError("the C compiler failed: " + " | ".join(errors))


def load(
    source: str,
    flag_sets: Sequence[Sequence[str]],
    stem: str,
    compiler: str,
    builder: Callable[[str, Sequence[Sequence[str]], str, Path], None] = build,
) -> ctypes.CDLL:
    """The library built from ``source``, from the cache (``kernels/<stem>-<hash>.so``), built
    there first when missing."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    key = "\n".join([source, compiler, version, repr(list(flag_sets)), cpu_signature()])
    target = cache_dir() / "kernels" / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"
    if not target.exists():
        builder(source, flag_sets, compiler, target)
    return ctypes.CDLL(str(target))


def cached_library(
    state: dict[str, object],
    what: str,
    find: Callable[[], str | None],
    make: Callable[[str], ctypes.CDLL],
    logger: logging.Logger = log,
) -> ctypes.CDLL | None:
    """``state["lib"]``, made on first use by ``make(compiler)``; None (once, with one logged
    warning naming ``what``) when compiling is off, unsupported or fails."""
    if "lib" in state:
        return state["lib"]  # type: ignore[return-value]
    lib = None
    if os.environ.get("MFAC_NO_COMPILE") != "1" and sys.platform != "win32":
        compiler = find()
        if compiler is not None:
            try:
                lib = make(compiler)
            except Exception as exc:  # no working compiler, or the library does not load
                logger.warning("%s unavailable (%s)", what, exc)
                lib = None
    state["lib"] = lib
    return lib


def worker_pool(state: dict[str, object], threads: int, prefix: str) -> ThreadPoolExecutor:
    """The worker threads kept in ``state``, made again in a forked child (whose copy has no
    live threads) or when more are needed."""
    pool = state.get("pool")
    size = getattr(pool, "_max_workers", 0)
    if pool is None or state.get("pid") != os.getpid() or size < threads:
        if pool is not None and state.get("pid") == os.getpid():
            pool.shutdown(wait=False)  # type: ignore[attr-defined]
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=prefix)
        state["pool"], state["pid"] = pool, os.getpid()
    return pool  # type: ignore[return-value]


def split_range(n: int, parts: int, grain: int) -> list[tuple[int, int]]:
    """[0, n) in at most ``parts`` ranges of at least ``grain``, the inner boundaries on
    multiples of ``grain``."""
    parts = max(1, min(parts, n // max(1, grain)))
    edges = [n * p // parts for p in range(parts + 1)]
    if grain > 1:
        edges = [edges[0]] + [e - e % grain for e in edges[1:-1]] + [edges[-1]]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


__all__ = [
    "HALF_FLOATS",
    "build",
    "cached_library",
    "cpu_signature",
    "find_compiler",
    "load",
    "split_range",
    "worker_pool",
]
