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

``--mode=eval`` with ``eval.dequantization='variational'`` loads it (:func:`load_dequantizer`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

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
from modes import register_mode
from progress import Progress

DEQUANTIZER_DIR = "dequantizer"
_LOG_EVERY = 10  # steps between loss fetches (progress lines, non-finite check)


def build_model(config: ml_collections.ConfigDict) -> dequantization.Dequantizer:
  """q_phi(u | k) of the ``dequantizer`` config section for the dataset's event shape."""
  info = datasets.dataset_info(config)
  d = config.dequantizer
  return dequantization.Dequantizer(tuple(info.shape), int(info.num_grey_levels),
                                    num_steps=int(d.flow_steps), flow_levels=int(d.flow_levels),
                                    hidden=int(d.flow_hidden),
                                    context_features=int(d.context_features))


def _require_images(config) -> datasets.DatasetInfo:
  info = datasets.dataset_info(config)
  if not info.is_image:
    raise ValueError(f"data.dataset={info.name!r}: variational dequantization needs discrete "
                     "image data (toy data are continuous)")
  return info


@register_mode("fit_dequantizer")
def fit_dequantizer(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fits q_phi(u | k) by [SF] eq. 13 + eq. 39 with the score model frozen; returns the report."""
  import likelihood
  sde = sde_lib.get_sde(run_lib.validate_config(config).sde)
  info = _require_images(config)
  run_lib.require_checkpoint(workdir)
  d = config.dequantizer
  out_dir = checkpoints.check_writable(os.path.join(workdir, DEQUANTIZER_DIR))
  with checkpoints.workdir_lock(workdir, DEQUANTIZER_DIR):
    score = run_lib.load_score_model(config, workdir)
    levels, _, _ = datasets.load_levels(config, str(config.data.train_split))
    levels = jnp.asarray(levels)
    model = build_model(config)
    k_init, k_data, k_train = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xDE0), 3)
    variables = dequantization.init_variables(model, k_init, levels[:256])
    params = variables["params"]
    constants = {k: v for k, v in variables.items() if k != "params"}
    n_iters = int(d.n_iters)
    optimizer = dequantization.make_optimizer(float(d.lr), n_iters)
    opt_state = optimizer.init(params)
    start, history = 0, []
    if os.path.exists(os.path.join(out_dir, checkpoints.TREE_META)):
      params, constants, opt_state, start, history = _restore(out_dir, config, sde, model, params,
                                                              constants, opt_state)
    n_t = int(d.bound_time_samples)

    def log_p_fn(y, key):  # minus the ScoreFlow bound, eq. 39 (eps correction, IS of t); the
      # prior and eps-correction expectations use as many draws as the time integral
      return -likelihood.scoreflow_bound(score.score_fn, sde, y, key, prior=score.prior,
                                         n_time_samples=n_t, n_prior_samples=n_t)["nll_bound"]

    step_fn = dequantization.make_train_step(model, constants, log_p_fn, optimizer,
                                             num_levels=info.num_grey_levels,
                                             centered=info.centered)
    bs, n = int(d.batch_size), levels.shape[0]
    pending: list[tuple[int, jax.Array]] = []

    def drain():
      vals = np.asarray(jax.device_get([l for _, l in pending]), np.float64)
      for (s, _), v in zip(pending, vals):
        if not np.isfinite(v):
          raise FloatingPointError(f"fit_dequantizer: non-finite loss at step {s}")
        history.append((s, float(v)))
      pending.clear()

    def save(step):
      drain()
      leaves = jax.tree_util.tree_leaves(opt_state)
      tree = {"params": params, "opt_state": {str(i): x for i, x in enumerate(leaves)},
              **({"constants": constants} if constants else {})}
      checkpoints.save_tree(out_dir, tree, _meta(config, sde, model, score.step, step, history))

    with Progress("fit dequantizer (ScoreFlow eq. 13 + 39)", n_iters - start, "steps") as progress:
      for step in range(start, n_iters):
        idx = jax.random.randint(jax.random.fold_in(k_data, step), (bs,), 0, n)
        params, opt_state, loss = step_fn(params, opt_state, levels[idx],
                                          jax.random.fold_in(k_train, step))
        pending.append((step + 1, loss))
        if (step + 1) % _LOG_EVERY == 0 or step + 1 == n_iters:
          drain()
          progress.update(step + 1 - start - progress.done,
                          loss_bpd=history[-1][1] / math.log(2.0))
        if (step + 1) % int(d.save_freq) == 0 or step + 1 == n_iters:
          save(step + 1)
    report = _report(config, sde, score.step, max(start, n_iters), history)
    run_lib.write_json(os.path.join(out_dir, "report.json"), report)
  logging.info("dequantizer fitted: %d steps, final objective %.4f bits/dim", report["step"],
               report["final_loss_bpd"])
  return report


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


def _check_meta(meta: dict, config, sde, model, where: str) -> None:
  """Refuses a saved dequantizer of another architecture, SDE or diffusion time."""
  spec = dequantization.model_spec(model)
  for key in sorted(spec):
    if meta["spec"].get(key) != spec[key]:
      raise ValueError(f"the dequantizer in {where} has {key}={meta['spec'].get(key)!r}, the config "
                       f"gives {spec[key]!r} (dequantizer.* / data.*): use the same values, or "
                       f"delete {where} and run --mode=fit_dequantizer again")
  if meta["sde"] != str(config.sde.name) or not math.isclose(meta["T"], float(sde.T), rel_tol=1e-9):
    raise ValueError(f"the dequantizer in {where} was fitted for sde.name={meta['sde']!r}, "
                     f"sde.T={meta['T']:g}, not {config.sde.name!r}, {float(sde.T):g}; run "
                     "--mode=fit_dequantizer again with this config")


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), tree)


def _restore(out_dir: str, config, sde, model, params, constants, opt_state):
  """(params, constants, opt_state, step, history) of the last save in ``out_dir``."""
  meta = checkpoints.read_tree_meta(out_dir)
  _check_meta(meta, config, sde, model, out_dir)
  leaves, treedef = jax.tree_util.tree_flatten(opt_state)
  like = {"params": params, "opt_state": {str(i): x for i, x in enumerate(leaves)},
          **({"constants": constants} if constants else {})}
  tree, meta = checkpoints.restore_tree(out_dir, _abstract(like))
  opt_state = jax.tree_util.tree_unflatten(treedef, [tree["opt_state"][str(i)]
                                                     for i in range(len(leaves))])
  logging.info("dequantizer: step %d restored from %s", meta["step"], out_dir)
  return (tree["params"], tree.get("constants", {}), opt_state, int(meta["step"]),
          [(int(s), float(v)) for s, v in meta["history"]])


@dataclasses.dataclass(frozen=True)
class FittedDequantizer:
  """A fitted q_phi(u | k) as eval uses it (:meth:`lift`)."""
  model: dequantization.Dequantizer
  variables: Any
  step: int
  num_levels: int
  centered: bool

  def sample_q(self, key, k):
    return dequantization.sample_and_log_prob(self.model, self.variables, key, k)

  def lift(self, fn: Callable, dtype=jnp.float32) -> Callable:
    """``fn(consts, y, key) -> dict(logp=log p_y(y), ...)`` on continuous data -> the same on integer
    levels k with ``logp`` = log p_y(scale(k, u)) - log q(u | k), u ~ q(. | k) ([SF] eq. 13;
    ``likelihood.bits_per_dim`` then adds the scaling log-det, as on the uniform path)."""
    def g(consts, k, key):
      extra = {}

      def log_p(y, kp):
        extra.update(fn(consts, y, kp))
        return extra["logp"]

      lp = dequantization.dequantized_log_p(log_p, k, key, num_levels=self.num_levels,
                                            centered=self.centered, sample_q=self.sample_q,
                                            dtype=dtype)
      return dict(extra, logp=lp)

    return g


def load_dequantizer(config: ml_collections.ConfigDict, workdir: str) -> FittedDequantizer:
  """The q_phi(u | k) of ``workdir/dequantizer`` (verified); a clear error names
  ``--mode=fit_dequantizer`` when there is none, or it was fitted for another model."""
  sde = sde_lib.get_sde(run_lib.validate_config(config).sde)
  info = _require_images(config)
  where = os.path.join(workdir, DEQUANTIZER_DIR)
  try:
    meta = checkpoints.read_tree_meta(where)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"eval.dequantization='variational': no fitted dequantizer in {where}; "
                            "run --mode=fit_dequantizer with this config first") from e
  model = build_model(config)
  _check_meta(meta, config, sde, model, where)
  if meta["step"] < meta["n_iters"]:
    logging.warning("the dequantizer in %s was saved at step %d of %d (fit interrupted)", where,
                    meta["step"], meta["n_iters"])
  levels = jnp.zeros((1,) + tuple(info.shape), jnp.int32)
  like = dequantization.init_variables(model, jax.random.PRNGKey(0), levels)
  params, constants = like["params"], {k: v for k, v in like.items() if k != "params"}
  opt_state = dequantization.make_optimizer(1.0, 2).init(params)  # structure only (verified too)
  params, constants, _, step, _ = _restore(where, config, sde, model, params, constants, opt_state)
  return FittedDequantizer(build_model(config), {"params": params, **constants}, step,
                           info.num_grey_levels, info.centered)
