# Every target creates and fills its own virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train eval test bench book-check clean
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

# Our chapter functions pasted into the book's own chapter-7 files. BOOK: the book's ch07/01_main-chapter-code
# folder; its files' imports (requirements-book.txt) go into .venv on first use.
book-check:
	@test -n "$(BOOK)" || { echo "make book-check BOOK=DIR: DIR is the book's ch07/01_main-chapter-code folder"; \
	    exit 1; }
	@$(MAKE) --no-print-directory $(VENV)/.book-installed
	$(PY) tests/book_check.py "$(BOOK)"

$(VENV)/.book-installed: $(VENV)/.installed requirements-book.txt
	$(PY) -m pip install -q -r requirements-book.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
