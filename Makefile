# Two commands on a fresh machine: `make demo` and `make test`. On a CUDA machine: `make gpu-check`.
PY      ?= python3
# Extra index for the torch wheel, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128 for a
# CUDA build where plain pip resolves torch==2.13.0 to a CPU-only wheel.
TORCH_INDEX ?=
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test lint clean gpu-check gpu-preflight

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VPY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mfac demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VPY) -m pytest -q -n 2 --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

# The operator and optimizer tests against float64 oracles and the operator benchmark, on CUDA;
# results in benchmarks/results/gpu.json. Fails before building anything when no NVIDIA GPU is
# visible. On a machine whose Python already has a CUDA build of torch (no network needed):
#   make gpu-check GPU_PY=python3
GPU_PY  ?=
GPU_RUN := $(if $(GPU_PY),PYTHONPATH=src $(GPU_PY),$(VPY))
GPU_TESTS := tests/operators/test_static.py tests/operators/test_sliding.py tests/test_device.py

gpu-preflight:
	@nvidia-smi -L >/dev/null 2>&1 || { echo "gpu-check: no CUDA device (nvidia-smi finds no NVIDIA GPU); nothing was built or run" >&2; exit 2; }

gpu-check: gpu-preflight $(if $(GPU_PY),,$(STAMP))
	@$(GPU_RUN) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch ' + torch.__version__ + ' cannot use the GPU (CUDA build: ' + str(torch.version.cuda) + '); install a CUDA wheel: make clean && make gpu-check TORCH_INDEX=https://download.pytorch.org/whl/cu128 (pick the cuXYZ your driver supports)')"
	$(GPU_RUN) -m pytest -q -n 0 -p no:cacheprovider --device cuda --junitxml=.gpu-tests.xml $(GPU_TESTS) || true
	$(GPU_RUN) -m benchmarks.operators --device cuda --tests-junit .gpu-tests.xml

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis .ruff_cache
