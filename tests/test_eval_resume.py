"""Eval survives preemption (issue 28, part 8): ``parallel.map_dataset`` with a ``ResultStore``
skips the batches already done and returns what an uninterrupted pass returns;
``run_lib.PartialResults`` keeps them on disk and discards them when the config or the checkpoint
changed; ``--mode=eval`` killed with SIGKILL mid-pass and run again resumes with the same report."""
from __future__ import annotations

import glob
import json
import logging as py_logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
import parallel
import run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MemoryStore:
  """A ``parallel.ResultStore`` in memory: what a first pass added, a second pass loads."""

  def __init__(self, kept=None):
    self.kept = dict(kept or {})
    self.added: list[dict] = []

  def load(self):
    return self.kept

  def add(self, results):
    self.added.append(results)


def _fn(consts, xs, keys):
  """Per example: depends on the example and its own key only."""
  noise = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
  return {"y": consts * jnp.sum(xs, axis=1) + noise, "z": xs * 2.0}


def _merged(added):
  return {k: np.concatenate([a[k] for a in added]) for k in added[0]}


def test_map_dataset_resumes_from_a_store_with_the_same_results():
  """A pass interrupted after 2 of 5 batches, resumed from what it kept (also at another batch
  size, which overlaps a kept batch), returns exactly the uninterrupted pass's results; the
  resumed count reaches on_resume once; a store whose examples do not start the pass is unused."""
  x = np.arange(17 * 3, dtype=np.float32).reshape(17, 3)
  key = jax.random.PRNGKey(3)
  full = parallel.map_dataset(_fn, 2.0, datasets.array_eval_batches(x, 4), key)
  first = MemoryStore()
  batches = datasets.array_eval_batches(x, 4)
  partial = [next(batches), next(batches)]  # the preempted run saw two batches
  parallel.map_dataset(_fn, 2.0, iter(partial), key, store=first)
  kept = _merged(first.added)
  np.testing.assert_array_equal(kept["index"], np.arange(8))
  for bs, skipped in ((4, 8), (8, 8), (12, 0), (3, 6)):
    store, resumed = MemoryStore(kept), []
    out = parallel.map_dataset(_fn, 2.0, datasets.array_eval_batches(x, bs), key, store=store,
                               on_resume=resumed.append)
    assert resumed == ([skipped] if skipped else []), (bs, resumed)
    for k in full:
      np.testing.assert_allclose(out[k], full[k], rtol=1e-6, err_msg=f"{k} at batch {bs}")
    computed = _merged(store.added)["index"]
    np.testing.assert_array_equal(computed, np.arange(skipped, 17))
  done = MemoryStore(dict(index=np.arange(17), **full))
  out = parallel.map_dataset(_fn, 2.0, datasets.array_eval_batches(x, 4), key, store=done)
  assert not done.added  # every batch was done: nothing computed
  for k in full:
    np.testing.assert_array_equal(out[k], full[k])


class _Model:
  def __init__(self, params, step=10, prior=None):
    self.params, self.step, self.prior = params, step, prior


