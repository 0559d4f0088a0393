"""--mode=fit_prior and the fitted prior in eval / sample (Franzese et al., Sec. 3): a tiny trained
toy model at T = 0.2, a DPGMM fitted to p(x, T) concurrently with the train lock held, eval and
sample started from it, and the clear errors of a missing, mismatched or ill-sized prior."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import checkpoints
from conftest import tiny_config
from modes.evaluate import evaluate
from modes.fit_prior import fit_prior
from modes.sample import sample
from modes.train import train


def _config(kind: str = "dpgmm"):
  return tiny_config("toy_gmm_1d_diffusion_time", 30, sde=dict(T=0.2), optim=dict(warmup=5),
                     training=dict(batch_size=64, ref_batch_size=64, eval_batch_size=64),
                     prior=dict(kind=kind, n_fit_samples=2000, n_components=8, flow_steps=200),
                     eval=dict(num_likelihood_examples=200, num_samples=100, bound=False,
                               divergence="exact"),
                     sampling=dict(n_samples=100, batch_size=100))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("fit_prior") / "wd")
  train(_config("gaussian"), wd)
  return wd


def test_fit_concurrently_then_eval_and_sample(trained, tmp_path):
  """Fitting beside a running training (train lock held) writes only prior/; eval reports a lower
  cross-entropy at T for the DPGMM than for p_noise on the same x_T, and both modes start from it."""
  wd = str(tmp_path / "wd")
  shutil.copytree(trained, wd)
  ckpts = sorted(os.listdir(os.path.join(wd, checkpoints.DIR)))
  c = _config("dpgmm")
  with checkpoints.workdir_lock(wd, "train"):  # a training run holding the workdir
    rep = fit_prior(c, wd)
  assert sorted(os.listdir(os.path.join(wd, checkpoints.DIR))) == ckpts
  assert rep["cross_entropy"] < rep["gaussian_cross_entropy"] and rep["T"] == 0.2
  assert 1 <= rep["effective_components"] <= 8
  with open(os.path.join(wd, "prior", "report.json")) as f:
    assert json.load(f)["cross_entropy_unit"] == "nats/dim"
  report = evaluate(c, wd)
  assert report["prior_kind"] == "dpgmm"
  assert report["prior_cross_entropy"] < report["gaussian_cross_entropy"]
  assert np.isfinite(report["nll"]) and np.isfinite(report["elbo_elbo"])
  s = sample(c, wd)
  assert s["finite"]


def test_prior_errors_name_what_to_do(trained, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(trained, wd)
  c = _config("dpgmm")
  with pytest.raises(FileNotFoundError, match=r"run --mode=fit_prior"):
    sample(c, wd)
  fit_prior(c, wd)
  other_t = _config("dpgmm")
  other_t.sde.T = 0.4
  with pytest.raises(ValueError, match=r"sde.T=0.2.*fit_prior again"):
    sample(other_t, wd)
  flow = _config("flow")
  with pytest.raises(ValueError, match=r"kind='dpgmm'"):
    sample(flow, wd)
  too_many = _config("dpgmm")
  too_many.prior.n_fit_samples = 6  # 5 fitting samples for 8 components
  before = os.listdir(os.path.join(wd, "prior"))
  with pytest.raises(ValueError, match=r"prior\.n_components"):
    fit_prior(too_many, wd)
  assert os.listdir(os.path.join(wd, "prior")) == before
  bogus = _config("dpgmm")
  bogus.prior.kind = "vae"
  with pytest.raises(ValueError, match=r"prior\.kind"):
    fit_prior(bogus, wd)


def test_sequential_fit_pushes_data_through_the_ode(trained, tmp_path):
  """prior.fit='sequential' (Sec. 3.2) fits on the probability-flow push-forward of data through
  the trained model; without a checkpoint it fails at once naming what to run."""
  c = _config("dpgmm")
  c.prior.fit = "sequential"
  c.prior.n_fit_samples = 256
  c.eval.batch_size = 128
  c.eval.rtol = c.eval.atol = 1e-3
  with pytest.raises(FileNotFoundError, match=r"run --mode=train first"):
    fit_prior(c, str(tmp_path / "empty"))
  assert not os.path.exists(tmp_path / "empty")
  wd = str(tmp_path / "wd")
  shutil.copytree(trained, wd)
  rep = fit_prior(c, wd)
  assert rep["fit"] == "sequential" and rep["n_fit"] + rep["n_heldout"] == 256
  assert rep["cross_entropy"] < rep["gaussian_cross_entropy"]


def test_dpgmm_fit_reports_em_iterations(tmp_path, caplog):
  """--mode=fit_prior with prior.kind='dpgmm' shows EM iterations out of prior.max_iter (rate and
  ETA): the progress total is prior.max_iter, it advances after every chunk and ends at the fit's
  n_iter (here unconverged: all 12 iterations)."""
  import logging
  c = _config("dpgmm")
  c.prior.n_fit_samples, c.prior.max_iter = 200, 12
  with caplog.at_level(logging.INFO, logger="absl"):
    rep = fit_prior(c, str(tmp_path / "wd"))
  assert rep["n_iter"] == 12 and not rep["converged"]
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit prior (dpgmm")]
  assert "started (12 EM iterations)" in lines[0], lines
  assert any("12/12 EM iterations (100%), ETA 0 s" in m for m in lines), lines
  assert "done after 12 EM iterations" in lines[-1], lines
