"""Samplers against closed-form oracles (exact Gaussian / GMM scores).

Tolerances: sample means and covariances must agree with the exact moments within ``Z`` standard
errors of the sample estimate (SE of a mean: sqrt(C_ii / N); of a covariance entry:
sqrt((C_ii C_jj + C_ij^2) / N)) plus a small stated allowance for time discretization. The ODE-vs-SDE
pulse experiment (Cao et al., Appendix G) compares the fitted variance / KL of generated 1-D samples
with the closed form derived from their Appendix G.1, evaluated by quadrature.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import config_schema
import sde_lib
import samplers
import toy_data
from configs.default import get_default_config
from xla_options import optimized_jit

Z = 4.5  # standard errors allowed for moment checks (per entry; a few dozen entries per test)


# ---------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------

def gaussian_marginal(mean, cov, sde, t):
  """p_t of x0 ~ N(m, C) under a linear SDE: N(alpha_t m, alpha_t^2 C + sigma_t^2 I)."""
  alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
  return alpha * mean, alpha**2 * cov + sigma**2 * jnp.eye(mean.shape[0])


def gaussian_score_fn(mean, cov, sde):
  """Exact score -(alpha^2 C + sigma^2 I)^{-1} (x - alpha m) for Gaussian data (local oracle),
  with C = U diag(lam) U^T so that the inverse is U diag(1 / (alpha^2 lam + sigma^2)) U^T."""
  lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
  lam, u = jnp.asarray(lam, jnp.float32), jnp.asarray(u, jnp.float32)

  def score(x, t):
    alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
    y = (x - alpha * mean) @ u
    return -(y / (alpha**2 * lam + sigma**2)) @ u.T

  return score


def iso_gmm_score_fn(dist, sde):
  """Exact score of an isotropic GMM sum_k w_k N(mu_k, s^2 I) at time t (local, cheap oracle):
  components N(alpha mu_k, v I), v = alpha^2 s^2 + sigma^2, score = -sum_k r_k (x - alpha mu_k) / v.
  Checked against toy_data's general (Cholesky) oracle in test_local_gmm_oracle_matches_toy_data."""
  logw = dist.log_weights()
  means = dist.means
  s2 = dist.covs[0, 0, 0]

  def score(x, t):
    alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
    v = alpha**2 * s2 + sigma**2
    diff = x[:, None, :] - alpha * means[None]  # (n, K, D)
    logits = logw - 0.5 * jnp.sum(diff**2, -1) / v
    r = jax.nn.softmax(logits, axis=-1)
    return -jnp.einsum("nk,nkd->nd", r, diff) / v

  return score


class FullGaussianPrior:
  """N(m, C) prior with the ``sample(key, shape)`` / ``log_prob(x)`` interface of sde_lib's priors."""

  def __init__(self, mean, cov):
    self.mean, self.cov = mean, cov

  def sample(self, key, shape):
    chol = jnp.linalg.cholesky(self.cov)
    return self.mean + jax.random.normal(key, shape) @ chol.T

  def log_prob(self, x):
    return jax.scipy.stats.multivariate_normal.logpdf(x, self.mean, self.cov)


def assert_moments(x, mean, cov, rel_allow=0.0, what=""):
  """Sample mean / covariance equal (mean, cov) within Z standard errors (+ rel_allow * scale)."""
  x = np.asarray(x, np.float64)
  mean, cov = np.asarray(mean, np.float64), np.atleast_2d(np.asarray(cov, np.float64))
  n = x.shape[0]
  d = np.sqrt(np.diag(cov))
  mean_tol = Z * d / math.sqrt(n) + rel_allow * d
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), mean_tol, err_msg=f"mean {what}")
  cov_hat = np.atleast_2d(np.cov(x.T))
  se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
  cov_tol = Z * se + rel_allow * np.outer(d, d)
  np.testing.assert_array_less(np.abs(cov_hat - cov), cov_tol, err_msg=f"cov {what}")
  # Reported with -s: largest deviation in standard errors (mean, covariance).
  print(f"[{what}] max |dev|/SE: mean {np.max(np.abs(x.mean(0) - mean) / (d / math.sqrt(n))):.2f}"
        f" cov {np.max(np.abs(cov_hat - cov) / se):.2f}")


