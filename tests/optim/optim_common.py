"""Helpers shared by the optimizer tests: a small model and data, a training loop, deep state
comparison and edits of saved state dicts."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from oracle import assert_state_equal  # noqa: F401  (the optim tests' name for it)

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
