"""One home for the tests' multi-process gloo groups."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


@contextmanager
def gloo_group(rank: int, world: int, tmp: str | Path) -> Iterator[None]:
    """A gloo group for this rank, rendezvous through a file in ``tmp`` (no TCP port that a
    concurrent test could take first). On a normal exit every rank meets at a barrier before
    tearing down: a rank that closes its connections while a peer still reads from them can
    make the peer abort."""
    store = f"file://{Path(tmp) / 'store'}"
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
