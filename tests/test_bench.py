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
