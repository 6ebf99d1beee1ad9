"""Never lose a user's data, never waste a run (issue 13): foreign files survive, a kill at any
rename leaves a reachable result, leftovers of dead runs are cleaned, temporaries are exclusive,
outputs are fsynced before they take their names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_surgeon.cli import main

try:
    from llm_surgeon import io as sio
except ImportError:  # the code before issue 13 (these tests are run against it once)
    sio = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent


def _argv(model: Path, text: Path, out: Path, *extra: str, sparsity: str = "0.5",
          shots: str = "3") -> list[str]:
    return ["-q", "prune", "--model", str(model), "--calib-data", str(text), "--eval-data",
            str(text), "--seqlen", "32", "--calib-samples", "2", "--eval-windows", "2",
            "--method", "magnitude", "--sparsity", sparsity, "--shots", shots,
            "--output", str(out), *extra]


def _one_line_error(code: int, err: str, fragment: str = "") -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("llm-surgeon: error:"), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]
    return lines[0]


def _dead_pid() -> int:
    """The number of a process that has certainly ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("LLM_SURGEON_CACHE", str(d))
    return d


# ---- 1. user files ----------------------------------------------------------------------


def test_folder_with_a_report_json_is_not_replaced(capsys, tiny_model_dirs, sample_text_file,
                                                   tmp_path):
    """The issue's case: d/report.json and d/src/main.c; the old code replaced d whole."""
    d = tmp_path / "d"
    (d / "src").mkdir(parents=True)
    (d / "report.json").write_text("{}")
    (d / "src" / "main.c").write_text("x")
    code = main(_argv(tiny_model_dirs["llama"], sample_text_file, d))
    _one_line_error(code, capsys.readouterr().err, "not an llm-surgeon output")
    assert (d / "src" / "main.c").read_text() == "x"
    assert (d / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporaries beside it


def test_our_output_with_a_foreign_file_is_refused_and_the_file_kept(
        capsys, tiny_model_dirs, sample_text_file, tmp_path, cache):
    out = tmp_path / "out"
    argv = _argv(tiny_model_dirs["llama"], sample_text_file, out, shots="1")
    assert main(argv) == 0
    assert sio.is_ours(out)
    assert main(["-q", "report", str(out)]) == 0  # summary.md and plots/ join the marker
    assert sio.is_ours(out)
    assert main(argv) == 0  # our own output (with the report's files) is replaced
    assert not (out / "summary.md").exists()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    code = main(argv)
    _one_line_error(code, capsys.readouterr().err, "did not write (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine"


def test_marker_lists_exactly_what_was_written(tiny_model_dirs, sample_text_file, tmp_path,
                                               cache):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dirs["llama"], sample_text_file, out, shots="1")) == 0
    marker = json.loads((out / sio.MARKER).read_text())
    assert marker["tool"] == "llm-surgeon"
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != sio.MARKER)
    assert "report.json" in marker["files"] and "model.safetensors" in marker["files"]


# ---- 2. a kill at every rename --------------------------------------------------------------


