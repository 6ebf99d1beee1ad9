"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (PyPI ``lm-eval``), by its
Python API on the in-memory model (no re-implementation of any task).

``tasks`` names harness tasks (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
openbookqa, rte, … need their data from the Hugging Face hub) or ``offline``: every task
bundled with llm-surgeon (:mod:`llm_surgeon.evaluate.offline_tasks`), which run without network.
"""

from __future__ import annotations

import tempfile
from typing import Any

from llm_surgeon.errors import UserError
from llm_surgeon.evaluate.offline_tasks import OFFLINE_TASKS, task_dir

STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                  "openbookqa", "rte")


def expand_tasks(spec: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        names.extend(OFFLINE_TASKS if part == "offline" else [part])
    if not names:
        raise UserError("--tasks needs at least one task name (or 'offline')")
    return names


def zero_shot(model: Any, tokenizer: Any, tasks: list[str], batch_size: int = 8,
              limit: int | None = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every task, e.g. ``{"sotu_cloze": {"acc": 0.61, ...}}``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("zero-shot evaluation needs lm-eval (pip install lm-eval)") from None
    with tempfile.TemporaryDirectory(prefix="llm-surgeon-tasks-") as tmp:
        manager = TaskManager(include_path=str(task_dir(tmp)))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise UserError(f"unknown task(s) for lm-eval: {', '.join(unknown)} (offline: "
                            f"{', '.join(OFFLINE_TASKS)}; standard: {', '.join(STANDARD_TASKS)})")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=0)
    results: dict[str, dict[str, float]] = {}
    for name, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            metric = key.partition(",")[0]
            if metric == "sample_len":
                clean["n"] = float(value)
            elif isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                clean[metric] = float(value)
        results[name] = clean
    return results
