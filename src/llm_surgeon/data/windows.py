"""Token windows: seeded random calibration windows and non-overlapping evaluation windows.

Both follow the SparseGPT protocol: the whole text is tokenized at once without special tokens
(no BOS); calibration draws ``n`` windows of ``L`` tokens at uniformly random start offsets with
a seeded generator; evaluation cuts the token stream into consecutive non-overlapping windows
of ``L`` tokens (the ragged tail is dropped), optionally capped to the first ``max_windows``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from llm_surgeon.errors import UserError


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1])[:2000]:
        h.update(f"{idx}:{tok}\n".encode())
    h.update(str(len(vocab)).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:16]


def tokenize(tokenizer: Any, text: str, cache: Path | None = None) -> torch.Tensor:
    """Token ids (1-D int64) of ``text`` without special tokens; cached on disk if ``cache``."""
    path = None
    if cache is not None:
        key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
        path = Path(cache) / f"{key}-{_tokenizer_fingerprint(tokenizer)}.pt"
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception:
                path.unlink(missing_ok=True)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    tensor = torch.tensor(ids, dtype=torch.long)
    if path is not None:
        from llm_surgeon.io import atomic_file

        with atomic_file(path) as tmp:
            torch.save(tensor, tmp)
    return tensor


def _check(ids: torch.Tensor, seqlen: int, n: int | None, what: str) -> None:
    if seqlen <= 1:
        raise UserError(f"--seqlen must be at least 2 tokens (got {seqlen})")
    if n is not None and n <= 0:
        raise UserError(f"the number of {what} windows must be positive (got {n})")
    if ids.numel() < seqlen + (1 if what == "calibration" else 0):
        raise UserError(
            f"the text has {ids.numel()} tokens, shorter than one {what} window of {seqlen} tokens"
        )


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at seeded uniformly random offsets: shape (n, seqlen).

    Offsets lie in ``[0, len(ids) - seqlen]`` so every window is complete. The same
    (ids, n, seqlen, seed) always gives the same windows, whatever else used the global RNG.
    """
    _check(ids, seqlen, n, "calibration")
    if n * seqlen > ids.numel():
        raise UserError(
            f"the calibration text has {ids.numel()} tokens, fewer than the {n} x {seqlen} = "
            f"{n * seqlen} requested; use a longer text or fewer/shorter windows"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def evaluation_windows(
    ids: torch.Tensor, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows: shape (min(len // seqlen, max_windows), seqlen)."""
    _check(ids, seqlen, max_windows, "evaluation")
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)
