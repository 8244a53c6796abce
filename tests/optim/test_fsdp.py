"""Both rules on FSDP2-sharded models (2 gloo processes on the CPU): steps against one process
on the global batch, distributed checkpoints (DCP) resuming bit-identically, the top-k window
against its per-shard definition, refusals by name that leave the state unchanged.

One spawn runs every scenario (process start-up dominates); the tests read its results.
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mfac
from gloo import gloo_group
from mfac import NonFiniteGradientError

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD, STEPS, BATCH = 2, 6, 8
TIMEOUT_S = 150

#: name -> (rule, options): compared with one process on the global batch.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mfac_tensor": ("MFAC", {"ngrads": 4, "weight_decay": 0.01, "share_below": 1}),
    "mfac_shared": ("MFAC", {"ngrads": 4}),  # every tensor is small: one shared window
    "mfac_hidden": ("MFAC", {"ngrads": 4, "weight_decay": 0.01, "hidden": True}),
    "mfac_model": ("MFAC", {"ngrads": 4, "window_scope": "model"}),
    "sgd_bf16": ("MFACSGD", {"ngrads": 4, "damp": 1e-2, "window_dtype": torch.bfloat16}),
    "mfac_raw": ("MFAC", {"ngrads": 4, "whiten": "none", "power": 0.5}),
    "sgd": ("MFACSGD", {"ngrads": 4, "damp": 1e-2, "momentum": 0.5, "weight_decay": 0.01}),
}
#: name -> (rule, options): resumed from a DCP checkpoint.
RESUME: dict[str, tuple[str, dict[str, Any]]] = {
    "mfac_tensor": CONFIGS["mfac_tensor"],
    "mfac_model": CONFIGS["mfac_model"],
    "mfac_hidden": CONFIGS["mfac_hidden"],
    "sgd": CONFIGS["sgd"],
    "mfac_topk": ("MFAC", {"ngrads": 4, "window_scope": "model", "layout": "topk", "topk": 0.2}),
    "sgd_topk": ("MFACSGD", {"ngrads": 4, "damp": 1e-2, "layout": "topk", "topk": 0.2}),
    "mfac_topk_raw": (
        "MFAC",
        {"ngrads": 4, "window_scope": "model", "layout": "topk", "topk": 0.2, "whiten": "none",
         "power": 0.5},
    ),
}


def _model() -> nn.Module:
    torch.manual_seed(0)  # (9, 6) and (9,) split 5 + 4; (1, 3) and (1,) leave rank 1 empty
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3), nn.Tanh(), nn.Linear(3, 1))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 1, generator=gen)


def _opt(rule: str, options: dict[str, Any], model: nn.Module) -> Any:
    opts = dict(options)
    lr = 1e-2
    # "hidden": the two hidden weights take the orthogonalized step (whole matrices gathered)
    params = mfac.optim.hidden_groups(model) if opts.pop("hidden", False) else model.parameters()
    return getattr(mfac, rule)(params, lr=lr, **opts)


def _train(model: nn.Module, opt: Any, steps: range, rank: int | None) -> None:
    for t in steps:
        x, y = _data(t)
        if rank is not None:  # this rank's half of the global batch
            half = BATCH // WORLD
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _sharded() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _scenario_steps(rank: int, out: dict[str, Any]) -> None:
    for name, (rule, options) in CONFIGS.items():
        model = _sharded()
        opt = _opt(rule, options, model)
        _train(model, opt, range(STEPS), rank)
        out[f"steps/{name}"] = _full(model)
        if rank == 0:
            ref = _model()
            _train(ref, _opt(rule, options, ref), range(STEPS), None)
            out[f"ref/{name}"] = [p.detach().clone() for p in ref.parameters()]
        if name == "mfac_hidden":
            out["memory_check_sizes"] = _memory_check_sizes(model)
        if name == "mfac_tensor":
            sd_window = opt.state_dict()["state"][0]["window"]
            out["window_rows"] = {
                "type": type(sd_window["rows"]["0"]).__name__,
                "placements": str(sd_window["rows"]["0"].placements),
                "global": tuple(sd_window["rows"]["0"].shape),
                "local": tuple(sd_window["rows"]["0"].to_local().shape),
                "nbytes": [w.nbytes for w in opt.windows],
            }


def _memory_check_sizes(model: nn.Module) -> list[int]:
    """The orthogonalized matrices' sizes that MFAC's memory check counts."""
    seen: list[list[int]] = []

    class Recording(mfac.MFAC):
        def required_bytes(self, sizes: list[int], **kw: Any) -> int:
            seen.append(list(kw.get("unwindowed", ())))
            return super().required_bytes(sizes, **kw)

    Recording(mfac.optim.hidden_groups(model), lr=1e-2, ngrads=4)
    return seen[-1]


def _resume(rank: int, rule: str, options: dict[str, Any], ckpt: str) -> tuple[Any, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _sharded()
    opt = _opt(rule, options, model)
    _train(model, opt, range(3), rank)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    _train(model, opt, range(3, STEPS), rank)
    straight = _full(model)

    model2 = _sharded()
    opt2 = _opt(rule, options, model2)
    msd2, osd2 = get_state_dict(model2, opt2)
    # no fake step: a fresh optimizer's state is never empty (windows, zero moments)
    assert opt2.steps == 0 and all(w.num_pushed == 0 for w in opt2.windows)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    steps_after_load = opt2.steps
    _train(model2, opt2, range(3, STEPS), rank)
    return straight, (_full(model2), steps_after_load)


def _scenario_resume(rank: int, out: dict[str, Any], tmp: str) -> None:
    for name, (rule, options) in RESUME.items():
        path = str(Path(tmp) / name)
        straight, (resumed, steps) = _resume(rank, rule, options, path)
        out[f"resume/{name}"] = (straight, resumed, steps)


def _state_snapshot(opt: Any) -> list[torch.Tensor]:
    snap = []
    for w in opt.windows:
        snap += [w.gram.clone(), getattr(w, "grads", torch.zeros(0)).clone()]
    for s in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in s:
                snap.append(s[key].to_local().clone())
    return snap


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _scenario_refusals(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    w = torch.randn(4, 6)
    msgs = {}
    for label, placements, m in (
        ("shard1", [Shard(1)], mesh),
        ("replicate", [Replicate()], mesh),
        ("mesh2d", [Shard(0), Shard(0)], init_device_mesh("cpu", (1, WORLD))),
    ):
        p = nn.Parameter(distribute_tensor(w.clone(), m, placements))
        for rule in ("MFAC", "MFACSGD"):
            try:
                getattr(mfac, rule)([p], lr=0.1)
                msgs[f"{rule}/{label}"] = None
            except ValueError as exc:
                msgs[f"{rule}/{label}"] = str(exc)
    try:  # FSDP2 parameters and a plain one
        mfac.MFAC([*_sharded().parameters(), nn.Parameter(torch.zeros(3))])
        msgs["mixed"] = None
    except ValueError as exc:
        msgs["mixed"] = str(exc)
    out["refusal_msgs"] = msgs

    # add_param_group with a tensor-parallel parameter: refused, the optimizer unchanged
    model = _sharded()
    opt = mfac.MFAC(model.parameters(), lr=1e-2, ngrads=4, share_below=1)
    _train(model, opt, range(2), rank)
    before, groups, windows = _state_snapshot(opt), len(opt.param_groups), list(opt.windows)
    bad = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(1)]))
    try:
        opt.add_param_group({"params": [bad]})
        out["add_group_refused"] = False
    except ValueError:
        out["add_group_refused"] = True
    out["add_group_unchanged"] = (
        _same(before, _state_snapshot(opt))
        and len(opt.param_groups) == groups
        and all(a is b for a, b in zip(windows, opt.windows, strict=True))
    )

    # a load whose rank-1 shard is corrupt: both ranks refuse, nothing changes
    sd = opt.state_dict()
    import copy

    sd = copy.deepcopy(sd)
    if rank == 1:
        sd["state"][0]["window"]["rows"]["0"].to_local()[0, 0, 0] = float("nan")
    params = _full(model)
    try:
        opt.load_state_dict(sd)
        out["load_refused"] = None
    except ValueError as exc:
        out["load_refused"] = str(exc)
    out["load_unchanged"] = _same(before, _state_snapshot(opt)) and _same(params, _full(model))

    # NaN in rank 1's shard of a gradient: both ranks raise, nothing changes
    x, y = _data(0)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    if rank == 1:
        model[0].weight.grad.to_local()[0, 0] = float("nan")
    try:
        opt.step()
        out["nan_raised"] = False
    except NonFiniteGradientError:
        out["nan_raised"] = True
    out["nan_unchanged"] = _same(before, _state_snapshot(opt)) and _same(params, _full(model))


def _scenario_topk_definition(rank: int, out: dict[str, Any]) -> None:
    """The sharded top-k window is P top-k windows over the ranks' pieces whose Gram matrices
    add up: K, G x, G^T c and the error vectors against plain per-piece windows."""
    from torch.distributed.device_mesh import init_device_mesh

    from mfac.operators.fsdp import LocalShardedTopK, local_k, local_shape
    from mfac.operators.topk import TopKSlidingInverseFisher

    mesh = init_device_mesh("cpu", (WORLD,))
    shapes = [(7, 5), (3,)]
    dim, m, k = 38, 3, 9
    win = LocalShardedTopK(shapes, m, k, None, torch.float32, mesh)
    sizes = [
        sum(torch.Size(local_shape(s, WORLD, r)).numel() for s in shapes) for r in range(WORLD)
    ]
    pieces = [TopKSlidingInverseFisher(c, m, local_k(k, c, dim), None) for c in sizes]

    def piece_of(v: torch.Tensor, r: int) -> torch.Tensor:  # v: flat params' concatenation
        parts, off = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            lo = min(s[0], r * -(-s[0] // WORLD))
            hi = min(s[0], lo + -(-s[0] // WORLD))
            row = n // s[0]
            parts.append(v[off + lo * row : off + hi * row])
            off += n
        return torch.cat(parts)

    ok = True
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        g, x = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
        gx = win.push_gather(piece_of(g, rank), piece_of(x, rank))
        want = sum(pc.push_gather(piece_of(g, r), piece_of(x, r)) for r, pc in enumerate(pieces))
        ok &= torch.allclose(gx, want, rtol=1e-6, atol=1e-9)
        ok &= torch.allclose(win.gram, sum(pc.gram for pc in pieces), rtol=1e-6, atol=1e-9)
        ok &= torch.equal(win.error, pieces[rank].error)
        c = torch.randn(m, generator=gen, dtype=torch.float64)
        ok &= torch.allclose(win.scatter(c), pieces[rank].scatter(c), rtol=1e-6, atol=1e-7)
    out["topk_definition"] = bool(ok)
    out["topk_k"] = (win.k, win.k_ranks)


def _scenario_batched(rank: int, out: dict[str, Any]) -> None:
    """push_gather_all (one all-reduce for several windows) against one push_gather per
    window; a NaN in one rank's piece of one window: every rank raises, no window changes."""
    from torch.distributed.device_mesh import init_device_mesh

    from mfac.operators.fsdp import LocalShardedInverseFisher, push_gather_all

    mesh = init_device_mesh("cpu", (WORLD,))
    shapes = [[(5, 3)], [(4,)], [(1, 2)]]  # the last leaves rank 1 without coordinates
    wins = [LocalShardedInverseFisher(s, 3, None, torch.float32, mesh) for s in shapes]
    twins = [LocalShardedInverseFisher(s, 3, None, torch.float32, mesh) for s in shapes]
    gen = torch.Generator().manual_seed(7 + rank)
    ok = True
    for _ in range(4):
        gs = [torch.randn(w.dim, generator=gen) for w in wins]
        xs = [torch.randn(w.dim, generator=gen) for w in wins]
        got = push_gather_all(wins, gs, xs)
        want = [w.push_gather(g, x) for w, g, x in zip(twins, gs, xs, strict=True)]
        pairs = zip(got, want, strict=True)
        ok &= all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in pairs)
        ok &= all(torch.equal(a.gram, b.gram) for a, b in zip(wins, twins, strict=True))
    out["batched_equal"] = bool(ok)
    before = [(w.gram.clone(), w.grads.clone(), w.num_pushed) for w in wins]
    gs = [torch.randn(w.dim) for w in wins]
    if rank == 1:
        gs[1][0] = float("nan")
    try:
        push_gather_all(wins, gs, [torch.ones(w.dim) for w in wins])
        out["batched_nan_raised"] = False
    except NonFiniteGradientError:
        out["batched_nan_raised"] = True
    out["batched_nan_unchanged"] = all(
        torch.equal(w.gram, g) and torch.equal(w.grads, r) and w.num_pushed == n
        for w, (g, r, n) in zip(wins, before, strict=True)
    )


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    with gloo_group(rank, WORLD, tmp):
        try:
            for scenario in (
                lambda: _scenario_steps(rank, out),
                lambda: _scenario_resume(rank, out, tmp),
                lambda: _scenario_refusals(rank, out),
                lambda: _scenario_topk_definition(rank, out),
                lambda: _scenario_batched(rank, out),
            ):
                scenario()
        except Exception:
            out["error"] = traceback.format_exc()
        finally:
            torch.save(out, Path(tmp) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker, args=(tmp,), nprocs=WORLD, join=False, start_method="spawn"
        )
        import time

        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {WORLD} FSDP2 workers did not finish in {TIMEOUT_S} s")
        outs = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, o in enumerate(outs):
        assert "error" not in o, f"rank {r}:\n{o['error']}"
    return outs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp_equals_one_process(results: list[dict[str, Any]], name: str) -> None:
    ref = results[0][f"ref/{name}"]
    for r in range(WORLD):
        got = results[r][f"steps/{name}"]
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ranks = [out[f"steps/{name}"] for out in results]
    assert all(torch.equal(a, b) for a, b in zip(*ranks, strict=True))  # every rank the same