def test_partial_results_invalidated_by_a_changed_checkpoint_or_config(tmp_path, caplog):
  """PartialResults keeps batches across instances; a changed parameter, step, key or config
  field discards them (log line naming the change, folder removed); eval.batch_size does not."""
  from configs.digits_vp import get_config
  caplog.set_level(py_logging.INFO)
  config = get_config()
  params = {"w": np.ones((3, 2), np.float32)}
  key = jax.random.PRNGKey(0)
  folder = str(tmp_path)

  def store(cfg=config, model=_Model(params), k=key):
    return run_lib.eval_stores(cfg, folder, model)("bpd", k)

  batch = {"index": np.arange(4), "bpd": np.linspace(1, 2, 4)}
  s = store()
  assert s.load() == {}
  s.add(batch)
  s.add({"index": np.arange(4, 6), "bpd": np.ones(2)})
  assert sorted(os.listdir(s.path)) == ["batch-000000.npz", "batch-000001.npz", "fingerprint.json"]
  other = config.copy_and_resolve_references()
  other.eval.batch_size = 7  # per-example keys: the batch size changes no result
  got = store(other).load()
  np.testing.assert_array_equal(got["index"], np.arange(6))
  np.testing.assert_allclose(got["bpd"][:4], batch["bpd"])

  def invalidated(reason, **kw):
    caplog.clear()
    assert store(**kw).load() == {}, reason
    assert "discarding the partial results" in caplog.text and reason in caplog.text, caplog.text
    assert not os.path.exists(s.path)
    s2 = store()
    s2.add(batch)  # kept again for the next case
    assert len(store().load()["index"]) == 4

  changed = {"w": params["w"].copy()}
  changed["w"][1, 1] = 1.0 + 1e-6
  invalidated("checkpoint parameters", model=_Model(changed))
  invalidated("step", model=_Model(params, step=11))
  invalidated("key", k=jax.random.PRNGKey(1))
  cfg = config.copy_and_resolve_references()
  cfg.eval.rtol = 1e-3
  invalidated("config field eval.rtol", cfg=cfg)
  cfg = config.copy_and_resolve_references()
  cfg.model.ema_rate = 0.9
  invalidated("config field model.ema_rate (0.995 -> 0.9)", cfg=cfg)
  # a batch file cut short by a kill mid-write is ignored (recomputed), the others kept
  with open(os.path.join(s.path, "batch-000001.npz"), "wb") as f:
    f.write(b"PK\x03\x04 truncated")
  got = store().load()
  np.testing.assert_array_equal(got["index"], np.arange(4))
  run_lib.remove_partial_results(folder)
  assert not os.path.exists(os.path.join(folder, run_lib.PARTIAL_DIR))


# The kill test: an untrained digits U-Net at nf 8 (one resolution), its checkpoint written
# directly (no train step to compile), eval of 12 test images in batches of 2 (6 batches per pass).
OVERRIDES = {
    "model.nf": 8, "model.ch_mult": (1,), "eval.split": "test[:12]", "eval.batch_size": 2,
    "eval.rtol": 1e-3, "eval.atol": 1e-3, "eval.bound": False, "eval.num_samples": 8,
    "sampling.method": "pc", "sampling.n_steps": 4, "sampling.batch_size": 8,
}


def _config():
  from configs.digits_vp import get_config
  config = get_config()
  for name, value in OVERRIDES.items():
    section, field = name.split(".")
    config[section][field] = value
  return config


def _flag(value) -> str:
  return repr(value) if isinstance(value, tuple) else str(value)


def _write_checkpoint(config, workdir: str) -> None:
  """``workdir`` as --mode=train leaves it after one step, with the initial parameters."""
  import sde_lib
  cfg = run_lib.validate_config(config)
  _, _, state = run_lib.init_state(cfg, sde_lib.get_sde(cfg.sde), jax.random.PRNGKey(cfg.seed))
  os.makedirs(workdir)
  run_lib.write_config(config, workdir)
  with run_lib.open_checkpoints(cfg, workdir) as store:
    store.save(1, state, {"data_position": 1})
    store.wait_until_finished()


def _batch_files(wd: str, stage: str) -> int:
  return len(glob.glob(os.path.join(wd, "eval", run_lib.PARTIAL_DIR, stage, "batch-*.npz")))


@pytest.fixture
def compilation_cache(tmp_path):
  """JAX's persistent compilation cache in a temporary folder, for this test and its subprocess
  (what the killed run compiled, the resumed runs read), turned off again afterwards."""
  path = str(tmp_path / "xla")
  parallel.set_compilation_cache(path)
  try:
    yield path
  finally:
    parallel.set_compilation_cache("")


