"""Property test: every numeric flag of every command, fed a generated set of bad values (NaN,
±inf, negative, zero, huge, non-numeric), ends with exit status 2, exactly one line on stderr,
no traceback, nothing written, and no model loaded (so the whole test takes seconds)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from llm_surgeon.cli import build_parser, main

HUGE_INT = "1" + "0" * 30
BAD_VALUES = ("nan", "NaN", "inf", "-inf", "-1", "0", "1e30", HUGE_INT, "1e23", "abc", "")

# Values that are valid for a flag, with the reason; everything else must be refused.
VALID = {
    ("--seed", "0"): "seed 0 is the default",
    ("--sparsity", "0"): "sparsity 0 is a dense run (allowed, e.g. to convert a model)",
    ("--nearest-kronecker", "0"): "0 iterations is plain K-FAC, the default",
    ("--damp-g", "0"): "no damping of G is allowed",
    ("--damp-a", "0"): "no damping of A is allowed",
    ("--percdamp", "0"): "no SparseGPT damping is allowed",
    ("--maiht-mu", "0"): "mAIHT without l2 penalty is allowed",
    ("--maiht-iht-iters", "0"): "no IHT steps (refinement only) is allowed",
    ("--maiht-refine-iters", "0"): "no refinement steps is allowed",
    ("--lowrank-rank", "0"): "rank 0 turns the correction off, the default",
    ("--lowrank-steps", "0"): "0 steps turns the correction off, the default",
    ("--sparsities", "0"): "sparsity 0 is a dense run",
}
# Flags that take a number although argparse sees a string.
NUMERIC_STRINGS = {"--max-memory", "--sparsities"}
NUMERIC_TYPES = {"_number", "_integer", "_positive_int", "_fraction", "int", "float"}


def numeric_flags() -> list[tuple[str, str]]:
    """(command, flag) of every numeric option, read from the parser itself, so that a flag
    added later is covered without editing this test."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for command, p in sub.choices.items():
        for action in p._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None)
            if flag is None:
                continue
            type_name = getattr(action.type, "__name__", "")
            if type_name in NUMERIC_TYPES or flag in NUMERIC_STRINGS:
                out.append((command, flag))
    return out


FLAGS = numeric_flags()
CASES = [(c, f, v) for c, f in FLAGS for v in BAD_VALUES if (f, v) not in VALID]


def test_the_flags_found_are_the_numeric_ones():
    found = {f for _, f in FLAGS}
    for flag in ("--sparsity", "--shots", "--seed", "--percdamp", "--lowrank-lr",
                 "--lowrank-rank", "--maiht-mu", "--maiht-step", "--damp-g", "--max-memory",
                 "--seqlen", "--eval-windows", "--tasks-limit", "--threads", "--sparsities"):
        assert flag in found, flag
    assert len(CASES) > 300


@pytest.fixture
def no_model_loading(monkeypatch):
    import llm_surgeon.driver as run
    import llm_surgeon.evaluate.runner as runner
    import llm_surgeon.models.load as load
    import llm_surgeon.models.offload as offload

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the values were checked")

    for mod in (load, run, runner):
        monkeypatch.setattr(mod, "load_model", forbidden)
    monkeypatch.setattr(offload, "load_offloaded", forbidden)


def _base(command: str, tmp_path: Path, model: Path, text: Path) -> list[str]:
    if command == "prune":
        return ["prune", "--model", str(model), "--calib-data", str(text), "--eval-data",
                str(text), "--seqlen", "32", "--calib-samples", "2", "--output",
                str(tmp_path / "out")]
    if command == "eval":
        return ["eval", "--model", str(model), "--data", str(text), "--json",
                str(tmp_path / "out.json")]
    if command == "bench":
        return ["bench", "--methods", "magnitude", "--model", str(model), "--calib-data",
                str(text), "--eval-data", str(text), "--output", str(tmp_path / "bench")]
    raise AssertionError(command)


