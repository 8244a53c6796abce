"""Shared pieces of the command line: errors with exit codes, atomic outputs, progress bars
that honour ``--quiet``, device checks and optional-dependency imports.

Nothing here imports torch at module level, so that argument and recipe errors are reported
in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .._paths import atomic_file

log = logging.getLogger("mfac.cli")

#: Exit codes (documented in docs/cli.md).
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected internal error (a bug: please report it)
EXIT_INPUT = 2  # bad command line, bad recipe, missing or unreadable input, data/model mismatch
EXIT_ENV = 3  # the environment lacks something: an optional package, a device
EXIT_INTERRUPTED = 130  # Ctrl-C


class CLIError(Exception):
    """A user-facing error: one line on stderr and ``code`` as the exit status."""

    code = EXIT_INPUT

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class EnvironmentProblem(CLIError):
    """Something missing from the machine rather than from the user's input."""

    code = EXIT_ENV


SETTINGS = types.SimpleNamespace(quiet=False, verbose=False)  # set by the command's flags


def one_line(err: BaseException | str, limit: int = 400) -> str:
    """An exception message squeezed onto one line (library errors can span several)."""
    text = str(err) if not isinstance(err, str) else err
    text = " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    if not text and isinstance(err, BaseException):
        text = type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(module: str, purpose: str, package: str | None = None) -> Any:
    """Import an optional dependency or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = package or module
        raise EnvironmentProblem(
            f"{purpose} needs the package '{pkg}': pip install 'torch-mfac[cli]' (or {pkg})"
        ) from None


# ----------------------------------------------------------------------------- progress
def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (``total=``, ``desc=``, ``unit=``): drawn on a terminal only, never
    under ``--quiet``; without tqdm, a silent stand-in with the same methods."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety, never a requirement
        from ..experiments.report import NoBar

        return NoBar(iterable)
    off = True if SETTINGS.quiet else None  # None: tqdm's own rule (off when not a TTY)
    return tqdm(iterable, leave=False, disable=off, file=sys.stderr, dynamic_ncols=True, **kwargs)


def show_progress() -> bool:
    """Whether library calls taking a ``progress=`` flag should draw bars."""
    return not SETTINGS.quiet and sys.stderr.isatty()


# ----------------------------------------------------------------------------- atomic outputs
MARKER = ".mfac-output"


def check_writable(folder: Path) -> None:
    """Fail now (exit 2), not after the work, when ``folder`` cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mfac-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CLIError(f"cannot write into {folder}: {err.strerror or one_line(err)}") from None


def check_replaceable(path: str | os.PathLike[str], probe: bool = False) -> Path:
    """Refuse an output folder that exists, is not empty and was not written by mfac: it
    would be replaced as a whole, and a user's folder must never be deleted by a typo.
    ``probe``: also check that its parent folder can be written."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise CLIError(f"output {target} exists and is not a folder")
    if target == Path.cwd().resolve() or target == target.parent:
        raise CLIError(f"output {target}: give a folder of its own, not the current folder")
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).exists():
        raise CLIError(
            f"output folder {target} exists and was not written by mfac; "
            "choose another -o/--output or remove it"
        )
    if probe:
        check_writable(target.parent)
    return target


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it takes the place of ``path``.

    An existing ``path`` (empty, or an earlier mfac output: see :func:`check_replaceable`) is
    moved aside first and deleted only after the new folder is in place; on error the
    temporary folder is deleted and ``path`` is untouched.
    """
    target = check_replaceable(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("written by the mfac command line; safe to replace\n")
        old = None
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write JSON atomically (NaN/Inf become null so that the file stays standard JSON)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_clean(payload), indent=2, default=str) + "\n")
    return Path(path)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        with contextlib.suppress(Exception):
            return _clean(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- files, devices
def existing_path(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, or a clear error when it does not exist."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    return p


def resolve_device(name: str | None) -> Any:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"`` as a torch.device that
    exists on this machine (otherwise a clear error, exit code 3)."""
    import torch

    name = (name or "cpu").strip()
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: not a device name: {name!r} (cpu, cuda:N, mps)") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (count == 0 or (dev.index or 0) >= count):
        raise EnvironmentProblem(f"device {name!r} is not available: {count} CUDA device(s) found")
    if dev.type == "mps" and not has_mps:
        raise EnvironmentProblem(f"device {name!r} is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise EnvironmentProblem(f"device {name!r} is not supported by the mfac command line")
    return dev


def set_threads(count: int | None) -> None:
    """``torch.set_num_threads(count)`` when a count is given (``--threads``)."""
    if count is not None:
        import torch

        torch.set_num_threads(int(count))
        log.info("threads: %d", count)


def peak_memory(device: Any = None) -> dict[str, int | None]:
    """Peak resident memory of this process (bytes) and, on CUDA, peak allocated GPU memory."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    cuda = None
    if getattr(device, "type", None) == "cuda":
        import torch

        cuda = int(torch.cuda.max_memory_allocated(device))
    return {"peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024),
            "peak_cuda_bytes": cuda}  # fmt: skip


def fmt_bytes(n: int | None) -> str:
    """Human-readable size."""
    if n is None:
        return "n/a"
    unit = next((u for u in range(3) if n < 1024 ** (u + 1)), 3)
    return f"{n / 1024**unit:.1f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def emit(text: str = "") -> None:
    """Results go to stdout (tables, paths); logs and progress bars go to stderr."""
    print(text, flush=True)