class CallCounter:
  """Counts executed score evaluations with jax.debug.callback (one per call, inside jit/loops)."""

  def __init__(self, score_fn):
    self.n = 0
    self.score_fn = score_fn

  def _inc(self):
    self.n += 1

  def __call__(self, x, t):
    jax.debug.callback(self._inc)
    return self.score_fn(x, t)


MEAN2 = jnp.array([1.0, -0.5])
COV2 = jnp.array([[0.5, 0.3], [0.3, 0.4]])


# ---------------------------------------------------------------------------------------------------
# Moments: ODE, SDE family c in {0, 1, 4}, PC, exponential integrator
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde", [sde_lib.VPSDE(eps=1e-3), sde_lib.VESDE(eps=1e-3)], ids=["vp", "ve"])
def test_gaussian_2d_moments_all_samplers(sde):
  n = 3000
  score = gaussian_score_fn(MEAN2, COV2, sde)
  shape = (n, 2)
  ode = jax.jit(lambda sde, key: samplers.build(samplers.ode_sampler, sde, shape)(score, key))
  em_traces = []

  @jax.jit
  def em(sde, key, c):
    em_traces.append(1)  # once per trace: sweeping c must not recompile
    return samplers.build(samplers.sde_sampler, sde, shape, c=c, n_steps=400)(score, key)

  pc = jax.jit(lambda sde, key: samplers.build(samplers.pc_sampler, sde, shape, n_steps=400)(
      score, key))
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x, stats = ode(sde, keys[0])
  assert bool(stats["success"])
  assert_moments(x, MEAN2, COV2, 0.01, "ode")
  for key, c in zip(keys[1:4], (0.0, 1.0, 4.0)):
    x, stats = em(sde, key, c)
    assert int(stats["nfe"]) == 400
    # 400 Euler-Maruyama steps: allow 3% of the scale for the O(dt) bias on top of sampling error.
    assert_moments(x, MEAN2, COV2, 0.03, f"em c={c}")
  assert len(em_traces) == 1
  x, _ = pc(sde, keys[4])
  assert_moments(x, MEAN2, COV2, 0.03, "pc")
  if isinstance(sde, sde_lib.VPSDE):
    x, _ = samplers.build(samplers.exponential_integrator_sampler, sde, shape, c=2.0, n_steps=400)(
        score, keys[5])
    assert_moments(x, MEAN2, COV2, 0.03, "exponential")


def test_local_gmm_oracle_matches_toy_data():
  for dist in (toy_data.ode_sde_gmm_1d(), toy_data.ode_sde_gmm_2d()):
    for sde in (sde_lib.VPSDE(), sde_lib.VESDE()):
      x = 1.5 * jax.random.normal(jax.random.PRNGKey(0), (64, dist.dim))
      ts = jnp.array([1e-3, 0.05, 0.5, 1.0])
      both = jax.jit(jax.vmap(lambda t: (iso_gmm_score_fn(dist, sde)(x, t),
                                         dist.marginal_score(sde, x, t))))
      mine, ref = both(ts)
      np.testing.assert_allclose(mine, ref, rtol=2e-3, atol=2e-3)


def test_gmm_1d_ode_and_sde_modes():
  """ODE-vs-SDE paper's 1-D two-mode GMM (Appendix H.1) under VP: moments and mode weights."""
  dist = toy_data.ode_sde_gmm_1d()
  sde = sde_lib.VPSDE(eps=1e-3)
  score = iso_gmm_score_fn(dist, sde)
  n = 4000
  mean, cov = dist.mean(), dist.cov()
  x, stats = jax.jit(lambda key: samplers.build(samplers.ode_sampler, sde, (n, 1))(score, key))(
      jax.random.PRNGKey(1))
  assert bool(stats["success"])
  assert_moments(x, mean, cov, 0.01, "gmm ode")
  frac_se = math.sqrt(0.25 / n)
  assert abs(float(jnp.mean(x > 0)) - 0.5) < Z * frac_se
  em = jax.jit(lambda key, c: samplers.build(samplers.sde_sampler, sde, (n, 1), c=c, n_steps=1000)(
      score, key))
  for c in (1.0, 4.0):
    x, _ = em(jax.random.PRNGKey(2), c)
    assert_moments(x, mean, cov, 0.02, f"gmm em c={c}")
    assert abs(float(jnp.mean(x > 0)) - 0.5) < Z * frac_se
    # Samples sit on the modes: within-mode spread matches the component std 0.1 (+2% allowance).
    within = np.std(np.abs(np.asarray(x)) - 1.0)
    assert abs(within - 0.1) < Z * 0.1 / math.sqrt(2 * n) + 0.002


