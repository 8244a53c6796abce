"""The one gradient collector (mfac.operators.gradients) against a float64 autograd loop:
per-example and per-batch rows, tuple / dict / list-of-batches data, masked and padded layouts,
tied weights, the refusals, and a model left bit for bit as it was."""

from __future__ import annotations

import ast
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mfac
from mfac.operators import FlatLayout, ModelGradients, collect_gradients
from mfac.operators.gradients import batches_of, count_examples, resolve_params, slice_batch

F64 = torch.float64
ce = nn.functional.cross_entropy


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 6)
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)
        self.tied = self.out  # a second name for the same module: tied weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.emb(x))))


def tuple_loss(model, batch):
    x, y = batch
    return ce(model(x), y)


def dict_loss(model, batch):
    return ce(model(batch["x"]), batch["y"])


def make(seed=0, n=12):
    torch.manual_seed(seed)
    model = Net().double().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, x, y


def loop_rows(model, x, y, names, per_batch=None):
    """Oracle: per-example (or per-batch) gradients by a plain autograd loop."""
    params = dict(model.named_parameters())
    spans = per_batch or [(i, i + 1) for i in range(x.shape[0])]
    rows = []
    for a, b in spans:
        gs = torch.autograd.grad(ce(model(x[a:b]), y[a:b]), [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.sampled_from(["tuple", "dict", "list"]))
def test_per_example_rows_equal_the_autograd_loop(num, chunk, form):
    model, x, y = make(1)
    names = [n for n, _ in model.named_parameters()]
    data = {
        "tuple": (x, y),
        "dict": {"x": x, "y": y},
        "list": [(x[i : i + 5], y[i : i + 5]) for i in range(0, 12, 5)],
    }[form]
    loss = dict_loss if form == "dict" else tuple_loss
    before = snapshot(model)
    rows, layout = collect_gradients(model, data, loss, num, dtype=F64, chunk_size=chunk)
    assert layout.names == tuple(names) and layout.dense
    torch.testing.assert_close(
        rows, loop_rows(model, x[:num], y[:num], names), rtol=1e-12, atol=1e-14
    )
    assert same_state(model, before) and all(p.grad is None for p in model.parameters())


def test_per_batch_rows_and_the_train_mode_left_alone():
    model, x, y = make(2)
    model.train()
    names = ["out.weight", "emb.bias"]
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    before = snapshot(model)
    rows, _ = collect_gradients(
        model, batches, tuple_loss, 3, per_sample=False, params=names, dtype=F64
    )
    assert same_state(model, before)  # BatchNorm's running statistics went to copies
    expect = loop_rows(model, x, y, names, per_batch=[(0, 4), (4, 8), (8, 12)])
    torch.testing.assert_close(rows, expect, rtol=1e-12, atol=1e-14)
    assert model.training
    # eval_mode: eval for the duration, the mode restored after
    model.eval()
    ref = loop_rows(model, x, y, names, per_batch=[(0, 4)])
    model.train()
    rows, _ = collect_gradients(
        model, batches, tuple_loss, 1, per_sample=False, params=names, dtype=F64, eval_mode=True
    )
    torch.testing.assert_close(rows, ref, rtol=1e-12, atol=1e-14)
    assert model.training


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.0, 1.0), st.one_of(st.none(), st.integers(1, 8)))
def test_masked_rows_are_the_dense_rows_restricted(seed, keep, block):
    model, x, y = make(3)
    names = ["emb.weight", "out.weight", "out.bias"]
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    masks = {n: torch.rand(named[n].shape, generator=gen) < keep for n in names[:2]}
    dense, dense_layout = collect_gradients(model, (x, y), tuple_loss, 7, params=names, dtype=F64)
    rows, layout = collect_gradients(
        model, (x, y), tuple_loss, 7, params=names, masks=masks, block_size=block, dtype=F64
    )
    assert layout.dim == sum(s.size + s.pad for s in layout.segments)
    parts = dense_layout.unflatten(dense)
    expect = layout.flatten([parts[n] for n in names], batched=True)
    assert torch.equal(rows, expect)
    assert bool((rows[:, ~layout.real] == 0).all())
    # the same through the streaming source, row by row on the CPU in float32
    source = ModelGradients(model, tuple_loss, names, masks=masks, block_size=block)
    chunks = list(source.stream(batches_of((x, y), 3), 7, dtype=torch.float32, device="cpu"))
    assert [c.shape[0] for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat(chunks), expect.float())


