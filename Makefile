# Two commands on a fresh machine:  `make chat` (install + chat with the bundled demo model)
# and `make test` (install the test environment + run the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, pinned, so that nothing that depends on it pulls another build.
TORCH_SPEC ?= torch==2.13.0
MODEL ?= demo

.PHONY: chat test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

chat: install
	$(BIN)/olmo-local chat $(MODEL)

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
