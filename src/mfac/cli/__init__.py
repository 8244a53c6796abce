"""The ``mfac`` command line: ``mfac demo``, ``mfac prune``, ``mfac train`` and ``mfac recover``
(see docs/cli.md). Entry point: :func:`main`."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mfac`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    from .app import run

    return run(argv)


__all__ = ["main"]
