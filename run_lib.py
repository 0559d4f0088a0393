"""Training loop and entry points for every mode of ``main.py``: the one module with file I/O.

``train(config, workdir)`` builds SDE, model, score_fn, loss and optimizer from the config, trains
with the jit-compiled (device-sharded) step of ``losses.py``, and keeps the workdir resumable:

* ``config.json`` is written on first start; a restart with a config that differs in a field that
  changes the run (anything but ``training.n_iters``, logging/snapshot frequencies, ``sampling.*``,
  ``eval.*``) is refused with an error naming the field.
* orbax checkpoints: ``checkpoints-meta/`` keeps the latest state (every
  ``snapshot_freq_for_preemption`` steps), ``checkpoints/`` keeps ``max_to_keep`` periodic ones
  (every ``snapshot_freq``). The state holds step, params, EMA params, optimizer state and the RNG;
  the data stream is a pure function of (seed, step) so a resumed run continues it exactly.
* a non-finite loss raises ``FloatingPointError("non-finite loss at step N")`` and no checkpoint is
  written for it; per-step losses go to ``train_loss.csv``, metrics to absl logging and TensorBoard
  (``tensorboard/``); at the end a final checkpoint and ``loss_curve.png``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import datasets
import sde_lib
import toy_data
from datasets import IMAGE_DATASETS
from models import get_model, registered_models
from models.utils import PARAMETERIZATIONS, init_model, score_fn_from_config

Array = jax.Array

WEIGHTINGS = ("default", "likelihood", "likelihood_is", "noise_driven", "data_driven")
TARGETS = ("dsm", "stf")
SAMPLING_METHODS = ("ode", "sde", "pc", "exponential")
OPTIMIZERS = ("adam", "adamw")
# Config fields that may change between a run and its resumption (everything else must match).
RESUMABLE_FIELDS = ("training.n_iters", "training.log_freq", "training.eval_freq",
                    "training.snapshot_freq", "training.snapshot_freq_for_preemption",
                    "training.max_to_keep")
RESUMABLE_SECTIONS = ("sampling.", "eval.")

CONFIG_FILE = "config.json"
LOSS_FILE = "train_loss.csv"
EVAL_FILE = "eval_loss.csv"
LATEST_DIR = "checkpoints-meta"
PERIODIC_DIR = "checkpoints"


# -- configuration --------------------------------------------------------------------------------
def _require(ok: bool, field: str, msg: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"{field} {msg}, got {value!r}")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def validate_config(config: ml_collections.ConfigDict) -> sde_lib._SDE:
  """Checks every field the run depends on; ValueError names the offending field. Returns the SDE.

  Touches no file, so it runs before the workdir is created or modified.
  """
  sde = sde_lib.get_sde(config)  # sde.name, eps > 0, T > eps, beta / sigma ranges
  _require(_is_int(config.seed), "seed", "must be an int", config.seed)
  tr = config.training
  for f in ("batch_size", "ref_batch_size", "n_iters", "log_freq", "eval_freq", "snapshot_freq",
            "snapshot_freq_for_preemption", "max_to_keep"):
    _require(_is_int(tr[f]) and tr[f] >= 1, f"training.{f}", "must be a positive int", tr[f])
  _require(tr.ref_batch_size >= tr.batch_size, "training.ref_batch_size",
           f"must be >= training.batch_size={tr.batch_size}", tr.ref_batch_size)
  _require(tr.weighting in WEIGHTINGS, "training.weighting", f"must be one of {WEIGHTINGS}",
           tr.weighting)
  _require(tr.target in TARGETS, "training.target", f"must be one of {TARGETS}", tr.target)
  if "eval_batch_size" in tr:
    _require(_is_int(tr.eval_batch_size) and tr.eval_batch_size >= 1, "training.eval_batch_size",
             "must be a positive int", tr.eval_batch_size)

  m = config.model
  _require(str(m.name).lower() in registered_models(), "model.name",
           f"must be one of {registered_models()}", m.name)
  _require(m.parameterization in PARAMETERIZATIONS, "model.parameterization",
           f"must be one of {PARAMETERIZATIONS}", m.parameterization)
  _require(0.0 <= m.ema_rate <= 1.0, "model.ema_rate", "must be in [0, 1]", m.ema_rate)
  _require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)", m.dropout)
  get_model(config)  # model-specific fields (widths, activation, ...) fail here, naming the field

  o = config.optim
  _require(str(o.optimizer).lower() in OPTIMIZERS, "optim.optimizer", f"must be one of {OPTIMIZERS}",
           o.optimizer)
  _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a finite positive number", o.lr)
  _require(o.warmup >= 0, "optim.warmup", "must be >= 0", o.warmup)
  _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)", o.grad_clip)

  known = tuple(toy_data.TOY_DISTRIBUTIONS) + IMAGE_DATASETS
  _require(config.data.dataset in known, "data.dataset", f"must be one of {known}",
           config.data.dataset)

  s = config.sampling
  _require(s.c >= 0 and math.isfinite(s.c), "sampling.c", "must be finite and >= 0", s.c)
  _require(s.method in SAMPLING_METHODS, "sampling.method", f"must be one of {SAMPLING_METHODS}",
           s.method)
  _require(_is_int(s.n_steps) and s.n_steps >= 1, "sampling.n_steps", "must be a positive int",
           s.n_steps)
  _require(config.eval.batch_size >= 1, "eval.batch_size", "must be >= 1", config.eval.batch_size)
  return sde


def _flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """Flattens a config (via its JSON form, so tuples and lists compare equal) to dotted keys."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  out = {}

  def rec(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        rec(v, prefix + k + ".")
      else:
        out[prefix + k] = v

  rec(config, "")
  return out


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses (ValueError naming the field) a config that differs from ``workdir/config.json`` in a
  field that changes the run. A workdir without config.json is accepted."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _flat_config(json.load(f))
  given = _flat_config(config)
  for key in sorted(set(saved) | set(given)):
    if key in RESUMABLE_FIELDS or key.startswith(RESUMABLE_SECTIONS):
      continue
    a, b = saved.get(key, "<absent>"), given.get(key, "<absent>")
    if a != b:
      raise ValueError(f"config field {key} differs from the run in {workdir} (saved {a!r}, "
                       f"given {b!r}); resume with the same value or use a new workdir")


# -- data ------------------------------------------------------------------------------------------
def train_batch_rows(config) -> int:
  """Rows drawn per step: the STF reference batch (Xu et al., Alg. 1) or the training batch."""
  return config.training.ref_batch_size if config.training.target == "stf" else config.training.batch_size


def get_data_sampler(config, split: str | None = None) -> Callable[[Array, int], Array] | Any:
  """The training data source: ``sample(key, n)`` (jitted) for a toy distribution, or a
  ``datasets.ArrayIterator`` over ``split`` (default ``data.train_split``) for image data."""
  name = config.data.dataset
  if name in toy_data.TOY_DISTRIBUTIONS:
    return jax.jit(toy_data.get_toy_distribution(name).sample, static_argnums=1)
  split = str(config.data.get("train_split", "train")) if split is None else split
  return datasets.get_dataset(config, split=split, shuffle=True, batch_size=train_batch_rows(config))


def data_stream_batch(source, data_key: Array, step: int | Array, n: int) -> Array:
  """The batch of training step ``step`` (0-based): a pure function of (data_key, step) for toy
  data and an exact seek into the shuffled epoch stream for images, so a resumed run draws exactly
  the batches an uninterrupted run would."""
  if hasattr(source, "batch_at"):
    return source.batch_at(int(step))
  return source(jax.random.fold_in(data_key, step), n)


# -- checkpoint / file helpers ---------------------------------------------------------------------
def _is_main() -> bool:
  return jax.process_index() == 0


def _checkpoint_managers(workdir: str, max_to_keep: int, read_only: bool = False):
  """(latest, periodic) orbax managers; ``read_only`` creates and deletes nothing."""
  import orbax.checkpoint as ocp
  opts = (dict(read_only=True, create=False) if read_only
          else dict(create=True, cleanup_tmp_directories=True))
  latest = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, LATEST_DIR)),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))
  periodic = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, PERIODIC_DIR)),
                                   options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                        **opts))
  return latest, periodic


