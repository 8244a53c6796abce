"""Building and loading the operators' small C kernels, shared by :mod:`.native` (the
low-precision passes and the static build), :mod:`.sparse_native` and :mod:`.tiled` (the
top-k window).

Each kernel library is one C file of ``csrc/`` (package data, next to this module; the headers
there are shared), compiled once with the system C compiler (``$CC``, ``cc``, ``gcc`` or
``clang``) into the cache folder (:func:`mfac._paths.cache_dir`), under a name hashed from its
sources, the compiler and its version, the flags and the CPU (``-march=native`` code runs only
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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from .._paths import atomic_file, cache_dir

log = logging.getLogger(__name__)

#: The folder, next to this module, of the C sources (shipped as package data): one ``.c`` file
#: per kernel library and the headers they share.
CSRC = "csrc"

#: Warnings the shipped C sources compile without, with any of the modules' flag sets; the
#: test suite builds every source with them and ``-Werror`` (tests/operators/test_csrc.py).
WARNINGS = (
    "-Wall",
    "-Wextra",
    "-Wshadow",
    "-Wstrict-prototypes",
    "-Wpointer-arith",
    "-Wundef",
    "-Wvla",
    "-Wwrite-strings",
    "-Wconversion",
    "-Wdouble-promotion",
)


def source_files() -> list[str]:
    """The names of the shipped C files (``.c``, one per kernel library), sorted."""
    root = resources.files(__package__) / CSRC
    return sorted(entry.name for entry in root.iterdir() if entry.name.endswith(".c"))


def kernel_source(name: str) -> dict[str, str]:
    """The text of the C file ``name`` (first) and of every shared header, by file name: what
    a build compiles, and what its cache key hashes."""
    root = resources.files(__package__) / CSRC
    headers = sorted(entry.name for entry in root.iterdir() if entry.name.endswith(".h"))
    return {file: (root / file).read_text() for file in [name, *headers]}


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


def compile_command(compiler: str, flags: Sequence[str], source: Path, lib: Path) -> list[str]:
    """The command that builds the shared library ``lib`` from the C file ``source``."""
    return [compiler, *flags, "-fPIC", "-shared", str(source), "-o", str(lib)]


def build(
    sources: Mapping[str, str], flag_sets: Sequence[Sequence[str]], compiler: str, target: Path
) -> None:
    """Compile the first of ``sources`` (file name -> text; the others are the headers it may
    include) into the shared library ``target`` (written atomically), trying each flag set in
    turn; raise with the compiler's messages when none builds. The files keep their names, so
    the compiler's messages point at lines of the shipped sources."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for file, text in sources.items():
            (Path(tmp) / file).write_text(text)
        src, lib = Path(tmp) / next(iter(sources)), Path(tmp) / "kernel.so"
        for flags in flag_sets:
            cmd = compile_command(compiler, flags, src, lib)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                with atomic_file(target) as out:
                    shutil.copyfile(lib, out)
                return
            errors.append(done.stderr.strip()[-300:])
    raise RuntimeError("the C compiler failed: " + " | ".join(errors))


def load(
    name: str,
    flag_sets: Sequence[Sequence[str]],
    stem: str,
    compiler: str,
    builder: Callable[[Mapping[str, str], Sequence[Sequence[str]], str, Path], None] = build,
) -> ctypes.CDLL:
    """The library built from the C file ``name`` (in :data:`CSRC`), from the cache
    (``kernels/<stem>-<hash>.so``, the hash over the sources, the compiler and its version, the
    flags and the CPU), built there first when missing."""
    sources = kernel_source(name)
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    texts = [f"{file}\n{text}" for file, text in sources.items()]
    key = "\n".join([*texts, compiler, version, repr(list(flag_sets)), cpu_signature()])
    target = cache_dir() / "kernels" / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"
    if not target.exists():
        builder(sources, flag_sets, compiler, target)
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
    "CSRC",
    "WARNINGS",
    "build",
    "cached_library",
    "compile_command",
    "cpu_signature",
    "find_compiler",
    "kernel_source",
    "load",
    "source_files",
    "split_range",
    "worker_pool",
]
