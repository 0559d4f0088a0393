"""Data parallelism over devices and processes, in one place.

* the runtime: ``initialize_distributed`` (``jax.distributed`` from flags, or JAX's cluster
  auto-detection on TPU pods, SLURM, Open MPI, Kubernetes) and ``is_main``;
* the mesh: one axis ``'data'`` over every device of every process (``make_mesh``), batches
  sharded on it (``shard_batch``), state replicated (``replicate``);
* per-example work spread over the mesh (``sharded_map``): the function of one example and its
  own key, never of its batch companions, so a result does not depend on the batch size, the
  device count or the process count (example i always uses ``fold_in(key, i)``);
* ``map_dataset``: a ``sharded_map`` over a process's padded ``EvalBatch`` stream, padding
  masked, the per-example results of every process gathered in example order; with a
  ``ResultStore`` (``run_lib.PartialResults``: files in the eval folder) it keeps each finished
  batch and, after a preemption, skips the batches already done (same numbers: the keys are
  per example);
* process-wide XLA setup, done once when this module is first imported (every scorelab module
  imports it, directly or through ``sde_lib``):

  - the fast CPU compile options ``CPU_COMPILER_OPTIONS`` are appended to ``XLA_FLAGS``, so they
    reach every program of the process, a user's own ``jax.jit(samplers.pc_sampler ...)``
    included, not only those given ``compiler_options(mesh)``. XLA reads ``XLA_FLAGS`` once, when
    JAX starts its backends (the first computation, ``jax.devices()``, ...; importing jax is not
    enough to start them): imported after that, scorelab warns that plain ``jax.jit`` programs
    keep XLA's defaults (its own CLI programs still pass the options explicitly). A value of the
    flag already in ``XLA_FLAGS`` wins (the user's choice; also the way to opt out), in the CLI's
    programs too (``compiler_options`` leaves it out; benchmarks/README.md: the trade of
    ``LIBRARY_FUSION_TYPE_REDUCE``, 1.25x faster steps against a slower cache read). CPU only in
    effect (GPU / TPU compilers ignore ``xla_cpu_*`` flags); jaxlib < 0.10 is left alone (an XLA
    that does not know a flag in ``XLA_FLAGS`` aborts the process);
  - JAX's persistent compilation cache (``set_compilation_cache``): on by default under
    ``~/.cache/scorelab/xla`` (``$SCORELAB_CACHE/xla`` or ``$XDG_CACHE_HOME/scorelab/xla`` when
    set, as for the Inception weights); the environment variable ``SCORELAB_COMPILATION_CACHE_DIR`` moves
    it ('' turns it off), as ``main.py --compilation_cache_dir`` does; a directory the user gave
    JAX (``JAX_COMPILATION_CACHE_DIR``) is kept;
  - equinox's runtime checks turned into NaNs (``EQX_ON_ERROR=nan``, ``set_equinox_error_mode``)
    unless the user set ``EQX_ON_ERROR``: with equinox's default ('raise') every diffrax solve
    (the likelihood ODE, the adaptive and fixed-grid samplers) holds a host callback, and JAX
    neither caches nor shares a program with host callbacks, so the digits eval's warm compile
    stayed at 47.6 % of its cold one (6.5 % with the checks as NaNs; benchmarks/compile_cache.py).
    scorelab's solves run with ``throw=False`` and report failures in their results; what the
    checks guard (t0 < t1, an increasing time grid) its callers already ensure, and a violated
    check still shows as NaN, which eval counts as a failed solve. equinox reads the variable
    once, when it is imported: scorelab modules import this module before diffrax.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import warnings
from typing import Any, Callable, Iterable, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Array = jax.Array
DATA_AXIS = "data"


# -- the runtime -----------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           auto: bool = False) -> bool:
  """Starts ``jax.distributed`` before any JAX computation: with all three of
  ``coordinator_address`` / ``num_processes`` / ``process_id`` (e.g. two GPU hosts), or with none
  of them and ``auto`` (JAX's cluster detection: Cloud TPU pod slices, SLURM, Open MPI, k8s).
  Returns whether it was started; a partial set of flags is an error naming the missing ones."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  missing = sorted(k for k, v in given.items() if v is None)
  if len(missing) == 3 and not auto:
    return False
  if missing and len(missing) < 3:
    raise ValueError(f"--{' --'.join(missing)} missing: give all of --coordinator_address, "
                     "--num_processes and --process_id, or none of them with --distributed=auto")
  if not missing and not 0 <= int(process_id) < int(num_processes):
    raise ValueError(f"--process_id={process_id} not in [0, --num_processes={num_processes})")
  jax.distributed.initialize(**({} if missing else dict(
      coordinator_address=coordinator_address, num_processes=int(num_processes),
      process_id=int(process_id))))
  return True


def is_main() -> bool:
  """Process 0: the one that writes reports, figures, logs and TensorBoard."""
  return jax.process_index() == 0


# -- the mesh --------------------------------------------------------------------------------------
_DEFAULT_DEVICES: list | None = None


@contextlib.contextmanager
def use_devices(n: int):
  """Within the block, meshes made without explicit devices use only the first ``n`` devices of
  one process (tests and benchmarks: the same work on 1 and on 4 devices)."""
  global _DEFAULT_DEVICES
  if jax.process_count() > 1:
    raise ValueError("use_devices is for one process")
  if not 1 <= n <= jax.device_count():
    raise ValueError(f"use_devices({n}): {jax.device_count()} devices available")
  old, _DEFAULT_DEVICES = _DEFAULT_DEVICES, jax.devices()[:n]
  try:
    yield
  finally:
    _DEFAULT_DEVICES = old


def make_mesh(devices=None) -> Mesh:
  """1-D mesh with axis 'data' over ``devices`` (default ``jax.devices()``: the local devices on one
  host, every process's devices after ``jax.distributed.initialize()`` on several; within
  ``use_devices(n)``, the first n)."""
  if devices is None:
    devices = jax.devices() if _DEFAULT_DEVICES is None else _DEFAULT_DEVICES
  return Mesh(np.asarray(list(devices)), (DATA_AXIS,))


# XLA:CPU hands convolutions to YNNPACK by default, whose weight gradient is 1.8-3.0x slower than
# Eigen's at DDPM++ layer sizes (benchmarks/train_step.py, 'conv' study); keeping YNNPACK for
# reductions and dots only makes the published-shape train step 1.33-1.77x faster on 2 cores.
# CPU only: GPU / TPU compilers have their own convolutions (and do not know the option).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
  try:
    jax.jit(lambda a: a + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        np.zeros(1, np.float32)).compile()
    return True
  except Exception:  # an XLA without the option: its defaults  # noqa: BLE001
    return False


def _user_xla_flags() -> set[str]:
  """The ``CPU_COMPILER_OPTIONS`` the user set in ``XLA_FLAGS`` (before scorelab appended its own)."""
  return {k for k in CPU_COMPILER_OPTIONS if f"--{k}=" in _USER_XLA_FLAGS}


def compiler_options(mesh: Mesh) -> dict | None:
  """XLA options for programs on ``mesh``: ``CPU_COMPILER_OPTIONS`` on CPU (when this XLA knows
  them), less those the user set in ``XLA_FLAGS`` (the user's value wins here too); None
  elsewhere. Pass to ``jax.jit(..., compiler_options=...)``."""
  if mesh.devices.flat[0].platform == "cpu" and _cpu_options_supported():
    options = {k: v for k, v in CPU_COMPILER_OPTIONS.items() if k not in _user_xla_flags()}
    return options or None
  return None


# -- process-wide XLA setup ------------------------------------------------------------------------
CACHE_DIR_ENV = "SCORELAB_COMPILATION_CACHE_DIR"
# scorelab's cache folder as downloads.cache_dir finds it (read here at import, before any JAX), then xla/
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("SCORELAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "scorelab"), "xla")
# A size cap turns on JAX's file lock around every cache read and write (jax._src.lru_cache): JAX
# writes an entry in place (no temporary file and rename), so without the lock a process could read
# another's half-written entry. Least recently used entries are evicted beyond the cap.
CACHE_MAX_BYTES = 16 << 30


def _xla_flags_entry() -> str:
  return " ".join(f"--{k}={v}" for k, v in CPU_COMPILER_OPTIONS.items())


_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # as the user gave it, read before appending


def set_process_xla_flags() -> bool:
  """Appends ``CPU_COMPILER_OPTIONS`` to ``XLA_FLAGS`` (see the module docstring). Returns whether
  programs compiled from now on get them (or the user's own value of the flag)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if all(f"--{k}=" in flags for k in CPU_COMPILER_OPTIONS):
    return True
  if jax.__version_info__ < (0, 10):
    return False
  from jax._src import xla_bridge  # JAX has no public test for started backends
  if xla_bridge.backends_are_initialized():
    warnings.warn("scorelab was imported after JAX started its backends: XLA_FLAGS is read once, "
                  "so programs compiled with a plain jax.jit keep XLA's CPU defaults (slower "
                  "convolution gradients). Import scorelab modules before the first JAX "
                  f"computation, or start Python with XLA_FLAGS='{_xla_flags_entry()}'.",
                  stacklevel=2)
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {_xla_flags_entry()}".strip()
  return True


MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def set_compilation_cache(path: str | None = None) -> str | None:
  """Turns JAX's persistent compilation cache on at ``path`` ('' turns it off; None: the
  ``SCORELAB_COMPILATION_CACHE_DIR`` environment variable, else ``DEFAULT_CACHE_DIR``). Safe with
  several processes sharing the directory (file lock, ``CACHE_MAX_BYTES``). Every program is
  written, however fast it compiled: ``jax_persistent_cache_min_compile_time_secs`` = 0 unless the
  environment variable ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise (with JAX's
  default of 1 s the digits eval's many sub-second programs still cost 58 % of its cold compile
  time, benchmarks/compile_cache.py). Call it
  before the first compile to move the cache (``main.py --compilation_cache_dir``). Returns the
  directory, None when off."""
  from jax.experimental.compilation_cache import compilation_cache
  if path is None:
    path = os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)
  compilation_cache.reset_cache()  # a cache JAX already opened would keep its old directory
  if not path:
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  jax.config.update("jax_compilation_cache_dir", path)
  if MIN_COMPILE_TIME_ENV not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if importlib.util.find_spec("filelock") is not None:  # JAX needs it for a size cap (the lock)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  return path


EQX_ON_ERROR_ENV = "EQX_ON_ERROR"


def set_equinox_error_mode() -> bool:
  """Sets ``EQX_ON_ERROR=nan`` for equinox (see the module docstring) unless the user chose a
  value. Returns whether equinox will see it: False once equinox is imported with another."""
  if EQX_ON_ERROR_ENV in os.environ:
    return os.environ[EQX_ON_ERROR_ENV] == "nan" or "equinox" not in sys.modules
  if "equinox" in sys.modules:
    return False
  os.environ[EQX_ON_ERROR_ENV] = "nan"
  return True


def _set_process_defaults() -> None:
  set_process_xla_flags()
  set_equinox_error_mode()
  if jax.config.jax_compilation_cache_dir is None:  # not already chosen by the user for JAX
    set_compilation_cache()


_set_process_defaults()


def shard_batch(batch: Array, mesh: Mesh) -> Array:
  """Places a batch sharded along its first axis over the mesh axis 'data'. One process: ``batch``
  is the global batch (N, ...). Several processes: each passes its own rows (N / process_count),
  assembled into one global array (process p's rows are rows p N/P .. (p+1) N/P - 1)."""
  sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  if jax.process_count() > 1:
    return jax.make_array_from_process_local_data(sharding, np.asarray(batch))
  size = mesh.shape[DATA_AXIS]
  if batch.shape[0] % size:
    raise ValueError(f"batch of {batch.shape[0]} rows does not split over {size} devices")
  return jax.device_put(batch, sharding)


def replicate(tree, mesh: Mesh):
  """Places a pytree (params, train state) fully replicated on the mesh. Several processes: each
  passes the same values; arrays on one local device go through host memory (JAX does not move
  device arrays across hosts), PRNG key arrays and already global arrays as they are."""
  sharding = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() > 1:
    def host(a):
      local = isinstance(a, jax.Array) and a.is_fully_addressable
      if local and not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return np.asarray(a)
      return a
    tree = jax.tree.map(host, tree)
  return jax.device_put(tree, sharding)


def local_rows(x: Array) -> np.ndarray:
  """This process's rows of an array sharded on axis 0 (all rows on one process), in order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:  # replicated shards (several devices holding the same rows) counted once
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def gather(x: np.ndarray) -> np.ndarray:
  """Concatenation over processes (in process order) of each process's ``x`` (equal shapes)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


# -- per-example maps ------------------------------------------------------------------------------
def per_example(batch_fn: Callable) -> Callable:
  """``batch_fn(consts, x (B, ...), key) -> pytree of (B, ...)`` -> ``fn(consts, xs, keys)`` that
  calls it on each example alone (a batch of one, vmapped: the network still sees the batch) with
  that example's own key, so results do not depend on the batching."""
  def fn(consts, xs, keys):
    one = lambda x, k: jax.tree.map(lambda a: a[0], batch_fn(consts, x[None], k))  # noqa: E731
    return jax.vmap(one)(xs, keys)
  return fn


def example_keys(key: Array, index) -> np.ndarray:
  """Raw PRNG keys ``fold_in(key, i)`` for example indices ``index`` (padding rows: -1 -> any)."""
  index = np.maximum(np.asarray(index), 0).astype(np.uint32)
  return np.asarray(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(index)))


@functools.lru_cache(maxsize=4)  # a few: each holds its fn (and what fn closes over)
def _mapped_program(fn: Callable, mesh: Mesh) -> Callable:
  """The jitted ``shard_map`` of ``fn`` over ``mesh``, one per (fn, mesh): calling ``sharded_map``
  / ``map_dataset`` again with the same ``fn`` reuses its compiled program."""
  rows, repl = PartitionSpec(DATA_AXIS), PartitionSpec()
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(repl, rows, rows), out_specs=rows,
                               check_vma=False), compiler_options=compiler_options(mesh))


