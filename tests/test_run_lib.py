"""Tests of the train / eval / sample modes, run_lib.validate_config and main.py: exact resume,
NaN stop, config errors.

Tiny configs (MLP 16x16, batch 16, tens of steps) on the 4 simulated devices of conftest.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import checkpoints
import run_lib
from modes.evaluate import evaluate
from modes.sample import sample
from modes.train import train
from conftest import tiny_config as _tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(n_iters: int = 40, dataset: str = "gmm_2d"):
  """These tests' toy run: conftest's tiny MLP, batch 16, checkpoints every 20 steps (preemption
  snapshots every 10, 2 kept)."""
  return _tiny_config("default_toy", data=dict(dataset=dataset), optim=dict(warmup=5),
                      training=dict(n_iters=n_iters, batch_size=16, ref_batch_size=16,
                                    eval_batch_size=32, log_freq=10, eval_freq=20, snapshot_freq=20,
                                    snapshot_freq_for_preemption=10, max_to_keep=2))


def checkpoint_steps(workdir: str) -> set[int]:
  d = os.path.join(workdir, checkpoints.DIR)
  return {int(s) for s in os.listdir(d) if s.isdigit()} if os.path.isdir(d) else set()


def loss_file(workdir: str) -> dict[int, float]:
  return dict(run_lib._read_rows(os.path.join(workdir, run_lib.LOSS_FILE), 10**9))


def snapshot(path: str) -> dict[str, float]:
  """Every file under ``path`` with its mtime (to check a workdir was not modified)."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      out[p] = os.stat(p).st_mtime_ns
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One 40-step run: the reference for the resume tests."""
  wd = str(tmp_path_factory.mktemp("ref") / "wd")
  out = train(tiny_config(40), wd)
  return wd, out


def test_uninterrupted_run_outputs(uninterrupted):
  wd, out = uninterrupted
  assert out["step"] == 40 and out["start_step"] == 0
  assert sorted(out["losses"]) == list(range(1, 41))
  assert all(np.isfinite(v) for v in out["losses"].values())
  assert loss_file(wd) == out["losses"]
  assert sorted(out["eval"]) == [20, 40]
  # kept: every 20 steps (max_to_keep=2) and the latest (40); the preemption one of 30 rotated out.
  assert checkpoint_steps(wd) == {20, 40}
  assert os.path.getsize(os.path.join(wd, "loss_curve.png")) > 1000
  assert os.listdir(os.path.join(wd, "tensorboard"))
  with open(os.path.join(wd, run_lib.CONFIG_FILE)) as f:
    assert json.load(f)["training"]["batch_size"] == 16
  # Training reduces the loss (the first 10 vs the last 10 steps).
  losses = np.array([out["losses"][s] for s in range(1, 41)])
  assert losses[-10:].mean() < losses[:10].mean()
  # The restored state equals the one the run ended with (params, EMA, optimizer state, RNG).
  before = snapshot(wd)
  with run_lib.open_checkpoints(tiny_config(40), wd, read_only=True) as store:
    restored, step = store.restore(out["state"])  # read-only: workdir unchanged
  assert step == 40 and snapshot(wd) == before
  for a, b in zip(jax.tree.leaves(checkpoints._to_saveable(restored)),
                  jax.tree.leaves(checkpoints._to_saveable(out["state"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_continues_stream_exactly(uninterrupted, tmp_path):
  """Train 25 steps (final checkpoint 25), then resume to 40: steps 26..40 equal the reference
  bit for bit, and the loss file holds the same 40 values."""
  ref_wd, ref = uninterrupted
  wd = str(tmp_path / "wd")
  first = train(tiny_config(25), wd)
  np.testing.assert_array_equal([first["losses"][s] for s in range(1, 26)],
                                [ref["losses"][s] for s in range(1, 26)])
  second = train(tiny_config(40), wd)  # n_iters may change on resume
  assert second["start_step"] == 25 and sorted(second["losses"]) == list(range(26, 41))
  np.testing.assert_array_equal([second["losses"][s] for s in range(26, 41)],
                                [ref["losses"][s] for s in range(26, 41)])
  np.testing.assert_array_equal([second["eval"][40]], [ref["eval"][40]])
  assert loss_file(wd) == loss_file(ref_wd)


def test_resume_after_crash(uninterrupted, tmp_path, monkeypatch):
  """A crash at step 18 (no clean exit) leaves the latest checkpoint of step 10; the restart
  recomputes 11.. and matches the reference exactly."""
  _, ref = uninterrupted
  wd = str(tmp_path / "wd")
  real = run_lib.data_stream_batch

  def crashing(sample, step):
    if step == 17:  # the batch of step 18
      raise KeyboardInterrupt("simulated kill")
    return real(sample, step)

  monkeypatch.setattr(run_lib, "data_stream_batch", crashing)
  with pytest.raises(KeyboardInterrupt):
    train(tiny_config(40), wd)
  assert max(checkpoint_steps(wd)) == 10
  with open(os.path.join(wd, run_lib.LOSS_FILE), "a") as f:
    f.write("12,0.5\n13,0.2")  # rows past the checkpoint, the last one cut by the kill
  monkeypatch.setattr(run_lib, "data_stream_batch", real)
  out = train(tiny_config(40), wd)
  assert out["start_step"] == 10
  np.testing.assert_array_equal([out["losses"][s] for s in range(11, 41)],
                                [ref["losses"][s] for s in range(11, 41)])
  assert loss_file(wd) == ref["losses"]


def test_sigterm_checkpoints_stops_and_resumes_exactly(uninterrupted, tmp_path, monkeypatch):
  """A SIGTERM while step ~15's batch is prepared (no checkpoint due) checkpoints the step reached
  and returns cleanly; the rerun resumes from it and matches the reference bit for bit."""
  _, ref = uninterrupted
  wd = str(tmp_path / "wd")
  real = run_lib.data_stream_batch

  def terminated(sample, step):
    if step == 14:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(sample, step)

  monkeypatch.setattr(run_lib, "data_stream_batch", terminated)
  out = train(tiny_config(40), wd)
  stopped = out["step"]
  assert 10 < stopped < 20 and max(checkpoint_steps(wd)) == stopped
  assert sorted(loss_file(wd)) == list(range(1, stopped + 1))
  monkeypatch.setattr(run_lib, "data_stream_batch", real)
  out = train(tiny_config(40), wd)
  assert out["start_step"] == stopped and out["step"] == 40
  assert loss_file(wd) == ref["losses"]


def test_resume_refuses_incompatible_config(uninterrupted):
  wd, _ = uninterrupted
  before = snapshot(wd)
  c = tiny_config(40)
  c.optim.lr = 1e-3
  with pytest.raises(ValueError, match=r"optim\.lr"):
    train(c, wd)
  c = tiny_config(40)
  c.model.widths = (16, 32)
  with pytest.raises(ValueError, match=r"model\.widths"):
    train(c, wd)
  assert snapshot(wd) == before


def test_nan_loss_stops_without_checkpoint(tmp_path, monkeypatch):
  """NaN data injected into the batch of step 20 -> FloatingPointError naming step 20; the last
  checkpoint is step 10 (latest and periodic checkpoints were due at step 20: none is written)."""
  wd = str(tmp_path / "wd")
  real = run_lib.data_stream_batch

  def poisoned(sample, step):
    x = real(sample, step)
    return x.at[3, 0].set(np.nan) if step == 19 else x

  monkeypatch.setattr(run_lib, "data_stream_batch", poisoned)
  with pytest.raises(FloatingPointError, match=r"non-finite loss at step 20\b"):
    train(tiny_config(40), wd)
  assert checkpoint_steps(wd) == {10}
  assert max(loss_file(wd)) == 10


def test_absurd_lr_stops(tmp_path):
  wd = str(tmp_path / "wd")
  c = tiny_config(40)
  c.optim.lr = 1e30
  c.optim.warmup = 0
  c.optim.grad_clip = 0.0
  with pytest.raises(FloatingPointError,
                     match=r"non-finite loss at step (\d+)|refusing to save step (\d+)") as e:
    train(c, wd)
  bad = int(re.search(r"step (\d+)", str(e.value)).group(1))
  assert all(s < bad for s in checkpoint_steps(wd))
  # Every checkpoint that exists holds finite parameters.
  if checkpoint_steps(wd):
    with run_lib.open_checkpoints(c, wd, read_only=True) as store:
      state, _ = store.restore(_fresh_state(c))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def _fresh_state(config):
  import training
  from models import get_model
  from models.utils import init_model
  model = get_model(config)
  params = init_model(model, jax.random.PRNGKey(0), (1, 2))
  optimizer = training.make_optimizer(run_lib.validate_config(config).optim)
  return training.init_train_state(params, optimizer, jax.random.PRNGKey(1))


def _set(config, field, value):
  section, name = field.split(".")
  config[section][name] = value


@pytest.mark.parametrize("field,value,match", [
    ("sde.eps", 1.0, r"sde\.T must exceed sde\.eps"),
    ("sde.T", 1e-6, r"sde\.T must exceed sde\.eps"),
    ("sde.name", "cosine", r"sde\.name"),
    ("sampling.c", -0.5, r"sampling\.c"),
    ("model.name", "resnet9000", r"model\.name.*resnet9000"),
    ("data.dataset", "imagenet_toy", r"data\.dataset.*imagenet_toy"),
    ("training.ref_batch_size", 8, r"training\.ref_batch_size"),
    ("training.weighting", "uniform", r"training\.weighting"),
    ("model.parameterization", "x0", r"model\.parameterization"),
    ("optim.lr", -1.0, r"optim\.lr"),
])
def test_invalid_config_fails_before_workdir(tmp_path, field, value, match):
  c = tiny_config(10)
  _set(c, field, value)
  with pytest.raises(ValueError, match=match):
    run_lib.validate_config(c)
  wd = str(tmp_path / "new_wd")
  with pytest.raises(ValueError, match=match):
    train(c, wd)
  assert not os.path.exists(wd)


def test_main_subprocess(tmp_path):
  """main.py with --config overrides trains and writes the workdir; an invalid override exits
  non-zero naming the field and creates nothing."""
  wd = str(tmp_path / "wd")
  base = [sys.executable, os.path.join(REPO, "main.py"),
          f"--config={os.path.join(REPO, 'configs', 'toy_gmm_1d.py')}", f"--workdir={wd}"]
  small = ["--config.training.n_iters=12", "--config.training.batch_size=16",
           "--config.training.ref_batch_size=16", "--config.training.log_freq=4",
           "--config.training.eval_freq=12", "--config.training.eval_batch_size=16",
           "--config.model.embedding=sinusoidal"]
  env = dict(os.environ, PYTHONPATH=REPO)
  bad = subprocess.run(base + small + ["--config.sde.eps=5.0"], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=300)
  assert bad.returncode != 0 and "sde.eps" in bad.stderr
  unknown = subprocess.run(base + small + ["--config.training.nonexistent=1"], capture_output=True,
                           text=True, env=env, cwd=str(tmp_path), timeout=300)
  assert unknown.returncode != 0 and "training.nonexistent: unknown config field" in unknown.stderr
  assert not os.path.exists(wd)
  ok = subprocess.run(base + small + ["--mode=train"], capture_output=True, text=True, env=env,
                      cwd=str(tmp_path), timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert sorted(loss_file(wd)) == list(range(1, 13))
  with open(os.path.join(wd, run_lib.CONFIG_FILE)) as f:
    saved = json.load(f)
  assert saved["training"]["n_iters"] == 12 and saved["model"]["embedding"] == "sinusoidal"
  assert 12 in checkpoint_steps(wd)


# main.py with orbax's meta write of step 8 failing as a full disk does (injected here, in the test
# process's driver; the code under test has no hook for it).
_DISK_FULL_DRIVER = """
import errno, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
real = jch.JsonCheckpointHandler._save_fn
async def save_fn(self, item, directory):
  if item.get("step") == 8:
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))
  return await real(self, item, directory)
