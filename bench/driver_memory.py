"""The old two drivers against the one driver: perplexity, wall time and peak resident memory of
the same in-memory prune jobs, measured one at a time in one session.

    .venv/bin/python bench/driver_memory.py [--threads 2] [--old 129a08a] [--fresh]
    .venv/bin/python bench/driver_memory.py --smoke      # tiny random Llama, seconds

Jobs (the issue's): ``prune --method surgeon --shots 5 --calib-samples 32 --seqlen 512`` on the
bundled default model at unstructured 50%, rows-columns 20% and heads-channels 20%, no
``--max-memory`` (heads-channels with ``--channel-multiple 1`` on the new side: the old drivers
had no channel multiple, every MLP width was free). The old driver runs from the sources of
commit ``--old`` (the last commit before the drivers became one), the new one from this
checkout; each job runs in a fresh process (``python -m llm_surgeon prune``) with the same
thread count, old then new, and its peak
resident memory is the larger of the kernel's ``ru_maxrss`` of that process (``os.wait4``) and
the run's own ``peak_rss_mb`` (phases reset the high-water mark; the run folds the peaks).
Finished runs are kept in ``bench/driver/runs/`` and not rerun (``--fresh`` drops them). Writes
``bench/driver/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
JOBS = [("unstructured", "0.5"), ("rows-columns", "0.2"), ("heads-channels", "0.2")]


def worktree(commit: str, where: Path) -> Path:
    """The source tree of ``commit`` (``git archive``, extracted once; no worktree to clean)."""
    if not (where / "src" / "llm_surgeon").is_dir():
        where.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=tar, check=True)
    return where


def run_one(src: Path, out: Path, args: list[str], threads: int) -> dict:
    """One prune job in a fresh process; its report plus wall time and peak RSS (ru_maxrss)."""
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen([PY, "-m", "llm_surgeon", "-q", "prune", *args, "--output",
                             str(out)], env=env, cwd=str(src.parent))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"prune failed ({status}): {' '.join(args)}")
    report = json.loads((out / "report.json").read_text())
    return {"ppl": report["ppl"], "ppl_dense": report["ppl_dense"],
            "sparsity_achieved": report["sparsity_achieved"], "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "prune_time_s": report["prune_time_s"],
            # the run resets the kernel's high-water mark per phase (which ru_maxrss reads
            # too) and folds the peaks into its report: the larger of the two is the peak
            "peak_rss_mb": max(usage.ru_maxrss / 1024, report["peak_rss_mb"]),
            "report_peak_rss_mb": report["peak_rss_mb"], "threads": threads,
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def tiny_model(folder: Path) -> Path:
    """A small random Llama with a tokenizer (for --smoke)."""
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_model as build
    from tests.conftest import tiny_tokenizer

    build("llama", num_hidden_layers=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def table(results: dict) -> str:
    lines = ["| job | driver | perplexity | wall s | CPU s | prune s | peak RSS MiB | measured |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name in results["jobs"]:
        o = results["runs"].get(f"old-{name}")
        for drv in results["drivers"]:
            r = results["runs"].get(f"{drv}-{name}")
            if r is None:
                continue
            lines.append(f"| {name} | {drv} | {r['ppl']:.2f} | {r['wall_s']:.0f} | "
                         f"{r['cpu_s']:.0f} | "
                         f"{r['prune_time_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r.get('measured_at', 'an earlier session')} |")
            if o and drv != "old":
                lines.append(f"| {name} | {drv} / old | {r['ppl'] / o['ppl']:.3f} | "
                             f"{r['wall_s'] / o['wall_s']:.2f} | "
                             f"{r['cpu_s'] / o['cpu_s']:.2f} | "
                             f"{r['prune_time_s'] / o['prune_time_s']:.2f} | "
                             f"{r['peak_rss_mb'] / o['peak_rss_mb']:.2f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="129a08a", help="commit of the old drivers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="drop finished runs first")
    ap.add_argument("--with-hooks", action="store_true",
                    help="also the new driver with --curvature-pass hooks (new-hooks)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random model, 2 windows of 32 tokens; results under out/")
    args = ap.parse_args()
    work = ROOT / "out" / "bench-driver"
    out_dir = work / "smoke" if args.smoke else ROOT / "bench" / "driver"
    runs_dir = out_dir / "runs"
    if args.fresh and runs_dir.exists():
        shutil.rmtree(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    common = ["--method", "surgeon", "--shots", "5", "--calib-samples", "32", "--seqlen", "512"]
    if args.smoke:
        model = tiny_model(work / "tiny-llama")
        text = work / "text.txt"
        sys.path.insert(0, str(ROOT))
        from tests.conftest import SAMPLE_TEXT

        text.write_text(SAMPLE_TEXT)
        common = ["--model", str(model), "--calib-data", str(text), "--eval-data", str(text),
                  "--method", "surgeon", "--shots", "2", "--calib-samples", "2", "--seqlen",
                  "32", "--eval-windows", "2"]
    old_src = worktree(args.old, work / f"old-{args.old}") / "src"
    new_src = ROOT / "src"
    # the same job on both sides: the old drivers had no --channel-multiple (every width free),
    # the new driver defaults to 32 on the bundled model's 1536-wide MLP; and they costed and
    # updated every linear of a unit (the coupling default became "consumer" in issue 16)
    same = {"heads-channels": ["--channel-multiple", "1", "--unit-coupling", "layers"]}
    drivers = [("old", old_src, []), ("new", new_src, [])]
    if args.with_hooks:
        drivers.append(("new-hooks", new_src, ["--curvature-pass", "hooks"]))
    results: dict = {"jobs": [f"{s}-{p}" for s, p in JOBS], "common": common,
                     "old_commit": args.old, "drivers": [d for d, _, _ in drivers], "runs": {}}
    for structure, sparsity in JOBS:
        name = f"{structure}-{sparsity}"
        for drv, src, extra in drivers:
            path = runs_dir / f"{drv}-{name}.json"
            if path.is_file():
                results["runs"][f"{drv}-{name}"] = json.loads(path.read_text())
                continue
            print(f"{drv} driver: {name}", flush=True)
            r = run_one(src, work / f"{drv}-{name}",
                        [*common, "--structure", structure, "--sparsity", sparsity, *extra,
                         *(same.get(structure, []) if drv != "old" else [])],
                        args.threads)
            path.write_text(json.dumps(r, indent=2) + "\n")
            results["runs"][f"{drv}-{name}"] = r
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = ["# The old drivers against the one driver (in memory, no `--max-memory`)", "",
          f"`prune {' '.join(common)}` at each structure; old = commit `{args.old}` "
          "(run.py + streaming.py), new = this checkout (driver.py over a layer store; new-hooks: "
          "with `--curvature-pass hooks`). Each run "
          f"a fresh process, {args.threads} threads, one at a time, old then new; peak RSS = "
          "max(the process's ru_maxrss, the report's peak_rss_mb). Heads-channels: "
          "`--channel-multiple 1` on the new side (the old drivers had no channel multiple: "
          "every MLP width free).", "", table(results), "",
          "Regenerate: `.venv/bin/python bench/driver_memory.py` (`--fresh` to rerun).", ""]
    (out_dir / "results.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
