"""Training objectives of score-based diffusion models (the optimizer, train state and sharded train /
eval steps that minimise them: ``training``).

Every loss estimates a time-weighted score-matching objective

    J(theta) = E_{t ~ U[eps, T]} [ lambda(t) E_{x_0, x_t} || s_theta(x_t, t) - target ||^2 ],

(Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 7) with

* weighting lambda(t): ``default`` sigma_t^2 (score_sde), ``likelihood`` g(t)^2 (Song et al. 2021b,
  "Maximum likelihood training of score-based diffusion models" (ScoreFlow), Theorem 1),
  ``likelihood_is`` g^2 with t drawn from p(t) ∝ g^2 / sigma_t^2 (ScoreFlow §5.1, eq. 12),
  ``noise_driven`` sigma_t^3 and ``data_driven`` sigma_t^2 / (0.25 + sigma_t) (Cao et al., "ODE vs
  SDE", Appendix I, eq. 45, with varpi_t = sigma_t the std of p_{0t}); ``edm`` (sde 'edm' only)
  EDM's log-normal sigma and lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the
  denoiser error (Karras et al. 2022, Table 1), i.e. lambda sigma^4 on the score error;
* target: ``dsm`` the transition score grad log p_{0t}(x_t | x_0) (Vincent 2011) or ``stf`` the
  Stable Target Field of Xu et al. ("Stable target field for reduced variance score estimation",
  eq. 5 and Algorithm 1), a self-normalized average of transition scores over a reference batch.

The implicit / sliced score-matching targets ``ism`` / ``ssm`` (Huang et al., "A variational
perspective on diffusion-based generative models and score matching", eq. 25 and Appendix A;
``ism_loss`` / ``ssm_loss``) need no clean point: |s|^2 + 2 div s, the divergence by Hutchinson
(``hutchinson``, training.n_probes probes per example); they equal DSM minus a constant in t and
work with every weighting but 'edm' (``check_objective``). Also here: the trace-of-covariance
diagnostics V_DSM(t), V_STF(t) of the STF paper (eq. 4 and §5.2).

A note on the STF minimizer. Xu et al. (eq. 7, Theorem 1) call the STF minimizer biased for finite
n. When x_t is perturbed from a member of the reference batch (Algorithm 1), it is not: the joint
law of (x_1..x_n, x_t) is p_0^n(x_{1:n}) p_{0t}(x_t | x_1), the target is symmetric in x_{1:n}, so
E[target | x_t] = E_{p_0^n}[(1/n) sum_i p_{0t}(x_t|x_i) target] / p_t(x_t)
               = E_{p_0}[grad p_{0t}(x_t|x)] / p_t(x_t) = grad log p_t(x_t)
for every n >= 1 (tests/test_losses.py checks this numerically). Hence V_STF(t) = E||v_STF -
grad log p_t||^2, which is what ``v_stf`` estimates.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

import hutchinson
import sde_lib
from sde_lib import bcast, sum_except_batch

Array = jax.Array
Params = Any
# score_fn(params, x, t, rng=None) -> score (models.utils.get_score_fn); rng=None is eval mode.
TrainScoreFn = Callable[..., Array]
LossFn = Callable[[Params, Array, Array], tuple[Array, dict]]

WEIGHTINGS = ("default", "likelihood", "likelihood_is", "noise_driven", "data_driven", "edm")
TARGETS = ("dsm", "stf", "ism", "ssm")
IMPLICIT_TARGETS = ("ism", "ssm")  # Hutchinson-estimated (training.n_probes, hutchinson_probe)
PROBES = hutchinson.PROBES  # training.hutchinson_probe (ism_loss also takes 'exact')
# training.prng_impl: JAX PRNG implementation of the loss's randomness (t, noise, dropout; step_key).
PRNG_IMPLS = ("threefry", "rbg", "unsafe_rbg", "philox4x32")


# -- time weighting ---------------------------------------------------------------------------------
def loss_weight(sde, t: Array, weighting: str) -> Array:
  """lambda(t) of the objective J (shape of t). ``likelihood_is`` has the likelihood weighting g^2.

  default sigma_t^2 (Song et al. 2021, §3.3); likelihood g^2 (ScoreFlow, Theorem 1); noise_driven
  sigma_t^3 and data_driven sigma_t^2 / (0.25 + sigma_t) (Cao et al., Appendix I, eq. 45); edm
  lambda(sigma) sigma^4 = sigma^2 (sigma^2 + sigma_data^2) / sigma_data^2, because
  D - x_0 = sigma^2 (s - dsm_target) (Karras et al. 2022, Table 1)."""
  _, sigma = sde.marginal_coeffs(t)
  if weighting == "default":
    return sigma**2
  if weighting in ("likelihood", "likelihood_is"):
    return sde.diffusion(t) ** 2
  if weighting == "noise_driven":
    return sigma**3
  if weighting == "data_driven":
    return sigma**2 / (0.25 + sigma)
  if weighting == "edm":
    return _edm_sde(sde).score_matching_weight(sigma)
  raise ValueError(f"training.weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _edm_sde(sde):
  """``sde`` if it is the EDM formulation, else ValueError naming training.weighting."""
  if not isinstance(sde, sde_lib.EDM):
    raise ValueError(f"training.weighting='edm' needs sde.name='edm', got {type(sde).__name__}")
  return sde


def sample_time(sde, key: Array, n: int, weighting: str) -> tuple[Array, Array]:
  """Draws n times and the per-example factor w(t) with E[w(t) h(t)] = E_{t~U[eps,T]}[lambda h].

  Uniform t: w = lambda(t). ``likelihood_is`` (ScoreFlow §5.1, eq. 12): t ~ p(t) = g^2 / (sigma^2 Z),
  w = lambda(t) / (p(t) (T - eps)) = sigma_t^2 Z / (T - eps), so every weighting estimates the same
  kind of quantity (a time average over [eps, T]) and the IS loss is unbiased for the uniform-t
  likelihood-weighted loss; the total integral int g^2 h dt is (T - eps) times it. ``edm``: t = sigma
  log-normal (not restricted to [eps, T]), w = lambda(t): the loss is EDM's
  E_sigma[lambda ||D - x_0||^2] (Karras et al. 2022, eq. 2 and Table 1)."""
  if weighting == "edm":
    t = _edm_sde(sde).lognormal_sample_t(key, (n,))
    return t, loss_weight(sde, t, weighting)
  if weighting == "likelihood_is":
    t, inv_p = sde.sample_time(key, n, importance_sampling=True)
    return t, sde.diffusion(t) ** 2 * inv_p / (sde.T - sde.eps)
  t, _ = sde.sample_time(key, n, importance_sampling=False)
  return t, loss_weight(sde, t, weighting)


# -- regression targets ------------------------------------------------------------------------------
def dsm_target(sde, x0: Array, xt: Array, t: Array) -> Array:
  """Denoising score-matching target grad_{x_t} log p_{0t}(x_t | x_0) (Vincent 2011; Song et al.
  2021, eq. 7)."""
  return sde.transition_score(xt, x0, t)


def stf_log_weights(sde, xt: Array, t: Array, ref: Array) -> Array:
  """Normalized log-weights log w_ij, w_ij ∝ p_{0t}(x_t^i | x_j) over the n reference points, (B, n)
  (Xu et al., eq. 5 / Algorithm 1).

  With p_{0t}(x_t|x_j) = N(alpha_t x_j, sigma_t^2 I): log p = -(|x_t|^2 - 2 alpha x_t.x_j +
  alpha^2 |x_j|^2) / (2 sigma^2) + const; the |x_t|^2 term is constant in j and dropped, the rest is
  a (B, D) @ (D, n) product (no B x n x D tensor). Points are centred on the reference mean first
  (distances are unchanged) to limit float32 cancellation."""
  b, n = xt.shape[0], ref.shape[0]
  alpha, sigma = sde.marginal_coeffs(t)
  alpha = jnp.broadcast_to(alpha, (b,))[:, None]
  sigma = jnp.broadcast_to(sigma, (b,))[:, None]
  rf = ref.reshape(n, -1).astype(xt.dtype)
  center = jnp.mean(rf, axis=0)
  rc = rf - center
  xc = xt.reshape(b, -1) - alpha * center
  cross = jnp.matmul(xc, rc.T, precision=jax.lax.Precision.HIGHEST)  # (B, n)
  sq = jnp.sum(rc**2, axis=-1)[None, :]  # (1, n)
  logits = (2.0 * alpha * cross - alpha**2 * sq) / (2.0 * sigma**2)
  return jax.nn.log_softmax(logits, axis=-1)


def stf_target(sde, xt: Array, t: Array, ref: Array, return_weights: bool = False):
  """Stable Target Field sum_j w_ij grad log p_{0t}(x_t^i | x_j) (Xu et al., eq. 5, Algorithm 1).

  The transition score is affine in x_j and sum_j w_ij = 1, so the target is the transition score
  at the weighted reference mean (W @ ref), a (B, n) @ (n, D) product. With n = 1 (ref = the clean
  point of x_t) it equals ``dsm_target`` exactly. ``ref`` may be larger than ``xt``'s batch; in
  Algorithm 1 the training batch is part of it. Returns the target, and (B, n) weights if asked."""
  b, n = xt.shape[0], ref.shape[0]
  w = jnp.exp(stf_log_weights(sde, xt, t, ref))
  x0_hat = jnp.matmul(w, ref.reshape(n, -1).astype(xt.dtype), precision=jax.lax.Precision.HIGHEST)
  target = sde.transition_score(xt, x0_hat.reshape(xt.shape), t)
  return (target, w) if return_weights else target


def _reduce(sq: Array, reduce_mean: bool) -> Array:
  """Per-example sum (or mean) of a squared error over the event axes."""
  flat = sq.reshape(sq.shape[0], -1)
  return jnp.mean(flat, axis=-1) if reduce_mean else jnp.sum(flat, axis=-1)


# -- micro-batches (gradient accumulation, training.grad_accum_steps) -------------------------------------
Micro = Optional[tuple[Array, int]]  # (j, k): micro-batch j (traced) of k (static); None: the batch


def micro_rows(x: Array, micro: Micro, axis: int = 0) -> Array:
  """Micro-batch j of k of ``x`` along ``axis``: rows j, j + k, j + 2k, ... (``micro`` None: x).

  Strided, so that with the batch sharded in contiguous blocks over D devices and B divisible by
  D k (what ``training.grad_accum_steps`` requires), every device holds B / (D k) rows of each
  micro-batch: the selection is a local reshape and index, no rows move between devices."""
  if micro is None:
    return x
  j, k = micro
  b = x.shape[axis]
  assert b % k == 0, f"x: {b} rows along axis {axis} are not divisible into {k} micro-batches"
  split = x.reshape(x.shape[:axis] + (b // k, k) + x.shape[axis + 1:])
  return jax.lax.dynamic_index_in_dim(split, j, axis=axis + 1, keepdims=False)


def micro_key(key: Array, micro: Micro) -> Array:
  """The key of draws whose shape is the micro-batch's (dropout masks, Hutchinson probes):
  fold_in(key, j) per micro-batch, ``key`` itself without accumulation."""
  return key if micro is None else jax.random.fold_in(key, micro[0])


def _perturb(sde, x0: Array, key: Array, weighting: str, micro: Micro = None):
  """x0, t, w(t) and x_t = alpha_t x0 + sigma_t z of a batch (of its micro-batch ``micro``); shared
  by every loss below so that the same key gives the same (t, x_t) in dsm_loss, ism_loss and
  ssm_loss (paired comparisons). t and z are drawn for the whole batch x0 and then cut into the
  micro-batch, so example i gets the same (t_i, z_i) whatever the number of micro-batches (under
  jax_threefry_partitionable, XLA computes only the micro-batch's random words)."""
  k_t, k_z = jax.random.split(key)
  t, w = sample_time(sde, k_t, x0.shape[0], weighting)
  z = jax.random.normal(k_z, x0.shape, dtype=x0.dtype)
  x0, t, w, z = (micro_rows(v, micro) for v in (x0, t, w, z))
  return x0, t, w, sde.perturb(x0, t, z)


def _time_metrics(t: Array, w: Array) -> dict:
  return {"weight_mean": jnp.mean(w), "t_mean": jnp.mean(t), "t_min": jnp.min(t),
          "t_max": jnp.max(t)}


def dsm_loss(sde, score_fn: TrainScoreFn, params: Params, x0: Array, key: Array,
             weighting: str = "default", reduce_mean: bool = False, ref: Optional[Array] = None,
             train: bool = True, micro: Micro = None) -> tuple[Array, dict]:
  """Monte Carlo estimate of J with the DSM target (``ref`` None) or the STF target over ``ref``
  (Song et al. 2021, eq. 7; Xu et al., Algorithm 1): mean_i w(t_i) |s(x_t^i, t_i) - target_i|^2.
  ``micro`` (j, k): the same mean over micro-batch j of x0 (``micro_rows``), each row with the t
  and noise it has in the whole batch and its STF target against the whole ``ref``, so the mean
  of the k micro-batch losses (and gradients) is the batch's; dropout masks are drawn per
  micro-batch (``micro_key``)."""
  k_pert, k_model = jax.random.split(key)
  k_model = micro_key(k_model, micro)
  x0, t, w, xt = _perturb(sde, x0, k_pert, weighting, micro)
  metrics = {}
  if ref is None:
    target = dsm_target(sde, x0, xt, t)
  else:
    target, wts = stf_target(sde, xt, t, ref, return_weights=True)
    metrics["stf_ess_mean"] = jnp.mean(1.0 / jnp.sum(wts**2, axis=-1))  # effective sample size
  score = score_fn(params, xt, t, rng=k_model if train else None)
  losses = w * _reduce(jnp.square(score - target), reduce_mean)
  loss = jnp.mean(losses)
  metrics.update(loss=loss, **_time_metrics(t, w))
  return loss, metrics


# -- implicit / sliced score matching -----------------------------------------------------------------
def _implicit_loss(sde, score_fn, params, x0, key, weighting, probe, reduce_mean, sliced,
                   n_probes, train, micro: Micro = None):
  """Shared body of ism_loss / ssm_loss; probes and jvps from ``hutchinson`` (one linearization of
  the score at x_t, ``n_probes`` tangents, the same dropout mask for all of them). ``micro``: as
  dsm_loss (t and noise of the whole batch; probes and dropout drawn per micro-batch)."""
  assert n_probes >= 1, f"n_probes must be >= 1, got {n_probes}"
  k_pert, k_rest = jax.random.split(key)  # k_pert as in dsm_loss: paired (t, x_t)
  k_probe, k_model = (micro_key(k, micro) for k in jax.random.split(k_rest))
  x0, t, w, xt = _perturb(sde, x0, k_pert, weighting, micro)
  d = math.prod(x0.shape[1:])
  fn = lambda x: score_fn(params, x, t, rng=k_model if train else None)
  if sliced:
    v = hutchinson.sample_probe(k_probe, (n_probes,) + xt.shape, probe, xt.dtype)
    s, quad = hutchinson.probe_quadratic(fn, xt, v)  # (P, B)
    proj = jax.vmap(lambda vi: sum_except_batch(vi * s))(v)  # (P, B)
    per_example = jnp.mean(proj**2 + 2.0 * quad, axis=0)
  else:
    s, div = hutchinson.divergence(fn, xt, k_probe, probe, n_probes)
    per_example = sum_except_batch(s**2) + 2.0 * div
  if reduce_mean:
    per_example = per_example / d
  loss = jnp.mean(w * per_example)
  return loss, {"loss": loss, **_time_metrics(t, w)}


def ism_loss(sde, score_fn: TrainScoreFn, params: Params, x0: Array, key: Array,
             weighting: str = "default", probe: str = "rademacher",
             reduce_mean: bool = False, n_probes: int = 1, train: bool = True,
             micro: Micro = None) -> tuple[Array, dict]:
  """Implicit score matching E[lambda(t) (|s(x_t)|^2 + 2 div s(x_t))] (Hyvärinen 2005; the integrand
  of Huang et al. eq. 25 / Appendix A.1), divergence by Hutchinson with ``n_probes`` probes per
  example, averaged (or ``probe='exact'``). Equals the DSM loss minus E_t[lambda(t) D / sigma_t^2]
  in expectation (D / sigma_t^2 = E|grad log p_{0t}|^2, ``dsm_ism_offset``)."""
  return _implicit_loss(sde, score_fn, params, x0, key, weighting, probe, reduce_mean, False,
                        n_probes, train, micro)


def ssm_loss(sde, score_fn: TrainScoreFn, params: Params, x0: Array, key: Array,
             weighting: str = "default", probe: str = "rademacher",
             reduce_mean: bool = False, n_probes: int = 1, train: bool = True,
             micro: Micro = None) -> tuple[Array, dict]:
  """Sliced score matching E[lambda(t) ((v.s)^2 + 2 v^T (ds/dx) v)] (Song et al. 2019; Huang et al.
  Appendix A.2): both terms sliced by the same probe v, averaged over ``n_probes`` probes; same
  expectation as ``ism_loss``."""
  if probe not in hutchinson.PROBES:
    raise ValueError(f"ssm_loss needs a random probe {hutchinson.PROBES}, got {probe!r}")
  return _implicit_loss(sde, score_fn, params, x0, key, weighting, probe, reduce_mean, True,
                        n_probes, train, micro)


def check_objective(target: str, weighting: str, n_probes: int = 1) -> None:
  """Raises ValueError naming the fields for a (training.target, training.weighting,
  training.n_probes) choice that is not a sensible objective: n_probes > 1 with a target that draws
  no probe ('dsm' / 'stf': the value would be ignored); 'ism' / 'ssm' with weighting 'edm'. EDM's weight lambda(sigma) sigma^4
  makes the implicit forms carry the per-example offset lambda sigma^4 D / sigma^2 = D (sigma^2 +
  sigma_data^2) / sigma_data^2 of ``dsm_ism_offset``, cancelled only in expectation: with
  log-normal sigma (unbounded, up to ~80) the estimator's variance grows like D sigma^4, while the
  denoising form's stays O(1) (Karras et al. 2022, Table 1). Every other weighting is a time
  weighting of the same score error on [eps, T] and works with every target."""
  if target not in TARGETS:
    raise ValueError(f"training.target must be one of {TARGETS}, got {target!r}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"training.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  if target not in IMPLICIT_TARGETS and n_probes != 1:
    raise ValueError(f"training.n_probes={n_probes} is used by training.target 'ism' / 'ssm' only; "
                     f"set it to 1 with training.target={target!r}")
  if target in IMPLICIT_TARGETS and weighting == "edm":
    raise ValueError(f"training.target={target!r} (implicit / sliced score matching) does not work "
                     "with training.weighting='edm': the ISM/SSM estimate of EDM's loss carries "
                     "an offset D (sigma^2 + sigma_data^2) / sigma_data^2 that cancels only in "
                     "expectation, so its variance grows like sigma^4; use training.target='dsm' "
                     "or 'stf' with 'edm', or another weighting (e.g. 'default', 'likelihood_is')")


def dsm_ism_offset(sde, t: Array, dim: int, weighting: str = "default",
                   reduce_mean: bool = False) -> Array:
  """lambda(t) D / sigma_t^2 = lambda(t) E|grad log p_{0t}(x_t|x_0)|^2: DSM minus ISM at time t."""
  _, sigma = sde.marginal_coeffs(t)
  per_dim = loss_weight(sde, t, weighting) / sigma**2
  return per_dim if reduce_mean else dim * per_dim


# -- trace-of-covariance diagnostics (Xu et al., eq. 4 and §5.2) ------------------------------------------
def _mean_and_se(v: Array) -> tuple[Array, Array]:
  return jnp.mean(v), jnp.std(v, ddof=1) / jnp.sqrt(v.shape[0])


def v_dsm(sde, x0: Array, t: Array, key: Array,
          marginal_score: Callable[[Array, Array], Array]) -> tuple[Array, Array]:
  """(estimate, standard error) of V_DSM(t) = E_{x_0, x_t} |grad log p_{0t}(x_t|x_0) -
  grad log p_t(x_t)|^2 (Xu et al., eq. 4) from clean samples x0 (M, *event) and the exact marginal
  score ``marginal_score(x, t)`` (e.g. toy_data's)."""
  t = jnp.full((x0.shape[0],), t, dtype=x0.dtype)
  z = jax.random.normal(key, x0.shape, dtype=x0.dtype)
  xt = sde.perturb(x0, t, z)
  diff = dsm_target(sde, x0, xt, t) - marginal_score(xt, t)
  return _mean_and_se(sum_except_batch(diff**2))


def v_stf(sde, x0: Array, ref: Array, t: Array, key: Array,
          marginal_score: Callable[[Array, Array], Array]) -> tuple[Array, Array]:
  """(estimate, standard error) of V_STF(t) (Xu et al., §5.2) with reference batch size n.

  x0 (M, *event) are the points x_t is perturbed from; ref (M, n - 1, *event) are each example's
  other n - 1 reference points (i.i.d. from p_0). Since E[v_STF | x_t] = grad log p_t(x_t) (module
  docstring), Tr Cov(v_STF | x_t) averaged over x_t is E|v_STF - grad log p_t|^2."""
  m = x0.shape[0]
  t = jnp.full((m,), t, dtype=x0.dtype)
  z = jax.random.normal(key, x0.shape, dtype=x0.dtype)
  xt = sde.perturb(x0, t, z)
  refs = jnp.concatenate([x0[:, None], ref.astype(x0.dtype)], axis=1)  # (M, n, *event)
  target = jax.vmap(lambda x, ti, r: stf_target(sde, x[None], ti, r)[0])(xt, t, refs)
  diff = target - marginal_score(xt, t)
  return _mean_and_se(sum_except_batch(diff**2))


# -- config-driven loss ---------------------------------------------------------------------------------
def get_loss_fn(training, sde, score_fn: TrainScoreFn, train: bool = True) -> LossFn:
  """loss_fn(params, batch, key) -> (loss, metrics) from the ``training`` config section (a typed
  section, ``config_schema.validate(config).training``: weighting, target, batch_size B,
  ref_batch_size n, reduce_mean, n_probes, hutchinson_probe, prng_impl). The batch is
  (N, *event): DSM / ISM / SSM train on its first B rows; STF needs N = n, trains on the first B
  rows and uses all n as the reference batch (Xu et al., Algorithm 1). 'ism' / 'ssm' estimate the
  divergence with ``training.n_probes`` ``training.hutchinson_probe`` probes per example (Huang et
  al., eq. 25 and Appendix A); the other targets do not use those two fields. ``train=False`` calls
  score_fn with rng=None (no dropout). The key is first mapped to ``training.prng_impl``
  (``step_key``), so t, the noise and the dropout masks all come from that PRNG. Field kinds and
  ranges are the schema's (checked at the boundary); the target / weighting pair is checked here
  too (``check_objective``, ValueError naming the field).

  ``loss_fn(params, batch, key, micro=(j, k))`` is micro-batch j of k of the same loss
  (``training.make_train_step`` with ``training.grad_accum_steps`` = k): training rows j, j + k,
  ... of the first B, each with the t and noise it has at k = 1, so the mean of the k losses and
  gradients is the k = 1 loss and gradient (to float rounding; dropout masks and ism / ssm probes
  are drawn per micro-batch: the same law, other draws). STF: every micro-batch's targets are
  computed against the whole reference batch of n rows, as Xu et al.'s estimator (eq. 5,
  Algorithm 1) needs, so the STF update too is the k = 1 update; the reference batch is data (n x
  D floats on each device), its memory does not grow with the micro-batch's activations."""
  tr = training
  check_objective(tr.target, tr.weighting, tr.n_probes)
  weighting, target, b, n = tr.weighting, tr.target, tr.batch_size, tr.ref_batch_size
  reduce_mean, n_probes, probe, prng_impl = (tr.reduce_mean, tr.n_probes, tr.hutchinson_probe,
                                             tr.prng_impl)
  implicit = {"ism": ism_loss, "ssm": ssm_loss}.get(target)

  def loss_fn(params: Params, batch: Array, key: Array, micro: Micro = None) -> tuple[Array, dict]:
    key = step_key(key, prng_impl)
    rows = batch.shape[0]
    if target == "stf" and rows != n:
      raise ValueError(f"STF batch must have training.ref_batch_size={n} rows, got {rows}")
    if rows < b:
      raise ValueError(f"batch has {rows} rows, fewer than training.batch_size={b}")
    if micro is not None and b % micro[1]:
      raise ValueError(f"training.batch_size={b} must be divisible by training.grad_accum_steps="
                       f"{micro[1]}")
    if implicit is not None:
      return implicit(sde, score_fn, params, batch[:b], key, weighting, probe, reduce_mean,
                      n_probes, train, micro)
    ref = batch if target == "stf" else None
    return dsm_loss(sde, score_fn, params, batch[:b], key, weighting, reduce_mean, ref, train,
                    micro)

  return loss_fn


def step_key(key: Array, impl: str) -> Array:
  """``key`` as a key of PRNG implementation ``impl`` (training.prng_impl), a pure function of it.

  'threefry' returns ``key`` unchanged (JAX's default threefry2x32, partitionable under this JAX's
  default jax_threefry_partitionable: the stream of runs made before the field existed). Other
  impls get key data of their shape drawn from ``key`` (one threefry call on a few words), so
  the train state's stored rng, the checkpoint format and exact resumption do not change. 'rbg' /
  'unsafe_rbg' lower random bits to XLA's RngBitGenerator (Philox on CPU / GPU, the hardware
  generator on TPU), as large JAX trainers do: threefry (20 rounds; the partitionable variant
  hashes one block per 32-bit word) makes the dropout masks ~7% of the CPU DDPM++ step at nf 32 /
  batch 16, and 'rbg' steps as fast as no dropout (benchmarks/train_step.py); 'unsafe_rbg' also
  splits / folds in with RngBitGenerator (no guarantee across splits); 'philox4x32' is JAX's
  counter-based Philox."""
  if impl not in PRNG_IMPLS:
    raise ValueError(f"training.prng_impl must be one of {PRNG_IMPLS}, got {impl!r}")
  if impl == "threefry":
    return key
  shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape
  return jax.random.wrap_key_data(jax.random.bits(key, shape, jnp.uint32), impl=impl)
