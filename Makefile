# Every target creates .venv when it is missing. torch is pinned in the same pip command as
# everything else, so no resolver step can pull a multi-GB CUDA wheel; the extension builds
# without isolation (its build requirements hold no torch anyway).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.rlhf_fast-installed
export TRITON_DEFAULT_FP_FUSION ?= 1

.PHONY: install test test-fast demo bench kernel-report gpu-check ext clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH) "setuptools>=64" wheel "pybind11>=2.10"
	$(PIP) install -q --no-build-isolation $(TORCH) -e ".[dev]"
	$(PY) setup.py -q build_ext --inplace
	touch $(STAMP)

# Rebuild only the C++ extension in place (after editing csrc/).
ext: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Two processes: TRITON_INTERPRET=1 turns every @triton.jit of a process into the interpreter,
# so the interpreter tests get their own pytest run and the AOT compile tests run without it.
test: $(STAMP)
	$(PY) -m pytest -q -m "not interpret" tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m interpret tests

# The main job on its embedded default: SFT -> reward model -> PPO on a tiny model, report in runs/demo/.
demo: $(STAMP)
	$(PY) -m rlhf_fast.cli pipeline --config configs/demo.yaml

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

kernel-report: $(STAMP)
	$(PY) -m rlhf_fast.testing.aot --write benchmarks/results/kernel_resources.md

# On a GPU: every Triton kernel against its reference at realistic shapes, timings, packing, a 0.5B PPO step.
# Runs from a source checkout with the image's python3 too: python3 -m rlhf_fast.cli selfcheck
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m rlhf_fast.cli selfcheck \
		--json benchmarks/results/selfcheck.json --markdown benchmarks/results/selfcheck.md

clean:
	rm -rf build *.egg-info rlhf_fast/_C*.so
