"""``mfac.MFAC``, the default rule: sliding-window preconditioners that do not depend on the
gradients' scale, and Muon's orthogonalized step for the hidden matrices (the studies that
chose it: docs/optim_transformers.md and docs/optim_designs.md).

Plain M-FAC steps along F^-1 g with F = damp*I + G^T G / m. Its step is a combination of the
window's gradients, so it inherits their split across tensors: on a freshly initialised
transformer nearly all of it lands on the classifier head. The optimizer here keeps Adam's
diagonal statistics and applies a matrix function of the window's (whitened) Fisher on top:

    m_t = b1 m + (1-b1) g,   v_t = b2 v + (1-b2) g^2,   D = sqrt(v_t / (1-b2^t)) + eps
    z_t = g / D           ("adam" whitening; z_t = g with whiten="none")
    u_t = (m_t / (1-b1^t)) / D                               (AdamW's direction)
    Z   = the last m whitened gradients z (m x d_w per window w; empty slots are zero rows)
    S   = Z^T Z / m,   mu = tr(S) / n   (n = filled slots: the mean non-zero eigenvalue)
    lam = relative_damp * mu            (scale-relative damping, per window)
    s   = lam^-q (I + S / lam)^-p u     (p = power: 1 is the M-FAC inverse, 1/2 is GGT's
                                         inverse square root; q = 0 with "adam" whitening,
                                         q = 1/2 without, so s never depends on the scale of g)
    s_T *= |a_T| / |s_T|                (graft, the default: AdamW's step length per tensor T,
                                         a = m_hat / D; a = u with "adam" whitening)
    p  *= 1 - lr * wd;   p -= lr * s

With whitening, s -> u (exactly AdamW) as relative_damp -> infinity, and the window only
shrinks the step along the directions its recent gradients share. Windows cover each parameter
tensor of at least ``share_below`` entries, with one window shared by the smaller tensors
(``window_scope="tensor"``, the default), or the whole model (``window_scope="model"``); the
graft is per parameter tensor either way. Every window's product costs two passes over it
(``push_gather`` for Z u, ``scatter`` for Z^T c) and an m x m float64 eigendecomposition (one
batched call for all windows): O(m d + m^3). The windows are the operators' undamped windows
(``damp=None``: they keep Z Z^T, this rule applies the spectral function itself).

Groups with ``orthogonalize=True`` (a network's hidden matrices: :func:`mfac.optim.hidden_groups`
builds them) take Muon's step instead, with no window and no Adam moments:

    B  = mu B + (1-mu) G,   N = (1-mu) G + mu B       (Nesterov; mu = orthogonal_momentum)
    O  = NS5(N)                                       (:func:`newton_schulz`, about U V^T)
    W *= 1 - lr * wd;   W -= lr * 0.2 sqrt(max(rows, cols)) O

The factor 0.2 sqrt(max(rows, cols)) gives O the RMS of an AdamW step, so one lr serves both
kinds of group. From scratch this split is what beat Muon and SOAP (docs/optim_designs.md):
the window's gain is on the tensors Muon leaves to AdamW.

``layout="topk"`` (with ``window_scope="model"``) stores the window as error-feedback top-k
rows (EFCP, :class:`mfac.operators.topk.TopKSlidingInverseFisher`): each step a = e + z keeps
its k largest magnitudes c as the new row and e = a - c, and Z above is the matrix of the rows
c. The formulas are the same with that Z; the window takes m k (value + index) bytes instead of
m d floats.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .._validation import NonFiniteGradientError
from ..operators.fsdp import LocalShardedInverseFisher, push_gather_all
from ..operators.topk import TopKSlidingInverseFisher, resolve_k
from ..operators.window import SlidingWindow
from .base import Params, WindowOptimizer, local
from .config import MFACConfig, check_group_option
from .functional import newton_schulz, window_coeffs

F64 = torch.float64


class MFAC(WindowOptimizer):
    """The M-FAC optimizer: AdamW whose direction is preconditioned by a matrix function of a
    sliding window's whitened empirical Fisher, with damping relative to the window's mean
    eigenvalue, grafted to AdamW's step length (the module docstring has the formulas).

    Args:
        params: parameters or groups (``lr`` and ``weight_decay`` per group, read every step;
            ``orthogonalize=True`` for a group of hidden matrices, fixed at construction).
            From scratch, pass ``mfac.optim.hidden_groups(model)``; to fine-tune a
            pretrained model, its parameters with ``window_scope="model", layout="topk",
            topk=0.01, ngrads=32`` (the measured choices: docs/optim_transformers.md).
        lr: learning rate, at AdamW's scale (1e-3 from scratch, 1e-5 to 1e-4 to fine-tune).
        weight_decay: decoupled, as in AdamW.
        **options: :class:`mfac.optim.MFACConfig` (``ngrads``, ``relative_damp``, ``power``,
            ``whiten``, ``window_scope``, ``share_below``, ``orthogonal_momentum``, ``betas``,
            ``eps``, ``graft``, ``layout``, ``topk``, ``window_dtype``, ``memory_budget``,
            ``process_group``), by keyword; an unknown name (for instance an option of
            :class:`mfac.MFACSGD`) is refused by name.

    A parameter whose ``.grad`` is None in a step is not updated; its Adam moments and window
    see a zero gradient (an orthogonalized matrix's momentum does not change). A step in which
    only the orthogonalized matrices have gradients leaves the windowed part alone: its
    moments, windows and :attr:`steps` (the window rule's count, Adam's bias correction) stay.
    NaN/Inf in a gradient raises :class:`mfac.NonFiniteGradientError` before anything changes. FSDP2
    parameters (``fully_shard``: DTensors with ``Shard(0)``) need nothing more: each rank keeps
    its shards' columns of the windows and all-reduces the m x m products (docs/optim.md,
    "FSDP2 and distributed checkpoints"); an orthogonalized matrix is gathered whole for its
    Newton-Schulz iteration. ``state_dict`` holds the windows by reference (as torch.optim
    holds its moments; save or deepcopy it before the next step): resuming is bit-identical.
    """

    param_tensors = ("exp_avg", "exp_avg_sq", "momentum_buffer")
    cfg: MFACConfig

    def __init__(
        self, params: Params, lr: float = 1e-3, weight_decay: float = 0.0, **options: Any
    ) -> None:
        cfg = MFACConfig.build(options, "MFAC")
        defaults = {
            "lr": check_group_option(lr, "lr"),
            "weight_decay": check_group_option(weight_decay, "weight_decay"),
            "orthogonalize": False,
        }
        #: (the layout they were made for, each window's z and u buffers or None)
        self._zu: tuple[Any, list[tuple[torch.Tensor, torch.Tensor] | None]] | None = None
        super().__init__(params, defaults, cfg)

    def required_bytes(
        self, sizes: list[int], *, windows: int | None = None, unwindowed: Sequence[int] = ()
    ) -> int:
        """Bytes a step needs: the windows (in ``window_dtype``) and their float64 m x m Gram
        matrices, Adam's two moments, and the step's float32 temporaries (z, u and the
        direction, plus the eigendecomposition's m x m work per window). With one top-k
        window its bytes are :meth:`TopKSlidingInverseFisher.required_bytes` (the direction is
        its returned step), plus z, u, the moments and the eigendecomposition's work.
        ``unwindowed`` are the orthogonalized matrices' whole sizes (FSDP2 gathers each whole);
        per entry they take their momentum (a shard under FSDP2: the whole is an upper bound),
        the Nesterov direction (every matrix's, held until its batch is orthogonalized), the
        batch's float32 stack and Newton-Schulz's three bfloat16 matrices (input, iterate,
        result), plus one float32 update of the largest at a time."""
        cfg, dim, m = self.cfg, sum(sizes), self.cfg.ngrads
        orthogonal = (4 + 4 + 4 + 3 * 2) * sum(unwindowed) + 4 * max(unwindowed, default=0)
        if cfg.layout == "topk":
            k = resolve_k(cfg.topk, dim)
            window = TopKSlidingInverseFisher.required_bytes(dim, m, k, cfg.window_dtype)
            return window + 2 * 4 * dim + 2 * 4 * dim + 3 * 8 * m * m + orthogonal
        if windows is None:
            windows = 1 if self.window_scope == "model" else len(sizes)
        elem = torch.empty((), dtype=cfg.window_dtype).element_size()
        held = elem * m * dim + 8 * windows * m * m
        # temporaries: z, u, the direction, and the (d, 2) stack of z and u one pass reads
        return held + 2 * 4 * dim + 4 * 4 * dim + 3 * 8 * windows * m * m + orthogonal

    @property
    def state_nbytes(self) -> int:
        """Bytes held between steps: windows (a top-k window's error vector and its spare
        included), their m x m matrices, Adam's two moments, and the z and u buffers a window
        over several tensors keeps across steps."""
        buffers = self._zu[1] if self._zu is not None else []
        flat = sum(t.numel() * t.element_size() for buf in buffers if buf for t in buf)
        return super().state_nbytes + flat

    def _initial_tensors(self, p: torch.Tensor, group: Any, plan: Any) -> dict[str, torch.Tensor]:
        """Adam's two moments, or an orthogonalized matrix's momentum, zero (created at the
        first step otherwise)."""
        if group["orthogonalize"]:
            return {"momentum_buffer": torch.zeros_like(p, dtype=torch.float32)}
        return {
            "exp_avg": torch.zeros_like(p, dtype=torch.float32),
            "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
        }

    def _windowed(self, group: Mapping[str, Any], index: int) -> bool:
        """A group with ``orthogonalize=True`` takes Muon's step (no window, no Adam moments);
        its parameters must be matrices. Checked when the group is laid out."""
        flag = group.get("orthogonalize", False)
        if not isinstance(flag, bool):
            raise TypeError(
                f"param_groups[{index}]['orthogonalize'] must be True or False, got {flag!r}"
            )
        if flag:
            for j, p in enumerate(group["params"]):
                if p.dim() != 2:
                    raise ValueError(
                        f"param_groups[{index}] has orthogonalize=True but its parameter #{j} has "
                        f"shape {tuple(p.shape)}; only matrices (2-D) are orthogonalized (put "
                        "embeddings, biases and norms in another group: mfac.optim.hidden_groups)"
                    )
        return not flag

    def _kept_tensors(self, windowed: bool) -> tuple[str, ...]:
        """Adam's two moments for a windowed parameter, the momentum for an orthogonalized
        matrix (a saved entry with the other kind's tensor is refused by name)."""
        return ("exp_avg", "exp_avg_sq") if windowed else ("momentum_buffer",)

    def _check_groups(self) -> list[dict[str, float]]:
        """The groups' numeric options, checked; ``orthogonalize`` cannot change after the
        layout was built (the parameters' state differs between the two steps)."""
        laid_out = self._orthogonal_flags
        for gi, group in enumerate(self.param_groups):
            if group.get("orthogonalize", False) != laid_out[gi]:
                raise ValueError(
                    f"param_groups[{gi}]['orthogonalize'] changed from {laid_out[gi]} after the "
                    "optimizer was built; build a new optimizer to change it"
                )
        return super()._check_groups()

    def _install(self, plan: Any, masks: Any, keep: bool) -> None:
        """Adopt a plan, remembering which groups it orthogonalizes."""
        super()._install(plan, masks, keep)
        self._orthogonal_flags = [bool(g.get("orthogonalize", False)) for g in self.param_groups]

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Every saved group's ``orthogonalize`` equal to this one's (checked first: the state
        kept per parameter follows from it; a checkpoint without the field is of groups
        without it), then the base checks."""
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if isinstance(saved_groups, list) and len(saved_groups) == len(self.param_groups):
            for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
                flag = saved.get("orthogonalize", False) if isinstance(saved, Mapping) else False
                if not isinstance(flag, bool) or flag != group["orthogonalize"]:  # 1 == True
                    raise ValueError(
                        f"param_groups[{gi}]['orthogonalize']: state has {flag!r}, this "
                        f"optimizer {group['orthogonalize']!r}"
                    )
        return super()._check_state_dict(state_dict)

    def _window_hint(self) -> str:
        """Windows laid out otherwise come from another ``window_scope`` or ``share_below``
        (which tensors share a window)."""
        c = self.cfg
        return (
            f" (the saved windows are laid out otherwise: was the state saved with another "
            f"window_scope or share_below? this optimizer has window_scope={c.window_scope!r}, "
            f"share_below={c.share_below})"
        )

    def _window_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """For every window over several tensors (the model-wide one, or the one the small
        tensors share), its z and u (float32, the window's length), kept across steps so that
        a step writes each tensor's piece in place: no concatenation, and no fresh d-vector
        with its page faults. None for a window of one tensor (it reads that tensor's own z)."""
        if self._zu is None or self._zu[0] is not self._layout:
            device = self._layout.device
            buffers = [
                (torch.empty(w.dim, dtype=torch.float32, device=device),
                 torch.empty(w.dim, dtype=torch.float32, device=device))
                if len(member) > 1 else None
                for member, w in zip(self._layout.members, self.windows, strict=True)
            ]  # fmt: skip
            self._zu = (self._layout, buffers)
        return self._zu[1]

    def _whiten(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Update Adam's moments; return (z, u) per window as flat float32 vectors (a window
        over several tensors gets its buffers, each tensor's piece written in place), and the
        squared length of each parameter's AdamW direction (the graft's target; it is |u|^2
        with Adam whitening). D is formed where z goes, then divided into z in place."""
        b1, b2 = self.cfg.betas
        t = self.steps + 1
        bc1, bc2 = 1.0 - b1**t, math.sqrt(1.0 - b2**t)
        layout = self._layout
        sizes = [s.size for s in layout.segments]
        buffers = self._window_buffers()
        views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for member, buf in zip(layout.members, buffers, strict=True):
            if buf is not None:
                zpieces, upieces = (b.split([sizes[i] for i in member]) for b in buf)
                views.update(zip(member, zip(zpieces, upieces, strict=True), strict=True))
        zs, us, targets = [], [], []
        for i, p in enumerate(layout.params):
            g = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
            st = self.state[p]
            if "exp_avg" not in st:  # DTensors sharded like p under FSDP2
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            g = g.detach().reshape(-1).float()
            ea, es = local(st["exp_avg"]).view(-1), local(st["exp_avg_sq"]).view(-1)
            ea.lerp_(g, 1.0 - b1)
            es.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            zview, uview = views.get(i, (None, None))
            den = torch.sqrt(es, out=zview)
            den.div_(bc2).add_(self.cfg.eps)  # D = sqrt(v / (1 - b2^t)) + eps
            if self.cfg.whiten == "adam":
                u = torch.div(ea, den, out=uview).div_(bc1)
                z = torch.div(g, den, out=den)  # D is not needed after u
                targets.append(torch.dot(u, u))
            else:
                if self.cfg.graft:
                    adamw = torch.div(ea, den)
                    targets.append(torch.dot(adamw, adamw) / bc1**2)
                u = torch.div(ea, bc1, out=uview)
                z = zview.copy_(g) if zview is not None else g  # read only: the window copies
            zs.append(z)
            us.append(u)
        windows = list(zip(layout.members, buffers, strict=True))
        zw = [zs[m[0]] if buf is None else buf[0] for m, buf in windows]
        uw = [us[m[0]] if buf is None else buf[1] for m, buf in windows]
        return zw, uw, targets

    def _finish(
        self, window: SlidingWindow, u: torch.Tensor, c: torch.Tensor, lam: float,
        out: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """lam^-q (u + Z^T c), the second pass (written into ``out`` when given)."""
        adam = self.cfg.whiten == "adam"
        if lam == 0.0:  # an all-zero window: no curvature information
            if out is None:
                return u.clone() if adam else torch.zeros_like(u)
            return out.copy_(u) if adam else out.zero_()
        result = window.scatter(c, out=out, plus=u)
        if not adam:
            result.mul_(lam**-0.5)
        return result

    def _step(self, options: list[dict[str, float]]) -> None:
        """One step with the groups' checked options (see the module docstring)."""
        plan = self._layout
        params = plan.params
        windowed = any(p.grad is not None for p in params)
        orthogonal = any(p.grad is not None for p in plan.unwindowed)
        if not windowed and not orthogonal:
            return
        self._check_finite(params + plan.unwindowed)
        # the step count is the window rule's (Adam's bias correction): a step in which no
        # windowed parameter has a gradient leaves that part, its count included, untouched
        if windowed:
            self._window_step(options)
            self._count_step()
        if orthogonal:
            self._orthogonal_step(options)

    def _window_step(self, options: list[dict[str, float]]) -> None:
        """The window rule on every laid-out parameter (all but the orthogonalized ones)."""
        params, members = self._layout.params, self._layout.members
        live = [p for p in params if p.grad is not None]
        windows = self.windows
        if self.cfg.layout == "topk" and self.cfg.whiten == "none":
            self._check_error_feedback_fits(live, windows[0])
        zs, us, targets = self._whiten()
        if len(windows) > 1 and all(isinstance(w, LocalShardedInverseFisher) for w in windows):
            projs = push_gather_all(windows, zs, us)  # FSDP2: one all-reduce for all windows
        else:
            projs = [w.push_gather(z, u) for w, z, u in zip(windows, zs, us, strict=True)]
        m = self.cfg.ngrads
        grams = torch.stack([w.gram for w in windows]) / m
        coeff, lams = window_coeffs(
            grams, [w.filled for w in windows], self.cfg.relative_damp, self.cfg.power
        )
        cs = (coeff @ torch.stack(projs)[:, :, None])[:, :, 0]
        # z is the step's own buffer except when, unwhitened in a window of its own, it is
        # the gradient
        adam = self.cfg.whiten == "adam"
        own = [adam or len(member) > 1 for member in members]
        results = [
            self._finish(w, u, c, lam, z if mine else None)
            for w, u, c, lam, z, mine in zip(windows, us, cs, lams, zs, own, strict=True)
        ]
        sizes = [s.size for s in self._layout.segments]
        dirs: list[torch.Tensor] = [results[0]] * len(params)
        for member, result in zip(members, results, strict=True):  # views: grafted in place
            pieces = result.split([sizes[i] for i in member]) if len(member) > 1 else [result]
            for i, piece in zip(member, pieces, strict=True):
                dirs[i] = piece
        if self.cfg.graft and self._layout.mesh is not None:
            # the global per-tensor lengths: one all-reduce of the squared local ones
            squares = torch.stack([torch.dot(d, d) for d in dirs] + targets).double()
            norms = self._all_reduce(squares).sqrt().float().split(len(dirs))
            d_norms, u_norms = norms
        elif self.cfg.graft:
            d_norms = torch.stack([d.norm() for d in dirs])
            u_norms = torch.stack(targets).sqrt()
        if self.cfg.graft:  # per tensor: the window's direction at AdamW's step length
            scales = torch.where(d_norms > 0, u_norms / d_norms, torch.ones_like(d_norms))
            for d, scale in zip(dirs, scales, strict=True):  # no host sync per tensor
                d.mul_(scale)
        for p, d, gi in zip(params, dirs, self._layout.groups, strict=True):
            if p.grad is None:
                continue
            lr, wd = options[gi]["lr"], options[gi]["weight_decay"]
            w = local(p)  # this rank's shard under FSDP2 (in place)
            if wd != 0.0:
                w.mul_(1.0 - lr * wd)
            w.add_(d.view_as(w).to(w.dtype), alpha=-lr)

    def _orthogonal_step(self, options: list[dict[str, float]]) -> None:
        """Muon's step on the matrices of groups with ``orthogonalize=True``: Nesterov momentum,
        orthogonalized by :func:`newton_schulz` (matrices of one shape in one batch), scaled by
        0.2 sqrt(max(rows, cols)) so that its RMS matches AdamW's and the lr stays on AdamW's
        scale. Under FSDP2 each matrix is gathered whole (the orthogonalization is not
        separable by rows) and every rank keeps its own rows of the result."""
        plan, mu = self._layout, self.cfg.orthogonal_momentum
        batches: dict[tuple[int, ...], list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
        for p, gi in zip(plan.unwindowed, plan.unwindowed_groups, strict=True):
            if p.grad is None:
                continue
            st = self.state[p]
            if "momentum_buffer" not in st:  # DTensors sharded like p under FSDP2
                st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf, g = local(st["momentum_buffer"]), local(p.grad).detach().float()
            buf.lerp_(g, 1.0 - mu)
            nesterov = g.lerp(buf, mu)
            if plan.mesh is not None:
                nesterov = self._whole(p, nesterov)
            batches.setdefault(tuple(nesterov.shape), []).append((p, gi, nesterov))
        for shape, items in batches.items():
            ortho = newton_schulz(torch.stack([n for _, _, n in items]))
            scale = 0.2 * math.sqrt(max(shape))
            for (p, gi, _), o in zip(items, ortho, strict=True):
                if plan.mesh is not None:
                    o = self._rows(p, o)
                lr, wd = options[gi]["lr"], options[gi]["weight_decay"]
                w = local(p)
                if wd != 0.0:
                    w.mul_(1.0 - lr * wd)
                w.add_(o.to(w.dtype), alpha=-lr * scale)

    def _whole(self, p: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
        """The whole matrix from every rank's rows (an all-gather over the FSDP2 mesh)."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            piece, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        ).full_tensor()

    def _rows(self, p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole matrix, cut as FSDP2's Shard(0) cuts (torch.chunk)."""
        mesh = p.device_mesh
        pieces = whole.chunk(mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        piece = pieces[rank] if rank < len(pieces) else whole[:0]
        if tuple(piece.shape) != tuple(local(p).shape):  # FSDP2 changed how it cuts
            raise RuntimeError(
                f"MFAC: rows {tuple(piece.shape)} of an orthogonalized matrix do not match this "
                f"rank's shard {tuple(local(p).shape)}"
            )
        return piece

    def _check_error_feedback_fits(self, live: list[torch.Tensor], window: Any) -> None:
        """Without whitening the top-k window compresses e + g for the raw gradient g: refuse,
        before Adam's moments change, a gradient for which that sum could overflow float32.
        (Adam-whitened entries are bounded by about (1 - b2)^-1/2, so the check is only needed
        here.)"""
        peaks = [local(p.grad).abs().max() for p in live if local(p.grad).numel()]
        both = torch.stack(
            [torch.stack(peaks).max().double() if peaks else torch.zeros((), dtype=F64),
             window.error.abs().max().double()]
        )  # fmt: skip
        if self._layout.mesh is not None:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self._layout.mesh.get_group())
        g_max, e_max = float(both[0]), float(both[1])
        if not g_max + e_max < torch.finfo(torch.float32).max:
            raise NonFiniteGradientError(
                f"MFAC.step: the gradient's largest entry ({g_max:.3g}) plus the top-k "
                f"window's error feedback ({e_max:.3g}) overflows float32; nothing was changed"
            )

    def set_masks(self, masks: Any) -> None:
        """Masks are :class:`mfac.MFACSGD`'s (the paper's step restricted to surviving
        coordinates); this rule refuses them by name."""
        raise NotImplementedError(
            "MFAC does not restrict its windows to masks; use mfac.MFACSGD for sparse "
            "fine-tuning with masks"
        )

    def __repr__(self) -> str:
        c = self.cfg
        layout = f"layout='topk', topk={c.topk!r}, " if c.layout == "topk" else ""
        return (
            f"MFAC(ngrads={c.ngrads}, relative_damp={c.relative_damp:g}, "
            f"window_scope={c.window_scope!r}, {layout}windows={len(self.windows)}, "
            f"orthogonalized={len(self._layout.unwindowed)}, graft={c.graft}, "
            f"groups={len(self.param_groups)})"
        )


__all__ = ["MFAC"]
