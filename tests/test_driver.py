"""The one driver: one layer's factors at a time, one evaluation per point, one validation,
the plain-pass yardstick in every store, and a package without import cycles."""

from __future__ import annotations

import ast
import weakref
from pathlib import Path

import pytest

import llm_surgeon.driver as driver
from llm_surgeon.config import PruneConfig
from llm_surgeon.driver import prune
from tests.test_prune import _cfg


class LiveFactors:
    """Watches the factor tensors the driver reports (``on_event("factors", ...)``) with weak
    references and records the largest number of decoder layers whose factors were alive at
    once."""

    def __init__(self) -> None:
        self.alive: dict[int, int] = {}
        self.layers_seen: set[int] = set()
        self.max_layers = 0

    def _gone(self, layer: int) -> None:
        self.alive[layer] -= 1
        if not self.alive[layer]:
            del self.alive[layer]

    def __call__(self, name: str, **info) -> None:
        if name != "factors":
            return
        layer = info["layer"]
        self.layers_seen.add(layer)
        for t in info["tensors"]:
            self.alive[layer] = self.alive.get(layer, 0) + 1
            weakref.finalize(t, self._gone, layer)
        self.max_layers = max(self.max_layers, len(self.alive))


@pytest.mark.parametrize("method,structure,extra", [
    ("surgeon", "unstructured", {}),
    ("surgeon", "rows-columns", {"nearest_kronecker": 2}),
    ("l-obd", "unstructured", {}),
    ("numerical", "heads-channels", {}),
])
def test_in_memory_run_holds_one_layers_factors_at_a_time(tiny_model_dirs, sample_text_file,
                                                          method, structure, extra):
    watch = LiveFactors()
    cfg = _cfg(tiny_model_dirs["llama"], sample_text_file, method=method, structure=structure,
               sparsity=0.3, eval=False, **extra)
    rep = prune(cfg, progress=False, on_event=watch)
    assert rep["store"]["kind"] == "memory" and rep["store"]["decoder_layers"] == 2
    assert watch.layers_seen == {0, 1}  # every layer's factors were made and watched
    assert watch.max_layers == 1
    assert not watch.alive  # and none outlive the run


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(driver, name)

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(driver, name, counted)
    return calls


@pytest.mark.parametrize("max_memory", [None, "64MB"])
@pytest.mark.parametrize("method,shots,evals", [("sparsegpt", 5, 2), ("surgeon", 3, 4)])
def test_eval_every_shot_evaluates_each_point_once(tiny_model_dirs, sample_text_file, tmp_path,
                                                   monkeypatch, max_memory, method, shots,
                                                   evals):
    """Dense, after every shot but the last, and the final model: a one-pass method (one shot
    whatever --shots says) is evaluated twice, not three times; the same in both stores."""
    calls = _count_calls(monkeypatch, "perplexity")
    rep = prune(_cfg(tiny_model_dirs["llama"], sample_text_file, method=method, shots=shots,
                     sparsity=0.4, eval_every_shot=True, eval_windows=2, max_memory=max_memory,
                     offload_dir=str(tmp_path / "off")), progress=False)
    assert len(calls) == evals
    assert all("ppl" in s and "phases" in s for s in rep["shots"])
    assert rep["shots"][-1]["ppl"] == rep["ppl"]


@pytest.mark.parametrize("max_memory", [None, "64MB"])
def test_validation_runs_once_and_plain_pass_is_timed(tiny_model_dirs, sample_text_file,
                                                      tmp_path, monkeypatch, max_memory):
    seen = []
    real = PruneConfig.validate

    def validate(self):
        seen.append(self)
        return real(self)

    monkeypatch.setattr(PruneConfig, "validate", validate)
    rep = prune(_cfg(tiny_model_dirs["llama"], sample_text_file, shots=1, eval=False,
                     time_plain_pass=True, max_memory=max_memory,
                     offload_dir=str(tmp_path / "off")), progress=False)
    assert len(seen) == 1
    assert rep["plain_fwd_bwd_s"] > 0 and rep["shot_cost_ratio"] > 0
    assert rep["shot_time_s"] == pytest.approx(sum(
        rep["shots"][0]["phases"][k]["time_s"]
        for k in ("curvature", "costs", "threshold", "update")))


def test_package_has_no_import_cycle():
    """Every ``llm_surgeon`` import (module level or inside functions) forms a graph without
    cycles."""
    root = Path(driver.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        name = ".".join(("llm_surgeon", *f.relative_to(root).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d not in (name, "llm_surgeon")}
    assert graph["llm_surgeon.driver"]  # the parse found imports
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in sorted(graph[u]):
            assert state.get(v) != 1, "import cycle: " + " -> ".join([*path, u, v])
            if v not in state:
                visit(v, [*path, u])
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("structure,fisher", [("unstructured", "empirical"),
                                              ("rows-columns", "sampled"),
                                              ("heads-channels", "empirical")])
def test_hooks_and_sweep_curvature_prune_alike(tiny_model_dirs, sample_text_file, structure,
                                               fisher):
    """The two curvature strategies write the same per-layer factors: the same pruned
    weights (the sweep holds one layer's factors at a time, the hooks all of them)."""
    import torch

    from llm_surgeon.models.layouts import decoder_linears

    kw = dict(method="surgeon", structure=structure, sparsity=0.4, shots=2, eval=False,
              fisher=fisher)
    watch = LiveFactors()
    hooks = prune(_cfg(tiny_model_dirs["opt"], sample_text_file, curvature_pass="hooks", **kw),
                  progress=False, on_event=watch)
    sweep = prune(_cfg(tiny_model_dirs["opt"], sample_text_file, curvature_pass="sweep", **kw),
                  progress=False)
    assert watch.layers_seen == {0, 1}
    assert watch.max_layers == 1  # the sums of every layer, but their means one layer at a time
    a = {t.name: t.module.weight for t in decoder_linears(hooks["_model"])}
    b = {t.name: t.module.weight for t in decoder_linears(sweep["_model"])}
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_hooks_curvature_needs_every_layer_in_memory(tiny_model_dirs, sample_text_file):
    from llm_surgeon.errors import UserError

    with pytest.raises(UserError, match="--curvature-pass hooks needs every layer"):
        prune(_cfg(tiny_model_dirs["llama"], sample_text_file, curvature_pass="hooks",
                   max_memory="1GB"), progress=False)
