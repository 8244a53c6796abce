"""``MFAC(params, lr)``'s default rule (``mode="adam"``): sliding-window preconditioners that
do not depend on the gradients' scale (the study that chose the default is in
docs/optim_transformers.md).

Plain M-FAC steps along F^-1 g with F = damp*I + G^T G / m. Its step is a combination of the
window's gradients, so it inherits their split across tensors: on a freshly initialised
transformer nearly all of it lands on the classifier head. The optimizer here keeps Adam's
diagonal statistics and applies a matrix function of the window's (whitened) Fisher on top:

    m_t = b1 m + (1-b1) g,   v_t = b2 v + (1-b2) g^2,   D = sqrt(v_t / (1-b2^t)) + eps
    z_t = g / D           ("adam" whitening; z_t = g with whiten="none")
    u_t = (m_t / (1-b1^t)) / D                               (AdamW's direction)
    Z   = the last m whitened gradients z (m x d_b per block b; empty slots are zero rows)
    S   = Z^T Z / m,   mu = tr(S) / n   (n = filled slots: the mean non-zero eigenvalue)
    lam = damp * mu                     (scale-relative damping, per block)
    s   = lam^-q (I + S / lam)^-p u     (p = power: 1 is the M-FAC inverse, 1/2 is GGT's
                                         inverse square root; q = 0 with "adam" whitening,
                                         q = 1/2 without, so s never depends on the scale of g)
    s_T *= |a_T| / |s_T|                (graft, the default: AdamW's step length per tensor T,
                                         a = m_hat / D; a = u with "adam" whitening)
    p  *= 1 - lr * wd;   p -= lr * s

With whitening, s -> u (exactly AdamW) as damp -> infinity, and the window only shrinks the
step along the directions its recent gradients share. Blocks are each parameter tensor
(``blocks="tensor"``, the default: the design chosen in docs/optim_transformers.md) or the whole
model (``blocks="global"``); the graft is per parameter tensor either way (each tensor's piece of
s gets the length of that tensor's AdamW step). Every block's product costs two passes over its
window and an m x m float64 eigendecomposition (one batched call for all blocks): O(m d + m^3).

``history="topk"`` (with ``blocks="global"``) stores the window as error-feedback top-k rows
(EFCP, :class:`mfac.operators.topk.TopKSlidingInverseFisher`'s storage, selection and sparse
kernels): each step a = e + z keeps its k largest magnitudes c as the new row and e = a - c,
and Z above is the matrix of the rows c. The formulas are the same with that Z; K = Z Z^T / m
gets the new row's products from a sparse gather, Z u is a gather and Z^T c a scatter-add, so
the window takes m k (value + index) bytes instead of m d floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._config import Options, option
from .._validation import NonFiniteGradientError, check_positive_int
from ..operators.gram import GramFactor
from ..operators.kernels import cols_dot, rows_dot
from ..operators.memory import check_fits
from ..operators.topk import TopKSlidingInverseFisher, finite_fast, resolve_k
from .base import MFAC
from .mfac import check_option

F64 = torch.float64
WHITENINGS = ("adam", "none")
BLOCKINGS = ("global", "tensor")
HISTORIES = ("dense", "topk")
POWERS = (1.0, 0.5)
HISTORY_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class ScaledConfig(Options):
    """The options of :class:`ScaledMFAC` (see the module docstring for the formulas)."""

    ngrads: int = option(32, "window size m per block", low=1)
    damp: float = option(
        1.0, "damping relative to the window's mean eigenvalue", low=0, low_open=True
    )
    power: float = option(1.0, "1: the M-FAC inverse; 0.5: GGT's inverse square root")
    whiten: str = option(
        "adam", "gradients whitened by Adam's statistics, or raw", choices=WHITENINGS
    )
    blocks: str = option("tensor", "one window per tensor, or one for the model", choices=BLOCKINGS)
    betas: Any = option((0.9, 0.999), "Adam's decay rates (b1, b2), each in [0, 1)", kind="any")
    eps: float = option(1e-8, "Adam's epsilon", low=0, low_open=True)
    graft: bool = option(
        True, "rescale each tensor's step to the norm of AdamW's step (AdamW's lr scale)"
    )
    history_dtype: Any = option(
        torch.float32, "storage dtype of the windows: float32, or bfloat16 (half the bytes)",
        kind="any",
    )
    history: str = option(
        "dense", "dense windows, or one error-feedback top-k window (needs blocks='global')",
        choices=HISTORIES,
    )
    topk: Any = option(
        None, "history='topk': entries kept per row, an int k or a density in (0, 1]", kind="any"
    )

    def validate(self) -> None:
        """The checks that involve several fields, or a type the field kinds do not cover."""
        if self.power not in POWERS:
            raise ValueError(f"power must be one of {POWERS}, got {self.power!r}")
        if self.whiten == "none" and self.power != 0.5:
            raise ValueError(
                "whiten='none' needs power=0.5: only the inverse square root of the raw "
                "gradients' second moment gives a step independent of the gradient's scale"
            )
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(
            isinstance(b, (int, float)) and 0.0 <= float(b) < 1.0 for b in betas
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.history_dtype not in HISTORY_DTYPES:
            raise ValueError(
                f"history_dtype must be one of {HISTORY_DTYPES}, got {self.history_dtype!r}"
            )
        if self.history == "topk":
            if self.blocks != "global":
                raise ValueError(
                    f"history='topk' needs blocks='global' (one top-k window over the whole "
                    f"model; per-tensor windows are dense), got blocks={self.blocks!r}"
                )
            resolve_k(self.topk, 1)  # the type and range of topk, before any dimension is known
        elif self.topk is not None:
            raise ValueError(f"topk is only used with history='topk', got topk={self.topk!r}")


def window_coeffs(
    grams: torch.Tensor, filled: list[int], damp: float, power: float
) -> tuple[torch.Tensor, list[float]]:
    """For a batch of K = Z Z^T / m (B x m x m, float64) return (W, lam) with
    lam = damp * tr(K) / filled and W = V diag(h(L)) V^T / m, where K = V L V^T and
    h(L) = ((1 + L/lam)^-power - 1) / L, so that (I + Z^T Z / (m lam))^-power x = x + Z^T W Z x.
    h is evaluated in a closed form that stays exact as L -> 0 (rank-deficient windows need no
    special case); a block with lam = 0 (an all-zero window) gets W = 0. One batched eigh."""
    m = grams.shape[-1]
    counts = torch.tensor([max(f, 1) for f in filled], dtype=F64, device=grams.device)
    lam = damp * torch.diagonal(grams, dim1=-2, dim2=-1).sum(-1) / counts
    safe = torch.where(lam > 0.0, lam, torch.ones_like(lam))[:, None]
    evals, evecs = torch.linalg.eigh(grams)
    evals = evals.clamp_min(0.0)
    if power == 1.0:
        h = -1.0 / (safe + evals)
    else:  # ((1+t)^-1/2 - 1) / (lam t) = -1 / (lam sqrt(1+t) (1 + sqrt(1+t)))
        r = torch.sqrt(1.0 + evals / safe)
        h = -1.0 / (safe * r * (1.0 + r))
    h = torch.where(lam[:, None] > 0.0, h, torch.zeros_like(h))
    return (evecs * h[:, None, :]) @ evecs.transpose(-1, -2) / m, lam.tolist()


def window_coeff(
    gram: torch.Tensor, filled: int, damp: float, power: float
) -> tuple[torch.Tensor, float]:
    """:func:`window_coeffs` for one block (an m x m K)."""
    w, lam = window_coeffs(gram[None], [filled], damp, power)
    return w[0], lam[0]


def check_ring_state(
    state: Any,
    m: int,
    device: torch.device,
    window_gram: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prefix: str = "",
) -> None:
    """Raise, naming the field, unless ``state`` holds an m x m G G^T ring (shape, dtype,
    finite, symmetric, equal to ``window_gram`` of the stored rows on a probe) and a
    consistent pointer. Writes nothing."""
    for key in ("gram", "next_slot", "num_pushed"):
        if key not in state:
            raise KeyError(f"state is missing the field {prefix}{key!r}")
    gram = state["gram"]
    if not isinstance(gram, torch.Tensor) or gram.dtype != F64 or gram.shape != (m, m):
        raise ValueError(f"{prefix}gram must be a float64 ({m}, {m}) tensor")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"{prefix}gram contains NaN or Inf")
    nxt, pushed = state["next_slot"], state["num_pushed"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (nxt, pushed)):
        raise TypeError(f"{prefix}next_slot and {prefix}num_pushed must be ints")
    if pushed < 0 or nxt != pushed % m:
        raise ValueError(
            f"{prefix}next_slot = {nxt} disagrees with {prefix}num_pushed = {pushed}"
        )
    gram = gram.to(device)
    if not torch.equal(gram, gram.T):
        raise ValueError(f"{prefix}gram is not symmetric")
    if window_gram is not None:
        probe = torch.randn(m, dtype=F64, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device)
        err = float((gram @ probe - window_gram(probe).to(F64)).norm())
        size = float(gram.norm()) * float(probe.norm())
        if not err <= 1e-4 * size:
            raise ValueError(
                f"{prefix}gram differs from G G^T of the stored rows (relative error "
                f"{err / max(size, 1e-300):.1e}); the window was edited after K was formed, "
                "or the state dict was kept across a later step (it holds the window by "
                "reference: save or copy it before stepping on)"
            )


class _Block:
    """One preconditioned block: a ring of the last m whitened gradients and K = Z Z^T / m."""

    def __init__(
        self, dim: int, window: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> None:
        self.rows = torch.zeros(window, dim, dtype=dtype, device=device)
        self.gram = torch.zeros(window, window, dtype=F64, device=device)
        self.next_slot = 0
        self.num_pushed = 0

    @property
    def filled(self) -> int:
        """Slots holding a gradient."""
        return min(self.num_pushed, self.rows.shape[0])

    def push(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Push whitened gradient z (one pass over the window, fused with Z u); return Z u
        under the updated window (float64)."""
        m = self.rows.shape[0]
        slot = self.next_slot
        if self.rows.dtype != torch.float32:  # the window holds z rounded: K is built from that
            z = z.to(self.rows.dtype).float()
            prod = rows_dot(self.rows, torch.stack([z, u], 1)).to(F64)  # one pass, float32 sums
        else:
            prod = (self.rows @ torch.stack([z, u], 1)).to(F64)  # old row still in slot
        col = prod[:, 0] / m
        col[slot] = float(torch.dot(z, z)) / m
        self.gram[slot, :] = col
        self.gram[:, slot] = col
        self.rows[slot] = z
        self.next_slot = (slot + 1) % m
        self.num_pushed += 1
        proj = prod[:, 1].clone()
        proj[slot] = float(torch.dot(z, u))
        return proj

    def finish(
        self, u: torch.Tensor, c: torch.Tensor, lam: float, whiten: str, out: torch.Tensor
    ) -> torch.Tensor:
        """lam^-q (u + Z^T c), the second pass; c = W Z u from :func:`window_coeffs`. (``out``,
        the vector z came in, is left alone: a per-tensor z may be the gradient itself.)"""
        if lam == 0.0:  # an all-zero window: no curvature information
            return u.clone() if whiten == "adam" else torch.zeros_like(u)
        if self.rows.dtype != torch.float32:
            out = u + cols_dot(self.rows, c.to(torch.float32)[:, None])[:, 0]
        else:
            out = u + self.rows.T @ c.to(torch.float32)
        if whiten == "none":
            out.mul_(lam**-0.5)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The window by reference (as torch.optim hands out its moments: a checkpoint must
        not double the largest buffer), K as a copy, and the ring pointer."""
        return {
            "rows": self.rows,
            "gram": self.gram.clone(),
            "next_slot": self.next_slot,
            "num_pushed": self.num_pushed,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise unless ``state`` is a dense window of this block's shape and dtype."""
        if "rows" not in state:
            raise ValueError(
                "state holds a top-k window (history='topk'); this optimizer has dense windows "
                "(history='dense'); nothing was loaded"
            )
        if tuple(state["rows"].shape) != tuple(self.rows.shape):
            raise ValueError(
                f"state holds a window of shape {tuple(state['rows'].shape)}, "
                f"this optimizer has {tuple(self.rows.shape)}; nothing was loaded"
            )
        if state["rows"].dtype != self.rows.dtype:
            raise ValueError(
                f"state holds a {state['rows'].dtype} window, this optimizer stores "
                f"{self.rows.dtype} (history_dtype); nothing was loaded"
            )
        rows = state["rows"].to(self.rows.device)
        if not finite_fast(rows):
            raise ValueError("the window's rows contain NaN or Inf; nothing was loaded")
        m = self.rows.shape[0]

        def window_gram(probe: torch.Tensor) -> torch.Tensor:  # Z Z^T probe / m, two passes
            back = cols_dot(rows, probe.to(torch.float32)[:, None])
            return rows_dot(rows, back).to(F64)[:, 0] / m

        check_ring_state(state, m, self.gram.device, window_gram)

    @property
    def nbytes(self) -> int:
        """Bytes of the window and its m x m matrix."""
        return self.rows.numel() * self.rows.element_size() + self.gram.numel() * 8

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.rows.copy_(state["rows"])
        self.gram.copy_(state["gram"])
        self.next_slot = int(state["next_slot"])
        self.num_pushed = int(state["num_pushed"])


