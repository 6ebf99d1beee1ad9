"""The heads-channels levers: --unit-coupling (a unit costed and updated by its consumer alone),
--unit-ranking (per parameter, raw cost, standardized) and --kind-allocation (one threshold
per kind), against their definitions and brute force."""

from __future__ import annotations

import statistics

import pytest
import torch

from llm_surgeon.config import PruneConfig, UnitOptions
from llm_surgeon.driver import prune
from llm_surgeon.errors import UserError
from llm_surgeon.methods.base import Curvature
from llm_surgeon.methods.registry import get_method
from llm_surgeon.methods.surgeon.costs import column_group_costs, row_group_costs
from llm_surgeon.methods.threshold import select_unit_masks, standardized_unit_keys
from llm_surgeon.models.layouts import decoder_linears
from llm_surgeon.models.units import unit_groups
from llm_surgeon.passes import PhaseTimer, Run, augmented_weight, global_shot
from llm_surgeon.stores import MemoryLayers
from llm_surgeon.structures import HeadsChannels
from tests.conftest import tiny_model
from tests.model_zoo import zoo_model


def _spd(n, gen):
    X = torch.randn(n, 2 * n, generator=gen)
    return X @ X.T / (2 * n) + 0.1 * torch.eye(n)


# ---- --unit-coupling --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_consumer_coupling_costs_a_unit_by_its_consumer_columns_alone(family):
    """With consumer coupling a unit's cost is the surgeon's column-group cost of its o / down
    columns (the other columns free to move); with layers coupling the producers' row-group
    costs come on top."""
    model = tiny_model(family)
    targets = decoder_linears(model)
    method = get_method("surgeon")
    gen = torch.Generator().manual_seed(0)
    curv, W = {}, {}
    for t in targets:
        W[t.name] = augmented_weight(t)
        out, inp = W[t.name].shape
        curv[t.name] = method.prepared(Curvature(A=_spd(inp, gen), G=_spd(out, gen)))
    structure = HeadsChannels()
    scores = {}
    for coupling in ("layers", "consumer"):
        state = structure.shot_state(model, targets, UnitOptions(coupling=coupling))
        small = {t.name: structure.costs(method, W[t.name], curv[t.name], t, state)
                 for t in targets}
        scores[coupling] = state.scores(small)
        if coupling == "consumer":  # the producers are not even costed
            assert all(small[p.target.name].units is None
                       for g in state.groups for p in g.parts if p.axis == "rows")
    groups = unit_groups(model, targets)
    assert {g.kind for g in groups} == {"heads", "channels"}
    for k, g in enumerate(groups):
        cons = next(p for p in g.parts if p.axis == "cols")
        c = curv[cons.target.name]
        idx = torch.arange(g.count * cons.width).view(g.count, cons.width)
        want = column_group_costs(W[cons.target.name], c.G, c.Ainv, idx)
        torch.testing.assert_close(scores["consumer"][k], want.double(), rtol=1e-6, atol=0)
        rows = sum(row_group_costs(W[p.target.name], curv[p.target.name].A,
                                   curv[p.target.name].Ginv, p.width).double()
                   for p in g.parts if p.axis == "rows")
        assert bool((rows > 0).all())
        torch.testing.assert_close(scores["layers"][k], want.double() + rows, rtol=1e-5,
                                   atol=0)


def _one_shot(model, coupling, sparsity, tmp_path, method="surgeon"):
    cfg = PruneConfig(model="", structure="heads-channels", method=method,
                      unit_coupling=coupling, channel_multiple=1)
    targets = decoder_linears(model)
    run = Run(model, MemoryLayers(model, "cpu"), targets, cfg, get_method(method, cfg),
              HeadsChannels(), tmp_path, PhaseTimer())
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    before = {t.name: augmented_weight(t) for t in targets}
    global_shot(run, sparsity, windows, 1)
    return before, unit_groups(model, targets)


