"""Perplexity with the SparseGPT protocol.

The evaluation text is cut into non-overlapping windows of ``L`` tokens (see
:func:`llm_surgeon.data.windows.evaluation_windows`); each window is one forward pass with no
memory of the previous one; every token but the first of a window is predicted, and

    ppl = exp( Σ_windows Σ_{t=1}^{L-1} −log p(x_t | x_<t) / (number of predicted tokens) ),

i.e. the exponential of the mean token negative log-likelihood.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of next-token prediction: −log softmax(logits[:, t-1])[ids[:, t]].

    ``logits`` (B, L, V), ``ids`` (B, L) → (B, L-1), computed in fp32 or better.
    """
    logits = (
        logits[:, :-1].float()
        if logits.dtype in (torch.float16, torch.bfloat16)
        else logits[:, :-1]
    )
    target = ids[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    ).view(target.shape)


def perplexity_from_nll(total_nll: float, count: int) -> float:
    """exp(total NLL / number of predicted tokens)."""
    if count <= 0:
        raise ValueError("no predicted tokens")
    return math.exp(total_nll / count)


@torch.no_grad()
def evaluate_perplexity(
    model: Any,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, float]:
    """Run every window through ``model``; return ``{"ppl", "nll", "tokens", "windows"}``."""
    from llm_surgeon import distributed

    device = next(model.parameters()).device
    windows = distributed.shard(windows)  # torchrun: this rank's share, sums reduced below
    total = 0.0
    count = 0
    bar = tqdm(
        total=windows.shape[0],
        desc=desc,
        unit="win",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = token_nll(logits, batch)
        total += float(nll.double().sum())
        count += nll.numel()
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total / count):.2f}")
    bar.close()
    n_windows = distributed.all_reduce_int(int(windows.shape[0]))
    if distributed.active():
        sums = distributed.all_reduce_sum_(torch.tensor([total, float(count)],
                                                        dtype=torch.float64))
        total, count = float(sums[0]), int(sums[1])
    return {
        "ppl": perplexity_from_nll(total, count),
        "nll": total / count,
        "tokens": count,
        "windows": n_windows,
    }
