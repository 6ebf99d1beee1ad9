"""``llm-surgeon bench``: a matrix of prune runs on one model and data set, resumable.

A config (YAML, or flags) names the model, the data, the shared settings and the runs:

.. code-block:: yaml

    model: smollm2-135m
    calib_samples: 32
    seqlen: 512
    eval_windows: 64
    shots: 5
    runs:
      - {method: surgeon, structure: unstructured, sparsity: 0.5}
      - {method: magnitude, structure: "2:4"}

A config may also list ``also_eval``: texts (files or corpus names) every pruned model is also
evaluated on, next to the dense model once per text; the results then show each text's
perplexity and the pruned model's rise over dense on it, against the rise on the evaluation
text (how far a setting's gain carries beyond the calibration domain).

Every finished run leaves ``DIR/runs/<id>.json``; a second invocation skips those, so an
interrupted matrix resumes where it stopped. The dense perplexity is measured once and shared.
Results: ``DIR/results.csv``, ``DIR/results.json`` and ``DIR/results.md``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from llm_surgeon.config import PruneConfig
from llm_surgeon.data.corpora import load_text
from llm_surgeon.driver import prune, strip_private
from llm_surgeon.errors import UserError

CSV_COLUMNS = (
    "id",
    "method",
    "structure",
    "sparsity_target",
    "sparsity_achieved",
    "ppl",
    "ppl_dense",
    "shots",
    "time_s",
)
_CONFIG_KEYS = {f.name for f in fields(PruneConfig)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_DENSE_FILES = ("dense", "dense-validation", "dense-also")
# what the dense perplexity depends on: a recorded one is reused only where all of these match
_EVAL_KEYS = ("model", "eval_data", "calib_data", "seqlen", "eval_windows", "validation", "dtype")


def run_id(run: dict[str, Any]) -> str:
    """A stable, readable id: the run's ``name`` when it has one (an ablation's runs differ in
    settings the default id does not show), else method-structure-sparsity-shotsT."""
    if run.get("name") is not None:
        return str(run["name"])
    structure = str(run.get("structure", "unstructured")).replace(":", "of")
    sparsity = run.get("sparsity")
    sp = "" if sparsity is None else f"-{round(100 * float(sparsity))}"
    return f"{run['method']}-{structure}{sp}-{run.get('shots', 1)}shots"


_FLOAT_KEYS = {f.name for f in fields(PruneConfig) if str(f.type).startswith("float")}


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"bench config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"bench config {path} is not valid YAML: {exc}") from None
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("runs"), list)
        or not config["runs"]
    ):
        raise UserError(f"bench config {path} needs a non-empty 'runs' list")
    if not all(isinstance(r, dict) for r in config["runs"]):
        raise UserError(f"bench config {path}: every entry of 'runs' must be a mapping such as "
                        "{method: surgeon, sparsity: 0.5}")
    for mapping in (config, *config["runs"]):
        for key, value in mapping.items():
            if key in _FLOAT_KEYS:
                mapping[key] = yaml_float(value)
    return config


def yaml_float(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string: a string that is a finite number becomes
    that number; anything else is left for validation to refuse."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number):
            return number
    return value


def matrix_from_flags(methods: str, structures: str, sparsities: str, shots: int,
                      **shared: Any) -> dict[str, Any]:
    """The config of ``bench --methods ... --structures ... --sparsities ...``: every method ×
    structure × level (N:M structures have one level). Layer-wise methods get one shot."""
    from llm_surgeon.methods.registry import get_method
    from llm_surgeon.structures import parse_structure

    try:
        levels = [float(x) for x in sparsities.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--sparsities must be numbers, got {sparsities!r}") from None
    if not levels:
        raise UserError("--sparsities needs at least one number, e.g. 0.5 or 0.3,0.5")
    runs = []
    for method in (m.strip() for m in methods.split(",") if m.strip()):
        method_shots = get_method(method).shots(shots)
        for structure in (x.strip() for x in structures.split(",") if x.strip()):
            fixed = parse_structure(structure).fixed_sparsity is not None
            for level in [None] if fixed else levels:
                run = {"method": method, "structure": structure, "shots": method_shots}
                if level is not None:
                    run["sparsity"] = level
                runs.append(run)
    config = {k: v for k, v in shared.items() if v is not None}
    config["runs"] = runs
    return config


def also_eval_texts(config: dict[str, Any]) -> dict[str, str]:
    """The config's ``also_eval`` texts as {label: text source}; a label is a file's stem or a
    corpus name. Refused (one line) where it cannot be honoured."""
    texts = config.get("also_eval", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise UserError("'also_eval' must be a list of texts: file paths or corpus names")
    if texts and config.get("max_memory") is not None:
        raise UserError("'also_eval' evaluates the whole pruned model in memory; it cannot be "
                        "combined with max_memory")
    out: dict[str, str] = {}
    for text in texts:
        label = Path(text).stem if ("/" in text or "." in text) else text
        if label in out:
            raise UserError(f"'also_eval' has two texts labelled {label!r}: rename a file")
        out[label] = text
    return out


def expand_runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Shared settings merged into every run; unknown keys are an error."""
    also_eval_texts(config)
    shared = {k: v for k, v in config.items() if k not in ("runs", "also_eval")}
    if "name" in shared:
        raise UserError("'name' names one bench run: put it in a run's entry")
    runs = []
    for entry in config["runs"]:
        run = {**shared, **entry}
        unknown = set(run) - _CONFIG_KEYS - {"name"}
        if unknown:
            raise UserError(f"unknown bench setting(s): {', '.join(sorted(unknown))}")
        if "method" not in run:
            raise UserError("every bench run needs a 'method'")
        name = run.get("name")
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            raise UserError(f"bench run name {name!r}: use letters, digits, '.', '_' and '-' "
                            "(it names the run's file)")
        if name in _DENSE_FILES:
            raise UserError(f"bench run name {name!r} is taken by the dense perplexity's file; "
                            "choose another")
        PruneConfig(**_settings(run)).validate()
        runs.append(run)
    ids = [run_id(r) for r in runs]
    if len(set(ids)) != len(ids):
        raise UserError("two bench runs have the same id (method, structure, sparsity and "
                        "shots, or name): give them distinct 'name's")
    return runs


