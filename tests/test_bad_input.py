"""Every row of the README's table of rejected input: one line on stderr, exit status 2, no
traceback, and nothing written to the output folder."""

from __future__ import annotations

import shutil

import pytest
import torch

from llm_surgeon.cli import main
from tests.conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_model_dirs):
    """Folders that must be refused: an unknown family, a corrupt config, truncated weights,
    NaN weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("bad-models")
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    bad_config = root / "bad-config"
    shutil.copytree(tiny_model_dirs["llama"], bad_config)
    (bad_config / "config.json").write_text("{not json")
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dirs["llama"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    nan = root / "nan"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(nan)
    tiny_tokenizer().save_pretrained(nan)
    return {"gpt2": gpt2, "bad-config": bad_config, "truncated": truncated, "nan": nan}


@pytest.fixture(scope="module")
def bad_texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-texts")
    binary = root / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 20)
    return {"binary": binary}


# (row of the README table, extra arguments, fragment of the message)
ROWS = [
    ("sparsity outside [0, 1)", ["--sparsity", "1.0"], "[0, 1)"),
    ("N >= M", ["--structure", "4:4"], "0 < N < M"),
    ("M does not divide the input width", ["--structure", "2:5"], "does not divide"),
    ("unknown structure", ["--structure", "blocks"], "unknown --structure"),
    ("unknown method", ["--method", "nonsense"], "unknown --method"),
    ("method without that structure", ["--method", "sparsegpt", "--structure",
                                       "heads-channels"], "does not support"),
    ("unknown architecture", ["--model", "@gpt2"], "unsupported architecture 'gpt2'"),
    ("missing model", ["--model", "/nonexistent/model"], "model path not found"),
    ("corrupt config", ["--model", "@bad-config"], "could not load model"),
    ("corrupt weights", ["--model", "@truncated"], "could not load model"),
    ("missing text file", ["--calib-data", "/nonexistent/text.txt"], "text not found"),
    ("text not UTF-8", ["--calib-data", "%binary"], "not UTF-8"),
    ("text shorter than the calibration request", ["--calib-samples", "5000"],
     "fewer than the 5000 x 32"),
    ("NaN/Inf curvature", ["--model", "@nan"], "has NaN/Inf values"),
    ("unreadable memory budget", ["--max-memory", "lots"], "--max-memory: cannot read"),
    ("memory budget below one streamed layer", ["--max-memory", "10kB"],
     "below what one streamed layer needs"),
]


@pytest.mark.parametrize(("row", "extra", "fragment"), ROWS, ids=[r[0] for r in ROWS])
def test_rejected_input(capsys, tiny_model_dirs, sample_text_file, bad_models, bad_texts,
                        tmp_path, row, extra, fragment):
    extra = [str(bad_models[a[1:]]) if a.startswith("@") else
             str(bad_texts[a[1:]]) if a.startswith("%") else a for a in extra]
    args = {"--model": str(tiny_model_dirs["llama"]), "--calib-data": str(sample_text_file),
            "--eval-data": str(sample_text_file), "--seqlen": "32", "--calib-samples": "2",
            "--output": str(tmp_path / "out")}
    args.update(zip(extra[::2], extra[1::2], strict=True))  # every row is flag-value pairs
    argv = ["-q", "prune", *[x for kv in args.items() for x in kv]]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects some values itself, with the same format
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("llm-surgeon: error:"), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_resume_without_checkpoint(capsys, tmp_path):
    code = main(["-q", "prune", "--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err and len(err.strip().splitlines()) == 1


def test_readme_table_lists_every_row():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for row, _, _fragment in ROWS:
        assert f"| {row} |" in readme, row
