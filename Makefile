# accord: `make demo` (set up + run every installed plugin's quick pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build that this machine has on disk; GPU users: see docs/install.md.
TORCH_SPEC ?= torch==2.13.0
# Plugins to install and demo (directories under plugins/); default: all of them.
PLUGINS ?= $(notdir $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml)))
DEMO_OUT ?= runs/demo
# torch threads of every demo benchmark (empty: torch's default); 1 is faster on a machine other jobs share.
DEMO_THREADS ?=

.PHONY: setup test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# superflow needs mmdet3d, whose mmcv must be built with compiled ops against the installed torch
# (about 13 min on 2 cores the first time; pip's wheel cache makes later installs take seconds).
# mmcv/mmengine declare opencv-python, which pulls numpy 2 while nuscenes-devkit needs numpy < 2,
# so the OpenMMLab packages go in without their dependencies and the ones used are added under
# the pin (plugins/superflow/README.md). Only plugins that need them pay for them.
OPENMMLAB := mmengine==0.10.7 mmdet==3.3.0 mmdet3d==1.4.0
OPENMMLAB_DEPS := "numpy<2" addict yapf termcolor terminaltables six tqdm numba
NEEDS_OPENMMLAB := $(filter superflow mutdet,$(PLUGINS))
# Extras per plugin directory: the CPU build of spconv for superflow; nilearn (the MNI152 template,
# real anatomy for the anatomy-matching tests and benchmark) for medssl.
EXTRAS_superflow := [spconv-cpu]
EXTRAS_medssl := [test]

$(VENV)/.installed: $(BIN)/python pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
ifneq ($(NEEDS_OPENMMLAB),)
	$(BIN)/python -m pip install --quiet "setuptools>=77,<81" wheel packaging "numpy<2"
	MMCV_WITH_OPS=1 $(BIN)/python -m pip install --quiet --no-build-isolation --no-deps mmcv==2.1.0
	$(BIN)/python -m pip install --quiet --no-deps $(OPENMMLAB)
	$(BIN)/python -m pip install --quiet $(OPENMMLAB_DEPS)
endif
	$(BIN)/python -m pip install --quiet -e ".[test]" $(foreach p,$(PLUGINS),-e "plugins/$(p)$(EXTRAS_$(p))")
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/accord demo --out $(DEMO_OUT) $(foreach p,$(PLUGINS),--plugin $(p)) $(if $(DEMO_THREADS),--threads $(DEMO_THREADS))

clean:
	rm -rf $(VENV) runs build *.egg-info
