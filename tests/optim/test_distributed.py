"""Both rules with their windows sharded over 2 CPU processes (gloo) against the
single-process optimizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gloo import gloo_group
from mfac import NonFiniteGradientError
from mfac.optim import MFAC, MFACSGD

STEPS, NGRADS = 30, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))  # d = 244 (even)


def _train(model: nn.Module, opt: MFACSGD) -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 10, generator=gen), torch.randint(0, 4, (400,), generator=gen)
    for t in range(STEPS):
        sl = slice((t * 8) % 400, (t * 8) % 400 + 8)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()


def _make_opt(model: nn.Module, group: object = None) -> MFACSGD:
    return MFACSGD(
        model.parameters(), lr=1e-2, ngrads=NGRADS, damp=1e-4, momentum=0.5, process_group=group
    )


def _make_default(model: nn.Module, group: object = None) -> MFAC:
    """The default rule, per-tensor windows each sharded over ``group``."""
    return MFAC(model.parameters(), lr=1e-2, ngrads=NGRADS, process_group=group)


def _worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, out):
        model = _model()
        opt = _make_opt(model, dist.group.WORLD)
        _train(model, opt)
        params = [p.detach().clone() for p in model.parameters()]
        # NaN on rank 1 only (in rank 0's column range): both ranks must raise, nothing changes
        window = opt.window.grads.clone()
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        if rank == 1:
            model[0].weight.grad[0, 0] = float("nan")
        try:
            opt.step()
            raised = False
        except NonFiniteGradientError:
            raised = True
        unchanged = torch.equal(window, opt.window.grads) and all(
            torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True)
        )
        default = _model()
        default_opt = _make_default(default, dist.group.WORLD)
        _train(default, default_opt)
        torch.save(
            {
                "default_params": [p.detach().clone() for p in default.parameters()],
                "default_nbytes": sum(w.window_nbytes for w in default_opt.windows),
                "params": params,
                "window_nbytes": opt.window.window_nbytes,
                "bounds": (opt.window.lo, opt.window.hi),
                "nan_raised": raised,
                "nan_unchanged": unchanged,
            },
            Path(out) / f"rank{rank}.pt",
        )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_sharded_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model = _model()
    opt = _make_opt(model)
    _train(model, opt)
    full_bytes = opt.window.grads.numel() * opt.window.grads.element_size()
    ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    bounds = []
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        got = torch.cat([p.reshape(-1) for p in res["params"]])
        rel = (got - ref).norm() / ref.norm()
        assert rel <= 1e-5, f"rank {rank}: relative difference {rel:.2e}"
        assert res["window_nbytes"] * 2 == full_bytes
        assert res["nan_raised"] and res["nan_unchanged"], f"rank {rank}"
        bounds.append(res["bounds"])
    assert bounds == [(0, opt.dim // 2), (opt.dim // 2, opt.dim)]
    default = _model()
    default_opt = _make_default(default)
    _train(default, default_opt)
    ref = torch.cat([p.detach().reshape(-1) for p in default.parameters()])
    full_bytes = sum(w.grads.numel() * w.grads.element_size() for w in default_opt.windows)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        got = torch.cat([p.reshape(-1) for p in res["default_params"]])
        rel = (got - ref).norm() / ref.norm()
        assert rel <= 1e-5, f"MFAC, rank {rank}: relative difference {rel:.2e}"
        assert res["default_nbytes"] < full_bytes


def test_process_group_without_init_is_a_clear_error() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        _make_opt(_model(), group=object())
