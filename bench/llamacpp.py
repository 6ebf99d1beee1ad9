"""The shrunk models in llama.cpp (issue 15), on the bundled default.

    .venv/bin/python bench/llamacpp.py               # everything; resumes (prunes, files, ppl)
    .venv/bin/python bench/llamacpp.py --no-speed    # skip the decode-speed rounds

Needs the ``llamacpp`` extra (``make test`` installs it). Steps:

1. the prunes of ``bench/llamacpp_prunes.py`` (LLM Surgeon heads-channels, 30 % / 2 shots and
   20 % / 1 shot, 32 x 512 calibration tokens, default channel multiple 32; global and uniform
   layer sizes), reused from ``out/bench-llamacpp/`` when finished (``--finished-only``: only
   those, for a partial table);
2. every model (and the dense one) exported with ``llm-surgeon export`` to f32, f16 and q8_0
   GGUF (``out/bench-llamacpp/gguf/``); file sizes;
3. perplexity in llama.cpp on the 64 x 512 evaluation windows of the bundled test text (the
   windows our PyTorch evaluation uses, as token ids; f32 KV cache), f32 and q8_0, against the
   PyTorch figure of each prune's report;
4. uniform models: plain ``transformers`` ``AutoModelForCausalLM.from_pretrained`` loads them
   (max abs logit difference against ``llm_surgeon.load``);
5. decode speed, dense / 20 % / 30 % side by side in one run: a fresh process per measurement,
   models and thread counts alternating within each round, medians over the rounds; against the
   ratio of weight bytes a decode step reads (from the GGUF tensor sizes).

Writes ``bench/llamacpp/results.json`` and ``bench/llamacpp/results.md``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp_prunes import MODELS, PLAN, pruned_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "llamacpp"
FILES = MODELS / "gguf"
DENSE = "smollm2-135m"
TYPES = ("f32", "f16", "q8_0")
PPL_TYPES = ("f32", "q8_0")
SPEED_TYPES = ("f16", "q8_0")
THREADS = (1, 2)
ROUNDS = 3
PROMPT, NEW_TOKENS = 64, 128
# decode speed: the 30 % uniform model exports as plain ``llama`` (the global one as ``deci``,
# per-layer sizes), so the two show what the per-layer graph costs at about the same bytes
SPEED_MODELS = ("dense", "hc20-global", "hc30-global", "hc30-uniform")


def name_of(sparsity: float | None, layer_sizes: str | None) -> str:
    return "dense" if sparsity is None else f"hc{round(100 * sparsity)}-{layer_sizes}"


def export_all(models: dict[str, str]) -> dict[str, dict[str, Path]]:
    """Every model in every type (existing files are reused)."""
    from llm_surgeon.export.gguf import export_gguf

    FILES.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Path]] = {}
    for name, spec in models.items():
        out[name] = {}
        for t in TYPES:
            path = FILES / f"{name}.{t}.gguf"
            if not path.is_file():
                export_gguf(spec, path, t)
            out[name][t] = path
    return out


def cached(key: str, compute):
    """A figure kept in ``out/bench-llamacpp/cache.json`` so that a rerun resumes."""
    path = MODELS / "cache.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if key not in data:
        data[key] = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    return data[key]


def eval_windows():
    from llm_surgeon.evaluate.runner import eval_windows_for
    from llm_surgeon.models.load import load_model

    _, tok = load_model(DENSE)
    return eval_windows_for(tok, "sotu", 512, 64, None).numpy()


def pytorch_perplexity(spec: str, windows) -> float:
    """Our PyTorch perplexity of a model on exactly these windows (for the llama.cpp check)."""
    import torch

    from llm_surgeon.evaluate.perplexity import evaluate_perplexity
    from llm_surgeon.models.load import load_model

    model, _ = load_model(spec, with_tokenizer=False)
    return evaluate_perplexity(model, torch.from_numpy(windows), progress=False)["ppl"]


def ppl_windows() -> int:
    """``--ppl-windows N``: llama.cpp perplexity on the first N evaluation windows (default all
    64); PyTorch is then measured on the same N as well."""
    if "--ppl-windows" in sys.argv:
        return int(sys.argv[sys.argv.index("--ppl-windows") + 1])
    return 64


def plain_load_diff(folder: str) -> float:
    """Max abs logit difference between plain ``from_pretrained`` and ``llm_surgeon.load``."""
    import torch
    from transformers import AutoModelForCausalLM

    import llm_surgeon

    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits
        b = llm_surgeon.load(folder)(input_ids=ids).logits
    return float((a - b).abs().max())


SPEED = """
import json, sys
from llm_surgeon.export.llamacpp import paired_decode_speed
paths = sys.argv[4:]
print(json.dumps(paired_decode_speed(paths, list(range(100, 100 + int(sys.argv[1]))),
                                     int(sys.argv[2]), int(sys.argv[3]))))
