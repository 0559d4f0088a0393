"""Verified checkpoints (one orbax CheckpointManager) and one writer per workdir output.

Layout under ``workdir/``: ``checkpoints/<step>/state`` (orbax StandardSave of the TrainState, typed
PRNG keys as key data) and ``checkpoints/<step>/meta/metadata`` (JSON: the caller's meta, ``step``
and ``checksums`` {tree path: sha256 of dtype, shape and bytes} of every saved leaf);
``checkpoints/<step>.damaged`` (damaged, set aside); ``checkpoints-meta/`` (legacy, read only);
``.lock-<name>`` (``workdir_lock``: PID, host and start time of the holder).

* Preservation: orbax's own policy (orbax >= 0.11), ``AnyPreservationPolicy(LatestN(1),
  EveryNSteps(keep_every, max_to_keep), <step restored from>)``: the latest, the newest
  ``max_to_keep`` multiples of ``keep_every``, and the verified step this store restored from.
* Saves refuse non-finite float leaves; checksums hash the very (immutable) arrays handed to the
  async save. Orbax commits a step atomically and deletes old ones only after the commit, so the
  newest committed step is intact as written, and the pinned restored step stays the fallback.
* Restore tries newest first, verifying checksums and finiteness; each failure is warned about
  (``CheckpointWarning`` + absl) and the next older one tried; none intact raises one
  ``CheckpointError`` listing every directory and reason. Once an older one restores, a writable
  store renames the damaged newer ones ``<step>.damaged`` (kept for inspection, out of orbax's
  view: never "latest", never counted by the policy, their steps can be saved again). Nothing is
  renamed when none is intact (e.g. a changed model makes every restore fail) or when read-only.
* A full disk (ENOSPC / EDQUOT) during a save (orbax writes in the background; its failure
  surfaces at the next ``save``, ``wait_until_finished`` or ``close``) raises one
  ``DiskFullError`` naming the failed step, the directory and the newest intact checkpoint; the
  partial ``<step>.orbax-checkpoint-tmp`` is never a step (the next store deletes it), nothing
  older is touched, orbax's threads close quietly (their tracebacks are not logged), and a rerun
  resumes from that checkpoint.
* Legacy workdirs (``checkpoints-meta/`` + ``checkpoints/`` without checksums) still restore:
  both are candidates, newest first; a checkpoint whose meta lacks checksums is restored after
  the finiteness check only, with a warning. New saves go to ``checkpoints/`` (whose legacy steps
  the policy rotates); ``checkpoints-meta/`` may be deleted once a newer checkpoint exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import logging as pylogging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

DIR = "checkpoints"
LEGACY_DIR = "checkpoints-meta"


class CheckpointError(RuntimeError):
  """No intact checkpoint could be restored."""


class CheckpointWarning(UserWarning):
  """A checkpoint was skipped, or restored without checksum verification."""


class DiskFullError(OSError):
  """A checkpoint save ran out of disk space (or quota); the earlier checkpoints are untouched.
  ``step`` failed; ``newest`` is the newest intact step."""

  def __init__(self, message: str, step: int | None, directory: str, newest: int | None):
    super().__init__(message)
    self.errno, self.step, self.directory, self.newest = errno.ENOSPC, step, directory, newest


# tensorstore reports a full disk as ValueError('RESOURCE_EXHAUSTED: ... No space left on device
# [os_error_code=\'28\']'); Python writes raise OSError(ENOSPC / EDQUOT).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = {text: os.strerror(code) for code in _DISK_FULL_ERRNOS
                   for text in (os.strerror(code), f"os_error_code='{code}'")}


def _disk_full(error: BaseException | None) -> str | None:
  """'No space left on device' / 'Disk quota exceeded' when ``error`` (or an exception it was
  raised from) says the disk or quota is full; else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      return os.strerror(error.errno)
    for text, reason in _DISK_FULL_TEXT.items():
      if text in str(error):
        return reason
    error = error.__cause__ or error.__context__
  return None