def _to_saveable(state):
  """Typed PRNG keys are stored as their raw key data."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state)


def _from_saveable(restored, like):
  return jax.tree.map(
      lambda r, l: jax.random.wrap_key_data(r, impl=jax.random.key_impl(l))
      if jnp.issubdtype(l.dtype, jax.dtypes.prng_key) else r, restored, like)


def save_checkpoint(manager, state, step: int) -> None:
  import orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_to_saveable(state)),
      meta=ocp.args.JsonSave({"step": int(step), "data_position": int(step)})), force=True)


def restore_checkpoint(workdir: str, state, managers=None, step: int | None = None):
  """Restores the newest checkpoint (latest or periodic), or the one of ``step``, into the
  structure/sharding of ``state``. Returns (state, step); (state, 0) when the workdir has none.
  Without ``managers`` the workdir is opened read-only (what eval / sample modes use)."""
  import orbax.checkpoint as ocp
  own = managers is None
  if own:
    managers = _checkpoint_managers(workdir, 1, read_only=True)
  try:
    if step is not None:
      have = sorted({s for m in managers for s in m.all_steps()})
      found = [m for m in managers if step in m.all_steps()]
      if not found:
        raise FileNotFoundError(f"eval.checkpoint={step}: no such checkpoint in {workdir} "
                                f"(available steps: {have})")
      best = (step, found[0])
    else:
      best = max(((m.latest_step(), m) for m in managers if m.latest_step() is not None),
                 default=None, key=lambda sm: sm[0])
    if best is None:
      return state, 0
    step, manager = best
    saveable = _to_saveable(state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saveable)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    if int(out["meta"]["data_position"]) != step:
      raise ValueError(f"checkpoint {step} in {workdir} has data_position "
                       f"{out['meta']['data_position']}")
    return _from_saveable(out["state"], state), step
  finally:
    if own:
      for m in managers:
        m.close()


def _load_loss_history(workdir: str, upto: int, name: str = LOSS_FILE) -> list[tuple[int, float]]:
  """Per-step losses (step, loss) saved with checkpoints, steps <= ``upto`` (a later kill may have
  left rows past the checkpoint; they are recomputed identically)."""
  path = os.path.join(workdir, name)
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        parts = line.strip().split(",")
        if len(parts) != 2 or not parts[0].isdigit():
          continue  # header or a line cut by a kill
        step = int(parts[0])
        if step <= upto:
          rows[step] = float(parts[1])
  return sorted(rows.items())


def _write_loss_history(workdir: str, rows: list[tuple[int, float]], name: str = LOSS_FILE) -> None:
  """Atomically rewrites a (step, loss) file."""
  path = os.path.join(workdir, name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("step,loss\n")
    f.writelines(f"{s},{l!r}\n" for s, l in rows)
  os.replace(tmp, path)


def _append_loss_history(workdir: str, rows: list[tuple[int, float]], name: str = LOSS_FILE) -> None:
  """Appends rows (a cut last line is dropped by the rewrite at the next start)."""
  with open(os.path.join(workdir, name), "a") as f:
    f.writelines(f"{s},{l!r}\n" for s, l in rows)


def _plot_loss_curve(workdir: str, rows: list[tuple[int, float]],
                     evals: list[tuple[int, float]]) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  path = os.path.join(workdir, "loss_curve.png")
  fig, ax = plt.subplots(figsize=(7, 4))
  if rows:
    steps, vals = np.array(rows).T
    ax.plot(steps, vals, lw=0.5, alpha=0.4, label="train loss (per step)")
    w = max(1, len(vals) // 100)
    if len(vals) >= w:
      smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
      ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"train loss (mean of {w})")
  if evals:
    es, ev = np.array(evals).T
    ax.plot(es, ev, "o-", ms=3, label="held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  if rows and np.all(np.array(rows)[:, 1] > 0):
    ax.set_yscale("log")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


class _Preemption:
  """Sets a flag on SIGTERM (main thread only) so the loop can checkpoint and stop cleanly."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# -- training --------------------------------------------------------------------------------------