def test_gmm_2d_ode_ve_and_pc():
  dist = toy_data.ode_sde_gmm_2d()
  n = 3000
  for sde in (sde_lib.VESDE(eps=1e-3), sde_lib.VPSDE(eps=1e-3)):
    score = iso_gmm_score_fn(dist, sde)
    x, stats = samplers.build(samplers.ode_sampler, sde, (n, 2))(score, jax.random.PRNGKey(3))
    assert bool(stats["success"])
    assert_moments(x, dist.mean(), dist.cov(), 0.01, f"gmm2d ode {type(sde).__name__}")
  x, _ = samplers.build(samplers.pc_sampler, sde, (n, 2), n_steps=500, snr=0.1)(score,
                                                                    jax.random.PRNGKey(4))
  assert_moments(x, dist.mean(), dist.cov(), 0.03, "gmm2d pc")
  quadrant = (np.asarray(x[:, 0]) > 0) * 2 + (np.asarray(x[:, 1]) > 0)
  counts = np.bincount(quadrant, minlength=4) / n
  np.testing.assert_array_less(np.abs(counts - 0.25), Z * math.sqrt(0.25 * 0.75 / n))


def test_exponential_integrator_agrees_with_em_and_ode():
  sde = sde_lib.VPSDE(eps=1e-3)
  score = gaussian_score_fn(MEAN2, COV2, sde)
  # Pathwise, c = 0: the exponential integrator from the same x_T converges to the ODE solution.
  x_T = sde.prior_sample(jax.random.PRNGKey(5), (256, 2))
  ref, _ = samplers.ode_sampler(score, sde, x_T, None, samplers.uniform_time_grid(sde, 1),
                                rtol=1e-6, atol=1e-6)
  errs = []
  for n_steps in (250, 1000):
    x, _ = samplers.exponential_integrator_sampler(score, sde, x_T, jax.random.PRNGKey(0),
                                                   samplers.uniform_time_grid(sde, n_steps), c=0.0)
    errs.append(float(jnp.max(jnp.abs(x - ref))))
  assert errs[1] < 0.02, errs
  assert errs[1] < 0.5 * errs[0], errs  # first-order convergence (ratio ~4 expected)
  # In distribution, c = 1 and c = 4: exponential integrator and Euler-Maruyama at 1000 steps agree
  # with each other (difference of two independent estimates) and with the data moments.
  n = 4000
  for c in (1.0, 4.0):
    xe, _ = samplers.build(samplers.exponential_integrator_sampler, sde, (n, 2), c=c,
                           n_steps=1000)(score, jax.random.PRNGKey(6))
    xm, _ = samplers.build(samplers.sde_sampler, sde, (n, 2), c=c, n_steps=1000)(
        score, jax.random.PRNGKey(7))
    assert_moments(xe, MEAN2, COV2, 0.02, f"exp c={c}")
    assert_moments(xm, MEAN2, COV2, 0.02, f"em c={c}")
    se_diff = np.sqrt(2 * np.diag(np.asarray(COV2)) / n)
    np.testing.assert_array_less(np.abs(np.mean(xe, 0) - np.mean(xm, 0)), Z * se_diff + 0.01)


def exact_ode_solution(sde, x_T, mean=MEAN2, cov=COV2):
  """Closed-form probability-flow ODE map p_T -> p_eps for Gaussian data N(m, C): the standardized
  eigen-coordinates (u_i^T x - alpha_t u_i^T m) / sqrt(alpha_t^2 lam_i + sigma_t^2) are constant
  in t, so x_eps = alpha_eps m + U diag(sqrt(v_eps / v_T)) U^T (x_T - alpha_T m) (float64)."""
  lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
  (a_T, s_T), (a_e, s_e) = [np.asarray(sde.marginal_coeffs(jnp.asarray(v)), np.float64)
                            for v in (sde.T, sde.eps)]
  scale = np.sqrt((a_e**2 * lam + s_e**2) / (a_T**2 * lam + s_T**2))
  m = np.asarray(mean, np.float64)
  return a_e * m + ((np.asarray(x_T, np.float64) - a_T * m) @ u * scale) @ u.T


