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

# mmdet3d needs mmcv with compiled ops, built against the installed torch (about 13 min on
# 2 cores the first time; pip's wheel cache makes later installs take seconds). Only plugins
# that need it (superflow) pay for it.
MMCV_SPEC ?= mmcv==2.1.0
NEEDS_MMCV := $(filter superflow,$(PLUGINS))

$(VENV)/.installed: $(BIN)/python pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
ifneq ($(NEEDS_MMCV),)
	$(BIN)/python -m pip install --quiet "setuptools>=77,<81" wheel "numpy<2"
	MMCV_WITH_OPS=1 $(BIN)/python -m pip install --quiet --no-build-isolation "$(MMCV_SPEC)"
endif
	$(BIN)/python -m pip install --quiet -e ".[test]" $(foreach p,$(PLUGINS),-e plugins/$(p))
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/accord demo --out $(DEMO_OUT) $(foreach p,$(PLUGINS),--plugin $(p))

clean:
	rm -rf $(VENV) runs build *.egg-info