def _forked(argv: list[str], env: dict[str, str]) -> int:
    """Run the CLI in a forked child (modules already imported: fast) with ``env``; returns its
    exit code, -9 when it was killed."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 97
        try:
            os.environ.update(env)
            if sio is not None:
                sio._renames = 0
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = main(argv)
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _report_target(out: Path) -> float:
    return json.loads((out / "report.json").read_text())["sparsity_target"]


def _assert_complete(out: Path, targets: tuple[float, ...]) -> float:
    import llm_surgeon

    assert sio.is_ours(out), sio.foreign_files(out)
    target = _report_target(out)
    assert target in targets
    llm_surgeon.load(str(out))  # the weights load
    return target


@pytest.mark.parametrize(("start", "scheme", "streamed"), [
    ("existing-output", "exchange", False), ("existing-output", "two-renames", False),
    ("new-output", "exchange", False), ("new-output", "two-renames", False),
    ("existing-output", "two-renames", True), ("new-output", "exchange", True)])
def test_kill_at_every_rename_leaves_a_reachable_result(tiny_model_dirs, sample_text_file,
                                                        tmp_path, cache, monkeypatch, scheme,
                                                        start, streamed):
    """SIGKILL just before rename k (checkpoint replaces and the final save), for every k: after
    the next start the folder holds the old or the new complete output, ``--resume`` works, and
    no leftover remains (with ``--max-memory``: no stale offload folder either)."""
    if scheme == "two-renames":
        monkeypatch.setenv("LLM_SURGEON_NO_EXCHANGE", "1")
    offload = tmp_path / "offload"
    extra = ["--max-memory", "1GB", "--offload-dir", str(offload)] if streamed else []
    model, text = tiny_model_dirs["llama"], sample_text_file
    old = tmp_path / "old"
    assert main(_argv(model, text, old, sparsity="0.3", shots="1")) == 0  # also warms caches
    windows_hit = 0
    for k in range(1, 30):
        case = tmp_path / f"k{k}"
        out = case / "out"
        case.mkdir()
        if start == "existing-output":
            shutil.copytree(old, out)
        argv = _argv(model, text, out, *extra)
        code = _forked(argv, {"LLM_SURGEON_KILL_AT_RENAME": str(k)})
        if code == 0:
            break  # no k-th rename: every window was tried
        assert code == -signal.SIGKILL, code
        windows_hit += 1
        # the next start
        from llm_surgeon.checkpoint import has_checkpoint

        if has_checkpoint(out):
            assert main(["-q", "prune", "--resume", str(out)]) == 0, k
        else:
            if (out / "report.json").exists():  # a complete output, old or new
                _assert_complete(out, (0.3, 0.5))
            assert main(argv) == 0, k  # not stuck: a re-run replaces it
        assert _assert_complete(out, (0.5,)) == 0.5
        assert sorted(p.name for p in case.iterdir()) == ["out"], k
        assert not list(out.glob(".checkpoint*")) and not (out / "checkpoint").exists(), k
        if streamed:
            assert list(offload.iterdir()) == [], k  # the killed run's copy of the layers
    else:
        pytest.fail("the run never finished")
    assert windows_hit >= 5  # marker, checkpoints (new and replaced), final marker and replace


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("when", [2, 4, 6])
def test_strace_sigkill_at_a_rename_syscall(tiny_model_dirs, sample_text_file, tmp_path, cache,
                                            when):
    """The issue's reproduction: ``strace -f -e inject=rename:signal=SIGKILL:when=N`` on the
    real process (every rename system call, whoever makes it), then the next start."""
    model, text = tiny_model_dirs["llama"], sample_text_file
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "llm_surgeon"]
    assert main(_argv(model, text, out, sparsity="0.3", shots="1")) == 0
    calls = "rename,renameat,renameat2"
    killed = subprocess.run(
        ["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={calls}", "-e",
         f"inject={calls}:signal=SIGKILL:when={when}", *cli, *_argv(model, text, out)],
        env=env, capture_output=True)
    assert killed.returncode != 0 or _report_target(out) == 0.5
    state = subprocess.run([*cli, "-q", "prune", "--resume", str(out)], env=env,
                           capture_output=True, text=True)
    if state.returncode != 0:  # no checkpoint: the old or new output is there, re-run it
        assert "no checkpoint" in state.stderr, state.stderr
        _assert_complete(out, (0.3, 0.5))
        rerun = subprocess.run([*cli, *_argv(model, text, out)], env=env, capture_output=True,
                               text=True)
        assert rerun.returncode == 0, rerun.stderr
    assert _assert_complete(out, (0.5,)) == 0.5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["out"]


def test_recover_finishes_an_interrupted_two_rename_replace(tmp_path):
    """The state the issue found: NAME gone, the old copy in .NAME.old-PID, the complete new one
    in .NAME.tmp-PID-*: the new one takes the name; without a complete new one, the old
    returns."""
    pid = _dead_pid()
    for complete in (True, False):
        root = tmp_path / str(complete)
        old = root / f".out.old-{pid}"
        new = root / f".out.tmp-{pid}-abc"
        for d, label in ((old, "old"), (new, "new")):
            d.mkdir(parents=True)
            (d / "report.json").write_text(label)
        if complete:
            sio.write_marker(new)
        else:  # killed while writing: the marker a temporary gets when it is created
            sio._write_first_marker(new, "output")
        sio.write_marker(old)
        sio.recover(root / "out")
        assert (root / "out" / "report.json").read_text() == ("new" if complete else "old")
        assert sorted(p.name for p in root.iterdir()) == ["out"]


def test_recover_leaves_live_writers_and_foreign_names_alone(tmp_path):
    (tmp_path / "out").mkdir()
    live = tmp_path / f".out.tmp-{_dead_pid()}-x"  # its PID is gone, but its lock is held
    other = tmp_path / ".out.tmp-notapid"
    unrelated = tmp_path / f".other.tmp-{_dead_pid()}-x"
    for d in (live, other, unrelated):
        d.mkdir()
    for d in (live, unrelated):
        sio._write_first_marker(d, "output")
    fd = sio._held_dir(live)  # a live writer (in another PID namespace, say) holds it
    try:
        sio.recover(tmp_path / "out")
    finally:
        os.close(fd)
    assert live.exists() and other.exists() and unrelated.exists()


# ---- 3. unusable output paths, before any work ---------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading any model fails the test: the check must come first."""
    import llm_surgeon.models.load as load
    import llm_surgeon.models.offload as offload

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the path was checked")

    monkeypatch.setattr(load, "load_model", forbidden)
    monkeypatch.setattr(offload, "load_offloaded", forbidden)
    import llm_surgeon.driver as run
    import llm_surgeon.evaluate.runner as runner

    monkeypatch.setattr(run, "load_model", forbidden)
    monkeypatch.setattr(runner, "load_model", forbidden)


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write in, even as root: /proc (or a chmod-ed one)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    return Path("/proc/self")


