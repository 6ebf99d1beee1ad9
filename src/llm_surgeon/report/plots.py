"""Figures (PNG, matplotlib, no display needed) from reports and bench results.

* :func:`ppl_vs_sparsity`: perplexity against sparsity, one line per method, one figure per
  sparsity kind (unstructured, N:M, rows-columns, heads-channels);
* :func:`layer_heatmap`: achieved sparsity by depth and module type of one pruned model (what
  the global threshold took from which layer: the picture of the LLM Surgeon paper's Fig. 4);
* :func:`shot_curve`: perplexity and sparsity after every shot of a multi-shot run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TYPES = ("q", "k", "v", "o", "gate", "up", "down")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    from llm_surgeon.io import atomic_file

    path = Path(path)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # exclusive temporary: a planted symlink is not followed
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    _plt().close(fig)
    return path


def _structure(text: str) -> Any:
    """A report's structure as its object (None: a plug-in not registered in this process)."""
    from llm_surgeon.errors import UserError
    from llm_surgeon.structures import parse_structure

    try:
        return parse_structure(text)
    except UserError:
        return None


def series_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One legend label per row: the method, with its shot count when the same method appears
    with several shot counts (e.g. ``k-obd (1 shot)`` and ``k-obd (5 shots)``)."""
    shots: dict[str, set[Any]] = {}
    for r in rows:
        shots.setdefault(r["method"], set()).add(r.get("shots"))
    out = []
    for r in rows:
        n = r.get("shots")
        if len(shots[r["method"]]) > 1:
            out.append(f"{r['method']} ({n} shot{'' if n == 1 else 's'})")
        else:
            out.append(r["method"])
    return out


def ppl_vs_sparsity(rows: Sequence[dict[str, Any]], out_dir: str | Path,
                    dense_ppl: float | None = None) -> list[Path]:
    """One PNG per sparsity kind: ``ppl_<kind>.png``; returns the paths written."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    patterned: dict[str, str] = {}  # families whose patterns fix the sparsity -> x label
    for r, label in zip(rows, series_labels(rows), strict=True):
        if r.get("ppl") is not None:
            found = _structure(str(r["structure"]))
            family = str(r["structure"]) if found is None else found.family
            if found is not None and found.fixed_sparsity is not None:
                patterned[family] = found.pattern_axis
            by_kind.setdefault(family, []).append({**r, "method": label})
    written = []
    for kind, rs in sorted(by_kind.items()):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        methods = sorted({r["method"] for r in rs})
        categorical = kind in patterned
        if categorical:  # a few patterns (N:M): categories on x, one marker per method
            patterns = sorted({str(r["structure"]) for r in rs},
                              key=lambda p: _structure(p).pattern_order)
            for j, method in enumerate(methods):
                pts = [(patterns.index(str(r["structure"])), float(r["ppl"])) for r in rs
                       if r["method"] == method]
                offset = (j - (len(methods) - 1) / 2) * 0.08
                ax.plot([x + offset for x, _ in pts], [y for _, y in pts], marker="o",
                        linestyle="none", label=method)
            ax.set_xticks(range(len(patterns)), patterns)
            ax.set_xlim(-0.5, len(patterns) - 0.5)
        for method in methods if not categorical else []:
            pts = sorted((float(r["sparsity_achieved"]), float(r["ppl"])) for r in rs
                         if r["method"] == method)
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if dense_ppl:
            ax.axhline(dense_ppl, color="gray", linestyle="--", linewidth=1,
                       label=f"dense ({dense_ppl:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel(patterned[kind] if categorical
                      else "sparsity of the decoder linears (%)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"perplexity against sparsity: {kind}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"ppl_{kind.replace(':', 'of')}.png"))
    return written


def layer_heatmap(report: dict[str, Any], path: str | Path) -> Path:
    """Sparsity (%) by decoder layer (rows) and module type (columns)."""
    import numpy as np

    plt = _plt()
    layers = report["layers"]
    depth = max(int(entry["layer"]) for entry in layers) + 1
    types = [t for t in TYPES if any(e["type"] == t for e in layers)]
    grid = np.full((depth, len(types)), np.nan)
    for e in layers:
        grid[int(e["layer"]), types.index(e["type"])] = 100 * float(e["sparsity"])
    fig, ax = plt.subplots(figsize=(4.5, max(3.0, 0.18 * depth + 1.2)), dpi=120)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(types)), types)
    ax.set_yticks(range(0, depth, max(1, depth // 10)))
    ax.set_xlabel("module type")
    ax.set_ylabel("decoder layer (0 = first)")
    ax.set_title(f"{report['method']} {report['structure']}: sparsity per layer", fontsize=9)
    fig.colorbar(im, ax=ax, label="sparsity (%)")
    return _save(fig, path)


def shot_curve(report: dict[str, Any], path: str | Path) -> Path | None:
    """Perplexity (left axis, where measured) and sparsity (right axis) after every shot."""
    shots = report.get("shots") or []
    if not shots:
        return None
    plt = _plt()
    xs = [s["shot"] for s in shots]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    with_ppl = [(s["shot"], s["ppl"]) for s in shots if s.get("ppl") is not None]
    if with_ppl:
        ax.plot([x for x, _ in with_ppl], [y for _, y in with_ppl], marker="o", color="C0",
                label="perplexity")
    if report.get("ppl_dense"):
        ax.axhline(report["ppl_dense"], color="gray", linestyle="--", linewidth=1,
                   label="dense")
    ax.set_xlabel("shot")
    ax.set_ylabel("perplexity")
    ax.set_xticks(xs)
    ax2 = ax.twinx()
    ax2.plot(xs, [100 * s["sparsity_achieved"] for s in shots], marker="s", color="C1",
             label="sparsity")
    ax2.set_ylabel("sparsity (%)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title(f"{report['method']} {report['structure']}: after every shot")
    return _save(fig, path)


def accuracy_vs_sparsity(rows: Sequence[dict[str, Any]], path: str | Path,
                         chance: dict[str, float] | None = None,
                         title: str = "zero-shot accuracy against sparsity") -> Path:
    """Accuracy of every task (one line each) against sparsity; ``rows`` are
    ``{"sparsity": s, "tasks": {name: {"acc": a, ...}}}``; dotted lines mark chance levels."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    tasks = sorted({t for r in rows for t in r["tasks"]})
    for j, task in enumerate(tasks):
        pts = sorted((100 * float(r["sparsity"]), float(r["tasks"][task]["acc"])) for r in rows
                     if task in r["tasks"])
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{j}",
                label=task)
        if chance and task in chance:
            ax.axhline(chance[task], color=f"C{j}", linestyle=":", linewidth=1,
                       label=f"{task}: chance ({chance[task]:g})")
    ax.set_xlabel("sparsity of the decoder linears (%)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
