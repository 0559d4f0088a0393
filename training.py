"""The one training loop (score model, classifier, dequantizer, flow prior) and what it steps: the
optimizer, the train state and the device-sharded train / eval steps.

:func:`train_loop` owns what every fit shares: the finiteness check of every step's loss, the
metrics line (loss, steps/s, ETA), ``progress.Progress``, the checkpoint cadence, SIGTERM
(:class:`Preemption`: checkpoint and stop) and resumption from ``start``. A caller passes its step
function, its state, its batches and what to do at its cadences (save, evaluate, record a loss);
its files are its own (the loop touches none).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
import types
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import parallel
import pytrees
from progress import Progress

Array = jax.Array
Params = Any
LossFn = Callable[[Params, Array, Array], tuple[Array, dict]]  # (params, batch, key) -> loss, metrics
StepFn = Callable[[Any, Any], tuple[Any, dict]]  # (state, batch) -> state, metrics with 'loss'

OPTIMIZERS = ("adam", "adamw")  # optim.optimizer (make_optimizer)


# -- optimizer, train state and the sharded steps -------------------------------------------------------
@pytrees.dataclass
class TrainState:
  step: Array
  params: Params
  ema_params: Params
  opt_state: Any
  rng: Array


def make_optimizer(optim) -> optax.GradientTransformation:
  """optax chain from the ``optim`` config section (typed, ``config_schema.validate(config).optim``):
  clip_by_global_norm(optim.grad_clip) (skipped if 0), Adam(optim.beta1, optim.beta2, optim.eps),
  decoupled weight decay if optim.weight_decay > 0, learning rate optim.lr with linear warmup
  lr * min((step + 1) / optim.warmup, 1) (score_sde's schedule, first step nonzero). 'adam' and
  'adamw' build the same chain."""
  o = optim
  lr, warmup, clip, wd = o.lr, o.warmup, o.grad_clip, o.weight_decay

  def schedule(count):
    if warmup == 0:
      return jnp.asarray(lr)
    return lr * jnp.minimum((count + 1) / warmup, 1.0)

  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  parts.append(optax.scale_by_adam(b1=o.beta1, b2=o.beta2, eps=o.eps))
  if wd > 0:
    parts.append(optax.add_decayed_weights(wd))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def warmup_cosine_adam(lr: float, steps: int, grad_clip: float = 1.0,
                       warmup: int = 100) -> optax.GradientTransformation:
  """Adam with linear warmup and cosine decay of ``lr`` to lr / 100 over ``steps``, global-norm
  clipping: the optimizer of the flow prior and of the dequantizer."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps // 2 or 1),
                                                max(steps, 2), lr * 1e-2)
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(schedule))