@pytest.mark.parametrize("family", ["llama", "opt", "phi3"])
def test_consumer_coupling_updates_only_the_consumer(family, tmp_path):
    """One surgeon shot: with consumer coupling the kept rows of every q/k/v/gate/up (bias
    included; Phi-3's fused qkv and gate_up too) are bit-identical to before, the removed ones
    zero, and the o/down kept columns moved; with layers coupling the producers' kept rows move
    too."""
    moved_rows = {}
    for coupling in ("consumer", "layers"):
        model = zoo_model(family) if family == "phi3" else tiny_model(family)
        before, groups = _one_shot(model, coupling, 0.4, tmp_path / coupling)
        moved_rows[coupling] = False
        hit = 0
        for g in groups:
            gone = g.removed()
            if not bool(gone.any()):
                continue
            hit += 1
            for p in g.parts:
                now, old = augmented_weight(p.target), before[p.target.name]
                drop = p.indices(torch.nonzero(gone).reshape(-1))
                keep = torch.ones(now.shape[0 if p.axis == "rows" else 1], dtype=torch.bool)
                keep[drop] = False
                if p.axis == "rows":
                    assert bool((now[drop] == 0).all())
                    same = torch.equal(now[keep], old[keep])
                    if coupling == "consumer":
                        assert same, p.target.name
                    moved_rows[coupling] |= not same
                else:
                    assert bool((now[:, drop] == 0).all())
                    assert not torch.equal(now[:, keep], old[:, keep]), p.target.name
        assert hit > 0  # the shot removed units
    assert moved_rows["layers"] and not moved_rows["consumer"]


@pytest.mark.parametrize("family,method,curvature_pass", [("llama", "surgeon", "sweep"),
                                                          ("opt", "surgeon", "hooks"),
                                                          ("llama", "l-obd", "sweep")])
def test_consumer_coupling_collects_the_consumers_curvature_alone(
        tiny_model_dirs, sample_text_file, monkeypatch, family, method, curvature_pass):
    """With consumer coupling only o's and down's factors are collected, inverted and read (the
    producers are neither costed nor updated), and the pruned weights are exactly those of a
    run that also collects and inverts the producers' curvature (either K-FAC strategy;
    K-FAC and activations-only methods)."""
    seen: dict[str, set[int]] = {}

    def watch(name, **info):
        if name == "factors":
            seen.setdefault("counts", set()).add(len(info["tensors"]))

    kw = dict(method=method, unit_coupling="consumer", curvature_pass=curvature_pass)
    lean = prune(_cfg(tiny_model_dirs[family], sample_text_file, **kw), progress=False,
                 on_event=watch)
    # factors read per layer: the surgeon's (A, G) and, for its updates, (A, G, Ainv, Ginv);
    # L-OBD's A alone: o's and down's of each layer, nothing else
    most = 2 * (4 if method == "surgeon" else 1)
    assert max(seen["counts"]) <= most
    monkeypatch.setattr(HeadsChannels, "needs_curvature", lambda self, t, state: True)
    seen.clear()
    full = prune(_cfg(tiny_model_dirs[family], sample_text_file, **kw), progress=False,
                 on_event=watch)
    assert max(seen["counts"]) > most
    a = {t.name: t.module.weight for t in decoder_linears(lean["_model"])}
    b = {t.name: t.module.weight for t in decoder_linears(full["_model"])}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _cfg(model_dir, text, **kw) -> PruneConfig:
    base = dict(model=str(model_dir), calib_data=str(text), eval_data=str(text),
                calib_samples=4, seqlen=32, eval_windows=3, shots=2,
                structure="heads-channels", sparsity=0.3, eval=False)
    base.update(kw)
    return PruneConfig(**base)


@pytest.mark.parametrize("family,method", [("llama", "surgeon"), ("opt", "surgeon"),
                                           ("llama", "k-obd")])
def test_consumer_coupling_run_reaches_target_and_shrinks(tiny_model_dirs, sample_text_file,
                                                          family, method):
    report = prune(_cfg(tiny_model_dirs[family], sample_text_file, method=method,
                        unit_coupling="consumer", unit_ranking="standardized"), progress=False)
    assert report["settings"]["unit_coupling"] == "consumer"
    assert report["settings"]["unit_ranking"] == "standardized"
    shrink = report["shrink"]
    after = shrink["params_decoder_linear_after"]
    assert after < shrink["params_decoder_linear_before"]
    assert after == pytest.approx(shrink["params_decoder_linear_before"]
                                  * (1 - report["sparsity_achieved"]), abs=1)
    assert 0.3 - 0.1 <= report["sparsity_achieved"] <= 0.3


# ---- --unit-ranking ---------------------------------------------------------------------------

