"""The pruning methods by name: the one place a method is registered.

Adding a method means one module in :mod:`mfac.prune.methods` holding its option set (a frozen
dataclass built on :mod:`mfac.prune.method`), its solver and
``METHOD = Method(name, Config, run, summary)``, plus one line below.
:func:`mfac.prune.oneshot`, ``mfac prune`` (flags and recipe keys) and the option tables of
docs/cli.md all read this table.
"""

from __future__ import annotations

from .method import Method
from .methods import diag_fisher, iobs, magnitude, mfac_exact, mfac_obs, presets, sparsegpt, wanda

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        magnitude.METHOD,
        diag_fisher.METHOD,
        mfac_obs.METHOD,
        mfac_exact.METHOD,
        sparsegpt.METHOD,
        wanda.METHOD,
        presets.METHOD,
        presets.FISHER_METHOD,
        iobs.METHOD,
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name``, or a ValueError listing the known ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(REGISTRY)}") from None
