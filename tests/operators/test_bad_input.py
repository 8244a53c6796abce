"""Bad input gets a clear error that names the problem, and leaves the operator unchanged."""

from __future__ import annotations

import math

import pytest
import torch

import mfac


def snapshot(op: mfac.SlidingInverseFisher) -> dict:
    return {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in op.state_dict().items()
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize(
    ("grads", "kwargs", "error", "match"),
    [
        (torch.randn(4), {}, ValueError, "m x d"),
        (torch.randn(0, 5), {}, ValueError, "m x d"),
        (torch.ones(3, 4, dtype=torch.int64), {}, TypeError, "dtype"),
        (torch.randn(3, 4), {"damp": 0.0}, ValueError, "damp"),
        (torch.randn(3, 4), {"damp": -1e-3}, ValueError, "damp"),
        (torch.randn(3, 4), {"damp": math.nan}, ValueError, "damp"),
        (torch.randn(3, 4), {"damp": "big"}, TypeError, "damp"),
        (torch.randn(3, 4), {"block_size": 0}, ValueError, "block_size"),
        (torch.randn(3, 4), {"block_size": 2.5}, TypeError, "block_size"),
        (torch.randn(3, 4), {"damp_mode": "percent"}, ValueError, "damp_mode"),
        (torch.randn(4, 3).T, {}, ValueError, "contiguous"),
        ("not a tensor", {}, TypeError, "torch.Tensor"),
    ],
)
def test_static_constructor_errors(grads, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        mfac.InverseFisher(grads, **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_static_nonfinite_rows_named_and_untouched(bad: float) -> None:
    grads = torch.randn(5, 20)
    grads[3, 7] = bad
    before = grads.clone()
    with pytest.raises(mfac.NonFiniteGradientError, match=r"rows \[3\]"):
        mfac.InverseFisher(grads, 1e-3)
    assert torch.equal(grads.nan_to_num(), before.nan_to_num())  # nothing overwritten


def test_static_query_errors_leave_operator_intact() -> None:
    op = mfac.InverseFisher(torch.randn(6, 30), 1e-3, block_size=7)
    x = torch.randn(30)
    before = op.ihvp(x)
    buffer = op.buffer.clone()
    bad_inputs = [
        (torch.randn(29), ValueError, "shape"),
        (torch.randn(30, 2, 2), ValueError, "shape"),
        (torch.ones(30, dtype=torch.int32), TypeError, "dtype"),
        (torch.full((30,), math.nan), mfac.NonFiniteGradientError, "NaN"),
        (torch.randn(30, device="meta"), ValueError, "device"),
    ]
    for value, error, match in bad_inputs:
        with pytest.raises(error, match=match):
            op.ihvp(value)
    with pytest.raises(IndexError, match="coordinates"):
        op.submatrix([0, 30])
    assert torch.equal(op.buffer, buffer)
    assert torch.equal(op.ihvp(x), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 10, "window": 0}, ValueError, "window"),
        ({"dim": 0, "window": 3}, ValueError, "dim"),
        ({"dim": 10, "window": 3, "damp": 0}, ValueError, "damp"),
        ({"dim": 10, "window": 3, "damp": -2.0}, ValueError, "damp"),
        ({"dim": 10, "window": 3, "dtype": torch.int8}, TypeError, "dtype"),
        ({"dim": 10, "window": True}, TypeError, "window"),
    ],
)
def test_sliding_constructor_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        mfac.SlidingInverseFisher(**kwargs)


def test_sliding_bad_pushes_leave_state_unchanged() -> None:
    op = mfac.SlidingInverseFisher(12, 3, 1e-3)
    for _ in range(4):
        op.push(torch.randn(12))
    before = snapshot(op)
    nan = torch.randn(12)
    nan[5] = math.nan
    bad = [
        (nan, mfac.NonFiniteGradientError, "NaN or Inf"),
        (torch.full((12,), math.inf), mfac.NonFiniteGradientError, "NaN or Inf"),
        (torch.randn(13), ValueError, "12 entries"),
        (torch.ones(12, dtype=torch.int64), TypeError, "dtype"),
        (torch.randn(12, device="meta"), ValueError, "device"),
        ([0.0] * 12, TypeError, "torch.Tensor"),
    ]
    for value, error, match in bad:
        for method in (op.push, op.push_ihvp):
            with pytest.raises(error, match=match):
                method(value)
            assert_same(before, snapshot(op))
    with pytest.raises(ValueError, match="shape"):
        op.ihvp(torch.randn(11))
    assert_same(before, snapshot(op))


def test_sliding_lost_definiteness_restores_window() -> None:
    """A real loss of positive definiteness (the same gradient twice at a damping far below
    float64's resolution of |g|^2) is refused, and the window is left as it was."""
    op = mfac.SlidingInverseFisher(8, 3, 1e-300)
    g = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # |g|^2 = 4 = 2^2 exactly
    op.push(g)
    before = snapshot(op)
    with pytest.raises(RuntimeError, match="positive definiteness"):
        op.push(g.clone())
    assert_same(before, snapshot(op))


def test_sliding_failed_factorisation_restores_window(monkeypatch: pytest.MonkeyPatch) -> None:
    op = mfac.SlidingInverseFisher(8, 3, 1e-3)
    op.push(torch.randn(8))
    op.push(torch.randn(8))  # the next push completes a pass of the ring: a full refactor
    before = snapshot(op)

    def broken(matrix: torch.Tensor):
        return matrix, torch.tensor(1)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", broken)
    with pytest.raises(RuntimeError, match="positive definiteness"):
        op.push(torch.randn(8))
    assert_same(before, snapshot(op))


def test_load_state_dict_checks_before_writing() -> None:
    op = mfac.SlidingInverseFisher(8, 3, 1e-3)
    op.push(torch.randn(8))
    before = snapshot(op)
    other = mfac.SlidingInverseFisher(9, 3, 1e-3).state_dict()
    with pytest.raises(ValueError, match="shape"):
        op.load_state_dict(other)
    wrong_dtype = mfac.SlidingInverseFisher(8, 3, 1e-3, dtype=torch.bfloat16).state_dict()
    with pytest.raises(TypeError, match="bfloat16"):
        op.load_state_dict(wrong_dtype)
    bad_damp = dict(before, damp=-1.0)
    with pytest.raises(ValueError, match="damp"):
        op.load_state_dict(bad_damp)
    assert_same(before, snapshot(op))
