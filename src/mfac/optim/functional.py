"""The rules' maths as functions (docs/algorithms.md section 3), apart from the optimizers'
bookkeeping.

:func:`mfac_step` is the paper's step and mirrors torch.optim's functional cores
(``torch.optim.sgd.sgd``): it takes the parameters, their gradients and momentum buffers as
lists and a sliding window, and updates them in place; :class:`mfac.MFACSGD` only lays the
parameters out, keeps the state and checks the options. :func:`window_coeffs` is the m x m
spectral function :class:`mfac.MFAC` applies to its windows, and :func:`newton_schulz` the
orthogonalization it applies to the matrices of groups with ``orthogonalize=True``.

Extension point: ``gradient_scaling`` (any object with ``before_push`` and ``after_ihvp``)
turns the step into D (lambda*I + G~^T G~ / m)^-1 D g with G~ the window of D-scaled gradients
(D diagonal, for instance Adam or AdaGrad statistics): ``before_push`` receives the flat
gradient and returns the vector to push, ``after_ihvp`` receives F^-1 of it and returns the
direction. Without it (the default) the step is the paper's: lr * F^-1 g.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from .._validation import NonFiniteGradientError
from ..operators.layout import Segment
from ..operators.window import SlidingWindow

F64 = torch.float64


@runtime_checkable
class GradientScaling(Protocol):
    """An optional transform around the preconditioner (see the module docstring)."""

    def before_push(self, flat_grad: torch.Tensor) -> torch.Tensor:
        """The vector to push into the window, from the flat gradient (d,)."""
        ...

    def after_ihvp(self, direction: torch.Tensor) -> torch.Tensor:
        """The update direction, from F^-1 of the pushed vector (d,)."""
        ...


def _view(flat: torch.Tensor, seg: Segment) -> torch.Tensor:
    return flat[seg.offset : seg.offset + seg.size]


def gather_gradients(
    flat: torch.Tensor,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    segments: Sequence[Segment],
    weight_decays: Sequence[float],
    decoupled_weight_decay: bool,
) -> list[int]:
    """Write every gradient (surviving entries, + coupled weight decay) into ``flat``; zeros
    for a missing gradient. Return the positions of the parameters that have a gradient."""
    live = []
    for i, (p, g, seg) in enumerate(zip(params, grads, segments, strict=True)):
        view = _view(flat, seg)
        if g is None:
            view.zero_()
            continue
        if g.is_sparse:
            raise RuntimeError("MFAC does not support sparse gradients")
        live.append(i)
        if seg.index is None:
            view.copy_(g.reshape(-1))
        else:  # gathered straight into the flat buffer, no temporary
            torch.index_select(g.reshape(-1), 0, seg.index, out=view)
        wd = weight_decays[i]
        if wd != 0.0 and not decoupled_weight_decay:
            w = p.detach().reshape(-1)
            view.add_(w if seg.index is None else w.index_select(0, seg.index), alpha=wd)
    return live


def mfac_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    momentum_buffers: list[torch.Tensor | None],
    *,
    window: SlidingWindow,
    segments: Sequence[Segment],
    flat: torch.Tensor,
    lrs: Sequence[float],
    momentums: Sequence[float],
    weight_decays: Sequence[float],
    decoupled_weight_decay: bool = False,
    gradient_scaling: GradientScaling | None = None,
    describe: Callable[[int], str] | None = None,
) -> bool:
    """One M-FAC step over ``params`` (one preconditioner for all of them); in place.

    g (+ wd*p when coupled) is gathered into ``flat`` (d,), pushed into ``window`` and
    preconditioned, s = F^-1 g; v = momentum*v + s per parameter (buffers are created in
    ``momentum_buffers`` when any momentum is non-zero); p *= 1 - lr*wd when decoupled;
    p -= lr*v. Parameters without a gradient enter the window as zeros and are not touched.
    A NaN/Inf gradient raises :class:`mfac.NonFiniteGradientError` naming the parameter
    (``describe(i)``), with window, buffers and parameters unchanged. Returns False when no
    parameter has a gradient (nothing is done).
    """
    live = gather_gradients(flat, params, grads, segments, weight_decays, decoupled_weight_decay)
    if not live:
        return False
    pushed = flat if gradient_scaling is None else gradient_scaling.before_push(flat)
    try:  # the window checks finiteness (for free in the dense window) and changes nothing
        direction = window.push_ihvp(pushed)
    except NonFiniteGradientError as exc:
        for i in live:
            if not bool(torch.isfinite(_view(flat, segments[i])).all()):
                name = describe(i) if describe is not None else f"#{i}"
                raise NonFiniteGradientError(
                    f"MFAC.step: the gradient of parameter {name} contains NaN or Inf; window, "
                    "momentum and parameters are unchanged"
                ) from exc
        raise
    if gradient_scaling is not None:
        direction = gradient_scaling.after_ihvp(direction)
    use_momentum = any(mu != 0.0 for mu in momentums)
    dense: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for i in live:
        p, seg = params[i], segments[i]
        step = _view(direction, seg)
        if use_momentum:
            buf = momentum_buffers[i]
            if buf is None:
                buf = torch.zeros(p.shape, dtype=direction.dtype, device=p.device)
                momentum_buffers[i] = buf
            if seg.index is None:
                buf.view(-1).mul_(momentums[i]).add_(step)
                step = buf.view(-1)
            else:
                kept = buf.view(-1).index_select(0, seg.index).mul_(momentums[i]).add_(step)
                buf.view(-1).index_copy_(0, seg.index, kept)
                step = kept
        lr, wd = lrs[i], weight_decays[i]
        with torch.no_grad():
            if decoupled_weight_decay and wd != 0.0:
                p.mul_(1.0 - lr * wd)
            if seg.index is None:
                ps, steps = dense.setdefault(lr, ([], []))
                ps.append(p)
                steps.append(step.view_as(p).to(p.dtype))
            else:
                p.view(-1).index_add_(0, seg.index, step.to(p.dtype), alpha=-lr)
    with torch.no_grad():
        for lr, (ps, steps) in dense.items():  # one fused update per learning rate
            torch._foreach_add_(ps, steps, alpha=-lr)
    return True


def window_coeffs(
    grams: torch.Tensor, filled: Sequence[int], damp: float, power: float
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


#: The quintic's coefficients (a, b, c): the ones Muon uses, chosen for a steep slope at 0.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximate orthogonal polar factor of each matrix in a stack (B, r, c), Muon's way:
    divide by the Frobenius norm (all singular values <= 1), then ``steps`` iterations of
    y <- a y + (b Y + c Y^2) y with Y = y y^T, in bfloat16 and on the short side. The
    iteration drives every singular value into about [0.7, 1.2] rather than to exactly 1, which
    is all the step needs; the products run in bfloat16, as torch.optim.Muon runs them.
    Returns bfloat16."""
    if x.dim() != 3:
        raise ValueError(f"newton_schulz expects matrices stacked (B, r, c), got {tuple(x.shape)}")
    a, b, c = NS_COEFFICIENTS
    y = x.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        y = y.mT
    y = y / y.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.baddbmm(y, poly, y, beta=a)
    return y.mT if tall else y


__all__ = [
    "NS_COEFFICIENTS",
    "GradientScaling",
    "gather_gradients",
    "mfac_step",
    "newton_schulz",
    "window_coeffs",
]
