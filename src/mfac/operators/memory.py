"""Where the big m x d buffers live: RAM when they fit a memory budget, a memory-mapped file
when they do not, and a clear error before any allocation when neither can hold them."""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .._validation import NonFiniteGradientError, check_float_dtype, check_positive_int


def available_memory() -> int:
    """Bytes of RAM the OS reports as available (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def default_memory_budget() -> int:
    """Half of the available RAM: the default ceiling for one operator buffer."""
    return available_memory() // 2


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def gram_nbytes(window: int, resident: int = 2, scratch: int = 2) -> int:
    """Bytes of the m x m float64 matrices of a window of ``window`` rows: ``resident`` kept
    (K and K^-1 for a sliding window) plus ``scratch`` alive during a refactorisation (the
    Cholesky factor and the new inverse). Callers with another layout pass their own counts."""
    return (resident + scratch) * window * window * 8


def check_fits(
    nbytes: int,
    what: str,
    memory_budget: int | None,
    device: torch.device | None = None,
    hint: str = "use a smaller window (ngrads), bfloat16 history, a sparser top-k history or "
    "a process group",
) -> None:
    """Raise MemoryError, before allocating, when ``nbytes`` exceed the memory budget.

    The default budget is half the available RAM for CPU buffers and the free memory of the
    device for CUDA buffers. The message gives the bytes needed, the budget and where it came
    from."""
    kind = torch.device(device).type if device is not None else "cpu"
    on_cuda = kind == "cuda"
    if memory_budget is None and kind not in ("cpu", "cuda"):
        return  # other accelerators: no portable way to read their free memory
    if on_cuda:
        available = int(torch.cuda.mem_get_info(device)[0])
        budget = available if memory_budget is None else int(memory_budget)
        source = f"the free memory of {device}" if memory_budget is None else "memory_budget"
        free = f"{_gib(available)} free on {device}"
    else:
        available = available_memory()
        budget = available // 2 if memory_budget is None else int(memory_budget)
        source = "half the available RAM" if memory_budget is None else "memory_budget"
        free = f"{_gib(available)} of RAM available"
    if nbytes > budget:
        raise MemoryError(
            f"{what} needs {_gib(nbytes)} ({nbytes} bytes), over the memory budget of "
            f"{_gib(budget)} ({source}; {free}); {hint}"
        )


def allocate(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    memory_budget: int | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    what: str = "buffer",
) -> torch.Tensor:
    """Allocate a zeroed tensor in RAM if it fits ``memory_budget`` bytes, else memory-mapped.

    The memory-mapped file lives in ``spill_dir`` (default: the system temp dir) and is unlinked
    at once, so it disappears with the tensor. Raises MemoryError, before allocating anything,
    when the buffer fits neither the budget nor the free disk space.
    """
    numel = 1
    for n in shape:
        numel *= int(n)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    if nbytes <= budget:
        return torch.zeros(shape, dtype=dtype)
    directory = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
    if not directory.is_dir():
        raise MemoryError(
            f"{what} of shape {tuple(shape)} needs {_gib(nbytes)}, over the memory budget of "
            f"{_gib(budget)}, and the spill directory {directory} does not exist"
        )
    free = shutil.disk_usage(directory).free
    if nbytes > free:
        raise MemoryError(
            f"{what} of shape {tuple(shape)} needs {_gib(nbytes)}: over the memory budget of "
            f"{_gib(budget)} and over the {_gib(free)} free on disk in {directory}; "
            "use fewer gradients, smaller blocks, or a larger budget"
        )
    fd, name = tempfile.mkstemp(prefix="mfac-", suffix=".mmap", dir=directory)
    try:
        os.ftruncate(fd, nbytes)
        tensor = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(fd)
        os.unlink(name)
    return tensor


def is_memory_mapped(tensor: torch.Tensor, mappings: FileMappings | None = None) -> bool:
    """True when the tensor's storage is a file mapping rather than ordinary RAM: a storage
    made from a file (``UntypedStorage.from_file``), or, on Linux, bytes that lie in a file's
    mapping (``torch.load(..., mmap=True)``, whose storages carry no file name). Pass one
    ``mappings`` to ask about many tensors (the map list is read once)."""
    if tensor.untyped_storage().filename is not None:
        return True
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    mappings = mappings or FileMappings()
    return mappings.ranges is not None and mappings.holds(tensor)


class FileMappings:
    """The address ranges this process maps from files, read once (``/proc/self/maps``, Linux;
    elsewhere unknown, and every tensor counts as file-backed)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] | None = []
        try:
            with open("/proc/self/maps") as fh:
                for line in fh:
                    fields = line.split()
                    if len(fields) >= 5 and fields[4] != "0":  # an inode: a file's pages
                        lo, hi = fields[0].split("-")
                        self.ranges.append((int(lo, 16), int(hi, 16)))
        except OSError:
            self.ranges = None
        self._starts = [lo for lo, _ in self.ranges or []]

    def holds(self, t: torch.Tensor) -> bool:
        """Whether any of ``t``'s bytes lie in a file mapping (a CPU tensor; unknown: True)."""
        if self.ranges is None:
            return True
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        i = bisect.bisect_right(self._starts, hi - 1) - 1
        return i >= 0 and self.ranges[i][1] > lo


def adoptable(
    t: torch.Tensor, device: torch.device, mappings: FileMappings | None = None
) -> bool:
    """Whether a loaded tensor (dtype and shape already checked) can become a live buffer
    as it is, instead of being copied: on ``device``, contiguous, and, on the CPU, in memory
    this process owns rather than a file's pages (``torch.load(..., mmap=True)``): a buffer
    that stays a private mapping of the checkpoint would read the file for as long as it
    lives, and a later save to the same path truncates the file under it (SIGBUS)."""
    if t.device != device or not t.is_contiguous():
        return False
    if t.device.type != "cpu" or t.numel() == 0:
        return True
    return not (mappings or FileMappings()).holds(t)


class GradientBuffer:
    """An m x d buffer that gradients are written into row by row, then handed to an operator.

    It lives in RAM when it fits ``memory_budget`` (default: half the available RAM) and in a
    memory-mapped file otherwise, so collecting gradients never needs a second m x d copy.
    """

    def __init__(
        self,
        num_grads: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        *,
        memory_budget: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        check_positive_int(num_grads, "num_grads")
        check_positive_int(dim, "dim")
        check_float_dtype(dtype, "dtype")
        self.tensor = allocate(
            (num_grads, dim),
            dtype,
            memory_budget=memory_budget,
            spill_dir=spill_dir,
            what="gradient buffer",
        )
        self.count = 0

    @property
    def memory_mapped(self) -> bool:
        """True when the rows live in a memory-mapped file instead of RAM."""
        return is_memory_mapped(self.tensor)

    @property
    def full(self) -> bool:
        """True once every row has been written."""
        return self.count == self.tensor.shape[0]

    def append(self, grad: torch.Tensor) -> None:
        """Write the next gradient row; raises on shape mismatch, NaN/Inf, or a full buffer."""
        if self.full:
            raise ValueError(f"gradient buffer is full ({self.tensor.shape[0]} rows)")
        flat = grad.reshape(-1)
        if flat.numel() != self.tensor.shape[1]:
            raise ValueError(
                f"gradient has {flat.numel()} entries, the buffer rows have {self.tensor.shape[1]}"
            )
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteGradientError(f"gradient {self.count} contains NaN or Inf")
        self.tensor[self.count].copy_(flat)
        self.count += 1
