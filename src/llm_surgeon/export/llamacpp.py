"""Run exported GGUF files in llama.cpp (through the ``llama-cpp-python`` extra): logits,
perplexity with our protocol, decode speed, and the weight bytes a decode step reads."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from llm_surgeon.errors import UserError

GGML_TYPE_F32 = 0


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UserError("this needs llama.cpp: pip install 'llm-surgeon[llamacpp]' (compiles "
                        "llama.cpp: needs cmake and a C++ compiler)") from None
    return llama_cpp


def open_gguf(path: str | Path, n_ctx: int = 512, threads: int | None = None,
              logits_all: bool = False, f32_cache: bool = False) -> Any:
    """A quiet ``llama_cpp.Llama`` on ``path`` (CPU); ``f32_cache``: keys and values in f32."""
    llama_cpp = _llama_cpp()
    kw: dict[str, Any] = {}
    if f32_cache:
        kw.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    threads = threads or os.cpu_count() or 1
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               n_threads=threads, n_threads_batch=threads,
                               logits_all=logits_all, verbose=False, n_gpu_layers=0, **kw)


def gguf_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), vocab) of one sequence, evaluated from an empty cache."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of −log softmax(logits[t−1])[ids[t]] over t = 1..L−1, and L−1 (our perplexity
    protocol: every token but a window's first is predicted), in float64."""
    z = logits[:-1].astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    target = z[np.arange(z.shape[0]), ids[1:]]
    return float((logz - target).sum()), int(z.shape[0])


def gguf_perplexity(path: str | Path, windows: np.ndarray, threads: int | None = None) -> float:
    """exp(mean NLL) of every window (one pass each, empty cache, f32 KV cache), the protocol
    of :mod:`llm_surgeon.evaluate.perplexity`."""
    windows = np.asarray(windows)
    llm = open_gguf(path, n_ctx=windows.shape[1], threads=threads, logits_all=True,
                    f32_cache=True)
    total, count = 0.0, 0
    try:
        for w in windows:
            nll, n = window_nll(gguf_logits(llm, w.tolist()), w)
            total += nll
            count += n
    finally:
        llm.close()
    return math.exp(total / count)


def decode_speed(path: str | Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Greedy decode tokens/s: the prompt is evaluated first (not timed), then ``new_tokens``
    steps of one token each (model evaluation + argmax), timed together."""
    llama_cpp = _llama_cpp()
    llm = open_gguf(path, n_ctx=len(prompt) + new_tokens + 8, threads=threads)
    try:
        n_vocab = llm.n_vocab()
        llm.eval(list(prompt))

        def last() -> int:
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

        tok = last()
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([tok])
            tok = last()
        return new_tokens / (time.perf_counter() - start)
    finally:
        llm.close()


def bytes_read_per_token(path: str | Path) -> int:
    """Weight bytes one decode step reads: every tensor of the decoder blocks, the final norm,
    the output head (the token embedding itself when tied) and one embedding row.

        B = Σ_blk bytes + bytes(output_norm) + bytes(output or token_embd) + bytes(token_embd)/V
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    emb = sizes["token_embd.weight"]
    vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    blocks = sum(v for k, v in sizes.items() if k.startswith("blk."))
    head = sizes.get("output.weight", emb)
    return blocks + sizes.get("output_norm.weight", 0) + head + emb // vocab


def paired_decode_speed(paths: list[str | Path], prompt: list[int], new_tokens: int,
                        threads: int) -> list[float]:
    """Decode tokens/s of several models measured step by step in turn, in one process: after
    each model has evaluated the prompt, every step runs one greedy decode step of each model in
    turn and times it; each model's figure is 1 / (median step time). Interleaving single steps
    exposes every model to the same load on a shared machine, and the median ignores the steps
    that a burst of other work slowed down."""
    llama_cpp = _llama_cpp()
    llms = [open_gguf(p, n_ctx=len(prompt) + new_tokens + 8, threads=threads) for p in paths]
    try:
        toks, times = [], [[] for _ in llms]
        for llm in llms:
            llm.eval(list(prompt))
            toks.append(_argmax_last(llama_cpp, llm))
        for _ in range(new_tokens):
            for i, llm in enumerate(llms):
                start = time.perf_counter()
                llm.eval([toks[i]])
                toks[i] = _argmax_last(llama_cpp, llm)
                times[i].append(time.perf_counter() - start)
        return [1.0 / float(np.median(t)) for t in times]
    finally:
        for llm in llms:
            llm.close()


def _argmax_last(llama_cpp: Any, llm: Any) -> int:
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))
