"""`llm-surgeon report`: a summary with readable figures for prune and bench folders."""

from __future__ import annotations

from llm_surgeon.cli import main
from llm_surgeon.driver import prune
from tests.test_prune import _cfg


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_of_a_pruned_model(tiny_model_dirs, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    prune(_cfg(tiny_model_dirs["llama"], sample_text_file, method="surgeon", sparsity=0.5,
               shots=2, eval_every_shot=True, output=str(out)), progress=False)
    assert main(["report", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "surgeon · unstructured" in text and "](plots/layers.png)" in text
    _png_ok(out / "plots" / "layers.png")
    _png_ok(out / "plots" / "shots.png")


def test_report_of_a_bench_folder(tiny_model_dirs, sample_text_file, tmp_path):
    from llm_surgeon.bench import bench

    config = {"model": str(tiny_model_dirs["llama"]), "calib_data": str(sample_text_file),
              "eval_data": str(sample_text_file), "calib_samples": 2, "seqlen": 32,
              "eval_windows": 2,
              "runs": [{"method": m, "sparsity": s, "shots": 1}
                       for m in ("magnitude", "k-obd") for s in (0.2, 0.5)]}
    bench(config, tmp_path / "b", progress=False)
    assert main(["report", str(tmp_path / "b")]) == 0
    text = (tmp_path / "b" / "summary.md").read_text()
    assert text.count("| magnitude |") == 2 and "ppl_unstructured.png" in text
    _png_ok(tmp_path / "b" / "plots" / "ppl_unstructured.png")
    # one heat map per run, named after the run
    for m in ("magnitude", "k-obd"):
        for s in (20, 50):
            name = f"layers_{m}-unstructured-{s}-1shots.png"
            assert f"](plots/{name})" in text
            _png_ok(tmp_path / "b" / "plots" / name)


def test_series_labels_tell_shot_counts_apart():
    from llm_surgeon.report.plots import series_labels

    rows = [{"method": "k-obd", "shots": 1}, {"method": "k-obd", "shots": 5},
            {"method": "surgeon", "shots": 5}, {"method": "surgeon", "shots": 5}]
    assert series_labels(rows) == ["k-obd (1 shot)", "k-obd (5 shots)", "surgeon", "surgeon"]


def test_report_of_nothing_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither report.json" in capsys.readouterr().err


def test_plots_use_a_headless_backend():
    from llm_surgeon.report import plots

    assert plots._plt().get_backend().lower() == "agg"


def test_accuracy_plot(tmp_path):
    from llm_surgeon.report.plots import accuracy_vs_sparsity

    rows = [{"sparsity": s, "tasks": {"a": {"acc": 0.9 - s}, "b": {"acc": 0.5 - s / 2}}}
            for s in (0.0, 0.3, 0.5)]
    _png_ok(accuracy_vs_sparsity(rows, tmp_path / "acc.png", chance={"a": 0.25}))