def sharded_map(fn: Callable, mesh: Optional[Mesh] = None) -> Callable:
  """``fn(consts, xs, keys) -> pytree of (B, ...)`` (per example: row i depends only on xs[i],
  keys[i] and ``consts``) -> ``g(consts, x_local, index_local, key) -> numpy pytree of this
  process's rows``, with the rows of every process forming one global batch split over all devices
  of ``mesh`` (``shard_map``: each device solves its own rows, adaptive loops stop per device);
  ``consts`` (parameters) replicated. Every process calls ``g`` together with the same number of
  rows, a multiple of its local device count."""
  mesh = make_mesh() if mesh is None else mesh
  mapped = _mapped_program(fn, mesh)

  def g(consts, x_local, index_local, key):
    keys = example_keys(key, index_local)
    out = mapped(consts, shard_batch(np.asarray(x_local), mesh), shard_batch(keys, mesh))
    return jax.tree.map(local_rows, out)

  return g


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) >= n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


class ResultStore(Protocol):
  """Where ``map_dataset`` keeps the per-example results of finished batches across preemptions
  (``run_lib.PartialResults``; this module touches no file). ``load()``: what an earlier run of
  the same pass finished, ``{'index': (n,), name: (n, ...)}`` with the split indices of its
  examples, ``{}`` when nothing (or something stale) was kept; called by every process.
  ``add(results)``: the same for one more finished batch (every process of the batch gathered),
  called by every process (the store writes on process 0 only)."""

  def load(self) -> dict[str, np.ndarray]: ...

  def add(self, results: dict[str, np.ndarray]) -> None: ...