jch.JsonCheckpointHandler._save_fn = save_fn
import main
from absl import app
main._check_config_args(sys.argv[1:])
app.run(main.main, argv=["main.py"] + sys.argv[1:])
"""


@pytest.mark.slow  # a main.py subprocess and a resumed run: about 30 s on an idle core
def test_main_disk_full_is_one_line_then_resumes(tmp_path):
  """main.py whose save of step 8 hits a full disk (checkpoints every 4 steps) exits with status 1
  and one error line naming step 8, the directory and the intact step 4, with no traceback or
  orbax error record on stderr; step 4 is untouched and a rerun resumes from it to the end."""
  wd = str(tmp_path / "wd")
  overrides = {"training.n_iters": 12, "training.batch_size": 16, "training.ref_batch_size": 16,
               "training.log_freq": 4, "training.eval_freq": 12, "training.eval_batch_size": 16,
               "training.snapshot_freq": 12, "training.snapshot_freq_for_preemption": 4}
  argv = [f"--config={os.path.join(REPO, 'configs', 'toy_gmm_1d.py')}", f"--workdir={wd}",
          "--mode=train"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  run = subprocess.run([sys.executable, "-c", _DISK_FULL_DRIVER] + argv, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, timeout=300)
  directory = os.path.join(wd, checkpoints.DIR)
  assert run.returncode == 1, run.stderr[-3000:]
  errors = [line for line in run.stderr.splitlines()
            if line.startswith(("error:", "Traceback")) or re.match(r"E\d{4} ", line)]
  assert errors == [errors[0]] and errors[0].startswith(
      f"error: disk full: saving checkpoint step 8 to {directory} failed (No space left on "
      "device;"), run.stderr[-3000:]
  assert f"newest intact checkpoint is step 4 ({os.path.join(directory, '4')}), untouched" in errors[0]
  assert checkpoint_steps(wd) == {4}
  from configs.toy_gmm_1d import get_config
  config = get_config()
  for k, v in overrides.items():
    section, field = k.split(".")
    config[section][field] = v
  out = train(config, wd)
  assert out["start_step"] == 4 and out["step"] == 12


TOY_CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                     if f.startswith("toy_") and f.endswith(".py"))


def _load_config(fname: str):
  import importlib
  return importlib.import_module(f"configs.{fname[:-3]}").get_config()


def test_toy_configs_valid():
  """Every toy config validates, builds its model and names a toy distribution; the required
  variants exist (one per distribution, an STF one and a likelihood_is one)."""
  import toy_data
  from models import get_model
  configs = {f: _load_config(f) for f in TOY_CONFIGS}
  assert {c.data.dataset for c in configs.values()} == set(toy_data.TOY_DISTRIBUTIONS)
  assert any(c.training.target == "stf" for c in configs.values())
  assert any(c.training.weighting == "likelihood_is" for c in configs.values())
  for f, c in configs.items():
    run_lib.validate_config(c)
    get_model(c)
    assert run_lib.train_batch_rows(c) == (c.training.ref_batch_size if c.training.target == "stf"
                                           else c.training.batch_size), f
  stf = configs["toy_two_gaussians_64d_stf.py"]
  assert run_lib.train_batch_rows(stf) == 1024 > stf.training.batch_size
  sr = configs["toy_swiss_roll.py"]  # Cao et al., Appendix H.2
  assert (sr.sde.beta_min, sr.sde.beta_max, sr.sde.T, sr.training.batch_size) == (0.1, 20.0, 1.0, 400)
  assert tuple(sr.model.widths) == (50, 50) and sr.model.activation == "relu"


def test_data_stream_is_pure_function_of_step():
  c = tiny_config(10)
  sample = run_lib.get_data_sampler(c)
  key = jax.random.PRNGKey(3)
  a = run_lib.data_stream_batch(sample, 7)
  np.testing.assert_array_equal(a, run_lib.data_stream_batch(sample, 7))
  assert not np.array_equal(a, run_lib.data_stream_batch(sample, 8))
  # Image data: batch `step` is an exact seek into the shuffled epoch stream (any call order).
  d = _load_config("digits_vp.py")
  d.training.batch_size = d.training.ref_batch_size = 100  # 1,293 train rows: batches straddle epochs
  stream = run_lib.get_data_sampler(d)
  b7, b8, b20 = (run_lib.data_stream_batch(stream, s) for s in (7, 8, 20))
  fresh = run_lib.get_data_sampler(d)
  np.testing.assert_array_equal(run_lib.data_stream_batch(fresh, 20), b20)
  np.testing.assert_array_equal(run_lib.data_stream_batch(fresh, 7), b7)
  np.testing.assert_array_equal(run_lib.data_stream_batch(fresh, 8), b8)
  assert b7.shape == (100, 8, 8, 1) and not np.array_equal(b7, b8)


def test_eval_and_sample_modes_on_toy(uninterrupted, tmp_path):
  """--mode=eval / --mode=sample on a trained toy run: JSON reports, PNG and npz next to them, the
  workdir's checkpoints untouched; the ODE NLL of the (briefly trained) model is finite and above
  the exact NLL of p_eps minus a small slack (a model cannot beat the true density on average)."""
  import shutil
  wd = str(tmp_path / "wd")
  shutil.copytree(uninterrupted[0], wd)
  before = {k: v for k, v in snapshot(wd).items() if "checkpoints" in k}
  c = tiny_config(40)
  c.eval.num_samples = 200
  c.eval.num_likelihood_examples = 200
  c.eval.bound_time_samples = 16
  c.eval.divergence = "exact"
  c.sampling.method = "sde"
  c.sampling.c = 1.0
  c.sampling.n_steps = 100
  c.sampling.batch_size = 100
  c.sampling.n_samples = 100
  c.sampling.denoise = True
  report = evaluate(c, wd)
  for k in ("nll", "nll_bound", "nll_exact_p_eps", "likelihood_nfe", "sampling_nfe", "hist_kl"):
    assert np.isfinite(report[k]), k
  assert report["sampling_nfe"] == 100 + 1  # Euler-Maruyama steps + the Tweedie denoising step
  assert report["nll"] > report["nll_exact_p_eps"] - 0.05
  with open(os.path.join(wd, "eval", "report.json")) as f:
    assert json.load(f)["step"] == 40
  assert os.path.getsize(os.path.join(wd, "eval", "samples.png")) > 1000
  s = sample(c, wd)
  assert s["n_samples"] == 100 and s["finite"] and s["nfe"] == 101
  assert np.load(os.path.join(wd, "samples", "samples.npz"))["samples"].shape == (100, 2)
  assert {k: v for k, v in snapshot(wd).items() if "checkpoints" in k} == before
  with pytest.raises(FileNotFoundError, match="run --mode=train first"):
    evaluate(c, str(tmp_path / "empty"))


def test_one_writer_per_workdir(uninterrupted, tmp_path):
  """A second training on a workdir whose 'train' lock is held is refused at start, naming the
  holder's PID and host; the workdir is left as it was."""
  import shutil
  import socket
  wd = str(tmp_path / "wd")
  shutil.copytree(uninterrupted[0], wd)
  before = snapshot(wd)
  with checkpoints.workdir_lock(wd, "train"):
    with pytest.raises(RuntimeError, match=rf"{os.getpid()}.*{socket.gethostname()}|"
                                           rf"{socket.gethostname()}.*{os.getpid()}"):
      train(tiny_config(60), wd)
  after = snapshot(wd)
  assert {k: v for k, v in after.items() if ".lock" not in k} == \
      {k: v for k, v in before.items() if ".lock" not in k}


def test_eval_counts_failed_solves(uninterrupted, tmp_path):
  """A likelihood solve that reaches eval.max_steps is counted (with its example index), never
  averaged into NaN; more failures than eval.max_failed_fraction fail the eval after the report
  is written."""
  import shutil
  wd = str(tmp_path / "wd")
  shutil.copytree(uninterrupted[0], wd)
  c = tiny_config(40)
  c.eval.num_samples = c.sampling.n_samples = c.sampling.batch_size = 16
  c.eval.num_likelihood_examples = 32
  c.eval.bound = False
  c.eval.divergence = "exact"
  c.sampling.method = "sde"
  c.sampling.n_steps = 10
  c.eval.max_steps = 3  # far too few for rtol 1e-5: every solve fails
  with pytest.raises(RuntimeError, match=r"32 of 32 likelihood solves failed.*max_failed_fraction"):
    evaluate(c, wd)
  with open(os.path.join(wd, "eval", "report.json")) as f:
    report = json.load(f)
  assert report["nll_n_failed"] == 32 and report["nll_failed_indices"] == list(range(32))
  c.eval.max_steps = 4096
  report = evaluate(c, wd)
  assert report["nll_n_failed"] == 0 and np.isfinite(report["nll"])
