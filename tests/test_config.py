"""The typed option sets are the single source of every method's options: they validate API
calls, agree with the solvers' own signatures, and adding a method is one registry entry."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mfac.prune as mp
from mfac._config import Options, option, options_of
from mfac.prune.method import Method, ScopedOptions, zero_pruned
from mfac.prune.methods.sparsegpt import sparsegpt
from mfac.recovery import METHODS as SOLVERS
from mfac.recovery.options import CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def _keyword_defaults(fn: object, skip: int) -> dict[str, object]:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: p.default for p in params}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_solver_configs_match_the_solver_signatures(name: str) -> None:
    """Every keyword of a solver is an option of its config, with the same default."""
    config = {o.name: o.default for o in options_of(CONFIGS[name])}
    assert config == _keyword_defaults(SOLVERS[name], skip=5)


def test_sparsegpt_config_matches_the_layerwise_solver() -> None:
    defaults = _keyword_defaults(sparsegpt, skip=4)
    for o in options_of(mp.REGISTRY["sparsegpt"].config):
        if o.name in defaults and o.name not in ("layers", "progress"):
            assert defaults[o.name] == o.default, o.name


def test_shared_option_names_agree_in_kind() -> None:
    """One flag per name on the command line: every method declaring it reads it alike."""
    seen: dict[str, str] = {}
    for configs in ([m.config for m in mp.REGISTRY.values()], list(CONFIGS.values())):
        seen.clear()
        for cls in configs:
            for o in options_of(cls):
                assert seen.setdefault(o.name, o.kind) == o.kind, (cls.__name__, o.name)


def test_no_type_ignore_in_prune() -> None:
    hits = [p for p in (ROOT / "src/mfac/prune").rglob("*.py") if "type: ignore" in p.read_text()]
    assert not hits


@given(
    name=st.sampled_from(["num_grads", "recompute", "block_size", "damp"]),
    value=st.one_of(st.integers(-5, 0), st.just(float("nan")), st.just(True), st.just("8")),
)
def test_bad_option_values_are_refused_by_name(name: str, value: object) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        mp.REGISTRY["mfac"].config(**{name: value})


def test_unknown_option_lists_the_known_ones() -> None:
    with pytest.raises(TypeError, match=r"unknown options for method 'sparsegpt'.*calib_batches"):
        mp.REGISTRY["sparsegpt"].config.build({"num_grads": 3}, "method 'sparsegpt'")


def test_a_new_method_is_one_config_and_one_registry_entry(monkeypatch) -> None:
    """Register a toy method: oneshot validates its options through its config, runs it, and
    the command line grows its flag."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class EveryOther(ScopedOptions):
        """Options of the toy method."""

        offset: int = option(0, "first weight to drop", low=0, high=1)

    def run(req, cfg):
        masks = []
        for t in req.targets:
            keep = torch.ones(t.numel, dtype=torch.bool)
            keep[cfg.offset :: 2] = False
            masks.append(keep.view(t.shape))
        zero_pruned(req.targets, masks)
        return {t.name: m for t, m in zip(req.targets, masks, strict=True)}

    method = Method("every-other", EveryOther, run, "drop every other weight", needs_data=False)
    monkeypatch.setitem(mp.REGISTRY, "every-other", method)
    model = nn.Sequential(nn.Linear(4, 4))
    res = mp.oneshot(model, 0.5, "every-other", offset=1)
    assert res.sparsity == 0.5 and bool((model[0].weight.flatten()[1::2] == 0).all())
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="offset"):
        mp.oneshot(model, 0.5, "every-other", offset=2)
    assert torch.equal(model[0].weight, before)
    from mfac.cli.options import method_options

    assert method_options("prune")["offset"][1] == {"every-other": "0"}


def test_options_base_checks_every_field() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Toy(Options):
        ratio: float = option(0.5, "a ratio", low=0, high=1, high_open=True)
        names: tuple[str, ...] = option((), "names")
        mode: str = option("a", "mode", choices=("a", "b"))

    assert Toy(names=["x", "y"]).names == ("x", "y")
    for bad, err in ((dict(ratio=1.0), ValueError), (dict(ratio="0.5"), TypeError),
                     (dict(names="x"), TypeError), (dict(mode="c"), ValueError)):  # fmt: skip
        with pytest.raises(err):
            Toy(**bad)
