# make demo : the smoke sweep (seven arms on a CIFAR-10 subset, about 10 minutes on 2 idle cores) + its report
# make test : the whole test suite (unit tests + the real-Ray end-to-end tests marked slow)
# Both create .venv when it is missing: the pinned runtime dependencies (requirements.txt), then the project
# itself, editable, with its `test` extra (pytest, pytest-timeout, hypothesis; pyproject.toml) and the optional
# integrations' extras `mlflow` and `optuna` (their tests run in `make test`).

VENV ?= .venv
PY := $(VENV)/bin/python
# CIFAR-10: AKOD_DATA_DIR if set, else the offline copy beside the checkout, else the download cache.
export AKOD_DATA_DIR ?= $(if $(wildcard ../shared/data/cifar10/train.parquet),$(abspath ../shared/data/cifar10),)

.PHONY: setup demo test test-fast bench clean-runs

# The editable install: setuptools' build backend prints a boxed notice ("Editable installation",
# a UserWarning) on every install; PYTHONWARNINGS quiets that one command's warnings, not its errors.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install -q --no-build-isolation -e ".[test,mlflow,optuna]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	@if [ -d runs/smoke ]; then $(VENV)/bin/akod sweep tune_configs/smoke.yaml --resume; \
	else $(VENV)/bin/akod sweep tune_configs/smoke.yaml; fi

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/run_all.py
