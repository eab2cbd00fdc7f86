# The two commands: `make demo` (set up + run the pipeline end-to-end on the bundled data)
# and `make test` (set up + run the test suite). Both install into .venv inside the repo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
# test processes (pytest-xdist), each test file in one of them: most tests wait on JVMs, servers and subprocesses
TEST_WORKERS ?= 4

.PHONY: venv demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	PATH=$(abspath $(BIN)):$$PATH bash jobs/demo.sh $(RUN)

test: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
