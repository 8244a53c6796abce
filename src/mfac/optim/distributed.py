"""The sliding window sharded by coordinates over a torch.distributed process group.

Rank p of P holds the columns [lo_p, hi_p) of the m x d window (about m*d/P entries). For an
incoming gradient g (identical on every rank, as after DDP's all-reduce):

- u = G g is the sum over ranks of the partial products G[:, lo:hi] g[lo:hi]: one all-reduce
  of m numbers (plus one flag that says whether any rank saw NaN/Inf, so every rank raises
  together and nobody deadlocks);
- K and its Cholesky factor are replicated (m x m, float64), updated identically everywhere;
- the step F^-1 g = m G^T K^-1 e_r is local per column slice; the slices are all-gathered so
  that every rank can update its full parameter copy (d numbers, the same volume as DDP's
  gradient all-reduce).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._validation import NonFiniteGradientError, check_float_dtype, check_positive_int
from ..operators.gram import FactorBacked, GramFactor
from ..operators.kernels import cols_dot, rows_dot
from ..operators.memory import check_fits
from .topk import finite_fast

F64 = torch.float64


def shard_bounds(dim: int, world: int, rank: int) -> tuple[int, int]:
    """Columns [lo, hi) of rank ``rank``: equal chunks of ceil(dim / world), the last shorter."""
    chunk = -(-dim // world)
    lo = min(dim, rank * chunk)
    return lo, min(dim, lo + chunk)


class ShardedSlidingInverseFisher(FactorBacked):
    """Sliding-window F^-1 whose m x d window is split by columns over ``process_group``.

    Same interface as :class:`mfac.SlidingInverseFisher` for what the optimizer uses:
    ``push_ihvp(g)`` takes the full gradient (d,) and returns the full step (d,);
    ``state_dict()`` holds this rank's shard plus the replicated K.
    """

    def __init__(
        self,
        dim: int,
        window: int,
        damp: float = 1e-5,
        dtype: torch.dtype = torch.float32,
        process_group: dist.ProcessGroup | None = None,
        *,
        device: torch.device | str | None = None,
        memory_budget: int | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun does the rendezvous)"
            )
        check_positive_int(dim, "dim")
        check_positive_int(window, "window")
        check_float_dtype(dtype, "dtype")
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.dim, self.window = dim, window
        self.lo, self.hi = shard_bounds(dim, self.world, self.rank)
        self.chunk = -(-dim // self.world)
        elem = torch.empty((), dtype=dtype).element_size()
        device = torch.device(device) if device is not None else torch.device("cpu")
        check_fits(
            window * self.chunk * elem,
            f"a window shard of {window} x {self.chunk}",
            memory_budget,
            device,
        )
        self.factor = GramFactor(window, damp, device)
        self.grads = torch.zeros(window, self.hi - self.lo, dtype=dtype, device=device)
        self._gathered = torch.zeros(self.chunk * self.world, dtype=torch.float32, device=device)

    @property
    def window_nbytes(self) -> int:
        """Bytes of this rank's window shard."""
        return self.grads.numel() * self.grads.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held on this rank: the shard plus the replicated K and factor."""
        return self.window_nbytes + 2 * self.window**2 * 8

    def push_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Push the full gradient ``g`` (d,) and return the full F^-1 g_stored (d,)."""
        flat = g.reshape(-1)
        if flat.numel() != self.dim:
            raise ValueError(f"gradient has {flat.numel()} entries, the window holds {self.dim}")
        part = flat[self.lo : self.hi]
        slot = self.factor.next_slot
        stored = part.to(self.grads.dtype)
        # u_j = G_j . g for the old rows; entry `slot` becomes |g_stored|^2 below.
        device = self.grads.device
        u = torch.empty(self.window + 2, dtype=F64, device=device)
        if part.numel():
            u[: self.window] = rows_dot(self.grads, stored.unsqueeze(1))[:, 0].to(F64)
            u[self.window] = float(stored.float().pow(2).sum()) if stored.numel() else 0.0
        else:
            u[: self.window + 1] = 0.0
        # the whole gradient, not only this slice: gradients that differ across ranks (no DDP)
        # still make every rank raise together
        u[self.window + 1] = 0.0 if finite_fast(flat) else 1.0
        u[: self.window + 1].nan_to_num_(0.0, 0.0, 0.0)
        dist.all_reduce(u, group=self.group)
        if u[self.window + 1] > 0:
            raise NonFiniteGradientError("gradient contains NaN or Inf; the window is unchanged")
        u_row = u[: self.window].clone()
        u_row[slot] = u[self.window]
        old = self.grads[slot].clone()
        self.grads[slot] = stored
        try:
            self.factor.commit(u_row)
        except RuntimeError:
            self.grads[slot] = old
            raise
        coeff = self.factor.slot_coeff(slot)
        local = cols_dot(self.grads, coeff)[:, 0].to(torch.float32)
        out = self._gathered
        chunks = list(out.split(self.chunk))
        mine = torch.zeros(self.chunk, dtype=torch.float32, device=device)
        mine[: local.numel()] = local
        dist.all_gather(chunks, mine, group=self.group)
        return out[: self.dim].to(g.dtype).view_as(g)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard, its bounds, and the replicated K (each rank saves its own)."""
        return {
            "grads": self.grads.clone(),
            "lo": self.lo,
            "hi": self.hi,
            "world": self.world,
            **self.factor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's state; the shard layout must match (same world size and d)."""
        if (state["lo"], state["hi"], state["world"]) != (self.lo, self.hi, self.world):
            raise ValueError(
                f"state was saved for columns [{state['lo']}, {state['hi']}) of a world of "
                f"{state['world']}; this rank holds [{self.lo}, {self.hi}) of {self.world}"
            )
        if state["grads"].dtype != self.grads.dtype:
            raise TypeError(f"state stores {state['grads'].dtype}, this shard {self.grads.dtype}")
        self.factor.load_state_dict(state)
        self.grads.copy_(state["grads"])

    def __repr__(self) -> str:
        return (
            f"ShardedSlidingInverseFisher(dim={self.dim}, window={self.window}, "
            f"rank={self.rank}/{self.world}, columns=[{self.lo}, {self.hi}))"
        )


__all__ = ["ShardedSlidingInverseFisher", "shard_bounds"]
