"""The shipped C sources (src/mfac/operators/csrc): every file belongs to a kernel library, is
found as package data, and compiles without a warning (``cbuild.WARNINGS`` and ``-Werror``)
with the compiler and every flag set the library is built with, plus the AVX-512 paths on
x86-64, so that CI fails on a new warning."""

from __future__ import annotations

import platform
import subprocess
from importlib import resources

import pytest

from mfac.operators import cbuild, native, sparse_native, tiled

#: Each kernel library's C file and the flag sets it is built with.
LIBRARIES = {
    native.SOURCE_FILE: native._FLAG_SETS,
    sparse_native.SOURCE_FILE: sparse_native._FLAG_SETS,
    tiled.SOURCE_FILE: tiled._FLAG_SETS,
}

#: Flags that turn on the AVX-512 code paths whatever the host CPU (compiled, never run).
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]


def _flag_sets(name: str) -> list[list[str]]:
    sets = [list(flags) for flags in LIBRARIES[name]]
    if platform.machine().lower() in ("x86_64", "amd64"):
        sets.append([*sets[-1], *AVX512])  # the last set is the portable one
    return sets


def test_every_c_file_belongs_to_a_library() -> None:
    assert cbuild.source_files() == sorted(LIBRARIES)


def test_sources_are_package_data() -> None:
    # Read as the build reads them, through importlib.resources (a wheel ships csrc/*.c and
    # csrc/*.h: pyproject.toml's package-data).
    root = resources.files("mfac.operators") / cbuild.CSRC
    for name in LIBRARIES:
        sources = cbuild.kernel_source(name)
        assert next(iter(sources)) == name
        assert "half_floats.h" in sources
        assert sources[name] == (root / name).read_text()


@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_compiles_without_warnings(name: str, tmp_path) -> None:
    compiler = cbuild.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler ($CC, cc, gcc or clang) on this machine")
    for file, text in cbuild.kernel_source(name).items():
        (tmp_path / file).write_text(text)
    src, lib = tmp_path / name, tmp_path / "kernel.so"
    built = 0
    for flags in _flag_sets(name):
        strict = cbuild.compile_command(compiler, [*flags, *cbuild.WARNINGS, "-Werror"], src, lib)
        done = subprocess.run(strict, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            plain = cbuild.compile_command(compiler, flags, src, lib)
            if subprocess.run(plain, capture_output=True, timeout=300).returncode != 0:
                continue  # a flag set this compiler does not take (the runtime tries the next)
        assert done.returncode == 0, f"{' '.join(strict)}\n{done.stderr}"
        built += 1
    assert built, f"{name}: no flag set builds with {compiler}"