def init_train_state(params: Params, optimizer: optax.GradientTransformation,
                     rng: Array, mesh: Optional[Mesh] = None) -> TrainState:
  """Step 0, EMA initialised to the parameters. With ``mesh`` the state is placed replicated on
  it, as the train step returns it (otherwise the first two steps compile twice)."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     ema_params=jax.tree.map(jnp.array, params),
                     opt_state=optimizer.init(params), rng=rng)
  return state if mesh is None else replicate(state, mesh)


# The mesh and the placement of batches / state: one place, ``parallel``.
make_mesh, shard_batch, replicate = parallel.make_mesh, parallel.shard_batch, parallel.replicate


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, ema_rate: float,
                    mesh: Optional[Mesh] = None, donate: bool = False, accum_steps: int = 1):
  """One ``jax.jit`` function (state, batch) -> (state, metrics), data-parallel over ``mesh``
  (default: all local devices): the batch is sharded on axis 'data', state replicated. The jitted
  program has global semantics, so XLA gathers whatever rows a shard needs (all n STF reference
  points for every example) and all-reduces the gradient. On CPU, ``parallel.compiler_options``
  (Eigen convolutions: 1.3-1.8x faster). The step's key is fold_in(rng, step);
  EMA: ema <- r ema + (1 - r) params (Song et al. 2021, Appendix).

  ``accum_steps`` k > 1 (``training.grad_accum_steps``): gradient accumulation. ``loss_fn`` must
  take ``micro=(j, k)`` (``losses.get_loss_fn``'s does); a ``lax.scan`` over j sums the k
  micro-batch gradients (live memory: one micro-batch's activations and one gradient
  accumulator), divides by k, then the one optimizer update, EMA and step count of the step
  follow as for one batch (clipping sees the averaged gradient). Metrics: the mean over the
  micro-batches ('*_min' / '*_max' metrics: min / max), grad_norm of the averaged gradient."""
  mesh = make_mesh() if mesh is None else mesh
  repl = NamedSharding(mesh, PartitionSpec())
  data = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  rate = float(ema_rate)
  value_and_grad = _accumulated_value_and_grad(loss_fn, accum_steps)

  def step_fn(state: TrainState, batch: Array) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = value_and_grad(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, state.ema_params, params)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new, metrics

  return jax.jit(step_fn, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=(0,) if donate else (),
                 compiler_options=parallel.compiler_options(mesh))


def _accumulated_value_and_grad(loss_fn: LossFn, k: int):
  """(params, batch, key) -> ((loss, metrics), grads) of ``loss_fn`` over the whole batch, as the
  mean of its k micro-batches (``loss_fn(..., micro=(j, k))``) for k > 1."""
  assert isinstance(k, int) and k >= 1, f"accum_steps must be an int >= 1, got {k!r}"
  if k == 1:
    return jax.value_and_grad(loss_fn, has_aux=True)

  def value_and_grad(params: Params, batch: Array, key: Array):
    micro_vg = jax.value_and_grad(lambda p, j: loss_fn(p, batch, key, micro=(j, k)), has_aux=True)

    def body(acc, j):
      (loss, metrics), grads = micro_vg(params, j)
      return jax.tree.map(jnp.add, acc, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, (losses, metrics) = jax.lax.scan(body, zeros, jnp.arange(k))
    grads = jax.tree.map(lambda g: g / k, total)
    return (jnp.mean(losses), _combine_metrics(metrics)), grads

  return value_and_grad


def _combine_metrics(metrics: dict) -> dict:
  """One step's metrics from the (k,)-stacked metrics of its micro-batches: min of '*_min', max of
  '*_max', mean of the rest (equal-size micro-batches: the batch's mean)."""
  reduce = lambda name: (jnp.min if name.endswith("_min") else  # noqa: E731
                         jnp.max if name.endswith("_max") else jnp.mean)
  return {name: reduce(name)(v, axis=0) for name, v in metrics.items()}


def make_eval_step(loss_fn: LossFn, mesh: Optional[Mesh] = None):
  """jit (params, batch, key) -> metrics of ``loss_fn`` (build it with ``train=False``), batch
  sharded on 'data', params replicated. Pass ``state.ema_params`` to evaluate the EMA model."""
  mesh = make_mesh() if mesh is None else mesh
  repl = NamedSharding(mesh, PartitionSpec())
  data = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))

  def eval_fn(params: Params, batch: Array, key: Array) -> dict:
    loss, metrics = loss_fn(params, batch, key)
    return dict(metrics, loss=loss)

  return jax.jit(eval_fn, in_shardings=(repl, data, repl), out_shardings=repl,
                 compiler_options=parallel.compiler_options(mesh))


