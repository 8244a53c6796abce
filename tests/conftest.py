"""Shared test setup: the oracle module on the path, the hypothesis profile, and the device the
operator tests run on.

Under CI (``CI`` set) hypothesis draws a fixed sequence of examples (``derandomize``), so a CI
run is reproducible; a local run keeps exploring new examples.

``pytest --device cuda`` (or ``MFAC_TEST_DEVICE=cuda``) runs the tests that take the ``device``
fixture (the float64-oracle tests of the operators) on that device; the oracles themselves are
always computed on the CPU in float64. The default is ``cpu``.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get("MFAC_TEST_DEVICE", "cpu"),
        help="torch device for the operator tests (default: $MFAC_TEST_DEVICE or cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("--device")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise pytest.UsageError(f"--device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only build)"
        raise pytest.UsageError(
            f"--device {name}: no CUDA device is available (torch {torch.__version__}, CUDA "
            f"build {build})"
        )


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device chosen with --device / MFAC_TEST_DEVICE (session-wide, hypothesis-safe)."""
    return torch.device(pytestconfig.getoption("--device"))


@pytest.fixture(scope="module")
def one_thread():
    """Small problems run on one thread (no oversubscription when pytest-xdist runs workers
    side by side); the thread count is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