class _RingGram(GramFactor):
    """G G^T (float64, unscaled) of a top-k window's rows and its ring pointer: what
    :class:`TopKSlidingInverseFisher`'s push updates when this rule owns the window. The rule
    decomposes K = G G^T / m by ``eigh`` every step, so no damped inverse is kept (and no
    damping: K is only positive semi-definite)."""

    def __init__(self, window: int, device: torch.device) -> None:  # no GramFactor state
        self.window = window
        self.damp = 0.0
        self.gram = torch.zeros(window, window, dtype=F64, device=device)
        self.inverse = torch.empty(0, dtype=F64, device=device)
        self.next_slot = 0
        self.num_pushed = 0
        self.since_refactor = 0
        self.refactors = 0

    def commit(self, u: torch.Tensor) -> int:
        """Write u = G c_new (u[slot] = c_new . c_new) into row and column ``slot`` of G G^T
        and advance the ring; return the slot. On a non-finite u nothing changes."""
        u = u.to(F64).reshape(-1)
        if not bool(torch.isfinite(u).all()):
            raise NonFiniteGradientError(
                "the products of the window with the new row overflow float64; the window is "
                "unchanged"
            )
        slot = self.next_slot
        self.gram[slot, :] = u
        self.gram[:, slot] = u
        self.next_slot = (slot + 1) % self.window
        self.num_pushed += 1
        return slot

    def rebuild(self, gram: torch.Tensor) -> None:
        """Replace G G^T by that of a filled window (``GramFactor.rebuild``'s counterpart; no
        damping term here, ``damp`` is 0): every slot then counts as holding a row."""
        self.gram = gram.to(device=self.gram.device, dtype=F64).clone()
        self.num_pushed = max(self.num_pushed, self.window)
        self.next_slot = self.num_pushed % self.window

    def state_dict(self) -> dict[str, Any]:
        return {
            "gram": self.gram.clone(),
            "next_slot": self.next_slot,
            "num_pushed": self.num_pushed,
        }

    def check_state(
        self,
        state: Any,
        window_gram: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prefix: str = "",
    ) -> None:
        """:func:`check_ring_state` for this ring (the operator's checks call it by name)."""
        check_ring_state(state, self.window, self.gram.device, window_gram, prefix)

    def load_state_dict(self, state: Any, check: bool = True) -> None:
        if check:
            self.check_state(state)
        self.gram.copy_(state["gram"])
        self.next_slot = int(state["next_slot"])
        self.num_pushed = int(state["num_pushed"])


