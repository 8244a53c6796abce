"""Helpers shared by the optimizer tests: a small model and data, a training loop, deep state
comparison and edits of saved state dicts."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

F64 = torch.float64


def model(seed: int = 0) -> nn.Module:
    """A 6 -> 8 -> 3 MLP (four parameter tensors, 83 coordinates)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def train(mod: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    """``steps`` minibatch steps of cross-entropy, batches chosen by the step index."""
    x, y = data(256)
    for t in range(start, start + steps):
        sl = slice((t * 16) % 256, (t * 16) % 256 + 16)
        opt.zero_grad()
        nn.functional.cross_entropy(mod(x[sl]), y[sl]).backward()
        opt.step()


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def vec_param(d: int = 10, seed: int = 0) -> nn.Parameter:
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(d, dtype=F64))


def assert_state_equal(s1: object, s2: object, path: str = "state") -> None:
    """Equality of two (nested) optimizer states: tensors of equal dtype and shape equal
    entry by entry (NaN matching NaN), everything else with ==."""
    if isinstance(s1, torch.Tensor):
        assert isinstance(s2, torch.Tensor) and s1.dtype == s2.dtype, path
        assert s1.shape == s2.shape, path
        same = s1 == s2
        if s1.is_floating_point():
            same |= s1.isnan() & s2.isnan()
        assert bool(same.all()), path
    elif isinstance(s1, dict):
        assert isinstance(s2, dict) and s1.keys() == s2.keys(), path
        for key in s1:
            assert_state_equal(s1[key], s2[key], f"{path}[{key!r}]")
    elif isinstance(s1, (list, tuple)):
        assert type(s1) is type(s2) and len(s1) == len(s2), path
        for i, (a, b) in enumerate(zip(s1, s2, strict=True)):
            assert_state_equal(a, b, f"{path}[{i}]")
    else:
        assert s1 == s2 or (s1 != s1 and s2 != s2), path


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of everything the optimizer holds (its state dict, windows included)."""
    return copy.deepcopy(opt.state_dict())


def nan_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = math.nan
    return t


def set_field(path: tuple, value: object):
    """An edit of a saved state dict: the entry at ``path`` := value (or value(old))."""

    def apply(sd: dict) -> None:
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return apply


def delete_field(path: tuple):
    """An edit of a saved state dict: the entry at ``path`` removed."""

    def apply(sd: dict) -> None:
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return apply
