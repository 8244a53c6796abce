"""C kernels for the top-k window's selection on the CPU (the sweeps over the rows are in
:mod:`mfac.operators.tiled`).

The selection pass forms a = e + g (streaming stores with AVX-512), flags NaN/Inf, and lists
the coordinates with |a| >= t together with their a in one sweep, so the kept values need no
later gather from a; :func:`keep_largest` picks the k largest of those candidates by a radix
select, and :func:`sub_at` leaves e = a - c. Threads take disjoint parts of the vector. The
source (``csrc/sparse.c``) is built once per machine with the system C compiler into the cache
folder and loaded with ctypes; without a compiler, or with ``MFAC_NO_COMPILE=1``,
:func:`library` returns None and the window uses its torch path.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from . import cbuild

log = logging.getLogger(__name__)

#: The C file of this library (in cbuild.CSRC).
SOURCE_FILE = "sparse.c"

#: Compiler flag sets tried in order (the first that builds wins).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],
)

_state: dict[str, object] = {}


_compiler = cbuild.find_compiler


def _load(
    compiler: str, flag_sets: tuple[list[str], ...] = _FLAG_SETS, stem: str = "sparse"
) -> ctypes.CDLL:
    """The kernel library built with the first of ``flag_sets`` that compiles (tests build a
    portable one too, without the host's vector extensions), with its argument types set."""
    lib = cbuild.load(SOURCE_FILE, flag_sets, stem, compiler)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mfac_sp_select.argtypes = [p, p, p, i64, ctypes.c_float, i64, p, p, i64, p]
    lib.mfac_sp_select.restype = i64
    lib.mfac_sp_list.argtypes = [p, i64, ctypes.c_float, ctypes.c_float, i64, p, i64]
    lib.mfac_sp_list.restype = i64
    lib.mfac_sp_keep_largest.argtypes = [p, p, i64, i64, p, p]
    lib.mfac_sp_keep_largest.restype = ctypes.c_int
    lib.mfac_sp_sub_at.argtypes = [p, p, p, i64]
    lib.mfac_sp_sub_at.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when it cannot be had."""
    return cbuild.cached_library(_state, "native top-k kernels", lambda: _compiler(), _load, log)


#: Huge-page size on x86-64 and arm64 Linux; buffers of at least HUGE_MIN bytes are aligned
#: to it and advised to use huge pages.
HUGE_PAGE = 2 * 2**20
HUGE_MIN = 8 * HUGE_PAGE
_MADV_HUGEPAGE = 14


def _madvise():
    fn = _state.get("madvise", False)
    if fn is False:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _state["madvise"] = fn
    return fn


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory the kernel is asked to back with huge pages
    (Linux ``madvise(MADV_HUGEPAGE)``, before any page is touched), aligned to 2 MiB.

    The window's sweeps touch a new 4 KiB page every few hundred entries; with huge pages the
    address translations stay cached (a page walk under virtualisation costs about as much as
    reading a page). Elsewhere, or for small buffers, a plain ``torch.empty``."""
    numel = math.prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    advise = _madvise() if device.type == "cpu" else None
    if advise is None or numel * size < HUGE_MIN or HUGE_PAGE % size:
        return torch.empty(shape, dtype=dtype, device=device)
    pad = HUGE_PAGE // size
    raw = torch.empty(numel + pad, dtype=dtype)
    start = (-raw.data_ptr() % HUGE_PAGE) // size
    # the aligned part as a tensor of its own (not a view: no base keeps a second reference)
    out = torch.empty(0, dtype=dtype).set_(raw.untyped_storage(), start, shape)
    del raw
    advise(out.data_ptr(), (numel * size) // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE)
    return out


def _pool(threads: int) -> ThreadPoolExecutor:
    """The worker threads, made again in a forked child (whose copy has no live threads)."""
    return cbuild.worker_pool(_state, threads, "mfac-topk")


_split = cbuild.split_range


def select_values(
    error: torch.Tensor,
    grad: torch.Tensor,
    acc: torch.Tensor,
    threshold: float,
    cap: int,
    values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
    """acc = error + grad (float32, contiguous), and the ascending coordinates with
    |acc| >= threshold with acc there (float32; None when ``values`` is False), read in the
    same pass instead of gathered from acc afterwards: (the first ``cap`` coordinates, their
    acc, the total count, whether acc holds a NaN or Inf)."""
    n = acc.numel()
    parts = _split(n, torch.get_num_threads(), 1 << 20)
    bufs = [torch.empty(cap, dtype=torch.int64) for _ in parts]
    vbufs = [torch.empty(cap if values else 0, dtype=torch.float32) for _ in parts]
    bads = torch.zeros(len(parts), dtype=torch.int32)
    counts = [0] * len(parts)
    lib = library()

    def one(p: int) -> None:
        a, b = parts[p]
        counts[p] = lib.mfac_sp_select(
            error.data_ptr() + 4 * a, grad.data_ptr() + 4 * a, acc.data_ptr() + 4 * a, b - a,
            threshold, a, bufs[p].data_ptr(), vbufs[p].data_ptr() if values else None, cap,
            bads.data_ptr() + 4 * p,
        )  # fmt: skip

    if len(parts) == 1:
        one(0)
    else:
        for f in [_pool(len(parts)).submit(one, p) for p in range(len(parts))]:
            f.result()
    total = sum(counts)
    if len(parts) == 1:
        cand, cval = bufs[0][: min(cap, total)], vbufs[0][: min(cap, total)]
    else:
        pairs = list(zip(bufs, vbufs, counts, strict=True))
        cand = torch.cat([b[: min(cap, c)] for b, _, c in pairs])[:cap]
        cval = torch.cat([v[: min(cap, c)] for _, v, c in pairs])[:cap] if values else None
    return cand, (cval if values else None), total, bool(bads.any())


def keep_largest(
    cand: torch.Tensor, cval: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the candidates (ascending int64 coordinates ``cand``, float32 values ``cval``), the
    k of largest magnitude, in ascending order (ties at the k-th magnitude: the lowest
    coordinates), with their values: a radix select in C, no sort."""
    n = cand.numel()
    idx = torch.empty(min(k, n), dtype=torch.int64)
    val = torch.empty(min(k, n), dtype=torch.float32)
    cand, cval = cand.contiguous(), cval.contiguous()
    if library().mfac_sp_keep_largest(
        cand.data_ptr(), cval.data_ptr(), n, min(k, n), idx.data_ptr(), val.data_ptr()
    ):
        raise MemoryError("native top-k kernel: could not allocate its histogram")
    return idx, val


def sub_at(a: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> None:
    """a[idx] -= v in place, for a contiguous float32 vector, int64 coordinates (ascending
    reads best) and float32 values of the same length."""
    lib = library()
    lib.mfac_sp_sub_at(a.data_ptr(), idx.data_ptr(), v.data_ptr(), idx.numel())


def list_range(a: torch.Tensor, lo: float, hi: float, cap: int) -> tuple[torch.Tensor, int]:
    """The ascending coordinates with lo <= |a| <= hi of a contiguous float32 vector: (the
    first ``cap`` of them, their total count). ``cap = 0`` only counts (no buffer)."""
    out = torch.empty(max(cap, 0), dtype=torch.int64)
    lib = library()
    n = lib.mfac_sp_list(a.data_ptr(), a.numel(), lo, hi, 0, out.data_ptr(), max(cap, 0))
    return out[: min(cap, n)], int(n)


def kth_largest(a: torch.Tensor, k: int) -> float:
    """The k-th largest |a| of a finite contiguous float32 vector, exactly, without a copy:
    a bisection over the bit patterns of non-negative floats (ordered like their values),
    one counting pass per step (at most 32)."""
    lo, hi = 0, 0x7F800000  # count(|a| >= float(lo)) >= k; count(|a| >= float(hi)) < k
    as_float = torch.empty(1, dtype=torch.int32)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        as_float[0] = mid
        t = float(as_float.view(torch.float32)[0])
        if list_range(a, t, float("inf"), 0)[1] >= k:
            lo = mid
        else:
            hi = mid
    as_float[0] = lo
    return float(as_float.view(torch.float32)[0])


__all__ = [
    "empty_huge",
    "keep_largest",
    "kth_largest",
    "library",
    "list_range",
    "select_values",
    "sub_at",
]
