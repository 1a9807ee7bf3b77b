# Every target creates and fills its own virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train eval test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

train: install
	$(PY) sft.py train $(ARGS)

eval: install
	$(PY) sft.py eval $(ARGS)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) tests/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
