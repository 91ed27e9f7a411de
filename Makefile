# The README's two commands: `make demo` and `make test`. Both create .venv if missing, install the
# dependencies and build the extension (incrementally, with ninja) first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
export MAX_JOBS ?= $(shell nproc)

.PHONY: all setup build emu test test-fast cmake-check lint wheel-check mutants ci demo bench clean

all: test

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.txt
	# register the package (editable, console script `mtkd-fast`) without building: `build` does that
	MTKD_FAST_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(STAMP)

# Builds mtkd_fast/_C*.so in place; ninja recompiles only what changed.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import mtkd_fast, json; i = mtkd_fast.build_info(); assert i['extension_loaded'], i['load_error']; print('build_info:', json.dumps({k: i[k] for k in ('cuda_compiled', 'cuda_archs', 'openmp', 'num_threads', 'cpu_kernels', 'cuda_kernels')}))"

# The CPU SIMT emulator of the CUDA kernels (tests/cuda_emu): tests/test_ops.py's [cuda_emu] cases run them.
# Built here (incrementally) so a test run's time is the tests'; a fixture would build it on first use too.
emu: $(STAMP)
	$(PY) tests/cuda_emu/build.py

# The suite, then the emulated CUDA cases once more with seeded random block and thread order.
test: build emu
	$(PY) -m pytest -q tests
	CUDA_EMU_ORDER=random CUDA_EMU_SEED=20261206 $(PY) -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda_emu

test-fast: build
	$(PY) -m pytest -q -x tests -m "not slow"

# The CMake build of the same extension and its C++ tests, C++-only and (where nvcc exists) with CUDA:
# kept building so it does not rot.
cmake-check: $(STAMP)
	$(PY) tools/cmake_build.py --cuda=off
	if [ -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then $(PY) tools/cmake_build.py --cuda=on; fi

# ruff, configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the package as a user of `pip install` meets it: wheel, fresh venv, used from outside the checkout
wheel-check: build
	PYTHON=$(PY) bash tools/check_wheel.sh

# planted kernel bugs, each of which the emulated CUDA op tests must catch (a rebuild per mutant: CI only)
mutants: build emu
	$(PY) tests/cuda_emu/mutants.py

# what CI runs (.ci/run): the tests, the CMake build and its C++ tests, the linter, the wheel, the mutants
ci: test cmake-check lint wheel-check mutants

demo: build
	$(VENV)/bin/mtkd-fast demo

bench: build
	$(PY) -m pytest benchmarks -q -s --benchmark-only --benchmark-autosave --benchmark-storage=bench_results/pytest-benchmark \
		--benchmark-columns=min,median,mean,stddev,rounds

clean:
	rm -rf build build-cmake mtkd_fast/_C*.so
