"""Every row of the rejected-input table (docs/bad-input.md): one line on stderr, exit status 2, no
traceback, and nothing written to the output folder."""

from __future__ import annotations

import shutil
from pathlib import Path

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


# (row of the docs/bad-input.md table, extra arguments, fragment of the message)
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

    readme = (Path(__file__).resolve().parent.parent / "docs" / "bad-input.md").read_text()
    for row, _, _fragment in ROWS:
        assert f"| {row} |" in readme, row


# ---- issue 13: every input that used to end in a traceback, or to do harm -------------------
# (row of docs/bad-input.md, how to build the command, fragment of the message); the command
# builder gets a context and returns argv. Each must also leave every file as it was.


def _prune(ctx, *extra, output=None):
    return ["-q", "prune", "--model", str(ctx.model), "--calib-data", str(ctx.text),
            "--eval-data", str(ctx.text), "--seqlen", "32", "--calib-samples", "2",
            "--method", "magnitude", "--shots", "2",
            "--output", str(output if output is not None else ctx.tmp / "out"), *extra]


def _folder_with_user_files(ctx):
    d = ctx.tmp / "d"
    (d / "src").mkdir(parents=True)
    (d / "report.json").write_text("{}")
    (d / "src" / "main.c").write_text("int main;")
    return _prune(ctx, output=d)


def _ours_plus_foreign(ctx):
    out = ctx.tmp / "ours"
    shutil.copytree(ctx.finished, out)
    (out / "notes.txt").write_text("mine")
    return _prune(ctx, output=out)


def _a_file(ctx):
    f = ctx.tmp / "afile"
    f.write_text("keep")
    return _prune(ctx, output=f)


def _offload_file(ctx):
    f = ctx.tmp / "off"
    f.write_text("keep")
    return _prune(ctx, "--max-memory", "1GB", "--offload-dir", str(f))


def _unwritable(ctx):
    import os

    if os.geteuid() != 0:
        d = ctx.tmp / "ro"
        d.mkdir()
        d.chmod(0o555)
        return _prune(ctx, output=d / "out")
    return _prune(ctx, output="/proc/self/out")


def _model_copy(ctx, name, change):
    d = ctx.tmp / name
    shutil.copytree(ctx.model, d)
    change(d)
    return d


def _wrong_type(d):
    import json

    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = "abc"
    (d / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(d):
    for f in list(d.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()


def _bad_json(d):
    (d / "config.json").write_text("{not json")


def _truncate(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])


def _tampered(ctx, change):
    import json

    out = ctx.tmp / "run"
    shutil.copytree(ctx.checkpointed, out)
    path = out / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    change(state, out)
    if state is not None:
        path.write_text(json.dumps(state))
    return ["-q", "prune", "--resume", str(out)]


def _streamed_tampered(ctx):
    out = ctx.tmp / "run"
    shutil.copytree(ctx.streamed, out)
    layer = sorted((out / "checkpoint" / "layers").glob("*.safetensors"))[0]
    layer.write_bytes(layer.read_bytes()[:100])
    return ["-q", "prune", "--resume", str(out)]


def _weights_truncated(state, out):
    w = out / "checkpoint" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:200])


def _bench(ctx, text):
    cfg = ctx.tmp / "bench.yaml"
    cfg.write_text(text)
    return ["-q", "bench", "--config", str(cfg), "--output", str(ctx.tmp / "bench")]


def _report(ctx, text):
    d = ctx.tmp / "run"
    d.mkdir()
    (d / "report.json").write_text(text)
    return ["-q", "report", str(d)]


def _eval(ctx, *extra):
    return ["-q", "eval", "--model", str(ctx.model), "--data", str(ctx.text), "--seqlen", "32",
            "--eval-windows", "2", *extra]


def _only_a_leftover_name(ctx):
    d = ctx.tmp / "d2"
    d.mkdir()
    (d / ".zshrc.old-2024").write_text("alias ll='ls -l'")
    return _prune(ctx, output=d)


def _user_checkpoint_tmp_name(ctx):
    d = ctx.tmp / "proj2"
    (d / ".checkpoint.tmp-2024-a").mkdir(parents=True)
    (d / "main.c").write_text("int main;")
    (d / ".checkpoint.tmp-2024-a" / "w.bin").write_bytes(b"mine")
    return _prune(ctx, output=d)


def _output_inside_output(ctx):
    base = ctx.tmp / "base"
    shutil.copytree(ctx.finished, base)
    shutil.copytree(ctx.finished, base / "best-run-sp50")
    return _prune(ctx, output=base)


def _ours_plus_leftover_names(ctx):
    out = ctx.tmp / "ours"
    shutil.copytree(ctx.finished, out)
    (out / ".x.old-2024").write_text("mine")
    (out / "run-2024-x").mkdir()
    (out / "run-2024-x" / "log.txt").write_text("mine")
    (out / ".checkpoint.tmp-2024-a").mkdir()
    (out / ".checkpoint.tmp-2024-a" / "w.bin").write_bytes(b"mine")
    return _prune(ctx, output=out)


