# Two commands: `make demo` and `make test`. Each creates .venv when absent and installs
# everything under requirements/lock.txt's exact pins; a second run skips the install.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
LOCK   := requirements/lock.txt
STAMP  := $(VENV)/.installed

.PHONY: demo test install prometheus clean-venv

install: $(STAMP) prometheus

# Prometheus and promtool (the monitoring tests run the real ones): Debian's package,
# installed only when either is missing from PATH.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; else \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends prometheus; fi

# Order matters: torch first, pinned to the local CPU build (a bare `torch` would pull a
# multi-GB CUDA build); then the rest; then deepspeed without build isolation, or its build
# would fetch another torch; open_clip_torch without its dependencies (its package imports
# torchvision, which would bring another torch: the project reads CLIP's vocabulary file
# from it, and the parity tests load its loss and tokenizer modules from their files);
# then this project without touching dependencies.
$(STAMP): $(LOCK) requirements/base.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) pip setuptools
	$(PIP) install -q -c $(LOCK) torch
	$(PIP) install -q -c $(LOCK) -r requirements/base.txt
	$(PIP) install -q -c $(LOCK) --no-build-isolation deepspeed
	$(PIP) install -q -c $(LOCK) --no-deps open_clip_torch
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlm demo --config configs/demo.yaml --overwrite

# DeepSpeed compiles its CPU collective op on the first multi-rank start, by default into
# ~/.cache/torch_extensions, shared by every checkout: two checkouts testing at once rebuild
# it in turn, and a build killed midway leaves a lock every later start waits on. One per venv.
test: $(STAMP) prometheus
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions $(PY) -m pytest -q --durations=25 tests

clean-venv:
	rm -rf $(VENV)
