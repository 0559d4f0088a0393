"""Tests of checkpoints.py: verified save/restore, fallback past damaged checkpoints, the
preservation policy, the legacy layout, workdir locks and the writability check.

States are real ``training.TrainState``s (tiny params, optax.adam, typed PRNG key) replicated on the
4 simulated CPU devices of conftest.py; the state of step k has params scaled by k.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoints
import training
from checkpoints import CheckpointError, CheckpointStore, CheckpointWarning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# orbax/tensorstore: a failed restore leaves callbacks for its closed asyncio loop (harmless noise).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(k: float):
  params = {"w": jnp.arange(6.0).reshape(2, 3) * k, "b": jnp.full((3,), k, jnp.float32)}
  return training.init_train_state(params, optax.adam(1e-3), jax.random.key(int(k)),
                                   training.make_mesh())


def leaves(state):
  return jax.tree.leaves(checkpoints._to_saveable(state))


def assert_same(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def write(workdir, steps, keep_every=1, max_to_keep=10):
  with CheckpointStore(workdir, keep_every=keep_every, max_to_keep=max_to_keep) as store:
    for s in steps:
      store.save(s, make_state(s), {"data_position": s})


def restore(workdir, read_only=False, **kw):
  """(state, step, warning messages)."""
  with CheckpointStore(workdir, keep_every=1, max_to_keep=10, read_only=read_only) as store:
    with warnings.catch_warnings(record=True) as w:
      warnings.simplefilter("always")
      state, step = store.restore(make_state(0), **kw)
  return state, step, [str(x.message) for x in w if issubclass(x.category, CheckpointWarning)]


def step_dir(workdir, step, sub=checkpoints.DIR):
  return os.path.join(os.path.abspath(workdir), sub, str(step))


def damage(path: str, how: str) -> None:
  """Damages the checkpoint directory ``path`` (its ocdbt array data files, metadata or data)."""
  data = [f for f in glob.glob(f"{path}/state/**/d/*", recursive=True) if os.path.isfile(f)]
  assert data, os.listdir(os.path.join(path, "state"))
  if how == "random_bytes":  # same size, every array data file
    for f in data:
      with open(f, "wb") as fh:
        fh.write(np.random.default_rng(0).bytes(os.path.getsize(f)))
  elif how == "truncated":
    for f in data:
      os.truncate(f, os.path.getsize(f) // 2)
  elif how == "deleted_metadata":
    os.remove(os.path.join(path, "state", "_METADATA"))
  elif how == "deleted_meta":
    os.remove(os.path.join(path, "meta", "metadata"))
  elif how == "wrong_data":  # decodes fine, but holds another step's arrays: only checksums see it
    shutil.rmtree(os.path.join(path, "state"))
    shutil.copytree(os.path.join(os.path.dirname(path), "1", "state"), os.path.join(path, "state"))


def test_round_trip_is_bit_identical_with_shardings_and_key(tmp_path):
  write(tmp_path, [3])
  like = make_state(0)
  state, step, warned = restore(tmp_path, read_only=True)
  assert step == 3 and not warned
  assert_same(state, make_state(3))
  assert jax.random.key_impl(state.rng) == jax.random.key_impl(like.rng)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(like)):
    assert x.sharding == y.sharding
  meta = json.load(open(os.path.join(step_dir(tmp_path, 3), "meta", "metadata")))
  assert meta["step"] == meta["data_position"] == 3
  assert set(meta["checksums"]) >= {".params['w']", ".ema_params['b']", ".rng", ".step"}


def test_empty_workdir_and_missing_step(tmp_path):
  like = make_state(0)
  with CheckpointStore(tmp_path / "none", keep_every=1, max_to_keep=1, read_only=True) as store:
    assert store.restore(like) == (like, 0) and store.latest_step() is None
  assert not os.path.exists(tmp_path / "none")  # read-only creates nothing
  write(tmp_path, [1, 2])
  with pytest.raises(FileNotFoundError, match=r"step 5 .*available steps: \[1, 2\]"):
    restore(tmp_path, step=5)
  state, step, _ = restore(tmp_path, step=1)
  assert step == 1
  assert_same(state, make_state(1))


def fill_disk_at(monkeypatch, step: int, error=None) -> None:
  """Makes orbax's (background) write of the meta item of ``step`` fail as a full disk does:
  ``OSError(ENOSPC)`` by default."""
  import errno
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
  real = jch.JsonCheckpointHandler._save_fn

  async def save_fn(self, item, directory):
    if item.get("step") == step:
      raise error or OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await real(self, item, directory)

  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", save_fn)


@pytest.mark.parametrize("tensorstore_text", [False, True])
def test_disk_full_during_save_is_one_error_and_loses_nothing(tmp_path, monkeypatch, caplog,
                                                              tensorstore_text):
  """A full disk during the asynchronous save of step 3 (an OSError(ENOSPC), or tensorstore's
  ValueError text) raises one DiskFullError at the next save naming step 3, the directory and the
  newest intact step 2; orbax logs no error of its own; the partial step 3 is never a step to
  restore, the store closes quietly, step 2 restores bit-identical and step 3 saves anew once
  space is back."""
  import logging
  fill_disk_at(monkeypatch, 3, ValueError(
      "RESOURCE_EXHAUSTED: Error writing x: Failed to write 8 bytes to file 8: No space left on "
      "device [os_error_code='28']") if tensorstore_text else None)
  with caplog.at_level(logging.INFO), pytest.raises(checkpoints.DiskFullError) as err:
    with CheckpointStore(tmp_path, keep_every=1, max_to_keep=10) as store:
      for s in (1, 2, 3, 4):
        store.save(s, make_state(s), {"data_position": s})
  e, directory = err.value, os.path.join(str(tmp_path), checkpoints.DIR)
  assert (e.step, e.newest, e.directory) == (3, 2, directory)
  msg = str(e)
  assert msg.startswith(f"disk full: saving checkpoint step 3 to {directory} failed (No space left "
                        "on device;") and "\n" not in msg
  assert f"newest intact checkpoint is step 2 ({step_dir(tmp_path, 2)}), untouched" in msg
  partial = os.path.join(directory, "3.orbax-checkpoint-tmp")
  assert f"The partial save {partial} is incomplete" in msg
  assert sorted(os.listdir(directory)) == ["1", "2", "3.orbax-checkpoint-tmp"]  # 4 never started
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
  state, step, warned = restore(tmp_path)
  assert step == 2 and not warned
  assert_same(state, make_state(2))
  monkeypatch.undo()
  write(tmp_path, [3])
  assert restore(tmp_path)[1] == 3


def test_other_save_errors_are_not_disk_full(tmp_path, monkeypatch):
  """Only ENOSPC / EDQUOT become DiskFullError; another OSError passes unchanged."""
  import errno
  fill_disk_at(monkeypatch, 2, OSError(errno.EACCES, "Permission denied"))
  with pytest.raises(PermissionError):
    with CheckpointStore(tmp_path, keep_every=1, max_to_keep=10) as store:
      store.save(1, make_state(1), {})
      store.save(2, make_state(2), {})
      store.wait_until_finished()
  assert checkpoints._disk_full(OSError(errno.EACCES, "x")) is None
  assert checkpoints._disk_full(RuntimeError("y")) is None
  assert checkpoints._disk_full(OSError(errno.EDQUOT, "q")) == "Disk quota exceeded"
  try:  # tensorstore's text, raised from another error
    raise RuntimeError("save failed") from ValueError("RESOURCE_EXHAUSTED [os_error_code='28']")
  except RuntimeError as e:
    assert checkpoints._disk_full(e) == "No space left on device"


@pytest.mark.parametrize("how", ["random_bytes", "truncated", "deleted_metadata", "deleted_meta",
                                 "wrong_data"])
def test_damaged_newest_falls_back_with_warning(tmp_path, how):
  write(tmp_path, [1, 2, 3])
  bad = step_dir(tmp_path, 3)
  damage(bad, how)
  state, step, warned = restore(tmp_path, read_only=True)
  assert step == 2
  assert_same(state, make_state(2))
  assert len(warned) == 1 and bad in warned[0]
  if how == "wrong_data":
    assert "checksum mismatch at leaf" in warned[0]
  assert os.path.isdir(bad)  # read-only: untouched
  # Writable: the damaged dir is moved aside, the intact one survives the next saves.
  with CheckpointStore(tmp_path, keep_every=10, max_to_keep=1) as store:
    with pytest.warns(CheckpointWarning, match=bad):
      _, step = store.restore(make_state(0))
    assert step == 2 and os.path.isdir(bad + ".damaged")
    for s in (3, 4):
      store.save(s, make_state(s), {"data_position": s})
    store.wait_until_finished()
    assert store.all_steps() == [2, 4]  # latest + the step restored from (pinned)
  state, step, warned = restore(tmp_path)
  assert step == 4 and not warned


def test_newest_two_damaged_and_none_intact(tmp_path):
  write(tmp_path, [1, 2, 3])
  damage(step_dir(tmp_path, 3), "random_bytes")
  damage(step_dir(tmp_path, 2), "wrong_data")
  state, step, warned = restore(tmp_path, read_only=True)
  assert step == 1 and len(warned) == 2
  assert step_dir(tmp_path, 3) in warned[0] and step_dir(tmp_path, 2) in warned[1]
  assert_same(state, make_state(1))
  damage(step_dir(tmp_path, 1), "truncated")
  with pytest.raises(CheckpointError) as err:
    restore(tmp_path)
  msg = str(err.value)
  for s in (1, 2, 3):
    assert step_dir(tmp_path, s) in msg
  data_file = glob.glob(f"{step_dir(tmp_path, 1)}/state/d/*")[0]
  assert os.path.basename(data_file) in msg  # the truncated file is named
  assert not glob.glob(f"{tmp_path}/checkpoints/*.damaged")  # nothing intact: nothing renamed


@pytest.mark.parametrize("field", ["params", "ema_params", "opt_state"])
def test_non_finite_state_is_refused(tmp_path, field):
  state = make_state(1)
  poison = lambda t: jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan) if x.ndim else x, t)
  state = state.replace(**{field: poison(getattr(state, field))})
  with CheckpointStore(tmp_path, keep_every=1, max_to_keep=1) as store:
    with pytest.raises(FloatingPointError, match=rf"step 7: non-finite values in {field}\b"):
      store.save(7, state, {"data_position": 7})
    assert store.all_steps() == []


def test_preservation_keeps_latest_and_every_n(tmp_path):
  with CheckpointStore(tmp_path, keep_every=4, max_to_keep=2) as store:
    for s in range(1, 11):
      store.save(s, make_state(s), {"data_position": s})
      store.wait_until_finished()
      want = list(range(4, s + 1, 4))[-2:]
      assert store.all_steps() == sorted(set(want) | {s}), s
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "4", "8"]


def legacy_save(workdir, sub, step):
  """A checkpoint as run_lib wrote it before checkpoints.py: state + meta, no checksums."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), sub)) as mgr:
    mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(checkpoints._to_saveable(make_state(step))),
        meta=ocp.args.JsonSave({"step": step, "data_position": step})), force=True)