@pytest.mark.slow  # a killed main.py and two reruns, ~42 s; the resume itself is tested above in process
def test_eval_killed_mid_pass_resumes_with_the_same_report(tmp_path, caplog, compilation_cache):
  """main.py --mode=eval, SIGKILLed once the ODE bits/dim pass holds some but not all of its 6
  batches, then run again: it resumes there (log), and the report equals an uninterrupted run's,
  bits/dim per example and samples included; the partial folder is gone once report.json is
  written."""
  from modes.evaluate import evaluate
  config = _config()
  wd = str(tmp_path / "wd")
  t0 = time.time()
  _write_checkpoint(config, wd)
  argv = [sys.executable, os.path.join(REPO, "main.py"),
          f"--config={os.path.join(REPO, 'configs', 'digits_vp.py')}", f"--workdir={wd}",
          "--mode=eval"] + [f"--config.{k}={_flag(v)}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, PYTHONPATH=REPO, **{parallel.CACHE_DIR_ENV: compilation_cache})
  proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          cwd=str(tmp_path))
  t1, done_at_kill = time.time(), 0
  try:
    while time.time() < t1 + 240 and proc.poll() is None:
      done_at_kill = _batch_files(wd, "bpd")
      if done_at_kill >= 1:
        break
      time.sleep(0.01)
  finally:
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
  t2 = time.time()
  assert 1 <= done_at_kill < 6, (done_at_kill, err[-3000:])
  assert not os.path.exists(os.path.join(wd, "eval", "report.json"))
  kept = _batch_files(wd, "bpd")
  assert kept < 6, kept
  caplog.set_level(py_logging.INFO)
  resumed = evaluate(config, wd)
  t3 = time.time()
  assert f"resumed at {2 * kept}/12 images" in caplog.text, caplog.text[-3000:]
  assert not os.path.exists(os.path.join(wd, "eval", run_lib.PARTIAL_DIR))
  reference = evaluate(config, wd, eval_folder="eval_ref")
  t4 = time.time()
  print(f"checkpoint {t1 - t0:.1f} s, killed run {t2 - t1:.1f} s, resumed {t3 - t2:.1f} s, "
        f"uninterrupted {t4 - t3:.1f} s; killed with {kept} of 6 batches of the ODE pass kept, "
        f"resumed at image {2 * kept}; bpd {resumed['bpd']!r} (resumed) vs "
        f"{reference['bpd']!r} (uninterrupted)")
  for k in ("bpd_per_example", "likelihood_nfe_per_example"):
    np.testing.assert_allclose(resumed[k], reference[k], rtol=1e-5, err_msg=k)
  for k in ("bpd", "bpd_stderr", "sampling_nfe"):
    assert resumed[k] == pytest.approx(reference[k], rel=1e-5), k
  np.testing.assert_allclose(np.load(os.path.join(wd, "eval", "samples.npz"))["samples"],
                             np.load(os.path.join(wd, "eval_ref", "samples.npz"))["samples"],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two runs of two main.py processes: about a CPU-minute
def test_two_processes_agree_on_the_resumed_batches(tmp_path):
  """Two processes (jax.distributed, one CPU device each) killed mid-pass, then run again: both
  skip the same kept batches (process 0 wrote them; each reads them) and take their results from
  the files: the kept bits/dim, replaced here by a marker, are in the report; the rest computed."""
  import socket
  config = _config()
  wd = str(tmp_path / "wd")
  _write_checkpoint(config, wd)
  suite_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count="))
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=suite_flags)

  def start():
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    return [subprocess.Popen(
        [sys.executable, os.path.join(REPO, "main.py"),
         f"--config={os.path.join(REPO, 'configs', 'digits_vp.py')}", f"--workdir={wd}",
         "--mode=eval", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}"] + [f"--config.{k}={_flag(v)}" for k, v in OVERRIDES.items()],
        env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]

  procs = start()
  t0 = time.time()
  try:
    while time.time() < t0 + 300 and all(p.poll() is None for p in procs):
      if _batch_files(wd, "bpd") >= 1:
        break
      time.sleep(0.01)
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
    outs = [p.communicate(timeout=60)[0] for p in procs]
  kept = sorted(glob.glob(os.path.join(wd, "eval", run_lib.PARTIAL_DIR, "bpd", "batch-*.npz")))
  assert 1 <= len(kept) < 6, (len(kept), outs[0][-3000:])
  marked = []
  for path in kept:  # a marker no solve returns, so the report shows where each value came from
    with np.load(path) as z:
      batch = {k: z[k] for k in z.files}
    batch["bpd"] = np.full_like(batch["bpd"], 100.0 + len(marked))
    marked.append(batch["index"])
    with open(path, "wb") as f:
      np.savez(f, **batch)
  procs = start()
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-4000:] + outs[1][-4000:]
  n = 2 * len(kept)
  assert f"resumed at {n}/12 images" in outs[0], outs[0][-3000:]
  with open(os.path.join(wd, "eval", "report.json")) as f:
    per_example = np.asarray(json.load(f)["bpd_per_example"])
  for j, index in enumerate(marked):
    np.testing.assert_array_equal(per_example[index], 100.0 + j)
  computed = np.setdiff1d(np.arange(12), np.concatenate(marked))  # each batch: one per process
  assert len(computed) == 12 - n and np.all(per_example[computed] < 50), per_example
