"""torch.distributed (gloo, 2 processes launched by torchrun) against one process: the same
curvature factors and the same pruned model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llm_surgeon.curvature.kfac import collect_kfac
from llm_surgeon.driver import prune
from llm_surgeon.models.layouts import decoder_linears
from llm_surgeon.models.load import load_model
from tests.test_prune import _cfg

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed unavailable")

WORKER = """
import sys, torch
from safetensors.torch import save_file
from llm_surgeon import distributed
from llm_surgeon.curvature.kfac import collect_kfac
from llm_surgeon.models.layouts import decoder_linears
from llm_surgeon.models.load import load_model
distributed.init_from_env()
model, _ = load_model(sys.argv[1])
windows = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(0))
f = collect_kfac(model, decoder_linears(model), windows, progress=False)
if distributed.is_main():
    out = {}
    for k, v in f.items():
        out[k + ".A"], out[k + ".G"] = v.A.contiguous(), v.G.contiguous()
    save_file(out, sys.argv[2])
"""


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_gloo_curvature_equals_one_process(tiny_model_dirs, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "factors.safetensors"
    _torchrun([str(script), str(tiny_model_dirs["llama"]), str(out)], tmp_path)
    dist_f = load_file(str(out))
    model, _ = load_model(str(tiny_model_dirs["llama"]))
    windows = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(0))
    single = collect_kfac(model, decoder_linears(model), windows, progress=False)
    for name, f in single.items():  # 5 windows: ranks hold 3 and 2, uneven on purpose
        torch.testing.assert_close(dist_f[name + ".A"], f.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dist_f[name + ".G"], f.G, rtol=1e-5, atol=1e-6)


def test_gloo_prune_equals_one_process(tiny_model_dirs, sample_text_file, tmp_path):
    """Rows and columns: closed-form updates, so equal factors give equal weights to round-off
    (unstructured removal solves its KKT system iteratively, to a relative loss gap of 1e-3, so
    there the two runs agree to the solver's tolerance, not to 1e-5)."""
    common = dict(method="surgeon", structure="rows-columns", sparsity=0.3, shots=2,
                  eval_windows=3)
    ref = prune(_cfg(tiny_model_dirs["llama"], sample_text_file,
                     output=str(tmp_path / "single"), **common), progress=False)
    args = ["-m", "llm_surgeon", "-q", "prune", "--model", str(tiny_model_dirs["llama"]),
            "--calib-data", str(sample_text_file), "--eval-data", str(sample_text_file),
            "--calib-samples", "4", "--seqlen", "32", "--eval-windows", "3",
            "--method", "surgeon", "--structure", "rows-columns", "--sparsity", "0.3",
            "--shots", "2", "--output", str(tmp_path / "dist")]
    _torchrun(args, tmp_path)
    a = load_file(str(tmp_path / "dist" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert report["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert report["ppl_dense"] == pytest.approx(ref["ppl_dense"], rel=1e-5)
    assert report["sparsity_achieved"] == pytest.approx(ref["sparsity_achieved"], abs=1e-6)


@pytest.mark.parametrize("method,structure", [("surgeon", "rows-columns"),
                                              ("sparsegpt", "unstructured")])
def test_gloo_streamed_prune_equals_one_process(tiny_model_dirs, sample_text_file, tmp_path,
                                                method, structure):
    """torchrun with --max-memory: each rank streams its own copy of the layers over its share
    of the windows; factors and Grams are all-reduced per layer, rank 0 writes. The same pruned
    weights and perplexity as one process."""
    common = dict(method=method, structure=structure, sparsity=0.3, shots=2, eval_windows=3,
                  max_memory="64MB", offload_dir=str(tmp_path / "off-single"))
    ref = prune(_cfg(tiny_model_dirs["llama"], sample_text_file,
                     output=str(tmp_path / "single"), **common), progress=False)
    args = ["-m", "llm_surgeon", "-q", "prune", "--model", str(tiny_model_dirs["llama"]),
            "--calib-data", str(sample_text_file), "--eval-data", str(sample_text_file),
            "--calib-samples", "4", "--seqlen", "32", "--eval-windows", "3",
            "--method", method, "--structure", structure, "--sparsity", "0.3",
            "--shots", "2", "--max-memory", "64MB", "--offload-dir", str(tmp_path / "off"),
            "--output", str(tmp_path / "dist")]
    _torchrun(args, tmp_path)
    a, _ = load_model(str(tmp_path / "dist"), with_tokenizer=False)
    b = ref["_model"] or load_model(str(tmp_path / "single"), with_tokenizer=False)[0]
    wa, wb = a.state_dict(), b.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert report["store"]["kind"] == "disk"
    assert report["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert report["sparsity_achieved"] == pytest.approx(ref["sparsity_achieved"], abs=1e-6)
    assert report["sparsity_achieved"] > 0.2
    assert not any((tmp_path / "off").iterdir())  # neither rank left its layers behind