def test_legacy_layout_restores_unverified_then_new_saves(tmp_path):
  legacy_save(tmp_path, "checkpoints", 4)
  legacy_save(tmp_path, "checkpoints-meta", 6)
  state, step, warned = restore(tmp_path, read_only=True)
  assert step == 6 and len(warned) == 1 and "WITHOUT verification" in warned[0]
  assert step_dir(tmp_path, 6, "checkpoints-meta") in warned[0]
  assert_same(state, make_state(6))
  damage(step_dir(tmp_path, 6, "checkpoints-meta"), "truncated")
  state, step, warned = restore(tmp_path, read_only=True)
  assert step == 4 and len(warned) == 2 and "damaged" in warned[0]
  write(tmp_path, [8])
  with CheckpointStore(tmp_path, keep_every=1, max_to_keep=5, read_only=True) as store:
    assert store.all_steps() == [4, 6, 8]
  state, step, warned = restore(tmp_path)
  assert step == 8 and not warned


HOLDER = """
import sys, checkpoints
with checkpoints.workdir_lock(sys.argv[1], "train"):
  print("held", flush=True)
  sys.stdin.read()
"""


def test_lock_refused_in_other_process_then_taken_over(tmp_path):
  wd = str(tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, wd], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError) as err:
      with checkpoints.workdir_lock(wd, "train"):
        pass
    msg = str(err.value)
    assert f"pid {holder.pid} " in msg and socket.gethostname() in msg
    assert os.path.join(wd, ".lock-train") in msg
    with checkpoints.workdir_lock(wd, "eval"):  # another output set: independent
      pass
  finally:
    holder.kill()  # dies holding the lock: its info stays in the file
    holder.wait()
  assert json.load(open(os.path.join(wd, ".lock-train")))["pid"] == holder.pid
  with checkpoints.workdir_lock(wd, "train") as path:
    info = json.load(open(path))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()} "):  # also within one process
      with checkpoints.workdir_lock(wd, "train"):
        pass