class _QuietDiskFull(pylogging.Filter):
  """Drops orbax's own error records about a full disk (a traceback from each of its save
  threads, hundreds of lines): ``CheckpointStore`` raises one ``DiskFullError`` for them."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.levelno < pylogging.WARNING or "/orbax/" not in record.pathname:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (_disk_full(exc) is not None or any(t in record.getMessage() for t in _DISK_FULL_TEXT))


pylogging.getLogger("absl").addFilter(_QuietDiskFull())  # orbax logs through absl's logger


def _quiet_closed_loop_callbacks() -> None:
  """After a failed save, tensorstore writes still in flight finish after orbax closed their
  asyncio loop; each reports 'RuntimeError: Event loop is closed' as an unraisable exception (a
  traceback on stderr, nothing to act on). Wraps ``sys.unraisablehook`` (once) to drop exactly
  those and pass everything else on."""
  previous = sys.unraisablehook
  if getattr(previous, "scorelab_quiet", False):
    return

  def hook(args) -> None:
    if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
      return
    previous(args)

  hook.scorelab_quiet = True
  sys.unraisablehook = hook


def _join_orbax_threads(timeout_s: float = 60.0) -> None:
  """Waits (at most ``timeout_s`` seconds in all) for orbax's save threads still running."""
  deadline = time.time() + timeout_s
  for thread in threading.enumerate():
    if type(thread).__module__.startswith("orbax.") and thread is not threading.current_thread():
      thread.join(max(deadline - time.time(), 0.0))


def _warn(msg: str) -> None:
  logging.warning(msg)
  warnings.warn(msg, CheckpointWarning, stacklevel=3)


def _to_saveable(state):
  """Typed PRNG keys are stored as their raw key data."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state)


def _from_saveable(restored, like):
  return jax.tree.map(
      lambda r, l: jax.random.wrap_key_data(r, impl=jax.random.key_impl(l))
      if jnp.issubdtype(l.dtype, jax.dtypes.prng_key) else r, restored, like)


def _host(x) -> np.ndarray:
  """Host copy of a leaf; of one replica when the array spans processes (the replicated state)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.sharding.is_fully_replicated:
      raise ValueError("checksums need replicated or fully addressable arrays")
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def _scan(tree) -> tuple[dict[str, str], list]:
  """({tree path: sha256 of dtype, shape and bytes}, paths of non-finite float leaves)."""
  sums, bad = {}, []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(_host(leaf))
    h = hashlib.sha256(f"{a.dtype.name}{a.shape}".encode())
    h.update(a.reshape(-1).view(np.uint8))
    sums[jax.tree_util.keystr(path)] = h.hexdigest()
    if jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(a).all():
      bad.append(path)
  return sums, bad


def _field(path) -> str:
  return str(getattr(path[0], "name", getattr(path[0], "key", path[0])))


@dataclasses.dataclass
class _Pinned:
  """Preservation policy keeping the given steps."""
  steps: set

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [c.step in self.steps for c in checkpoints]


