"""Honest baselines (issue 5): our SparseGPT and Wanda against llm-compressor's
``SparseGPTModifier`` and ``WandaPruningModifier`` on the bundled default, in one run.

Same model (the fp32 dequantised SmolLM2-135M), the same 32 x 512 calibration windows (our
seeded sampler, handed to llm-compressor as a tokenized dataset), the same evaluation (64 x 512
tokens of the bundled test text, SparseGPT protocol), 50 % unstructured and 2:4, every decoder
linear (q, k, v, o, gate, up, down; not the LM head).

llm-compressor pins its own transformers, so it lives in its own environment::

    python3 -m venv .venv-llmc
    .venv-llmc/bin/pip install torch==2.13.0
    .venv-llmc/bin/pip install -c <(echo torch==2.13.0) llmcompressor gguf accelerate -e .
    .venv-llmc/bin/python bench/compare_llmcompressor.py

Writes ``bench/llmcompressor/results.json`` and ``results.md``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm_surgeon.config import PruneConfig
from llm_surgeon.data.corpora import load_text
from llm_surgeon.data.windows import calibration_windows, tokenize
from llm_surgeon.driver import prune
from llm_surgeon.evaluate.runner import evaluate_loaded
from llm_surgeon.models.layouts import count_parameters
from llm_surgeon.models.load import cache_dir, load_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "llmcompressor"
MODEL = "smollm2-135m"
CALIB, SEQLEN, EVAL_WINDOWS, SEED = 32, 512, 64, 0
TARGETS = [r"re:.*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"]
POINTS = [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"),
          ("wanda", "2:4")]


def llmcompressor_ppl(base, tokenizer, windows, method: str, structure: str) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    model = copy.deepcopy(base)
    mask = "2:4" if structure == "2:4" else "0:0"
    if method == "sparsegpt":
        recipe = SparseGPTModifier(sparsity=0.5, mask_structure=mask, block_size=128,
                                   dampening_frac=0.01, targets=TARGETS, ignore=["lm_head"])
    else:
        recipe = WandaPruningModifier(sparsity=0.5, mask_structure=mask, targets=TARGETS,
                                      ignore=["lm_head"])
    ds = Dataset.from_dict({"input_ids": windows.tolist(),
                            "attention_mask": torch.ones_like(windows).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=CALIB,
            max_seq_length=SEQLEN)
    elapsed = time.perf_counter() - start
    res = evaluate_loaded(model, tokenizer, "sotu", SEQLEN, EVAL_WINDOWS,
                          desc=f"llm-compressor {method} {structure}")
    counts = count_parameters(model)
    return {"ppl": res["ppl"], "time_s": elapsed,
            "sparsity": 1 - counts["params_decoder_linear_nonzero"]
            / counts["params_decoder_linear"]}


def ours_ppl(method: str, structure: str) -> dict:
    cfg = PruneConfig(model=MODEL, method=method, structure=structure,
                      sparsity=0.5 if structure == "unstructured" else None,
                      calib_samples=CALIB, seqlen=SEQLEN, eval_windows=EVAL_WINDOWS, seed=SEED,
                      shots=1)
    start = time.perf_counter()
    report = prune(cfg, dense_ppl=1.0)  # the dense model is measured once, below
    return {"ppl": report["ppl"], "time_s": time.perf_counter() - start,
            "sparsity": report["sparsity_achieved"]}


def main() -> None:
    import llmcompressor

    OUT.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model(MODEL)
    ids = tokenize(tokenizer, load_text("sotu", "train"), cache=cache_dir() / "tokens")
    windows = calibration_windows(ids, CALIB, SEQLEN, seed=SEED)
    dense = evaluate_loaded(base, tokenizer, "sotu", SEQLEN, EVAL_WINDOWS, desc="dense")["ppl"]
    partial = OUT / "partial.json"  # one row per finished point: a rerun resumes
    rows = json.loads(partial.read_text()) if partial.exists() else []
    done = {(r["method"], r["structure"]) for r in rows}
    for method, structure in POINTS:
        if (method, structure) in done:
            continue
        theirs = llmcompressor_ppl(base, tokenizer, windows, method, structure)
        ours = ours_ppl(method, structure)
        rows.append({"method": method, "structure": structure, "ours": ours,
                     "llmcompressor": theirs,
                     "relative_gap": ours["ppl"] / theirs["ppl"] - 1.0})
        print(rows[-1], flush=True)
        partial.write_text(json.dumps(rows, indent=2) + "\n")
    result = {"dense_ppl": dense, "llmcompressor_version": llmcompressor.__version__,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Our SparseGPT and Wanda against llm-compressor {llmcompressor.__version__} on the "
        "bundled SmolLM2-135M, measured in one run by `bench/compare_llmcompressor.py`: same "
        f"{CALIB} x {SEQLEN} calibration windows, {EVAL_WINDOWS} x {SEQLEN} evaluation tokens "
        f"(dense ppl {dense:.2f}).",
        "",
        "| method | structure | ours: ppl | llm-compressor: ppl | ours / theirs − 1 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['structure']} | {r['ours']['ppl']:.2f} | "
                     f"{r['llmcompressor']['ppl']:.2f} | {100 * r['relative_gap']:+.1f} % |")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    partial.unlink()
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
