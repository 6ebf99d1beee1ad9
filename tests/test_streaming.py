"""--max-memory: decoder layers streamed from disk give the same pruned model as in memory."""

from __future__ import annotations

import json

import pytest
import torch

from llm_surgeon.errors import UserError
from llm_surgeon.methods import threshold
from llm_surgeon.models.layouts import decoder_linears
from llm_surgeon.models.load import load_model
from llm_surgeon.models.offload import parse_memory
from llm_surgeon.run import prune
from tests.test_prune import _cfg


def _weights(model):
    out = {}
    for t in decoder_linears(model):
        out[t.name + ".weight"] = t.module.weight.detach().clone()
        if t.module.bias is not None:
            out[t.name + ".bias"] = t.module.bias.detach().clone()
    return out


CASES = [
    ("llama", "surgeon", "unstructured", 0.5, 2),
    ("opt", "surgeon", "unstructured", 0.5, "2,sampled"),  # labels drawn from the model
    ("phi", "surgeon", "rows-columns", 0.2, 2),
    ("llama", "surgeon", "rows-columns", 0.3, 2),
    ("llama", "surgeon", "2:4", None, 2),
    ("llama", "k-obd", "unstructured", 0.5, 1),
    ("opt", "l-obd", "unstructured", 0.4, 1),
    ("llama", "magnitude", "unstructured", 0.5, 1),
    ("llama", "sparsegpt", "unstructured", 0.5, 1),
    ("phi", "wanda", "2:4", None, 1),
    # coupled units, physically removed layer by layer at the end
    ("llama", "surgeon", "heads-channels", 0.3, 2),
    ("opt", "k-obd", "heads-channels", 0.3, 1),
    ("llama", "numerical", "heads-channels", 0.3, 1),
]


