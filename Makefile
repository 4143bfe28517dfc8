# The two commands of the README: `make run` (the main job) and `make test`.
# Both install what they need first (idempotent; re-runs when setup.py changes).
PYTHON ?= python3
CONFIG ?= configs/fashion_mnist.py
WORKDIR ?= workdirs/fashion_mnist
# On a CPU host, 8 virtual devices ran the default model ~2.5x faster than one.
CPU_DEVICES ?= 8

.PHONY: setup run test gpu-program-env tpu-program-env
setup: .setup.stamp

.setup.stamp: setup.py scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

run: setup
	XLA_FLAGS="--xla_force_host_platform_device_count=$(CPU_DEVICES) $$XLA_FLAGS" \
	  $(PYTHON) -m trainer.main --config=$(CONFIG) --workdir=$(WORKDIR)

# The compile-only environments serve two tests, skipped if they cannot be
# installed. pytest-xdist runs a worker per core (at most 4), each test
# file in one worker so that its module fixtures run once.
test: setup
	-$(MAKE) -k --no-print-directory gpu-program-env tpu-program-env
	$(PYTHON) -m pytest tests -q -n auto --maxprocesses=4 --dist loadfile

# benchmarks/gpu_program.py: XLA's CUDA compiler plugin, of jax's version, in
# an environment of its own (installed beside jax, every `import jax` would
# try to start CUDA); it sees this Python's packages.
GPU_PROGRAM_ENV ?= .venv-gpu-program
gpu-program-env: $(GPU_PROGRAM_ENV)/.stamp

$(GPU_PROGRAM_ENV)/.stamp: setup.py
	$(PYTHON) -m venv --system-site-packages $(GPU_PROGRAM_ENV)
	$(GPU_PROGRAM_ENV)/bin/python -m pip install --quiet \
	  --disable-pip-version-check --no-deps \
	  "jax-cuda12-pjrt==$$($(PYTHON) -c 'import jax; print(jax.__version__)')"
	touch $@

# benchmarks/tpu_program.py: libtpu, the version jax's `tpu` extra names, in
# an environment of its own for the same reason.
TPU_PROGRAM_ENV ?= .venv-tpu-program
tpu-program-env: $(TPU_PROGRAM_ENV)/.stamp

$(TPU_PROGRAM_ENV)/.stamp: setup.py
	$(PYTHON) -m venv --system-site-packages $(TPU_PROGRAM_ENV)
	$(TPU_PROGRAM_ENV)/bin/python -m pip install --quiet \
	  --disable-pip-version-check --no-deps "$$($(PYTHON) -c \
	  "import importlib.metadata as m; print(next(r.split(';')[0].strip() \
	  for r in m.requires('jax') if r.startswith('libtpu')))")"
	touch $@
