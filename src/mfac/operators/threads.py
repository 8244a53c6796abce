"""Thread control for the small work around the big passes.

The two passes over the m x d buffer are bandwidth-bound and use every thread. Everything else
in a step (O(d) vector work on one gradient, O(m^2)..O(m^3) float64 algebra, batches of small
factorisations) is too small to split: each parallel op pays a thread barrier, and when another
process holds a core that barrier waits for the scheduler, which can stall such ops by more than
an order of magnitude on a busy machine with few cores. On a quiet machine one thread costs little
(docs/operators.md gives the measurement, from ``python -m benchmarks.design_checks``), so the
choice trades a small loss when idle for robustness under load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded(enabled: bool = True, device: torch.device | None = None) -> Iterator[None]:
    """Run the enclosed torch CPU ops on one thread (restoring the previous count after).

    A no-op when ``device`` is given and is not the CPU: an accelerator's kernels do not use the
    CPU thread pool, and changing its size would only cost a call."""
    if not enabled or (device is not None and device.type != "cpu"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
