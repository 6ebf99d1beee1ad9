"""A new method and a new structure plug in from this file alone: registered here, run by the
unchanged driver (through ``llm_surgeon.prune_model`` and through the command line)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import llm_surgeon
from llm_surgeon.cli import main
from llm_surgeon.methods.base import GlobalMethod, LayerwiseMethod
from llm_surgeon.methods.registry import register_method
from llm_surgeon.models.layouts import decoder_linears
from llm_surgeon.settings import Settings, setting
from llm_surgeon.structures import Structure, register_structure
from tests.conftest import SAMPLE_TEXT, tiny_model


@register_structure
class EvenColumns(Structure):
    """Toy structure: only weights in even input columns may go (never a bias column); its
    finishing step checks that and reports how many linears it checked."""

    name = "even-columns"
    syntax = "even-columns"
    shots_seen: ClassVar[list[int]] = []

    def shot_state(self, model, targets):  # the two-argument form a plug-in may keep
        self.shots_seen.append(len(targets))
        return None

    def eligible(self, costs, t):
        out = costs.clone()
        out[:, 1::2] = float("inf")
        out[:, t.module.in_features:] = float("inf")
        return out

    def finish(self, run, counts):
        for t in run.targets:
            assert bool((t.module.weight.detach()[:, 1::2] != 0).all())
        return {"even_columns_checked": len(run.targets)}


@dataclass(frozen=True)
class ScaledSettings(Settings):
    """Toy settings: a power of the activation norm."""

    power: float = setting(1.0, "toy: power of ‖X_j‖ in the cost", bounds=(0.0, 4.0))


@register_method
class ActivationScaled(GlobalMethod):
    """Toy global method: cost W_ij² · (A_jj)^power from one forward sweep; zeroing only."""

    name = "toy-scaled"
    curvature = "activations"
    structures = ("unstructured", "even-columns")
    Settings = ScaledSettings
    seen_powers: ClassVar[list[float]] = []

    def element_costs(self, W, curv):
        self.seen_powers.append(self.settings.power)
        return W.square() * torch.diagonal(curv.A).to(W.dtype).clamp_min(0) ** self.settings.power

    def apply(self, W, curv, removal):
        return W.masked_fill(removal.mask, 0)


@register_method
class RowHalves(LayerwiseMethod):
    """Toy layer-wise method: in every row the smallest |W_ij|·H_jj go (or N:M of them)."""

    name = "toy-rows"
    structures = ("unstructured", "nm")

    def prune_linear(self, W, H, sparsity, nm=None):
        score = W.abs() * torch.diagonal(H)[None, :]
        if nm is not None:
            n, m = nm
            groups = score.reshape(W.shape[0], -1, m)
            drop = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                2, groups.argsort(dim=2)[..., : m - n], True)
            return W.masked_fill(drop.reshape(W.shape), 0)
        k = int(sparsity * W.shape[1])
        drop = torch.zeros_like(W, dtype=torch.bool).scatter_(1, score.argsort(1)[:, :k], True)
        return W.masked_fill(drop, 0)


def test_toy_method_and_toy_structure_prune_a_tiny_model(tiny_tok):
    model = tiny_model("llama")
    before = {t.name: t.module.weight.detach().clone() for t in decoder_linears(model)}
    ActivationScaled.seen_powers.clear()
    EvenColumns.shots_seen.clear()
    result = llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="toy-scaled",
                                     structure="even-columns", sparsity=0.3, shots=2,
                                     calib_samples=4, seqlen=32, power=0.5)
    assert result.report["structure"] == "even-columns"
    assert result.report["even_columns_checked"] == len(decoder_linears(model))  # finish ran
    assert set(ActivationScaled.seen_powers) == {0.5}  # its own settings reached it
    assert result.report["settings"]["power"] == 0.5  # and are recorded with the run's
    assert len(result.report["shots"]) == 2
    assert EvenColumns.shots_seen == [len(decoder_linears(model))] * 2  # its shot_state ran
    z = n = 0
    for t in decoder_linears(model):
        w = t.module.weight.detach()
        assert bool((w[:, 1::2] != 0).all())  # odd columns untouched
        assert torch.equal(w[:, 1::2], before[t.name][:, 1::2])
        z += int((w == 0).sum())
        n += w.numel() + (t.module.bias.numel() if t.has_bias else 0)
    assert z / n == pytest.approx(0.3, abs=1e-3)  # all of it from even columns
    assert result.sparsity == pytest.approx(z / n)


def test_toy_method_runs_from_the_command_line(tiny_model_dirs, sample_text_file, tmp_path):
    out = tmp_path / "toy"
    code = main(["-q", "prune", "--model", str(tiny_model_dirs["opt"]), "--method", "toy-scaled",
                 "--structure", "even-columns", "--sparsity", "0.2", "--shots", "1",
                 "--calib-data", str(sample_text_file), "--calib-samples", "4",
                 "--seqlen", "32", "--no-eval", "--output", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "toy-scaled" and report["even_columns_checked"] > 0
    assert report["sparsity_achieved"] == pytest.approx(0.2, abs=1e-3)


def test_toy_layerwise_method_with_nm(tiny_tok):
    model = tiny_model("opt")
    result = llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="toy-rows",
                                     structure="2:4", calib_samples=4, seqlen=32)
    assert result.report["sparsity_target"] == 0.5
    for t in decoder_linears(model):
        w = t.module.weight.detach()
        nonzero = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert bool((nonzero <= 2).all())
    with pytest.raises(llm_surgeon.UserError, match="does not support --structure"):
        llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="toy-rows",
                                structure="even-columns")


def test_toy_settings_are_checked_like_the_built_ins(tiny_tok):
    model = tiny_model("llama")
    with pytest.raises(llm_surgeon.UserError, match=r"--power must be in \[0.0, 4.0\]"):
        llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="toy-scaled", power=9.0)
    with pytest.raises(llm_surgeon.UserError, match="unknown setting 'mu'"):
        llm_surgeon.prune_model(model, tiny_tok, SAMPLE_TEXT, method="toy-scaled", mu=1.0)


def test_registering_a_non_method_is_refused():
    with pytest.raises(TypeError):
        register_method(object)  # type: ignore[arg-type]
