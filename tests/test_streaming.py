"""--max-memory: decoder layers streamed from disk give the same pruned model as in memory."""

from __future__ import annotations

import json

import pytest
import torch

from llm_surgeon.driver import prune, strip_private
from llm_surgeon.errors import UserError
from llm_surgeon.methods import threshold
from llm_surgeon.models.layouts import decoder_linears
from llm_surgeon.models.load import load_model
from llm_surgeon.models.offload import parse_memory
from tests.test_prune import _cfg

# values that legitimately differ between two runs of the same job in different stores
_FREE = {"time_s", "peak_rss_mb", "prune_time_s", "output", "max_memory", "offload_dir",
         "store", "threads"}


def assert_same_report(a, b, path="report"):
    """Same keys recursively, same list lengths; equal values (floats to 1e-4) except
    timings, memory and paths."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, sorted(a), sorted(b))
        for k in a:
            if k in _FREE:
                assert type(a[k]) is type(b[k]) or a[k] is None or b[k] is None, path + "." + k
                if isinstance(a[k], dict):
                    assert a[k].keys() == b[k].keys(), path + "." + k
                continue
            assert_same_report(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_report(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-9), path
    else:
        assert a == b, (path, a, b)


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
              eval_windows=2, fisher=fisher, eval_every_shot=True)
    ref = prune(_cfg(tiny_model_dirs[family], sample_text_file, **kw), progress=False)
    out = tmp_path / "streamed"
    rep = prune(_cfg(tiny_model_dirs[family], sample_text_file, output=str(out),
                     max_memory="64MB", offload_dir=str(tmp_path / "offload"), **kw),
                progress=False)
    assert rep["store"]["decoder_layers"] == 2
    assert (rep["store"]["kind"], ref["store"]["kind"]) == ("disk", "memory")
    # the whole report: the same keys at every level, the same shot entries (phases included,
    # ppl after every shot once each), the same values except timings, memory and paths
    saved = json.loads((out / "report.json").read_text())
    assert_same_report(saved, json.loads(json.dumps(strip_private(ref))))
    n_shots = 1 if method in ("sparsegpt", "wanda", "numerical") else shots
    assert [s["shot"] for s in saved["shots"]] == list(range(1, n_shots + 1))
    assert all("phases" in s and "ppl" in s for s in saved["shots"])
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
    n_elig = sum(int((c != float("inf")).sum()) for c in costs)
    # the last two: a bracket reaching the +inf keys, and every eligible key (N:M's last shot)
    for n in [int(frac * total) for frac in (0.1, 0.35, 0.6, 0.97)] + [n_elig - 3, n_elig]:
        want = threshold.global_masks(costs, n)
        sel = threshold.streamed_global_masks(lambda i: costs[i], n_layers, n)
        got = [sel.mask(i, costs[i]) for i in range(n_layers)]
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert sum(int(m.sum()) for m in got) == min(n, sum(int((c != float("inf")).sum())
                                                             for c in costs))


def test_streamed_threshold_near_every_eligible_key_holds_few_candidates(monkeypatch):
    """At an N:M target (half of every layer's keys +inf), the k-th smallest key near the
    top of the eligible ones is found among a few candidates, not among every +inf key; and
    taking every eligible key needs no search at all."""
    monkeypatch.setattr(threshold, "_EXACT_BELOW", 100)
    monkeypatch.setattr(threshold, "_SAMPLE", 65536)
    gen = torch.Generator().manual_seed(1)
    costs = [threshold.nm_eligible_costs(torch.rand(256, 256, generator=gen), 2, 4)
             for _ in range(6)]
    total = sum(c.numel() for c in costs)
    n_elig = sum(int((c != float("inf")).sum()) for c in costs)
    assert n_elig == total // 2
    seen: list[int] = []
    real = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda x, k: seen.append(x.numel()) or real(x, k))
    for n in (n_elig - 40, n_elig):
        seen.clear()
        want = threshold.global_masks(costs, n)
        seen.clear()
        sel = threshold.streamed_global_masks(lambda i: costs[i], len(costs), n)
        for i, c in enumerate(costs):
            assert torch.equal(sel.mask(i, c), want[i])
        if n == n_elig:
            assert seen == []
        else:
            assert seen and max(seen) < total // 8, seen


def test_budget_too_small_is_refused(tiny_model_dirs, sample_text_file, tmp_path):
    cfg = _cfg(tiny_model_dirs["llama"], sample_text_file, max_memory="10kB",
               offload_dir=str(tmp_path / "off"), output=str(tmp_path / "out"))
    with pytest.raises(UserError, match="below what one streamed layer needs"):
        prune(cfg, progress=False)
    assert not (tmp_path / "out").exists()
    assert not any((tmp_path / "off").iterdir())


def test_unsupported_combinations_are_refused(tiny_model_dirs, sample_text_file):
    cfg = _cfg(tiny_model_dirs["llama"], sample_text_file, max_memory="1GB",
               lowrank_rank=2, lowrank_steps=3)
    with pytest.raises(UserError, match="does not support the low-rank correction"):
        prune(cfg, progress=False)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_nearest_kronecker_streams(tiny_model_dirs, sample_text_file, tmp_path, fisher):
    """--nearest-kronecker under --max-memory: the power iterations run per layer in the
    backward sweep, the same pruned weights as in memory."""
    kw = dict(method="surgeon", structure="rows-columns", sparsity=0.3, shots=2,
              nearest_kronecker=3, eval=False, fisher=fisher)
    ref = prune(_cfg(tiny_model_dirs["opt"], sample_text_file, **kw), progress=False)
    plain = prune(_cfg(tiny_model_dirs["opt"], sample_text_file,
                       **{**kw, "nearest_kronecker": 0}), progress=False)
    out = tmp_path / "nkp"
    prune(_cfg(tiny_model_dirs["opt"], sample_text_file, output=str(out), max_memory="64MB",
               offload_dir=str(tmp_path / "off"), **kw), progress=False)
    model, _ = load_model(str(out), with_tokenizer=False)
    got, want = _weights(model), _weights(ref["_model"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    # and the estimate is really used: K-FAC alone prunes differently
    other = _weights(plain["_model"])
    assert any(not torch.equal(other[k], want[k]) for k in want)


def test_layer_nearest_kronecker_equals_whole_model_estimate():
    """Per-layer power iterations from the layer's own recomputed passes (what the driver
    runs) against :func:`nearest_kronecker` over whole-model passes: the same factors
    (empirical Fisher, so both see the same per-window gradients)."""
    from llm_surgeon.curvature.kfac import (
        collect_kfac,
        nearest_kronecker,
        nearest_kronecker_layer,
        next_token_loss,
    )
    from llm_surgeon.models.layouts import decoder_layers
    from tests.conftest import tiny_model

    model = tiny_model("opt").double()
    for p in model.parameters():
        p.requires_grad_(False)
    windows = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(1))
    targets = decoder_linears(model)
    init = collect_kfac(model, targets, windows, dtype=torch.float64, progress=False)
    want = nearest_kronecker(model, targets, windows, init, iters=3, dtype=torch.float64,
                             progress=False)
    layer = decoder_layers(model)[1]
    mine = [t for t in targets if t.layer_index == 1]
    seen = []  # (input, output gradient) of layer 1, batches of 2 windows
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(
        [a[0].detach(), None, (o[0] if isinstance(o, tuple) else o)]))
    for s in (0, 2):
        batch = windows[s:s + 2]
        x = model.get_input_embeddings()(batch)
        x.requires_grad_(True)
        logits = model(inputs_embeds=x, use_cache=False).logits
        out = seen[-1][2]
        out.retain_grad()
        next_token_loss(logits, batch, "empirical").backward()
        seen[-1][1] = out.grad.detach()
    handle.remove()

    def recompute():
        with torch.enable_grad():
            for h, g, _ in seen:
                x = h.clone().requires_grad_(True)
                out = layer(x, attention_mask=None)
                (out[0] if isinstance(out, tuple) else out).backward(g)
                yield None

    got = nearest_kronecker_layer(layer, mine, {t.name: (init[t.name].A, init[t.name].G)
                                                for t in mine}, 3, 4, recompute,
                                  dtype=torch.float64)
    for t in mine:
        torch.testing.assert_close(got[t.name][0], want[t.name].A, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got[t.name][1], want[t.name].G, rtol=1e-6, atol=1e-9)


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
    import signal
    import subprocess

    from llm_surgeon.checkpoint import has_checkpoint
    from llm_surgeon.driver import resume
    from tests import kill_run

    kw = dict(method="surgeon", structure="unstructured", sparsity=0.4, shots=3, eval=False,
              fisher="sampled")
    ref = prune(_cfg(tiny_model_dirs["llama"], sample_text_file, **kw), progress=False)
    out = tmp_path / "killed"
    cmd, env, cwd = kill_run.command(_cfg(
        tiny_model_dirs["llama"], sample_text_file, max_memory="64MB",
        offload_dir=str(tmp_path / "off"), output=str(out), **kw), 2, "update")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert has_checkpoint(out) and not (out / "report.json").exists()
    assert len(list((out / "checkpoint" / "layers").glob("*.safetensors"))) == 2
    report = resume(out, progress=False)
    assert len(report["shots"]) == 3 and not has_checkpoint(out)
    model, _ = load_model(str(out), with_tokenizer=False)
    got, want = _weights(model), _weights(ref["_model"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
