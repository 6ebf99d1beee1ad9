"""Where the surgeon's time goes at 7B scale: a random Llama with Llama-2-7B's layer shapes
(hidden 4096, MLP 11008, 32 heads, vocab 32000), pruned under ``--max-memory`` with 1 and 2
decoder layers, projected to the full 32 layers.

    .venv/bin/python bench/scale7b.py [--device cuda] [--threads 2] [--max-memory 18GB]
    .venv/bin/python bench/scale7b.py --smoke        # 256-wide shapes, seconds

Jobs: the surgeon at unstructured 50% and rows-columns 20%, 1 shot, 8 × 512 calibration tokens,
no evaluation. Each (job, layer count) runs in a fresh process (peak RSS = max of its
``ru_maxrss`` and the run's own folded peak; on CUDA also ``torch.cuda.max_memory_allocated``),
through the driver's own phases (curvature,
costs, threshold, update) with the inversions (``prepared``: damping and Cholesky inverses,
once per linear in the costs pass; the updates reuse them) timed apart. Every phase is linear in
the layer count, so per layer = t(2 layers) − t(1 layer) and fixed = t(1) − per layer
(embeddings, LM head, loading), and 32 layers ≈ fixed + 32 · per layer, here.

The one-GPU projection counts each phase's floating-point operations per layer (below) and
divides by a stated throughput (``--gpu-tflops``, ``--gpu-fp64-tflops``); the update's solver is
iterative, so its count is the measured time here times this machine's measured matmul rate.
Writes ``bench/scale7b/results.json`` and ``results.md`` (``--device cuda``: ``results-cuda.*``);
each finished (job, layer count) is kept in ``bench/scale7b/runs/`` and not rerun with the same
arguments (delete it to measure again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"hidden": 4096, "mlp": 11008, "heads": 32, "vocab": 32000}
SMOKE = {"hidden": 256, "mlp": 688, "heads": 4, "vocab": 1000}
JOBS = [("unstructured", "0.5"), ("rows-columns", "0.2")]


def build(folder: Path, layers: int, shapes: dict, seed: int = 0) -> None:
    """A random Llama with ``shapes`` and ``layers`` decoder layers (written once) and a
    byte-level tokenizer."""
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_tokenizer

    config = LlamaConfig(vocab_size=shapes["vocab"], hidden_size=shapes["hidden"],
                         intermediate_size=shapes["mlp"], num_hidden_layers=layers,
                         num_attention_heads=shapes["heads"],
                         num_key_value_heads=shapes["heads"], max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # ids < 300: any text makes valid windows


def one(args: argparse.Namespace) -> None:
    """Child process: one prune job, phases and inversion time to stdout as JSON."""
    import torch

    from llm_surgeon.config import PruneConfig
    from llm_surgeon.driver import prune
    from llm_surgeon.methods.surgeon import SurgeonMethod

    torch.set_num_threads(args.threads)
    calls: list[float] = []  # each linear is prepared once, in the costs pass
    real = SurgeonMethod.prepared  # damped factors and their inverses, once per linear

    def timed(self, *a, **k):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = real(self, *a, **k)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - t0)
        return out

    SurgeonMethod.prepared = timed
    cfg = PruneConfig(model=args.model, method="surgeon", structure=args.structure,
                      sparsity=float(args.sparsity), shots=1, calib_samples=args.windows,
                      seqlen=args.seqlen, eval=False, max_memory=args.max_memory,
                      device=args.device, offload_dir=args.offload_dir,
                      calib_data=args.calib_data)
    report = prune(cfg, progress=False)
    out = {"phases": report["phases"], "prune_time_s": report["prune_time_s"],
           "sparsity_achieved": report["sparsity_achieved"],
           "prepare_costs_s": sum(calls), "prepare_calls": len(calls),
           "report_peak_rss_mb": report["peak_rss_mb"]}
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def run_child(model: Path, structure: str, sparsity: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", "--model", str(model), "--structure", structure,
           "--sparsity", sparsity, "--threads", str(args.threads), "--windows",
           str(args.windows), "--seqlen", str(args.seqlen), "--max-memory", args.max_memory,
           "--device", args.device, "--offload-dir", str(args.offload_dir), "--calib-data",
           args.calib_data]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[7:])
    return {**result, "wall_s": time.perf_counter() - start,
            # phases reset the kernel's high-water mark (ru_maxrss too); the run folds them
            "peak_rss_mb": max(usage.ru_maxrss / 1024, result["report_peak_rss_mb"])}


def matmul_gflops(threads: int, dtype: str = "float32", n: int = 2048) -> float:
    """This machine's dense matmul rate (GFLOP/s) at ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ a
    start = time.perf_counter()
    reps = 3
    for _ in range(reps):
        a @ a
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def flops_per_layer(shapes: dict, tokens: int, seqlen: int) -> dict[str, float]:
    """Floating-point operations of one decoder layer's work in each phase.

    curvature: forward sweep, recomputed forward, backward (2× forward) = 4 forwards of
        2·P_layer + attention 4·T·hidden per token, plus A and G: 2·d² per token per factor.
    inversions: per linear, its A (width in) and G (width out): symmetrise + Cholesky (d³/3)
        + inverse from the factor (2d³/3), once per shot, in fp64 (a shared A is inverted once
        per linear that reads it).
    costs: a few passes over each weight (elementwise), negligible; rows-columns adds
        W·A·Wᵀ-type products, 2·out·in·(in+out) per linear.
    """
    h, m = shapes["hidden"], shapes["mlp"]
    linears = [(h, h)] * 4 + [(h, m), (h, m), (m, h)]  # (in, out): q k v o gate up down
    p_layer = sum(i * o for i, o in linears)
    fwd = tokens * (2 * p_layer + 4 * seqlen * h)
    a_widths = [h, h, h, m]  # q/k/v share, o, gate/up share, down
    g_widths = [o for _, o in linears]
    factors = tokens * 2 * (sum(d * d for d in a_widths) + sum(d * d for d in g_widths))
    inv = sum(i**3 + o**3 for i, o in linears)  # (1/3 + 2/3) d³ per factor
    costs_rc = sum(2 * o * i * (i + o) for i, o in linears)
    return {"curvature": 4 * fwd + factors, "inversions": float(inv),
            "costs_rows_columns": float(costs_rc), "params_layer": float(p_layer)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--structure", help=argparse.SUPPRESS)
    ap.add_argument("--sparsity", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-memory", default="18GB")
    ap.add_argument("--offload-dir", default=str(ROOT / "out" / "bench-scale7b" / "offload"))
    ap.add_argument("--calib-data", default="sotu")
    ap.add_argument("--gpu-tflops", type=float, default=30.0,
                    help="assumed sustained fp32 (TF32 off) rate of one 80 GB GPU")
    ap.add_argument("--gpu-fp64-tflops", type=float, default=10.0,
                    help="assumed sustained fp64 rate of the factorisations on that GPU")
    ap.add_argument("--smoke", action="store_true", help="256-wide shapes; results under out/")
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    shapes = SMOKE if args.smoke else SHAPES
    if args.smoke:
        args.windows, args.seqlen, args.max_memory = 2, 64, "1GB"
    work = ROOT / "out" / "bench-scale7b" / ("smoke" if args.smoke else "7b")
    suffix = "" if args.device == "cpu" else "-" + args.device.split(":")[0]
    out_dir = work if args.smoke else ROOT / "bench" / "scale7b"
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(args.offload_dir).mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    runs_dir = out_dir / "runs"  # one JSON per finished (job, layers): a rerun skips it
    runs_dir.mkdir(exist_ok=True)
    for layers in (1, 2):
        model = work / f"llama-{layers}l"
        for structure, sparsity in JOBS:
            key = f"{structure}-{sparsity}-{layers}l"
            done = runs_dir / f"{key}{suffix}.json"
            made_with = {"threads": args.threads, "windows": args.windows,
                         "seqlen": args.seqlen, "max_memory": args.max_memory,
                         "calib_data": args.calib_data, "shapes": shapes}
            if done.is_file():
                try:
                    kept = json.loads(done.read_text())
                except ValueError:
                    kept = {}
                if kept.get("made_with") == made_with:
                    runs[key] = kept
                    continue
            build(model, layers, shapes)
            print(f"scale bench: {key}", flush=True)
            runs[key] = {**run_child(model, structure, sparsity, args), "made_with": made_with}
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(runs[key], indent=2) + "\n")
            tmp.replace(done)
    tokens = args.windows * args.seqlen
    flops = flops_per_layer(shapes, tokens, args.seqlen)
    cpu_gflops = matmul_gflops(args.threads)
    cpu_gflops64 = matmul_gflops(args.threads, "float64")
    summary = {}
    for structure, sparsity in JOBS:
        one_l, two_l = runs[f"{structure}-{sparsity}-1l"], runs[f"{structure}-{sparsity}-2l"]

        def phase(r: dict, name: str) -> float:
            """A phase's time with the inversions (timed apart) taken out."""
            if name == "inversions":
                return r["prepare_costs_s"]
            t = r["phases"].get(name, {}).get("time_s", 0.0)
            return t - r.get(f"prepare_{name}_s", 0.0)

        rows = {}
        for name in ("curvature", "inversions", "costs", "threshold", "update"):
            t1, t2 = phase(one_l, name), phase(two_l, name)
            per = max(t2 - t1, 0.0)
            fixed = max(t1 - per, 0.0)
            if name == "curvature":
                gpu = flops["curvature"] / (args.gpu_tflops * 1e12)
            elif name == "inversions":
                gpu = flops["inversions"] / (args.gpu_fp64_tflops * 1e12)
            elif name == "costs" and structure == "rows-columns":
                gpu = flops["costs_rows_columns"] / (args.gpu_tflops * 1e12)
            else:  # iterative / elementwise: measured time × this machine's matmul rate
                gpu = per * cpu_gflops * 1e9 / (args.gpu_tflops * 1e12)
            rows[name] = {"per_layer_s": per, "fixed_s": fixed, "projected_32_s": fixed + 32 * per,
                          "gpu_per_layer_s": gpu, "gpu_32_s": 32 * gpu}
        summary[f"{structure}-{sparsity}"] = {
            "phases": rows,
            "total_32_s": sum(r["projected_32_s"] for r in rows.values()),
            "gpu_total_32_s": sum(r["gpu_32_s"] for r in rows.values()),
            "peak_rss_mb_2l": two_l["peak_rss_mb"], "peak_rss_mb_1l": one_l["peak_rss_mb"],
            "cuda_peak_mb_2l": two_l.get("cuda_peak_mb"),
        }
    result = {"shapes": shapes, "tokens": tokens, "device": args.device,
              "threads": args.threads, "max_memory": args.max_memory,
              "cpu_matmul_gflops_fp32": cpu_gflops, "cpu_matmul_gflops_fp64": cpu_gflops64,
              "gpu_tflops_assumed": args.gpu_tflops,
              "gpu_fp64_tflops_assumed": args.gpu_fp64_tflops, "flops_per_layer": flops,
              "runs": runs, "summary": summary}
    (out_dir / f"results{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Surgeon at Llama-2-7B layer shapes under `--max-memory {args.max_memory}` "
          f"({args.device}, {args.threads} threads)", "",
          f"Shapes {shapes}; 1 shot, {args.windows} × {args.seqlen} calibration tokens; runs "
          "with 1 and 2 decoder layers; per layer = t(2) − t(1). Projection to 32 layers = "
          "fixed + 32 × per layer. One-GPU column: FLOPs per layer / "
          f"{args.gpu_tflops:g} TFLOP/s (fp32) or {args.gpu_fp64_tflops:g} TFLOP/s (fp64 "
          "factorisations); the update (iterative solver) and threshold as measured time × this "
          f"machine's matmul rate ({cpu_gflops:.0f} GFLOP/s fp32) / GPU rate.", ""]
    for job, s in summary.items():
        md += [f"## {job}", "",
               "| phase | per layer s | fixed s | 32 layers here s | 32 layers, one GPU s |",
               "|---|---:|---:|---:|---:|"]
        for name, r in s["phases"].items():
            md.append(f"| {name} | {r['per_layer_s']:.1f} | {r['fixed_s']:.1f} | "
                      f"{r['projected_32_s']:.0f} | {r['gpu_32_s']:.1f} |")
        here = {k: r["projected_32_s"] / max(s["total_32_s"], 1e-9) for k, r in
                s["phases"].items()}
        gpu = {k: r["gpu_32_s"] / max(s["gpu_total_32_s"], 1e-9) for k, r in s["phases"].items()}
        md += [f"| **total** | | | {s['total_32_s']:.0f} | {s['gpu_total_32_s']:.1f} |", "",
               "Share of the 32-layer time: here " + ", ".join(
                   f"{k} {v:.0%}" for k, v in sorted(here.items(), key=lambda x: -x[1]))
               + "; one GPU " + ", ".join(
                   f"{k} {v:.0%}" for k, v in sorted(gpu.items(), key=lambda x: -x[1])) + ".",
               "",
               f"Peak RSS: {s['peak_rss_mb_1l']:.0f} MiB (1 layer), {s['peak_rss_mb_2l']:.0f} "
               "MiB (2 layers)" + (f"; CUDA peak {s['cuda_peak_mb_2l']:.0f} MiB"
                                    if s["cuda_peak_mb_2l"] else "") + ".", ""]
    md += ["Regenerate: `.venv/bin/python bench/scale7b.py` (add `--device cuda` on a GPU).", ""]
    (out_dir / f"results{suffix}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