def _resumable(index: np.ndarray, done: np.ndarray) -> bool:
  """Whether every process's real rows of this batch (``index``: this process's, -1 on padding)
  are among the stored ``done`` indices, agreed by all processes (each reads the store itself: a
  process that sees less, e.g. without a shared filesystem, makes every process compute)."""
  every = gather(index)
  ok = len(done) > 0 and bool(np.all(np.isin(every[every >= 0], done)))
  return bool(np.all(gather(np.asarray([ok])))) if jax.process_count() > 1 else ok


def map_dataset(fn: Callable, consts: Any, batches: Iterable, key: Array, *,
                mesh: Optional[Mesh] = None,
                on_batch: Optional[Callable[[int], None]] = None,
                store: Optional[ResultStore] = None,
                on_resume: Optional[Callable[[int], None]] = None) -> dict[str, np.ndarray]:
  """Applies the per-example ``fn(consts, xs, keys) -> dict of (B, ...)`` (see ``sharded_map``)
  to every example of this process's padded batches (``datasets.EvalBatch``: image, mask, index
  in the whole split; every process iterates the same number of batches) and returns the dict
  of every example of every process in example order (padding dropped), on every process.
  Example i uses ``fold_in(key, i)``. ``on_batch(n)``: progress, n examples of the batch over all
  processes (``EvalBatch.global_count``).

  ``store`` (``ResultStore``): each finished batch is added to it (its rows gathered from every
  process at once), and the leading batches whose examples it already holds are skipped, their
  results taken from it (``on_resume(n)``: the n examples so taken, once, before the first
  computed batch, when n > 0). As example i's result depends only on example i and
  fold_in(key, i), a resumed pass returns what an uninterrupted one would, whatever the batch
  size of either."""
  mesh = make_mesh() if mesh is None else mesh
  g = sharded_map(fn, mesh)
  n_local_dev = len(mesh.local_devices)
  consts = replicate(consts, mesh)
  stored = {"index": np.zeros((0,), np.int64), **(store.load() if store is not None else {})}
  skipping = store is not None  # every process asks (collectives), whatever it has read
  resumed, n_batches = [], 0
  index_parts, out_parts = [], []
  for b in batches:
    n_batches += 1
    n = len(b.mask)
    size = -(-n // n_local_dev) * n_local_dev  # rows divisible by this process's devices
    index = np.concatenate([np.where(b.mask, b.index, -1), np.full(size - n, -1)])
    count = (int(np.sum(b.mask)) * jax.process_count() if b.global_count is None
             else b.global_count)
    if skipping:
      skipping = _resumable(index, stored["index"])
      if skipping:
        resumed.append(count)
        continue
      if resumed and on_resume is not None:
        on_resume(sum(resumed))
    x = _pad_rows(np.asarray(b.image), size)
    out = g(consts, x, index, key)
    if store is not None:  # every process's rows now, so that process 0 can keep the batch
      index, out = gather(index), {k: gather(v) for k, v in out.items()}
      real = index >= 0
      store.add({"index": index[real], **{k: v[real] for k, v in out.items()}})
    index_parts.append(index)
    out_parts.append(out)
    if on_batch is not None:
      on_batch(count)
  if not n_batches:
    raise ValueError("map_dataset got no batches")
  if skipping and on_resume is not None:  # every batch was done before
    on_resume(sum(resumed))
  if out_parts:
    index = np.concatenate(index_parts)
    out = {k: np.concatenate([o[k] for o in out_parts]) for k in out_parts[0]}
    if store is None:
      index, out = gather(index), {k: gather(v) for k, v in out.items()}
  else:
    index, out = np.zeros((0,), np.int64), None
  if resumed:  # the stored results of the examples not computed again
    old = np.flatnonzero(~np.isin(stored["index"], index))
    if out is not None and set(out) != set(stored) - {"index"}:
      raise ValueError(f"stored results hold {sorted(set(stored) - {'index'})}, the map "
                       f"returns {sorted(out)}")
    index = np.concatenate([stored["index"][old], index])
    out = {k: (stored[k][old] if out is None else np.concatenate([stored[k][old], out[k]]))
           for k in stored if k != "index"}
  keep = np.flatnonzero(index >= 0)
  order = keep[np.argsort(index[keep], kind="stable")]
  return {k: v[order] for k, v in out.items()}
