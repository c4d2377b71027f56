# Two commands matter: `make run` and `make test`. Everything else is a step they use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)

.PHONY: setup run test test-fast model demo-model stack bench bench-smoke clean

# Re-running is a no-op unless the pins changed: the stamp is newer than both pin files.
setup: $(STAMP)
$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Archive the bundled demo model into model_store/ unless it is already there.
model: setup
	$(PY) -m scripts.serving.stack model

# Retrain the demo model from synthetic images (a few minutes on 2 cores).
demo-model: setup
	$(PY) -m scripts.ml.demo_model

# TorchServe + API (gunicorn) on embedded defaults: SQLite and local image storage.
run: model
	$(PY) -m scripts.serving.stack run

# The same with PostgreSQL and a local S3 server (SeaweedFS).
stack: model
	$(PY) -m scripts.serving.stack run --postgres --s3

test: setup
	$(PY) -m pytest -q

# Unit and deployment-file tests only: no services started.
test-fast: setup
	$(PY) -m pytest -q tests/unit tests/deploy

bench: model
	$(PY) -m bench.run

bench-smoke: model
	$(PY) -m bench.run --smoke --out var/bench/smoke

clean:
	rm -rf var build dist *.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