class CheckpointStore:
  """Verified orbax checkpoints in ``workdir/checkpoints`` (see the module docstring)."""

  def __init__(self, workdir: str, *, keep_every: int, max_to_keep: int, read_only: bool = False):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm
    if keep_every < 1 or max_to_keep < 1:
      raise ValueError(f"keep_every={keep_every} and max_to_keep={max_to_keep} must be >= 1")
    self.workdir, self.read_only, self._pinned = os.path.abspath(workdir), read_only, _Pinned(set())
    self._pending, self._failed = None, False  # step of the save in flight; a disk-full failure
    _quiet_closed_loop_callbacks()
    policy = cm.AnyPreservationPolicy([cm.LatestN(1), cm.EveryNSteps(keep_every,
                                       max_to_keep=max_to_keep), self._pinned])
    ro = dict(read_only=True, create=False)
    opts = ro if read_only else dict(create=True, cleanup_tmp_directories=True)
    self._mgr = ocp.CheckpointManager(os.path.join(self.workdir, DIR), options=(
        ocp.CheckpointManagerOptions(preservation_policy=policy, **opts)))
    legacy = os.path.join(self.workdir, LEGACY_DIR)
    self._legacy = (ocp.CheckpointManager(legacy, options=ocp.CheckpointManagerOptions(**ro))
                    if os.path.isdir(legacy) else None)

  def _candidates(self) -> list[tuple[int, Any]]:
    """(step, manager), newest first; the new layout first at equal steps."""
    mgrs = [m for m in (self._mgr, self._legacy) if m is not None]
    return sorted(((s, m) for m in mgrs for s in m.all_steps()),
                  key=lambda c: (-c[0], c[1] is not self._mgr))

  def all_steps(self) -> list[int]:
    return sorted({s for s, _ in self._candidates()})

  def latest_step(self) -> int | None:
    return max(self.all_steps(), default=None)

  def save(self, step: int, state, meta: dict) -> None:
    """Saves ``state`` (async) with ``meta`` and per-leaf checksums; refuses non-finite values."""
    import orbax.checkpoint as ocp
    saveable = _to_saveable(state)
    sums, bad = _scan(saveable)
    if bad:
      raise FloatingPointError(
          f"refusing to save step {step}: non-finite values in "
          f"{', '.join(sorted({_field(p) for p in bad}))} (first: {jax.tree_util.keystr(bad[0])})")
    self._settle()  # the previous (asynchronous) save: a full disk is reported for its step
    try:
      self._mgr.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(saveable),
          meta=ocp.args.JsonSave({**meta, "step": int(step), "checksums": sums})))
    except Exception as e:  # noqa: BLE001  (re-raised unless the disk is full)
      self._raise_if_disk_full(e, step)
      raise
    self._pending = int(step)

  def _settle(self) -> None:
    """Waits for the pending save; DiskFullError (one message, naming its step) if it failed for
    lack of space."""
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (re-raised unless the disk is full)
      self._raise_if_disk_full(e, self._pending)
      raise
    self._pending = None

  def _raise_if_disk_full(self, error: Exception, step: int | None) -> None:
    """For a full disk: one DiskFullError naming the step, the directory and the newest intact
    checkpoint, once orbax's writer threads still running have ended (the first failure stops
    the save, not the other writes in flight). The partial save stays as orbax left it,
    ``<step>.orbax-checkpoint-tmp``: never a step to restore; the next store opened on the
    workdir deletes it."""
    reason = _disk_full(error)
    if reason is None:
      return
    self._failed = True
    _join_orbax_threads()
    directory = os.path.join(self.workdir, DIR)
    self._mgr.reload()
    newest = max((s for s in self.all_steps() if s != step), default=None)
    free = shutil.disk_usage(directory).free / 2**20 if os.path.isdir(directory) else float("nan")
    partial = sorted(glob.glob(os.path.join(directory, f"{step}.orbax-checkpoint-tmp*")))
    kept = (f"the newest intact checkpoint is step {newest} ({os.path.join(directory, str(newest))}"
            "), untouched: free space and run the same command again to resume from it"
            if newest is not None else "there is no earlier checkpoint: free space and run the "
            "same command again to start from step 0")
    raise DiskFullError(
        f"disk full: saving checkpoint step {step} to {directory} failed "
        f"({reason}; {free:.1f} MiB free now). "
        + (f"The partial save {', '.join(partial)} is incomplete (never restored; orbax "
           "deletes it when the run starts again); " if partial else "")
        + f"{kept}.",
        step, directory, newest) from None

  def _verified(self, mgr, step: int, abstract, where: str):
    """The restored saveable state of ``step``; raises on any damage."""
    import orbax.checkpoint as ocp
    out = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    meta = out["meta"]
    if not isinstance(meta, dict) or int(meta.get("step", step)) != step:
      raise CheckpointError(f"meta item missing or for another step: {meta!r:.200}")
    sums, bad = _scan(out["state"])
    if bad:
      raise CheckpointError(f"non-finite values at leaf {jax.tree_util.keystr(bad[0])}")
    want = meta.get("checksums")
    if want is None:
      _warn(f"checkpoint {where} has no checksums (legacy layout): restored WITHOUT verification")
      return out["state"]
    diff = sorted(k for k in set(want) | set(sums) if want.get(k) != sums.get(k))
    if diff:
      raise CheckpointError(f"checksum mismatch at leaf {diff[0]}"
                            + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))
    return out["state"]

  def restore(self, like_state, step: int | None = None):
    """(state, step) from the newest intact checkpoint (or exactly ``step``) into the structure,
    dtypes and shardings of ``like_state``; ``(like_state, 0)`` when there is none."""
    import orbax.checkpoint as ocp
    cands = self._candidates()
    if step is not None:
      if step not in {s for s, _ in cands}:
        raise FileNotFoundError(f"no checkpoint for step {step} in {self.workdir} "
                                f"(available steps: {self.all_steps()})")
      cands = [c for c in cands if c[0] == step]
    if not cands:
      return like_state, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like_state))
    failed = []
    for s, mgr in cands:
      where = os.path.join(str(mgr.directory), str(s))
      try:
        restored = self._verified(mgr, s, abstract, where)
      except Exception as e:  # orbax / tensorstore / json / verification: try the next one
        failed.append((where, f"{type(e).__name__}: {str(e)[:1000]}"))
        _warn(f"checkpoint {where} is damaged, skipped: {failed[-1][1]}")
        continue
      if failed and not self.read_only:
        self._quarantine([w for w, _ in failed])
      self._pinned.steps.add(s)
      return _from_saveable(restored, like_state), s
    raise CheckpointError(f"no intact checkpoint in {self.workdir}; tried:\n"
                          + "\n".join(f"  {w}: {r}" for w, r in failed))

  def _quarantine(self, dirs: list[str]) -> None:
    """Renames damaged step directories to ``<step>.damaged`` (process 0) and reloads."""
    if jax.process_index() == 0:
      for d in dirs:
        dst, n = d + ".damaged", 1
        while os.path.exists(dst):
          dst, n = f"{d}.damaged-{n}", n + 1
        os.rename(d, dst)
        logging.warning("moved damaged checkpoint %s to %s", d, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpoints: quarantined damaged steps")
    for m in (self._mgr, self._legacy):
      if m is not None:
        m.reload()

  def wait_until_finished(self) -> None:
    """Waits for the pending save (DiskFullError if the disk filled up during it)."""
    self._settle()

  def close(self) -> None:
    """Waits for pending saves and closes the managers; after a DiskFullError, quietly."""
    try:
      if not self._failed:
        self._settle()
    finally:
      for m in (self._mgr, self._legacy):
        if m is not None:
          try:
            m.close()
          except Exception as e:  # noqa: BLE001  (the failure already reported, once)
            if not (self._failed and _disk_full(e) is not None):
              raise

  def __enter__(self) -> "CheckpointStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@contextlib.contextmanager
def workdir_lock(workdir: str, name: str) -> Iterator[str]:
  """Exclusive advisory lock (``flock``) on ``workdir/.lock-<name>`` for the body's duration.

  A second holder is refused at once (RuntimeError naming the holder's PID, host and the file).
  The kernel releases the lock of a dead process, so a stale file is taken over and its info
  overwritten. flock is per host (and best effort on network filesystems). In a run of several
  processes (``jax.distributed``) only process 0 takes it."""
  if not name or os.sep in name:
    raise ValueError(f"lock name must be a plain word, got {name!r}")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.abspath(workdir), f".lock-{name}")
  if jax.process_index() != 0:  # one run of several processes: process 0 holds the lock
    yield path
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    old = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        info = dict(json.loads(os.pread(fd, 4096, 0) or b"{}"))
      except (ValueError, TypeError):
        info = {}
      raise RuntimeError(
          f"{workdir} is already in use for '{name}' by pid {info.get('pid', '?')} on host "
          f"{info.get('host', '?')} (since {info.get('started', '?')}); lock file {path}") from None
    if old.strip():
      logging.info("lock %s: taking over from a finished holder (%s)", path, old.strip())
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    yield path
    os.ftruncate(fd, 0)
  finally:
    os.close(fd)  # releases the lock


