"""Only what carries our marker is ever ours (the review of issue 13): user folders and files
whose names look like our leftovers or work folders survive every start; liveness is a held
lock, not a PID; bench, report and ``--offload-dir`` never write over a user's files; values
that are valid pass the early checks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from llm_surgeon.cli import build_parser, check_prune_args, config_from_args, main

try:
    from llm_surgeon import io as sio
except ImportError:  # (these tests are run once against the code before the fix)
    sio = None  # type: ignore[assignment]

from tests.test_safety import _argv, _forked, _one_line_error


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LLM_SURGEON_CACHE", str(d))
    return d


def test_offload_dir_keeps_user_folders_named_like_run_folders(tiny_model_dirs,
                                                               sample_text_file, tmp_path,
                                                               cache):
    """The review's case: ``--offload-dir exps`` where exps/run-2024-baseline/ is the user's."""
    exps = tmp_path / "exps"
    for name in ("run-2024-baseline", "run-1-x", f"run-{os.getpid()}-y"):
        (exps / name).mkdir(parents=True)
        (exps / name / "results.csv").write_text("precious")
    argv = _argv(tiny_model_dirs["llama"], sample_text_file, tmp_path / "o1", "--max-memory",
                 "64MB", "--offload-dir", str(exps), shots="1")
    assert main(argv) == 0
    for name in ("run-2024-baseline", "run-1-x", f"run-{os.getpid()}-y"):
        assert (exps / name / "results.csv").read_text() == "precious", name
    assert sorted(p.name for p in exps.iterdir()) == sorted(
        ["run-2024-baseline", "run-1-x", f"run-{os.getpid()}-y"])  # our work folder went


def test_a_killed_streamed_run_leaves_a_work_folder_the_next_run_removes(
        tiny_model_dirs, sample_text_file, tmp_path, cache):
    """The stale-folder cleanup still works, through the marker and the lock: a SIGKILLed
    ``--max-memory`` run's layers are removed by the next run, nothing else."""
    off = tmp_path / "off"
    out = tmp_path / "out"
    argv = _argv(tiny_model_dirs["llama"], sample_text_file, out, "--max-memory", "1GB",
                 "--offload-dir", str(off), shots="2")
    assert _forked(argv, {"LLM_SURGEON_KILL_AT_RENAME": "3"}) == -9
    left = list((off / sio.WORK).iterdir())
    assert len(left) == 1 and (left[0] / "layers").is_dir()
    assert main(argv) == 0 or main(["-q", "prune", "--resume", str(out)]) == 0
    assert not (off / sio.WORK).exists()


def test_sibling_named_like_our_old_copy_survives_a_rerun(tiny_model_dirs, sample_text_file,
                                                          tmp_path, cache):
    """The review's ``.o3.old-2024/notes.txt`` beside an existing ``--output o3``, and a
    ``.o3.tmp-1-x/`` file: recover() removed them as leftovers of a dead run."""
    out = tmp_path / "o3"
    argv = _argv(tiny_model_dirs["llama"], sample_text_file, out, shots="1")
    assert main(argv) == 0
    users = [tmp_path / ".o3.old-2024", tmp_path / ".o3.tmp-1-x"]
    for d in users:
        d.mkdir()
        (d / "notes.txt").write_text("mine")
    assert main(argv) == 0
    for d in users:
        assert (d / "notes.txt").read_text() == "mine"


def test_leftovers_with_our_marker_from_a_live_process_or_another_host_stay(tmp_path):
    """Liveness is the lock, not ``kill(pid, 0)`` (PID namespaces, other hosts): an unlocked
    leftover of ours is removed even when its PID number is alive here; one on another host's
    marker is never touched; a locked one stays."""
    (tmp_path / "out").mkdir()
    alive_pid_unlocked = tmp_path / f".out.tmp-{os.getppid()}-a"
    other_host = tmp_path / ".out.tmp-1-b"
    locked = tmp_path / ".out.tmp-1-c"
    for d in (alive_pid_unlocked, other_host, locked):
        d.mkdir()
        sio._write_first_marker(d, "output")
    marker = json.loads((other_host / sio.MARKER).read_text())
    (other_host / sio.MARKER).write_text(json.dumps({**marker, "host": "node-17"}))
    fd = sio._held_dir(locked)
    try:
        sio.recover(tmp_path / "out")
    finally:
        os.close(fd)
    assert not alive_pid_unlocked.exists()
    assert other_host.exists() and locked.exists()


def test_leftover_of_another_kind_is_not_ours(tmp_path):
    """A ``.checkpoint.tmp-*`` inside an output must carry a *checkpoint* marker."""
    out = tmp_path / "out"
    out.mkdir()
    sio.write_marker(out)
    wrong = out / ".checkpoint.tmp-1-a"
    wrong.mkdir()
    sio._write_first_marker(wrong, "output")
    right = out / ".checkpoint.tmp-1-b"
    right.mkdir()
    sio._write_first_marker(right, "checkpoint")
    assert sio.foreign_files(out) == [".checkpoint.tmp-1-a/"]