EXP_SDES = [sde_lib.subVPSDE(eps=1e-3), sde_lib.VESDE(eps=1e-3), sde_lib.EDM(T=80.0, eps=2e-3)]


@pytest.mark.parametrize("sde", EXP_SDES, ids=["subvp", "ve", "edm"])
def test_exponential_integrator_converges_first_order(sde):
  """Cao et al., Appendix H.4 generalised (samplers.exponential_step_coeffs): for Gaussian data
  (toy_data.gaussian, exact score) and c = 0 the exponential integrator from a fixed x_T converges
  to the closed-form ODE solution at first order: halving the step halves the max error (measured
  ratios 2.00-2.18 from 100 to 400 steps; we require 1.8-2.4, a wrong coefficient k or gamma
  plateaus instead), and at 400 steps the error is below 2% of the prior scale."""
  dist = toy_data.gaussian(MEAN2, COV2)
  score = functools.partial(dist.marginal_score, sde)
  x_T = sde.prior_sample(jax.random.PRNGKey(5), (256, 2))
  ref = exact_ode_solution(sde, x_T)
  run = jax.jit(lambda n: samplers.exponential_integrator_sampler(
      score, sde, x_T, jax.random.PRNGKey(0), samplers.uniform_time_grid(sde, n), c=0.0)[0],
      static_argnums=0)
  errs = [float(np.max(np.abs(np.asarray(run(n), np.float64) - ref))) for n in (100, 200, 400)]
  ratios = [errs[0] / errs[1], errs[1] / errs[2]]
  assert all(1.8 < r < 2.4 for r in ratios), (errs, ratios)
  assert errs[2] < 0.02 * float(sde.prior_std()), errs


@pytest.mark.parametrize("sde", EXP_SDES[:2], ids=["subvp", "ve"])
def test_exponential_integrator_in_law_subvp_ve(sde):
  """c = 1 and c = 4 at 500 steps: the samples have the exact moments of p_eps =
  N(alpha m, alpha^2 C + sigma^2 I) within Z standard errors + 2% (time discretization); c = 4
  checks the noise variance v of exponential_step_coeffs (its drift k is checked at c = 0)."""
  score = gaussian_score_fn(MEAN2, COV2, sde)
  mean_eps, cov_eps = gaussian_marginal(MEAN2, COV2, sde, sde.eps)
  run = jax.jit(lambda key, c: samplers.build(samplers.exponential_integrator_sampler, sde,
                                               (4000, 2), c=c, n_steps=500)(score, key)[0])
  for i, c in enumerate((1.0, 4.0)):
    assert_moments(run(jax.random.PRNGKey(20 + i), c), mean_eps, cov_eps, 0.02,
                   f"exp {type(sde).__name__} c={c}")


@pytest.mark.parametrize("predictor", samplers.PC_PREDICTORS)
@pytest.mark.parametrize("sde", [sde_lib.VPSDE(eps=1e-3), sde_lib.VESDE(eps=1e-3)], ids=["vp", "ve"])
def test_pc_sampler_honours_c(sde, predictor):
  """The PC predictor steps the c-family (drift f - (1 + c)/2 g^2 s, diffusion sqrt(c) g):
  c = 0 without corrector converges pathwise to the closed-form ODE solution at first order (max
  error halves as the steps double, measured ratios ~2; we require 1.7-2.5), and c = 0, 2, 4 with
  the Langevin corrector give the exact moments of p_eps within Z standard errors + 3%."""
  dist = toy_data.gaussian(MEAN2, COV2)
  score = functools.partial(dist.marginal_score, sde)
  x_T = sde.prior_sample(jax.random.PRNGKey(5), (256, 2))
  ref = exact_ode_solution(sde, x_T)
  ode_like = jax.jit(lambda n: samplers.pc_sampler(score, sde, x_T, jax.random.PRNGKey(0),
                                                   samplers.uniform_time_grid(sde, n), c=0.0,
                                                   predictor=predictor, n_corrector_steps=0)[0],
                     static_argnums=0)
  errs = [float(np.max(np.abs(np.asarray(ode_like(n), np.float64) - ref))) for n in (200, 400, 800)]
  ratios = [errs[0] / errs[1], errs[1] / errs[2]]
  assert all(1.7 < r < 2.5 for r in ratios), (errs, ratios)
  assert errs[2] < 0.08 * float(sde.prior_std()), errs  # measured 0.053 (VP, reverse_diffusion)
  mean_eps, cov_eps = gaussian_marginal(MEAN2, COV2, sde, sde.eps)
  score = gaussian_score_fn(MEAN2, COV2, sde)  # the fast local oracle for the larger batch
  run = jax.jit(lambda key, c: samplers.build(samplers.pc_sampler, sde, (3000, 2), c=c,
                                               n_steps=400, predictor=predictor)(score, key)[0])
  for i, c in enumerate((0.0, 2.0, 4.0)):
    assert_moments(run(jax.random.PRNGKey(30 + i), c), mean_eps, cov_eps, 0.03,
                   f"pc {predictor} c={c}")