def _check_cached(path: Path, result: dict[str, Any], cfg: Any) -> None:
    """A finished run is reused only if it was made with the settings the config now gives it
    (a run id says method, structure, sparsity and shots, or a name: not e.g. the split),
    leaving out the settings the run has no use for."""
    recorded = result.get("settings")
    if not isinstance(recorded, dict):
        return  # older results without their settings
    skip = {"output", *cfg.inert_settings()}  # (a default these do not touch may change)
    differ = [k for k, v in asdict(cfg).items()
              if k not in skip and k in recorded and recorded[k] != v]
    if differ:
        k = differ[0]
        raise UserError(f"{path} was made with {k}={recorded[k]!r}, the config now says "
                        f"{getattr(cfg, k)!r}; delete it to run it again")


def _settings(run: dict[str, Any]) -> dict[str, Any]:
    """A bench run's prune settings (its entry without the ``name``)."""
    return {k: v for k, v in run.items() if k != "name"}


def _write_atomic(path: Path, text: str) -> None:
    from llm_surgeon.io import atomic_write

    atomic_write(path, text)


def _read_run(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        result = None
    if not isinstance(result, dict):
        raise UserError(f"{path} is corrupt (not a JSON object); delete it to run it again")
    return result


def bench(
    config: dict[str, Any], output: str | Path, progress: bool = True, run_missing: bool = True
) -> list[dict[str, Any]]:
    """Run (or, with ``run_missing=False``, only tabulate) the matrix; returns finished runs."""
    out = Path(output)
    # every run is validated there, before minutes go into the first and before any write
    runs = expand_runs(config)
    from llm_surgeon.io import check_bench_folder, ensure_output_folder

    check_bench_folder(out)  # new, empty, or a bench folder we wrote: never a user's folder
    ensure_output_folder(out, kind="bench")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    also = AlsoEval(also_eval_texts(config), out / "runs" / f"{_DENSE_FILES[2]}.json",
                    progress)
    for text in also.texts.values():  # a missing file fails now, not after a prune
        load_text(text, "test")
    rows = []
    for run in runs:
        cfg = PruneConfig(**_settings(run))
        # the dense perplexity is shared by the runs that evaluate on the same windows
        dense_path = out / "runs" / f"{_DENSE_FILES[1] if cfg.validation else _DENSE_FILES[0]}.json"
        evaluation = {k: getattr(cfg, k) for k in _EVAL_KEYS}
        dense_ppl = None
        if dense_path.is_file():
            dense = _read_run(dense_path)
            if all(dense.get(k, v) == v for k, v in evaluation.items()):  # (older: ppl only)
                dense_ppl = dense.get("ppl")
        rid = run_id(run)
        path = out / "runs" / f"{rid}.json"
        if path.is_file():
            result = _read_run(path)
            _check_cached(path, result, cfg)
            if progress:
                print(f"[bench] {rid}: done earlier (ppl {result.get('ppl')})")
        elif not run_missing:
            continue
        else:
            if progress:
                print(f"[bench] {rid}: running")
            cfg.output = None
            start = time.perf_counter()
            full = prune(cfg, progress=progress, dense_ppl=dense_ppl)
            report = strip_private(full)
            report["time_s"] = time.perf_counter() - start
            if also.texts and cfg.eval:
                report["ppl_also"] = also.pruned(full["_model"], full["_tokenizer"], cfg)
                report["ppl_dense_also"] = also.dense(cfg)
            del full
            report["id"] = rid
            if run.get("name") is not None:
                report["name"] = run["name"]
            if dense_ppl is None and report.get("ppl_dense") is not None:
                dense_ppl = report["ppl_dense"]
                _write_atomic(dense_path, json.dumps({"ppl": dense_ppl, **evaluation}) + "\n")
            _write_atomic(path, json.dumps(report, indent=2) + "\n")
            result = report
        rows.append(result)
        write_results(rows, out)  # after every run, so a long matrix can be watched
    return rows


class AlsoEval:
    """Perplexity of each pruned model on the ``also_eval`` texts (64 windows of the run's
    seqlen, like the evaluation text), and of the dense model once per text and setting, kept
    in ``dense_file`` so a resumed bench does not measure it again."""

    def __init__(self, texts: dict[str, str], dense_file: Path, progress: bool) -> None:
        self.texts, self.dense_file, self.progress = texts, dense_file, progress

    def _ppl(self, model: Any, cfg: PruneConfig, tokenizer: Any, label: str) -> float:
        from llm_surgeon.evaluate.perplexity import evaluate_perplexity
        from llm_surgeon.evaluate.runner import eval_windows_for

        windows = eval_windows_for(tokenizer, self.texts[label], cfg.seqlen, cfg.eval_windows)
        return evaluate_perplexity(model, windows, cfg.batch_size, self.progress,
                                   desc=f"{label} perplexity")["ppl"]

    def pruned(self, model: Any, tokenizer: Any, cfg: PruneConfig) -> dict[str, float]:
        """The pruned ``model`` (with the run's own ``tokenizer``) on every text."""
        return {label: self._ppl(model, cfg, tokenizer, label) for label in self.texts}

    def dense(self, cfg: PruneConfig) -> dict[str, float]:
        from llm_surgeon.models.load import load_model

        key = {"model": cfg.model, "seqlen": cfg.seqlen, "eval_windows": cfg.eval_windows,
               "dtype": cfg.dtype}
        known = _read_run(self.dense_file).get("entries", []) if self.dense_file.is_file() else []
        found = {e["label"]: e["ppl"] for e in known
                 if {k: e.get(k) for k in key} == key and e.get("text") == self.texts.get(
                     e["label"])}
        missing = [label for label in self.texts if label not in found]
        if missing:
            model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
            for label in missing:
                found[label] = self._ppl(model, cfg, tokenizer, label)
                known.append({"label": label, "text": self.texts[label], **key,
                              "ppl": found[label]})
            del model
            _write_atomic(self.dense_file, json.dumps({"entries": known}, indent=2) + "\n")
        return {label: found[label] for label in self.texts}


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": result["id"],
        "method": result["method"],
        "structure": result["structure"],
        "sparsity_target": result["sparsity_target"],
        "sparsity_achieved": result["sparsity_achieved"],
        "ppl": result.get("ppl"),
        "ppl_dense": result.get("ppl_dense"),
        "shots": len(result.get("shots", [])),
        "time_s": result.get("time_s"),
        "lowrank_rank": (result.get("settings") or {}).get("lowrank_rank", 0),
        **({"ppl_also": result["ppl_also"], "ppl_dense_also": result.get("ppl_dense_also")}
           if result.get("ppl_also") else {}),
    }


