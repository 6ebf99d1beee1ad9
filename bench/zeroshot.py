"""Zero-shot accuracy on the bundled offline tasks (issue 6): the dense default and magnitude
pruning at rising unstructured sparsity, through lm-evaluation-harness.

    .venv/bin/python bench/zeroshot.py [--limit N]

Magnitude pruning needs no calibration, so every model is made in memory from the dense one
with ``llm_surgeon.prune_model`` (one shot; the calibration windows it takes go unused).
Writes ``bench/zeroshot/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from llm_surgeon import prune_model
from llm_surgeon.data.corpora import load_text
from llm_surgeon.evaluate.offline_tasks import OFFLINE_TASKS
from llm_surgeon.evaluate.zeroshot import zero_shot
from llm_surgeon.models.load import load_model

OUT = Path(__file__).resolve().parent / "zeroshot"
LEVELS = (0.0, 0.3, 0.5, 0.7)


def magnitude(model, tokenizer, sparsity: float):
    """One-shot global magnitude pruning of a copy of ``model`` (the `magnitude` method of
    `prune`, in memory)."""
    pruned = copy.deepcopy(model)
    if sparsity == 0:
        return pruned
    return prune_model(pruned, tokenizer, load_text("sotu", "train"), method="magnitude",
                       sparsity=sparsity, shots=1, calib_samples=1, seqlen=32).model


def plot(rows: list[dict]) -> None:
    from llm_surgeon.report.plots import accuracy_vs_sparsity

    accuracy_vs_sparsity(rows, OUT / "accuracy.png", chance={"sotu_cloze": 0.25},
                         title="zero-shot accuracy, magnitude pruning (unstructured)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = load_model("smollm2-135m")
    partial = OUT / "partial.json"  # one row per finished level: a rerun resumes
    rows = json.loads(partial.read_text()) if partial.exists() else []
    for s in LEVELS:
        if any(r["sparsity"] == s for r in rows):
            continue
        scores = zero_shot(magnitude(dense, tokenizer, s), tokenizer, list(OFFLINE_TASKS),
                           limit=args.limit)
        rows.append({"sparsity": s, "tasks": scores})
        print(rows[-1], flush=True)
        partial.write_text(json.dumps(rows, indent=2) + "\n")
    rows.sort(key=lambda r: r["sparsity"])
    (OUT / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    partial.unlink()
    lines = ["Zero-shot accuracy on the bundled offline tasks (lm-evaluation-harness), dense and "
             "magnitude-pruned SmolLM2-135M. Regenerate: `.venv/bin/python bench/zeroshot.py`.",
             "", "| magnitude sparsity | " + " | ".join(f"{t} acc" for t in OFFLINE_TASKS)
             + " |", "|---|" + "---|" * len(OFFLINE_TASKS)]
    for r in rows:
        label = "dense" if r["sparsity"] == 0 else f"{r['sparsity']:.0%}"
        lines.append(f"| {label} | " + " | ".join(f"{r['tasks'][t]['acc']:.3f}"
                                                   for t in OFFLINE_TASKS) + " |")
    lines.append("")
    lines.append("Chance: sotu_cloze 0.25 (four choices); sotu_lastword has no fixed chance "
                 "level (open vocabulary).")
    lines += ["", "![zero-shot accuracy against magnitude sparsity](accuracy.png)"]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
