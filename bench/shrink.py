"""Structured pruning that really shrinks (issue 4), on the bundled default.

    .venv/bin/python bench/shrink.py            # resumes: finished prunes are reused
    .venv/bin/python bench/shrink.py --prune-only   # only the prunes (speed needs a quiet box)

1. LLM Surgeon in coupled units (heads in whole KV groups, MLP channels; the default consumer
   coupling), 32 x 512 calibration tokens, at 20 % (5 shots), 30 % (2 shots) and 32 % (1 shot)
   of the decoder-linear parameters; each pruned model is physically shrunk and saved
   (safetensors + per-layer sizes) under ``out/bench-shrink/``, with the logits of the
   in-memory model on fixed inputs beside it (``<folder>.probe.pt``).
2. Each saved model is reloaded with ``llm_surgeon.load`` in a fresh process and its logits are
   compared with the in-memory ones.
3. Speed and peak memory of the 30 % model and the dense model, side by side in one run
   (fresh process per measurement, alternating rounds, medians).

Writes ``bench/shrink/results.json`` and ``bench/shrink/results.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from llm_surgeon.config import PruneConfig
from llm_surgeon.driver import prune, strip_private
from llm_surgeon.evaluate.runner import size_and_params, speed_report

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "out" / "bench-shrink"
RESULTS = ROOT / "bench" / "shrink"
DENSE = "smollm2-135m"
TORCH_PRUNING_PPL = 137.6  # independent run quoted by issue 4 (Taylor importance, same size)
# removed fraction -> shots. 30 %: the model of the size and speed targets. 32 %: with the tied
# 28.3M-parameter embedding untouched, 30 % of the decoder linears is 23.7 % of the file; a 25 %
# smaller file needs 31.7 % of them (1 shot: this row is about size, not quality).
LEVELS = {0.2: 5, 0.3: 2, 0.32: 1}
SPEED_LEVEL = 0.3


def _probe_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))


def pruned_model(sparsity: float, shots: int) -> Path:
    out = MODELS / f"surgeon-heads-channels-{round(100 * sparsity)}-{shots}shots"
    probe = out.with_name(out.name + ".probe.pt")  # beside the folder: not a weight file of it
    if (out / "report.json").is_file() and probe.is_file():
        return out
    # channel_multiple=1 (any MLP width): the shapes these committed figures were measured with,
    # before the aligned default (32) existed; bench/llamacpp.py measures the default.
    cfg = PruneConfig(method="surgeon", structure="heads-channels", sparsity=sparsity, shots=shots,
                      calib_samples=32, seqlen=512, eval_windows=64, output=str(out),
                      channel_multiple=1)
    report = prune(cfg)
    model = report["_model"]
    ids = _probe_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    tmp = probe.with_name(probe.name + ".tmp")
    torch.save({"ids": ids, "logits": logits}, tmp)
    os.replace(tmp, probe)
    return out


RELOAD = """
import sys, torch, llm_surgeon
probe = torch.load(sys.argv[1] + ".probe.pt")
model = llm_surgeon.load(sys.argv[1])
with torch.no_grad():
    diff = (model(input_ids=probe["ids"]).logits - probe["logits"]).abs().max().item()
print(diff)
"""


def reload_diff(folder: Path) -> float:
    res = subprocess.run([sys.executable, "-c", RELOAD, str(folder)], capture_output=True,
                         text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--prune-only" in sys.argv:
        for s, shots in LEVELS.items():
            pruned_model(s, shots)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    dense = size_and_params(DENSE)
    rows = []
    for s, shots in LEVELS.items():
        folder = pruned_model(s, shots)
        report = json.loads((folder / "report.json").read_text())
        info = size_and_params(str(folder))
        rows.append({
            "sparsity_target": s,
            "sparsity_achieved": report["sparsity_achieved"],
            "shots": shots,
            "ppl": report["ppl"],
            "ppl_dense": report["ppl_dense"],
            "shrink": report["shrink"],
            "params_decoder_linear": info["params_decoder_linear"],
            "params_total": info["params_total"],
            "size_on_disk_mb": info["size_on_disk_mb"],
            "reload_max_abs_logit_diff": reload_diff(folder),
            "folder": str(folder.relative_to(ROOT)),
        })
    speed_row = next(r for r in rows if r["sparsity_target"] == SPEED_LEVEL)
    # decode at batch 1 is short and noisy on a shared 2-core box: 7 rounds of 128 steps
    speed = speed_report(speed_row["folder"], DENSE, rounds=7, new_tokens=128, counts=speed_row)
    result = {"dense": dense, "pruned": rows, "speed_30": speed,
              "torch_pruning_20_ppl": TORCH_PRUNING_PPL}
    (RESULTS / "results.json").write_text(json.dumps(strip_private(result), indent=2) + "\n")
    (RESULTS / "results.md").write_text(markdown(result))
    print((RESULTS / "results.md").read_text())


def markdown(r: dict) -> str:
    d = r["dense"]
    lines = [
        "Structured pruning in coupled units (heads in whole KV groups, MLP channels), physically",
        "removed, on the bundled SmolLM2-135M (32 x 512 calibration tokens, 64 x 512 evaluation",
        "tokens of the bundled text); each unit costed and compensated by its consumer's columns",
        "(`--unit-coupling consumer`, the default since issue 16's ablation).",
        "Regenerate: `.venv/bin/python bench/shrink.py`.",
        "",
        "| model | removed (target / achieved) | shots | ppl | decoder-linear params | "
        "params total | file (MB) | file vs dense | reload max abs logit diff |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | – | – | {r['pruned'][0]['ppl_dense']:.2f} | {d['params_decoder_linear']:,} | "
        f"{d['params_total']:,} | {d['size_on_disk_mb']:.1f} | 1.000 | – |",
    ]
    for p in r["pruned"]:
        lines.append(
            f"| surgeon heads-channels | {p['sparsity_target']:.2f} / "
            f"{p['sparsity_achieved']:.4f} | {p['shots']} | {p['ppl']:.2f} | "
            f"{p['params_decoder_linear']:,} | "
            f"{p['params_total']:,} | {p['size_on_disk_mb']:.1f} | "
            f"{p['size_on_disk_mb'] / d['size_on_disk_mb']:.3f} | "
            f"{p['reload_max_abs_logit_diff']:.1e} |")
    lines.append(f"| Torch-Pruning, Taylor (independent run, issue 4) | 0.20 | – | "
                 f"{r['torch_pruning_20_ppl']:.1f} | | | | | |")
    s = r["speed_30"]
    b = s["baseline"]
    lines += [
        "",
        "Speed of the 30 % model against the dense model, measured side by side in one run "
        f"(fresh process per measurement, {s['rounds']} alternating rounds, medians; "
        f"{s['threads']} torch threads; decode: {s['prompt_len']}-token prompt then "
        f"{s['new_tokens']} greedy steps with the KV cache; prefill: {s['prefill_len']} tokens):",
        "",
        "| | dense | 30 % pruned | ratio |",
        "|---|---|---|---|",
    ]
    for label, key, fmt in (("decode tok/s, batch 1", "decode_tok_s_b1", ".1f"),
                            ("decode tok/s, batch 8", "decode_tok_s_b8", ".1f"),
                            ("prefill tok/s", "prefill_tok_s", ".1f"),
                            ("peak memory (MB)", "peak_mem_mb", ".0f")):
        lines.append(f"| {label} | {format(b[key], fmt)} | {format(s[key], fmt)} | "
                     f"{s[key] / b[key]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
