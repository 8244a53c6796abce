"""Where torch-mfac keeps what it builds once (the demo's CNN, converted checkpoints), and how
it writes a file so that no reader sees it half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``explicit``, else $MFAC_CACHE, else $XDG_CACHE_HOME/mfac, else
    ~/.cache/mfac. One place for the CLI and the benchmarks alike."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("MFAC_CACHE"):
        return Path(os.environ["MFAC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mfac"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only on success.

    On any error the temporary file is removed and ``path`` is left as it was, so a reader
    never sees a half-written file (``os.replace`` is atomic on one file system).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
