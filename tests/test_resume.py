"""Checkpoints after every shot; a run killed with SIGKILL mid-shot resumes to the same result."""

from __future__ import annotations

import signal
import subprocess

import pytest
import torch

from llm_surgeon.checkpoint import has_checkpoint
from llm_surgeon.driver import prune, resume
from llm_surgeon.errors import UserError
from llm_surgeon.models.layouts import decoder_linears
from tests import kill_run
from tests.test_prune import _cfg


def _weights(model):
    return {t.name: t.module.weight.detach().clone() for t in decoder_linears(model)}


@pytest.mark.parametrize("kill_at,structure", [("2:update", "unstructured"),
                                               ("3:start", "heads-channels")])
def test_sigkill_mid_shot_then_resume_matches_uninterrupted(
    tiny_model_dirs, sample_text_file, tmp_path, kill_at, structure
):
    kw = dict(method="surgeon", structure=structure, sparsity=0.4, shots=3, eval=False,
              fisher="sampled")  # sampled labels: the RNG state must survive the kill too
    ref = prune(_cfg(tiny_model_dirs["llama"], sample_text_file, output=str(tmp_path / "ref"),
                     **kw), progress=False)
    out = tmp_path / "killed"
    point = kill_at.split(":")
    cmd, env, cwd = kill_run.command(_cfg(tiny_model_dirs["llama"], sample_text_file,
                                          output=str(out), **kw), int(point[0]), point[1])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert has_checkpoint(out)
    assert not (out / "report.json").exists() and not list(out.glob("*.safetensors"))
    with pytest.raises(UserError, match="--resume"):  # a new run would clobber it
        prune(_cfg(tiny_model_dirs["llama"], sample_text_file, output=str(out), **kw),
              progress=False)
    report = resume(out, progress=False)
    assert len(report["shots"]) == 3 and not has_checkpoint(out)
    assert (out / "report.json").is_file()
    got, want = _weights(report["_model"]), _weights(ref["_model"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        resume(tmp_path)
