# The two commands of the README: `make run` (the main job) and `make test`.
# Both install what they need first (idempotent; re-runs when setup.py changes).
PYTHON ?= python3
CONFIG ?= configs/fashion_mnist.py

.PHONY: setup run test
setup: .setup.stamp

.setup.stamp: setup.py scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

run: setup
	$(PYTHON) -m trainer.plan --config=$(CONFIG)

test: setup
	$(PYTHON) -m pytest tests -q