def _cache_as_output(ctx):
    import json

    from llm_surgeon.io import MARKER

    cache = ctx.tmp / "SmolLM2-135M-fp32"
    shutil.copytree(ctx.finished, cache)
    marker = json.loads((cache / MARKER).read_text())
    (cache / MARKER).write_text(json.dumps({**marker, "kind": "cache"}))
    return _prune(ctx, output=cache)


def _bench_flags(output):
    return ["-q", "bench", "--methods", "magnitude", "--sparsities", "0.5", "--output", output]


def _bench_into_dot(ctx):
    (ctx.tmp / "results.csv").write_text("my,own,data\n")
    return _bench_flags(".")


def _bench_into_users_folder(ctx):
    (ctx.tmp / "proj").mkdir()
    (ctx.tmp / "proj" / "results.csv").write_text("my,own,data\n")
    return _bench_flags(str(ctx.tmp / "proj"))


def _offload_vs_output(where):
    def build(ctx):
        out = ctx.tmp / "o"
        off = {"inside": out / "off", "equal": out, "holding": ctx.tmp}[where]
        return _prune(ctx, "--max-memory", "1GB", "--offload-dir", str(off), output=out)
    return build


def _report_over_users_summary(ctx):
    d = ctx.tmp / "notes"
    d.mkdir()
    shutil.copy(ctx.finished / "report.json", d / "report.json")
    (d / "summary.md").write_text("# my notes")
    return ["-q", "report", str(d)]


def _report_over_users_plot(ctx):
    d = ctx.tmp / "ours"
    shutil.copytree(ctx.finished, d)
    (d / "plots").mkdir()
    (d / "plots" / "layers.png").write_bytes(b"my figure")
    return ["-q", "report", str(d)]


MORE_ROWS = [
    ("folder with files llm-surgeon did not write", _folder_with_user_files,
     "not an llm-surgeon output"),
    ("our output with a file added", _ours_plus_foreign, "did not write (notes.txt)"),
    ("folder holding only a file named like our leftovers", _only_a_leftover_name,
     "not an llm-surgeon output"),
    ("folder with a user folder named like our checkpoint temporary",
     _user_checkpoint_tmp_name, "not an llm-surgeon output"),
    ("our output holding a copy of another output", _output_inside_output,
     "did not write (best-run-sp50/"),
    ("our output with user files named like our leftovers", _ours_plus_leftover_names,
     "did not write (.checkpoint.tmp-2024-a/, .x.old-2024, run-2024-x/)"),
    ("the bundled model's cache as --output", _cache_as_output, "is an llm-surgeon cache"),
    ("bench output that is the current folder", _bench_into_dot, "is the current folder"),
    ("bench output that is a user's folder", _bench_into_users_folder,
     "not an llm-surgeon bench folder"),
    ("offload folder inside the output", _offload_vs_output("inside"), "keep the two apart"),
    ("offload folder that is the output", _offload_vs_output("equal"), "keep the two apart"),
    ("offload folder holding the output", _offload_vs_output("holding"), "keep the two apart"),
    ("report over a user's summary.md", _report_over_users_summary,
     "summary.md, not written by llm-surgeon"),
    ("report over a user's plot", _report_over_users_plot,
     "plots/layers.png, not written by llm-surgeon"),
    ("output is the current folder", lambda c: _prune(c, output="."), "current folder"),
    ("output that is a file", _a_file, "not a folder"),
    ("output in a folder that cannot be written", _unwritable, "cannot write in"),
    ("offload folder that is a file", _offload_file, "--offload-dir"),
    ("NaN or infinite number", lambda c: _prune(c, "--percdamp", "nan"),
     "must be a finite number"),
    ("NaN learning rate", lambda c: _prune(c, "--lowrank-lr", "nan"), "must be a finite"),
    ("NaN penalty", lambda c: _prune(c, "--maiht-mu", "nan"), "must be a finite"),
    ("number outside its range", lambda c: _prune(c, "--damp-g", "1e30"),
     "--damp-g must be in"),
    ("seed that is not a 32-bit integer", lambda c: _prune(c, "--seed", "1e23"),
     "expected an integer"),
    ("seed out of range", lambda c: _prune(c, "--seed", str(10**23)), "--seed must be in"),
    ("negative low-rank rank", lambda c: _prune(c, "--lowrank-rank", "-1"),
     "--lowrank-rank must be in"),
    ("more shots than the bound", lambda c: _prune(c, "--shots", "1001"),
     "--shots must be in [1, 1000]"),
    ("unknown device", lambda c: _prune(c, "--device", "banana"), "is not a torch device"),
    ("device not on this machine", lambda c: _prune(c, "--device", "cuda:7"),
     "cuda"),
    ("config field of the wrong type",
     lambda c: _prune(c, "--model", str(_model_copy(c, "wrongtype", _wrong_type))),
     "could not load model"),
    ("missing tokenizer",
     lambda c: _prune(c, "--model", str(_model_copy(c, "notok", _no_tokenizer))),
     "no usable tokenizer"),
    ("corrupt config under --max-memory",
     lambda c: _prune(c, "--model", str(_model_copy(c, "badcfg", _bad_json)), "--max-memory",
                      "1GB", "--offload-dir", str(c.tmp / "offload")), "could not load model"),
    ("truncated weights under --max-memory",
     lambda c: _prune(c, "--model", str(_model_copy(c, "trunc", _truncate)), "--max-memory",
                      "1GB", "--offload-dir", str(c.tmp / "offload")), "could not load model"),
    ("checkpoint without settings", lambda c: _tampered(c, lambda s, o: s.pop("settings")),
     "missing settings"),
    ("checkpoint with an extra key", lambda c: _tampered(c, lambda s, o: s.update(x=1)),
     "unexpected x"),
    ("checkpoint with a sparsity of 'abc'",
     lambda c: _tampered(c, lambda s, o: s["settings"].update(sparsity="abc")),
     "sparsity"),
    ("checkpoint whose report is a list",
     lambda c: _tampered(c, lambda s, o: s.update(report=[])), "report is not a mapping"),
    ("checkpoint shot missing a key",
     lambda c: _tampered(c, lambda s, o: s["shots"][0].pop("time_s")), "shot 1 lacks"),
    ("checkpoint with a bad RNG state",
     lambda c: _tampered(c, lambda s, o: s.update(rng=[1, 2, 3])), "rng is not a list"),
    ("checkpoint whose settings are no longer accepted",
     lambda c: _tampered(c, lambda s, o: s["settings"].update(seed=2**40)),
     "recorded settings are no longer accepted: --seed"),
    ("checkpoint with truncated weights", lambda c: _tampered(c, _weights_truncated),
     "checkpoint weights unreadable"),
    ("checkpoint with missing weights",
     lambda c: _tampered(c, lambda s, o: (o / "checkpoint" / "weights.safetensors").unlink()),
     "checkpoint weights missing"),
    ("streamed checkpoint with a truncated layer file", _streamed_tampered,
     "is unreadable"),
    ("bench sparsity that is not a number",
     lambda c: _bench(c, "runs:\n  - {method: magnitude, sparsity: abc}\n"),
     "sparsity (--sparsity) must be a number"),
    ("bench shots that are a string",
     lambda c: _bench(c, "runs:\n  - {method: magnitude, shots: '5'}\n"),
     "shots (--shots) must be an integer"),
    ("bench model that is a list",
     lambda c: _bench(c, "model: [a, b]\nruns:\n  - {method: magnitude}\n"),
     "model (--model) must be a string"),
    ("report.json that is not JSON", lambda c: _report(c, "{not json"), "not readable JSON"),
    ("report.json that is incomplete", lambda c: _report(c, "{}"), "is incomplete"),
    ("eval JSON path that is a folder", lambda c: _eval(c, "--json", str(c.tmp)), "is a folder"),
    ("unknown zero-shot task", lambda c: _eval(c, "--tasks", "nosuchtask"), "unknown task"),
    ("hub task without the network", lambda c: _eval(c, "--tasks", "boolq", "--tasks-limit",
                                                     "2"), "could not be fetched"),
]