def test_window_checkpoint_is_sharded(results: list[dict[str, Any]]) -> None:
    for r, out in enumerate(results):
        rows = out["window_rows"]
        assert rows["type"] == "DTensor"
        assert rows["placements"] == "(Shard(dim=1),)"
        assert rows["global"] == (4, 9, 6)  # (m, *shape) of the first weight
        assert rows["local"] == (4, 5 - r, 6)  # this rank's rows of it only


def test_memory_check_counts_gathered_matrices_whole(results: list[dict[str, Any]]) -> None:
    """Each rank gathers an orthogonalized matrix whole for Newton-Schulz: the memory check
    counts the whole (9, 6) and (3, 9) matrices on every rank, not the rank's rows."""
    for out in results:
        assert out["memory_check_sizes"] == [54, 27]


@pytest.mark.parametrize("name", list(RESUME))
def test_dcp_resume_bit_identical(results: list[dict[str, Any]], name: str) -> None:
    for out in results:
        straight, resumed, steps = out[f"resume/{name}"]
        assert steps == 3
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_unsupported_placements_refused_by_name(results: list[dict[str, Any]]) -> None:
    msgs = results[0]["refusal_msgs"]
    for rule in ("MFAC", "MFACSGD"):
        assert "Shard(dim=1)" in msgs[f"{rule}/shard1"] and rule in msgs[f"{rule}/shard1"]
        assert "Replicate()" in msgs[f"{rule}/replicate"]
        assert "2-D device mesh" in msgs[f"{rule}/mesh2d"]
    assert "plain tensor" in msgs["mixed"]


def test_refusals_leave_state_unchanged(results: list[dict[str, Any]]) -> None:
    for r, out in enumerate(results):
        assert out["add_group_refused"] and out["add_group_unchanged"]
        assert out["load_refused"] is not None and out["load_unchanged"]
        want = "rows contains NaN" if r == 1 else "another rank refused"
        assert want in out["load_refused"]
        assert out["nan_raised"] and out["nan_unchanged"]


def test_sharded_topk_is_per_shard_topk(results: list[dict[str, Any]]) -> None:
    for out in results:
        assert out["topk_definition"]
    assert results[0]["topk_k"] == (6, [6, 4])  # ceil(9 * 22 / 38), ceil(9 * 16 / 38)


def test_one_all_reduce_for_all_windows(results: list[dict[str, Any]]) -> None:
    for out in results:
        assert out["batched_equal"]
        assert out["batched_nan_raised"] and out["batched_nan_unchanged"]
