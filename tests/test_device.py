"""On an accelerator (skipped without one; run by bench/gpu_check.sh): the one driver in both
stores on the device gives the CPU run's pruned weights."""

from __future__ import annotations

import pytest
import torch

from llm_surgeon.driver import prune
from llm_surgeon.models.layouts import decoder_linears
from llm_surgeon.models.load import load_model
from tests.test_prune import _cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("method,structure,extra", [
    ("surgeon", "rows-columns", {}),
    ("surgeon", "unstructured", {}),
    ("surgeon", "heads-channels", {"nearest_kronecker": 1}),
    ("sparsegpt", "unstructured", {}),
    ("numerical", "heads-channels", {}),
])
@pytest.mark.parametrize("max_memory", [None, "64MB"])
def test_cuda_run_equals_cpu_run(tiny_model_dirs, sample_text_file, tmp_path, method, structure,
                                 extra, max_memory):
    kw = dict(method=method, structure=structure, sparsity=0.3, shots=2, eval_windows=2,
              **extra)
    ref = prune(_cfg(tiny_model_dirs["llama"], sample_text_file, **kw), progress=False)
    out = tmp_path / "cuda"
    rep = prune(_cfg(tiny_model_dirs["llama"], sample_text_file, device="cuda",
                     max_memory=max_memory, output=str(out),
                     offload_dir=str(tmp_path / "off"), **kw), progress=False)
    model, _ = load_model(str(out), with_tokenizer=False)
    want = {t.name: t.module.weight.detach() for t in decoder_linears(ref["_model"])}
    got = {t.name: t.module.weight.detach() for t in decoder_linears(model)}
    assert got.keys() == want.keys()
    for k in want:  # TF32 and other kernels: agreement to float32 round-off of a tiny model
        torch.testing.assert_close(got[k].cpu(), want[k], rtol=1e-3, atol=1e-4, msg=k)
    assert rep["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)
