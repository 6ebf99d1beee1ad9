"""Export Llama-family models (dense, sparse or physically shrunk) to GGUF for llama.cpp.

Our own converter, written with the ``gguf`` package; the conventions follow llama.cpp's
``convert_hf_to_gguf.py``:

* tensor names ``token_embd``, ``output_norm``, ``output`` (absent when the embedding is tied),
  ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
  ffn_down}`` (+ ``.bias`` of q, k, v, o where the model has them, e.g. Qwen2);
* the rows of q and k (and their biases) are permuted from Hugging Face's rotate-half layout to
  llama.cpp's interleaved-pair RoPE (:func:`permute_rope`);
* 1-D tensors (norms, biases) stay f32 in an f16 file;
* quantized types are made by llama.cpp's own quantizer (``llama_model_quantize`` of the
  ``llama-cpp-python`` extra) from an f32 file that we write.

Layers of equal sizes are written as ``general.architecture = "llama"``. A model whose layers
differ (a global heads-channels prune) is written as ``"deci"`` (DeciLM / Nemotron-NAS: the same
Llama block), whose ``feed_forward_length``, ``attention.head_count`` and
``attention.head_count_kv`` are UINT32 arrays with one entry per layer, with ``key_length`` and
``value_length`` explicit. llama.cpp aborts on a layer whose query heads are not a multiple of its
KV heads and computes wrong output for an MLP width of 0, so those are refused before writing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_surgeon.errors import UserError

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")
WRITTEN_TYPES = ("f32", "f16")
# llama.cpp file types made by its quantizer, and the row block each needs
QUANT_BLOCK = {
    "q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32,
    "q2_k": 256, "q3_k_s": 256, "q3_k_m": 256, "q3_k_l": 256, "q4_k_s": 256, "q4_k_m": 256,
    "q5_k_s": 256, "q5_k_m": 256, "q6_k": 256,
}
TYPES = WRITTEN_TYPES + tuple(QUANT_BLOCK)


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one decoder layer as llama.cpp sees them."""

    heads: int
    kv_heads: int
    channels: int


