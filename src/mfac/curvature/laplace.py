"""A Laplace posterior over a subnetwork (by default the last layer) with the M-FAC precision.

Around trained weights theta* (the MAP), the posterior over the chosen parameters is
N(theta*, P^-1) with the precision P = tau*I + N * G^T G / m: a Gaussian prior of precision tau
plus N times the empirical Fisher estimated from m per-example gradients of the negative
log-likelihood. P = N * F with F = (tau/N)*I + G^T G / m, so P^-1 = F^-1 / N is exactly the
static M-FAC operator with damping tau/N: sampling, log det and products cost O(m^2 d) or less and
never form d x d.

Predictive distributions for classification (softmax outputs):
* ``"glm"``: the network linearised in the chosen parameters around theta*; the logits are
  N(f, J P^-1 J^T) and the probit approximation gives softmax(f_c / sqrt(1 + pi/8 var_c)).
* ``"mc"``: the average softmax over sampled parameter vectors, through the full network.
The prior precision is chosen on held-out data (`optimize_prior_precision`) or by the Laplace
evidence (`log_marginal_likelihood`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map

from .._validation import check_damp, check_positive_int
from ..operators.gradients import (
    LossFn,
    collect_gradients,
    count_examples,
    kept_intact,
    resolve_params,
)
from ..operators.layout import FlatLayout
from ..operators.static import InverseFisher

#: Held-out data for the predictive: ``(inputs, targets)`` with ``inputs`` what the model takes
#: (a tensor, a tuple of positional tensors, or a dict of keyword tensors such as a Hugging Face
#: tokenizer's output) and ``targets`` the class labels.
Data = tuple[Any, torch.Tensor]
Predictive = Literal["glm", "mc"]


def _call(model: nn.Module, params: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
    """The model's logits on ``inputs`` with ``params`` swapped in: a tensor output, or the
    ``.logits`` of a Hugging Face ``ModelOutput``."""
    if isinstance(inputs, Mapping):
        out = functional_call(model, params, (), dict(inputs))
    elif isinstance(inputs, (tuple, list)):
        out = functional_call(model, params, tuple(inputs))
    else:
        out = functional_call(model, params, (inputs,))
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "the model must return logits: a tensor or an output with .logits, got "
            f"{type(out).__name__}"
        )
    return logits


def _logits_2d(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 2:
        raise ValueError(
            "Laplace's predictive is for classifiers with logits of shape (n, C), got "
            f"{tuple(logits.shape)}"
        )
    return logits


def last_layer(model: nn.Module) -> list[str]:
    """Names of the parameters of the last module (in registration order) that owns any."""
    owner = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            owner = name
    if owner is None:
        raise ValueError("the model has no parameters")
    prefix = f"{owner}." if owner else ""
    return [prefix + n for n, _ in dict(model.named_modules())[owner].named_parameters()]


class Laplace:
    """Laplace approximation over ``params`` (names, tied aliases accepted; default: the last
    layer) of a trained classifier whose ``loss_fn(model, batch)`` is the batch's mean negative
    log-likelihood (e.g. cross-entropy). Models may return a tensor of logits or a Hugging Face
    output with ``.logits``."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: Sequence[str] | None = None,
        *,
        block_size: int | None = None,
        prior_precision: float = 1.0,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.names = resolve_params(
            model, list(params) if params is not None else last_layer(model)
        )
        self.block_size = block_size
        self.prior_precision = check_damp(prior_precision, "prior_precision")
        self.grads: torch.Tensor | None = None
        self.num_data = 0
        self.inverse: InverseFisher | None = None
        self.layout: FlatLayout | None = None

    # ------------------------------------------------------------------ fitting
    def fit(self, train: Any, num_grads: int | None = None, chunk_size: int = 256) -> Laplace:
        """Collect per-example gradients at the current (MAP) weights: ``num_grads`` of them
        (default: every training example); N is the number of examples in ``train`` (one batch,
        a tuple or dict of tensors, or a re-iterable sequence of batches)."""
        self.num_data = count_examples(train)
        m = self.num_data if num_grads is None else check_positive_int(num_grads, "num_grads")
        self.grads, self.layout = collect_gradients(
            self.model,
            train,
            self.loss_fn,
            m,
            params=self.names,
            dtype=torch.float64,
            chunk_size=chunk_size,
        )
        self._build()
        return self

    def _build(self) -> None:
        grads = self._fitted().clone()
        damp = self.prior_precision / self.num_data
        self.inverse = InverseFisher(grads, damp, self.block_size)
        self.inverse.layout = self.layout

    def _fitted(self) -> torch.Tensor:
        if self.grads is None:
            raise RuntimeError("call fit(train_data) first")
        return self.grads

    def _op(self) -> tuple[InverseFisher, FlatLayout]:
        self._fitted()
        assert self.inverse is not None and self.layout is not None
        return self.inverse, self.layout

    def set_prior_precision(self, prior_precision: float) -> None:
        """Change tau and rebuild the operator (O(m^2 d))."""
        self.prior_precision = check_damp(prior_precision, "prior_precision")
        self._build()

    @property
    def map_vector(self) -> torch.Tensor:
        named = dict(self.model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names]).to(torch.float64)

    # ------------------------------------------------------------------ posterior
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n parameter vectors from the posterior N(theta*, P^-1), as an (n, d) tensor."""
        inverse, _ = self._op()
        draws = inverse.sample(n, generator=generator) / math.sqrt(self.num_data)
        return self.map_vector + draws

    def log_marginal_likelihood(self, nll_sum: float) -> float:
        """The Laplace evidence log p(D) ~ -NLL(theta*) + log N(theta*; 0, I/tau)
        + (d/2) log 2 pi - (1/2) log det P, given the summed training NLL at theta*."""
        inverse, _ = self._op()
        d, tau = inverse.dim, self.prior_precision
        theta = self.map_vector
        log_prior = 0.5 * d * math.log(tau / (2 * math.pi)) - 0.5 * tau * float(theta @ theta)
        logdet_p = d * math.log(self.num_data) + inverse.logdet()
        return -nll_sum + log_prior + 0.5 * d * math.log(2 * math.pi) - 0.5 * logdet_p

    # ------------------------------------------------------------------ prediction
    def _split(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        named = dict(self.model.named_parameters())
        chosen = {n: named[n].detach() for n in self.names}
        fixed = {n: p.detach() for n, p in named.items() if n not in chosen}
        fixed.update({n: b.detach().clone() for n, b in self.model.named_buffers()})
        return chosen, fixed

    @torch.no_grad()
    def predict(
        self,
        inputs: Any,
        method: Predictive = "glm",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predictive class probabilities (n, C) under the posterior."""
        _, layout = self._op()
        chosen, fixed = self._split()
        if method == "mc":
            check_positive_int(n_samples, "n_samples")
            probs = torch.zeros(())
            for theta in self.sample(n_samples, generator):
                params = {n: t.to(chosen[n].dtype) for n, t in layout.unflatten(theta).items()}
                with kept_intact(self.model):
                    out = _logits_2d(_call(self.model, {**fixed, **params}, inputs))
                probs = probs + torch.softmax(out.to(torch.float64), -1)
            return probs / n_samples
        if method != "glm":
            raise ValueError(f"method must be 'glm' or 'mc', got {method!r}")
        return self._probit(*self._linearise(inputs))

    def _linearise(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """MAP logits (n, C) and the Jacobian rows d logits / d theta, (n*C, d), float64."""
        _, layout = self._op()
        chosen, fixed = self._split()

        def logits(p: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
            single = tree_map(lambda t: t.unsqueeze(0), x)
            return _call(self.model, {**fixed, **p}, single).squeeze(0)

        with kept_intact(self.model):
            mean = _logits_2d(_call(self.model, {**fixed, **chosen}, inputs)).to(torch.float64)
            try:
                jac = vmap(jacrev(logits), in_dims=(None, 0))(chosen, inputs)  # (n, C, *shape)
            except RuntimeError as err:  # data-dependent control flow (e.g. HF attention masks)
                if "vmap" not in str(err):
                    raise
                rows = [
                    jacrev(logits)(chosen, tree_map(lambda t, i=i: t[i], inputs))
                    for i in range(mean.shape[0])
                ]
                jac = {k: torch.stack([r[k] for r in rows]) for k in chosen}
        n, c = mean.shape
        flat = layout.flatten({k: v.reshape(n * c, *v.shape[2:]) for k, v in jac.items()}, True)
        return mean, flat.to(torch.float64)

    def _probit(self, mean: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
        """softmax(f / sqrt(1 + pi/8 diag(J P^-1 J^T))) from `_linearise`'s output."""
        inverse, _ = self._op()
        solved = (inverse @ jac.T.contiguous()).T / self.num_data  # rows of J P^-1
        var = (jac * solved).sum(1).view(mean.shape).clamp_min(0.0)
        return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), -1)

    def _spectral_variances(
        self, jac: torch.Tensor, shape: torch.Size
    ) -> Callable[[float], torch.Tensor] | None:
        """For the full (unblocked) operator, tau -> diag(J P_tau^-1 J^T) from one thin SVD of
        G / sqrt(m) = U S V^T: (lambda I + V S^2 V^T)^-1 = V (lambda + S^2)^-1 V^T
        + (I - V V^T) / lambda with lambda = tau / N, so each tau costs O(n C r), not a rebuild."""
        if self.block_size is not None:
            return None
        grads = self._fitted()
        _, sing, vh = torch.linalg.svd(grads / math.sqrt(grads.shape[0]), full_matrices=False)
        proj = (jac @ vh.T).square()  # (n*C, r)
        rest = (jac.square().sum(1) - proj.sum(1)).clamp_min(0.0)
        n = self.num_data

        def variances(tau: float) -> torch.Tensor:
            lam = tau / n
            var = (proj / (lam + sing.square())).sum(1) + rest / lam
            return (var / n).view(shape)

        return variances

    def optimize_prior_precision(
        self,
        val: Data,
        grid: Sequence[float] | None = None,
        method: Predictive = "glm",
        n_samples: int = 100,
    ) -> float:
        """Choose tau from ``grid`` (default 10^-2 .. 10^4) by the validation NLL of the
        predictive; sets it and returns it."""
        self._fitted()
        values = list(grid) if grid is not None else [10.0 ** (e / 4) for e in range(-8, 17)]
        inputs, targets = val
        best, best_nll = values[0], math.inf
        with torch.no_grad():
            moments = self._linearise(inputs) if method == "glm" else None
            spectral = (
                self._spectral_variances(moments[1], moments[0].shape)
                if moments is not None
                else None
            )
        for tau in values:
            check_damp(tau, "prior precision")
            if moments is not None and spectral is not None:
                probs = torch.softmax(
                    moments[0] / torch.sqrt(1.0 + math.pi / 8.0 * spectral(tau)), -1
                )
            elif moments is not None:  # the Jacobian does not depend on tau: linearise once
                self.set_prior_precision(float(tau))
                with torch.no_grad():
                    probs = self._probit(*moments)
            else:
                self.set_prior_precision(float(tau))
                gen = torch.Generator().manual_seed(0)
                probs = self.predict(inputs, method, n_samples, gen)
            nll = float(-torch.log(probs[torch.arange(len(targets)), targets] + 1e-12).mean())
            if nll < best_nll:
                best, best_nll = float(tau), nll
        self.set_prior_precision(best)
        return best


__all__ = ["Laplace", "last_layer"]