def test_tied_weights_resolve_to_one_parameter():
    model, x, y = make(4)
    assert "tied.weight" not in dict(model.named_parameters())
    assert resolve_params(model, ["tied.weight", "emb.bias"]) == ["out.weight", "emb.bias"]
    a, la = collect_gradients(model, (x, y), tuple_loss, 4, params=["tied.weight"], dtype=F64)
    b, lb = collect_gradients(model, (x, y), tuple_loss, 4, params=[model.out.weight], dtype=F64)
    assert torch.equal(a, b) and la.names == lb.names == ("out.weight",)
    with pytest.raises(ValueError, match=r"twice \(tied.weight is tied to out.weight\)"):
        resolve_params(model, ["out.weight", "tied.weight"])


def test_refusals_name_their_cause_and_leave_the_model_alone():
    model, x, y = make(5)
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="scalar tensor"):
        collect_gradients(
            model, (x, y), lambda m, b: ce(m(b[0]), b[1], reduction="none"), 4, per_sample=False
        )
    with pytest.raises(ValueError, match="scalar tensor"):
        collect_gradients(model, (x, y), lambda m, b: m(b[0]).sum(0), 4)
    with pytest.raises(mfac.NonFiniteGradientError, match="non-finite loss"):
        collect_gradients(model, (x, y), lambda m, b: tuple_loss(m, b) * float("nan"), 4)
    bad = x.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(mfac.NonFiniteGradientError, match=r"gradients \[2\].*emb.weight"):
        collect_gradients(model, (bad, y), tuple_loss, 4)
    with pytest.raises(TypeError, match="tuple/list of tensors or a dict of tensors, got str"):
        ModelGradients(model, tuple_loss).per_example("not a batch")
    with pytest.raises(TypeError, match="iterable of batches, got int"):
        next(batches_of(3, 2))
    with pytest.raises(ValueError, match="differ in length"):
        slice_batch((x, y[:3]), 0, 2) and count_examples((x, y[:3]))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        collect_gradients(model, (x, y), tuple_loss, 4, params=["nope"])
    with pytest.raises(ValueError, match="fewer than num_grads"):
        collect_gradients(model, (x, y), tuple_loss, 13)
    with pytest.raises(ValueError, match="layout's shapes"):
        ModelGradients(model, tuple_loss, ["out.bias"], layout=FlatLayout(["b"], [(4,)]))
    assert same_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_batch_helpers():
    x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    assert [len(b[0]) for b in batches_of((x, y), 2)] == [2, 2, 1]
    parts = list(batches_of({"x": x, "y": y}, 3))
    assert isinstance(parts[0], dict) and torch.equal(parts[1]["y"], torch.tensor([3, 4]))
    assert count_examples([(x, y), (x[:2], y[:2])]) == 7
    assert isinstance(slice_batch([x, y], 0, 1), list)
    Pair = namedtuple("Pair", "x y")
    cut = slice_batch(Pair(x, y), 1, 3)
    assert isinstance(cut, Pair) and torch.equal(cut.y, torch.tensor([1, 2]))
    assert [len(b) for b in batches_of(x, 4)] == [4, 1]  # a bare tensor is one batch


def test_torch_prune_reparametrisation_is_left_in_place():
    """A module pruned with torch.nn.utils.prune computes ``weight`` in a forward hook: the
    collector puts the module's own tensor back after its functional calls."""
    from torch.nn.utils import prune as torch_prune

    model, x, y = make(6)
    torch_prune.l1_unstructured(model.emb, "weight", amount=0.5)
    kept = model.emb.weight
    rows, layout = collect_gradients(
        model, (x, y), tuple_loss, 3, params=["emb.weight_orig"], dtype=F64
    )
    assert model.emb.weight is kept
    mask = model.emb.weight_mask.bool()
    assert bool((layout.unflatten(rows)["emb.weight_orig"][:, ~mask] == 0).all())


def _relative_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function bodies included
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def test_operators_modules_import_no_cycle():
    """No file-level import cycle inside mfac.operators (imports inside functions count)."""
    root = Path(mfac.operators.__file__).parent
    graph = {p.stem: _relative_imports(p) for p in root.glob("*.py") if p.stem != "__init__"}
    assert "model" not in graph  # the old collector is gone
    assert "static" not in graph["gradients"] and "static" not in graph["layout"]

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt in graph and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert cycles == [], cycles
