"""Optional low-rank first-order correction between pruning shots (LLM Surgeon, ICLR 2024).

Between shots the paper lets the remaining weights adapt a little with a few first-order steps
on low-rank adapters. For every target linear with weight ``W`` (out × in)

    W_eff = (W + B A) ⊙ M,     B ∈ R^{out×r} (zeros),  A ∈ R^{r×in} (small, seeded),
    M = [W ≠ 0]  taken once, at the start,

and only ``A`` and ``B`` (of every linear at once) are trained with Adam on the mean next-token
cross-entropy of the calibration windows, which are cycled through ``batch_size`` at a time.
The mask keeps every removed weight, and therefore every removed row or column, exactly zero
(``torch.where``, so no ``-0.0`` and no ``NaN`` from ``inf · 0``). Afterwards the adapters are
merged, ``W ← (W + B A) ⊙ M``, in place in the model's own weight tensors. Biases are left as
they are (no bias delta).

Implementation: ``torch.func.functional_call``. Each training step computes the effective
weights and runs the model with them substituted for the target weights, for that call only.
The model itself is never changed while training: no hooks, no parametrisations, no new
modules. Nothing needs to be removed afterwards, and an exception part way leaves the weights as
they were. The model runs in eval mode (no dropout) so that the result depends only on
``seed``. Every parameter's ``requires_grad`` flag and the train/eval mode are restored, and no
model parameter receives a ``.grad``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from llm_surgeon.models.layouts import TargetLinear

__all__ = ["calibration_loss", "first_order_correction"]


def _mean_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (true labels) and the number of predicted tokens."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    labels = ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           reduction="sum")
    return loss, labels.numel()


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy over every predicted token of ``windows`` (eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            loss, n = _mean_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def first_order_correction(
    model: nn.Module,
    targets: list[TargetLinear],
    windows: torch.Tensor,
    rank: int,
    steps: int,
    lr: float,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Fit rank-``rank`` adapters ``B A`` under the current sparsity mask, then merge them.

    Args:
        model: a causal LM (Hugging Face), changed in place: only the weights of ``targets``.
        targets: the decoder linears to correct (``decoder_linears(model)``).
        windows: int64 ``(n, L)`` calibration token ids, ``L ≥ 2``.
        rank: adapter rank ``r ≥ 1``.
        steps: optimizer steps (Adam); ``0`` measures the loss and changes nothing.
        lr: Adam learning rate.
        seed: seeds the initialisation of every ``A`` (``N(0, 1/in)`` entries); the run is
            otherwise deterministic.
        progress: show a tqdm bar over the steps.
        batch_size: windows per step (the windows are cycled through in order).

    Returns:
        ``{"loss_before", "loss_after", "steps"}``: mean token cross-entropy on ``windows``
        before and after (on the merged model), and the number of steps taken.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n ≥ 1, L ≥ 2) token ids, got {tuple(windows.shape)}")
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("targets must not repeat a linear")

    device = next(model.parameters()).device
    loss_before = calibration_loss(model, windows, batch_size)

    # name of each target's weight as functional_call sees it
    param_name = {id(p): n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    weights: list[tuple[str, torch.Tensor]] = []
    masks: list[torch.Tensor] = []
    factors: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t in targets:
        W = t.module.weight
        if id(W) not in param_name:
            raise ValueError(f"{t.name}.weight is not a parameter of this model")
        out_f, in_f = W.shape
        dt = _adapter_dtype(W)
        A = (torch.randn(rank, in_f, generator=gen, dtype=torch.float64) / math.sqrt(in_f))
        A = A.to(device=W.device, dtype=dt).requires_grad_(True)
        B = torch.zeros(out_f, rank, device=W.device, dtype=dt, requires_grad=True)
        weights.append((param_name[id(W)], W))
        masks.append(W.detach() != 0)
        factors.append((B, A))

    def effective(i: int) -> torch.Tensor:
        W = weights[i][1]
        B, A = factors[i]
        dense = W.detach().to(B.dtype) + B @ A
        return torch.where(masks[i], dense, torch.zeros((), dtype=B.dtype, device=B.device)
                           ).to(W.dtype)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    n = windows.shape[0]
    taken = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        if steps > 0:
            opt = torch.optim.Adam([x for pair in factors for x in pair], lr=lr)
            bar = tqdm(range(steps), desc=f"low-rank correction r={rank}", unit="step",
                       disable=not progress, leave=False, dynamic_ncols=True)
            for step in bar:
                rows = (torch.arange(batch_size) + step * batch_size) % n
                ids = windows[rows].to(device)
                with torch.enable_grad():
                    subst = {name: effective(i) for i, (name, _) in enumerate(weights)}
                    logits = functional_call(model, subst, args=(),
                                             kwargs={"input_ids": ids, "use_cache": False}).logits
                    loss, count = _mean_token_loss(logits, ids)
                    loss = loss / count
                    del logits, subst
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                taken += 1
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
            with torch.no_grad():
                for i, (_, W) in enumerate(weights):
                    W.copy_(effective(i))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

    loss_after = calibration_loss(model, windows, batch_size)
    return {"loss_before": loss_before, "loss_after": loss_after, "steps": taken}