def check_writable(path: str) -> str:
  """Creates folder ``path`` if needed and checks it is writable (a probe file is written and
  deleted); raises PermissionError naming it. Call before any expensive work."""
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"output folder {os.path.abspath(path)} is not writable: "
                          f"{e.strerror or e}") from e
  return path


# -- verified single pytrees (fitted priors, dequantizers) -----------------------------------------
TREE_DIR, TREE_META = "arrays", "meta.json"


def save_tree(directory: str, tree, meta: dict) -> None:
  """Saves a pytree of arrays (orbax, ``directory/arrays``) and ``meta`` plus per-leaf checksums
  (``directory/meta.json``, written last and atomically: a directory without it is incomplete).
  Refuses non-finite leaves; replaces an earlier save in ``directory``. In a run of several
  processes every process calls it with the same tree (each fitted the same replicated model):
  the leaves go as host arrays, which orbax writes once, and process 0 writes ``meta.json``."""
  import orbax.checkpoint as ocp
  sums, bad = _scan(tree)
  if bad:
    raise FloatingPointError(f"refusing to save {directory}: non-finite values in "
                             f"{[jax.tree_util.keystr(p) for p in bad]}")
  several = jax.process_count() > 1
  if several:  # a process-local device array cannot be saved from several processes
    tree = jax.tree.map(np.asarray, tree)
  main = jax.process_index() == 0
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, TREE_META)
  if main and os.path.exists(meta_path):
    os.remove(meta_path)
  arrays = os.path.abspath(os.path.join(directory, TREE_DIR))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(arrays, tree, force=True)
    ckptr.wait_until_finished()
  if main:
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({**meta, "checksums": sums}, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, meta_path)
  if several:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"checkpoints.save_tree {directory}")