@jax.jit
def _finite(tree) -> Array:
  return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree),
                         jnp.asarray(True))


def _all_finite(tree) -> bool:
  """True iff every leaf of ``tree`` is finite (one jitted reduction)."""
  return bool(_finite(tree))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns ``{'losses': {step: loss}, 'eval':
  {step: loss}, 'step': final step, 'start_step': restored step}`` for the steps run now.

  Step N (1-based) is the N-th optimizer update; its batch is ``data_stream_batch(..., N - 1)``.
  """
  import losses  # deferred: validation and config checks must not depend on it

  sde = validate_config(config)
  tr = config.training
  n_rows = train_batch_rows(config)
  n_dev = jax.local_device_count()  # the mesh of losses.make_mesh()
  for name, n in (("training.batch_size", tr.batch_size), ("training.ref_batch_size", n_rows)):
    if n % n_dev:
      raise ValueError(f"{name}={n} must be divisible by the number of devices ({n_dev})")
  check_resumable(config, workdir)
  sample = get_data_sampler(config)
  # Held-out batches: a separate toy stream, or the evaluation split of an image dataset.
  heldout = sample if not hasattr(sample, "batch_at") else get_data_sampler(
      config, split=str(config.eval.split))

  # Everything derives from config.seed.
  rng = jax.random.PRNGKey(config.seed)
  init_key, state_key, data_key, eval_data_key, eval_key = jax.random.split(rng, 5)
  model = get_model(config)
  score_fn = score_fn_from_config(config, sde, model)
  event_shape = tuple(datasets.dataset_info(config).shape)
  params = init_model(model, init_key, (1,) + event_shape)
  optimizer = losses.make_optimizer(config)
  state = losses.init_train_state(params, optimizer, state_key)
  loss_fn = losses.get_loss_fn(config, sde, score_fn)
  mesh = losses.make_mesh()
  train_step = losses.make_train_step(loss_fn, optimizer, config.model.ema_rate, mesh=mesh)
  eval_step = losses.make_eval_step(losses.get_loss_fn(config, sde, score_fn, train=False),
                                    mesh=mesh)
  state = losses.replicate(state, mesh)

  # Workdir: created only now, after validation.
  os.makedirs(workdir, exist_ok=True)
  if _is_main() and not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))

  managers = _checkpoint_managers(workdir, tr.max_to_keep)
  latest_mgr, periodic_mgr = managers
  writer = None
  try:
    state, start_step = restore_checkpoint(workdir, state, managers)
    if start_step:
      logging.info("Resumed from step %d in %s", start_step, workdir)
    if int(jax.device_get(state.step)) != start_step:
      raise ValueError(f"restored state.step={int(state.step)} != checkpoint step {start_step}")
    history = _load_loss_history(workdir, start_step)
    eval_history = _load_loss_history(workdir, start_step, EVAL_FILE)
    flushed = [len(history)]  # rows of `history` already in LOSS_FILE
    if _is_main():
      # Drop rows a killed run wrote past its last checkpoint (they are recomputed identically).
      _write_loss_history(workdir, history)
      _write_loss_history(workdir, eval_history, EVAL_FILE)
      from tensorboardX import SummaryWriter
      writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

    # A fixed held-out set (its own key, never in the training stream), in training-size batches.
    n_eval_batches = max(1, tr.get("eval_batch_size", n_rows) // n_rows)
    eval_batches = [losses.shard_batch(data_stream_batch(heldout, eval_data_key, i, n_rows), mesh)
                    for i in range(n_eval_batches)]

    new_losses: dict[int, float] = {}
    evals: dict[int, float] = {}
    pending: list[tuple[int, Array]] = []
    last_t, last_step = time.time(), start_step
    t0 = last_t

    def drain() -> None:
      """Fetches the pending per-step losses; raises at the first non-finite one."""
      if not pending:
        return
      vals = np.asarray(jax.device_get([l for _, l in pending]), dtype=np.float64)
      for (s, _), v in zip(pending, vals):
        if not np.isfinite(v):
          pending.clear()
          raise FloatingPointError(f"non-finite loss at step {s}")
        new_losses[s] = float(v)
        history.append((s, float(v)))
        if writer is not None:
          writer.add_scalar("train/loss", float(v), s)
      pending.clear()

    def checkpoint(step: int, kept: bool) -> None:
      drain()
      if not _all_finite(state.params):
        raise FloatingPointError(f"non-finite parameters at step {step}")
      if _is_main():  # rows first: rows past the last committed checkpoint are dropped on restart
        _append_loss_history(workdir, history[flushed[0]:])
        flushed[0] = len(history)
        _write_loss_history(workdir, eval_history, EVAL_FILE)
      save_checkpoint(latest_mgr, state, step)
      if kept:
        save_checkpoint(periodic_mgr, state, step)

    def heldout_loss(params) -> float:
      # Same t / noise keys at every evaluation, so the curve shows the model, not resampling.
      return float(np.mean([float(eval_step(params, b, jax.random.fold_in(eval_key, i))["loss"])
                            for i, b in enumerate(eval_batches)]))

    def evaluate_heldout(step: int) -> float:
      v, v_ema = heldout_loss(state.params), heldout_loss(state.ema_params)
      if not math.isfinite(v):
        raise FloatingPointError(f"non-finite held-out loss at step {step}")
      evals[step] = v
      eval_history.append((step, v))
      if writer is not None:
        writer.add_scalar("eval/loss", v, step)
        writer.add_scalar("eval/loss_ema", v_ema, step)
      logging.info("step %d: held-out loss %.6g (EMA params %.6g)", step, v, v_ema)
      return v

    step = start_step
    with _Preemption() as preempt:
      while step < tr.n_iters:
        batch = losses.shard_batch(data_stream_batch(sample, data_key, step, n_rows), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        pending.append((step, metrics["loss"]))
        if step == start_step + 1:  # exclude compilation from the steps/s of the first window
          drain()
          last_t, last_step = time.time(), step
        if step % tr.log_freq == 0 or step == tr.n_iters:
          drain()
          now = time.time()
          rate = (step - last_step) / max(now - last_t, 1e-9)
          window = [l for _, l in history[-max(step - last_step, 1):]]
          logging.info("step %d/%d: loss %.6g (mean of last %d %.6g), %.1f steps/s, ETA %.0fs",
                       step, tr.n_iters, history[-1][1], len(window), float(np.mean(window)),
                       rate, (tr.n_iters - step) / max(rate, 1e-9))
          if writer is not None:
            writer.add_scalar("train/steps_per_sec", rate, step)
            for k, v in jax.device_get(metrics).items():  # this step's other scalar metrics
              if k != "loss" and np.ndim(v) == 0:
                writer.add_scalar(f"train/{k}", float(v), step)
          last_t, last_step = now, step
        if step % tr.eval_freq == 0 or step == tr.n_iters:
          drain()
          evaluate_heldout(step)
        kept = step % tr.snapshot_freq == 0 or step == tr.n_iters
        if kept or step % tr.snapshot_freq_for_preemption == 0 or preempt.requested:
          checkpoint(step, kept)
        if preempt.requested:
          logging.warning("SIGTERM: checkpointed step %d in %s and stopped", step, workdir)
          break
    drain()
    for m in managers:
      m.wait_until_finished()
    if step >= tr.n_iters and _is_main():
      path = _plot_loss_curve(workdir, history, eval_history)
      logging.info("Finished at step %d in %.1fs; loss curve: %s", step, time.time() - t0, path)
    return {"losses": new_losses, "eval": evals, "step": step, "start_step": start_step,
            "state": state}
  finally:
    for m in managers:
      m.close()  # waits for pending (valid) async saves
    if writer is not None:
      writer.close()


# -- evaluation and sampling -----------------------------------------------------------------------
def load_score_fn(config: ml_collections.ConfigDict, workdir: str):
  """(sde, score_fn(x, t), event_shape, step) from the workdir's checkpoint: the newest one, or
  step ``eval.checkpoint`` when it is >= 0; EMA parameters when ``eval.use_ema``. Read-only."""
  import losses
  sde = validate_config(config)
  event_shape = tuple(datasets.dataset_info(config).shape)
  model = get_model(config)
  score_fn = score_fn_from_config(config, sde, model)
  key = jax.random.PRNGKey(config.seed)
  params = init_model(model, key, (1,) + event_shape)
  optimizer = losses.make_optimizer(config)
  state = losses.init_train_state(params, optimizer, key)
  want = int(config.eval.get("checkpoint", -1))
  state, step = restore_checkpoint(workdir, state, step=None if want < 0 else want)
  if step == 0:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, LATEST_DIR)} or "
                            f"{os.path.join(workdir, PERIODIC_DIR)}: run --mode=train first")
  params = state.ema_params if config.eval.use_ema else state.params
  bound = lambda x, t: score_fn(params, x, t)  # noqa: E731  (eval mode: no dropout)
  return sde, bound, event_shape, step


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def _save_png(path: str, samples: np.ndarray, config, reference: np.ndarray | None = None) -> None:
  """Scatter plot (1-D histogram) for toy data, an image grid for images."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  info = datasets.dataset_info(config)
  if info.is_image:
    import evaluation
    grid = evaluation.image_grid(np.clip(datasets.inverse_scale(samples, info.centered), 0, 1),
                                 nrow=int(math.ceil(math.sqrt(len(samples)))))
    from PIL import Image
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)
    return
  fig, ax = plt.subplots(figsize=(5, 5))
  if samples.shape[-1] == 1:
    bins = 100
    if reference is not None:
      ax.hist(reference[:, 0], bins=bins, density=True, alpha=0.5, label="data")
    ax.hist(samples[:, 0], bins=bins, density=True, alpha=0.5, label="generated")
  else:
    if reference is not None:
      ax.scatter(reference[:, 0], reference[:, 1], s=1, alpha=0.3, label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5, label="generated")
    ax.set_aspect("equal")
  ax.legend()
  ax.set_title(f"{config.data.dataset}: {config.sampling.method}, c={config.sampling.c}, "
               f"T={config.sde.T}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def generate(config: ml_collections.ConfigDict, sde, score_fn, event_shape, n: int, key):
  """n samples in batches of ``sampling.batch_size`` with the configured sampler; (samples, nfe)."""
  import samplers
  bs = int(config.sampling.batch_size)
  sample_fn = jax.jit(samplers.get_sampler(config, sde, (bs,) + tuple(event_shape)),
                      static_argnums=0)
  out, nfe = [], []
  t0 = time.time()
  for i in range(int(math.ceil(n / bs))):
    x, stats = sample_fn(score_fn, jax.random.fold_in(key, i))
    out.append(np.asarray(x))
    nfe.append(float(np.mean(stats["nfe"])))
    logging.info("sampling batch %d/%d: NFE %.0f, %.1fs elapsed", i + 1, int(math.ceil(n / bs)),
                 nfe[-1], time.time() - t0)
  return np.concatenate(out)[:n], float(np.mean(nfe))


def sample(config: ml_collections.ConfigDict, workdir: str, sample_folder: str = "samples"):
  """Draws ``sampling.n_samples`` samples from the checkpoint: ``samples.npz``, ``samples.png`` and
  ``report.json`` (sampler, c, T, NFE) in ``workdir/samples``."""
  sde, score_fn, event_shape, step = load_score_fn(config, workdir)
  out_dir = os.path.join(workdir, sample_folder)
  os.makedirs(out_dir, exist_ok=True)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A)
  t0 = time.time()
  x, nfe = generate(config, sde, score_fn, event_shape, int(config.sampling.n_samples), key)
  report = {"step": step, "n_samples": len(x), "method": config.sampling.method,
            "c": float(config.sampling.c), "T": float(config.sde.T), "eps": float(config.sde.eps),
            "nfe": nfe, "seconds": time.time() - t0, "finite": bool(np.all(np.isfinite(x)))}
  np.savez(os.path.join(out_dir, "samples.npz"), samples=x)
  reference = _toy_reference(config, len(x))
  _save_png(os.path.join(out_dir, "samples.png"), x, config, reference)
  _write_json(os.path.join(out_dir, "report.json"), report)
  logging.info("samples: %s", report)
  return report