# ---------------------------------------------------------------------------------------------------
# NFE bookkeeping against a counting wrapper
# ---------------------------------------------------------------------------------------------------

def test_nfe_counts_match_counting_wrapper():
  dist = toy_data.ode_sde_gmm_1d()  # stiff near eps: the adaptive solver rejects steps
  sde = sde_lib.VPSDE(eps=1e-3)
  shape = (16, 1)
  key = jax.random.PRNGKey(0)
  cases = [
      ("ode tsit5", samplers.ode_sampler, dict(solver="tsit5", rtol=1e-6, atol=1e-6, dt0=0.3)),
      ("ode dopri5 +denoise", samplers.ode_sampler, dict(solver="dopri5", rtol=1e-4, atol=1e-4,
                                                         denoise=True)),
      ("em", samplers.sde_sampler, dict(c=1.0, n_steps=37)),
      ("sra1", samplers.sde_sampler, dict(c=2.0, n_steps=20, solver="sra1", denoise=True)),
      ("heun adaptive", samplers.sde_sampler, dict(c=1.0, n_steps=10, solver="heun",
                                                   adaptive=True, rtol=1e-2, atol=1e-2)),
      ("pc", samplers.pc_sampler, dict(n_steps=15, n_corrector_steps=2, denoise=True)),
      ("pc no corrector", samplers.pc_sampler, dict(n_steps=15, n_corrector_steps=0,
                                                    predictor="euler_maruyama")),
      ("exponential", samplers.exponential_integrator_sampler, dict(c=1.0, n_steps=25)),
  ]
  rejected = 0
  for name, fn, kw in cases:
    counter = CallCounter(iso_gmm_score_fn(dist, sde))
    x, stats = jax.jit(lambda key: samplers.build(fn, sde, shape, **kw)(counter, key))(key)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert int(stats["nfe"]) == counter.n, (name, int(stats["nfe"]), counter.n)
    if "num_rejected_steps" in stats:
      rejected += int(stats["num_rejected_steps"])
  assert rejected > 0  # the formula was exercised with rejected steps (incl. the first step)
  # Closed-form counts for the fixed-step samplers.
  assert int(samplers.build(samplers.pc_sampler, sde, shape, n_steps=15, n_corrector_steps=2,
                            denoise=True)(iso_gmm_score_fn(dist, sde), key)[1]["nfe"]) == 15 * 3 + 1


# ---------------------------------------------------------------------------------------------------
# ODE-vs-SDE paper, Appendix G: 1-D Gaussian with pulse-shaped score errors
# ---------------------------------------------------------------------------------------------------

SIGMA0, T_G, EPS_G = 0.5, 2.0, 1e-4
EARLY = (0.1, 2.0)  # forward time t > 0.05 T: generative time < 0.95 T (their case 4)
LATE = (0.0, 0.02)  # forward time t < 0.01 T: generative time > 0.99 T (their case 5)


def appendix_g_var(t):
  """sigma_t^2 = sigma_0^2 e^{-t} + 1 - e^{-t} for f = -x/2, g = 1 (Cao et al., eq. 42)."""
  return SIGMA0**2 * np.exp(-t) + 1.0 - np.exp(-t)


