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
    OMP_NUM_THREADS=2 .venv-llmc/bin/python bench/compare_llmcompressor.py --times

Writes ``bench/llmcompressor/results.json`` and ``results.md``. ``--times`` measures prune time
instead (SparseGPT and Wanda at 50 % unstructured): both sides prune a copy of the same
in-memory model on the same windows in this one process (same thread count), alternating which
goes first, ``--repeats`` times; theirs is ``oneshot`` (its pipeline, calibration passes and
pruning), ours the layer-wise pass (``run_layerwise``: layer-0 inputs, per layer statistics,
pruning and the pass to the next layer). Wall and process CPU time are recorded with the load
average (the machine may be shared), and added to the same two files next to the quality rows.
``--model`` and ``--out`` run the same comparison on another model (a proxy) elsewhere.
"""

from __future__ import annotations

import argparse
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
from llm_surgeon.driver import prune, run_layerwise
from llm_surgeon.evaluate.runner import evaluate_loaded
from llm_surgeon.methods.registry import get_method
from llm_surgeon.models.layouts import count_parameters, decoder_linears
from llm_surgeon.models.load import cache_dir, load_model
from llm_surgeon.structures import Unstructured

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "llmcompressor"
MODEL = "smollm2-135m"
CALIB, SEQLEN, EVAL_WINDOWS, SEED = 32, 512, 64, 0
TARGETS = [r"re:.*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"]
POINTS = [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"),
          ("wanda", "2:4")]


def llmcompressor_prune(model, windows, method: str, structure: str) -> float:
    """Prune ``model`` in place with llm-compressor's ``oneshot``; its wall time."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

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
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1])
    return time.perf_counter() - start


def llmcompressor_ppl(base, tokenizer, windows, method: str, structure: str) -> dict:
    model = copy.deepcopy(base)
    elapsed = llmcompressor_prune(model, windows, method, structure)
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


def ours_prune(model, windows, method: str) -> float:
    """Prune ``model`` in place with our layer-wise pass at 50 % unstructured; its wall time."""
    cfg = PruneConfig(model=MODEL, method=method, structure="unstructured", sparsity=0.5,
                      calib_samples=windows.shape[0], seqlen=windows.shape[1], seed=SEED)
    targets = decoder_linears(model)
    start = time.perf_counter()
    run_layerwise(model, targets, get_method(method, cfg), Unstructured(), 0.5,
                  windows, batch_size=1, progress=False)
    return time.perf_counter() - start


def decoder_sparsity(model) -> float:
    counts = count_parameters(model)
    return 1 - counts["params_decoder_linear_nonzero"] / counts["params_decoder_linear"]


def prune_times(base, windows, methods: list[str], repeats: int, tokenizer=None,
                partial: Path | None = None) -> list[dict]:
    """Each method pruned by both sides, alternating which goes first, ``repeats`` times; wall
    and CPU seconds of every prune, the load average around it, the sparsity reached; with a
    ``tokenizer``, the perplexity of the first repeat's models too (outside the timing). Every
    finished run is also written to ``partial`` (an interrupted run keeps what it measured)."""
    prune_fns = {"ours": lambda m, meth: ours_prune(m, windows, meth),
                 "llmcompressor": lambda m, meth: llmcompressor_prune(m, windows, meth,
                                                                      "unstructured")}
    runs = []
    for rep in range(repeats):
        for method in methods:
            order = ("llmcompressor", "ours") if rep % 2 == 0 else ("ours", "llmcompressor")
            for side in order:
                model = copy.deepcopy(base)
                load_before = os.getloadavg()[0]
                cpu = time.process_time()
                wall = prune_fns[side](model, method)
                cpu = time.process_time() - cpu
                runs.append({"method": method, "side": side, "repeat": rep, "wall_s": wall,
                             "cpu_s": cpu, "load_before": load_before,
                             "load_after": os.getloadavg()[0],
                             "sparsity": decoder_sparsity(model)})
                if tokenizer is not None and rep == 0:
                    runs[-1]["ppl"] = evaluate_loaded(model, tokenizer, "sotu", SEQLEN,
                                                      EVAL_WINDOWS, desc="ppl")["ppl"]
                print(runs[-1], flush=True)
                if partial is not None:
                    partial.write_text(json.dumps(runs, indent=2) + "\n")
                del model
    return runs


