"""A tiny bench matrix end to end: rows as expected; a second call resumes, not redoes."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from llm_surgeon import bench as bench_mod
from llm_surgeon.cli import main
from llm_surgeon.errors import UserError


def _config(model_dir, text) -> dict:
    return {
        "model": str(model_dir), "calib_data": str(text), "eval_data": str(text),
        "calib_samples": 2, "seqlen": 32, "eval_windows": 2,
        "runs": [
            {"method": "magnitude", "structure": "unstructured", "sparsity": 0.5, "shots": 1},
            {"method": "surgeon", "structure": "2:4", "shots": 2},
            {"method": "k-obd", "structure": "rows-columns", "sparsity": 0.2, "shots": 1},
        ],
    }


def test_bench_matrix_end_to_end_and_resume(tmp_path, tiny_model_dirs, sample_text_file,
                                            monkeypatch, capsys):
    cfg_file = tmp_path / "bench.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(tiny_model_dirs["llama"], sample_text_file)))
    out = tmp_path / "out"
    assert main(["-q", "bench", "--config", str(cfg_file), "--output", str(out)]) == 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["magnitude", "surgeon", "k-obd"]
    assert [r["structure"] for r in rows] == ["unstructured", "2:4", "rows-columns"]
    for col in ("method", "structure", "sparsity_target", "sparsity_achieved", "ppl", "time_s"):
        assert all(r[col] != "" for r in rows), col
    assert abs(float(rows[0]["sparsity_achieved"]) - 0.5) < 0.005
    assert "| surgeon | 2:4 |" in (out / "results.md").read_text()
    # The dense perplexity is measured once and shared by every run.
    assert len({r["ppl_dense"] for r in rows}) == 1

    # Interrupted matrix: drop one finished run; the next call redoes only that one.
    (out / "runs" / "surgeon-2of4-2shots.json").unlink()
    calls = []
    real = bench_mod.prune

    def counting(cfg, **kw):
        calls.append(cfg.method)
        return real(cfg, **kw)

    monkeypatch.setattr(bench_mod, "prune", counting)
    capsys.readouterr()
    assert main(["-q", "bench", "--config", str(cfg_file), "--output", str(out)]) == 0
    assert calls == ["surgeon"]
    assert len(json.loads((out / "results.json").read_text())) == 3


def test_bench_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs: []\n")
    with pytest.raises(UserError, match="non-empty 'runs'"):
        bench_mod.load_config(bad)
    with pytest.raises(UserError, match="not found"):
        bench_mod.load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="unknown bench setting"):
        bench_mod.expand_runs({"runs": [{"method": "surgeon", "colour": "red"}]})


def test_bench_matrix_from_flags(tmp_path, tiny_model_dirs, sample_text_file):
    out = tmp_path / "flags"
    argv = ["-q", "bench", "--output", str(out), "--methods", "magnitude,wanda",
            "--structures", "unstructured,2:4", "--sparsities", "0.3,0.5", "--shots", "2",
            "--model", str(tiny_model_dirs["llama"]), "--calib-data", str(sample_text_file),
            "--eval-data", str(sample_text_file), "--calib-samples", "2", "--seqlen", "32",
            "--eval-windows", "2"]
    assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    got = sorted((r["method"], r["structure"], r["sparsity_target"], r["shots"]) for r in rows)
    assert got == sorted([
        ("magnitude", "unstructured", "0.3", "2"), ("magnitude", "unstructured", "0.5", "2"),
        ("magnitude", "2:4", "0.5", "2"),
        ("wanda", "unstructured", "0.3", "1"), ("wanda", "unstructured", "0.5", "1"),
        ("wanda", "2:4", "0.5", "1")])
    for r in rows:
        assert set(bench_mod.CSV_COLUMNS) <= set(r) and float(r["ppl"]) > 0


def test_bench_also_eval_measures_other_texts(tmp_path, tiny_model_dirs, sample_text_file):
    """Each pruned model is also evaluated on the ``also_eval`` texts, dense once per text: on
    the evaluation text itself it gives the run's own perplexities (pruned and dense), on
    another text numbers of its own, and the table shows the rise ratio."""
    other = tmp_path / "other.txt"
    words = sample_text_file.read_text().split()
    other.write_text(" ".join(reversed(words)))  # same vocabulary, another text
    config = _config(tiny_model_dirs["llama"], sample_text_file)
    config["runs"] = config["runs"][:2]
    config["also_eval"] = [str(sample_text_file), str(other)]
    out = tmp_path / "out"
    rows = bench_mod.bench(config, out, progress=False)
    same, diff = sample_text_file.stem, other.stem
    for r in rows:
        assert r["ppl_also"][same] == pytest.approx(r["ppl"], rel=1e-6)
        assert r["ppl_dense_also"][same] == pytest.approx(r["ppl_dense"], rel=1e-6)
        # the pruned model, not the dense one, was evaluated on the other text
        assert abs(r["ppl_also"][diff] / r["ppl_dense_also"][diff] - 1) > 1e-5
    dense = json.loads((out / "runs" / "dense-also.json").read_text())["entries"]
    assert sorted(e["label"] for e in dense) == sorted([same, diff])  # measured once each
    md = (out / "results.md").read_text()
    assert f"{diff} | rise vs eval" in md
    assert "| 1.00 |" in md  # the evaluation text's own rise ratio


def test_bench_also_eval_errors(tmp_path, tiny_model_dirs, sample_text_file):
    config = _config(tiny_model_dirs["llama"], sample_text_file)
    for bad, message in ((["x", 3], "must be a list"), ("a.txt", "must be a list"),
                         ([str(tmp_path / "absent.txt")], "text not found")):
        config["also_eval"] = bad
        with pytest.raises(UserError, match=message):
            bench_mod.bench(config, tmp_path / "o1", progress=False)
    config["also_eval"] = [str(sample_text_file)]
    config["max_memory"] = "1GB"
    with pytest.raises(UserError, match="max_memory"):
        bench_mod.bench(config, tmp_path / "o2", progress=False)


def test_cached_run_compares_only_the_settings_the_run_uses(tmp_path):
    """A finished run recorded with another value of a setting it has no use for (a unit lever
    on 2:4, or on Numerical's heads-channels) is reused; one that differs in a lever it uses
    (the surgeon's coupling on heads-channels) is refused."""
    from llm_surgeon.config import PruneConfig

    path = tmp_path / "run.json"

    def recorded(**kw):
        return {"settings": {**bench_mod.asdict(PruneConfig(**kw)), "unit_coupling": "layers"}}

    for kw in ({"method": "surgeon", "structure": "2:4"},
               {"method": "numerical", "structure": "heads-channels", "sparsity": 0.2}):
        bench_mod._check_cached(path, recorded(**kw), PruneConfig(**kw))  # reused
    kw = {"method": "surgeon", "structure": "heads-channels", "sparsity": 0.2}
    with pytest.raises(UserError, match="unit_coupling='layers'"):
        bench_mod._check_cached(path, recorded(**kw), PruneConfig(**kw))
    bench_mod._check_cached(path, recorded(**kw), PruneConfig(**kw, unit_coupling="layers"))