def write_results(results: list[dict[str, Any]], out: Path) -> None:
    rows = [summary_row(r) for r in results]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "results.csv", buf.getvalue())
    _write_atomic(out / "results.json", json.dumps(rows, indent=2) + "\n")
    named = any(r.get("name") is not None for r in results)
    _write_atomic(out / "results.md", markdown_table(rows, named) + also_table(rows)
                  + timing_table(results))


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]], named: bool = False) -> str:
    """The results table; ``named``: a first column with each run's id (its name)."""
    lines = [
        ("| run " if named else "") + "| method | structure | target | achieved | shots | ppl | "
        "time (s) |",
        ("|---" if named else "") + "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            (f"| {r['id']} " if named else "") +
            f"| {r['method']} | {r['structure']} | {r['sparsity_target']:.2f} | "
            f"{r['sparsity_achieved']:.4f} | {r['shots']} | {_fmt(r['ppl'], '.2f')} | "
            f"{_fmt(r['time_s'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def rise_ratio(ppl: float, dense: float, ref_ppl: float, ref_dense: float) -> float:
    """How much of the perplexity rise on the evaluation text a run shows on another text:
    ``log(ppl / dense) / log(ref_ppl / ref_dense)`` (1: the same relative damage; above 1: the
    run lost more there than on the evaluation text)."""
    return math.log(ppl / dense) / math.log(ref_ppl / ref_dense)


def also_table(rows: list[dict[str, Any]]) -> str:
    """Perplexity on the ``also_eval`` texts, dense beside it, and each run's rise there as a
    share of its rise on the evaluation text (runs measured without them are left out)."""
    measured = [r for r in rows if r.get("ppl_also")]
    if not measured:
        return ""
    labels = list(dict.fromkeys(k for r in measured for k in r["ppl_also"]))
    lines = ["", "Perplexity on other texts (`also_eval`; dense in brackets) and the log-"
             "perplexity rise there over the rise on the evaluation text:", "",
             "| run | ppl | " + " | ".join(f"{lab} | rise vs eval" for lab in labels) + " |",
             "|---|---|" + "---|---|" * len(labels)]
    for r in measured:
        cells = []
        for lab in labels:
            ppl, dense = r["ppl_also"].get(lab), (r.get("ppl_dense_also") or {}).get(lab)
            if ppl is None or dense is None:
                cells += ["–", "–"]
                continue
            ratio = ("–" if r["ppl"] is None or r["ppl_dense"] is None
                     or r["ppl"] <= r["ppl_dense"]
                     else f"{rise_ratio(ppl, dense, r['ppl'], r['ppl_dense']):.2f}")
            cells += [f"{ppl:.2f} ({dense:.2f})", ratio]
        lines.append(f"| {r['id']} | {_fmt(r['ppl'], '.2f')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def timing_table(results: list[dict[str, Any]]) -> str:
    """The cost of one shot against one plain forward+backward pass, for runs that timed it."""
    timed = [r for r in results if r.get("shot_cost_ratio") is not None]
    if not timed:
        return ""
    phases = ("curvature", "costs", "threshold", "update")
    lines = ["", "Cost of the first shot, in one run, against one plain forward+backward pass "
             "(`loss.backward()` with parameter gradients) over the same calibration set:", "",
             "| run | plain fwd+bwd (s) | shot (s) | ratio | "
             + " | ".join(f"{p} (s)" for p in phases) + " |",
             "|---|---|---|---|" + "---|" * len(phases)]
    for r in timed:
        ph = r["shots"][0]["phases"]
        lines.append(f"| {r['id']} | {r['plain_fwd_bwd_s']:.1f} | {r['shot_time_s']:.1f} | "
                     f"{r['shot_cost_ratio']:.2f} | "
                     + " | ".join(f"{ph.get(p, {}).get('time_s', 0.0):.1f}" for p in phases)
                     + " |")
    return "\n".join(lines) + "\n"