def test_bench_resumes_in_its_own_folder_and_refuses_others(capsys, tiny_model_dirs,
                                                            sample_text_file, tmp_path, cache,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, text = tiny_model_dirs["llama"], sample_text_file
    flags = ["-q", "bench", "--model", str(model), "--calib-data", str(text), "--eval-data",
             str(text), "--seqlen", "32", "--calib-samples", "2", "--eval-windows", "2",
             "--methods", "magnitude", "--sparsities", "0.5", "--shots", "1", "--output"]
    assert main([*flags, "b"]) == 0
    assert sio.read_marker(tmp_path / "b", "bench") is not None
    run = next((tmp_path / "b" / "runs").glob("magnitude*.json"))
    stamp = run.stat().st_mtime_ns
    assert main([*flags, "b"]) == 0  # resumed: the finished run is not run again
    assert run.stat().st_mtime_ns == stamp
    assert main(["-q", "report", "b"]) == 0 and (tmp_path / "b" / "summary.md").is_file()
    assert main(["-q", "report", "b"]) == 0  # our own summary is rewritten
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "results.csv").write_text("my,own,data\n")
    monkeypatch.chdir(proj)
    capsys.readouterr()
    _one_line_error(main([*flags, "."]), capsys.readouterr().err, "current folder")
    assert (proj / "results.csv").read_text() == "my,own,data\n"
    assert sorted(p.name for p in proj.iterdir()) == ["results.csv"]


def test_bench_yaml_reads_exponent_floats():
    """PyYAML reads ``1e-3`` as a string; a string that is a finite number is that number,
    anything else is still refused."""
    import tempfile

    from llm_surgeon.bench import expand_runs, load_config
    from llm_surgeon.errors import UserError

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "b.yaml"
        cfg.write_text("damp_g: 1e-3\nruns:\n  - {method: surgeon, damp_a: 2E-2, "
                       "sparsity: 5e-1}\n")
        runs = expand_runs(load_config(cfg))
        assert runs[0]["damp_g"] == 0.001 and runs[0]["damp_a"] == 0.02
        assert runs[0]["sparsity"] == 0.5
        for bad in ("abc", "nan", "1e999"):
            cfg.write_text(f"runs:\n  - {{method: surgeon, damp_g: '{bad}'}}\n")
            with pytest.raises(UserError, match="damp_g"):
                expand_runs(load_config(cfg))


def test_shrink_renaming_falls_back_when_transformers_internals_change(monkeypatch, caplog):
    import torch
    import transformers.conversion_mapping as cm

    from llm_surgeon.models.shrink import _checkpoint_names_to_model

    def changed(*a, **k):
        raise TypeError("get_model_conversion_mapping() got an unexpected keyword")

    monkeypatch.setattr(cm, "get_model_conversion_mapping", changed)
    state = {"embed_out.weight": torch.zeros(2)}
    with caplog.at_level(logging.INFO, logger="llm_surgeon.models.shrink"):
        assert _checkpoint_names_to_model(object(), state) is state
    assert "renaming is unavailable" in caplog.text


@pytest.mark.parametrize("extra", [
    ["--seed", "0"], ["--seed", str(2**32 - 1)], ["--sparsity", "0.5"], ["--damp-g", "0"],
    ["--damp-a", "0"], ["--percdamp", "0"], ["--device", "cpu:0"],
    ["--max-memory", "1.5G"], ["--max-memory", "64MB", "--offload-dir", "off"],
    ["--sparsity", "0"], ["--maiht-step", "1"], ["--shots", "1000"], ["--structure", "2:4"],
    ["--lowrank-lr", "1e-4", "--lowrank-rank", "4"]])
def test_valid_values_pass_the_early_checks(tmp_path, monkeypatch, tiny_model_dirs, extra):
    """The other side of the bad-value tests: the bounds are not too tight."""
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["prune", "--model", str(tiny_model_dirs["llama"]),
                                      "--output", "out", *extra])
    cfg = config_from_args(args)  # the PruneConfig cmd_prune builds
    check_prune_args(args, cfg)  # raises UserError (exit 2) on refusal
    assert not (tmp_path / "out").exists()


def test_a_failed_second_rename_keeps_the_complete_new_result(tmp_path, monkeypatch):
    """Two-rename replace, the second rename fails: the old code's clean-up deleted the
    complete new folder while the name was empty; it now takes the name."""
    monkeypatch.setenv("LLM_SURGEON_NO_EXCHANGE", "1")
    target = tmp_path / "out"
    with sio.atomic_folder(target) as t:
        (t / "f").write_text("old")
    real, into_target = sio.rename, []

    def flaky(a, b):
        if Path(b) == target:
            into_target.append(a)
            if len(into_target) == 1:
                raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(sio, "rename", flaky)
    with pytest.raises(OSError), sio.atomic_folder(target) as t:
        (t / "f").write_text("new")
    assert (target / "f").read_text() == "new"
    sio.recover(target)  # the old copy, moved aside, is a leftover of ours: removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_reports_temporary_is_ours_only_in_our_output(tiny_model_dirs,
                                                               sample_text_file, tmp_path,
                                                               cache):
    """``report`` lists summary.md in the marker before writing it, so the temporary a kill
    leaves is a leftover of ours; the same name in a folder without our marker is foreign."""
    out = tmp_path / "out"
    argv = _argv(tiny_model_dirs["llama"], sample_text_file, out, shots="1")
    assert main(argv) == 0
    assert main(["-q", "report", str(out)]) == 0
    (out / ".summary.md.tmp-1-abc").write_text("half")  # a killed report's temporary
    (out / ".notes.md.tmp-1-abc").write_text("mine")  # not a name we wrote
    assert sio.foreign_files(out) == [".notes.md.tmp-1-abc"]
    (out / ".notes.md.tmp-1-abc").unlink()
    assert main(argv) == 0
