"""Offline zero-shot tasks for EleutherAI's lm-evaluation-harness, built from the bundled
public-domain test text (US State of the Union addresses, 2000 on).

Two tasks, in the harness's own YAML task format (``evaluate/tasks/*.yaml``), with local JSONL
data (``evaluate/tasks/*.jsonl``) built deterministically by :func:`build` (run
``python -m llm_surgeon.evaluate.offline_tasks`` to regenerate them):

* ``sotu_lastword``: LAMBADA-style last-word prediction. A passage of the speeches ending at a
  sentence end; the model must continue it with its last word. Metrics: ``acc`` (the target is
  the greedy continuation) and ``perplexity`` of the target.
* ``sotu_cloze``: four-way multiple choice. A passage cut before a content word; choices are the
  true next word and three other words of the same text with similar frequency. Metric: ``acc``
  (chance 0.25) and ``acc_norm``.

The YAML files name their data as ``{TASK_DIR}/<task>.jsonl``; :func:`task_dir` writes them,
with that placeholder resolved to an absolute path, into a folder the harness can include.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

TASKS_SRC = Path(__file__).resolve().parent / "tasks"
OFFLINE_TASKS = ("sotu_lastword", "sotu_cloze")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _passages(text: str, min_words: int, max_words: int) -> list[list[str]]:
    """Runs of whole sentences with min..max words, non-overlapping, in text order."""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    out, cur = [], []
    for s in sentences:
        words = s.split()
        if not words:
            continue
        cur.extend(words)
        if len(cur) >= min_words:
            if len(cur) <= max_words:
                out.append(cur)
            cur = []
    return out


def build(n: int = 400, seed: int = 0) -> dict[str, list[dict]]:
    from llm_surgeon.data.corpora import load_text

    text = load_text("sotu", "test")
    rng = random.Random(seed)
    passages = _passages(text, 40, 120)
    lastword = []
    for words in passages:
        last = words[-1].rstrip(".!?\"'")
        if _WORD.match(last):
            lastword.append({"context": " ".join(words[:-1]), "target": " " + last})
    rng.shuffle(lastword)

    vocab = Counter(w for w in re.findall(r"[A-Za-z]+", text) if len(w) >= 4)
    by_freq = sorted(vocab, key=lambda w: (-vocab[w], w))
    rank = {w: i for i, w in enumerate(by_freq)}
    cloze = []
    for words in passages:
        idx = [i for i in range(20, len(words) - 1)
               if re.fullmatch(r"[a-z]{4,}", words[i]) and words[i] in rank]
        if not idx:
            continue
        i = rng.choice(idx)
        true = words[i]
        r = rank[true]
        pool = [w for w in by_freq[max(0, r - 40) : r + 40]
                if w != true and w.islower() and w not in words[max(0, i - 5) : i + 5]]
        if len(pool) < 3:
            continue
        choices = [true, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        cloze.append({"context": " ".join(words[:i]), "choices": choices,
                      "label": choices.index(true)})
    rng.shuffle(cloze)
    return {"sotu_lastword": lastword[:n], "sotu_cloze": cloze[:n]}


def write_data(n: int = 400, seed: int = 0) -> None:
    for name, rows in build(n, seed).items():
        path = TASKS_SRC / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} examples to {path}")


def task_dir(target: str | Path) -> Path:
    """Write the task YAMLs with absolute data paths into ``target``; return it."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in OFFLINE_TASKS:
        text = (TASKS_SRC / f"{name}.yaml").read_text()
        (target / f"{name}.yaml").write_text(text.replace("{TASK_DIR}", str(TASKS_SRC)))
    return target


if __name__ == "__main__":
    write_data()