@pytest.mark.parametrize("family,method,structure,sparsity,shots", CASES)
def test_streamed_equals_in_memory(tiny_model_dirs, sample_text_file, tmp_path, family, method,
                                   structure, sparsity, shots):
    fisher = "empirical"
    if isinstance(shots, str):
        shots, fisher = int(shots.split(",")[0]), shots.split(",")[1]
    kw = dict(method=method, structure=structure, sparsity=sparsity, shots=shots,
              eval_windows=2, fisher=fisher)
    ref = prune(_cfg(tiny_model_dirs[family], sample_text_file, **kw), progress=False)
    out = tmp_path / "streamed"
    rep = prune(_cfg(tiny_model_dirs[family], sample_text_file, output=str(out),
                     max_memory="64MB", offload_dir=str(tmp_path / "offload"), **kw),
                progress=False)
    assert rep["streamed"]["decoder_layers"] == 2
    # the saved checkpoint is sharded (one shard per layer + the rest) and loads as usual
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    model, _ = load_model(str(out), with_tokenizer=False)
    got, want = _weights(model), _weights(ref["_model"])
    assert got.keys() == want.keys()
    for name in want:  # same shapes too: heads-channels shrank both the same way
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    if structure == "heads-channels":
        assert rep["shrink"] == ref["shrink"]
        assert rep["shrink"]["params_decoder_linear_after"] < \
            rep["shrink"]["params_decoder_linear_before"]
    assert rep["sparsity_achieved"] == pytest.approx(ref["sparsity_achieved"], abs=1e-9)
    assert rep["sparsity_achieved"] > 0.1
    assert rep["ppl_dense"] == pytest.approx(ref["ppl_dense"], rel=1e-5)
    assert rep["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    assert [x["name"] for x in rep["layers"]] == [x["name"] for x in ref["layers"]]
    # nothing of the run is left in the offload folder
    assert not any((tmp_path / "offload").iterdir())


@pytest.mark.parametrize("n_layers,bracket", [(5, False), (7, True)])
def test_streamed_global_masks_equal_in_memory_selection(monkeypatch, n_layers, bracket):
    if bracket:  # exercise the sample-and-bracket path of the k-th smallest key
        monkeypatch.setattr(threshold, "_EXACT_BELOW", 100)
        monkeypatch.setattr(threshold, "_SAMPLE", 256)
    gen = torch.Generator().manual_seed(0)
    costs = []
    for i in range(n_layers):
        c = torch.rand(20 + i, 16, generator=gen)
        c[torch.rand(c.shape, generator=gen) < 0.2] = 0.0  # many ties (removed earlier)
        c[torch.rand(c.shape, generator=gen) < 0.1] = 0.5  # ties at a level
        c[torch.rand(c.shape, generator=gen) < 0.05] = float("inf")  # never removed
        costs.append(c)
    total = sum(c.numel() for c in costs)
    for frac in (0.1, 0.35, 0.6, 0.97):
        n = int(frac * total)
        want = threshold.global_masks(costs, n)
        sel = threshold.streamed_global_masks(lambda i: costs[i], n_layers, n)
        got = [sel.mask(i, costs[i]) for i in range(n_layers)]
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert sum(int(m.sum()) for m in got) == min(n, sum(int((c != float("inf")).sum())
                                                             for c in costs))


def test_budget_too_small_is_refused(tiny_model_dirs, sample_text_file, tmp_path):
    cfg = _cfg(tiny_model_dirs["llama"], sample_text_file, max_memory="10kB",
               offload_dir=str(tmp_path / "off"), output=str(tmp_path / "out"))
    with pytest.raises(UserError, match="below what one streamed layer needs"):
        prune(cfg, progress=False)
    assert not (tmp_path / "out").exists()
    assert not any((tmp_path / "off").iterdir())


def test_unsupported_combinations_are_refused(tiny_model_dirs, sample_text_file):
    cfg = _cfg(tiny_model_dirs["llama"], sample_text_file, max_memory="1GB",
               nearest_kronecker=1)
    with pytest.raises(UserError, match="not supported with --nearest-kronecker"):
        prune(cfg, progress=False)


@pytest.mark.parametrize("text,n", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20),
                                    ("1.5G", 1_500_000_000), ("300m", 300 * 10**6),
                                    ("4096", 4096), ("64 kB", 64_000)])
def test_parse_memory(text, n):
    assert parse_memory(text) == n


@pytest.mark.parametrize("text", ["", "two GB", "-1GB", "0", "5XB"])
def test_parse_memory_rejects(text):
    with pytest.raises(UserError, match="--max-memory"):
        parse_memory(text)


def test_streamed_run_killed_mid_shot_resumes_to_the_same_weights(tiny_model_dirs,
                                                                   sample_text_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from llm_surgeon.checkpoint import has_checkpoint
    from llm_surgeon.run import resume

    kw = dict(method="surgeon", structure="unstructured", sparsity=0.4, shots=3, eval=False,
              fisher="sampled")
    ref = prune(_cfg(tiny_model_dirs["llama"], sample_text_file, **kw), progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llm_surgeon", "-q", "prune", "--model",
           str(tiny_model_dirs["llama"]), "--calib-data", str(sample_text_file), "--eval-data",
           str(sample_text_file), "--calib-samples", "4", "--seqlen", "32", "--method",
           "surgeon", "--structure", "unstructured", "--sparsity", "0.4", "--shots", "3",
           "--no-eval", "--fisher", "sampled", "--max-memory", "64MB", "--offload-dir",
           str(tmp_path / "off"), "--output", str(out)]
    env = {**os.environ, "LLM_SURGEON_KILL_AT": "2:update", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert has_checkpoint(out) and not (out / "report.json").exists()
    assert len(list((out / "checkpoint" / "layers").glob("*.safetensors"))) == 2
    report = resume(out, progress=False)
    assert len(report["shots"]) == 3 and not has_checkpoint(out)
    model, _ = load_model(str(out), with_tokenizer=False)
    got, want = _weights(model), _weights(ref["_model"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