def check_family(config: Any) -> None:
    """Refuse, in one line, a model whose block is not the Llama block llama.cpp runs.

    Accepted: ``model_type`` llama, mistral or qwen2 with SiLU gated MLP, no MLP bias and plain
    RoPE (``rope_type`` "default"; scaled RoPE such as Llama 3.1's "llama3" is not exported yet).
    """
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise UserError(f"GGUF export supports the Llama family ({', '.join(FAMILIES)}); "
                        f"this model is {mt!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"GGUF export needs a SiLU MLP, this model uses {config.hidden_act!r}")
    if getattr(config, "mlp_bias", False):
        raise UserError("GGUF export: MLP biases are not supported")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise UserError(f"GGUF export: RoPE type {rope.get('rope_type')!r} is not supported "
                        "(only plain RoPE)")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and \
            window < getattr(config, "max_position_embeddings", 0):
        log.warning("sliding window of %s tokens dropped: llama.cpp attends to the whole "
                    "context (identical for contexts up to the window)", window)


def rope_parameters(config: Any) -> dict[str, Any]:
    """``{"rope_theta", "rope_type", ...}`` from a transformers 4 or 5 config."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return dict(rp)
    out: dict[str, Any] = {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        out.update(scaling)
        out["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return out


def layer_shapes(model: Any) -> list[LayerShape]:
    """Heads, KV heads and MLP channels of every decoder layer, read from the module shapes
    (so per-layer sizes of a shrunk model are seen as they are)."""
    hd = head_dim(model.config)
    shapes = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        shapes.append(LayerShape(a.q_proj.out_features // hd, a.k_proj.out_features // hd,
                                 m.down_proj.in_features))
    return shapes


def head_dim(config: Any) -> int:
    """Head size: ``head_dim`` where the config has it, else hidden / heads."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def validate_shapes(shapes: list[LayerShape]) -> None:
    """Refuse what llama.cpp would abort on or compute wrongly: per layer at least one query and
    one KV head, query heads a multiple of KV heads, and an MLP width of at least 1."""
    for i, s in enumerate(shapes):
        if s.heads < 1 or s.kv_heads < 1:
            raise UserError(f"layer {i} has {s.heads} query / {s.kv_heads} KV heads; llama.cpp "
                            "needs at least one of each")
        if s.heads % s.kv_heads:
            raise UserError(f"layer {i}: {s.heads} query heads are not a multiple of its "
                            f"{s.kv_heads} KV heads (llama.cpp aborts on this)")
        if s.channels < 1:
            raise UserError(f"layer {i} has an MLP width of 0, which llama.cpp's deci graph "
                            "computes wrongly")


def architecture(shapes: list[LayerShape]) -> str:
    """``"llama"`` when every layer has layer 0's sizes, else ``"deci"`` (per-layer sizes)."""
    return "llama" if all(s == shapes[0] for s in shapes) else "deci"


def permute_rope(w: torch.Tensor, head_size: int) -> torch.Tensor:
    """Rows of q or k (weight (h·d, in) or bias (h·d,)) from rotate-half to interleaved RoPE.

    Hugging Face rotates the pairs (x_j, x_{j+d/2}) of each head; llama.cpp's normal RoPE rotates
    (x_{2j}, x_{2j+1}). So within every head, row j of the first half goes to row 2j and row j of
    the second half to row 2j+1: new[h, 2j + s] = old[h, s·d/2 + j] for s in {0, 1}, j < d/2.
    """
    rows = w.shape[0]
    if rows % head_size or head_size % 2:
        raise ValueError(f"{rows} rows are not whole heads of even size {head_size}")
    n = rows // head_size
    return (w.reshape(n, 2, head_size // 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape))


def gguf_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) of every weight, q and k permuted for llama.cpp's RoPE."""
    hd = head_dim(model.config)
    base = model.model
    yield "token_embd.weight", base.embed_tokens.weight
    for i, layer in enumerate(base.layers):
        a, m = layer.self_attn, layer.mlp
        p = f"blk.{i}."
        yield p + "attn_norm.weight", layer.input_layernorm.weight
        for short, lin, rope in (("attn_q", a.q_proj, True), ("attn_k", a.k_proj, True),
                                 ("attn_v", a.v_proj, False), ("attn_output", a.o_proj, False)):
            w = lin.weight
            yield p + short + ".weight", permute_rope(w, hd) if rope else w
            if lin.bias is not None:
                yield p + short + ".bias", permute_rope(lin.bias, hd) if rope else lin.bias
        yield p + "ffn_norm.weight", layer.post_attention_layernorm.weight
        yield p + "ffn_gate.weight", m.gate_proj.weight
        yield p + "ffn_up.weight", m.up_proj.weight
        yield p + "ffn_down.weight", m.down_proj.weight
    yield "output_norm.weight", base.norm.weight
    if not getattr(model.config, "tie_word_embeddings", False):
        yield "output.weight", model.lm_head.weight


def write_hparams(writer: Any, config: Any, shapes: list[LayerShape], arch: str) -> None:
    """The architecture keys: per-layer arrays for ``deci``, scalars for ``llama``."""
    hd = head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(shapes))
    if arch == "deci":
        writer.add_feed_forward_length([s.channels for s in shapes])
        writer.add_head_count([s.heads for s in shapes])
        writer.add_head_count_kv([s.kv_heads for s in shapes])
    else:
        writer.add_feed_forward_length(shapes[0].channels)
        writer.add_head_count(shapes[0].heads)
        writer.add_head_count_kv(shapes[0].kv_heads)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def tokenizer_gguf_source(folder: Path | None, spec: str) -> Path | None:
    """The GGUF a model came from, if any: its tokenizer metadata is copied verbatim. Read from
    the spec itself (a bundled name or a .gguf) or the ``report.json`` of a pruned folder."""
    from llm_surgeon.models.load import BUNDLED, bundled_gguf

    source = spec
    if folder is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            source = json.loads((folder / "report.json").read_text())["settings"]["model"]
    if source in BUNDLED:
        return bundled_gguf(source)
    if isinstance(source, str) and source.endswith(".gguf") and Path(source).is_file():
        return Path(source)
    return None


def copy_tokenizer(writer: Any, source: Path) -> None:
    """Copy every ``tokenizer.*`` key of the GGUF ``source`` (same vocabulary) to ``writer``."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)


def write_tokenizer(writer: Any, tokenizer: Any, folder: Path | None, n_vocab: int) -> None:
    """Byte-level BPE metadata from a Hugging Face tokenizer (``tokenizer.json``), as llama.cpp's
    converter writes it for Llama BPE models: tokens by id (padded to the model's vocabulary
    with ``[PADi]``), their types (control for special added tokens, user-defined for other added
    tokens), the merges and the special token ids; pre-tokenizer ``default``."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= n_vocab:
        raise UserError(f"the tokenizer has ids beyond the model's {n_vocab} embeddings")
    added = {tok: t for tok, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if folder is not None and (folder / "tokenizer.json").is_file():
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer)


def write_gguf(model: Any, path: Path, out_type: str, tokenizer: Any = None,
               tokenizer_folder: Path | None = None, tokenizer_gguf: Path | None = None,
               name: str = "llm-surgeon export") -> str:
    """Write ``model`` as an f32 or f16 GGUF at ``path`` (overwritten); returns the
    architecture written. The shapes are validated first."""
    import gguf

    if out_type not in WRITTEN_TYPES:
        raise ValueError(f"write_gguf writes f32 or f16, not {out_type}")
    check_family(model.config)
    shapes = layer_shapes(model)
    validate_shapes(shapes)
    arch = architecture(shapes)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    write_hparams(writer, model.config, shapes, arch)
    ftype = gguf.LlamaFileType.ALL_F32 if out_type == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(ftype))
    if tokenizer_gguf is not None:
        copy_tokenizer(writer, tokenizer_gguf)
    elif tokenizer is not None:
        write_tokenizer(writer, tokenizer, tokenizer_folder, int(model.config.vocab_size))
    with torch.no_grad():
        for tname, t in gguf_tensors(model):
            arr = t.detach().float().cpu().numpy()
            if out_type == "f16" and arr.ndim == 2:
                arr = arr.astype(np.float16)
            writer.add_tensor(tname, np.ascontiguousarray(arr))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arch


