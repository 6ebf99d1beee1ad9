"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (PyPI ``lm-eval``), by its
Python API on the in-memory model (no re-implementation of any task).

``tasks`` names harness tasks (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
openbookqa, rte, … need their data from the Hugging Face hub) or ``offline``: every task
bundled with llm-surgeon (:mod:`llm_surgeon.evaluate.offline_tasks`), which run without network.
"""

from __future__ import annotations

import contextlib
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


def check_tasks(tasks: list[str]) -> None:
    """Unknown task names are an error before any model is loaded or measured."""
    known = set(OFFLINE_TASKS) | set(STANDARD_TASKS)
    if all(t in known for t in tasks):
        return
    unknown = [t for t in tasks if t not in _task_names()]
    if unknown:
        raise UserError(f"unknown task(s) for lm-eval: {', '.join(unknown)} (offline: "
                        f"{', '.join(OFFLINE_TASKS)}; standard: {', '.join(STANDARD_TASKS)})")


def _task_names() -> set[str]:
    """Every task name the harness knows (indexing them takes seconds: cached on disk per
    lm-eval version)."""
    import json
    from importlib.metadata import version

    from llm_surgeon.io import atomic_write
    from llm_surgeon.models.load import cache_dir

    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("zero-shot evaluation needs lm-eval (pip install lm-eval)") from None
    cache = cache_dir() / f"lm-eval-tasks-{version('lm-eval')}.json"
    try:
        names = json.loads(cache.read_text())
        if isinstance(names, list):
            return set(names) | set(OFFLINE_TASKS)
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory(prefix="llm-surgeon-tasks-") as tmp:
        names = sorted(set(TaskManager(include_path=str(task_dir(tmp))).all_tasks))
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps(names) + "\n")
    return set(names)


def _is_network_error(exc: BaseException) -> bool:
    """A task whose data could not be fetched (offline machine, hub down)."""
    seen = exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, ConnectionError) or any(
                k in name for k in ("Connection", "Offline", "Timeout", "HTTPError",
                                    "LocalEntryNotFound", "DatasetNotFound")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
        import logging

        if logging.getLogger().getEffectiveLevel() > logging.INFO:  # no -v: the harness's
            logging.getLogger("lm_eval").setLevel(logging.ERROR)  # notes are noise
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                          limit=limit, log_samples=False, bootstrap_iters=0)
        except Exception as exc:
            if not _is_network_error(exc):
                raise
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"--tasks {','.join(tasks)}: the task data could not be fetched "
                            f"({type(exc).__name__}: {first}); the hub tasks need the network "
                            "(or a filled Hugging Face cache); --tasks offline runs without"
                            ) from None
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
