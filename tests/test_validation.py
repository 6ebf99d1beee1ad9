"""``--validation``: perplexity on the calibration text's held-out tail, never drawn for
calibration (for choosing settings without the test text); bench runs told apart by name."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_surgeon import bench as bench_mod
from llm_surgeon.cli import main
from llm_surgeon.config import PruneConfig
from llm_surgeon.data.windows import calibration_windows, tokenize
from llm_surgeon.driver import prune, validation_split
from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.perplexity import evaluate_perplexity


def test_validation_tail_is_never_drawn_for_calibration():
    ids = torch.arange(10_000)
    cfg = PruneConfig(calib_samples=64, seqlen=32, eval_windows=5, validation=True)
    calib, val = validation_split(ids, cfg)
    assert val.shape == (5, 32)
    assert torch.equal(val.reshape(-1), ids[-160:])
    assert torch.equal(calib, ids[:-160])
    windows = calibration_windows(calib, cfg.calib_samples, cfg.seqlen, seed=0)
    # ids are positions: every calibration token lies before the validation tail
    assert int(windows.max()) < 10_000 - 160
    # without the split, 64 random windows of this text do reach into the tail
    assert int(calibration_windows(ids, 64, 32, seed=0).max()) >= 10_000 - 160
    with pytest.raises(UserError, match="--validation"):
        validation_split(torch.arange(200), cfg)


def test_prune_evaluates_on_the_validation_tail(tiny_model_dirs, sample_text_file):
    model_dir = tiny_model_dirs["llama"]
    cfg = PruneConfig(model=str(model_dir), calib_data=str(sample_text_file),
                      eval_data="a file that is never read", calib_samples=2, seqlen=16,
                      eval_windows=3, shots=1, method="magnitude", validation=True)
    report = prune(cfg, progress=False)
    assert report["settings"]["validation"] is True
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenize(tok, sample_text_file.read_text())
    tail = ids[-3 * 16:].reshape(3, 16)
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        want = evaluate_perplexity(dense, tail, progress=False)["ppl"]
    assert report["ppl_dense"] == pytest.approx(want, rel=1e-5)
    # the test-text perplexity of the same model differs: the tail really is what was measured
    with torch.no_grad():
        head = evaluate_perplexity(dense, ids[: 3 * 16].reshape(3, 16), progress=False)["ppl"]
    assert abs(head - want) > 1e-3 * want


def test_validation_refuses_an_eval_text_it_would_not_read(capsys, tmp_path, tiny_model_dirs,
                                                           sample_text_file):
    base = ["-q", "prune", "--model", str(tiny_model_dirs["llama"]), "--calib-data",
            str(sample_text_file), "--calib-samples", "2", "--seqlen", "16", "--eval-windows",
            "2", "--shots", "1", "--method", "magnitude", "--validation"]
    out = tmp_path / "out"
    assert main([*base, "--eval-data", str(sample_text_file), "--output", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "--eval-data would not be read" in err[0], err
    assert not out.exists()
    # without --eval-data the same command runs, on the validation tail
    assert main([*base, "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["validation"] is True
    assert report["settings"]["eval_data"] == PruneConfig().eval_data


def test_bench_runs_told_apart_by_name(tmp_path, tiny_model_dirs, sample_text_file):
    common = {"model": str(tiny_model_dirs["llama"]), "calib_data": str(sample_text_file),
              "eval_data": str(sample_text_file), "calib_samples": 2, "seqlen": 16,
              "eval_windows": 2, "shots": 1}
    same = [{"method": "surgeon", "structure": "2:4"},
            {"method": "surgeon", "structure": "2:4", "damp_g": 0.5}]
    with pytest.raises(UserError, match="distinct 'name'"):
        bench_mod.expand_runs({**common, "runs": same})
    with pytest.raises(UserError, match="bench run name"):
        bench_mod.expand_runs({**common, "runs": [{**same[0], "name": "../escape"}]})
    with pytest.raises(UserError, match="taken by the dense"):
        bench_mod.expand_runs({**common, "runs": [{**same[0], "name": "dense"}]})
    runs = [{**same[0], "name": "damp-default"}, {**same[1], "name": "damp-g-0.5"},
            {**same[0], "name": "on-validation", "validation": True}]
    cfg_file = tmp_path / "ablation.yaml"
    cfg_file.write_text(yaml.safe_dump({**common, "runs": runs}))
    out = tmp_path / "out"
    assert main(["-q", "bench", "--config", str(cfg_file), "--output", str(out)]) == 0
    got = {r["id"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(got) == {"damp-default", "damp-g-0.5", "on-validation"}
    assert got["damp-default"]["ppl"] != got["damp-g-0.5"]["ppl"]  # the setting took effect
    # the dense perplexity is shared only by runs evaluated on the same windows
    assert got["damp-default"]["ppl_dense"] == got["damp-g-0.5"]["ppl_dense"]
    assert got["on-validation"]["ppl_dense"] != got["damp-default"]["ppl_dense"]
    assert (out / "runs" / "dense-validation.json").is_file()
    assert "| damp-g-0.5 | surgeon | 2:4 |" in (out / "results.md").read_text()
    # the dense file records what it was measured on
    assert json.loads((out / "runs" / "dense.json").read_text())["validation"] is False

    # a finished run is reused only with the settings it was made with
    runs[0] = {**runs[0], "validation": True}
    cfg_file.write_text(yaml.safe_dump({**common, "runs": runs}))
    with pytest.raises(UserError, match=r"damp-default\.json was made with validation=False"):
        bench_mod.bench(bench_mod.load_config(cfg_file), out, progress=False)