def test_stale_lock_file_is_overwritten(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  path = os.path.join(tmp_path, ".lock-samples")
  with open(path, "w") as f:
    json.dump({"pid": dead.pid, "host": "elsewhere", "started": "long ago"}, f)
  with checkpoints.workdir_lock(str(tmp_path), "samples"):
    assert json.load(open(path))["pid"] == os.getpid()


def _in_unprivileged_child(fn) -> str:
  """Runs ``fn()`` as user nobody in a forked child (root ignores permission bits); returns
  'ok' or the exception message."""
  r, w = os.pipe()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # JAX warns about fork
    pid = os.fork()
  if pid == 0:
    try:
      os.setgid(65534)
      os.setuid(65534)
      fn()
      out = "ok"
    except BaseException as e:  # noqa: BLE001
      out = f"{type(e).__name__}: {e}"
    os.write(w, out.encode())
    os._exit(0)
  os.close(w)
  _, status = os.waitpid(pid, 0)
  with os.fdopen(r) as f:
    return f.read()


def test_check_writable(tmp_path):
  assert checkpoints.check_writable(str(tmp_path / "a" / "b")) and os.listdir(tmp_path / "a/b") == []
  base = tempfile.mkdtemp()
  try:
    os.chmod(base, 0o755)
    ro, rw = os.path.join(base, "ro"), os.path.join(base, "rw")
    os.mkdir(ro, 0o555)
    os.mkdir(rw)
    os.chmod(ro, 0o555)
    os.chmod(rw, 0o777)
    if os.geteuid() == 0:
      assert _in_unprivileged_child(lambda: checkpoints.check_writable(rw)) == "ok"
      msg = _in_unprivileged_child(lambda: checkpoints.check_writable(ro))
      assert msg.startswith("PermissionError") and f"{ro} is not writable" in msg
    else:
      checkpoints.check_writable(rw)
      with pytest.raises(PermissionError, match=f"{ro} is not writable"):
        checkpoints.check_writable(ro)
    assert os.listdir(ro) == []
  finally:
    shutil.rmtree(base)
