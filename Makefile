# accord: `make demo` (set up + run every installed plugin's quick pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build that this machine has on disk; GPU users: see docs/install.md.
TORCH_SPEC ?= torch==2.13.0
# Plugins to install and demo (directories under plugins/); default: all of them.
PLUGINS ?= $(notdir $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml)))
DEMO_OUT ?= runs/demo

.PHONY: setup test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]" $(foreach p,$(PLUGINS),-e plugins/$(p))
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/accord demo --out $(DEMO_OUT) $(foreach p,$(PLUGINS),--plugin $(p))

clean:
	rm -rf $(VENV) runs build *.egg-info
