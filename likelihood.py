"""Likelihoods of score-based diffusion models: exact ODE log-likelihood on device, bits/dim,
the ScoreFlow per-datapoint bound, the continuous-time ELBO and the ELBO decomposition.

References (full texts in ``../shared/papers``):
* [SF]  Song, Durkan, Murray, Ermon, "Maximum likelihood training of score-based diffusion models"
        (ScoreFlow): probability-flow ODE likelihood (Sec. 3, eq. 7), the per-datapoint bound
        (Theorem 3, eq. 11; Theorem 6, eq. 37 on [eps, T]), the eps correction (Appendix B, eq. 39),
        importance sampling of t (Sec. 5.1, eq. 12), uniform / variational dequantization (Sec. 5.2).
* [VP]  Huang, Lim, Courville, "A variational perspective on diffusion-based generative models and
        score matching": the continuous-time ELBO of the plug-in reverse SDE (eq. 25), its ISM form
        with the Hutchinson estimator and its DSM form (Sec. 6.2, eq. 29; Appendix A); the ELBO of
        the lambda-family of plug-in reverse SDEs (eq. 27, Theorems 6-7; lambda = 1 - c).
* [HM]  Franzese et al., "How much is enough? A study on diffusion times in score-based generative
        models": the ELBO decomposition (eqs. 4-9, Proposition 1).

Conventions: ``x`` has a leading batch axis ``(B, *event)``; a plain ``score_fn(x, t) -> score``
with ``t`` of shape ``(B,)`` (parameters bound with ``functools.partial``); every function is pure
and jit-compatible (string options are static). Float32 by default; every function also runs in
float64 when called under ``jax.enable_x64(True)`` with float64 inputs (dtypes follow ``x``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import parallel  # noqa: F401  (before diffrax: process-wide XLA and equinox setup, parallel.py)
import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import hutchinson
from sde_lib import GaussianPrior, bcast, sum_except_batch

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

DIVERGENCES = ("exact", "hutchinson")
PROBES = hutchinson.PROBES
sample_probe = hutchinson.sample_probe  # the probes of the likelihood and the losses (one module)
SOLVERS = {
    "dopri5": diffrax.Dopri5,
    "tsit5": diffrax.Tsit5,
    "bosh3": diffrax.Bosh3,
    "heun": diffrax.Heun,
}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _check(name: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _event_dim(x: Array) -> int:
  return math.prod(x.shape[1:])


def drift_divergence(sde, t: Array, x: Array) -> Array:
  """div_x f(x, t) per example, shape (B,), for the linear isotropic drifts f = a(t) x of
  ``sde_lib`` (VP, sub-VP, VE): div f = D a(t), with a(t) = f(1, t). ``t`` scalar or (B,)."""
  t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
  ones = jnp.ones_like(x)
  return sum_except_batch(sde.drift(ones, t))


def get_solver(solver: str | diffrax.AbstractSolver) -> diffrax.AbstractSolver:
  """A diffrax solver instance from its name ('dopri5' | 'tsit5' | 'bosh3' | 'heun') or itself."""
  if isinstance(solver, str):
    _check("solver", solver.lower(), SOLVERS)
    return SOLVERS[solver.lower()]()
  return solver


def _evals_per_step(solver: diffrax.AbstractSolver) -> int:
  """Vector-field evaluations per (accepted or rejected) step of an explicit RK solver: one per
  stage, minus one when the last stage is reused as the next first stage (FSAL; diffrax keeps it
  after a rejection too, since the step restarts from the same point)."""
  tab = solver.tableau
  return len(tab.c) + (0 if tab.fsal else 1)


# ------------------------------------------------------------------------------------------------
# Probability-flow ODE likelihood (instantaneous change of variables)
# ------------------------------------------------------------------------------------------------
def drift_and_divergence(score_fn: ScoreFn, sde, divergence: str = "exact"):
  """Per-example ``fn(x, t, probe) -> (f_tilde(x, t), div f_tilde(x, t))`` for one example ``x``
  (shape ``event``) and scalar ``t``, with f_tilde = f - 1/2 g^2 s the probability-flow drift
  ([SF] eq. 7). Drift and divergence come from ONE linearization of the drift:

  * 'exact': ``jax.linearize`` once, then the D Jacobian columns J e_i by vmapping the linear
    map; div = tr J (cost ~ D jvps, for small D): ``hutchinson.exact_divergence``.
  * 'hutchinson': one ``jax.jvp`` with the probe v gives (f, J v); div ~= v^T J v
    (Skilling-Hutchinson; unbiased for E[v v^T] = I): ``hutchinson.probe_quadratic``.
  """
  _check("divergence", divergence, DIVERGENCES)
  flow = sde.probability_flow(score_fn).drift

  def batched(t):  # the drift of a batch of one example at time t
    return lambda y: flow(y, jnp.reshape(t, (1,)).astype(y.dtype))

  if divergence == "exact":
    def fn(x, t, probe=None):
      del probe
      fx, div = hutchinson.exact_divergence(batched(t), x[None])
      return fx[0], div[0]
  else:
    def fn(x, t, probe):
      fx, div = hutchinson.probe_quadratic(batched(t), x[None], probe[None])
      return fx[0], div[0]
  return fn


def _rms(tree) -> Array:
  leaves = [jnp.ravel(l) for l in jax.tree_util.tree_leaves(tree)]
  v = jnp.concatenate(leaves)
  return jnp.sqrt(jnp.mean(v**2))


DOPRI5_SCIPY_ERROR_SCALE = 1.5  # scipy RK45.E == -1.5 * diffrax.Dopri5.tableau.b_error


class ScipyRK45Controller(diffrax.AbstractAdaptiveStepSizeController):
  """SciPy ``solve_ivp`` step-size control for explicit embedded RK pairs, as a diffrax
  controller (our re-implementation of the rules SciPy documents for RK45; Hairer, Norsett,
  Wanner, "Solving ODEs I", Sec. II.4). With err = RMS(y_err / (atol + rtol max(|y0|, |y1|))):
  accept iff err < 1; the next step is h * min(10, 0.9 err^(-1/order)) after an acceptance
  (capped at 1 if this step had been rejected before, and allowed to shrink, unlike diffrax's
  PIDController), h * max(0.2, 0.9 err^(-1/order)) after a rejection. ``order`` is the order of
  the error estimate + 1 (5 for Dopri5 / Tsit5, SciPy's ``error_estimator_order + 1``).
  ``error_scale`` multiplies the solver's error estimate: SciPy's RK45 error weights E are exactly
  1.5x (with opposite sign) diffrax's Dopri5 ``b_error`` (``DOPRI5_SCIPY_ERROR_SCALE``). The state
  is the "rejected within this step" flag. ``dt0`` must be given (see ``initial_step_size``)."""
  rtol: float
  atol: float
  order: float = 5.0
  error_scale: float = 1.0
  norm: Callable = _rms
  safety: float = 0.9
  factormin: float = 0.2
  factormax: float = 10.0

  def wrap(self, direction):
    return self

  def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
    if dt0 is None:
      raise ValueError("ScipyRK45Controller needs an explicit dt0 (see initial_step_size)")
    return t0 + dt0, jnp.asarray(False)

  def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                      controller_state):
    del args, error_order
    def scaled(e, a, b):
      b = jnp.where(jnp.isnan(b), a, b)
      return e / (self.atol + self.rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))
    err = self.error_scale * self.norm(jax.tree_util.tree_map(scaled, y_error, y0, y1_candidate))
    err = jax.lax.stop_gradient(err)
    keep = err < 1.0
    grow = jnp.where(err == 0, self.factormax,
                     jnp.minimum(self.factormax,
                                 self.safety * jnp.where(err == 0, 1.0, err) ** (-1.0 / self.order)))
    grow = jnp.where(controller_state, jnp.minimum(1.0, grow), grow)
    shrink = jnp.maximum(self.factormin,
                         self.safety * jnp.where(jnp.isfinite(err), err, 1e30) ** (-1.0 / self.order))
    factor = jax.lax.stop_gradient(jnp.where(keep, grow, shrink))
    dt = (t1 - t0) * factor.astype(jnp.result_type(t1))
    next_t0 = jnp.where(keep, t1, t0)
    return keep, next_t0, next_t0 + dt, False, jnp.logical_not(keep), diffrax.RESULTS.successful


def initial_step_size(fn: Callable, t0: Array, t1: Array, y0, rtol: float, atol: float,
                      order: float) -> Array:
  """Signed initial step for an explicit RK method of error order ``order`` (Hairer, Norsett,
  Wanner, "Solving ODEs I", Sec. II.4; the rule SciPy's solve_ivp uses): with scale
  sc = atol + rtol |y0|, d0 = |y0/sc|, d1 = |f0/sc| (RMS norms), h0 = 0.01 d0/d1 (1e-6 if either
  is < 1e-5), one Euler trial step gives d2 = |(f(t0 + h0, y0 + h0 f0) - f0)/sc| / h0 and
  h = min(100 h0, (0.01 / max(d1, d2))^(1/order), |t1 - t0|). Costs two evaluations of ``fn``."""
  direction = jnp.sign(t1 - t0)
  length = jnp.abs(t1 - t0)
  scale = jax.tree_util.tree_map(lambda y: atol + rtol * jnp.abs(y), y0)
  div = lambda a, b: jax.tree_util.tree_map(lambda u, v: u / v, a, b)
  f0 = fn(t0, y0)
  d0 = _rms(div(y0, scale))
  d1 = _rms(div(f0, scale))
  small = (d0 < 1e-5) | (d1 < 1e-5)
  h0 = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1))
  h0 = jnp.minimum(h0, length)
  y1 = jax.tree_util.tree_map(lambda y, f: y + h0 * direction * f, y0, f0)
  f1 = fn(t0 + h0 * direction, y1)
  d2 = _rms(div(jax.tree_util.tree_map(lambda a, b: a - b, f1, f0), scale)) / h0
  dmax = jnp.maximum(d1, d2)
  h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(dmax, 1e-300 if h0.dtype == jnp.float64 else 1e-30))
                 ** (1.0 / order))
  return direction * jnp.minimum(jnp.minimum(100 * h0, h1), length)


def solve_flow(score_fn: ScoreFn, sde, x: Array, key: Optional[Array], *, t0, t1,
               divergence: str = "exact", probe: str = "rademacher", rtol: float = 1e-5,
               atol: float = 1e-5, solver: str | diffrax.AbstractSolver = "dopri5",
               controller: str = "scipy", per_example: bool = True,
               max_steps: int = 4096) -> dict:
  """Integrates the augmented probability-flow ODE d(x, Delta)/dt = (f_tilde, div f_tilde) from
  ``t0`` to ``t1`` for every example separately (vmap over the batch: per-example adaptive steps).

  Returns ``z = x(t1)``, ``delta = int_{t0}^{t1} div f_tilde dt`` so that, by the instantaneous
  change of variables ([SF] Sec. 3; Chen et al. 2018), log p_{t0}(x) = log p_{t1}(z) + delta;
  ``nfe`` (per-example vector-field evaluations: 2 for the initial step-size selection, 1 for
  the first FSAL stage, then ``_evals_per_step`` per attempted step), ``num_steps`` and ``ok``.

  Step control (``controller``): 'scipy' (default) is ``ScipyRK45Controller``, SciPy's RK45 rules,
  so with ``solver='dopri5'`` (the same Dormand-Prince pair) the steps follow SciPy's; 'pid' is
  diffrax's PIDController as an I-controller (same tolerances, RMS norm, safety and factor
  limits, error exponent 1/order, but it never shrinks the step after an accepted step). The
  initial step is chosen per example by ``initial_step_size`` (Hairer's heuristic, as SciPy;
  diffrax 0.7's own ``dt0=None`` falls back to a fixed 0.01 for wrapped terms). Hutchinson probes
  are drawn once per solve from ``key`` and kept fixed along the trajectory.

  ``per_example=False`` solves the whole batch as ONE ODE with a shared step size (what
  score_sde's SciPy loop does); every example then reports the batch NFE. The default vmaps
  per-example solves: each example gets its own steps and NFE, and the device runs
  max_i(steps_i) batched iterations.
  """
  _check("divergence", divergence, DIVERGENCES)
  _check("controller", controller, ("scipy", "pid"))
  dtype = x.dtype
  solver = get_solver(solver)
  field = drift_and_divergence(score_fn, sde, divergence)
  if divergence == "hutchinson":
    if key is None:
      raise ValueError("divergence='hutchinson' needs a PRNG key for the probes")
    probes = sample_probe(key, x.shape, probe, dtype)
  else:
    probes = jnp.zeros_like(x)
  t0 = jnp.asarray(t0, dtype)
  t1 = jnp.asarray(t1, dtype)
  per_step = _evals_per_step(solver)

  def solve(vf, y0):
    term = diffrax.ODETerm(vf)
    order = solver.order(term)
    dt0 = initial_step_size(lambda t, y: vf(t, y, None), t0, t1, y0, rtol, atol, order)
    if controller == "scipy":
      scale = DOPRI5_SCIPY_ERROR_SCALE if isinstance(solver, diffrax.Dopri5) else 1.0
      ctrl = ScipyRK45Controller(rtol=rtol, atol=atol, order=order, error_scale=scale)
    else:
      ctrl = diffrax.PIDController(rtol=rtol, atol=atol, error_order=order)
    sol = diffrax.diffeqsolve(
        term, solver, t0, t1, dt0, y0,
        stepsize_controller=ctrl, max_steps=max_steps,
        saveat=diffrax.SaveAt(t1=True), throw=False)
    ok = sol.result == diffrax.RESULTS.successful
    return sol.ys[0][-1], sol.ys[1][-1], sol.stats["num_steps"], ok

  if per_example:
    def one(xi, vi):
      return solve(lambda t, y, args: field(y[0], t, vi), (xi, jnp.zeros((), dtype)))

    z, delta, steps, ok = jax.vmap(one)(x, probes)
  else:
    batched_field = jax.vmap(field, in_axes=(0, None, 0))
    z, delta, steps, ok = solve(lambda t, y, args: batched_field(y[0], t, probes),
                                (x, jnp.zeros(x.shape[:1], dtype)))
    steps = jnp.broadcast_to(steps, x.shape[:1])
    ok = jnp.broadcast_to(ok, x.shape[:1])
  return dict(z=z, delta=delta, nfe=3 + per_step * steps, num_steps=steps, ok=ok)


def log_likelihood(score_fn: ScoreFn, sde, x: Array, key: Optional[Array] = None, *,
                   prior: Any = None, divergence: str = "exact", probe: str = "rademacher",
                   rtol: float = 1e-5, atol: float = 1e-5,
                   solver: str | diffrax.AbstractSolver = "dopri5", controller: str = "scipy",
                   per_example: bool = True, max_steps: int = 4096) -> dict:
  """log p_eps(x) of the probability-flow ODE model ([SF] Sec. 3, p_theta^ODE), per example.

  Integrates from t = eps (the data) to t = T (the prior):
      log p_eps(x) = log prior(z_T) + int_eps^T div f_tilde(x_t, t) dt,
  because d/dt log p_t(x_t) = -div f_tilde(x_t, t) along a trajectory of dx/dt = f_tilde. With the
  exact score and ``prior`` equal to the exact p_T, ``logp`` is the exact log p_eps(x) (the
  density of the forward process at time eps, not p_0). ``prior`` is any object with per-example
  ``log_prob`` (default ``sde.prior()``, the Gaussian p_noise); an auxiliary nu_phi works as is.

  Returns ``dict(logp (B,), z (B, *event), delta_logp (B,), nfe (B,), num_steps (B,), ok (B,))``;
  ``logp`` is NaN where the solver failed (e.g. ``max_steps`` reached). No eps correction is
  applied: p_theta^ODE is a valid density for the data on [eps, T] ([SF] Appendix B). Use
  ``jax.enable_x64(True)`` and float64 ``x`` for float64 solves.
  """
  prior = sde.prior() if prior is None else prior
  out = solve_flow(score_fn, sde, x, key, t0=sde.eps, t1=sde.T, divergence=divergence,
                   probe=probe, rtol=rtol, atol=atol, solver=solver, controller=controller,
                   per_example=per_example, max_steps=max_steps)
  logp = prior.log_prob(out["z"]).astype(x.dtype) + out["delta"]
  logp = jnp.where(out["ok"], logp, jnp.nan)
  return dict(logp=logp, z=out["z"], delta_logp=out["delta"], nfe=out["nfe"],
              num_steps=out["num_steps"], ok=out["ok"])


# ------------------------------------------------------------------------------------------------
# Bits per dimension and dequantization
# ------------------------------------------------------------------------------------------------
def bits_per_dim(logp: Array, shape, *, centered: bool = False, num_levels: int = 256) -> Array:
  """Bits/dim of the discrete data from log p of its dequantized, scaled version.

  Derivation. Integer data k in {0, ..., K-1}^D (K = ``num_levels``) are dequantized to
  u = k + v, v ~ U[0, 1)^D; a continuous density p_u on R^D gives the discrete model
  P(k) = int_{[0,1)^D} p_u(k + v) dv >= exp E_v[log p_u(k + v)] (Jensen; Theis et al. 2016,
  [SF] Sec. 5.2). The model sees y = u / K in [0, 1)^D (``centered=False``) or y = 2 u / K - 1 in
  [-1, 1)^D (``centered=True``). The change of variables p_u(u) = p_y(y) |dy/du| gives
      log p_u = log p_y - D log K            ([0, 1] scaling, dy/du = 1/K),
      log p_u = log p_y - D log K + D log 2  ([-1, 1] scaling, dy/du = 2/K),
  and bits/dim = -log p_u / (D log 2). Check: p_y uniform on [0,1]^D (log p_y = 0) or on
  [-1,1]^D (log p_y = -D log 2) both give log2 K bits/dim (8 for K = 256).
  ``shape`` is the event shape (D = prod(shape)); ``logp`` is in nats.
  """
  d = math.prod(shape)
  offset = d * math.log(num_levels) - (d * math.log(2.0) if centered else 0.0)
  return (-logp + offset) / (d * math.log(2.0))


def uniform_dequantize(key: Array, x: Array, num_levels: int = 256, centered: bool = False,
                       dtype=None) -> Array:
  """y = (k + v) / K (or 2 (k + v) / K - 1 when ``centered``), v ~ U[0, 1), the dequantization
  that ``bits_per_dim`` assumes. ``x`` holds the integer levels k in {0..K-1} (integer dtype) or
  data already scaled as k / (K - 1) to [0, 1] (or to [-1, 1] when ``centered``), the TFDS /
  score_sde scaling; levels are recovered by rounding. Noise is drawn per example from
  ``fold_in(key, i)``, so it does not depend on how a split is batched if the caller folds in a
  global example offset."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    dtype = dtype or jnp.float32
    k = x.astype(dtype)
  else:
    dtype = dtype or x.dtype
    scaled = (x + 1.0) / 2.0 if centered else x
    k = jnp.round(scaled * (num_levels - 1)).astype(dtype)
  v = jax.random.uniform(key, x.shape, dtype=dtype)
  y = (k + v) / num_levels
  return 2.0 * y - 1.0 if centered else y


def mean_and_stderr(values, axis: int = 0) -> tuple[Array, Array]:
  """Mean and its Monte Carlo standard error std(ddof=1) / sqrt(n) along ``axis`` (the one
  estimator of every reported ± in scorelab); NaN for an empty sample, inf for n = 1."""
  v = jnp.asarray(values)
  n = v.shape[axis]
  if n == 0:
    nan = jnp.full(v.shape[:axis] + v.shape[axis + 1:], jnp.nan)
    return nan, nan
  se = jnp.std(v, axis=axis, ddof=1) / math.sqrt(n) if n > 1 else jnp.full(
      v.shape[:axis] + v.shape[axis + 1:], jnp.inf)
  return jnp.mean(v, axis=axis), se


def dataset_bits_per_dim(logp_fn: Callable, consts: Any, batches: Iterable, key: Array, *,
                         num_levels: int = 256, centered: bool = False, dequantize: bool = True,
                         dtype=None, mesh=None,
                         on_batch: Optional[Callable[[int], None]] = None, store=None,
                         on_resume: Optional[Callable[[int], None]] = None) -> dict:
  """Bits/dim over a whole split, every example once, spread over the devices of ``mesh`` and the
  processes (``parallel.map_dataset``; default: every device).

  ``batches``: this process's padded ``datasets.EvalBatch`` stream of integer levels (image,
  mask, index in the split; e.g. ``datasets.get_eval_dataset(config, as_levels=True)``); padding
  rows are masked, never counted. ``logp_fn(consts, y (B, ...), keys (B,)) -> logp (B,)`` or a
  dict with ``'logp'`` and other per-example outputs (e.g. ``'nfe'``), per example (build it with
  ``parallel.per_example`` from a batch function): ``y`` is the uniformly dequantized, scaled
  data (when ``dequantize``, in ``dtype``, default float32) or the levels as they are. Example i
  uses the key fold_in(key, i), split into its dequantization noise and ``logp_fn``'s key, so the
  result does not depend on the batch size or the device / process count. A non-finite log p (a
  failed adaptive solve returns NaN) is counted, never averaged: the mean and its standard error
  are over the finite examples. ``on_batch(n)``: progress after each batch; ``store`` /
  ``on_resume``: the finished batches kept across preemptions (``parallel.map_dataset``). Returns
  ``dict(bpd, stderr, n, n_failed, failed_indices, bpd_per_example)`` (NaN per failed example)
  and, per example in split order, the other outputs of ``logp_fn``.
  """
  import parallel
  dtype = dtype or jnp.float32

  def bpd_fn(c, levels, keys):
    k_deq, k_fn = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    y = (jax.vmap(lambda k, x: uniform_dequantize(k, x[None], num_levels, centered, dtype)[0])(
        k_deq, levels) if dequantize else levels)
    out = logp_fn(c, y, k_fn)
    out = dict(out) if isinstance(out, dict) else {"logp": out}
    out["bpd"] = bits_per_dim(out["logp"], y.shape[1:], centered=centered, num_levels=num_levels)
    return out

  out = parallel.map_dataset(bpd_fn, consts, batches, key, mesh=mesh, on_batch=on_batch,
                             store=store, on_resume=on_resume)
  bpd = np.asarray(out.pop("bpd"), np.float64)
  out.pop("logp")
  if len(bpd) == 0:
    raise ValueError("dataset_bits_per_dim got no examples")
  ok = np.isfinite(bpd)
  mean, stderr = mean_and_stderr(bpd[ok])
  return dict(out, bpd=float(mean), stderr=float(stderr), n=int(ok.sum()),
              n_failed=int((~ok).sum()), failed_indices=[int(i) for i in np.flatnonzero(~ok)],
              bpd_per_example=bpd)


# ------------------------------------------------------------------------------------------------
# Variational bounds: ScoreFlow (DSM form + eps correction) and the CT-ELBO (ISM / DSM forms)
# ------------------------------------------------------------------------------------------------
def _draw_xt(sde, x: Array, key: Array, importance_sampling: bool):
  """One time per example t ~ p(t) (importance sampled p ∝ g^2/sigma^2, [SF] eq. 12, or uniform),
  1/p(t), z, x_t = alpha_t x + sigma_t z and the probe key of the draw."""
  k_t, k_z, k_v = jax.random.split(key, 3)
  t, inv_p = sde.sample_time(k_t, x.shape[0], importance_sampling)
  t, inv_p = t.astype(x.dtype), inv_p.astype(x.dtype)
  z = jax.random.normal(k_z, x.shape, dtype=x.dtype)
  alpha, sigma = sde.marginal_coeffs(t)
  return t, inv_p, z, bcast(alpha, x) * x + bcast(sigma, x) * z, k_v


def _integrand_draw(score_fn: ScoreFn, sde, x: Array, key: Array, form: str, probe: str,
                    importance_sampling: bool) -> tuple[Array, Array]:
  """One (t, x_t) draw per example of the time integral of the bound, already divided by p(t).

  'dsm' ([SF] Theorem 6 / [VP] eq. 29 + Appendix A.3), with x_t = alpha x + sigma z:
      score part  1/2 g^2 |s - grad log p_0t(x_t|x)|^2 = 1/2 (g^2/sigma^2) |sigma s + z|^2,
      constant    -1/2 g^2 |grad log p_0t|^2 - div f = -1/2 (g^2/sigma^2) |z|^2 - div f.
  'ism' ([VP] eq. 25): 1/2 g^2 |s|^2 + g^2 div s - div f with div s ~= v^T (ds/dx) v (one jvp);
      returned as (that, 0). Returns (score part, constant), each (B,).
  """
  t, inv_p, z, xt, k_v = _draw_xt(sde, x, key, importance_sampling)
  _, sigma = sde.marginal_coeffs(t)
  g2 = sde.diffusion(t) ** 2
  div_f = drift_divergence(sde, t, x)
  if form == "dsm":
    s = score_fn(xt, t)
    ratio = g2 / sigma**2
    sm = 0.5 * ratio * sum_except_batch((bcast(sigma, x) * s + z) ** 2)
    const = -0.5 * ratio * sum_except_batch(z**2) - div_f
    return inv_p * sm, inv_p * const
  s, div_s = hutchinson.divergence(lambda y: score_fn(y, t), xt, k_v, probe)
  ism = 0.5 * g2 * sum_except_batch(s**2) + g2 * div_s - div_f
  return inv_p * ism, jnp.zeros_like(ism)


def prior_cross_entropy(sde, x: Array, key: Array, prior: Any = None, n_samples: int = 16) -> Array:
  """-E_{x' ~ p_0T(x'|x)}[log prior(x')] per example ([SF] Theorem 3, first term). Closed form for
  a ``GaussianPrior`` N(0, s^2 I): D/2 log(2 pi s^2) + (alpha_T^2 |x|^2 + D sigma_T^2) / (2 s^2);
  Monte Carlo with ``n_samples`` draws for any other prior object (e.g. an auxiliary nu_phi)."""
  prior = sde.prior() if prior is None else prior
  alpha, sigma = sde.marginal_coeffs(jnp.asarray(sde.T, x.dtype))
  d = _event_dim(x)
  if isinstance(prior, GaussianPrior):
    var = jnp.asarray(prior.std, x.dtype) ** 2
    sq = sum_except_batch(x**2)
    return 0.5 * d * jnp.log(2 * jnp.pi * var) + (alpha**2 * sq + d * sigma**2) / (2 * var)
  keys = jax.random.split(key, n_samples)

  def draw(k):
    z = jax.random.normal(k, x.shape, dtype=x.dtype)
    return -prior.log_prob(alpha * x + sigma * z).astype(x.dtype)

  return jnp.mean(jax.lax.map(draw, keys), axis=0)


def eps_correction(score_fn: ScoreFn, sde, x: Array, key: Array, n_samples: int = 16) -> Array:
  """-E_{x' ~ p_0eps(x'|x)}[log q_theta(x|x') - log p_0eps(x'|x)] ([SF] Appendix B, eq. 39) with
  the Tweedie decoder q_theta(x|x') = N(x'/a + b^2/a s(x', eps), b^2/a^2 I), p_0eps = N(a x, b^2 I).
  Writing x' = a x + b z the Gaussian normalizers cancel up to |det| and
      correction = -D log a + 1/2 E[|z + b s(x', eps)|^2 - |z|^2]
  (evaluated in this form: the two log-densities are each O(D log b) and would cancel)."""
  a, b = sde.marginal_coeffs(jnp.asarray(sde.eps, x.dtype))
  d = _event_dim(x)
  t = jnp.full(x.shape[:1], sde.eps, x.dtype)
  keys = jax.random.split(key, n_samples)

  def draw(k):
    z = jax.random.normal(k, x.shape, dtype=x.dtype)
    s = score_fn(a * x + b * z, t)
    return 0.5 * sum_except_batch((z + b * s) ** 2 - z**2)

  return -d * jnp.log(a) + jnp.mean(jax.lax.map(jax.checkpoint(draw), keys), axis=0)


def _time_integral(score_fn: ScoreFn, sde, x: Array, key: Array, n_time_samples: int,
                   form: str, probe: str, importance_sampling: bool) -> dict:
  """Monte Carlo estimate of the time integral over [eps, T] (``n_time_samples`` draws per
  example, sequential via lax.map to bound memory) with its standard error. Each draw is
  rematerialized (``jax.checkpoint``): under ``grad`` (the dequantizer fit, ScoreFlow eq. 13) the
  backward pass recomputes one draw at a time, so memory does not grow with the draws."""
  keys = jax.random.split(key, n_time_samples)
  main, const = jax.lax.map(jax.checkpoint(
      lambda k: _integrand_draw(score_fn, sde, x, k, form, probe, importance_sampling)), keys)
  total, stderr = mean_and_stderr(main + const)
  return dict(main=jnp.mean(main, 0), const=jnp.mean(const, 0), total=total, stderr=stderr)


def ct_elbo(score_fn: ScoreFn, sde, x: Array, key: Array, *, form: str = "ism",
            probe: str = "rademacher", n_time_samples: int = 256, importance_sampling: bool = True,
            prior: Any = None, n_prior_samples: int = 16, eps_correction_term: bool = False) -> dict:
  """Continuous-time ELBO of the plug-in reverse SDE (lambda = 0, c = 1), [VP] eq. 25:
      E = E[log prior(Y_T) | Y_0 = x] - int_eps^T E[1/2 g^2 |s|^2 + g^2 div s - div f | Y_0 = x] ds
  per example (nats). ``form='ism'``: divergence by Hutchinson (one jvp per draw, ``probe``);
  ``form='dsm'``: the equivalent denoising form ([VP] eq. 29, Appendix A.3)
      -int E[1/2 g^2 |s - grad log p_0s|^2] + int E[1/2 g^2 |grad log p_0s|^2 + div f]
  whose second integral (``dsm_constant``, independent of s) is kept, so both forms estimate the
  same quantity; [SF] Theorem 6 gives E = -L^DSM(x, eps).

  On [eps, T] this lower-bounds E_{x' ~ p_0eps(x'|x)}[log p_theta^SDE(x')] (eps-smoothed data,
  [SF] eq. 37); with ``eps_correction_term`` the eq. 39 correction is subtracted, giving a lower
  bound on log p_theta(x) of the Tweedie-decoded model. Time t: importance sampled
  p(t) ∝ g^2/sigma_t^2 ([SF] eq. 12) or uniform. Returns ``dict(elbo, prior_term (E log prior),
  integral, dsm_constant, correction, stderr)`` each (B,); ``stderr`` is the MC standard error of
  the time integral.
  """
  _check("form", form, ("ism", "dsm"))
  k_int, k_prior, k_corr = jax.random.split(key, 3)
  integral = _time_integral(score_fn, sde, x, k_int, n_time_samples, form, probe,
                            importance_sampling)
  prior_term = -prior_cross_entropy(sde, x, k_prior, prior, n_prior_samples)
  corr = (eps_correction(score_fn, sde, x, k_corr, n_prior_samples) if eps_correction_term
          else jnp.zeros_like(prior_term))
  elbo = prior_term - integral["total"] - corr
  return dict(elbo=elbo, prior_term=prior_term, integral=integral["total"],
              dsm_constant=-integral["const"] if form == "dsm" else jnp.zeros_like(elbo),
              correction=corr, stderr=integral["stderr"])


def lambda_ct_elbo(score_fn: ScoreFn, true_score_fn: ScoreFn, sde, x: Array, key: Array,
                   lambdas, *, probe: str = "rademacher", n_time_samples: int = 256,
                   importance_sampling: bool = True, prior: Any = None,
                   n_prior_samples: int = 16) -> dict:
  """CT-ELBO of the lambda-family of plug-in reverse SDEs ([VP] eq. 27, Theorem 6; Theorem 7 of
  Appendix H), for every lambda < 1 of ``lambdas`` at once (common random numbers):
      dX = [(1 - lambda/2) g^2 s - f] dt + sqrt(1 - lambda) g dB,
  i.e. scorelab's generative SDE with c = 1 - lambda (``sde.reverse(score_fn, c)``); lambda = 0 is
  the plug-in reverse SDE of eq. 25 (``ct_elbo``), lambda -> 1 the probability-flow ODE. With
  A = 1/2 g^2 |s|^2 + g^2 div s (ISM; Hutchinson ``probe`` or 'exact'), B = 1/2 g^2 |s|^2 -
  g^2 s.grad log q, C = 1/2 g^2 |s - grad log q|^2 and grad log q the marginal score
  ``true_score_fn(x, t)`` of the data (an oracle: toy_data's ``score_fn(sde)``), Theorem 7 reads
      E^lambda = E[log prior(Y_T)] - int_eps^T E[(1 - lambda/2) A - div f + (lambda/2) B
                                                 + lambda^2 / (4 (1 - lambda)) C] ds.
  The expectations of Theorem 7 are over the lambda-inference SDE given Y_0 = x, whose marginals
  (not its transition kernels) are the forward process's; Y_s is drawn from the forward kernel
  here, so the per-example values are unbiased for E_{Y_0}[E^lambda] only after averaging over
  x ~ p_data: pass data samples and average. Then E_{Y_0}[E^lambda] = E_{Y_0}[E^0] -
  lambda^2 / (4 (1 - lambda)) int C ds (Theorem 6, eq. 28): every lambda != 0 is below lambda = 0.
  Time: ``n_time_samples`` draws per example (t importance sampled as in ``ct_elbo``).

  Returns ``dict(elbo (L, B), integral (L, B), stderr (L, B), prior_term (B,), score_gap (B,)
  (int_eps^T C ds, estimated), lambdas (L,))``, nats.
  """
  if not isinstance(lambdas, jax.core.Tracer):  # a traced lambda is the caller's to check
    concrete = np.atleast_1d(np.asarray(lambdas, np.float64))
    if not np.all(concrete < 1):
      raise ValueError(f"lambdas must all be < 1 (lambda = 1 is the ODE: [VP] Theorem 6 divides "
                       f"by 1 - lambda), got {concrete.tolist()}")
  lam = jnp.atleast_1d(jnp.asarray(lambdas, x.dtype))
  assert lam.ndim == 1, f"lambdas: want a scalar or a 1-D sequence, got shape {lam.shape}"
  k_int, k_prior = jax.random.split(key)

  def draw(k):
    t, inv_p, _, xt, k_v = _draw_xt(sde, x, k, importance_sampling)
    g2 = sde.diffusion(t) ** 2
    s, div_s = hutchinson.divergence(lambda y: score_fn(y, t), xt, k_v, probe)
    q = true_score_fn(xt, t)
    sq = sum_except_batch(s**2)
    a = 0.5 * g2 * sq + g2 * div_s
    b = 0.5 * g2 * sq - g2 * sum_except_batch(s * q)
    c = 0.5 * g2 * sum_except_batch((s - q) ** 2)
    df = drift_divergence(sde, t, x)
    per_lam = ((1 - lam[:, None] / 2) * a - df + lam[:, None] / 2 * b
               + (lam**2 / (4 * (1 - lam)))[:, None] * c)
    return inv_p * per_lam, inv_p * c  # (L, B), (B,)

  per_lam, gap = jax.lax.map(draw, jax.random.split(k_int, n_time_samples))
  integral, stderr = mean_and_stderr(per_lam)
  prior_term = -prior_cross_entropy(sde, x, k_prior, prior, n_prior_samples)
  return dict(elbo=prior_term - integral, integral=integral, stderr=stderr, prior_term=prior_term,
              score_gap=jnp.mean(gap, axis=0), lambdas=lam)


def scoreflow_bound(score_fn: ScoreFn, sde, x: Array, key: Array, *, n_time_samples: int = 256,
                    importance_sampling: bool = True, prior: Any = None,
                    n_prior_samples: int = 16, eps_correction_term: bool = True) -> dict:
  """ScoreFlow per-datapoint upper bound on -log p_theta(x) in nats ([SF] Theorem 3 on [eps, T],
  i.e. Theorem 6, eq. 37, plus the eps correction of Appendix B, eq. 39):
      -log p_theta(x) <= -E_{p_0eps(x'|x)}[log q_theta(x|x') - log p_0eps(x'|x)]     (correction)
                         - E_{p_0T(x'|x)}[log prior(x')]                             (prior)
                         + 1/2 int_eps^T g^2 E|s - grad log p_0t(x'|x)|^2 dt         (score)
                         - 1/2 int_eps^T E[g^2 |grad log p_0t|^2 + 2 div f] dt.      (constant)
  Time integrals: ``n_time_samples`` draws per example, t ~ g^2/(sigma^2 Z) with weight
  Z sigma^2/g^2 ([SF] eq. 12) when ``importance_sampling`` else uniform. Returns
  ``dict(nll_bound, prior, score, constant, correction, stderr)`` each (B,).
  """
  k_int, k_prior, k_corr = jax.random.split(key, 3)
  integral = _time_integral(score_fn, sde, x, k_int, n_time_samples, "dsm", "rademacher",
                            importance_sampling)
  prior_ce = prior_cross_entropy(sde, x, k_prior, prior, n_prior_samples)
  corr = (eps_correction(score_fn, sde, x, k_corr, n_prior_samples) if eps_correction_term
          else jnp.zeros_like(prior_ce))
  return dict(nll_bound=prior_ce + integral["total"] + corr, prior=prior_ce,
              score=integral["main"], constant=integral["const"], correction=corr,
              stderr=integral["stderr"])


# ------------------------------------------------------------------------------------------------
# ELBO decomposition of "How much is enough?" for toy distributions with exact marginal scores
# ------------------------------------------------------------------------------------------------
def _quadrature_times(sde, n_t: int, dtype):
  """Gauss-Legendre nodes in y = Phi(t), Phi' = g^2/sigma_t^2 (the IS antiderivative), so that
  int_eps^T g^2 h(t) dt = int sigma_t^2 h(t(y)) dy has a smooth, bounded integrand near t = eps."""
  nodes, weights = np.polynomial.legendre.leggauss(n_t)
  lo = sde.is_antiderivative(jnp.asarray(sde.eps, dtype))
  hi = sde.is_antiderivative(jnp.asarray(sde.T, dtype))
  y = 0.5 * (hi - lo) * jnp.asarray(nodes, dtype) + 0.5 * (hi + lo)
  w = 0.5 * (hi - lo) * jnp.asarray(weights, dtype)
  t = jnp.clip(sde.is_inverse_antiderivative(y), sde.eps, sde.T)
  return t, w


def elbo_decomposition(sde, dist, key: Array, *, score_fn: Optional[ScoreFn] = None,
                       prior: Any = None, n_x: int = 4096, n_t: int = 64) -> dict:
  """ELBO decomposition of [HM] (eqs. 4-9) on the horizon [eps, T] for a toy ``dist`` with exact
  marginals (``sample(key, n)``, ``marginal_log_prob(sde, x, t)``, ``marginal_score(sde, x, t)``,
  e.g. ``toy_data.GaussianMixture``). x_0 ~ dist, x_t = alpha_t x_0 + sigma_t z (one set of
  ``n_x`` Monte Carlo draws shared by all t); time integrals by ``n_t``-node Gauss-Legendre
  quadrature in y = Phi(t) (see ``_quadrature_times``). Returned (nats, averages over x):

  * ``kl_prior``  KL[p(x,T) || p_noise] = E_{p_T}[log p_T - log prior]           ([HM] eq. 6)
  * ``K``         1/2 int g^2 E|grad log p_t(x_t) - grad log p_0t(x_t|x_0)|^2    ([HM] eq. 5):
                  the minimum over s of the DSM integral I(s, T) (Monte Carlo with the control
                  variate |z|^2 - D, which has known mean 0)
  * ``G``         I(s_theta, T) - K(T) = 1/2 int g^2 E|s_theta - grad log p_t|^2 (gap; 0 with no
                  ``score_fn``, i.e. the exact score)
  * ``R``         1/2 int E[g^2 |grad log p_0t|^2 - 2 f^T grad log p_0t] dt      ([HM] eq. 4);
                  its x-expectation is closed form: int (D g^2/(2 sigma^2) + div f) dt
  * ``log_pT``    E_{p_T}[log p_T];  ``log_prior`` E_{p_T}[log prior]
  * ``log_data``  E_{p_eps}[log p_eps] (the data term on [eps, T])
  * ``elbo``      log_prior - K - G + R                                              ([HM] eq. 4)
                  = log_data - G - kl_prior by Proposition 1 (eq. 9)
  * ``prop1_residual``  log_pT - K + R - log_data (0 up to MC/quadrature error, [HM] eq. 8)
  and ``*_stderr`` Monte Carlo standard errors of the x-averages.
  """
  prior = sde.prior() if prior is None else prior
  k_x, k_z = jax.random.split(key)
  x0 = dist.sample(k_x, n_x)
  dtype = x0.dtype
  z = jax.random.normal(k_z, x0.shape, dtype=dtype)
  d = _event_dim(x0)

  def at(t):
    alpha, sigma = sde.marginal_coeffs(t)
    return alpha * x0 + sigma * z, sigma

  # Endpoint terms (Monte Carlo over x).
  t_end = jnp.asarray(sde.T, dtype)
  x_t_end, _ = at(t_end)
  log_pT = dist.marginal_log_prob(sde, x_t_end, t_end)
  log_prior = prior.log_prob(x_t_end).astype(dtype)
  x_eps, _ = at(jnp.asarray(sde.eps, dtype))
  log_data = dist.marginal_log_prob(sde, x_eps, jnp.asarray(sde.eps, dtype))

  # Time integrals (quadrature over t in y = Phi(t), Monte Carlo over x).
  ts, ws = _quadrature_times(sde, n_t, dtype)

  def node(t):
    xt, sigma = at(t)
    true = dist.marginal_score(sde, xt, t)
    # sigma^2 * 1/2 |grad log p_t + z/sigma|^2, minus c (|z|^2 - D) (a zero-mean control variate,
    # c the per-node regression coefficient): removes the chi^2 noise of |z|^2 that dominates
    # when sigma_t is small compared with the data scale.
    a = jnp.sum((sigma * true + z) ** 2, axis=-1)
    b = jnp.sum(z**2, axis=-1) - d
    c = jnp.mean((a - jnp.mean(a)) * b) / jnp.mean(b**2)
    k_int = 0.5 * (a - jax.lax.stop_gradient(c) * b)
    if score_fn is None:
      g_int = jnp.zeros_like(k_int)
    else:
      s = score_fn(xt, jnp.full(x0.shape[:1], t, dtype))
      g_int = 0.5 * sigma**2 * jnp.sum((s - true) ** 2, axis=-1)
    g2 = sde.diffusion(t) ** 2
    r_int = 0.5 * d + sigma**2 / g2 * drift_divergence(sde, t, x0[:1])[0]
    return k_int, g_int, r_int

  k_n, g_n, r_n = jax.lax.map(node, ts)  # (n_t, n_x), (n_t, n_x), (n_t,)
  k_x_vals = jnp.einsum("t,tn->n", ws, k_n)
  g_x_vals = jnp.einsum("t,tn->n", ws, g_n)
  r_val = jnp.sum(ws * r_n)

  kl_vals = log_pT - log_prior
  elbo_vals = log_prior - k_x_vals - g_x_vals + r_val
  resid_vals = log_pT - k_x_vals + r_val - log_data
  out = {}
  for name, v in [("kl_prior", kl_vals), ("K", k_x_vals), ("G", g_x_vals), ("log_pT", log_pT),
                  ("log_prior", log_prior), ("log_data", log_data), ("elbo", elbo_vals),
                  ("prop1_residual", resid_vals)]:
    out[name], out[name + "_stderr"] = mean_and_stderr(v)
  out["R"] = r_val
  return out