def appendix_g_generated_var(c, eps_err, window):
  """Var(Y) at the end of dY = a_tau Y dtau + h dW (generative time tau = T - t), h^2 = c:
  Var = G^{-2} Var(Y_0) + int G^{-2} G_tau^2 h^2 dtau, G_tau = exp(-int_0^tau a) (Appendix G.1),
  with a_tau = 1/2 + (1 + h^2)/2 (-1/sigma_{T-tau}^2 + eps alpha_tau) and E = alpha x = 1_window *
  score, i.e. alpha_tau = -1_window / sigma_{T-tau}^2. Integrated to tau = T - eps by quadrature."""
  lo, hi = window

  def a(tau):
    t = T_G - tau
    ind = 1.0 if lo <= t <= hi else 0.0
    return 0.5 - 0.5 * (1.0 + c) * (1.0 + eps_err * ind) / appendix_g_var(t)

  tau_end = T_G - EPS_G
  brk = [p for p in (T_G - hi, T_G - lo) if 0.0 < p < tau_end]

  def int_a(tau):
    return integrate.quad(a, 0.0, tau, points=[p for p in brk if p < tau] or None, limit=200,
                          epsabs=1e-13, epsrel=1e-12)[0]

  log_g_end = -int_a(tau_end)
  var = np.exp(-2.0 * log_g_end) * appendix_g_var(T_G)
  if c > 0:
    var += integrate.quad(lambda tau: c * np.exp(2.0 * (int_a(tau_end) - int_a(tau))), 0.0, tau_end,
                          points=brk or None, limit=200)[0]
  return var


def gaussian_kl(var_p, mean_q, var_q):
  """KL(N(0, var_p) || N(mean_q, var_q)) (Appendix G.1 with the fitted mean included)."""
  return 0.5 * np.log(var_q / var_p) + (var_p + mean_q**2) / (2.0 * var_q) - 0.5


def _pulse_sampler(n, n_steps, method):
  sde = sde_lib.VPSDE(beta_min=1.0, beta_max=1.0, T=T_G, eps=EPS_G)  # f = -x/2, g = 1

  def score(x, t):
    return -x / (SIGMA0**2 * jnp.exp(-t) + 1.0 - jnp.exp(-t))

  prior = sde_lib.GaussianPrior(jnp.sqrt(appendix_g_var(T_G)))  # law(Y_0) = p_T exactly

  @optimized_jit  # n paths x n_steps: long-running, so worth LLVM's optimization
  def run(key, c, lo, hi, eps_err):
    def pulse(x, t):
      return score(x, t) * ((t >= lo) & (t <= hi))

    kw = dict(c=c, n_steps=n_steps, prior=prior, score_perturbation=pulse, epsilon=eps_err)
    fn = (samplers.exponential_integrator_sampler if method == "exponential"
          else samplers.sde_sampler)
    return samplers.build(fn, sde, (n, 1), **kw)(score, key)[0]

  return run


def _check_pulse_experiment(n, n_steps, cs, eps_err, method, disc_allow):
  run = _pulse_sampler(n, n_steps, method)
  target = appendix_g_var(EPS_G)
  kls = {}
  for window_name, window in (("early", EARLY), ("late", LATE)):
    for i, c in enumerate(cs):
      v = appendix_g_generated_var(c, eps_err, window)
      kl = gaussian_kl(target, 0.0, v)
      x = np.asarray(run(jax.random.PRNGKey(10 + i), c, window[0], window[1], eps_err), np.float64)
      m_hat, v_hat = x.mean(), x.var()
      tol_v = (Z * math.sqrt(2.0 / n) + disc_allow) * v
      assert abs(v_hat - v) < tol_v, (window_name, c, v_hat, v)
      kl_hat = gaussian_kl(target, m_hat, v_hat)
      dkl_dv = abs(0.5 / v - 0.5 * target / v**2)
      assert abs(kl_hat - kl) < dkl_dv * tol_v + 0.5 * tol_v**2 / v**2 + Z / n, (window_name, c,
                                                                                kl_hat, kl)
      kls[window_name, c] = (kl, kl_hat)
  # Cao et al., Props. 3.4-3.5: early errors shrink as c grows, late errors grow (closed form ...
  for a, b in zip(cs[:-1], cs[1:]):
    assert kls["early", a][0] > kls["early", b][0]
    assert kls["late", a][0] < kls["late", b][0]
  # ... and visible in the samples between the extreme c's.
  assert kls["early", cs[0]][1] > kls["early", cs[-1]][1]
  assert kls["late", cs[0]][1] < kls["late", cs[-1]][1]
  return kls


