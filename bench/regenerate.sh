#!/usr/bin/env bash
# Regenerate every committed result under bench/ for the bundled default, in one command:
#
#     bash bench/regenerate.sh            # resumes: finished runs are reused
#     bash bench/regenerate.sh --fresh    # from scratch: drops the recorded runs first
#
# Every step is resumable on its own (a matrix skips the runs whose JSON exists, a killed prune
# continues from its last shot's checkpoint), so after an interruption the same command picks
# up where it stopped. Several hours on 2 CPU cores; the per-step commands are in each file.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if [[ "${1:-}" == "--fresh" ]]; then
  rm -rf bench/surgeon/runs bench/methods/runs bench/ablation/runs bench/driver/runs bench/scale7b/runs \
         bench/zeroshot/partial.json \
         bench/llmcompressor/partial.json out/bench-shrink out/bench-streaming out/shot-curve \
         out/bench-llamacpp
fi

# LLM Surgeon and its remove-only baselines (issue 3), the other methods (issue 5)
$BIN/llm-surgeon bench --config bench/surgeon.yaml --output bench/surgeon
$BIN/llm-surgeon report bench/surgeon
$BIN/llm-surgeon bench --config bench/methods.yaml --output bench/methods
$BIN/llm-surgeon report bench/methods

# perplexity after every shot, with the per-layer heat map (issue 6)
if [[ -d out/shot-curve/checkpoint ]]; then
  $BIN/llm-surgeon -q prune --resume out/shot-curve
elif [[ ! -f out/shot-curve/report.json ]]; then
  $BIN/llm-surgeon -q prune --method surgeon --structure rows-columns --sparsity 0.2 --shots 5 \
    --eval-every-shot --output out/shot-curve
fi
$BIN/llm-surgeon report out/shot-curve
mkdir -p bench/shot-curve
cp -r out/shot-curve/report.json out/shot-curve/summary.md out/shot-curve/plots bench/shot-curve/

# physically smaller models and their speed (issue 4), zero-shot accuracy (issue 6),
# streaming under a memory budget (issue 7)
$BIN/python bench/shrink.py
$BIN/python bench/zeroshot.py
$BIN/python bench/streaming.py

# the shrunk models in llama.cpp: GGUF export, perplexity, decode speed (issue 15)
$BIN/python bench/llamacpp.py
$BIN/python bench/llamacpp_wide.py

# the one driver against the old two: memory and time of the in-memory runs (issue 12), and
# where the surgeon's time goes at Llama-2-7B's layer shapes (about an hour, ~16 GB)
$BIN/python bench/driver_memory.py
$BIN/python bench/scale7b.py --max-memory 18GB

# the ablation of issue 16 (choosing settings on the validation split)
$BIN/llm-surgeon bench --config bench/ablation.yaml --output bench/ablation

# llm-compressor's SparseGPT and Wanda next to ours (issue 5), in its own environment
if [[ ! -x .venv-llmc/bin/python ]]; then
  python3 -m venv .venv-llmc
  .venv-llmc/bin/pip install -q torch==2.13.0
  .venv-llmc/bin/pip install -q -c <(echo torch==2.13.0) llmcompressor gguf accelerate -e .
fi
.venv-llmc/bin/python bench/compare_llmcompressor.py

# the README's table of results and docs/img/results.png, from the JSON above (issue 17)
$BIN/python bench/readme_results.py
