"""``--mode=fit_dequantizer``: variational dequantization q_phi(u | k) of Song et al. 2021b
("Maximum likelihood training of score-based diffusion models" [SF], Sec. 5.2, eq. 13; App. C:
trained "while fixing the score-based model") fitted to a workdir's trained score model and saved
in ``workdir/dequantizer/`` (verified arrays + ``meta.json``, also ``report.json``).

The objective is [SF] eq. 13 with the per-datapoint ScoreFlow bound in place of log p (eq. 39, with
the eps correction and importance-sampled t: ``likelihood.scoreflow_bound``):

    min_phi  E_k E_{u ~ q_phi(.|k)}[ bound(y) + log q_phi(u | k) ] - D log|dy/du|,  y = scale(k, u),

the log-det of the data scaling being the one of ``likelihood.bits_per_dim`` (uniform path).
Resumable: every ``dequantizer.save_freq`` steps the parameters and the optimizer state are saved;
a restart continues from the last saved step (same architecture required). Minibatches and keys
are pure functions of (seed, step), so a resumed fit draws what an uninterrupted one would.

A SIGTERM saves the step reached and stops (``training.train_loop``); the rerun resumes from it.
``--mode=eval`` with ``eval.dequantization='variational'`` loads it (``dequantization.load_fitted``).
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import checkpoints
import datasets
import dequantization
import run_lib
import sde_lib
import training
from modes import register_mode

_LOG_EVERY = 10  # steps between loss fetches (metrics lines, non-finite check)


def _require_images(config) -> datasets.DatasetInfo:
  info = datasets.dataset_info(config)
  if not info.is_image:
    raise ValueError(f"data.dataset={info.name!r}: variational dequantization needs discrete "
                     "image data (toy data are continuous)")
  return info


@register_mode("fit_dequantizer")
def fit_dequantizer(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fits q_phi(u | k) by [SF] eq. 13 + eq. 39 with the score model frozen; returns the report."""
  cfg = run_lib.validate_config(config)
  sde = sde_lib.get_sde(cfg.sde)
  info = _require_images(cfg)
  run_lib.require_checkpoint(workdir)
  out_dir = checkpoints.check_writable(os.path.join(workdir, run_lib.DEQUANTIZER_DIR))
  with checkpoints.workdir_lock(workdir, run_lib.DEQUANTIZER_DIR):
    score = run_lib.load_score_model(config, workdir)
    levels = jnp.asarray(datasets.load_levels(cfg, cfg.data.train_split)[0])
    model = dequantization.from_section(cfg.dequantizer, info.shape, info.num_grey_levels)
    k_init, k_data, k_train = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xDE0), 3)
    variables = dequantization.init_variables(model, k_init, levels[:256])
    params = variables["params"]
    constants = {k: v for k, v in variables.items() if k != "params"}
    optimizer = dequantization.make_optimizer(cfg.dequantizer.lr, cfg.dequantizer.n_iters)
    opt_state, start, history = optimizer.init(params), 0, []
    if os.path.exists(os.path.join(out_dir, checkpoints.TREE_META)):
      params, constants, opt_state, meta = dequantization.restore_fit(
          out_dir, model, cfg.sde.name, float(sde.T), params, constants, opt_state)
      start, history = int(meta["step"]), [(int(s), float(v)) for s, v in meta["history"]]
    state = (params, opt_state)
    step_fn = _step_fn(cfg, sde, score, model, constants, optimizer, info)

    def save(step: int, state) -> None:
      checkpoints.save_tree(out_dir, dequantization.fit_tree(state[0], constants, state[1]),
                            _meta(cfg, sde, model, score.step, step, history))

    state, step = training.train_loop(
        step_fn, state, _batches(cfg, levels, k_data, k_train, start), start=start,
        stop=cfg.dequantizer.n_iters, title="fit dequantizer (ScoreFlow eq. 13 + 39)",
        log_every=_LOG_EVERY, show=("loss_bpd",), on_loss=lambda s, v: history.append((s, v)),
        save=save, save_every=(cfg.dequantizer.save_freq,))
    report = _report(cfg, sde, score.step, step, history)
    if step >= cfg.dequantizer.n_iters:
      run_lib.write_json(os.path.join(out_dir, "report.json"), report)
  logging.info("dequantizer fitted: %d steps, final objective %.4f bits/dim", report["step"],
               report["final_loss_bpd"])
  return report


def _step_fn(config, sde, score, model, constants, optimizer, info) -> training.StepFn:
  """(params, opt_state), (levels, key) -> the next state and the loss (nats/dim, and bits/dim)."""
  import likelihood
  n_t = config.dequantizer.bound_time_samples

  def log_p_fn(y, key):  # minus the ScoreFlow bound, eq. 39 (eps correction, IS of t); the
    # prior and eps-correction expectations use as many draws as the time integral
    return -likelihood.scoreflow_bound(score.score_fn, sde, y, key, prior=score.prior,
                                       n_time_samples=n_t, n_prior_samples=n_t)["nll_bound"]

  step = dequantization.make_train_step(model, constants, log_p_fn, optimizer,
                                        num_levels=info.num_grey_levels, centered=info.centered)

  def step_fn(state, batch):
    params, opt_state, loss = step(*state, *batch)
    return (params, opt_state), {"loss": loss, "loss_bpd": loss / math.log(2.0)}

  return step_fn


def _batches(config, levels, k_data, k_train, start: int):
  """Step i's minibatch of ``dequantizer.batch_size`` levels (drawn with replacement) and key: pure
  functions of (seed, i)."""
  bs, n = config.dequantizer.batch_size, levels.shape[0]
  for i in range(start, config.dequantizer.n_iters):
    idx = jax.random.randint(jax.random.fold_in(k_data, i), (bs,), 0, n)
    yield levels[idx], jax.random.fold_in(k_train, i)


def _meta(config, sde, model, score_step: int, step: int, history) -> dict[str, Any]:
  return {"spec": dequantization.model_spec(model), "step": int(step),
          "n_iters": int(config.dequantizer.n_iters), "sde": str(config.sde.name),
          "T": float(sde.T), "eps": float(sde.eps), "dataset": str(config.data.dataset),
          "centered": bool(config.data.centered), "score_step": int(score_step),
          "history": [[int(s), float(v)] for s, v in history], "loss_unit": "nats/dim"}


def _report(config, sde, score_step: int, step: int, history) -> dict[str, Any]:
  last = [v for _, v in history[-_LOG_EVERY * 5:]]
  return {"step": int(step), "score_step": int(score_step), "sde": str(config.sde.name),
          "T": float(sde.T), "eps": float(sde.eps), "dataset": str(config.data.dataset),
          "final_loss_bpd": float(np.mean(last) / math.log(2.0)) if last else float("nan"),
          "loss_unit": "bits/dim (variational bound: -E_q[-bound - log q] with the scaling log-det)"}