def _toy_reference(config, n: int) -> np.ndarray | None:
  name = config.data.dataset
  if name not in toy_data.TOY_DISTRIBUTIONS:
    return None
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xDA7A)
  return np.asarray(toy_data.get_toy_distribution(name).sample(key, n))


def gmm_baseline_bpd(config, n_components=(1, 2, 4, 8, 16)) -> dict[str, Any]:
  """Classical baseline on the same dequantized, scaled data: scikit-learn GaussianMixture (full
  covariance), the component count chosen on the validation split, bits/dim on the eval split."""
  import likelihood
  from sklearn.mixture import GaussianMixture
  info = datasets.dataset_info(config)
  rng = np.random.default_rng(config.seed)

  def split(name):
    levels, _, _ = datasets.load_levels(config, name)
    y = datasets.scale_images(levels, info.num_grey_levels, info.centered,
                              noise=rng.uniform(size=levels.shape))
    return np.asarray(y, np.float64).reshape(len(levels), -1)

  train, val, test = (split(s) for s in ("train_without_validation", "validation",
                                         str(config.eval.split)))
  scores = {}
  for k in n_components:
    gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=0).fit(train)
    scores[k] = (float(np.mean(likelihood.bits_per_dim(gmm.score_samples(val), info.shape,
                                                       centered=info.centered,
                                                       num_levels=info.num_grey_levels))), gmm)
  best = min(scores, key=lambda k: scores[k][0])
  gmm = GaussianMixture(best, covariance_type="full", reg_covar=1e-4, random_state=0).fit(
      np.concatenate([train, val]))
  bpd = likelihood.bits_per_dim(gmm.score_samples(test), info.shape, centered=info.centered,
                                num_levels=info.num_grey_levels)
  return {"gmm_bpd": float(np.mean(bpd)), "gmm_components": int(best),
          "gmm_validation_bpd": {str(k): v[0] for k, v in scores.items()},
          "uniform_bpd": float(math.log2(info.num_grey_levels))}