def test_appendix_g_pulse_errors_kl():
  # 2000 EM steps: discretization bias of the variance < 1% here (exact discrete recursion).
  _check_pulse_experiment(n=40_000, n_steps=2000, cs=(0.0, 1.0, 4.0), eps_err=0.3,
                          method="em", disc_allow=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["em", "exponential"])
def test_appendix_g_pulse_errors_kl_large(method):
  # 4000 steps: variance bias of the discrete schemes <= 0.9% up to c = 8 (exact recursion).
  kls = _check_pulse_experiment(n=100_000, n_steps=4000, cs=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
                                eps_err=0.3, method=method, disc_allow=0.012)
  print({k: tuple(float(f"{u:.3g}") for u in v) for k, v in kls.items()})


# ---------------------------------------------------------------------------------------------------
# T != 1, eps, no recompilation, config entry point
# ---------------------------------------------------------------------------------------------------

def test_T_and_eps_respected_without_recompiling():
  n = 3000
  traces = {"ode": 0, "em": 0}
  base = sde_lib.VPSDE(T=0.6, eps=0.05)

  def make(name, fn, **kw):
    @jax.jit
    def run(sde, key):
      traces[name] += 1  # runs once per trace
      mean_T, cov_T = gaussian_marginal(MEAN2, COV2, sde, sde.T)
      prior = FullGaussianPrior(mean_T, cov_T)  # exact p_T: small T needs the true marginal
      return samplers.build(fn, sde, (n, 2), prior=prior, **kw)(gaussian_score_fn(MEAN2, COV2, sde),
                                                                 key)
    return run

  ode = make("ode", samplers.ode_sampler)
  em = make("em", samplers.sde_sampler, c=1.0, n_steps=300)
  for T, eps in ((0.6, 0.05), (0.3, 0.1)):
    sde = base.replace(T=jnp.asarray(T), eps=jnp.asarray(eps))
    mean_eps, cov_eps = gaussian_marginal(MEAN2, COV2, sde, eps)
    for name, run in (("ode", ode), ("em", em)):
      x, _ = run(sde, jax.random.PRNGKey(int(T * 10)))
      # The samples follow p_eps (not p_0): eps = 0.1 shrinks the covariance visibly.
      assert_moments(x, mean_eps, cov_eps, 0.02, f"{name} T={T} eps={eps}")
  assert traces == {"ode": 1, "em": 1}
  # Pathwise, no sampling error: for Gaussian data the probability-flow ODE keeps the standardized
  # eigen-coordinates (u_i^T x - alpha_t u_i^T m) / sqrt(alpha_t^2 lam_i + sigma_t^2) fixed, so
  # x_eps = alpha_eps m + U diag(sqrt(v_eps / v_T)) U^T (x_T - alpha_T m) exactly.
  lam, u = np.linalg.eigh(np.asarray(COV2, np.float64))
  for T, eps in ((0.6, 0.05), (2.0, 1e-3)):
    sde = base.replace(T=jnp.asarray(T), eps=jnp.asarray(eps))
    x_T = 2.0 * jax.random.normal(jax.random.PRNGKey(11), (64, 2))
    x, _ = samplers.ode_sampler(gaussian_score_fn(MEAN2, COV2, sde), sde, x_T, None,
                                samplers.uniform_time_grid(sde, 1))
    (a_T, s_T), (a_e, s_e) = [np.asarray(sde.marginal_coeffs(jnp.asarray(v)), np.float64)
                              for v in (T, eps)]
    scale = np.sqrt((a_e**2 * lam + s_e**2) / (a_T**2 * lam + s_T**2))
    m = np.asarray(MEAN2, np.float64)
    exact = a_e * m + ((np.asarray(x_T, np.float64) - a_T * m) @ u * scale) @ u.T
    np.testing.assert_allclose(x, exact, atol=2e-3, rtol=1e-3)
  # Tweedie denoising: E[x0 | x_eps] ~ N(m, C alpha^2 (alpha^2 C + sigma^2 I)^{-1} C).
  sde = sde_lib.VPSDE(T=jnp.asarray(0.3), eps=jnp.asarray(0.1))
  mean_T, cov_T = gaussian_marginal(MEAN2, COV2, sde, sde.T)
  x, stats = samplers.build(samplers.ode_sampler, sde, (n, 2),
                            prior=FullGaussianPrior(mean_T, cov_T), denoise=True)(
      gaussian_score_fn(MEAN2, COV2, sde), jax.random.PRNGKey(9))
  alpha, _ = sde.marginal_coeffs(sde.eps)
  _, cov_eps = gaussian_marginal(MEAN2, COV2, sde, sde.eps)
  cov_post_mean = alpha**2 * COV2 @ jnp.linalg.solve(cov_eps, COV2)
  assert_moments(x, MEAN2, cov_post_mean, 0.01, "denoised")