@pytest.mark.parametrize("case", ["dot", "unwritable", "file", "offload-file", "parent-file",
                                  "offload-in-output", "output-in-offload"])
def test_unusable_output_fails_fast_before_any_model(capsys, tiny_model_dirs, sample_text_file,
                                                     tmp_path, monkeypatch, no_model_loading,
                                                     case):
    monkeypatch.chdir(tmp_path)
    extra: list[str] = []
    out: Path | str = tmp_path / "out"
    if case == "dot":
        out = "."
    elif case == "unwritable":
        out = _unwritable(tmp_path) / "out"
    elif case == "file":
        out = tmp_path / "afile"
        out.write_text("keep")
    elif case == "offload-file":
        (tmp_path / "off").write_text("keep")
        extra = ["--max-memory", "1GB", "--offload-dir", str(tmp_path / "off")]
    elif case == "offload-in-output":
        extra = ["--max-memory", "1GB", "--offload-dir", str(tmp_path / "out" / "off")]
    elif case == "output-in-offload":
        extra = ["--max-memory", "1GB", "--offload-dir", str(tmp_path)]
    elif case == "parent-file":
        (tmp_path / "afile").write_text("keep")
        out = tmp_path / "afile" / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    start = time.perf_counter()
    code = main(_argv(tiny_model_dirs["llama"], sample_text_file, Path(out), *extra))
    elapsed = time.perf_counter() - start
    _one_line_error(code, capsys.readouterr().err)
    assert elapsed < 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", ["json-folder", "json-unwritable", "json-parent-file",
                                  "unknown-task"])
def test_unusable_eval_arguments_fail_before_the_model(capsys, tiny_model_dirs, tmp_path,
                                                       no_model_loading, cache, case):
    extra = {"json-folder": ["--json", str(tmp_path)],
             "json-unwritable": ["--json", str(_unwritable(tmp_path) / "x.json")],
             "json-parent-file": ["--json", str(tmp_path / "f" / "x.json")],
             "unknown-task": ["--tasks", "nosuchtask"]}[case]
    (tmp_path / "f").write_text("keep")
    code = main(["-q", "eval", "--model", str(tiny_model_dirs["llama"]), *extra])
    _one_line_error(code, capsys.readouterr().err,
                    "unknown task" if case == "unknown-task" else "--json")


# ---- 5. leftovers ---------------------------------------------------------------------------