def evaluate(config: ml_collections.ConfigDict, workdir: str, eval_folder: str = "eval"):
  """Evaluates the checkpoint and writes ``workdir/eval/report.json`` (+ samples PNG / npz):

  * image data: bits/dim of the probability-flow ODE over the whole ``eval.split`` (uniform
    dequantization, padded last batch), the ScoreFlow bound in bits/dim, samples with NFE, the
    digits classifier metrics (digits) or FID / IS (``eval.fid`` with Inception weights), and for
    digits the GaussianMixture baseline;
  * toy data: NLL (nats) of a held-out sample by the ODE, the bound, the exact NLL where the
    distribution has a density, and histogram divergences of generated vs true samples.
  """
  import likelihood
  sde, score_fn, event_shape, step = load_score_fn(config, workdir)
  ev = config.eval
  info = datasets.dataset_info(config)
  out_dir = os.path.join(workdir, eval_folder)
  os.makedirs(out_dir, exist_ok=True)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
  k_ll, k_bound, k_sample = jax.random.split(key, 3)
  report: dict[str, Any] = {"step": step, "dataset": info.name, "split": str(ev.split),
                            "sde": config.sde.name, "T": float(config.sde.T),
                            "eps": float(config.sde.eps)}
  divergence = "exact" if str(ev.divergence) == "exact" else "hutchinson"

  @jax.jit
  def logp_fn(y, k):
    return likelihood.log_likelihood(score_fn, sde, y, k, divergence=divergence,
                                     probe=str(ev.hutchinson_probe), rtol=float(ev.rtol),
                                     atol=float(ev.atol))

  @jax.jit
  def bound_fn(y, k):
    return likelihood.scoreflow_bound(score_fn, sde, y, k,
                                      n_time_samples=int(ev.get("bound_time_samples", 64)))["nll_bound"]

  nfe_all: list[float] = []

  def ll_only(y, k):
    out = logp_fn(y, k)
    nfe_all.append(float(np.mean(out["nfe"])))
    return out["logp"]

  def progress(name, batches):
    t0 = time.time()
    n = len(batches)
    for i, b in enumerate(batches):
      yield b
      el = time.time() - t0
      logging.info("%s: batch %d/%d, %.1fs elapsed, ETA %.0fs", name, i + 1, n, el,
                   el / (i + 1) * (n - i - 1))

  with jax.enable_x64(bool(ev.get("float64", False))):
    if info.is_image:
      eval_batches = [b.image[b.mask] for b in datasets.get_eval_dataset(config, as_levels=True)]
      common = dict(batch_size=int(ev.batch_size), num_levels=info.num_grey_levels,
                    centered=info.centered)
      if ev.bpd:
        r = likelihood.dataset_bits_per_dim(ll_only, progress("bits/dim (ODE)", eval_batches),
                                            k_ll, **common)
        report.update(bpd=float(r["bpd"]), bpd_stderr=float(r["stderr"]), n_examples=int(r["n"]),
                      likelihood_nfe=float(np.mean(nfe_all)))
      if ev.bound:
        r = likelihood.dataset_bits_per_dim(bound_fn_neg(bound_fn), progress("bound", eval_batches),
                                            k_bound, **common)
        report.update(bound_bpd=float(r["bpd"]), bound_bpd_stderr=float(r["stderr"]))
      if info.name == "digits":
        report.update(gmm_baseline_bpd(config))
    else:
      dist = toy_data.get_toy_distribution(info.name)
      x = jnp.asarray(_toy_reference(config, int(ev.get("num_likelihood_examples", 1000))))
      if ev.bpd:
        out = logp_fn(x, k_ll)
        report.update(nll=float(-jnp.mean(out["logp"])), likelihood_nfe=float(jnp.mean(out["nfe"])))
      if ev.bound:
        report["nll_bound"] = float(jnp.mean(bound_fn(x, k_bound)))
      if getattr(dist, "has_density", False):
        report["nll_exact_data"] = float(-jnp.mean(dist.log_prob(x)))
        report["nll_exact_p_eps"] = float(-jnp.mean(dist.marginal_log_prob(sde, x, sde.eps)))

  n = int(ev.num_samples)
  samples, nfe = generate(config, sde, score_fn, event_shape, n, k_sample)
  report.update(sampling_method=config.sampling.method, sampling_c=float(config.sampling.c),
                sampling_nfe=nfe, n_samples=n)
  np.savez(os.path.join(out_dir, "samples.npz"), samples=samples)
  reference = _toy_reference(config, n)
  _save_png(os.path.join(out_dir, "samples.png"), samples, config, reference)
  import evaluation
  if reference is not None:
    report.update({f"hist_{k}": v for k, v in
                   evaluation.histogram_divergences(reference, samples).items()})
  elif info.name == "digits":
    levels, _, _ = datasets.load_levels(config, str(ev.split))
    report.update({f"digits_{k}": v for k, v in evaluation.digits_metrics(
        evaluation.train_digits_classifier(), datasets.inverse_scale(samples, info.centered),
        levels.astype(np.float32) / (info.num_grey_levels - 1)).items()})
  if info.is_image and ev.fid:
    variables = evaluation.load_inception_params(str(ev.inception_weights))
    ref = evaluation.load_stats(str(ev.fid_stats)) if ev.fid_stats else None
    report.update(evaluation.inception_metrics(
        variables, np.clip(datasets.inverse_scale(samples, info.centered), 0, 1), ref))
  _write_json(os.path.join(out_dir, "report.json"), report)
  for k in sorted(report):
    logging.info("eval %s = %s", k, report[k])
  return report