def unaligned_tensors(model: Any, block: int) -> list[tuple[str, int]]:
    """2-D weights whose rows (input width, llama.cpp's ``ne0``) are not a multiple of a
    quantization ``block``: llama.cpp keeps those at a wider type (finally f16)."""
    return [(n, int(t.shape[1])) for n, t in gguf_tensors(model)
            if t.ndim == 2 and t.shape[1] % block]


@contextlib.contextmanager
def quiet_fd(fd: int) -> Iterator[None]:
    """Send the file descriptor ``fd`` (C-level output too) to /dev/null for the duration."""
    import sys

    sys.stderr.flush()
    saved = os.dup(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)


def quantize(src: Path, dst: Path, qtype: str, threads: int = 0) -> None:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp's own quantizer."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--type {qtype} needs llama.cpp's quantizer: pip install "
                        "'llm-surgeon[llamacpp]' (compiles llama.cpp: needs cmake and a C++ "
                        "compiler)") from None
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise UserError(f"this llama-cpp-python has no quantization type {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with quiet_fd(2):  # llama.cpp logs every tensor to stderr; the return code says enough
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                            llama_cpp.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize {src.name} to {qtype} (code {rc})")


def export_gguf(spec: str, out: str | Path, out_type: str = "f16") -> dict[str, Any]:
    """Load a model (a folder written by ``llm-surgeon prune``, the bundled default, ...) and
    write it to ``out`` as GGUF of ``out_type``; the file appears only when complete. Returns
    ``{"architecture", "type", "layers", "bytes", "unaligned"}``."""
    from llm_surgeon.models.load import load_model, resolve_model

    out_type = out_type.lower()
    if out_type not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the path of the .gguf file to write")
    kind, folder = resolve_model(spec)
    if kind == "bundled":
        from llm_surgeon.models.load import ensure_bundled_cache

        folder = ensure_bundled_cache(spec)
    model, tokenizer = load_model(spec, dtype="float32")
    check_family(model.config)
    validate_shapes(layer_shapes(model))
    unaligned: list[tuple[str, int]] = []
    if out_type in QUANT_BLOCK:
        block = QUANT_BLOCK[out_type]
        unaligned = unaligned_tensors(model, block)
        if unaligned:
            n, w = unaligned[0]
            log.warning("%d tensors (e.g. %s, rows of %d) are not a multiple of %d wide: "
                        "llama.cpp keeps them at a wider type (prune with --channel-multiple "
                        "%d to avoid this)", len(unaligned), n, w, block, block)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp_f32 = out.with_name(f".{out.name}.f32-{os.getpid()}")
    try:
        first = tmp if out_type in WRITTEN_TYPES else tmp_f32
        arch = write_gguf(model, first, out_type if out_type in WRITTEN_TYPES else "f32",
                          tokenizer=tokenizer, tokenizer_folder=folder,
                          tokenizer_gguf=tokenizer_gguf_source(folder, spec),
                          name=Path(spec).name)
        if out_type in QUANT_BLOCK:
            quantize(tmp_f32, tmp, out_type)
        os.replace(tmp, out)
    finally:
        for f in (tmp, tmp_f32):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    return {"architecture": arch, "type": out_type,
            "layers": [vars(s) for s in layer_shapes(model)], "bytes": out.stat().st_size,
            "unaligned": len(unaligned)}
