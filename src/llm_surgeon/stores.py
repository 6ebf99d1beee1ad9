"""Where the driver keeps a run's state: decoder layers, boundary hidden states, per-layer work.

**Layer stores** hold the decoder layers. The driver only ever asks for layer ℓ
(``with store.resident(ℓ, dirty) as layer``) and never knows which store it has:

* :class:`MemoryLayers`: the whole model in memory; bringing a layer in costs nothing.
* :class:`DiskLayers`: one safetensors file per decoder layer (``--max-memory``), one layer in
  memory at a time (:class:`~llm_surgeon.models.offload.LayerStore`).

Each store also knows how to checkpoint, restore and save what it holds, so that the driver
has one call for each whatever the store.

**Activation stores** hold tensors at the layer boundaries (hidden states ``h``, gradients
``g``), keyed by (kind, boundary, batch): :class:`MemoryStates` (a dict) or :class:`DiskStates`
(one file per key).

**Work files** (:class:`WorkFiles`): per-layer factors, costs and masks of a shot, one file per
layer under the run's work folder, in every mode; so factors, inverses and costs are in memory
for one decoder layer at a time, whatever the layer store.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_surgeon.models.layouts import TargetLinear, decoder_layers, layout_for
from llm_surgeon.models.offload import LayerStore


def _save(obj: Any, path: Path) -> None:
    """``torch.save`` without the zip CRC-32 of every tensor (7× faster for the run's own
    short-lived work files, which are read back only by the process that wrote them)."""
    ser = torch.serialization
    if not hasattr(ser, "set_crc32_options"):
        torch.save(obj, path)
        return
    before = ser.get_crc32_options()
    ser.set_crc32_options(False)
    try:
        torch.save(obj, path)
    finally:
        ser.set_crc32_options(before)


class MemoryLayers:
    """The decoder layers of a model that is wholly in memory."""

    all_resident = True

    def __init__(self, model: nn.Module, device: Any = "cpu") -> None:
        self.model = model
        self.device = device
        self.layout = layout_for(model)
        self.layers = decoder_layers(model, self.layout)

    def __len__(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def resident(self, i: int, dirty: bool = False) -> Iterator[nn.Module]:
        yield self.layers[i]

    def layer_bytes(self) -> int:
        """Bytes of the largest decoder layer's parameters and buffers."""
        return max(sum(t.numel() * t.element_size()
                       for t in [*m.parameters(), *m.buffers()]) for m in self.layers)

    def save_checkpoint(self, out_dir: Path, targets: list[TargetLinear],
                        state: dict[str, Any]) -> None:
        from llm_surgeon.checkpoint import save_checkpoint

        save_checkpoint(out_dir, targets, state)

    def restore(self, out_dir: Path, targets: list[TargetLinear], state: dict[str, Any]) -> None:
        from llm_surgeon.checkpoint import restore

        restore(out_dir, targets, state)

    def save(self, tokenizer: Any, out_dir: Path, extra_files: dict[str, str]) -> None:
        from llm_surgeon.io import save_atomically

        save_atomically(self.model, tokenizer, out_dir, extra_files=extra_files)

    def handle(self) -> nn.Module | None:
        """The model for the caller (``report["_model"]``)."""
        return self.model


class DiskLayers(LayerStore):
    """The decoder layers on disk, one file each (see :mod:`llm_surgeon.models.offload`)."""

    all_resident = False

    def save_checkpoint(self, out_dir: Path, targets: list[TargetLinear],
                        state: dict[str, Any]) -> None:
        from llm_surgeon.checkpoint import save_checkpoint

        save_checkpoint(out_dir, targets, state,
                        layer_files=[self.path(i) for i in range(len(self))])

    def restore(self, out_dir: Path, targets: list[TargetLinear], state: dict[str, Any]) -> None:
        from llm_surgeon.checkpoint import restore_layer_files

        restore_layer_files(out_dir, self.dir, state)

    def save(self, tokenizer: Any, out_dir: Path, extra_files: dict[str, str]) -> None:
        from llm_surgeon.models.offload import save_offloaded

        save_offloaded(self.model, self, tokenizer, out_dir, extra_files=extra_files)

    def handle(self) -> nn.Module | None:
        return None  # the layers live on disk only; load the saved folder to use the model


Layers = MemoryLayers | DiskLayers


class MemoryStates:
    """Boundary tensors in a dict."""

    def __init__(self) -> None:
        self._t: dict[tuple[str, int, int], torch.Tensor] = {}

    def save(self, kind: str, layer: int, batch: int, t: torch.Tensor) -> None:
        self._t[(kind, layer, batch)] = t.detach()

    def load(self, kind: str, layer: int, batch: int) -> torch.Tensor:
        return self._t[(kind, layer, batch)]

    def drop(self, kind: str, layer: int, batch: int) -> None:
        self._t.pop((kind, layer, batch), None)


class DiskStates:
    """Boundary tensors one file per (kind, boundary, batch), so that only one batch of one
    boundary is in memory at a time."""

    def __init__(self, root: Path, device: Any = "cpu") -> None:
        self.root = root
        self.device = device
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, kind: str, layer: int, batch: int) -> Path:
        return self.root / f"{kind}{layer:05d}_{batch:05d}.pt"

    def save(self, kind: str, layer: int, batch: int, t: torch.Tensor) -> None:
        _save(t.detach().contiguous(), self._path(kind, layer, batch))

    def load(self, kind: str, layer: int, batch: int) -> torch.Tensor:
        return torch.load(self._path(kind, layer, batch), map_location=self.device,
                          weights_only=True)

    def drop(self, kind: str, layer: int, batch: int) -> None:
        self._path(kind, layer, batch).unlink(missing_ok=True)


States = MemoryStates | DiskStates


class WorkFiles:
    """Per-layer work of a shot (factors, costs, masks): one file per name under ``root``."""

    def __init__(self, root: Path, device: Any = "cpu") -> None:
        self.root = root
        self.device = device
        root.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, obj: Any) -> None:
        _save(obj, self.root / f"{name}.pt")

    def get(self, name: str) -> Any:
        return torch.load(self.root / f"{name}.pt", map_location=self.device, weights_only=True)

    def clear(self) -> None:
        for f in self.root.glob("*.pt"):
            f.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