def time_summary(runs: list[dict]) -> list[dict]:
    """Per method: the median wall and CPU seconds of each side and ours / theirs."""
    import statistics

    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        row: dict = {"method": method}
        for side in ("ours", "llmcompressor"):
            mine = [r for r in runs if r["method"] == method and r["side"] == side]
            row[side] = {k: statistics.median(r[k] for r in mine) for k in ("wall_s", "cpu_s")}
        row["wall_ratio"] = row["ours"]["wall_s"] / row["llmcompressor"]["wall_s"]
        row["cpu_ratio"] = row["ours"]["cpu_s"] / row["llmcompressor"]["cpu_s"]
        out.append(row)
    return out


def time_lines(result: dict) -> list[str]:
    t = result["prune_time"]
    loads = [x for r in t["runs"] for x in (r["load_before"], r["load_after"])]
    lines = [
        "",
        f"Prune time, SparseGPT and Wanda at 50 % unstructured, measured side by side by "
        f"`bench/compare_llmcompressor.py --times` ({t['threads']} threads, the same "
        f"{t['windows']} x {t['seqlen']} windows, both sides pruning a copy of the same model in "
        f"one process, alternating which goes first; medians of {t['repeats']} each; load "
        f"average {min(loads):.1f}–{max(loads):.1f} on a shared {os.cpu_count()}-core machine). "
        "Theirs: `oneshot` (pipeline, calibration passes, pruning); ours: the layer-wise pass "
        "(layer-0 inputs, per-layer statistics, pruning, the pass to the next layer).",
        "",
        "| method | ours: wall s | llm-compressor: wall s | ours / theirs (wall) "
        "| ours: CPU s | llm-compressor: CPU s | ours / theirs (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    ppl = {(r["method"], r["side"]): r["ppl"] for r in t["runs"] if "ppl" in r}
    for r in t["summary"]:
        lines.append(f"| {r['method']} | {r['ours']['wall_s']:.1f} | "
                     f"{r['llmcompressor']['wall_s']:.1f} | {r['wall_ratio']:.2f} | "
                     f"{r['ours']['cpu_s']:.1f} | {r['llmcompressor']['cpu_s']:.1f} | "
                     f"{r['cpu_ratio']:.2f} |")
    if ppl:
        lines += ["", "Perplexity of the timed models (first repeat): " + "; ".join(
            f"{m} ours {ppl[(m, 'ours')]:.2f}, llm-compressor {ppl[(m, 'llmcompressor')]:.2f}"
            for m in dict.fromkeys(k[0] for k in ppl)) + "."]
    return lines


def times_main(model_spec: str, out: Path, methods: list[str], repeats: int, ppl: bool
               ) -> None:
    import llmcompressor

    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model(model_spec)
    ids = tokenize(tokenizer, load_text("sotu", "train"), cache=cache_dir() / "tokens")
    windows = calibration_windows(ids, CALIB, SEQLEN, seed=SEED)
    runs = prune_times(base, windows, methods, repeats, tokenizer if ppl else None,
                       out / "prune_time_partial.json")
    path = out / "results.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["prune_time"] = {"model": model_spec, "threads": torch.get_num_threads(),
                            "windows": CALIB, "seqlen": SEQLEN, "repeats": repeats,
                            "llmcompressor_version": llmcompressor.__version__,
                            "torch": torch.__version__, "runs": runs,
                            "summary": time_summary(runs)}
    path.write_text(json.dumps(result, indent=2) + "\n")
    md = out / "results.md"
    text = md.read_text() if md.exists() else ""
    text = text.split("\nPrune time,")[0].rstrip("\n")  # replace an earlier time table
    (md).write_text(text + "\n" + "\n".join(time_lines(result)) + "\n")
    (out / "prune_time_partial.json").unlink(missing_ok=True)
    print("\n".join(time_lines(result)))


def main() -> None:
    import llmcompressor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--times", action="store_true", help="measure prune time (see above)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--eval", action="store_true",
                    help="with --times: perplexity of the first repeat's models too")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.times:
        times_main(args.model, args.out, args.methods, args.repeats, args.eval)
        return

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
    earlier = OUT / "results.json"
    if earlier.exists() and "prune_time" in (old := json.loads(earlier.read_text())):
        result["prune_time"] = old["prune_time"]  # kept: measured by --times
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
    if "prune_time" in result:
        lines += time_lines(result)
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    partial.unlink()
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