# -- the loop --------------------------------------------------------------------------------------
def train_loop(step_fn: StepFn, state, batches: Iterator, *, start: int, stop: int, title: str,
               log_every: int, save: Optional[Callable[[int, Any], None]] = None,
               save_every: Sequence[int] = (), evaluate: Optional[Callable[[int, Any], None]] = None,
               eval_every: int = 0, on_loss: Optional[Callable[[int, float], None]] = None,
               on_log: Optional[Callable[[int, dict], None]] = None, show: Sequence[str] = (),
               stride: int = 1):
  """Steps ``state`` from step ``start`` to ``stop`` (or SIGTERM); returns (state, last step).

  Each call ``step_fn(state, next(batches))`` does ``stride`` steps (fewer at the end) and returns
  metrics with the device scalar 'loss'. Every loss is fetched (one transfer per metrics line),
  checked finite (FloatingPointError naming the step) and given to ``on_loss(step, loss)`` in step
  order. Every ``log_every`` steps and at ``stop``: the metrics line (with the ``show`` metrics) and
  ``on_log(step, host metrics + steps_per_sec)``; every ``eval_every``: ``evaluate(step, state)``;
  every multiple of a ``save_every`` entry, at ``stop`` and on SIGTERM (then it stops):
  ``save(step, state)``. Without ``save``, SIGTERM is left alone. The first call's time (the
  compilation) is left out of the steps/s."""
  meter = _Meter(title, start, stop, on_loss)
  with _preemption(save is not None) as preempt, Progress(title, stop - start, "steps") as progress:
    step = start
    while step < stop:
      state, metrics = step_fn(state, next(batches))
      before, step = step, min(step + stride, stop)
      meter.add(step, metrics["loss"])
      if before == start:
        meter.drain()
        meter.reset(step)
      if _due(step, log_every, stop):
        meter.log(step, jax.device_get(metrics), show, on_log)
      if evaluate is not None and _due(step, eval_every, stop):
        meter.drain()
        evaluate(step, state)
      if save is not None and (any(_due(step, n, stop) for n in save_every) or step == stop
                               or preempt.requested):
        meter.drain()
        save(step, state)
      progress.update(step - before, **meter.postfix)
      if preempt.requested:
        logging.warning("%s: SIGTERM: checkpointed step %d and stopped", title, step)
        break
  meter.drain()
  return state, step


def _due(step: int, every: int, stop: int) -> bool:
  return step == stop or (every > 0 and step % every == 0)


class _Meter:
  """The device losses of the steps since the last fetch, and the window of the metrics line."""

  def __init__(self, title: str, start: int, stop: int, on_loss):
    self.title, self.stop, self.on_loss = title, stop, on_loss
    self.pending: list[tuple[int, Array]] = []
    self.window: list[float] = []
    self.postfix: dict[str, float] = {}
    self.reset(start)

  def add(self, step: int, loss: Array) -> None:
    self.pending.append((step, loss))

  def drain(self) -> None:
    """Fetches the pending losses; FloatingPointError at the first non-finite one."""
    pending, self.pending = self.pending, []
    values = np.asarray(jax.device_get([l for _, l in pending]), np.float64)
    for (step, _), v in zip(pending, values):
      if not np.isfinite(v):
        raise FloatingPointError(f"{self.title}: non-finite loss at step {step}")
      self.window.append(float(v))
      self.postfix["loss"] = float(v)
      if self.on_loss is not None:
        self.on_loss(step, float(v))

  def reset(self, step: int) -> None:
    self.step, self.t, self.window = step, time.time(), []

  def log(self, step: int, metrics: dict, show: Sequence[str], on_log) -> None:
    self.drain()
    n, mean = len(self.window), float(np.mean(self.window or [self.postfix["loss"]]))
    rate = (step - self.step) / max(time.time() - self.t, 1e-9)
    self.postfix.update({k: float(metrics[k]) for k in show})
    extra = "".join(f", {k} {float(metrics[k]):.4g}" for k in show)
    logging.info("%s step %d/%d: loss %.6g (mean of last %d %.6g)%s, %.1f steps/s, ETA %.0f s",
                 self.title, step, self.stop, self.postfix["loss"], max(n, 1), mean, extra, rate,
                 (self.stop - step) / max(rate, 1e-9))
    if on_log is not None:
      on_log(step, dict(metrics, steps_per_sec=rate))
    self.reset(step)


class Preemption:
  """Sets ``requested`` on SIGTERM (main thread only) so the loop can checkpoint and stop."""

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


def _preemption(handled: bool):
  return Preemption() if handled else contextlib.nullcontext(types.SimpleNamespace(requested=False))
