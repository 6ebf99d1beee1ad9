"""The eval command end to end on tiny models, and every bad input it must refuse."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from llm_surgeon.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("family", ["llama", "opt", "phi"])
def test_eval_tiny_model_on_text_file(capsys, tmp_path, tiny_model_dirs, sample_text_file, family):
    out_json = tmp_path / "r.json"
    code, out, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_model_dirs[family]),
        "--data",
        str(sample_text_file),
        "--seqlen",
        "32",
        "--eval-windows",
        "4",
        "--json",
        str(out_json),
    )
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["windows"] == 4 and result["tokens"] == 4 * 31
    assert isinstance(result["ppl"], float) and math.isfinite(result["ppl"])
    # a random model is close to uniform over its vocabulary of 300
    assert 100 < result["ppl"] < 1000
    assert result["params_total"] > result["params_decoder_linear"] > 0
    assert result["size_on_disk_mb"] > 0 and result["size_on_disk_estimated"] is False
    assert "perplexity" in out


def _one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("llm-surgeon: error:")
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_unknown_model_name(capsys):
    code, _, err = run_cli(capsys, "eval", "--model", "no-such-model-anywhere")
    _one_line_error(code, err, "unknown model")


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "nope"))
    _one_line_error(code, err, "not found")


def test_missing_text_file(capsys, tiny_model_dirs, tmp_path):
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_model_dirs["llama"]),
        "--data",
        str(tmp_path / "missing.txt"),
    )
    _one_line_error(code, err, "text not found")


def test_text_shorter_than_one_window(capsys, tiny_model_dirs, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_model_dirs["llama"]),
        "--data",
        str(short),
        "--seqlen",
        "64",
    )
    _one_line_error(code, err, "shorter than one evaluation window")


def test_window_longer_than_context(capsys, tiny_model_dirs, sample_text_file):
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_model_dirs["opt"]),
        "--data",
        str(sample_text_file),
        "--seqlen",
        "4096",
    )
    _one_line_error(code, err, "longer than the model's context")


@pytest.mark.parametrize("flag", ["--eval-windows", "--seqlen", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_numbers(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["eval", flag, value])
    _, err = capsys.readouterr()
    _one_line_error(exc.value.code, err, "positive")


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llm_surgeon.cli", "eval", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    _one_line_error(proc.returncode, proc.stderr, "not found")


def test_help_teaches():
    proc = subprocess.run(
        [sys.executable, "-m", "llm_surgeon.cli", "eval", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "SparseGPT protocol" in proc.stdout and "--eval-windows" in proc.stdout