# two layers, each one group of 3 KV groups (100 parameters each) and 4 channels (10 each)
COSTS = [torch.tensor([10.0, 1.0, 50.0]), torch.tensor([0.5, 3.0, 0.05, 2.0]),
         torch.tensor([5.0, 20.0, 2.5]), torch.tensor([1.0, 0.2, 4.0, 0.7])]
SIZES = [100, 10, 100, 10]
KINDS = ["heads", "channels", "heads", "channels"]
LAYERS = [0, 0, 1, 1]


def _brute_force(ranking: str, budget: int) -> list[list[bool]]:
    """Every unit's key from its definition, sorted (ties: group, then index); taken in that
    order while it fits and its group keeps at least one unit."""
    keys = []
    for k, (c, size) in enumerate(zip(COSTS, SIZES, strict=True)):
        per = [float(x) / size for x in c]
        if ranking == "per-parameter":
            ks = per
        elif ranking == "cost":
            ks = [float(x) for x in c]
        else:
            mu, sd = statistics.fmean(per), statistics.pstdev(per)
            ks = [(x - mu) / sd for x in per]
        keys += [(key, k, i) for i, key in enumerate(ks)]
    chosen = [[False] * c.numel() for c in COSTS]
    left = [c.numel() for c in COSTS]
    for _, k, i in sorted(keys):
        if SIZES[k] <= budget and left[k] > 1:
            chosen[k][i] = True
            left[k] -= 1
            budget -= SIZES[k]
    return chosen


@pytest.mark.parametrize("ranking", ["per-parameter", "cost", "standardized"])
def test_unit_rankings_match_brute_force(ranking):
    for budget in (0, 10, 35, 100, 125, 240, 300, 10**4):
        got = select_unit_masks(COSTS, SIZES, KINDS, LAYERS, 10**5, budget / 10**5,
                                channel_multiple=1, ranking=ranking)
        assert [m.tolist() for m in got] == _brute_force(ranking, budget), budget


def test_the_rankings_really_differ():
    def pick(ranking, budget):
        return [m.tolist() for m in select_unit_masks(COSTS, SIZES, KINDS, LAYERS, 10**5,
                                                      budget / 10**5, channel_multiple=1,
                                                      ranking=ranking)]

    assert pick("per-parameter", 120) != pick("cost", 120)
    assert pick("per-parameter", 210) != pick("standardized", 210)
    assert pick("cost", 120) != pick("standardized", 120)


def test_standardized_takes_removed_units_first_and_blocks_by_mean_z():
    keys = standardized_unit_keys(torch.tensor([0.0, 5.0, 7.0, 6.0]), 2)
    assert keys[0] == float("-inf")
    # per parameter 2.5, 3.5, 3: mean 3, population std √(1/6)
    torch.testing.assert_close(keys[1:], torch.tensor([-0.5, 0.5, 0.0], dtype=torch.float64)
                               / (1 / 6) ** 0.5, rtol=1e-12, atol=0)
    # a removed (cost 0) unit goes first even when its group's others are expensive
    heads = torch.tensor([0.0, 100.0, 200.0])
    chans = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    m = select_unit_masks([heads, chans], [100, 10], ["heads", "channels"], [0, 0], 10**5,
                          100 / 10**5, channel_multiple=2, ranking="standardized")
    assert m[0].tolist() == [True, False, False] and not bool(m[1].any())
    # channel blocks of 2 are keyed by their units' mean z, comparable with a head's z
    z = standardized_unit_keys(chans, 10)
    m = select_unit_masks([torch.tensor([1.0, 2.0]), chans], [100, 10], ["heads", "channels"],
                          [0, 0], 10**5, 20 / 10**5, channel_multiple=2,
                          ranking="standardized")
    assert float(z[:2].mean()) < -1.0  # below the cheaper head's z (−1): a block goes first
    assert m[1].tolist() == [True, True, False, False, False, False]


# ---- --kind-allocation ------------------------------------------------------------------------


