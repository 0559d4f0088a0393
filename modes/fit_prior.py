"""``--mode=fit_prior``: the auxiliary prior nu_phi of Franzese et al. ("How much is enough?", Sec. 3)
fitted to p(x, T) and saved in ``workdir/prior/`` (verified arrays + ``meta.json``: spec, T, eps,
SDE, fit method, held-out cross-entropies in nats/dim), also ``prior/report.json``.

* ``prior.fit='concurrent'`` (Sec. 3.1): x_T = alpha_T x_0 + sigma_T z from training data (fresh
  dequantization and noise per draw). Needs no score model and touches only ``prior/`` (its own
  lock), so it can run beside ``--mode=train`` on the same workdir.
* ``prior.fit='sequential'`` (Sec. 3.2, eq. 12): x_T = the probability-flow ODE push-forward of
  training data through the trained model; needs the workdir's checkpoint.

``--mode=eval`` and ``--mode=sample`` with ``prior.kind != 'gaussian'`` load it (``run_lib.load_prior``).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import auxiliary
import checkpoints
import run_lib
import sde_lib
from modes import register_mode
from progress import Progress


@register_mode("fit_prior")
def fit_prior(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fits ``prior.kind`` to samples of p(x, T); returns the fit report."""
  sde = sde_lib.get_sde(run_lib.validate_config(config).sde)
  p = config.prior
  if p.kind == "gaussian":
    raise ValueError("prior.kind='gaussian' is the SDE's own p_noise: nothing to fit (set "
                     "prior.kind to 'dpgmm' or 'flow')")
  if p.fit == "sequential":
    run_lib.require_checkpoint(workdir)
  out_dir = checkpoints.check_writable(os.path.join(workdir, run_lib.PRIOR_DIR))
  with checkpoints.workdir_lock(workdir, run_lib.PRIOR_DIR):
    k_data, k_fit = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x9F10))
    x_t = prior_samples(config, sde, workdir, k_data)
    total, unit = (p.flow_steps, "steps") if p.kind == "flow" else (p.max_iter, "EM iterations")
    with Progress(f"fit prior ({p.kind}, {p.fit})", int(total), unit) as progress:
      prior, info = auxiliary.fit_prior(p.kind, x_t, k_fit, sde=sde,
                                        heldout_fraction=float(p.heldout_fraction),
                                        threshold=float(p.weight_threshold),
                                        **_options(config, x_t.shape[1:], progress))
    report = _report(config, sde, info)
    checkpoints.save_tree(out_dir, auxiliary.to_pytree(prior),
                          {**report, "spec": auxiliary.prior_spec(prior)})
    run_lib.write_json(os.path.join(out_dir, "report.json"), report)
  logging.info("prior %s fitted at T=%g: held-out cross-entropy %.4f nats/dim (Gaussian p_noise "
               "%.4f)", p.kind, float(config.sde.T), info["cross_entropy"],
               info["gaussian_cross_entropy"])
  if info["cross_entropy"] > info["gaussian_cross_entropy"]:
    logging.warning("prior %s is worse than the Gaussian p_noise on held-out samples (%.4f vs "
                    "%.4f nats/dim; %.4f on its fitting samples): it overfits; use fewer "
                    "components (prior.n_components), prior.covariance_type='diag' or more "
                    "samples (prior.n_fit_samples)", p.kind, info["cross_entropy"],
                    info["gaussian_cross_entropy"], info.get("cross_entropy_fit", float("nan")))
  return report


def _options(config, event_shape, progress: Progress) -> dict[str, Any]:
  """Fit options of ``prior.kind``; the fit's callback advances ``progress`` (for the DPGMM the
  total is ``prior.max_iter``, an upper bound: the fit stops early once converged)."""
  p = config.prior
  last = [0]

  def callback(step: int, metrics: dict) -> None:
    progress.update(step - last[0], **{k: float(v) for k, v in metrics.items()})
    last[0] = step

  if p.kind == "dpgmm":
    return dict(n_components=int(p.n_components), covariance_type=str(p.covariance_type),
                max_iter=int(p.max_iter), callback=callback)
  import flows  # distrax and TFP load only when a flow is fitted
  if len(event_shape) == 1:
    spec = flows.default_flow_spec(event_shape, num_layers=int(p.flow_layers),
                                   hidden=[int(p.flow_hidden)] * 2)
  else:
    spec = flows.default_flow_spec(event_shape, num_levels=int(p.flow_levels),
                                   num_steps=int(p.flow_layers), hidden=int(p.flow_hidden))
  return dict(flow=spec, steps=int(p.flow_steps), lr=float(p.flow_lr),
              batch_size=int(p.flow_batch_size), callback=callback)


def _report(config, sde, info: dict) -> dict[str, Any]:
  keep = ("kind", "n_fit", "n_heldout", "dim", "cross_entropy", "cross_entropy_fit",
          "gaussian_cross_entropy", "effective_components", "converged", "n_iter")
  out = {k: info[k] for k in keep if k in info}
  out.update(T=float(sde.T), eps=float(sde.eps), sde=str(config.sde.name), fit=str(config.prior.fit),
             dataset=str(config.data.dataset), weight_threshold=float(config.prior.weight_threshold),
             cross_entropy_unit="nats/dim")
  if "weights" in info:
    out["weights"] = [float(w) for w in np.asarray(info["weights"])]
  return out


def prior_samples(config, sde, workdir: str, key) -> jax.Array:
  """``prior.n_fit_samples`` draws of p(x, T) by the configured fit method."""
  import likelihood
  n = int(config.prior.n_fit_samples)
  k_x, k_t = jax.random.split(key)
  x0 = run_lib.data_samples(config, k_x, n)
  if config.prior.fit == "concurrent":
    return auxiliary.forward_samples(sde, x0, k_t)
  model = run_lib.load_score_model(config, workdir, fitted_prior=False)
  ev = config.eval
  push = jax.jit(lambda x, k: likelihood.solve_flow(
      model.score_fn, sde, x, k, t0=sde.eps, t1=sde.T, divergence="hutchinson",
      rtol=float(ev.rtol), atol=float(ev.atol), max_steps=int(ev.max_steps))["z"])
  bs = int(ev.batch_size)
  out = []
  with Progress("probability-flow push-forward to T", n, "samples") as progress:
    for i in range(0, n, bs):
      batch = x0[i:i + bs]
      pad = bs - batch.shape[0]
      z = push(jnp.concatenate([batch, jnp.repeat(batch[-1:], pad, 0)]) if pad else batch,
               jax.random.fold_in(k_t, i))
      out.append(z[:batch.shape[0]])
      progress.update(batch.shape[0])
  z = jnp.concatenate(out)
  ok = jnp.all(jnp.isfinite(z.reshape(n, -1)), axis=1)
  if not bool(jnp.all(ok)):
    logging.warning("push-forward: %d of %d solves failed; fitting on the rest", int((~ok).sum()), n)
  return z[np.asarray(ok)]
