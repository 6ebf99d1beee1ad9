"""``llm-surgeon report RUN_DIR``: a short markdown summary of a run, with its plots.

``RUN_DIR`` is either a pruned model folder (``report.json`` from ``prune``) or a bench folder
(``results.json`` from ``bench``, whose per-run reports live in ``runs/``). The summary is
written to ``RUN_DIR/summary.md`` and the figures to ``RUN_DIR/plots/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_surgeon.errors import UserError
from llm_surgeon.report import plots


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def prune_summary(report: dict[str, Any], run_dir: Path) -> str:
    heat = plots.layer_heatmap(report, run_dir / "plots" / "layers.png")
    curve = plots.shot_curve(report, run_dir / "plots" / "shots.png")
    s = report.get("settings", {})
    lines = [
        f"# {report['method']} · {report['structure']} · target "
        f"{report['sparsity_target']:.0%}",
        "",
        f"- model `{s.get('model')}`, calibration {s.get('calib_samples')} x {s.get('seqlen')} "
        f"tokens of `{s.get('calib_data')}`, {len(report.get('shots', []))} shot(s)",
        f"- sparsity achieved **{report['sparsity_achieved']:.2%}** of the decoder linears",
        f"- perplexity {_fmt(report.get('ppl_dense'))} (dense) → **{_fmt(report.get('ppl'))}**"
        + (f" on the validation split of `{s.get('calib_data')}`" if s.get("validation")
           else f" on `{s.get('eval_data')}`"),
        f"- pruning time {_fmt(report.get('prune_time_s'), '.0f')} s, peak memory "
        f"{_fmt(report.get('peak_rss_mb'), '.0f')} MB",
    ]
    if "shrink" in report:
        sh = report["shrink"]
        lines.append(
            f"- physically smaller: {sh['params_total_before']:,} → {sh['params_total_after']:,}"
            f" parameters ({sh['kv_groups_removed']} KV head groups and "
            f"{sh['channels_removed']} MLP channels removed)")
    by_type = report.get("sparsity_by_type", {})
    if by_type:
        lines += ["", "| module type | " + " | ".join(by_type) + " |",
                  "|---|" + "---|" * len(by_type),
                  "| sparsity | " + " | ".join(f"{v:.1%}" for v in by_type.values()) + " |"]
    lines += ["", f"![sparsity by layer and module type](plots/{heat.name})"]
    if curve is not None:
        lines += ["", f"![after every shot](plots/{curve.name})"]
    return "\n".join(lines) + "\n"


def bench_summary(rows: list[dict[str, Any]], run_dir: Path) -> str:
    dense = next((r.get("ppl_dense") for r in rows if r.get("ppl_dense")), None)
    figs = plots.ppl_vs_sparsity(rows, run_dir / "plots", dense_ppl=dense)
    lines = [f"# Benchmark: {len(rows)} runs", "", f"Dense perplexity: {_fmt(dense)}", "",
             "| method | structure | target | achieved | shots | ppl |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['structure']} | {r['sparsity_target']:.2f} | "
                     f"{r['sparsity_achieved']:.4f} | {r.get('shots')} | {_fmt(r.get('ppl'))} |")
    lines.append("")
    lines += [f"![{f.stem}](plots/{f.name})" for f in figs]
    heat = []
    for r in rows:  # where each run's global threshold cut: one heat map per run with layers
        path = run_dir / "runs" / f"{r.get('id')}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        if report.get("layers"):
            heat.append(plots.layer_heatmap(report, run_dir / "plots" / f"layers_{r['id']}.png"))
    if heat:
        lines += ["", "Sparsity by decoder layer and module type, per run:", ""]
        lines += [f"![{f.stem}](plots/{f.name})" for f in heat]
    return "\n".join(lines) + "\n"


_PRUNE_KEYS = ("method", "structure", "sparsity_target", "sparsity_achieved")


def _require(entry: Any, path: Path) -> None:
    """The keys a summary needs, checked before any figure is drawn (nothing is written for a
    malformed file)."""
    missing = [k for k in _PRUNE_KEYS if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise UserError(f"{path} is incomplete (no {', '.join(missing)}); re-run the command "
                        "that wrote it")
    for k in ("sparsity_target", "sparsity_achieved"):
        if not isinstance(entry[k], (int, float)) or isinstance(entry[k], bool):
            raise UserError(f"{path} is malformed ({k} is not a number)")


def _read_json(path: Path, kind: type) -> Any:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, kind):
        raise UserError(f"{path} is not a {kind.__name__} of results; was it written by "
                        "llm-surgeon?")
    return data


def check_not_users(run_dir: Path) -> None:
    """``summary.md`` and ``plots/*.png`` are (re)written only where they are ours: listed in
    the folder's marker, or not there yet. A user's file of that name is refused, never
    overwritten."""
    from llm_surgeon.io import read_marker

    marker = read_marker(run_dir)
    listed = set(marker["files"]) if marker is not None else set()
    existing = [run_dir / "summary.md", *sorted((run_dir / "plots").glob("*.png"))]
    theirs = [p.relative_to(run_dir).as_posix() for p in existing
              if (p.exists() or p.is_symlink()) and p.relative_to(run_dir).as_posix() not in listed]
    if theirs:
        raise UserError(f"{run_dir} already holds {', '.join(theirs[:3])}, not written by "
                        "llm-surgeon; move it away (report will not overwrite it)")


def write_summary(run_dir: str | Path) -> Path:
    from llm_surgeon.io import add_to_marker, atomic_write

    run_dir = Path(run_dir)
    check_not_users(run_dir)
    try:
        if (run_dir / "report.json").is_file():
            report = _read_json(run_dir / "report.json", dict)
            _require(report, run_dir / "report.json")
            text = prune_summary(report, run_dir)
        elif (run_dir / "results.json").is_file():
            rows = _read_json(run_dir / "results.json", list)
            for r in rows:
                _require(r, run_dir / "results.json")
            text = bench_summary(rows, run_dir)
        else:
            raise UserError(
                f"{run_dir} holds neither report.json (prune) nor results.json (bench)")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = "report.json" if (run_dir / "report.json").is_file() else "results.json"
        raise UserError(f"{run_dir / what} is incomplete or malformed ({type(exc).__name__}: "
                        f"{exc}); re-run the command that wrote it") from None
    add_to_marker(run_dir, [run_dir / "summary.md"])  # first: its temporary is ours too
    out = atomic_write(run_dir / "summary.md", text)
    add_to_marker(run_dir, [out, *sorted((run_dir / "plots").glob("*.png"))])
    return out
