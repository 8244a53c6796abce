"""Models and data shared by the pruning tests: a small MLP trained on sklearn digits (used with
the ``digits`` fixture of conftest.py) and a chain of residual stages called like a
transformer."""

from __future__ import annotations

import torch
from torch import nn

from mfac import InverseFisher
from mfac.prune._layers import Layout, current_masks, find_targets

from oracle import dense_inverse_fisher

F64 = torch.float64


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _acc(model: nn.Module, test) -> float:
    with torch.no_grad():
        return float((model(test[0]).argmax(1) == test[1]).float().mean())


def _fresh(digits) -> nn.Module:
    model, state, _, _ = digits
    model.load_state_dict(state)
    return model


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class Block(nn.Module):
    """A residual block called with a keyword argument, like a transformer layer."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.down(torch.relu(self.up(x)))


class Chain(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 12, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.layers = nn.ModuleList(Block(width, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h, scale=0.5)
        return h


def _chain(seed: int = 0) -> tuple[Chain, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = Chain().double()
    batches = [torch.randn(4, 3, 5, dtype=F64) for _ in range(3)]
    return model, batches


def _run(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def _layers(name: str, _m: nn.Module) -> bool:
    return name.startswith("layers.")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def _chain_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().mean()


def _setup(shape: tuple[int, int], m: int, block: int | None, damp: float, seed: int = 0):
    """A one-layer model, its layout, random gradients and the operator over them."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(shape[1], shape[0], bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(shape, generator=gen, dtype=F64))
    targets = find_targets(model)
    priors = current_masks(targets)
    layout = Layout(targets, priors, block)
    grads = torch.randn(m, layout.dim, generator=gen, dtype=F64)
    grads[:, 0] *= 5.0  # uneven curvature, so OBS and magnitude disagree
    dense = dense_inverse_fisher(grads, damp)
    fisher = InverseFisher(grads.clone(), damp, block)
    return model, targets, priors, layout, grads, dense, fisher