class _TopKBlock:
    """The whole model's window as error-feedback top-k rows: the storage, selection and
    sparse kernels of :class:`TopKSlidingInverseFisher`, with its K^-1 factor replaced by the
    plain G G^T this rule decomposes (:class:`_RingGram`)."""

    def __init__(
        self,
        dim: int,
        window: int,
        k: int,
        device: torch.device,
        dtype: torch.dtype,
        memory_budget: int | None,
    ) -> None:
        self.op = TopKSlidingInverseFisher(
            dim, window, k, dtype=dtype, device=device, memory_budget=memory_budget
        )
        self.op.factor = _RingGram(window, device)

    @property
    def gram(self) -> torch.Tensor:
        """K = Z Z^T / m (float64), Z the stored rows."""
        return self.op.factor.gram / self.op.window

    @property
    def filled(self) -> int:
        """Slots holding a row."""
        return min(self.op.num_pushed, self.op.window)

    def push(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Compress e + z into the next slot, keep the new error; return Z u under the updated
        window (float64). The new row's products and Z u come from one sweep of the rows."""
        return self.op.push_gather(z, u)

    def finish(
        self, u: torch.Tensor, c: torch.Tensor, lam: float, whiten: str, out: torch.Tensor
    ) -> torch.Tensor:
        """lam^-q (u + Z^T c) by one scatter-add over the rows (u added tile by tile), written
        into ``out`` (the d-vector z came in: the window has its own copy)."""
        if lam == 0.0:
            return out.copy_(u) if whiten == "adam" else out.zero_()
        out = self.op.scatter(c, out=out, plus=u)
        if whiten == "none":
            out.mul_(lam**-0.5)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the rows (values + indices), the error vector and its spare, and G G^T."""
        return self.op.window_nbytes + 2 * 4 * self.op.dim + self.op.factor.gram.numel() * 8

    def state_dict(self) -> dict[str, Any]:
        """Rows (values, indices), the error vector, G G^T and the pointer, cloned."""
        return self.op.state_dict()

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise, naming the field, unless ``state`` fits this window (the operator's checks:
        shapes, dtypes, finite values, indices in range, G G^T against the rows)."""
        if "rows" in state:
            raise ValueError(
                "state holds a dense window (history='dense'); this optimizer has a top-k "
                "window (history='topk'); nothing was loaded"
            )
        self.op.check_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.op.load_state_dict(state)


class ScaledMFAC(MFAC):
    """``MFAC``'s default rule (``mode="adam"``): AdamW whose direction is preconditioned by a
    matrix function of the sliding window's whitened empirical Fisher, with damping relative to
    the window's mean eigenvalue, grafted to AdamW's step length.

    Args:
        params: parameters or groups (``lr`` and ``weight_decay`` per group, read every step).
        lr: learning rate (AdamW's scale: 1e-3 from scratch).
        weight_decay: decoupled, as in AdamW.
        ngrads, damp, power, whiten, blocks, betas, eps, graft: see :class:`ScaledConfig`.
        history_dtype: storage dtype of the windows (float32 or bfloat16).
        history: ``"dense"`` (m x d_b floats per block) or ``"topk"`` (one window over the
            whole model, ``blocks="global"``, of error-feedback top-k rows: m k values and
            indices; see the module docstring).
        topk: for ``history="topk"``: entries kept per row, an int k or a density in (0, 1].
        memory_budget: bytes the windows, Adam's moments and the step's buffers may take
            (default: half the available RAM; the free memory on CUDA); checked before
            anything is allocated.
        mode: ``"adam"`` only (``mfac.MFAC`` passes its ``mode`` through).

    A parameter whose ``.grad`` is None in a step is not updated; its Adam moments and window
    see a zero gradient. NaN/Inf in a gradient raises :class:`mfac.NonFiniteGradientError`
    before anything changes. ``state_dict`` holds the windows, by reference (as torch.optim
    holds its moments; save or deepcopy it before the next step): resuming is bit-identical.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        ngrads: int = 32,
        damp: float = 1.0,
        power: float = 1.0,
        whiten: str = "adam",
        blocks: str = "tensor",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        graft: bool = True,
        *,
        history_dtype: torch.dtype = torch.float32,
        history: str = "dense",
        topk: int | float | None = None,
        memory_budget: int | None = None,
        mode: str = "adam",
    ) -> None:
        if mode != "adam":
            raise ValueError(f"ScaledMFAC is mode='adam', got mode={mode!r}; use mfac.MFAC")
        if memory_budget is not None:
            check_positive_int(memory_budget, "memory_budget")
        self.cfg = ScaledConfig(
            ngrads, damp, float(power), whiten, blocks, tuple(betas), eps, graft, history_dtype,
            history, topk,
        )  # fmt: skip
        defaults = {
            "lr": check_option(lr, "lr"),
            "weight_decay": check_option(weight_decay, "weight_decay"),
        }
        super().__init__(params, defaults)
        self._params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not self._params:
            raise ValueError("ScaledMFAC got no parameter that requires grad")
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters must live on one device, got {sorted(map(str, devices))}"
            )
        device = devices.pop()
        sizes = [p.numel() for p in self._params]
        cfg = self.cfg
        k = resolve_k(cfg.topk, sum(sizes)) if cfg.history == "topk" else None
        layout = (
            f"one top-k window of {cfg.ngrads} rows x {k} entries"
            if k is not None
            else f"windows of {cfg.ngrads} gradients ({cfg.blocks} blocks)"
        )
        check_fits(
            self.required_bytes(sizes, cfg.ngrads, cfg.blocks, history_dtype, k, device),
            f"MFAC(mode='adam') over {sum(sizes)} coordinates in {len(sizes)} tensors with "
            f"{layout} (windows, their float64 m x m matrices, Adam's moments and the step's "
            "buffers)",
            memory_budget,
            device,
            hint="use a smaller window (ngrads), bfloat16 history, or one top-k window "
            "(blocks='global', history='topk', a small topk); the paper's step also takes a "
            "compressed window (mode='paper', history='topk')",
        )
        self._blocks: list[_Block] | list[_TopKBlock]
        if k is not None:
            self._blocks = [
                _TopKBlock(sum(sizes), cfg.ngrads, k, device, history_dtype, memory_budget)
            ]
        elif cfg.blocks == "global":
            self._blocks = [_Block(sum(sizes), cfg.ngrads, device, history_dtype)]
        else:
            self._blocks = [_Block(n, cfg.ngrads, device, history_dtype) for n in sizes]
        self._flat: tuple[torch.Tensor, ...] | None = None
        self._steps = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Groups are fixed at construction (the window's layout depends on them)."""
        if hasattr(self, "_blocks"):
            raise NotImplementedError(
                "MFAC(mode='adam') does not support adding parameter groups after construction "
                "(each tensor's window is laid out then); build it with every group"
            )
        super().add_param_group(param_group)

    @staticmethod
    def required_bytes(
        sizes: list[int],
        ngrads: int,
        blocks: str = "tensor",
        history_dtype: torch.dtype = torch.float32,
        topk: int | float | None = None,
        device: torch.device | str | None = None,
    ) -> int:
        """Bytes a step needs: the windows (in ``history_dtype``) and their float64 m x m Gram
        matrices, Adam's two moments, and the step's float32 temporaries (z, u and the
        direction, plus the eigendecomposition's m x m work per block). With ``topk`` (k
        entries per row: one top-k window over the whole model) the window and its step
        buffers are :meth:`TopKSlidingInverseFisher.required_bytes` (the direction is its
        returned step), plus z, u, the moments and the eigendecomposition's work."""
        dim = sum(sizes)
        if topk is not None:
            topk = resolve_k(topk, dim)  # an int k, or a density in (0, 1]
            window = TopKSlidingInverseFisher.required_bytes(
                dim, ngrads, topk, history_dtype, device
            )
            return window + 2 * 4 * dim + 2 * 4 * dim + 3 * 8 * ngrads * ngrads
        nblocks = 1 if blocks == "global" else len(sizes)
        elem = torch.empty((), dtype=history_dtype).element_size()
        windows = elem * ngrads * dim + 8 * nblocks * ngrads * ngrads
        # temporaries: z, u, the direction, and the (d, 2) stack of z and u one pass reads
        return windows + 2 * 4 * dim + 4 * 4 * dim + 3 * 8 * nblocks * ngrads * ngrads

    @property
    def state_nbytes(self) -> int:
        """Bytes the optimizer holds between steps: windows (a top-k window's error vector and
        its spare included), their m x m matrices, Adam's two moments, and the whole model's
        z and u buffers a global window keeps across steps."""
        window = sum(b.nbytes for b in self._blocks)
        flat = sum(t.numel() * t.element_size() for t in self._flat or ())
        return window + flat + 2 * 4 * sum(p.numel() for p in self._params)

    def _flat_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole model's z and u (float32 d-vectors), kept across steps so that a step
        writes into memory it already owns (a fresh d-vector costs its page faults)."""
        if self._flat is None:
            dim = sum(p.numel() for p in self._params)
            device = self._params[0].device
            self._flat = tuple(
                torch.empty(dim, dtype=torch.float32, device=device) for _ in range(2)
            )
        return self._flat

    def _whiten(
        self, flat: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Update Adam's moments; return (z, u) as flat float32 vectors, one per parameter or,
        with ``flat``, one of the whole model (written in place, no concatenation), and the
        squared length of each parameter's AdamW direction (the graft's target; it is |u|^2
        with Adam whitening). D is formed where z goes, then divided into z in place."""
        b1, b2 = self.cfg.betas
        t = self._steps + 1
        bc1, bc2 = 1.0 - b1**t, math.sqrt(1.0 - b2**t)
        zs, us, targets = [], [], []
        if flat:
            zflat, uflat = self._flat_buffers()
            sizes = [p.numel() for p in self._params]
            zviews, uviews = zflat.split(sizes), uflat.split(sizes)
        for i, p in enumerate(self._params):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            st = self.state[p]
            if not st:
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            g = g.detach().reshape(-1).float()
            ea, es = st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)
            ea.lerp_(g, 1.0 - b1)
            es.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            den = torch.sqrt(es, out=zviews[i] if flat else None)
            den.div_(bc2).add_(self.cfg.eps)  # D = sqrt(v / (1 - b2^t)) + eps
            if self.cfg.whiten == "adam":
                u = torch.div(ea, den, out=uviews[i] if flat else None).div_(bc1)
                z = torch.div(g, den, out=den)  # D is not needed after u
                targets.append(torch.dot(u, u))
            else:
                if self.cfg.graft:
                    adamw = torch.div(ea, den)
                    targets.append(torch.dot(adamw, adamw) / bc1**2)
                u = torch.div(ea, bc1, out=uviews[i] if flat else None)
                z = zviews[i].copy_(g) if flat else g  # z read only: the window copies it
            zs.append(z)
            us.append(u)
        if flat:
            return [zflat], [uflat], targets
        return zs, us, targets

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step (see the module docstring); ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [p for p in self._params if p.grad is not None]
        if not live:
            return loss
        for i, p in enumerate(self._params):  # checked before any state changes
            if p.grad is not None and not finite_fast(p.grad):
                raise NonFiniteGradientError(
                    f"ScaledMFAC.step: the gradient of parameter #{i} (shape "
                    f"{tuple(p.shape)}) contains NaN or Inf; nothing was changed"
                )
        if self.cfg.history == "topk" and self.cfg.whiten == "none":
            self._check_error_feedback_fits(live)
        is_global = self.cfg.blocks == "global"
        zs, us, targets = self._whiten(flat=is_global)
        projs = [b.push(z, u) for b, z, u in zip(self._blocks, zs, us, strict=True)]
        grams = torch.stack([b.gram for b in self._blocks])
        coeff, lams = window_coeffs(
            grams, [b.filled for b in self._blocks], self.cfg.damp, self.cfg.power
        )
        cs = (coeff @ torch.stack(projs)[:, :, None])[:, :, 0]
        dirs = [
            b.finish(u, c, lam, self.cfg.whiten, z)
            for b, u, c, lam, z in zip(self._blocks, us, cs, lams, zs, strict=True)
        ]
        if is_global:  # views: the graft below scales them in place
            dirs = list(dirs[0].split([p.numel() for p in self._params]))
        if self.cfg.graft:  # per tensor: the window's direction at AdamW's step length
            d_norms = torch.stack([d.norm() for d in dirs])
            u_norms = torch.stack(targets).sqrt()
            scales = torch.where(d_norms > 0, u_norms / d_norms, torch.ones_like(d_norms))
            for d, scale in zip(dirs, scales, strict=True):  # no host sync per tensor
                d.mul_(scale)
        owner = {p: g for g in self.param_groups for p in g["params"]}
        for p, d in zip(self._params, dirs, strict=True):
            if p.grad is None:
                continue
            group = owner[p]
            lr, wd = group["lr"], group["weight_decay"]
            if wd != 0.0:
                p.mul_(1.0 - lr * wd)
            p.add_(d.view_as(p).to(p.dtype), alpha=-lr)
        self._steps += 1
        return loss

    def _check_error_feedback_fits(self, live: list[torch.Tensor]) -> None:
        """Without whitening the top-k window compresses e + g for the raw gradient g: refuse,
        before Adam's moments change, a gradient for which that sum could overflow float32.
        (Adam-whitened entries are bounded by about (1 - b2)^-1/2, so the check is only needed
        here.)"""
        g_max = max(float(p.grad.abs().max()) for p in live)
        e_max = float(self._blocks[0].op.error.abs().max())
        if not g_max + e_max < torch.finfo(torch.float32).max:
            raise NonFiniteGradientError(
                f"ScaledMFAC.step: the gradient's largest entry ({g_max:.3g}) plus the top-k "
                f"window's error feedback ({e_max:.3g}) overflows float32; nothing was changed"
            )

    def __repr__(self) -> str:
        c = self.cfg
        window = f"history='topk', topk={c.topk!r}, " if c.history == "topk" else ""
        return (
            f"MFAC(mode='adam', ngrads={c.ngrads}, damp={c.damp:g}, blocks={c.blocks!r}, "
            f"{window}windows={len(self._blocks)}, graft={c.graft}, "
            f"groups={len(self.param_groups)})"
        )

    def state_dict(self) -> dict[str, Any]:
        """torch's state (Adam moments) plus the windows and the step count."""
        sd = super().state_dict()
        sd["scaled"] = {"blocks": [b.state_dict() for b in self._blocks], "steps": self._steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same parameters and options); every window is
        checked before anything is written."""
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("scaled"), Mapping):
            raise ValueError(
                "state_dict has no 'scaled' entry: it is not a state of MFAC(mode='adam'); "
                "nothing was loaded"
            )
        sd = dict(state_dict)
        extra = sd.pop("scaled")
        for key in ("blocks", "steps"):
            if key not in extra:
                raise KeyError(f"state is missing the field 'scaled.{key}'; nothing was loaded")
        steps = extra["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"scaled.steps must be an int >= 0, got {steps!r}; nothing was loaded")
        if len(extra["blocks"]) != len(self._blocks):
            raise ValueError(
                f"state holds {len(extra['blocks'])} blocks, this optimizer {len(self._blocks)}"
            )
        for b, s in zip(self._blocks, extra["blocks"], strict=True):
            b.check_state(s)
        super().load_state_dict(sd)
        # torch casts the moments to each parameter's dtype and shares them with the given
        # dict; this rule keeps them float32 and its own (copies of the saved values)
        saved = sd.get("state", {})
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in enumerate(params):
            for key in ("exp_avg", "exp_avg_sq"):
                if index in saved and key in saved[index]:
                    self.state[p][key] = saved[index][key].to(
                        device=p.device, dtype=torch.float32, copy=True
                    )
        for b, s in zip(self._blocks, extra["blocks"], strict=True):
            b.load_state_dict(s)
        self._steps = steps


__all__ = ["ScaledConfig", "ScaledMFAC", "window_coeff", "window_coeffs"]
