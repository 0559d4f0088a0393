"""``--mode=train``: trains (or resumes) the run of a workdir.

Step N (1-based) is the N-th optimizer update; its batch is ``run_lib.data_stream_batch(..., N - 1)``,
so a run killed at any point (even mid-checkpoint) and resumed is bit-identical to an uninterrupted
one. Checkpoints (``checkpoints.CheckpointStore``): the latest every
``training.snapshot_freq_for_preemption`` steps, ``max_to_keep`` kept every ``snapshot_freq``, never a
non-finite state; SIGTERM checkpoints and stops. Losses: ``train_loss.csv``, ``eval_loss.csv``,
TensorBoard, and ``loss_curve.png`` at the end. One writer: the workdir's 'train' lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

import checkpoints
import datasets
import run_lib
import sde_lib
import training
from modes import register_mode


@dataclasses.dataclass
class _Run:
  """Everything a training run builds from its config before touching the workdir."""
  state: Any
  train_step: Callable
  eval_step: Callable
  shard: Callable
  sample: Any
  heldout: Any
  n_rows: int
  eval_key: jax.Array


@register_mode("train")
def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns ``{'losses': {step: loss}, 'eval':
  {step: loss}, 'step': final step, 'start_step': restored step, 'state': final state}``."""
  cfg = run_lib.validate_config(config)  # the typed sections (config itself goes to files)
  sde = sde_lib.get_sde(cfg.sde)
  _check_divisible(cfg)
  run_lib.check_resumable(config, workdir)
  run = _build(cfg, sde)
  checkpoints.check_writable(workdir)
  with checkpoints.workdir_lock(workdir, "train"):
    run_lib.write_config(config, workdir)
    with run_lib.open_checkpoints(cfg, workdir) as store:
      state, start_step = _restore(store, run.state, workdir)
      log = run_lib.LossLog(workdir, start_step)
      try:
        state, step = _loop(cfg, run, state, start_step, store, log)
        store.wait_until_finished()
      finally:
        log.close()
  if step >= cfg.training.n_iters and run_lib.is_main():
    path = _plot_loss_curve(workdir, log.train, log.eval)
    logging.info("Finished at step %d; loss curve: %s", step, path)
  return {"losses": log.new, "eval": log.new_eval, "step": step, "start_step": start_step,
          "state": state}


def _check_divisible(config) -> None:
  n_dev = training.make_mesh().size
  for name, n in (("training.batch_size", config.training.batch_size),
                  ("training.ref_batch_size", run_lib.train_batch_rows(config))):
    if n % n_dev:
      raise ValueError(f"{name}={n} must be divisible by the number of devices ({n_dev})")
  k, b = config.training.grad_accum_steps, config.training.batch_size
  if b % (k * n_dev):
    raise ValueError(f"training.batch_size={b} must be divisible by training.grad_accum_steps="
                     f"{k} x the number of devices ({n_dev}): every device trains B / (k "
                     "devices) rows of each micro-batch")


def _build(config, sde) -> _Run:
  """Model, optimizer, jitted (sharded) train / eval steps and data sources of the typed config
  (``run_lib.validate_config``); all from config.seed."""
  import losses
  from models import get_model
  from models.utils import init_model, score_fn_from_config
  init_key, state_key, _, _, eval_key = jax.random.split(
      jax.random.PRNGKey(config.seed), 5)
  model = get_model(config)
  score_fn = score_fn_from_config(config.model, sde, model)
  event_shape = tuple(datasets.dataset_info(config).shape)
  optimizer = training.make_optimizer(config.optim)
  mesh = training.make_mesh()
  state = training.init_train_state(init_model(model, init_key, (1,) + event_shape), optimizer,
                                    state_key)
  sample = run_lib.get_data_sampler(config)
  # Held-out batches: a separate toy stream, or the evaluation split of an image dataset.
  heldout = run_lib.get_data_sampler(config, split=config.eval.split)
  return _Run(
      state=training.replicate(state, mesh),
      train_step=training.make_train_step(losses.get_loss_fn(config.training, sde, score_fn),
                                          optimizer, config.model.ema_rate, mesh=mesh,
                                          accum_steps=config.training.grad_accum_steps),
      eval_step=training.make_eval_step(
          losses.get_loss_fn(config.training, sde, score_fn, train=False), mesh=mesh),
      shard=lambda b: training.shard_batch(b, mesh), sample=sample, heldout=heldout,
      n_rows=run_lib.train_batch_rows(config), eval_key=eval_key)