def bound_fn_neg(bound_fn):
  """The bound on -log p as a 'log p' function for ``dataset_bits_per_dim`` (which negates)."""
  return lambda y, k: -bound_fn(y, k)


def fid_stats(config: ml_collections.ConfigDict, workdir: str):
  """Reference FID statistics of ``eval.split`` of an image dataset: Inception pool3 features of
  every example (weights ``eval.inception_weights``), written as ``workdir/fid_stats_<dataset>_
  <split>.npz`` with ``mu`` and ``sigma`` (the common format; set ``eval.fid_stats`` to it)."""
  import evaluation
  validate_config(config)
  info = datasets.dataset_info(config)
  if not info.is_image:
    raise ValueError(f"data.dataset={info.name!r}: FID statistics need an image dataset")
  variables = evaluation.load_inception_params(str(config.eval.inception_weights))
  images = np.concatenate([b.image[b.mask] for b in datasets.get_eval_dataset(config, as_levels=True)])
  images = images.astype(np.float32) / (info.num_grey_levels - 1)
  feats = evaluation.inception_features(variables, images).pool3
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, f"fid_stats_{info.name}_{config.eval.split}.npz")
  evaluation.save_stats(path, *evaluation.compute_statistics(feats))
  logging.info("FID statistics of %d %s/%s images written to %s", len(images), info.name,
               config.eval.split, path)
  return path


MODES: dict[str, Callable[[ml_collections.ConfigDict, str], Any]] = {
    "train": train,
    "eval": evaluate,
    "sample": sample,
    "fid_stats": fid_stats,
}