def _refused(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    """Run the command line; its exit code (argparse's own refusals included: the same
    format), the non-blank lines it wrote to stderr, and the whole stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, [x for x in err.splitlines() if x.strip()], err


@pytest.mark.parametrize(("command", "flag", "value"), CASES,
                         ids=[f"{c}{f}={v}" for c, f, v in CASES])
def test_bad_number_is_one_line_exit_2_nothing_written(capsys, tmp_path, tiny_model_dirs,
                                                       sample_text_file, no_model_loading,
                                                       command, flag, value):
    argv = ["-q", *_base(command, tmp_path, tiny_model_dirs["llama"], sample_text_file),
            f"{flag}={value}"]
    code, lines, err = _refused(capsys, argv)
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("llm-surgeon: error:"), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even runs/ of a bench


# heads-channels levers: a value argparse does not know, or a lever away from its default with
# another structure: one line, exit 2, nothing loaded or written
LEVER_CASES = [
    (["--structure", "heads-channels", "--unit-coupling", "both"], "--unit-coupling"),
    (["--structure", "heads-channels", "--unit-ranking", "z"], "--unit-ranking"),
    (["--structure", "heads-channels", "--kind-allocation", "even"], "--kind-allocation"),
    (["--unit-coupling", "layers"], "--unit-coupling applies to --structure heads-channels"),
    (["--structure", "rows-columns", "--unit-ranking", "cost", "--kind-allocation",
      "proportional"], "--unit-ranking, --kind-allocation apply to --structure heads-channels"),
]


@pytest.mark.parametrize(("extra", "says"), LEVER_CASES, ids=[s for _, s in LEVER_CASES])
def test_bad_unit_lever_is_one_line_exit_2(capsys, tmp_path, tiny_model_dirs, sample_text_file,
                                           no_model_loading, extra, says):
    argv = ["-q", *_base("prune", tmp_path, tiny_model_dirs["llama"], sample_text_file), *extra]
    code, lines, err = _refused(capsys, argv)
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("llm-surgeon: error:") and says in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [["--nm-cost", "bogus"], ["--nm-cost", ""],
                                   ["--structure", "8:16", "--nm-cost", "joint"]])
def test_bad_nm_cost_is_one_line_exit_2_nothing_written(capsys, tmp_path, tiny_model_dirs,
                                                       sample_text_file, no_model_loading,
                                                       extra):
    """An unknown --nm-cost, and 'joint' where it would enumerate C(16, 8) = 12870 sets per
    group: exit 2, one line, nothing written, no model loaded; the same refusals for a bench
    YAML or a checkpoint's record (PruneConfig.validate) and for prune_model's settings."""
    from llm_surgeon.config import PruneConfig
    from llm_surgeon.errors import UserError
    from llm_surgeon.settings import SurgeonSettings

    argv = ["-q", *_base("prune", tmp_path, tiny_model_dirs["llama"], sample_text_file),
            *extra]
    code, lines, err = _refused(capsys, argv)
    assert code == 2 and len(lines) == 1 and "--nm-cost" in lines[0], err
    assert lines[0].startswith("llm-surgeon: error:") and list(tmp_path.iterdir()) == []
    for value in ("bogus", 3, None):
        with pytest.raises(UserError, match=r"nm.cost"):
            PruneConfig(structure="2:4", nm_cost=value).validate()
        with pytest.raises(UserError, match="--nm-cost must be one of independent, joint"):
            SurgeonSettings(nm_cost=value).check()
    with pytest.raises(UserError, match="--nm-cost joint compares all 12870"):
        PruneConfig(structure="8:16", nm_cost="joint").validate()
    PruneConfig(structure="8:16", nm_cost="joint", method="sparsegpt").validate()  # ignored
    PruneConfig(structure="unstructured", nm_cost="joint").validate()  # ignored: no groups
    PruneConfig(structure="4:8", nm_cost="joint").validate()  # 70 sets: fine
