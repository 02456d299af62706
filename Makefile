# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q

.PHONY: demo test test-slow install clean parity parity-install

$(VENV)/.installed: setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/proalign-engine doctor
	$(PY) -m proalign.demo --out demo

# `make test`: every test but the slow end-to-end runs (minutes here); `make test-slow`: those (CI runs both).
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) $(PARITY_VENV) build demo *.egg-info

# Official parity (CI runs it after `make test`; README "Official parity"): a second environment
# with PyPI's torch, torchvision, timm, open_clip_torch and transformers (requirements-parity.txt)
# in which tests/test_official_parity.py checks every encoder against the official code at real
# sizes. Its pip sees PyPI only: this machine's pip configuration (the local wheel folder with the
# CPU torch, the torch version cap, local mirrors) is left out, because PyPI's torchvision imports
# only beside PyPI's own torch. The conch package (CONCH v1's official code) is not on PyPI under
# its own name: it comes from PROALIGN_CONCH_SRC (a CONCH checkout or wheel) when given, else from
# PyPI's `conch-fork` 0.1.0 (a third party's upload whose conch/ files are byte-identical to
# mahmoodlab/CONCH 141cc09), pinned by hash in requirements-conch.txt; either way `conch` must
# import (PROALIGN_REQUIRE_OFFICIAL), so the conch-package test runs in every CI run. The two
# install the same `conch/` files under different names, so the one not wanted is removed first.
# CONCH v1.5's official code is TRIDENT's model file, on no registry: PROALIGN_TRIDENT_SRC (a
# TRIDENT checkout) adds the check against it, with einops and einops-exts from PyPI (installed
# only then); without it that test skips (docs/ENCODERS.md).
PARITY_VENV ?= .venv-parity
PARITY_PY := $(PARITY_VENV)/bin/python
PARITY_PIP := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
	PIP_CONFIG_FILE=/dev/null $(PARITY_PY) -m pip -q
PARITY_REPORT := build/parity-report.jsonl

$(PARITY_VENV)/.installed: requirements-parity.txt setup.py pyproject.toml
	rm -rf $(PARITY_VENV)
	$(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PIP) install --upgrade pip
	PROALIGN_NO_NATIVE=1 $(PARITY_PIP) install -r requirements-parity.txt -e .
	touch $@

parity-install: $(PARITY_VENV)/.installed

parity: $(PARITY_VENV)/.installed requirements-conch.txt
	@rm -f $(PARITY_VENV)/.conch
	@if [ -n "$(PROALIGN_CONCH_SRC)" ]; then \
	  if $(PARITY_PY) -m pip show -q conch-fork 2>/dev/null; then $(PARITY_PIP) uninstall -y conch-fork; fi; \
	  $(PARITY_PIP) install --no-deps "$(PROALIGN_CONCH_SRC)"; \
	else \
	  if $(PARITY_PY) -m pip show -q conch 2>/dev/null; then $(PARITY_PIP) uninstall -y conch; fi; \
	  $(PARITY_PIP) install --no-deps --require-hashes -r requirements-conch.txt; \
	fi && touch $(PARITY_VENV)/.conch
	@if [ -n "$(PROALIGN_TRIDENT_SRC)" ]; then $(PARITY_PIP) install --no-deps einops==0.8.2 einops-exts==0.0.4; fi
	mkdir -p build && rm -f $(PARITY_REPORT)
	PROALIGN_REQUIRE_OFFICIAL="torchvision,timm,open_clip,transformers$$([ -f $(PARITY_VENV)/.conch ] && echo ,conch)$$([ -n "$(PROALIGN_TRIDENT_SRC)" ] && echo ,einops,einops_exts)" \
	PROALIGN_TRIDENT_SRC="$(PROALIGN_TRIDENT_SRC)" PROALIGN_PARITY_REPORT=$(PARITY_REPORT) \
	$(PARITY_PY) -m pytest -q -p no:cacheprovider tests/test_official_parity.py tests/test_encoders.py
	$(PARITY_PY) tests/test_official_parity.py $(PARITY_REPORT)
