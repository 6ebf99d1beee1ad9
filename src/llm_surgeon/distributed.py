"""Several processes or devices through ``torch.distributed`` (launched by ``torchrun``).

Nothing here is a process pool: ``torchrun --nproc-per-node K -m llm_surgeon prune ...`` starts K
copies of the same command; each one

* calibrates on its share of the windows (window i goes to rank i mod K),
* all-reduces the running sums of the curvature factors (Σ āāᵀ, Σ ggᵀ, token counts) and of the
  layer-wise methods' Gram matrices, so every rank holds the same statistics,
* prunes (the decision is a deterministic function of those statistics), after which rank 0's
  weights are broadcast so that every rank continues from bit-identical weights,
* evaluates its share of the evaluation windows (summed NLL and token counts all-reduced),
* and only rank 0 writes checkpoints, the model and the report.

The backend is gloo on CPU and NCCL on CUDA. Without ``torchrun`` (no ``WORLD_SIZE`` in the
environment) everything runs in one process and these helpers are no-ops.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str = "cpu") -> None:
    """Join the process group that ``torchrun`` describes in the environment, once."""
    if dist.is_available() and not dist.is_initialized() and int(
        os.environ.get("WORLD_SIZE", "1")
    ) > 1:
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's share of the windows: rows rank, rank + K, rank + 2K, …"""
    if not active():
        return windows
    if windows.shape[0] < world_size():
        raise ValueError(f"{windows.shape[0]} windows cannot be shared by {world_size()} ranks")
    return windows[rank() :: world_size()]


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (returns it)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_int(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s value of ``t`` on every rank, in place."""
    if active():
        dist.broadcast(t, src=src)
    return t


def barrier() -> None:
    if active():
        dist.barrier()