"""


def measure_speed(files: dict[str, dict[str, Path]], names: list[str],
                  types: tuple[str, ...] = SPEED_TYPES) -> dict:
    """Decode tok/s per (type, threads, model): in each round a fresh process decodes with all
    models in turn, one step each (:func:`~llm_surgeon.export.llamacpp.paired_decode_speed`,
    the model order rotating between rounds); medians over the rounds."""
    runs: dict[str, list[float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for r in range(ROUNDS):
        order = names[r % len(names):] + names[: r % len(names)]
        for t in types:
            for th in THREADS:
                res = subprocess.run(
                    [sys.executable, "-c", SPEED, str(PROMPT), str(NEW_TOKENS), str(th),
                     *[str(files[n][t]) for n in order]], capture_output=True, text=True,
                    check=True, env=env)
                speeds = json.loads(res.stdout.strip().splitlines()[-1])
                for n, v in zip(order, speeds, strict=True):
                    runs.setdefault(f"{t}|{th}|{n}", []).append(v)
    return {k: {"median": statistics.median(v), "runs": v} for k, v in runs.items()}


def main() -> None:
    from llm_surgeon.export.llamacpp import bytes_read_per_token, gguf_perplexity

    if "--finished-only" in sys.argv:  # only the prunes already made (a partial table)
        from llamacpp_prunes import folder

        plan = [(s, ls) for s, ls in PLAN if (folder(s, ls) / "report.json").is_file()]
    else:
        plan = PLAN
    folders = {name_of(s, ls): str(pruned_model(s, ls)) for s, ls in plan}
    models = {"dense": DENSE, **folders}
    files = export_all(models)
    n_win = ppl_windows()
    windows = eval_windows()[:n_win]
    rows = []
    for name, spec in models.items():
        report = json.loads((Path(spec) / "report.json").read_text()) if name != "dense" \
            else None
        row = {
            "model": name,
            "folder": None if report is None else str(Path(spec).relative_to(ROOT)),
            "sparsity_achieved": None if report is None else report["sparsity_achieved"],
            "shots": None if report is None else report["settings"]["shots"],
            "layer_sizes": None if report is None else report["shrink"]["layer_sizes"],
            "bytes": {t: files[name][t].stat().st_size for t in TYPES},
            "bytes_per_token": {t: bytes_read_per_token(files[name][t]) for t in TYPES},
            "ppl_llamacpp": {t: cached(f"ppl{n_win}|{name}|{t}",
                                       lambda name=name, t=t: gguf_perplexity(
                                           files[name][t], windows))
                             for t in PPL_TYPES},
            "ppl_windows": n_win,
        }
        dense_ppl = json.loads((MODELS / "dense_ppl.json").read_text())["ppl"]
        row["ppl_pytorch_64"] = dense_ppl if report is None else report["ppl"]
        row["ppl_pytorch"] = row["ppl_pytorch_64"] if n_win == 64 else cached(
            f"ppl{n_win}|{name}|pytorch", lambda spec=spec: pytorch_perplexity(spec, windows))
        if name.endswith("uniform"):
            row["plain_from_pretrained_max_abs_logit_diff"] = cached(
                f"plain|{name}", lambda spec=spec: plain_load_diff(spec))
        rows.append(row)
    result: dict = {"rows": rows, "conditions": conditions()}
    speed_names = [n for n in SPEED_MODELS if n in files]
    key = "speed|" + ",".join(speed_names)
    if "--no-speed" not in sys.argv:  # measured once per set of models (delete to remeasure)
        result["speed"] = cached(key, lambda: {"conditions": conditions(),
                                               **measure_speed(files, speed_names)})
    elif (MODELS / "cache.json").is_file() and key in json.loads(
            (MODELS / "cache.json").read_text()):
        result["speed"] = cached(key, dict)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "results.md").write_text(markdown(result))
    print((RESULTS / "results.md").read_text())


def conditions() -> dict:
    import llama_cpp

    load = os.getloadavg()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in load],
            "llama_cpp_python": llama_cpp.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def markdown(r: dict) -> str:
    rows = {row["model"]: row for row in r["rows"]}
    d = rows["dense"]
    mb = 1e6
    lines = [
        "The bundled SmolLM2-135M and its LLM Surgeon heads-channels prunes in llama.cpp "
        "(llama-cpp-python "
        f"{r['conditions']['llama_cpp_python']}, CPU). Prunes: 32 x 512 calibration tokens, "
        "30 %: 2 shots, 20 %: 1 shot, every MLP width a multiple of 32 (the default). "
        "Perplexity: the 64 x 512 evaluation windows of the bundled test text, llama.cpp fed "
        "the same token ids as our PyTorch evaluation (f32 KV cache). Regenerate: "
        "`.venv/bin/python bench/llamacpp.py`.",
        "",
        "",
        "Every perplexity on all 64 windows." if r['rows'][0]['ppl_windows'] == 64 else
        f"Perplexity columns other than 'PyTorch, 64 windows' use the first "
        f"{r['rows'][0]['ppl_windows']} of the 64 windows (llama.cpp and PyTorch on the same "
        "ones).",
        "",
        "| model | layer sizes | removed | f16 file (MB) | q8_0 file (MB) | ppl PyTorch, 64 "
        "windows | ppl PyTorch | ppl llama.cpp f32 | f32 vs PyTorch | ppl llama.cpp q8_0 | "
        "plain from_pretrained |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        pt, f32 = row["ppl_pytorch"], row["ppl_llamacpp"]["f32"]
        plain = row.get("plain_from_pretrained_max_abs_logit_diff")
        sizes = "–" if name == "dense" else name.split("-")[1]
        got = row["sparsity_achieved"]
        removed = "–" if got is None else f"{got:.4f}"
        lines.append(
            f"| {name} | {sizes} | {removed} | "
            f"{row['bytes']['f16'] / mb:.1f} | {row['bytes']['q8_0'] / mb:.1f} | "
            f"{row['ppl_pytorch_64']:.2f} | {pt:.2f} | "
            f"{f32:.2f} | {100 * (f32 / pt - 1):+.2f} % | {row['ppl_llamacpp']['q8_0']:.2f} | "
            f"{'–' if plain is None else f'loads (max diff {plain:.1e})'} |")
    s = r.get("speed")
    if s:
        lines += [
            "",
            f"Decode speed (greedy, {PROMPT}-token prompt then {NEW_TOKENS} steps of one "
            f"token, tok/s), dense and pruned side by side in one run: in each of {ROUNDS} "
            "rounds one fresh process runs one decode step of each model in turn (so all "
            "see the same load), 1 / median step time; medians over the rounds. "
            f"Machine: {r['conditions']['cores']} cores ({r['conditions']['cpu']}), shared "
            f"with other jobs (load average at the start of the speed rounds "
            f"{s['conditions']['loadavg_at_start']}, {s['conditions']['date_utc']} UTC). "
            "Bytes read per token: every decoder tensor + the output head (the tied embedding) "
            "+ one embedding row, from the GGUF tensor sizes.",
            "",
            "| type | threads | dense | 20 % | 30 % | speed-up 30 % | bytes ratio 30 % | "
            "speed-up / bytes ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in SPEED_TYPES:
            ratio = d["bytes_per_token"][t] / rows["hc30-global"]["bytes_per_token"][t]
            for th in THREADS:
                v = {n: s[f"{t}|{th}|{n}"]["median"]
                     for n in ("dense", "hc20-global", "hc30-global") if f"{t}|{th}|{n}" in s}
                up = v["hc30-global"] / v["dense"]
                v20 = f"{v['hc20-global']:.1f}" if "hc20-global" in v else "–"
                lines.append(f"| {t} | {th} | {v['dense']:.1f} | {v20} | "
                             f"{v['hc30-global']:.1f} | {up:.3f} | {ratio:.3f} | "
                             f"{up / ratio:.3f} |")
    if s:
        lines += speed_fit_lines(s, rows)
    missing = [n for s_, ls in PLAN if (n := name_of(s_, ls)) not in rows]
    if missing:
        lines += ["", f"Not in this table (prunes not run in the time this run had): "
                  f"{', '.join(missing)}."]
    if s:
        lines += ["", "With 2 threads on this 2-core machine, anything else running makes "
                  "llama.cpp's threads wait on each other: compare models within a row (they "
                  "were measured step by step in turn), not rows across runs; every round's "
                  "figure is in results.json."]
    return "\n".join(lines) + "\n"


def fixed_step_time(ms: list[float], mb: list[float]) -> tuple[float, float]:
    """Least-squares fit of a decode step's time over models of different sizes,

        t = t0 + B / bw    (t in ms, B in MB of weights read per token),

    returning (t0, bw in MB/ms = GB/s): ``t0`` is the time a step takes whatever the weights'
    size (graph build, norms, attention over the cache, the threads' start and wait)."""
    import numpy as np

    X = np.stack([np.ones(len(mb)), np.asarray(mb)], axis=1)
    (t0, slope), *_ = np.linalg.lstsq(X, np.asarray(ms), rcond=None)
    return float(t0), float(1.0 / slope) if slope > 0 else float("inf")


def speed_fit_lines(s: dict, rows: dict) -> list[str]:
    """Step time against bytes read, per (type, threads): the fixed part of a step, and the
    speed-up of the part that scales with the weights (what removing weights can buy)."""
    mb = 1e6
    lines = ["", "Step time against weight bytes read per token (the models of the table above; "
             "`t = t0 + B / bw`, least squares): `t0` is the part of a decode step that does not "
             "shrink with the weights; 'weight part' is the 30 % model's speed-up of `t - t0`.",
             "", "| type | threads | " + " | ".join(f"{n} (ms/tok)" for n in SPEED_MODELS)
             + " | t0 (ms) | t0 / dense step | bw (GB/s) | speed-up 30 % global | uniform "
             "(llama) vs global (deci), time per byte | weight part's speed-up / bytes ratio |",
             "|---|---|" + "---|" * (len(SPEED_MODELS) + 6)]
    for t in SPEED_TYPES:
        for th in THREADS:
            names = [n for n in SPEED_MODELS if f"{t}|{th}|{n}" in s and n in rows]
            if len(names) < 3 or "hc30-global" not in names:
                continue
            ms = {n: 1000.0 / s[f"{t}|{th}|{n}"]["median"] for n in names}
            size = {n: rows[n]["bytes_per_token"][t] / mb for n in names}
            t0, bw = fixed_step_time([ms[n] for n in names], [size[n] for n in names])
            ratio = size["dense"] / size["hc30-global"]
            up = ms["dense"] / ms["hc30-global"]
            weight_up = (ms["dense"] - t0) / (ms["hc30-global"] - t0)
            if "hc30-uniform" in names:  # time per MB of the llama graph over the deci graph
                per_byte = ((ms["hc30-uniform"] / size["hc30-uniform"])
                            / (ms["hc30-global"] / size["hc30-global"]))
                uni = f"{per_byte:.3f}"
            else:
                uni = "–"
            cells = " | ".join(f"{ms[n]:.2f}" if n in ms else "–" for n in SPEED_MODELS)
            lines.append(f"| {t} | {th} | {cells} | {t0:.2f} | {t0 / ms['dense']:.2f} | "
                         f"{bw:.1f} | {up:.3f} | {uni} | {weight_up / ratio:.3f} |")
    lines += ["", "A step's time that does not shrink with the weights (`t0`: graph build, norms, "
              "RoPE, attention over the cache, logits read-out) caps the speed-up below the "
              "bytes ratio r: with a fixed share f of the dense step, speed-up / r = "
              "1 / (f·r + 1 − f). For 0.95 at r = 1.31, f must be at most 0.17; a larger model "
              "reads far more weight bytes per step for about the same t0, so f shrinks and "
              "the speed-up approaches the bytes ratio."]
    return lines


if __name__ == "__main__":
    main()
