# The two commands of the README: `make run` (the main job) and `make test`.
# Both install what they need first (idempotent; re-runs when setup.py changes).
PYTHON ?= python3
CONFIG ?= configs/fashion_mnist.py
WORKDIR ?= workdirs/fashion_mnist
# On a CPU host, 8 virtual devices ran the default model ~2.5x faster than one.
CPU_DEVICES ?= 8

.PHONY: setup run test
setup: .setup.stamp

.setup.stamp: setup.py scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

run: setup
	XLA_FLAGS="--xla_force_host_platform_device_count=$(CPU_DEVICES) $$XLA_FLAGS" \
	  $(PYTHON) -m trainer.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	$(PYTHON) -m pytest tests -q
