"""Several processes (jax.distributed, a coordinator on 127.0.0.1, one CPU device each) against
one process with two devices: ``main.py`` trains a tiny digits U-Net 20 steps and evaluates it.

The two runs see the same global batches (each process draws its half, datasets.ArrayIterator),
all-reduce the same two half-batch gradients and gather the same per-example likelihoods, so the
losses, the parameters and the bits/dim agree: to 1e-6 relative (a two-term sum is exact in any
order; XLA may still compile the two programs' fusions differently).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

import run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    "model.nf": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (8,),
    "training.n_iters": 20, "training.batch_size": 8, "training.eval_batch_size": 8,
    "training.log_freq": 10, "training.eval_freq": 20, "training.snapshot_freq": 20,
    "training.snapshot_freq_for_preemption": 20,
    # 45 test images: two global batches of 16 and a padded one of 13, split over the processes
    "eval.split": "test[:45]", "eval.batch_size": 16, "eval.divergence": "hutchinson", "eval.rtol": 1e-3, "eval.atol": 1e-3,
    "eval.bound_time_samples": 4, "eval.num_samples": 8, "eval.num_likelihood_examples": 64,
    "sampling.batch_size": 8, "sampling.method": "pc", "sampling.c": 1.0, "sampling.n_steps": 10,
}


def _flags() -> list[str]:
  return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
          for k, v in OVERRIDES.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(mode: str, workdir: str, n_proc: int, devices_per_proc: int) -> list:
  """Starts ``main.py --mode`` as ``n_proc`` processes of ``devices_per_proc`` CPU devices each."""
  suite_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       os.environ.get("XLA_FLAGS", ""))  # the rest (conftest's -O0) carries over
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"{suite_flags} --xla_force_host_platform_device_count={devices_per_proc}").strip())
  base = [sys.executable, os.path.join(REPO, "main.py"),
          f"--config={os.path.join(REPO, 'configs', 'digits_vp.py')}", f"--workdir={workdir}",
          f"--mode={mode}"] + _flags()
  port = _free_port()
  multi = (lambda i: [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n_proc}",
                      f"--process_id={i}"]) if n_proc > 1 else (lambda i: [])
  return [(f"{mode}, process {i} of {n_proc}", subprocess.Popen(
      base + multi(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
      for i in range(n_proc)]


def _wait(procs: list) -> None:
  outs = [(name, p, p.communicate(timeout=900)[0]) for name, p in procs]
  for name, p, out in outs:
    assert p.returncode == 0, f"{name} failed:\n{out[-4000:]}"


def _params(workdir: str):
  import importlib
  import jax
  config = importlib.import_module("configs.digits_vp").get_config()
  for k, v in OVERRIDES.items():
    section, field = k.split(".")
    config[section][field] = v
  return jax.tree.leaves(run_lib.load_score_model(config, workdir).params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  one, two = str(root / "one_process"), str(root / "two_processes")
  for mode in ("train", "eval"):  # both runs at once (compiles are mostly single-threaded)
    _wait(_start(mode, one, 1, 2) + _start(mode, two, 2, 1))
  return one, two


def test_two_processes_train_like_one_process_with_two_devices(runs):
  one, two = runs
  losses = [dict(run_lib.read_loss_curves(wd)[0]) for wd in runs]
  assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, 21))
  np.testing.assert_allclose([losses[1][s] for s in range(1, 21)],
                             [losses[0][s] for s in range(1, 21)], rtol=1e-6)
  for a, b in zip(_params(one), _params(two)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  # Only process 0 wrote: one lock holder, one config, one loss file per workdir.
  assert os.path.exists(os.path.join(two, run_lib.CONFIG_FILE))


def test_two_processes_evaluate_like_one_process(runs):
  reports = []
  for wd in runs:
    with open(os.path.join(wd, "eval", "report.json")) as f:
      reports.append(json.load(f))
  a, b = reports
  assert a["bpd_n_examples"] == b["bpd_n_examples"] == 45  # the whole split, each image once
  for key in ("bpd", "bound_bpd", "sampling_nfe"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(b["likelihood_nfe_per_example"], a["likelihood_nfe_per_example"])
  s = [np.load(os.path.join(wd, "eval", "samples.npz"))["samples"] for wd in runs]
  np.testing.assert_allclose(s[1], s[0], rtol=1e-5, atol=1e-5)


FIT_OVERRIDES = {  # tiny fits: what is checked is where they run and what they write
    "dequantizer.n_iters": 4, "dequantizer.batch_size": 8, "dequantizer.bound_time_samples": 2,
    "dequantizer.flow_hidden": 8, "dequantizer.flow_steps": 2, "dequantizer.save_freq": 2,
    "prior.kind": "flow", "prior.flow_steps": 4, "prior.flow_batch_size": 16,
    "prior.n_fit_samples": 200, "prior.flow_hidden": 8, "prior.flow_layers": 2,
}


@pytest.mark.slow
def test_two_processes_fit_prior_and_dequantizer_like_one_process(runs, tmp_path, monkeypatch):
  """--mode=fit_dequantizer and --mode=fit_prior (flow) on the trained model: two processes
  write one fit (process 0 the meta; the arrays once) with the same checksums as the
  one-process fit, and evaluate with it (eval.dequantization='variational'). Slow (four more
  multi-process launches, ~3 CPU-minutes): -m slow."""
  import shutil
  monkeypatch.setattr(sys.modules[__name__], "OVERRIDES", {**OVERRIDES, **FIT_OVERRIDES})
  wds = [str(tmp_path / "one"), str(tmp_path / "two")]
  for wd in wds:
    shutil.copytree(runs[0], wd, ignore=shutil.ignore_patterns("eval", ".lock-*"))
  for mode in ("fit_prior", "fit_dequantizer"):  # the dequantizer fit uses the fitted prior
    _wait(_start(mode, wds[0], 1, 2) + _start(mode, wds[1], 2, 1))
  import checkpoints
  for folder in ("dequantizer", "prior"):
    metas = [checkpoints.read_tree_meta(os.path.join(wd, folder)) for wd in wds]
    assert metas[0]["checksums"] == metas[1]["checksums"], folder
  monkeypatch.setattr(sys.modules[__name__], "OVERRIDES",
                      {**OVERRIDES, **FIT_OVERRIDES, "eval.dequantization": "variational"})
  _wait(_start("eval", wds[1], 2, 1))
  with open(os.path.join(wds[1], "eval", "report.json")) as f:
    report = json.load(f)
  assert report["dequantization"] == "variational" and np.isfinite(report["bound_bpd"])