@pytest.mark.parametrize("multiple", [1, 4])
@pytest.mark.parametrize("ranking", ["per-parameter", "standardized"])
def test_proportional_kind_allocation_loses_the_target_of_each_kind(multiple, ranking):
    gen = torch.Generator().manual_seed(3)
    costs, sizes, kinds, layers = [], [], [], []
    for layer in range(4):
        costs += [torch.rand(6, generator=gen) * 50, torch.rand(32, generator=gen)]
        sizes += [120, 9]
        kinds += ["heads", "channels"]
        layers += [layer, layer]
    own = {kind: sum(s * c.numel() for s, c, kd in zip(sizes, costs, kinds, strict=True)
                     if kd == kind) for kind in ("heads", "channels")}
    unit = {"heads": 120, "channels": 9 * multiple}
    total = sum(own.values())
    far = False
    for target in (0.1, 0.25, 0.4, 0.6):
        for how in ("global", "proportional"):
            masks = select_unit_masks(costs, sizes, kinds, layers, total, target,
                                      channel_multiple=multiple, ranking=ranking,
                                      kind_allocation=how)
            for kind in ("heads", "channels"):
                gone = sum(int(m.sum()) * s for m, s, kd in zip(masks, sizes, kinds, strict=True)
                           if kd == kind)
                miss = target * own[kind] - gone
                if how == "proportional":
                    assert -1 < miss < unit[kind], (target, kind, gone)
                else:
                    far |= not -1 < miss < unit[kind]
    assert far  # one global threshold does not split the budget by kind


def test_proportional_run_removes_both_kinds(tiny_model_dirs, sample_text_file):
    """On the tiny Llama one global threshold takes only channels at 30%; proportional takes
    30% of the KV groups' parameters too (within one KV group) and of the channels'."""
    reps = {how: prune(_cfg(tiny_model_dirs["llama"], sample_text_file, method="surgeon",
                            kind_allocation=how, channel_multiple=1), progress=False)
            for how in ("global", "proportional")}
    rep = reps["proportional"]
    groups = unit_groups(tiny_model("llama"))
    own = {kind: sum(g.params_per_unit() * g.count for g in groups if g.kind == kind)
           for kind in ("heads", "channels")}
    size = {g.kind: g.params_per_unit() for g in groups}
    for kind, key in (("heads", "kv_groups_removed"), ("channels", "channels_removed")):
        gone = rep["shrink"][key] * size[kind]
        assert 0 <= 0.3 * own[kind] - gone < size[kind], kind
    assert reps["global"]["shrink"]["kv_groups_removed"] == 0
    assert rep["settings"]["kind_allocation"] == "proportional"


# ---- settings ---------------------------------------------------------------------------------


def test_unit_levers_defaults_and_bad_values():
    """Consumer coupling is the default (issue 16's ablation), the rankings and allocation as
    before; a bad value is a one-line error, and so is a lever away from its default outside
    heads-channels."""
    cfg = PruneConfig()
    assert (cfg.unit_coupling, cfg.unit_ranking, cfg.kind_allocation) == (
        "consumer", "per-parameter", "global")
    assert cfg.unit_options() == UnitOptions() and UnitOptions().changed() == []
    for key, flag in (("unit_coupling", "--unit-coupling"), ("unit_ranking", "--unit-ranking"),
                      ("kind_allocation", "--kind-allocation")):
        with pytest.raises(UserError, match=f"^{flag} must be one of"):
            PruneConfig(structure="heads-channels", **{key: "sideways"}).validate()
        with pytest.raises(UserError, match="must be a string"):
            PruneConfig(structure="heads-channels", **{key: 3}).validate()
    with pytest.raises(UserError, match="--unit-coupling applies to --structure heads-channels"):
        PruneConfig(structure="unstructured", unit_coupling="layers").validate()
    with pytest.raises(UserError, match="--unit-ranking, --kind-allocation apply to"):
        PruneConfig(structure="2:4", unit_ranking="cost",
                    kind_allocation="proportional").validate()
    PruneConfig(structure="heads-channels", unit_coupling="consumer", unit_ranking="cost",
                kind_allocation="proportional").validate()


def test_bench_yaml_takes_the_levers():
    from llm_surgeon.bench import expand_runs

    runs = expand_runs({"structure": "heads-channels", "runs": [
        {"method": "surgeon", "unit_coupling": "consumer", "name": "consumer"},
        {"method": "surgeon", "unit_ranking": "standardized", "kind_allocation": "proportional",
         "name": "z-prop"}]})
    assert [r["name"] for r in runs] == ["consumer", "z-prop"]
    with pytest.raises(UserError, match="--unit-ranking must be one of"):
        expand_runs({"runs": [{"method": "surgeon", "structure": "heads-channels",
                               "unit_ranking": "zscore"}]})
