# Set-up and the two jobs of the README. Everything goes into a project-local .venv.
# torch 2.13.0 is installed first and on its own: any other torch spec pulls GBs of CUDA wheels.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
PIP     = $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install demo test lint bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

# The main job on the embedded default: SmolLM2-135M (bundled) on the bundled State of the
# Union text. Writes out/demo/.
demo: install
	$(BIN)/llm-surgeon eval --model smollm2-135m --data sotu --seqlen 512 --eval-windows 64 \
		--json out/demo/dense.json

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests bench

clean-venv:
	rm -rf $(VENV)
