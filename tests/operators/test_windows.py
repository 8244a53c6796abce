"""The SlidingWindow contract, over every window: dense (float32, bfloat16, float64), top-k
(torch path and, where it builds, the C path; float32 and bfloat16 values) and sharded (a
one-rank gloo group), each damped and undamped.

Every product is checked against a dense float64 oracle built from the rows the window stores
(the rounded rows of a low-precision window, the compressed rows of a top-k window): push,
push_gather, gather, scatter, ihvp and push_ihvp, over wrap-around; K against the stored rows;
the ring pointer; top-k's error feedback; the state round trip (bit-identical continuation, a
corrupted state refused with nothing changed); undamped windows refusing ihvp and push_ihvp.
Then the O(m^2) update of K^-1 over thousands of wrap-arounds, and the sort-free top-k
selection."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac.operators import SlidingInverseFisher, SlidingWindow, TopKSlidingInverseFisher
from mfac.operators.gram import GramFactor
from mfac.operators.sharded import ShardedSlidingInverseFisher
from mfac.operators.window import make_window
from mfac.optim import MFAC, MFACSGD

from oracle import assert_state_equal, dense_inverse_fisher, hard_vector, rel_err

F64 = torch.float64
BF16 = torch.bfloat16
DAMP = 1e-2
PROTOCOL_MEMBERS = (
    "dim", "window", "damp", "gram", "device", "dtype", "num_pushed", "filled", "next_slot",
    "nbytes", "push", "push_ihvp", "push_gather", "gather", "scatter", "ihvp", "state_dict",
    "check_state", "load_state_dict",
)  # fmt: skip
NATIVE = TopKSlidingInverseFisher.native_for(torch.float32)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A one-rank gloo group, so the sharded window can be built in this process."""
    if dist.is_initialized():  # pragma: no cover - another test left one
        yield dist.group.WORLD
        return
    store = Path(tmp_path_factory.mktemp("dist")) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _topk(dtype: torch.dtype, native: bool) -> Callable[..., SlidingWindow]:
    def build(dim: int, m: int, damp: float | None, group: object) -> SlidingWindow:
        w = TopKSlidingInverseFisher(dim, m, max(1, dim // 3), damp, dtype)
        if not native:
            w.to_torch_path()
        assert w.native == native
        return w

    return build


#: name -> (build(dim, m, damp, group), relative tolerance of the products against the oracle)
WINDOWS: dict[str, tuple[Callable[..., SlidingWindow], float]] = {
    "dense-f32": (lambda d, m, damp, g: SlidingInverseFisher(d, m, damp), 1e-5),
    "dense-bf16": (lambda d, m, damp, g: SlidingInverseFisher(d, m, damp, BF16), 1e-5),
    "dense-f64": (lambda d, m, damp, g: SlidingInverseFisher(d, m, damp, F64), 1e-10),
    "topk-torch": (_topk(torch.float32, False), 1e-5),
    "topk-torch-bf16": (_topk(BF16, False), 1e-5),
    "sharded": (
        lambda d, m, damp, g: ShardedSlidingInverseFisher(d, m, damp, torch.float32, g),
        1e-5,
    ),
}
if NATIVE:
    WINDOWS["topk-c"] = (_topk(torch.float32, True), 1e-5)
    WINDOWS["topk-c-bf16"] = (_topk(BF16, True), 1e-5)
CASES = [(name, damp) for name in WINDOWS for damp in (DAMP, None)]
IDS = [f"{name}-{'damped' if damp else 'undamped'}" for name, damp in CASES]


def build(name: str, dim: int, m: int, damp: float | None, group: object) -> SlidingWindow:
    return WINDOWS[name][0](dim, m, damp, group)


def stored_rows(w: SlidingWindow) -> torch.Tensor:
    """The rows the window holds, dense, float64 (m x d): the oracle's G."""
    if isinstance(w, TopKSlidingInverseFisher):
        return w.dense_rows().to(F64)
    return w.grads.to(F64)  # a one-rank sharded window holds every column


def gram_oracle(w: SlidingWindow, rows: torch.Tensor) -> torch.Tensor:
    k = rows @ rows.T
    if w.damp is not None:
        k += w.window * w.damp * torch.eye(w.window, dtype=F64)
    return k


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert rel_err(got, want) <= tol, (what, rel_err(got, want))


def close_product(got: torch.Tensor, want: torch.Tensor, scale: float, tol: float, what: str):
    """A product's error against the size of its factors (|G| |x|): rounding in a dot product
    is relative to the terms summed, not to a sum that may cancel."""
    err = float((got.to(F64) - want).norm())
    assert err <= tol * max(scale, 1e-300), (what, err / max(scale, 1e-300))


def vector(dim: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A gradient as the optimizers hand it over (float32; float64 for a float64 window)."""
    return torch.randn(dim, generator=gen, dtype=F64).to(dtype)


# ---------------------------------------------------------------------- the contract
@pytest.mark.parametrize(("name", "damp"), CASES, ids=IDS)
def test_every_window_satisfies_the_protocol(group: object, name: str, damp: float | None) -> None:
    w = build(name, 7, 3, damp, group)
    assert isinstance(w, SlidingWindow)
    for member in PROTOCOL_MEMBERS:
        assert hasattr(w, member), member
    assert (w.dim, w.window, w.num_pushed, w.filled, w.next_slot) == (7, 3, 0, 0, 0)
    assert w.damp == damp and w.device == torch.device("cpu") and w.nbytes > 0
    assert tuple(w.gram.shape) == (3, 3) and w.gram.dtype == F64
    close(w.gram, gram_oracle(w, torch.zeros(3, 7, dtype=F64)), 0.0, "empty K")
    assert repr(w)  # an undamped window's repr included


def test_optimizers_and_factory_build_windows(group: object) -> None:
    assert not isinstance(GramFactor(3, 1e-2, "cpu"), SlidingWindow)
    p = torch.nn.Parameter(torch.zeros(4))
    assert isinstance(MFACSGD([p], ngrads=2).window, SlidingWindow)
    assert all(isinstance(w, SlidingWindow) and w.damp is None for w in MFAC([p]).windows)
    built = {
        "dense": make_window(9, 3, None, dtype=BF16),
        "topk": make_window(9, 3, 1e-3, layout="topk", topk=2),
        "sharded": make_window(9, 3, 1e-3, process_group=group),
    }
    assert type(built["dense"]) is SlidingInverseFisher and built["dense"].dtype == BF16
    assert type(built["topk"]) is TopKSlidingInverseFisher and built["topk"].k == 2
    assert type(built["sharded"]) is ShardedSlidingInverseFisher
    with pytest.raises(ValueError, match="layout"):
        make_window(9, 3, None, layout="lowrank")
    with pytest.raises(ValueError, match="needs topk"):
        make_window(9, 3, None, layout="topk")
    with pytest.raises(NotImplementedError, match="sharded"):
        make_window(9, 3, None, layout="topk", topk=2, process_group=group)


#: (m, d): one slot, rows linearly dependent (d < m), and the generic case. Few shapes: the
#: bfloat16 passes with two vectors are compiled (torch.compile) once per shape.
SHAPES = [(1, 6), (4, 2), (3, 11)]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES))
@pytest.mark.parametrize(("name", "damp"), CASES, ids=IDS)
def test_every_window_matches_the_dense_oracle(
    group: object, name: str, damp: float | None, seed: int, shape: tuple[int, int]
) -> None:
    """Over 2m + 2 pushes (wrap-around), through push, push_gather and push_ihvp in turn:
    K is the Gram matrix of the stored rows (+ m damp I), the ring advances, and gather,
    push_gather, scatter (with out and plus), ihvp and push_ihvp equal the float64 oracle
    built from the stored rows; top-k's error feedback loses nothing."""
    m, dim = shape
    w = build(name, dim, m, damp, group)
    tol = WINDOWS[name][1]
    dtype = F64 if w.dtype == F64 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    topk = isinstance(w, TopKSlidingInverseFisher)
    fed = torch.zeros(dim, dtype=F64)  # every gradient pushed, summed
    kept = torch.zeros(dim, dtype=F64)  # every row stored, summed
    fed_size = 0.0
    for t in range(2 * m + 2):
        g = vector(dim, dtype, gen) * 10.0 ** (t % 3 - 1)
        x = vector(dim, dtype, gen)
        slot = w.next_slot
        kind = ("push", "push_gather", "push_ihvp")[t % 3]
        if kind == "push_ihvp" and damp is None:
            kind = "push"
        if kind == "push":
            w.push(g)
        elif kind == "push_gather":
            products = w.push_gather(g, x)
        else:
            step = w.push_ihvp(g)
        rows = stored_rows(w)
        fed += g.to(F64)
        fed_size += float(g.norm())
        kept += rows[slot]
        assert (w.num_pushed, w.next_slot, w.filled) == (t + 1, (t + 1) % m, min(t + 1, m))
        if not topk:  # the new row is g as stored
            close(rows[slot], g.to(w.dtype).to(F64), 0.0, "stored row")
        else:
            assert int((rows[slot] != 0).sum()) <= w.k
            # float32 rounding accumulates with every gradient fed: bound it by their sizes
            close_product(kept + w.error.to(F64), fed, fed_size, 1e-6, "error feedback")
        close(w.gram, gram_oracle(w, rows), 1e-6 if w.dtype != F64 else 1e-12, "K")
        want_gx = rows @ x.to(F64)
        size = float(rows.norm())
        if kind == "push_gather":
            assert products.dtype == F64 and products.shape == (m,)
            close_product(products, want_gx, size * float(x.norm()), tol, "push_gather")
        close_product(w.gather(x), want_gx, size * float(x.norm()), tol, "gather")
        c = torch.randn(m, generator=gen, dtype=F64)
        plus = torch.randn(dim, generator=gen).to(dtype)
        close_product(w.scatter(c), rows.T @ c, size * float(c.norm()), tol, "scatter")
        out = torch.empty(dim, dtype=dtype)
        got = w.scatter(c, out=out, plus=plus)
        assert got.data_ptr() == out.data_ptr()
        scale = size * float(c.norm()) + float(plus.norm())
        close_product(out, rows.T @ c + plus.to(F64), scale, tol, "scatter(out, plus)")
        if damp is None:
            continue
        oracle = dense_inverse_fisher(rows, damp)
        if kind == "push_ihvp":  # F^-1 of the row as stored
            step_tol = 1e-4 if w.dtype != F64 else 1e-9
            if dim <= m:  # dependent rows: G^T c cancels (SlidingInverseFisher.push_ihvp)
                step_tol *= 50
            close(step, oracle @ rows[slot], step_tol, "push_ihvp")
        if dim > m:  # generic x: no cancellation in (x - G^T K^-1 G x) / damp
            close(w.ihvp(x), oracle @ x.to(F64), 1e-4 if w.dtype != F64 else 1e-9, "ihvp")


@pytest.mark.parametrize(("name", "damp"), CASES, ids=IDS)
def test_state_round_trip_is_bit_identical(group: object, name: str, damp: float | None) -> None:
    """A saved window (deep-copied, as torch.save would) loads into a fresh one, and both
    continue bit for bit; the given state's fields the window did not adopt (see
    test_a_full_window_adopts_the_loaded_rows) are not written to."""
    dim, m = 12, 3
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(dim, generator=gen) for _ in range(2 * m + 3)]
    w = build(name, dim, m, damp, group)
    for g in grads[:4]:
        w.push(g)
    saved = copy.deepcopy(w.state_dict())
    kept = copy.deepcopy(saved)
    w.check_state(saved)
    other = build(name, dim, m, damp, group)
    other.push(torch.ones(dim))
    other.load_state_dict(saved)
    assert (other.num_pushed, other.next_slot) == (w.num_pushed, w.next_slot)
    x = torch.randn(dim, generator=gen)
    for g in grads[4:]:
        a, b = w.push_gather(g, x), other.push_gather(g, x)
        assert torch.equal(a, b)
        assert torch.equal(w.scatter(a), other.scatter(b))
        if damp is not None:
            assert torch.equal(w.ihvp(x), other.ihvp(x))
    assert torch.equal(w.gram, other.gram) and torch.equal(stored_rows(w), stored_rows(other))
    adopted = adopted_fields(other, saved)
    for key, value in kept.items():
        if isinstance(value, torch.Tensor):
            assert key in adopted or torch.equal(value, saved[key]), key
        else:
            assert value == saved[key], key


def buffers(w: SlidingWindow) -> list[torch.Tensor]:
    """The tensors a window holds (on the C path also its layout's)."""
    rows = vars(w).get("rows")
    own = [*vars(w).values(), *(vars(rows).values() if rows is not None else ())]
    return [t for t in own if isinstance(t, torch.Tensor)]


def adopted_fields(w: SlidingWindow, state: dict) -> set[str]:
    """The fields of ``state`` whose tensors are the window's own buffers (same memory)."""
    live = {t.data_ptr() for t in buffers(w) if t.numel()}
    return {
        key for key, t in state.items() if isinstance(t, torch.Tensor) and t.data_ptr() in live
    }  # fmt: skip


def expected_adoption(w: SlidingWindow, full: bool = True) -> set[str]:
    """What a window adopts: a full window's rows (the C path's whole layout; a sharded
    window saves all m rows of its shard, filled or not), and a top-k window's error vector."""
    if not isinstance(w, TopKSlidingInverseFisher):
        return {"grads"} if full or isinstance(w, ShardedSlidingInverseFisher) else set()
    rows = {"values", "indices"} | ({"starts", "block_of"} if w.native else set())
    return {"error"} | (rows if full else set())


@pytest.mark.parametrize(("name", "damp"), CASES, ids=IDS)
def test_a_full_window_adopts_the_loaded_rows(
    group: object, name: str, damp: float | None, tmp_path: Path
) -> None:
    """A window allocates its rows on first use, and a full window's saved rows (and a top-k
    window's error vector) become the loading window's own buffers, not copies: a resume
    holds one copy of the window. A partly filled
    state's rows are copied, and so is every tensor of a state mapped from its file
    (``torch.load(mmap=True)``); all three continue as the saving window does."""
    dim, m = 12, 3
    gen = torch.Generator().manual_seed(2)
    w = build(name, dim, m, damp, group)
    for _ in range(m - 1):
        w.push(torch.randn(dim, generator=gen))
    partial_state = copy.deepcopy(w.state_dict())
    partial = build(name, dim, m, damp, group)
    partial.load_state_dict(partial_state)
    assert adopted_fields(partial, partial_state) == expected_adoption(partial, full=False)
    w.push(torch.randn(dim, generator=gen))
    path = tmp_path / "window.pt"
    torch.save(w.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    other = build(name, dim, m, damp, group)
    assert not {"grads", "values", "rows"} & set(vars(other))  # no rows before first use
    other.load_state_dict(loaded)
    assert adopted_fields(other, loaded) == expected_adoption(other)
    mapped = torch.load(path, weights_only=True, mmap=True)
    third = build(name, dim, m, damp, group)
    third.load_state_dict(mapped)
    assert adopted_fields(third, mapped) == set()
    x = torch.randn(dim, generator=gen)
    for _ in range(2):
        g = torch.randn(dim, generator=gen)
        want = w.push_gather(g, x)
        for resumed in (other, third):
            assert torch.equal(resumed.push_gather(g, x), want)


@pytest.mark.parametrize(("name", "damp"), CASES, ids=IDS)
def test_window_nbytes_before_first_use_is_what_the_rows_take(
    group: object, name: str, damp: float | None
) -> None:
    """``window_nbytes`` is counted from the window's description before its rows exist; it
    is the bytes of the rows once allocated (the C path's whole layout, offsets included)."""
    w = build(name, 40, 3, damp, group)
    before = w.window_nbytes
    w.push(torch.randn(40, generator=torch.Generator().manual_seed(4)))
    if isinstance(w, TopKSlidingInverseFisher):
        held = w.rows.nbytes if w.native else sum(
            t.numel() * t.element_size() for t in (w.values, w.indices)
        )  # fmt: skip
    else:
        held = w.grads.numel() * w.grads.element_size()
    assert before == w.window_nbytes == held


@pytest.mark.parametrize("kind", ["dense", "topk", "sharded"])
def test_a_window_on_a_named_device_index_lives_where_its_tensors_report(
    group: object, kind: str
) -> None:
    """``device="cpu:0"`` (as ``"cuda"`` on a GPU): the window reports the device its tensors
    report (``cpu``), before its rows exist too, so it takes gradients from there and adopts
    a full state's rows (its device checks compare with what tensors say)."""
    dim, m = 12, 2
    builders = {
        "dense": lambda: SlidingInverseFisher(dim, m, DAMP, device="cpu:0"),
        "topk": lambda: TopKSlidingInverseFisher(dim, m, 4, DAMP, device="cpu:0"),
        "sharded": lambda: ShardedSlidingInverseFisher(
            dim, m, DAMP, torch.float32, group, device="cpu:0"
        ),
    }
    w = builders[kind]()
    assert w.device == torch.device("cpu")
    gen = torch.Generator().manual_seed(5)
    for _ in range(m):
        w.push(torch.randn(dim, generator=gen))
    state = copy.deepcopy(w.state_dict())
    other = builders[kind]()
    other.load_state_dict(state)
    assert adopted_fields(other, state) == expected_adoption(other)


@pytest.mark.parametrize("native", [False, True] if NATIVE else [False])
def test_adopted_topk_buffers_get_the_huge_page_advice(native: bool, monkeypatch) -> None:
    """The buffers a top-k window adopts from a loaded state are advised to use huge pages,
    by the one helper the block operators' stores use (``static.advise_huge_pages``), as its
    own buffers are when allocated; which are file pages is read from one map list."""
    from mfac.operators import topk

    dim, m = 40, 3
    gen = torch.Generator().manual_seed(3)
    w = TopKSlidingInverseFisher(dim, m, 5, DAMP)
    if not native:
        w.to_torch_path()
    for _ in range(m):
        w.push(torch.randn(dim, generator=gen))
    state = copy.deepcopy(w.state_dict())
    advised: list[int] = []
    monkeypatch.setattr(topk, "advise_huge_pages", lambda t: advised.append(t.data_ptr()))
    other = TopKSlidingInverseFisher(dim, m, 5, DAMP)
    if not native:
        other.to_torch_path()
    reads = []
    real = topk.FileMappings.__init__

    def counted(self) -> None:
        reads.append(1)
        real(self)

    monkeypatch.setattr(topk.FileMappings, "__init__", counted)
    other.load_state_dict(state)
    assert len(reads) == 1  # /proc/self/maps read once for the rows and the error vector
    assert other.error.data_ptr() == state["error"].data_ptr()
    want = {state["error"].data_ptr()}
    if native:
        want |= {state["values"].data_ptr(), state["indices"].data_ptr()}
    assert set(advised) == want


@pytest.mark.parametrize(("name", "damp"), CASES, ids=IDS)
def test_results_are_tensors_of_their_own(group: object, name: str, damp: float | None) -> None:
    """A returned product is not a view of a buffer the window reuses: the next call leaves
    it as it was (the sharded window's all-gather buffer once aliased its results)."""
    dim, m = 10, 3
    gen = torch.Generator().manual_seed(3)
    w = build(name, dim, m, damp, group)
    for _ in range(2):
        w.push(torch.randn(dim, generator=gen))
    x, c = torch.randn(dim, generator=gen), torch.randn(m, generator=gen, dtype=F64)
    results = [w.gather(x), w.scatter(c), w.push_gather(torch.randn(dim, generator=gen), x)]
    if damp is not None:
        results += [w.ihvp(x), w.push_ihvp(torch.randn(dim, generator=gen))]
    kept = [r.clone() for r in results]
    w.gather(-x)
    w.scatter(-c)
    w.push_gather(torch.randn(dim, generator=gen), -x)
    if damp is not None:
        w.ihvp(-x)
        w.push_ihvp(torch.randn(dim, generator=gen))
    for i, (r, k) in enumerate(zip(results, kept, strict=True)):
        assert torch.equal(r, k), i


@pytest.mark.skipif(not NATIVE, reason="the top-k C path does not build here")
@pytest.mark.parametrize("damp", [DAMP, None])
def test_topk_states_load_across_paths(damp: float | None) -> None:
    """A top-k state saved on the C path loads into a torch-path window and back, and the
    two continue with the same products (the same rows and K, by other kernels)."""
    dim, m, k = 40, 3, 7
    gen = torch.Generator().manual_seed(4)
    c_path = TopKSlidingInverseFisher(dim, m, k, damp)
    for _ in range(4):
        c_path.push(torch.randn(dim, generator=gen))
    torch_path = TopKSlidingInverseFisher(dim, m, k, damp)
    torch_path.to_torch_path()
    torch_path.load_state_dict(copy.deepcopy(c_path.state_dict()))
    assert torch.equal(torch_path.dense_rows(), c_path.dense_rows())
    back = TopKSlidingInverseFisher(dim, m, k, damp)
    back.load_state_dict(copy.deepcopy(torch_path.state_dict()))
    assert back.native and torch.equal(back.dense_rows(), c_path.dense_rows())
    x = torch.randn(dim, generator=gen)
    for _ in range(3):
        g = torch.randn(dim, generator=gen)
        got = [w.push_gather(g, x) for w in (c_path, torch_path, back)]
        torch.testing.assert_close(got[1], got[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(got[2], got[0])
    torch.testing.assert_close(torch_path.gram, c_path.gram, rtol=1e-6, atol=1e-6)


def _corrupt_gram_shape(state: dict) -> None:
    state["gram"] = state["gram"][:-1, :-1].clone()


def _corrupt_gram_nan(state: dict) -> None:
    state["gram"] = state["gram"].clone()
    state["gram"][0, 0] = float("nan")


def _corrupt_damp(state: dict) -> None:
    state["damp"] = 1.0 if state["damp"] is None else None


def _corrupt_pointer(state: dict) -> None:
    state["next_slot"] = (state["next_slot"] + 1) % 3


def _corrupt_stale(state: dict) -> None:
    """A stored row edited after K was formed (the sharded window cannot see this rank-local)."""
    key = "grads" if "grads" in state else "values"
    state[key] = state[key].clone() * 2


CORRUPTIONS = {
    "gram shape": (_corrupt_gram_shape, "gram"),
    "gram NaN": (_corrupt_gram_nan, "gram"),
    "damp": (_corrupt_damp, "damp"),
    "pointer": (_corrupt_pointer, "next_slot"),
    "stale": (_corrupt_stale, "stale"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize(("name", "damp"), CASES, ids=IDS)
def test_a_corrupted_state_is_refused_and_nothing_changes(
    group: object, name: str, damp: float | None, corruption: str
) -> None:
    if corruption == "stale" and name == "sharded":
        pytest.skip("the sharded window's check is rank-local: K against G needs every rank")
    edit, word = CORRUPTIONS[corruption]
    dim, m = 12, 3
    gen = torch.Generator().manual_seed(2)
    source, target = build(name, dim, m, damp, group), build(name, dim, m, damp, group)
    for t in range(5):
        source.push(torch.randn(dim, generator=gen))
        if t < 2:
            target.push(torch.randn(dim, generator=gen))
    state = copy.deepcopy(source.state_dict())
    edit(state)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises((ValueError, TypeError, KeyError), match=word):
        target.check_state(state)
    with pytest.raises((ValueError, TypeError, KeyError), match=word):
        target.load_state_dict(state)
    after = target.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


@pytest.mark.parametrize("name", list(WINDOWS))
def test_an_undamped_window_refuses_ihvp_and_changes_nothing(group: object, name: str) -> None:
    """damp=None keeps G G^T and no inverse: ihvp and push_ihvp raise RuntimeError, and
    push_ihvp refuses before it pushes."""
    w = build(name, 6, 2, None, group)
    w.push(torch.randn(6))
    before = copy.deepcopy(w.state_dict())
    assert before["damp"] is None and before["inverse"].numel() == 0
    with pytest.raises(RuntimeError, match="without damping"):
        w.ihvp(torch.randn(6))
    with pytest.raises(RuntimeError, match="without damping"):
        w.push_ihvp(torch.randn(6))
    assert w.num_pushed == 1
    assert_state_equal(before, w.state_dict())


@pytest.mark.parametrize("name", [n for n in WINDOWS if n != "dense-f64"])
def test_a_nonfinite_gradient_is_refused_and_nothing_changes(group: object, name: str) -> None:
    from mfac import NonFiniteGradientError

    w = build(name, 8, 3, DAMP, group)
    w.push(torch.randn(8))
    before = copy.deepcopy(w.state_dict())
    bad = torch.randn(8)
    bad[3] = float("nan")
    for call in (w.push, w.push_ihvp, lambda g: w.push_gather(g, torch.ones(8))):
        with pytest.raises(NonFiniteGradientError):
            call(bad)
    assert_state_equal(before, w.state_dict())


# ---------------------------------------------------------------------- the dense update
def test_inverse_update_exact_over_thousands_of_wraparounds() -> None:
    """K^-1 is updated in O(m^2) per push and refactored once per pass of the ring: after
    1500 wrap-arounds it still equals the inverse of K, K equals a fresh Gram matrix, and each
    step equals the float64 oracle (gradients of very different sizes)."""
    m, dim, damp = 8, 30, 1e-3
    op = SlidingInverseFisher(dim, m, damp)
    gen = torch.Generator().manual_seed(0)
    pushes = 1500 * m + 3
    for t in range(pushes):
        scale = 10.0 ** float(torch.randint(-3, 3, (1,), generator=gen))
        g = torch.randn(dim, generator=gen) * scale
        y = op.push_ihvp(g)
        if t % 997 == 0 or t == pushes - 1:
            want = dense_inverse_fisher(op.grads, damp) @ g.double()
            assert rel_err(y, want) < 1e-5, t
    assert op.num_pushed == pushes and op.next_slot == pushes % m
    # about one refactorisation per pass of the ring, not one per push
    assert op.factor.refactors <= pushes // m + pushes // 50
    fresh = op.grads.double() @ op.grads.double().T
    fresh.diagonal().add_(m * damp)
    assert rel_err(op.gram, fresh) < 1e-6
    # K^-1 is the inverse of K: backward residual at float64 rounding, forward within cond*eps
    eye = torch.eye(m, dtype=F64)
    backward = (op.gram @ op.inverse - eye).norm() / (op.gram.norm() * op.inverse.norm())
    assert float(backward) < 1e-13
    assert rel_err(op.inverse, torch.linalg.inv(op.gram)) < 1e-7


def test_update_matches_refactor_each_push() -> None:
    """The O(m^2) update gives the same inverse as refactoring K from scratch at every push."""
    m, dim, damp = 6, 20, 1e-2
    op = SlidingInverseFisher(dim, m, damp, dtype=F64)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5 * m):
        op.push(torch.randn(dim, dtype=F64, generator=gen))
        exact = torch.cholesky_inverse(torch.linalg.cholesky(op.gram))
        assert rel_err(op.inverse, exact) < 1e-11


# ---------------------------------------------------------------------- top-k selection
@settings(max_examples=20, deadline=None)
@given(
    d=st.integers(70_000, 300_000),
    density=st.sampled_from([0.0001, 0.001, 0.01, 0.1, 0.24]),
    kind=st.sampled_from(["normal", "ties", "sparse", "sorted", "spike"]),
    seed=st.integers(0, 2**16),
)
def test_sort_free_topk_selection_is_exact(d: int, density: float, kind: str, seed: int) -> None:
    """topk_indices returns k distinct indices whose values are the k largest (ties may be
    broken either way): the smallest kept value is >= the largest dropped one."""
    from mfac.operators.topk import topk_indices

    x = hard_vector(d, kind, torch.Generator().manual_seed(seed)).abs()
    k = max(1, round(density * d))
    idx = topk_indices(x, k)
    assert idx.numel() == k and idx.unique().numel() == k
    kept = torch.zeros(d, dtype=torch.bool)
    kept[idx] = True
    if k < d:
        assert float(x[kept].min()) >= float(x[~kept].max())