def read_tree_meta(directory: str) -> dict:
  """``meta.json`` of a ``save_tree`` directory; FileNotFoundError naming it when absent."""
  path = os.path.join(directory, TREE_META)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (nothing saved there, or the save was cut)")
  with open(path) as f:
    return json.load(f)


def restore_tree(directory: str, abstract) -> tuple[Any, dict]:
  """(tree, meta) of a ``save_tree`` directory into the shapes / dtypes of ``abstract``; the
  checksums and finiteness are verified (CheckpointError naming the directory and leaf)."""
  import orbax.checkpoint as ocp
  meta = read_tree_meta(directory)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(os.path.abspath(os.path.join(directory, TREE_DIR)), abstract)
  except Exception as e:  # noqa: BLE001  (any orbax / tensorstore failure is damage)
    raise CheckpointError(f"{directory}: cannot restore its arrays ({type(e).__name__}: {e})") from e
  sums, bad = _scan(tree)
  wrong = sorted(k for k in set(sums) | set(meta["checksums"])
                 if sums.get(k) != meta["checksums"].get(k))
  if wrong or bad:
    raise CheckpointError(f"{directory}: damaged (checksum mismatch in {wrong[:5]}, non-finite "
                          f"{[jax.tree_util.keystr(p) for p in bad][:5]})")
  return tree, {k: v for k, v in meta.items() if k != "checksums"}