def _cfg(**overrides):
  """The typed sampling section of the default config with ``overrides``, validated at the
  boundary (config_schema) as run_lib does: a bad field fails there, naming it."""
  config = get_default_config()
  for k, v in overrides.items():
    config.sampling[k] = v
  return config_schema.validate(config, sections=("sampling",)).sampling


def test_get_sampler_methods_and_validation():
  sde = sde_lib.VPSDE(eps=1e-3)
  score = gaussian_score_fn(MEAN2, COV2, sde)
  key = jax.random.PRNGKey(0)
  expected = {
      "ode": None,
      "sde": 50 + 1,
      "pc": 50 * 3 + 1,
      "exponential": 50 + 1,
  }
  for method, nfe in expected.items():
    sample_fn = samplers.get_sampler(_cfg(method=method, n_steps=50, n_corrector_steps=2,
                                          denoise=True, c=0.0 if method == "ode" else 2.0),
                                     sde, (8, 2))
    x, stats = jax.jit(sample_fn, static_argnums=0)(score, key)
    assert x.shape == (8, 2) and bool(jnp.all(jnp.isfinite(x)))
    if nfe is not None:
      assert int(stats["nfe"]) == nfe, method
    else:
      assert int(stats["nfe"]) == 1 + 6 * int(stats["num_steps"]) + 1
  with pytest.raises(ValueError, match="sampling.method"):
    samplers.get_sampler(_cfg(method="dpm_solver"), sde, (8, 2))  # not registered
  with pytest.raises(ValueError, match="sampling.c"):
    samplers.get_sampler(_cfg(method="sde", c=-1.0), sde, (8, 2))
  with pytest.raises(ValueError, match="sampling.solver"):
    samplers.get_sampler(_cfg(method="ode", solver="rk4"), sde, (8, 2))
  with pytest.raises(ValueError, match="sampling.solver"):
    samplers.get_sampler(_cfg(method="sde", solver="milstein"), sde, (8, 2))
  # The probability-flow ODE samplers are c = 0 by definition: any other c is refused by name.
  for method in ("ode", "heun", "ddim"):
    with pytest.raises(ValueError, match=rf"^sampling\.c must be 0 for method '{method}'"):
      samplers.get_sampler(_cfg(method=method, c=1.0), sde, (8, 2))
  # Score perturbation fields: a case needs an epsilon, an epsilon a case, an edge a pulse case.
  for overrides, field in ((dict(perturbation="case1"), "perturbation_epsilon"),
                           (dict(perturbation_epsilon=0.02), "perturbation_epsilon"),
                           (dict(perturbation_edge=0.5), "perturbation_edge"),
                           (dict(perturbation="case3", perturbation_epsilon=0.02,
                                 perturbation_edge=0.5), "perturbation_edge"),
                           (dict(perturbation="case9", perturbation_epsilon=0.02), "perturbation")):
    with pytest.raises(ValueError, match=rf"^sampling\.{field}\b"):
      samplers.get_sampler(_cfg(**overrides), sde, (8, 2))
  with pytest.raises(ValueError, match="score_perturbation"):
    samplers.get_sampler(_cfg(perturbation="case1", perturbation_epsilon=0.02), sde, (8, 2),
                         score_perturbation=score)
  with pytest.raises(ValueError, match="sampling.c"):
    samplers.build(samplers.sde_sampler, sde, (8, 2), c=-0.5)(score, key)
