"""Checkpoints of a multi-shot run, so that a killed run costs at most one shot.

After every shot the driver writes ``DIR/checkpoint/``: the decoder linears' weights and biases
(the only tensors pruning changes) as safetensors, and ``state.json`` with the settings, the
shots done, the report so far and the torch RNG state. It is written to a temporary folder and
renamed, so a kill at any moment leaves either the previous checkpoint or the new one, whole.
``llm-surgeon prune --resume DIR`` reloads the model named in the settings, puts the checkpointed
tensors back and runs the remaining shots. The finished model replaces the folder (checkpoint
included) atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from llm_surgeon.errors import UserError
from llm_surgeon.models.layouts import TargetLinear
from llm_surgeon.models.load import atomic_folder

CHECKPOINT = "checkpoint"
VERSION = 1


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT


def has_checkpoint(out_dir: str | Path) -> bool:
    return (checkpoint_dir(out_dir) / "state.json").is_file()


def _tensors(targets: list[TargetLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for t in targets:
        out[f"{t.name}.weight"] = t.module.weight.detach().contiguous().cpu()
        if t.module.bias is not None:
            out[f"{t.name}.bias"] = t.module.bias.detach().contiguous().cpu()
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where possible (the layer store replaces files, never rewrites them in
    place, so a link keeps the checkpointed version), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(out_dir: str | Path, targets: list[TargetLinear], state: dict[str, Any],
                    layer_files: list[Path] | None = None) -> None:
    """Write the checkpoint atomically (temporary sibling folder, then rename). A streamed run
    (``--max-memory``) passes its per-layer files instead: they are the decoder's state."""
    from safetensors.torch import save_file

    with atomic_folder(checkpoint_dir(out_dir)) as tmp:
        if layer_files is None:
            save_file(_tensors(targets), str(tmp / "weights.safetensors"))
        else:
            (tmp / "layers").mkdir()
            for f in layer_files:
                _link_or_copy(f, tmp / "layers" / f.name)
        payload = {**state, "version": VERSION,
                   "rng": torch.get_rng_state().tolist()}
        (tmp / "state.json").write_text(json.dumps(payload) + "\n")


def read_state(out_dir: str | Path) -> dict[str, Any]:
    path = checkpoint_dir(out_dir) / "state.json"
    if not path.is_file():
        raise UserError(f"--resume {out_dir}: no checkpoint there (expected {path})")
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"--resume {out_dir}: checkpoint state is corrupt ({path})") from None
    if state.get("version") != VERSION:
        raise UserError(f"--resume {out_dir}: checkpoint version {state.get('version')} is not "
                        f"{VERSION}")
    return state


@torch.no_grad()
def restore(out_dir: str | Path, targets: list[TargetLinear], state: dict[str, Any]) -> None:
    """Put the checkpointed tensors back into the model and restore the RNG state."""
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint_dir(out_dir) / "weights.safetensors"))
    for t in targets:
        for name, p in ((f"{t.name}.weight", t.module.weight), (f"{t.name}.bias", t.module.bias)):
            if p is None:
                continue
            if name not in saved or saved[name].shape != p.shape:
                raise UserError(f"--resume {out_dir}: checkpoint does not match the model "
                                f"({name})")
            p.copy_(saved[name].to(p.dtype))
    torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))


def restore_layer_files(out_dir: str | Path, layer_dir: Path, state: dict[str, Any]) -> None:
    """A streamed run: put the checkpointed layer files in place of the freshly loaded ones and
    restore the RNG state."""
    saved = checkpoint_dir(out_dir) / "layers"
    files = sorted(saved.glob("*.safetensors"))
    if not files or len(files) != len(list(layer_dir.glob("*.safetensors"))):
        raise UserError(f"--resume {out_dir}: checkpoint does not match the model (layers)")
    for f in files:
        shutil.copy2(f, layer_dir / f.name)
    torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
