"""Thread control for the small work around the big passes.

The two passes over the m x d buffer are bandwidth-bound and use every thread. Everything else
in a step (O(d) vector work on one gradient, O(m^2)..O(m^3) float64 algebra, batches of small
factorisations) is too small to split: each parallel op pays a thread barrier, and when another
process holds a core that barrier waits for the scheduler. Measured on this 2-core machine under
load: a float32 dot product over 1e6 entries took 16 ms on 2 threads and 0.49 ms on one; a batch
of 64 Cholesky solves of 128 x 128 took 1.9 s on 2 threads and 0.06 s on one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed torch CPU ops on one thread (restoring the previous count after)."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
