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
from llm_surgeon.io import atomic_folder, ensure_output_folder, read_marker, recover
from llm_surgeon.models.layouts import TargetLinear

CHECKPOINT = "checkpoint"
VERSION = 1


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT


def recover_output(out_dir: str | Path) -> None:
    """Finish or roll back a replace of the output folder or of its checkpoint that a kill
    interrupted (see :func:`llm_surgeon.io.recover`), and drop stale temporaries: inside the
    folder only once its marker says it is one of our outputs."""
    recover(out_dir, "output")
    if Path(out_dir).is_dir() and read_marker(out_dir, "output") is not None:
        recover(checkpoint_dir(out_dir), "checkpoint")


def has_checkpoint(out_dir: str | Path) -> bool:
    recover_output(out_dir)
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

    ensure_output_folder(out_dir)
    with atomic_folder(checkpoint_dir(out_dir), kind="checkpoint") as tmp:
        if layer_files is None:
            save_file(_tensors(targets), str(tmp / "weights.safetensors"))
        else:
            (tmp / "layers").mkdir()
            for f in layer_files:
                _link_or_copy(f, tmp / "layers" / f.name)
        payload = {**state, "version": VERSION,
                   "rng": torch.get_rng_state().tolist()}
        (tmp / "state.json").write_text(json.dumps(payload) + "\n")


NOT_ACCEPTED = "recorded settings are no longer accepted: "
_STATE_KEYS = {"version", "settings", "shots", "report", "phases", "rng"}
_OPTIONAL_KEYS = {"counts"}  # streamed runs: (zeros, total) per linear
_SHOT_KEYS = ("shot", "sparsity_target", "sparsity_achieved", "time_s")


def read_state(out_dir: str | Path) -> dict[str, Any]:
    recover_output(out_dir)
    path = checkpoint_dir(out_dir) / "state.json"
    if not path.is_file():
        raise UserError(f"--resume {out_dir}: no checkpoint there (expected {path})")
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"--resume {out_dir}: checkpoint state is corrupt ({path})") from None
    if not isinstance(state, dict):
        raise UserError(f"--resume {out_dir}: checkpoint state is corrupt ({path})")
    if state.get("version") != VERSION:
        raise UserError(f"--resume {out_dir}: checkpoint version {state.get('version')} is not "
                        f"{VERSION}")
    problem = state_problem(state)
    if problem:
        if problem.startswith(NOT_ACCEPTED):
            raise UserError(f"--resume {out_dir}: the checkpoint's {problem}")
        raise UserError(f"--resume {out_dir}: checkpoint state is corrupt ({problem})")
    return state


def state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's state (``None``: nothing): the keys, the settings (a
    valid run configuration), the shots, the report, the phases and the RNG state."""
    from llm_surgeon.config import PruneConfig

    missing = _STATE_KEYS - set(state)
    extra = set(state) - _STATE_KEYS - _OPTIONAL_KEYS
    if missing:
        return f"missing {', '.join(sorted(missing))}"
    if extra:
        return f"unexpected {', '.join(sorted(extra))}"
    settings = state["settings"]
    if not isinstance(settings, dict):
        return "settings are not a mapping"
    try:
        cfg = PruneConfig(**settings)
        cfg.check_types()
    except (TypeError, UserError) as exc:  # not a run's settings at all: tampered
        return f"settings: {exc}"
    try:
        cfg.validate()
    except UserError as exc:  # well-formed, valid when written, refused by today's checks
        return f"{NOT_ACCEPTED}{exc}"
    if not isinstance(state["report"], dict):
        return "report is not a mapping"
    if not isinstance(state["phases"], dict) or not all(
            isinstance(v, dict) and all(_is_number(x) for x in v.values())
            for v in state["phases"].values()):
        return "phases are not a mapping of timings"
    shots = state["shots"]
    if not isinstance(shots, list) or not shots:
        return "shots are not a non-empty list"
    for k, entry in enumerate(shots, 1):
        if not isinstance(entry, dict) or any(not _is_number(entry.get(key))
                                              for key in _SHOT_KEYS):
            return f"shot {k} lacks one of {', '.join(_SHOT_KEYS)}"
        if entry["shot"] != k:
            return f"shot {k} is numbered {entry['shot']}"
    rng = state["rng"]
    n = torch.get_rng_state().numel()
    if (not isinstance(rng, list) or len(rng) != n
            or not all(isinstance(x, int) and 0 <= x < 256 for x in rng)):
        return f"rng is not a list of {n} bytes"
    if "counts" in state and not (isinstance(state["counts"], dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)
            for v in state["counts"].values())):
        return "counts are not (zeros, total) pairs"
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@torch.no_grad()
def restore(out_dir: str | Path, targets: list[TargetLinear], state: dict[str, Any]) -> None:
    """Put the checkpointed tensors back into the model and restore the RNG state."""
    from safetensors.torch import load_file

    path = checkpoint_dir(out_dir) / "weights.safetensors"
    try:
        saved = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"--resume {out_dir}: checkpoint weights missing ({path})") from None
    except Exception as exc:  # truncated or tampered file: safetensors raises its own errors
        raise UserError(f"--resume {out_dir}: checkpoint weights unreadable ({path}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                        ) from None
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
    from safetensors import safe_open

    files = sorted(saved.glob("*.safetensors"))
    if not files or len(files) != len(list(layer_dir.glob("*.safetensors"))):
        raise UserError(f"--resume {out_dir}: checkpoint does not match the model (layers)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                names = set(fh.keys())
            with safe_open(str(layer_dir / f.name), framework="pt") as fh:
                expected = set(fh.keys())
        except Exception as exc:  # truncated or tampered
            raise UserError(f"--resume {out_dir}: checkpoint layer {f.name} is unreadable "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                            ) from None
        if names != expected:
            raise UserError(f"--resume {out_dir}: checkpoint does not match the model "
                            f"({f.name})")
    for f in files:
        shutil.copy2(f, layer_dir / f.name)
    torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
