"""Where torch-mfac keeps what it builds once (the demo's CNN, converted checkpoints)."""

from __future__ import annotations

import os
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