def test_stale_temporaries_of_dead_runs_are_removed_on_the_next_start(
        tiny_model_dirs, sample_text_file, tmp_path, cache):
    pid = _dead_pid()
    out = tmp_path / "out"
    stale_out = tmp_path / f".out.tmp-{pid}-x1"
    stale_out.mkdir()
    sio._write_first_marker(stale_out, "output")  # as every temporary folder of ours gets
    (stale_out / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out.tmp-{pid}-x2"  # a writer that is still alive (holds its lock)
    live.mkdir()
    sio._write_first_marker(live, "output")
    fd = sio._held_dir(live)
    try:
        assert main(_argv(tiny_model_dirs["llama"], sample_text_file, out, shots="1")) == 0
    finally:
        os.close(fd)
    assert not stale_out.exists() and live.exists()
    # inside the output: a stale checkpoint temporary next to a real checkpoint
    ck = out / f".checkpoint.tmp-{pid}-x3"
    ck.mkdir()
    sio._write_first_marker(ck, "checkpoint")
    assert sio.is_ours(out)  # stale leftovers of ours do not make it foreign
    assert main(_argv(tiny_model_dirs["llama"], sample_text_file, out, shots="1")) == 0
    assert not ck.exists()


def _work_folder_of_a_killed_run(off: Path) -> Path:
    """What a killed ``--max-memory`` run leaves: its marked work folder, lock released."""
    w = sio.work_folder(off)
    (w / "layers").mkdir()
    os.close(sio._work_locks.pop(w))  # (the kill closes its descriptors)
    return w


def test_stale_offload_folders_of_dead_runs_are_removed(tiny_model_dirs, sample_text_file,
                                                        tmp_path, cache):
    """Only our marked work folders, from this host, whose lock nobody holds; never a user's
    folder, whatever its name (the review's ``run-2024-baseline``)."""
    off = tmp_path / "off"
    dead = _work_folder_of_a_killed_run(off)
    alive = sio.work_folder(off)  # a live run holds its lock
    other_host = _work_folder_of_a_killed_run(off)
    marker = json.loads((other_host / sio.MARKER).read_text())
    (other_host / sio.MARKER).write_text(json.dumps({**marker, "host": "elsewhere"}))
    users = [off / "run-2024-baseline", off / f"run-{_dead_pid()}-abc", off / "mine",
             off / sio.WORK / f"run-{_dead_pid()}-xyz"]  # no marker: not ours, even in there
    for d in users:
        d.mkdir(parents=True)
        (d / "results.csv").write_text("precious")
    argv = _argv(tiny_model_dirs["llama"], sample_text_file, tmp_path / "out", "--max-memory",
                 "1GB", "--offload-dir", str(off), shots="1")
    try:
        assert main(argv) == 0
        assert not dead.exists() and alive.exists() and other_host.exists()
    finally:
        sio.remove_work_folder(alive)
    for d in users:
        assert (d / "results.csv").read_text() == "precious", d


@pytest.mark.parametrize("scheme", ["exchange", "two-renames"])
def test_sigterm_is_handled_like_ctrl_c(tiny_model_dirs, sample_text_file, tmp_path, cache,
                                        monkeypatch, scheme):
    """SIGTERM just before rename k, for every k, on a new and on an existing output: exit 130,
    no temporary left beside or inside the output, and after the next start (``--resume``, or a
    re-run) the new result. A signal that arrives while a replace runs waits until it is done:
    the finished new result is never thrown away (the review's case: two renames, the signal
    between them, on an existing output; the code before kept the old one or none)."""
    if scheme == "two-renames":
        monkeypatch.setenv("LLM_SURGEON_NO_EXCHANGE", "1")
    from llm_surgeon.checkpoint import has_checkpoint

    model, text = tiny_model_dirs["llama"], sample_text_file
    old = tmp_path / "old"
    assert main(_argv(model, text, old, sparsity="0.3", shots="1")) == 0
    out = tmp_path / "out"
    argv = _argv(model, text, out, shots="2")
    for start in ("new-output", "existing-output"):
        last = None
        for k in range(1, 30):
            if start == "existing-output":
                shutil.copytree(old, out)
            code = _forked(argv, {"LLM_SURGEON_KILL_AT_RENAME": str(k),
                                  "LLM_SURGEON_KILL_SIGNAL": "TERM"})
            if code == 0:
                break
            assert code == 130, (start, k, code)
            assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == [
                "cache", "old"], (start, k)
            assert not list(out.glob(".checkpoint.*")), (start, k)
            last = _report_target(out) if (out / "report.json").exists() else None
            if last is not None:
                _assert_complete(out, (0.3, 0.5))
            if has_checkpoint(out):  # the next start
                assert main(["-q", "prune", "--resume", str(out)]) == 0, (start, k)
            elif last != 0.5:
                assert main(argv) == 0, (start, k)
            assert _assert_complete(out, (0.5,)) == 0.5
            shutil.rmtree(out)
        else:
            pytest.fail("the run never finished")
        shutil.rmtree(out)
        assert last == 0.5, start  # the signal at the final replace: the new result is there


# ---- 6. exclusive temporaries ----------------------------------------------------------------


def test_report_does_not_follow_a_planted_symlink(tiny_model_dirs, sample_text_file, tmp_path,
                                                  cache):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dirs["llama"], sample_text_file, out, shots="1")) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".summary.md.tmp").symlink_to(victim)  # the old fixed temporary name
    assert main(["-q", "report", str(out)]) == 0
    assert victim.read_text() == "precious"
    assert (out / "summary.md").read_text().startswith("# magnitude")