def _restore(store, state, workdir: str):
  state, start_step = store.restore(state)
  if start_step:
    logging.info("Resumed from step %d in %s", start_step, workdir)
  if int(jax.device_get(state.step)) != start_step:
    raise ValueError(f"restored state.step={int(state.step)} != checkpoint step {start_step}")
  return state, start_step


def _loop(config, run: _Run, state, start_step: int, store, log: run_lib.LossLog):
  """The training steps from ``start_step`` to ``training.n_iters`` (or SIGTERM)."""
  tr = config.training
  heldout = _HeldOut(run, config, log)

  def save(step: int, state) -> None:
    log.flush()
    store.save(step, state, {"data_position": step})

  batches = datasets.ThreadedIterator(_StepBatches(run, start_step, tr.n_iters), 2)
  with contextlib.closing(batches):
    return training.train_loop(
        run.train_step, state, batches, start=start_step, stop=tr.n_iters, title="train",
        log_every=tr.log_freq, on_loss=log.add, on_log=functools.partial(_log_scalars, log),
        evaluate=heldout.evaluate, eval_every=tr.eval_freq,
        save=save, save_every=(tr.snapshot_freq, tr.snapshot_freq_for_preemption))


class _StepBatches:
  """The sharded batches of steps ``start``, ``start + 1``, ... < ``stop`` (``run_lib.
  data_stream_batch``, a pure function of the step), for a ``datasets.ThreadedIterator`` that
  prepares and transfers them two steps ahead while the device computes."""

  def __init__(self, run: _Run, start: int, stop: int):
    self.run, self.step, self.stop = run, start, stop

  def __iter__(self):
    return self

  def __next__(self):
    if self.step >= self.stop:
      raise StopIteration
    batch = self.run.shard(run_lib.data_stream_batch(self.run.sample, self.step))
    self.step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state) -> None:
    self.step = int(state["step"])


def _log_scalars(log: run_lib.LossLog, step: int, metrics: dict) -> None:
  """This step's scalar metrics but the loss (logged per step) and the steps/s, to TensorBoard."""
  for k, v in metrics.items():
    if k != "loss" and np.ndim(v) == 0:
      log.scalar(f"train/{k}", float(v), step)


class _HeldOut:
  """A fixed held-out set (its own key, never in the training stream) in training-size batches;
  the same t / noise keys at every evaluation, so the curve shows the model, not resampling."""

  def __init__(self, run: _Run, config, log: run_lib.LossLog):
    n_batches = max(1, config.training.eval_batch_size // run.n_rows)
    self.run, self.log = run, log
    self.batches = [run.shard(run_lib.data_stream_batch(run.heldout, i)) for i in range(n_batches)]

  def loss(self, params) -> float:
    keys = [jax.random.fold_in(self.run.eval_key, i) for i in range(len(self.batches))]
    return float(np.mean([float(self.run.eval_step(params, b, k)["loss"])
                          for b, k in zip(self.batches, keys)]))

  def evaluate(self, step: int, state) -> float:
    v, v_ema = self.loss(state.params), self.loss(state.ema_params)
    if not math.isfinite(v):
      raise FloatingPointError(f"non-finite held-out loss at step {step}")
    self.log.add_eval(step, v)
    self.log.scalar("eval/loss_ema", v_ema, step)
    logging.info("step %d: held-out loss %.6g (EMA params %.6g)", step, v, v_ema)
    return v


def _plot_loss_curve(workdir: str, rows, evals) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  path = os.path.join(workdir, "loss_curve.png")
  fig, ax = plt.subplots(figsize=(7, 4))
  if rows:
    steps, vals = np.array(rows).T
    ax.plot(steps, vals, lw=0.5, alpha=0.4, label="train loss (per step)")
    w = max(1, len(vals) // 100)
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
