"""Zero-shot evaluation through the real lm-evaluation-harness, on the bundled offline tasks."""

from __future__ import annotations

import json

import pytest

from llm_surgeon.cli import main
from llm_surgeon.evaluate.offline_tasks import OFFLINE_TASKS, TASKS_SRC, build, task_dir


def test_offline_task_yaml_loads_in_the_harness(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(task_dir(tmp_path)))
    for name in OFFLINE_TASKS:
        assert name in manager.all_tasks
    tasks = get_task_dict(list(OFFLINE_TASKS), manager)
    cloze = tasks["sotu_cloze"]
    docs = list(cloze.test_docs())
    assert len(docs) == 400
    doc = docs[0]
    assert cloze.doc_to_choice(doc) == doc["choices"] and len(doc["choices"]) == 4
    assert cloze.doc_to_target(doc) == doc["label"]


def test_committed_task_data_is_what_the_builder_makes():
    built = build()
    for name in OFFLINE_TASKS:
        lines = (TASKS_SRC / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == built[name]
    labels = [d["label"] for d in built["sotu_cloze"]]
    assert min(labels) == 0 and max(labels) == 3  # the true word is not always first


def test_eval_tasks_offline_on_a_tiny_model(tiny_model_dirs, sample_text_file, tmp_path):
    out = tmp_path / "r.json"
    assert main(["-q", "eval", "--model", str(tiny_model_dirs["llama"]), "--data",
                 str(sample_text_file), "--seqlen", "32", "--eval-windows", "1", "--tasks",
                 "offline", "--tasks-limit", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == set(OFFLINE_TASKS)
    for metrics in res["tasks"].values():
        assert 0.0 <= metrics["acc"] <= 1.0 and metrics["n"] == 4


def test_unknown_task_is_a_clear_error(tiny_model_dirs, sample_text_file, capsys):
    code = main(["-q", "eval", "--model", str(tiny_model_dirs["llama"]), "--data",
                 str(sample_text_file), "--seqlen", "32", "--eval-windows", "1", "--tasks",
                 "no_such_task"])
    assert code == 2 and "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("spec,want", [("offline", list(OFFLINE_TASKS)),
                                       ("piqa,offline", ["piqa", *OFFLINE_TASKS])])
def test_expand_tasks(spec, want):
    from llm_surgeon.evaluate.zeroshot import expand_tasks

    assert expand_tasks(spec) == want
