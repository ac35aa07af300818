# The two set-up commands of the README: `make demo` and `make test` (both install first).
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= work_dirs/demo

.PHONY: install browser demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install.sh scripts/build_mmcv.sh
	scripts/install.sh
	@touch $@

browser:
	scripts/install_browser.sh

demo: install
	$(PY) -m densedino.cli.pipeline --work-dir $(DEMO_DIR)

test: install browser lint
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) work_dirs build dist *.egg-info