@pytest.fixture(scope="module")
def finished_output(tmp_path_factory, tiny_model_dirs, sample_text_file):
    """A finished output of ours, and an unfinished run holding a checkpoint (killed before
    shot 2)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("ours")

    class Ctx:
        model, text, tmp = tiny_model_dirs["llama"], sample_text_file, root

    assert main(_prune(Ctx, output=root / "finished")) == 0
    run = root / "checkpointed"
    from tests import kill_run

    env, cwd = kill_run.env(), Path(__file__).resolve().parent.parent
    kill = [sys.executable, "-m", "tests.kill_run", "2:start"]
    subprocess.run([*kill, *_prune(Ctx, output=run)], env=env, cwd=cwd, capture_output=True)
    assert (run / "checkpoint" / "state.json").is_file()
    streamed = root / "streamed"
    subprocess.run([*kill, *_prune(Ctx, output=streamed), "--max-memory", "1GB",
                    "--offload-dir", str(root / "offload")], env=env, cwd=cwd,
                   capture_output=True)
    assert (streamed / "checkpoint" / "layers").is_dir()
    return root / "finished", run, streamed


def _snapshot(root):
    return {(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("row", "build", "fragment"), MORE_ROWS, ids=[r[0] for r in MORE_ROWS])
def test_more_rejected_input(capsys, monkeypatch, tiny_model_dirs, sample_text_file,
                             finished_output, tmp_path, row, build, fragment):
    import torch

    if row == "device not on this machine" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    class Ctx:
        model, text, tmp = tiny_model_dirs["llama"], sample_text_file, tmp_path
        finished, checkpointed, streamed = finished_output

    argv = build(Ctx)
    before = _snapshot(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("llm-surgeon: error:"), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed
    assert not (tmp_path / "out").exists() and not (tmp_path / "bench").exists()


def test_readme_table_lists_every_new_row():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "bad-input.md").read_text()
    for row, _, _fragment in MORE_ROWS:
        assert f"| {row} |" in readme, row
