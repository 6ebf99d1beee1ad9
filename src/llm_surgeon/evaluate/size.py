"""What a model costs: parameters and bytes on disk."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def folder_weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a saved model folder."""
    return sum(
        p.stat().st_size
        for p in Path(folder).iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def state_bytes(model: Any) -> int:
    """Bytes the model's unique tensors take (what a safetensors file holds, minus its header)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def reset_peak_rss() -> None:
    """Reset this process's peak resident set (Linux ``clear_refs``; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident set of this process since start or the last :func:`reset_peak_rss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
