# Two commands on a fresh machine with only Python:
#   make run    set up .venv and meta-train on the Omniglot data shipped in the repo, then test on Lake's 20 runs
#   make test   set up .venv (with learn2learn as a test oracle) and run the test suite and the notebooks; tests
#               that need the full Omniglot read it from $LIT_META_DATA or data/ and are skipped without it
#               (LIT_META_REQUIRE_DATA=1 fails them instead, as .ci/run does)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup l2l run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

l2l: $(STAMP)
	PYTHON=$(CURDIR)/$(BIN)/python bash scripts/install_learn2learn.sh

run: $(STAMP)
	$(BIN)/python -m lit_meta fit

test: $(STAMP) l2l
	LIT_META_REQUIRE_L2L=1 $(BIN)/python -m pytest -q --durations=15 tests
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --nbmake --nbmake-timeout=1200 notebooks

clean:
	rm -rf $(VENV) runs .pytest_cache
