# The two commands a fresh clone needs: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU build here; the package itself asks only for torch>=2.4.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,finetune]'
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(BIN)/mmgpt serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app models bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

.PHONY: test-compose
# The compose stack built and run for real, then torn down (as root on Debian; installs
# docker.io and friends): see docker/test-compose.sh.
test-compose:
	bash docker/test-compose.sh

.PHONY: test-ray
# Ray Serve: two replicas on a local Ray cluster (loopback, 2 CPUs) serve concurrent captions
# and completions, one is killed and replaced; installs the ray extra when it is missing.
test-ray: $(STAMP)
	$(BIN)/python -c "import ray.serve, psutil" 2>/dev/null || $(BIN)/pip install --quiet -e '.[ray,dev]'
	MMGPT_TEST_RAY=1 $(BIN)/python -m pytest -q tests/ray

.PHONY: soak
# The long soak: thousands of mixed requests (text, chat, caption, QA; plain, streamed,
# abandoned) against a real server on 127.0.0.1; its result table goes into RELIABILITY.md.
SOAK_REQUESTS ?= 10000
soak: $(STAMP)
	SOAK_REQUESTS=$(SOAK_REQUESTS) SOAK_RECORD=RELIABILITY.md $(BIN)/python -m pytest -q -s \
		-o timeout=3600 tests/reliability/test_soak.py
