"""The pruned models of ``bench/llamacpp.py`` (resumable: finished prunes are reused).

LLM Surgeon heads-channels on the bundled default with the standard protocol of
``bench/shrink.py`` (32 x 512 calibration tokens, 64 x 512 evaluation tokens; 20 %: 5 shots,
30 %: 2 shots), default channel multiple (32), global and uniform layer sizes.
"""

from __future__ import annotations

from pathlib import Path

from llm_surgeon.config import PruneConfig
from llm_surgeon.run import prune

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "out" / "bench-llamacpp"
SHOTS = {0.2: 5, 0.3: 2}
# the order they are made in: the 30 % models first (the speed target)
PLAN = [(0.3, "global"), (0.3, "uniform"), (0.2, "global"), (0.2, "uniform")]


def folder(sparsity: float, layer_sizes: str) -> Path:
    return MODELS / f"surgeon-hc-{round(100 * sparsity)}-{layer_sizes}-{SHOTS[sparsity]}shots"


def pruned_model(sparsity: float, layer_sizes: str) -> Path:
    """Prune (once) and return the folder of one pruned model."""
    out = folder(sparsity, layer_sizes)
    if (out / "report.json").is_file():
        return out
    cfg = PruneConfig(method="surgeon", structure="heads-channels", sparsity=sparsity,
                      shots=SHOTS[sparsity], calib_samples=32, seqlen=512, eval_windows=64,
                      layer_sizes=layer_sizes, output=str(out))
    prune(cfg, progress=False)
    return out


if __name__ == "__main__":
    for s, ls in PLAN:
        print(pruned_model(s, ls), flush=True)
