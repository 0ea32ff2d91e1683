# The two commands a newcomer needs (see README.md):
#   make train   set up .venv, then train the default policy on the default task
#   make test    set up .venv, then run the test suite
# Anything after ARGS= is passed to train.py, e.g. make train ARGS="policy=bvae".

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE
export MUJOCO_GL ?= egl

.PHONY: setup train test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# One pip command for everything: installing the simulators one after another breaks mujoco.
	$(PY) -m pip install --quiet -e '.[sim,dev]'
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)
