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
# only beside PyPI's own torch. The conch package is on no registry: it comes from
# PROALIGN_CONCH_SRC (a CONCH checkout or wheel) when given, else from its git URL when that is
# reachable; without it, the conch-package test skips and CONCH is checked against timm and
# open_clip parts wired as CONCH. CONCH v1.5's official code is TRIDENT's model file, also on no
# registry: PROALIGN_TRIDENT_SRC (a TRIDENT checkout) adds the check against it, with einops and
# einops-exts from PyPI (installed only then); without it that test skips (docs/ENCODERS.md).
PARITY_VENV ?= .venv-parity
PARITY_PY := $(PARITY_VENV)/bin/python
PARITY_PIP := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
	PIP_CONFIG_FILE=/dev/null $(PARITY_PY) -m pip -q
CONCH_GIT := git+https://github.com/mahmoodlab/CONCH@141cc09c7d4ff33d8eda562bd75169b457f71a62
PARITY_REPORT := build/parity-report.jsonl

$(PARITY_VENV)/.installed: requirements-parity.txt setup.py pyproject.toml
	rm -rf $(PARITY_VENV)
	$(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PIP) install --upgrade pip
	PROALIGN_NO_NATIVE=1 $(PARITY_PIP) install -r requirements-parity.txt -e .
	@if timeout 120 $(PARITY_PIP) install --no-deps "$(CONCH_GIT)" >$(PARITY_VENV)/conch-install.log 2>&1; \
	then touch $(PARITY_VENV)/.conch; \
	else echo "parity: no conch package (its git URL failed: $(PARITY_VENV)/conch-install.log; PROALIGN_CONCH_SRC adds it)"; fi
	touch $@

parity-install: $(PARITY_VENV)/.installed

parity: $(PARITY_VENV)/.installed
	@if [ -n "$(PROALIGN_CONCH_SRC)" ]; then \
	  $(PARITY_PIP) install --no-deps "$(PROALIGN_CONCH_SRC)" && touch $(PARITY_VENV)/.conch; fi
	@if [ -n "$(PROALIGN_TRIDENT_SRC)" ]; then $(PARITY_PIP) install --no-deps einops==0.8.2 einops-exts==0.0.4; fi
	mkdir -p build && rm -f $(PARITY_REPORT)
	PROALIGN_REQUIRE_OFFICIAL="torchvision,timm,open_clip,transformers$$([ -f $(PARITY_VENV)/.conch ] && echo ,conch)$$([ -n "$(PROALIGN_TRIDENT_SRC)" ] && echo ,einops,einops_exts)" \
	PROALIGN_TRIDENT_SRC="$(PROALIGN_TRIDENT_SRC)" PROALIGN_PARITY_REPORT=$(PARITY_REPORT) \
	$(PARITY_PY) -m pytest -q -p no:cacheprovider tests/test_official_parity.py tests/test_encoders.py
	$(PARITY_PY) tests/test_official_parity.py $(PARITY_REPORT)
