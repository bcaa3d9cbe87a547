# Two entry points do all set-up on a fresh machine: `make report` and `make test`.
# The virtual environment is cached under $(BONY_CACHE), keyed by the hash of requirements.lock,
# so clones and CI runs reuse it until a pin changes.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
BONY_CACHE ?= $(HOME)/.cache/bony
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
VENV := $(BONY_CACHE)/venv-$(LOCK_HASH)
MATHJAX := $(BONY_CACHE)/mathjax-3.2.2
RUN ?= runs/demo
export PATH := $(VENV)/bin:$(PATH)
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: env report test lab browser check-book slurm-check clean help venv-path

help:
	@echo "make report  - environment, demo data, the numbered notebooks (papermill), HTML book in _build/html"
	@echo "make test    - environment, the browser where the machine allows it, and the test suite"
	@echo "make lab     - JupyterLab on the notebooks with the project environment as the kernel 'bony' (LAB_PORT=8888)"
	@echo "make check-book - the built book (make report) in headless Chromium: every page, screenshots in $(RUN)/screenshots"
	@echo "make slurm-check - the sbatch scripts on a one-node SLURM started here (root, ~10 min; not in make test)"
	@echo "make clean   - remove the run folder and the book build (the cached environment stays)"
	@echo "make venv-path - print the cached environment's folder (source it: \$$(make -s venv-path)/bin/activate)"

venv-path:
	@echo $(VENV)

# The stamp .ready is written last: an install that was killed leaves no stamp, and the next
# call starts that environment again from scratch. (A venv cannot be built elsewhere and
# renamed: its scripts carry the path they were made in.) No prerequisite: the lock's hash is in
# the path, and a fresh clone's newer file times must not rebuild a shared environment.
$(VENV)/.ready:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Bony needs Python 3.11)"; exit 1; }
	rm -rf $(VENV) && mkdir -p $(BONY_CACHE)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.lock
	touch $(VENV)/.ready
	@# one cached environment: those of older locks go once this one is complete
	find "$(BONY_CACHE)" -mindepth 1 -maxdepth 1 -type d -name 'venv-*' ! -name 'venv-$(LOCK_HASH)' -exec rm -rf {} +

# The package is installed editable on every call: the cached environment is shared between
# clones, and this points it at the clone that runs. Under a lock: two clones running make at
# once (CI and a developer) raced here, one removing the `bony` script while the other installed it.
env: $(VENV)/.ready
	flock $(VENV)/.install.lock $(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .

# MathJax 3 from the npm registry, copied into the book's static files: the report works offline.
$(MATHJAX)/es5/tex-chtml.js:
	rm -rf $(MATHJAX).tmp && mkdir -p $(MATHJAX).tmp
	cd $(MATHJAX).tmp && npm pack --silent mathjax@3.2.2 >/dev/null && tar -xzf mathjax-3.2.2.tgz
	rm -rf $(MATHJAX) && mv $(MATHJAX).tmp/package $(MATHJAX) && rm -rf $(MATHJAX).tmp

book/_static/mathjax/tex-chtml.js: $(MATHJAX)/es5/tex-chtml.js
	rm -rf book/_static/mathjax && mkdir -p book/_static
	cp -r $(MATHJAX)/es5 book/_static/mathjax

# Headless Chromium for the browser test (tests/test_browser.py, Playwright drives the system's browser): Debian's
# package, installed as root where apt-get exists; elsewhere the test skips and says how to get one (BONY_CHROMIUM
# names a Chromium of your own).
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$${BONY_CHROMIUM:-}" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no Chromium and no root apt-get here: the browser test will skip (install chromium, or set BONY_CHROMIUM)"; fi

report: env book/_static/mathjax/tex-chtml.js
	bony synth all $(RUN)/data --config configs/synth/demo.yaml
	bony report --run $(RUN) --config configs/report/demo.yaml
	@echo "report: $(CURDIR)/_build/html/index.html"

test: env browser book/_static/mathjax/tex-chtml.js
	python -m pytest $(PYTEST_ARGS)

# JupyterLab at the repository root on notebooks/, the environment installed as the kernel "bony" (Ctrl-C stops it).
LAB_PORT ?= 8888
lab: env
	python -m bonylib.lab --port $(LAB_PORT)

# The book that `make report` built, in headless Chromium: every page, links, images, scripts, formulas, error cells.
check-book: env browser
	python -m tests.browser _build/html --run $(RUN)

# Installs and starts a one-node SLURM on this machine and runs the cluster path through it: slurm/check.sh.
slurm-check: env book/_static/mathjax/tex-chtml.js
	bash slurm/check.sh

clean:
	rm -rf $(RUN) _build book/executed book/_static/mathjax
