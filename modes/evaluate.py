"""``--mode=eval``: evaluates a workdir's checkpoint into ``workdir/eval/report.json`` (+ samples).

* image data: bits/dim of the probability-flow ODE over the whole ``eval.split`` (uniform
  dequantization, padded last batch), the ScoreFlow bound in bits/dim, samples with NFE, digits
  classifier metrics (digits) or FID / IS (``eval.fid``), and for digits a GaussianMixture baseline;
* toy data: NLL (nats) of a held-out sample by the ODE, the bound, the exact NLL where the
  distribution has a density, histogram divergences of generated vs true samples.

Failed likelihood solves are counted per stage (``*_n_failed``, ``*_failed_indices``) and excluded
from the means; more than ``eval.max_failed_fraction`` of them fails the eval after the report is
written. Every stage logs its start and its progress (items, rate, ETA).

Preemption: every per-example pass (the ODE bits/dim, the bound, the CT-ELBO forms, the samples)
keeps its finished batches in ``<eval folder>/partial/<stage>/`` (``run_lib.PartialResults``), and
a rerun skips them, with the same numbers (example i uses fold_in(key, i)); a changed config
(``run_lib.PARTIAL_FREE_FIELDS`` aside) or checkpoint discards them. The folder is removed once
``report.json`` is written.
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

import datasets
import run_lib
import toy_data
from modes import register_mode
from progress import Progress


@register_mode("eval")
def evaluate(config: ml_collections.ConfigDict, workdir: str, eval_folder: str = "eval"):
  """Evaluates the checkpoint; returns the report (also ``workdir/<eval_folder>/report.json``)."""
  dequantizer = _load_dequantizer(config, workdir)  # before any output: fails naming the mode
  # The typed sections (config_schema.Config); the ConfigDict is compared with config.json.
  cfg = run_lib.validate_config(config)
  fid_weights = _fid_weights(cfg)  # fetched (or a clear error) before any work
  with run_lib.model_outputs(config, workdir, eval_folder) as (model, out_dir):
    k_ll, k_bound, k_sample = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xE7A1), 3)
    report: dict[str, Any] = _header(cfg, model)
    stores = run_lib.eval_stores(config, out_dir, model, *(
        () if dequantizer is None else (dequantizer.variables, dequantizer.step)))
    with jax.enable_x64(cfg.eval.float64):
      if datasets.dataset_info(cfg).is_image:
        report.update(_image_likelihood(cfg, model, k_ll, k_bound, dequantizer, stores))
      else:
        report.update(_toy_likelihood(cfg, model, k_ll, k_bound, stores))
      report.update(_prior_terms(cfg, model, jax.random.fold_in(k_bound, 1)))
      report.update(_ct_elbo(cfg, model, jax.random.fold_in(k_bound, 2), stores))
    report.update(_samples_and_metrics(cfg, model, k_sample, out_dir, fid_weights, stores))
    run_lib.write_json(os.path.join(out_dir, "report.json"), report)
    run_lib.remove_partial_results(out_dir)
    for k in sorted(report):
      if not k.endswith(("failed_indices", "per_example")):
        logging.info("eval %s = %s", k, report[k])
    _check_failures(cfg, report)
  return report


def _no_store(stage: str, key) -> None:
  """No ``run_lib.eval_stores``: nothing kept across preemptions."""
  return None


def _header(config, model: run_lib.ScoreModel) -> dict[str, Any]:
  ev = config.eval
  return {"step": model.step, "dataset": config.data.dataset, "split": ev.split,
          "sde": config.sde.name, "T": config.sde.T, "eps": config.sde.eps,
          "likelihood_divergence": ev.divergence, "likelihood_dtype":
          "float64" if ev.float64 else "float32", "dequantization": ev.dequantization}


def _load_dequantizer(config, workdir: str):
  """None (uniform), or the q_phi(u | k) of --mode=fit_dequantizer (eval.dequantization)."""
  if config.eval.dequantization != "variational":
    return None
  import dequantization
  import sde_lib
  cfg = run_lib.validate_config(config)
  run_lib.require_checkpoint(workdir)
  info = datasets.dataset_info(cfg)
  model = dequantization.from_section(cfg.dequantizer, info.shape, info.num_grey_levels)
  return dequantization.load_fitted(os.path.join(workdir, run_lib.DEQUANTIZER_DIR), model,
                                    cfg.sde.name, float(sde_lib.get_sde(cfg.sde).T), info.centered)


def _likelihood_fns(config, model: run_lib.ScoreModel):
  """Batch functions ``(params, y, key) -> dict`` of log p (probability-flow ODE, with its NFE)
  and of minus the bound (ScoreFlow eq. 39, as ``logp``), both in nats."""
  import likelihood
  ev = config.eval

  def logp_fn(params, y, k):
    out = likelihood.log_likelihood(model.bound_score(params), model.sde, y, k, prior=model.prior,
                                    divergence=ev.divergence, probe=ev.hutchinson_probe,
                                    rtol=ev.rtol, atol=ev.atol, max_steps=ev.max_steps)
    return {"logp": out["logp"], "nfe": out["nfe"].astype(jnp.float32)}

  def neg_bound_fn(params, y, k):
    return {"logp": -likelihood.scoreflow_bound(
        model.bound_score(params), model.sde, y, k, prior=model.prior,
        n_time_samples=ev.bound_time_samples)["nll_bound"]}

  return logp_fn, neg_bound_fn


def _split_bpd(config, model: run_lib.ScoreModel, batch_fn, key, title: str,
               dequantizer=None, store=None) -> dict[str, Any]:
  """``likelihood.dataset_bits_per_dim`` of the batch function ``batch_fn(params, y, key)`` over
  the whole ``eval.split``, per example (``parallel.per_example``) over every device and process,
  with progress; uniform dequantization, or ``dequantizer.lift`` (u ~ q(. | k)); ``store``: the
  finished batches kept across preemptions (``run_lib.PartialResults``)."""
  import likelihood
  import parallel
  ev = config.eval
  info = datasets.dataset_info(config)
  dtype = jnp.float64 if ev.float64 else jnp.float32
  if dequantizer is not None:
    batch_fn = dequantizer.lift(batch_fn, dtype)
  batches = datasets.get_eval_dataset(config, as_levels=True)
  with Progress(title, batches.num_examples, "images") as p:
    return likelihood.dataset_bits_per_dim(
        parallel.per_example(batch_fn), model.params, batches, key,
        num_levels=info.num_grey_levels, centered=info.centered, dtype=dtype,
        dequantize=dequantizer is None, on_batch=p.update, store=store, on_resume=p.resumed)


def _image_likelihood(config, model: run_lib.ScoreModel, k_ll, k_bound,
                      dequantizer=None, stores=_no_store) -> dict[str, Any]:
  """bits/dim of the ODE and of the bound over the whole split; with a ``dequantizer`` q(u | k),
  of E_q[-log p(scale(k + u)) + log q(u | k)] (ScoreFlow eq. 13), one u per example, the same
  scaling log-det as the uniform path (``likelihood.bits_per_dim``)."""
  ev = config.eval
  logp_fn, neg_bound_fn = _likelihood_fns(config, model)
  out: dict[str, Any] = {}
  if dequantizer is not None:
    out["dequantizer_step"] = dequantizer.step
  if ev.bpd:
    r = _split_bpd(config, model, logp_fn, k_ll, "bits/dim (probability-flow ODE)", dequantizer,
                   stores("bpd", k_ll))
    out.update(_stage("bpd", r), likelihood_nfe=float(np.mean(r["nfe"])),
               likelihood_nfe_per_example=[float(v) for v in r["nfe"]])
  if ev.bound:
    r = _split_bpd(config, model, neg_bound_fn, k_bound, "bits/dim bound (ScoreFlow)", dequantizer,
                   stores("bound_bpd", k_bound))
    out.update(_stage("bound_bpd", r))
  if datasets.dataset_info(config).name == "digits":
    with Progress("baseline (GaussianMixture)", None, "fits"):
      out.update(gmm_baseline_bpd(config))
  return out


def _toy_points(config) -> np.ndarray:
  """The held-out toy points of eval (``eval.num_likelihood_examples``, ``run_lib.toy_reference``)
  in the likelihood dtype."""
  ev = config.eval
  x = run_lib.toy_reference(config, ev.num_likelihood_examples)
  return x.astype(np.float64 if ev.float64 else np.float32)


def _toy_map(config, model: run_lib.ScoreModel, batch_fn, key, title: str,
             x: np.ndarray, store=None) -> dict[str, np.ndarray]:
  """``batch_fn(params, x, key) -> dict`` per held-out toy point of ``x`` (``_toy_points``), over
  every device and process, in point order; ``store`` as ``_split_bpd``."""
  import parallel
  with Progress(title, len(x), "points") as p:
    return parallel.map_dataset(parallel.per_example(batch_fn), model.params,
                                datasets.array_eval_batches(x, config.eval.batch_size,
                                                            "eval.batch_size"), key,
                                on_batch=p.update, store=store, on_resume=p.resumed)


def _prior_terms(config, model: run_lib.ScoreModel, key) -> dict[str, Any]:
  """The prior's share of the ELBO (Franzese et al., eqs. 5-6, 11): on the same held-out x_T ~
  p(x, T), the cross-entropy E[-log prior(x_T)] of the prior in use and of the Gaussian p_noise
  (nats/dim; their difference is the KL reduction the prior buys, the entropy of p(x, T)
  cancelling); for toy data the full decomposition (K, G, R, KL, ELBO) against the closed forms."""
  import auxiliary
  import likelihood
  k_x, k_t, k_elbo = jax.random.split(key, 3)
  with Progress("prior cross-entropy at T", None, "terms"):
    n = config.eval.num_likelihood_examples
    x_t = auxiliary.forward_samples(model.sde, run_lib.data_samples(config, k_x, n), k_t)
    ce = auxiliary.cross_entropy(model.prior, x_t)
    ce_gauss = auxiliary.cross_entropy(model.sde.prior(), x_t)
  out = {"prior_kind": config.prior.kind, "prior_cross_entropy": ce,
         "gaussian_cross_entropy": ce_gauss, "prior_kl_reduction": ce_gauss - ce,
         "prior_terms_unit": "nats/dim"}
  dist = (toy_data.get_toy_distribution(config.data.dataset)
          if config.data.dataset in toy_data.TOY_DISTRIBUTIONS else None)
  if dist is not None and dist.has_density:  # closed forms exist (not for the Swiss roll)
    with Progress("ELBO decomposition (toy, closed forms)", None, "terms"):
      terms = likelihood.elbo_decomposition(model.sde, dist, k_elbo, score_fn=model.score_fn,
                                            prior=model.prior, n_x=n)
    out.update({f"elbo_{k}": float(v) for k, v in terms.items()})
  return out


def _stage(name: str, r: dict) -> dict[str, Any]:
  """A likelihood stage's report fields; ``<name>_per_example`` (split order, NaN where a solve
  failed) lets two reports of one split be compared example by example (paired differences)."""
  return {name: r["bpd"], f"{name}_stderr": r["stderr"], f"{name}_n_examples": r["n"],
          f"{name}_n_failed": r["n_failed"], f"{name}_failed_indices": r["failed_indices"],
          f"{name}_per_example": [float(v) for v in r["bpd_per_example"]]}


def _toy_likelihood(config, model: run_lib.ScoreModel, k_ll, k_bound,
                    stores=_no_store) -> dict[str, Any]:
  """NLL (nats) of held-out toy points by the ODE and the bound; the exact NLL where known."""
  ev = config.eval
  logp_fn, neg_bound_fn = _likelihood_fns(config, model)
  x = _toy_points(config)
  out: dict[str, Any] = {}
  if ev.bpd:
    r = _toy_map(config, model, logp_fn, k_ll, "NLL (probability-flow ODE)", x, stores("nll", k_ll))
    out.update(_toy_stage("nll", -np.asarray(r["logp"], np.float64)),
               likelihood_nfe=float(np.mean(r["nfe"])))
  if ev.bound:
    r = _toy_map(config, model, neg_bound_fn, k_bound, "NLL bound (ScoreFlow)", x,
                 stores("nll_bound", k_bound))
    out.update(_toy_stage("nll_bound", -np.asarray(r["logp"], np.float64)))
  dist = toy_data.get_toy_distribution(config.data.dataset)
  if dist.has_density:
    x = jnp.asarray(x)
    out["nll_exact_data"] = float(-jnp.mean(dist.log_prob(x)))
    out["nll_exact_p_eps"] = float(-jnp.mean(dist.marginal_log_prob(model.sde, x, model.sde.eps)))
  return out


def _toy_stage(name: str, nll: np.ndarray) -> dict[str, Any]:
  import likelihood
  ok = np.isfinite(nll)
  mean, stderr = likelihood.mean_and_stderr(nll[ok])
  return {name: float(mean), f"{name}_stderr": float(stderr), f"{name}_n_examples": int(ok.sum()),
          f"{name}_n_failed": int((~ok).sum()),
          f"{name}_failed_indices": [int(i) for i in np.flatnonzero(~ok)]}


def _ct_elbo(config, model: run_lib.ScoreModel, key, stores=_no_store) -> dict[str, Any]:
  """CT-ELBO of the plug-in reverse SDE (Huang et al., eq. 25) in its ISM (Hutchinson, or the
  exact trace when eval.divergence is 'exact') and DSM (eq. 29) forms, with the eps correction of
  the ScoreFlow bound (eq. 39), eval.bound_time_samples times per example: -ELBO in bits/dim over
  the split (images, uniform dequantization) or in nats on the held-out toy points. Toy data with
  eval.ct_elbo_lambdas: the mean lambda-family ELBO (eq. 27, Theorem 6) with the exact marginal
  score of toy_data as the oracle, as -E^lambda nats (on [eps, T], no eps correction), and the
  score gap 1/2 int g^2 E|s - grad log p_t|^2 that Theorem 6 scales by lambda^2 / (4 (1 - lambda))."""
  import likelihood
  ev = config.eval
  if not ev.ct_elbo:
    return {}
  probe = "exact" if ev.divergence == "exact" else ev.hutchinson_probe
  n_t = ev.bound_time_samples

  def elbo_fn(form):
    return lambda params, y, k: {"logp": likelihood.ct_elbo(
        model.bound_score(params), model.sde, y, k, form=form, probe=probe, n_time_samples=n_t,
        prior=model.prior, eps_correction_term=True)["elbo"]}

  out: dict[str, Any] = {"ct_elbo_time_samples": n_t, "ct_elbo_probe": probe}
  forms = ("ism", "dsm")
  if datasets.dataset_info(config).is_image:
    for i, form in enumerate(forms):
      k = jax.random.fold_in(key, i)
      r = _split_bpd(config, model, elbo_fn(form), k, f"bits/dim CT-ELBO ({form.upper()} form)",
                     store=stores(f"ct_elbo_{form}_bpd", k))
      out.update(_stage(f"ct_elbo_{form}_bpd", r))
    out["ct_elbo_dequantization"] = "uniform"
    return out
  x = _toy_points(config)
  for i, form in enumerate(forms):
    k = jax.random.fold_in(key, i)
    r = _toy_map(config, model, elbo_fn(form), k, f"NLL CT-ELBO ({form.upper()} form)", x,
                 stores(f"ct_elbo_{form}_nll", k))
    out.update(_toy_stage(f"ct_elbo_{form}_nll", -np.asarray(r["logp"], np.float64)))
  lambdas = ev.ct_elbo_lambdas
  if lambdas:
    dist = toy_data.get_toy_distribution(config.data.dataset)

    def lambda_fn(params, y, k):
      r = likelihood.lambda_ct_elbo(model.bound_score(params), dist.score_fn(model.sde), model.sde,
                                    y, k, lambdas, probe=probe, n_time_samples=n_t,
                                    prior=model.prior)
      return {"elbo": r["elbo"].T, "score_gap": r["score_gap"]}  # elbo (B, L)

    k = jax.random.fold_in(key, 2)
    r = _toy_map(config, model, lambda_fn, k, "lambda-family CT-ELBO (exact marginal score)", x,
                 stores("ct_elbo_lambda_nll", k))
    elbo = np.asarray(r["elbo"], np.float64)
    for lam, e in zip(lambdas, elbo.T):
      stage = _toy_stage(f"ct_elbo_lambda_{lam:g}_nll", -e)
      out.update({k: v for k, v in stage.items() if not k.endswith(("_n_failed", "_indices"))})
    out["ct_elbo_score_gap"] = float(np.mean(np.asarray(r["score_gap"], np.float64)))
  return out


def _check_failures(config, report: dict[str, Any]) -> None:
  """Raises when a likelihood stage lost more than ``eval.max_failed_fraction`` of its examples."""
  limit = config.eval.max_failed_fraction
  for key in sorted(k for k in report if k.endswith("_n_failed")):
    stage = key[:-len("_n_failed")]
    failed, total = report[key], report[key] + report[f"{stage}_n_examples"]
    if failed:
      logging.warning("eval %s: %d of %d solves failed (examples %s); excluded from the mean",
                      stage, failed, total, report[f"{stage}_failed_indices"][:20])
    if failed > limit * total:
      raise RuntimeError(
          f"eval {stage}: {failed} of {total} likelihood solves failed (max_steps reached or "
          f"non-finite), more than eval.max_failed_fraction={limit}; first failed examples "
          f"{report[f'{stage}_failed_indices'][:20]}. Raise eval.max_steps, loosen eval.rtol / "
          "eval.atol, or set eval.max_failed_fraction (the report is written).")


def _fid_weights(config) -> str | None:
  """The FID Inception weights file when FID is measured (``inception_weights.
  resolve_inception_weights``: downloaded on first use when ``data.download``), and a check that
  ``eval.fid_stats`` exists; None without FID."""
  import evaluation
  import inception_weights
  ev = config.eval
  if not (ev.fid and datasets.dataset_info(config).is_image):
    return None
  if ev.fid_stats:
    evaluation.load_stats(ev.fid_stats)
  return inception_weights.resolve_inception_weights(ev.inception_weights,
                                                     download=config.data.download)


def _samples_and_metrics(config, model: run_lib.ScoreModel, key, out_dir: str,
                         fid_weights: str | None, stores=None) -> dict[str, Any]:
  """Samples (npz + PNG) with NFE, kept across preemptions with ``stores`` (``run_lib.
  eval_stores``), and what can be measured on them (FID / IS with the Inception weights
  ``fid_weights``)."""
  import evaluation
  ev = config.eval
  info = datasets.dataset_info(config)
  n = ev.num_samples
  samples, nfe = run_lib.generate(config, model, n, key, **(
      {} if stores is None else {"store": stores("samples", key)}))
  out: dict[str, Any] = dict(sampling_method=config.sampling.method,
                             sampling_c=config.sampling.c, sampling_nfe=nfe, n_samples=n)
  run_lib.save_samples_npz(os.path.join(out_dir, "samples.npz"), samples)
  reference = run_lib.toy_reference(config, n)
  run_lib.save_samples_png(os.path.join(out_dir, "samples.png"), samples, config, reference)
  if reference is not None:
    out.update({f"hist_{k}": v for k, v in
                evaluation.histogram_divergences(reference, samples).items()})
  images = np.clip(datasets.inverse_scale(np.asarray(samples), info.centered), 0, 1) \
      if info.is_image else None  # as viewed and saved: in [0, 1]
  if info.name == "digits":
    with Progress("digits classifier metrics", n, "samples"):
      levels, _, _ = datasets.load_levels(config, ev.split)
      out.update({f"digits_{k}": v for k, v in evaluation.digits_metrics(
          evaluation.train_digits_classifier(), images,
          levels.astype(np.float32) / (info.num_grey_levels - 1)).items()})
  if fid_weights is not None:  # Inception sees the 8-bit images of the model's paper's code
    rounding = evaluation.rounding_for(model.sde)
    with Progress("FID / Inception Score", n, "samples"):
      variables = evaluation.load_inception_params(fid_weights)
      ref = evaluation.load_stats(ev.fid_stats) if ev.fid_stats else None
      out.update(evaluation.inception_metrics(
          variables, evaluation.quantize_8bit(samples, info.centered, rounding), ref))
    out["fid_rounding"] = rounding
  return out


def gmm_baseline_bpd(config, n_components=(1, 2, 4, 8, 16)) -> dict[str, Any]:
  """Classical baseline on the same dequantized, scaled data: scikit-learn GaussianMixture (full
  covariance), the component count chosen on the validation split, bits/dim on the eval split."""
  import likelihood
  from sklearn.mixture import GaussianMixture
  from threadpoolctl import threadpool_limits
  info = datasets.dataset_info(config)
  rng = np.random.default_rng(config.seed)

  def split(name):
    levels, _, _ = datasets.load_levels(config, name)
    y = datasets.scale_images(levels, info.num_grey_levels, info.centered,
                              noise=rng.uniform(size=levels.shape))
    return np.asarray(y, np.float64).reshape(len(levels), -1)

  def bpd(gmm, y):
    return float(np.mean(likelihood.bits_per_dim(gmm.score_samples(y), info.shape,
                                                 centered=info.centered,
                                                 num_levels=info.num_grey_levels)))

  def fit(k, y):  # one BLAS thread: 64-dim fits, threads only add contention (2.4 s -> 0.3 s)
    with threadpool_limits(limits=1):
      return GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=0).fit(y)

  train, val, test = (split(s) for s in ("train_without_validation", "validation",
                                         config.eval.split))
  scores = {k: bpd(fit(k, train), val) for k in n_components}
  best = min(scores, key=scores.get)
  return {"gmm_bpd": bpd(fit(best, np.concatenate([train, val])), test),
          "gmm_components": int(best), "gmm_validation_bpd": {str(k): v for k, v in scores.items()},
          "uniform_bpd": float(math.log2(info.num_grey_levels))}
