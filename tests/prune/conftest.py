"""Fixtures of the pruning tests."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from prune_models import _loss


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one intra-op thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """A small MLP trained on sklearn digits (train / test split, 32-sample batches), trained on
    one thread so that every test sees the same weights."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y)
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(y), generator=gen)
        tr, te = perm[:1400], perm[1400:]
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
        )
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(40):
            for idx in torch.randperm(1400, generator=gen).split(100):
                opt.zero_grad()
                _loss(model, (x[tr][idx], y[tr][idx])).backward()
                opt.step()
        batches = [(x[tr][i], y[tr][i]) for i in torch.randint(0, 1400, (64, 32), generator=gen)]
        state = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(before)
    return model, state, batches, (x[te], y[te])