def test_write_json_does_not_follow_a_planted_symlink(tmp_path):
    from llm_surgeon.cli import write_json

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / f".r.json.tmp{os.getpid()}").symlink_to(victim)  # the old predictable name
    write_json(tmp_path / "r.json", {"a": 1})
    assert victim.read_text() == "precious"
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_temporaries_are_created_exclusively(tmp_path, monkeypatch):
    """Every writer of io.py takes its temporary from mkstemp/mkdtemp (O_EXCL)."""
    import tempfile

    made: list[str] = []
    real_stemp, real_dtemp = tempfile.mkstemp, tempfile.mkdtemp

    def stemp(*a, **k):
        fd, p = real_stemp(*a, **k)
        made.append(p)
        return fd, p

    def dtemp(*a, **k):
        p = real_dtemp(*a, **k)
        made.append(p)
        return p

    monkeypatch.setattr(tempfile, "mkstemp", stemp)
    monkeypatch.setattr(tempfile, "mkdtemp", dtemp)
    sio.atomic_write(tmp_path / "a.txt", "x")
    with sio.atomic_file(tmp_path / "b.png") as t:
        t.write_bytes(b"png")
    with sio.atomic_folder(tmp_path / "c") as t:
        (t / "f").write_text("y")
    assert len(made) >= 3
    assert all(Path(p).name.startswith(".") and f".tmp-{os.getpid()}-" in p for p in made)


# ---- 7. validation gaps ---------------------------------------------------------------------


def test_heads_channels_target_out_of_reach_warns(capsys, tiny_model_dirs, sample_text_file,
                                                  tmp_path, cache):
    out = tmp_path / "out"
    argv = _argv(tiny_model_dirs["llama"], sample_text_file, out, "--structure",
                 "heads-channels", sparsity="0.9999", shots="1")
    argv[argv.index("magnitude")] = "numerical"
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    err = capsys.readouterr().err
    assert report["sparsity_achieved"] < 0.98
    assert "warning" in err and f"reached {report['sparsity_achieved']:.4f}" in err


def test_checkpoint_state_is_bounded(tiny_model_dirs, sample_text_file, tmp_path, cache):
    """The state grows by one small entry per shot, and shots are bounded: the state stays
    under 1 MB at the largest shot count accepted."""
    from llm_surgeon.config import MAX_SHOTS
    from tests import kill_run

    sizes = []
    for stop in (2, 3):
        out = tmp_path / f"out{stop}"
        argv = _argv(tiny_model_dirs["llama"], sample_text_file, out, shots="5")
        code = subprocess.run([sys.executable, "-m", "tests.kill_run", f"{stop}:start", *argv],
                              env=kill_run.env(), cwd=ROOT, capture_output=True).returncode
        assert code == -signal.SIGKILL
        sizes.append((out / "checkpoint" / "state.json").stat().st_size)
    per_shot = sizes[1] - sizes[0]
    assert 0 < per_shot < 2000
    assert sizes[0] + MAX_SHOTS * per_shot < 2**20 * 2


# ---- 8. durability --------------------------------------------------------------------------


def test_output_files_and_folders_are_fsynced_before_the_final_rename(
        tiny_model_dirs, sample_text_file, tmp_path, cache, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_exchange = os.fsync, sio.rename, sio.exchange

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(Path(b).resolve())))
        return real_rename(a, b)

    def exchange(a, b):
        ok = real_exchange(a, b)
        if ok:
            events.append(("rename", str(Path(b).resolve())))
        return ok

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(sio, "rename", rename)
    monkeypatch.setattr(sio, "exchange", exchange)
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dirs["llama"], sample_text_file, out, shots="2")) == 0
    final = max(i for i, e in enumerate(events) if e == ("rename", str(out.resolve())))
    # full paths relative to the folder that took the name (the final temporary), so that
    # e.g. checkpoint/state.json is not counted for a state.json elsewhere
    final_tmp = [p for kind, p in events[:final]
                 if kind == "fsync" and Path(p).name.startswith(".out.tmp-")][-1]
    synced_before = {Path(p).relative_to(final_tmp).as_posix() for kind, p in events[:final]
                     if kind == "fsync" and Path(p).is_relative_to(final_tmp)}
    written = [f.relative_to(out).as_posix() for f in out.rglob("*")]
    assert written and "model.safetensors" in written
    for rel in written:
        assert rel in synced_before, rel
    # the parent folder after the rename
    assert ("fsync", str(tmp_path.resolve())) in events[final:]
    # the checkpoint too: its state was fsynced before it took its name
    ck = [i for i, e in enumerate(events) if e == ("rename", str((out / "checkpoint").resolve()))]
    assert ck and any(kind == "fsync" and p.endswith("state.json") for kind, p in events[:ck[0]])
