"""The layout of mfac.prune: one module per method, each registered once, and a namespace in
which no name hides a submodule."""

from __future__ import annotations

import importlib
import pkgutil
import types

import mfac.prune as mp
import mfac.prune.methods
import mfac.recovery


def _submodules(package: types.ModuleType) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


def test_no_name_in_the_namespace_shadows_a_submodule() -> None:
    for full in _submodules(mp):
        importlib.import_module(full)
        short = full.split(".")[2]
        value = getattr(mp, short, None)
        assert value is None or isinstance(value, types.ModuleType), full
    for name in mp.__all__:
        assert not isinstance(getattr(mp, name), types.ModuleType), name


def test_every_method_module_registers_its_methods() -> None:
    registered = {id(m) for m in mp.REGISTRY.values()}
    for full in _submodules(mfac.prune.methods):
        module = importlib.import_module(full)
        entries = [v for v in vars(module).values() if isinstance(v, mp.Method)]
        assert entries, f"{full} defines no Method"
        assert all(id(e) in registered for e in entries), full
    assert mp.METHODS == tuple(mp.REGISTRY)
    assert set(mp.REGISTRY) == {
        "magnitude", "diag-fisher", "mfac", "mfac-exact", "sparsegpt", "wanda",
        "owl-sparsegpt", "fisher-sparsegpt", "iobs",
    }  # fmt: skip


def test_the_mfac_obs_method_is_not_named_like_the_optimizer() -> None:
    import mfac

    config = mp.REGISTRY["mfac"].config
    assert config.__name__ != "MFAC" and config is not mfac.MFAC
    assert not hasattr(mfac.prune.methods.mfac_obs, "MFAC")


def test_one_singular_hessian_error() -> None:
    from mfac._validation import SingularHessianError

    assert mp.SingularHessianError is SingularHessianError
    assert mfac.recovery.SingularHessianError is SingularHessianError
    assert issubclass(SingularHessianError, ValueError)
