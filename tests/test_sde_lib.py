"""Tests of sde_lib (VP, sub-VP, VE; default hyper-parameters and T != 1).

Oracles:
* an Euler-Maruyama simulation of the forward SDE (20k paths, lax.scan), with tolerance = 5 Monte-
  Carlo standard errors + the EM discretisation bias (computed exactly from the EM moment recursion);
* the moment ODEs of a linear SDE dx = f(t) x dt + g(t) dw (as used in Song et al. 2021, Appendix B):
  d alpha/dt = f alpha, d sigma^2/dt = 2 f sigma^2 + g^2, alpha(0) = 1, sigma(0) = 0, via jax.grad;
* quadrature of the importance-sampling density g^2 / sigma^2 (ScoreFlow, Song et al. 2021b, Sec. 5.1)
  and a KS test of ``is_sample_t``;
* the Fokker-Planck consistency of the generative family (Cao et al., eq. 2) for Gaussian data;
* scipy for the prior density.
"""
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax
from scipy import stats

import sde_lib
from xla_options import optimized_jit

N_SIGMA = 5.0
_ISOLATED = "SCORELAB_ISOLATED_EM_TEST"


def _all_sdes():
  """(id, sde): defaults and T != 1 for every SDE family."""
  return [
      ("vp", sde_lib.VPSDE()), ("vp_T0.6", sde_lib.VPSDE(T=0.6)), ("vp_T2", sde_lib.VPSDE(T=2.0)),
      ("subvp", sde_lib.subVPSDE()), ("subvp_T0.6", sde_lib.subVPSDE(T=0.6)),
      ("subvp_T2", sde_lib.subVPSDE(T=2.0)),
      ("ve", sde_lib.VESDE()), ("ve_T0.6", sde_lib.VESDE(T=0.6)), ("ve_T2", sde_lib.VESDE(T=2.0)),
  ]


ALL = _all_sdes()
IDS = [i for i, _ in ALL]
SDES = [s for _, s in ALL]


def _f64(sde):
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), sde)


def _drift_coeff(sde, t):
  """f(t) of the linear drift f(t) x."""
  return sde.drift(jnp.ones((1, 1)), jnp.asarray(t))[0, 0]


# -- Euler-Maruyama oracle ---------------------------------------------------------------------------
@functools.partial(optimized_jit, static_argnums=(3, 4))  # 20k paths x 4k steps: long-running
def _em_snapshots(sde, x0, bounds, n_paths, steps, key):
  """EM paths of the forward SDE from x0 at t = 0; returns x at bounds[1:] (S, n_paths) and the
  exact mean / variance of the EM chain itself (its moment recursion), to bound the EM bias."""

  def segment(carry, ab):
    x, m, v, key = carry
    a, b = ab
    dt = (b - a) / steps

    def step(c, i):
      x, m, v, key = c
      key, sub = jax.random.split(key)
      t = a + i * dt
      f, g = _drift_coeff(sde, t), sde.diffusion(t)
      x = x + sde.drift(x[:, None], t)[:, 0] * dt + g * jnp.sqrt(dt) * jax.random.normal(sub, x.shape)
      m = (1 + f * dt) * m
      v = (1 + f * dt) ** 2 * v + g**2 * dt
      return (x, m, v, key), None

    carry, _ = lax.scan(step, (x, m, v, key), jnp.arange(steps))
    return carry, carry[:3]

  x = jnp.full((n_paths,), x0)
  init = (x, jnp.asarray(x0), jnp.asarray(0.0), key)
  _, (xs, ms, vs) = lax.scan(segment, init, (bounds[:-1], bounds[1:]))
  return xs, ms, jnp.sqrt(vs)


EM_CASES = ["vp", "vp_T2", "subvp", "subvp_T0.6", "ve", "ve_T2"]


def test_marginal_matches_euler_maruyama():
  """The six cases of ``test_marginal_matches_euler_maruyama_isolated`` in one fresh interpreter:
  in one full-suite CI run (pytest -n 2) the check failed for VE at t = 1e-3 with an EM-chain
  moment that cannot arise from these inputs, and it never failed alone or after any single other
  test module; isolating it keeps the oracle exact while that cross-test interaction is
  investigated (one interpreter for all six: one start-up instead of six)."""
  node = f"{os.path.abspath(__file__)}::test_marginal_matches_euler_maruyama_isolated"
  run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                        "no:cacheprovider", node], env=dict(os.environ, **{_ISOLATED: "1"}),
                       capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
  assert f"{len(EM_CASES)} passed" in run.stdout, run.stdout[-2000:]


@pytest.mark.skipif(os.environ.get(_ISOLATED) != "1",
                    reason="runs in its own interpreter, from test_marginal_matches_euler_maruyama")
@pytest.mark.parametrize("sde", [SDES[IDS.index(i)] for i in EM_CASES], ids=EM_CASES)
def test_marginal_matches_euler_maruyama_isolated(sde):
  """Closed-form mean alpha_t x0 and std sigma_t vs 20k EM paths (float64, 1000 steps per segment)
  at t = 1e-3, 0.1, T/2, T. Tolerance: 5 SE (SE_mean = s/sqrt(n), SE_std = s/sqrt(2n)) + the EM
  discretisation bias |EM-chain moment - closed form|, which must itself stay below 0.6% of the
  std and 0.5 SE of the mean so the check stays sharp. (float64: at t = 1e-3 the sub-VP transition
  std is 1e-4 and float32 rounding of x + f x dt would exceed the Monte-Carlo error.)"""
  n, steps, x0 = 20000, 1000, 1.5
  t_max = float(sde.T)
  bounds = np.array([0.0, 1e-3, 0.1, 0.5 * t_max, t_max])
  with jax.enable_x64(True):
    xs, em_mean, em_std = _em_snapshots(_f64(sde), x0, jnp.asarray(bounds), n, steps,
                                        jax.random.PRNGKey(0))
    coeffs = [_f64(sde).marginal(jnp.full((1,), x0), jnp.asarray(t)) for t in bounds[1:]]
  for i, t in enumerate(bounds[1:]):
    mean, std = coeffs[i]
    mean, std = float(mean[0]), float(std)
    x = np.asarray(xs[i], np.float64)
    bias_m, bias_s = abs(float(em_mean[i]) - mean), abs(float(em_std[i]) - std)
    assert bias_s < 6e-3 * std and bias_m < 0.5 * std / math.sqrt(n), (t, bias_m, bias_s, std)
    tol_m = N_SIGMA * std / math.sqrt(n) + bias_m
    tol_s = N_SIGMA * std / math.sqrt(2 * n) + bias_s
    assert abs(x.mean() - mean) < tol_m, (t, x.mean(), mean, tol_m)
    assert abs(x.std() - std) < tol_s, (t, x.std(), std, tol_s)


# -- moment ODEs (second oracle) --------------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_diffusion_squared_is_variance_derivative(sde):
  """g(t)^2 = d sigma_t^2/dt - 2 f(t) sigma_t^2 and d alpha_t/dt = f(t) alpha_t (jax.grad, float64,
  rel 1e-9), with alpha_0 = 1, sigma_0 = 0: the marginal is the solution of the moment ODEs.
  (VP: d sigma^2/dt = beta (1 - sigma^2) = g^2 - beta sigma^2; VE: d sigma^2/dt = g^2.)"""
  with jax.enable_x64(True):
    sde = _f64(sde)
    ts = jnp.geomspace(1e-4, float(sde.T), 37)
    var = lambda t: sde.marginal_coeffs(t)[1] ** 2
    alpha = lambda t: sde.marginal_coeffs(t)[0]
    dvar = jax.vmap(jax.grad(var))(ts)
    dalpha = jax.vmap(jax.grad(alpha))(ts)
    f = jax.vmap(lambda t: _drift_coeff(sde, t))(ts)
    a, s = sde.marginal_coeffs(ts)
    g2 = sde.diffusion(ts) ** 2
    np.testing.assert_allclose(dvar - 2 * f * s**2, g2, rtol=1e-9)
    np.testing.assert_allclose(dalpha, f * a, rtol=1e-9, atol=1e-300)
    a0, s0 = sde.marginal_coeffs(jnp.asarray(0.0))
    assert float(a0) == 1.0 and float(s0) == 0.0


def test_closed_forms_of_song_et_al():
  """Spot values: VP beta(t) = 0.1 + 19.9 t, alpha = exp(-B/2), B(1) = 10.05; VE sigma(1) = 50."""
  with jax.enable_x64(True):
    vp = _f64(sde_lib.VPSDE())
    np.testing.assert_allclose(vp.diffusion(0.5) ** 2, 0.1 + 19.9 * 0.5, rtol=1e-14)
    a, s = vp.marginal_coeffs(1.0)
    np.testing.assert_allclose(a, math.exp(-0.5 * 10.05), rtol=1e-13)
    np.testing.assert_allclose(s, math.sqrt(1 - math.exp(-10.05)), rtol=1e-13)
    sub = _f64(sde_lib.subVPSDE())
    np.testing.assert_allclose(sub.marginal_coeffs(1.0)[1], 1 - math.exp(-10.05), rtol=1e-13)
    ve = _f64(sde_lib.VESDE())
    np.testing.assert_allclose(ve.sigma(1.0), 50.0, rtol=1e-13)
    np.testing.assert_allclose(ve.prior_std(), math.sqrt(50.0**2 - 0.01**2), rtol=1e-13)  # Table 1
    np.testing.assert_allclose(ve.marginal_coeffs(0.3)[1], 0.01 * math.sqrt(5000 ** 0.6 - 1), rtol=1e-12)


# -- diffusion time T is a free variable ------------------------------------------------------------
@pytest.mark.parametrize("cls", [sde_lib.VPSDE, sde_lib.subVPSDE, sde_lib.VESDE])
def test_changing_T_keeps_coefficients(cls):
  """Franzese et al., App. H.3: beta(t) / sigma(t) / marginals do not depend on T (bitwise)."""
  ts = jnp.linspace(1e-5, 0.6, 25)
  x = jnp.linspace(-2.0, 2.0, 25)[:, None]
  ref = cls()
  for T in [0.6, 2.0, 0.3]:
    other = cls(T=T)
    for fn in [lambda s: s.diffusion(ts), lambda s: s.marginal_coeffs(ts), lambda s: s.drift(x, ts),
               lambda s: s.noise_conditioning(ts), lambda s: s.is_weight(ts),
               lambda s: s.is_antiderivative(ts)]:
      for u, v in zip(jax.tree.leaves(fn(ref)), jax.tree.leaves(fn(other))):
        np.testing.assert_array_equal(u, v)


# -- float32 at small t ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [sde_lib.VPSDE, sde_lib.subVPSDE, sde_lib.VESDE])
def test_float32_small_t(cls):
  """float32 alpha_t, sigma_t, g(t) and the IS weight at t = 1e-6, 1e-5, 1e-3 equal float64 within
  1e-3 relative (no cancellation: expm1 / log-expm1 forms)."""
  ts = [1e-6, 1e-5, 1e-3]
  out32 = [(cls().marginal_coeffs(jnp.float32(t)), cls().diffusion(jnp.float32(t)),
            cls().is_weight(jnp.float32(t))) for t in ts]
  with jax.enable_x64(True):
    sde = _f64(cls())
    for t, o32 in zip(ts, out32):
      o64 = (sde.marginal_coeffs(jnp.float64(t)), sde.diffusion(jnp.float64(t)),
             sde.is_weight(jnp.float64(t)))
      for u, v in zip(jax.tree.leaves(o32), jax.tree.leaves(o64)):
        assert u.dtype == jnp.float32
        np.testing.assert_allclose(np.float64(u), v, rtol=1e-3)


# -- importance sampling of t -------------------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_is_antiderivative_and_inverse(sde):
  """Phi'(t) = g^2/sigma^2 (jax.grad, float64 rel 1e-9) and Phi^{-1}(Phi(t)) = t (float64 rel 1e-9;
  float32 rel 1e-4) on t in [eps, T]."""
  ts32 = jnp.geomspace(float(sde.eps), float(sde.T), 41).astype(jnp.float32)
  inv32 = sde.is_inverse_antiderivative(sde.is_antiderivative(ts32))
  np.testing.assert_allclose(inv32, ts32, rtol=1e-4)
  with jax.enable_x64(True):
    s = _f64(sde)
    ts = jnp.geomspace(float(s.eps), float(s.T), 41)
    np.testing.assert_allclose(jax.vmap(jax.grad(s.is_antiderivative))(ts), s.is_weight(ts), rtol=1e-9)
    np.testing.assert_allclose(s.is_inverse_antiderivative(s.is_antiderivative(ts)), ts, rtol=1e-9)


def _is_cdf_by_quadrature(sde):
  """CDF of p(t) = w(t) / Z on [eps, T], w = g^2/sigma^2, by trapezoid quadrature of is_weight in
  log t (w ~ 1/t near 0); returns (grid, cdf, Z)."""
  with jax.enable_x64(True):
    s = _f64(sde)
    u = np.linspace(np.log(float(s.eps)), np.log(float(s.T)), 200001)
    t = np.exp(u)
    w = np.asarray(s.is_weight(jnp.asarray(t))) * t
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.diff(u))])
    return t, cum / cum[-1], cum[-1], float(s.is_normalizer())


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_is_sample_t_distribution(sde):
  """is_sample_t ~ g^2/(sigma^2 Z): KS p > 1e-3 (20k samples) against the quadrature CDF, Z agrees
  with quadrature (rel 1e-6), samples lie in [eps, T]; uniform t is rejected (p < 1e-6)."""
  grid, cdf, z_quad, z = _is_cdf_by_quadrature(sde)
  np.testing.assert_allclose(z, z_quad, rtol=1e-6)
  t = np.asarray(jax.jit(lambda s, k: s.is_sample_t(k, (20000,)))(sde, jax.random.PRNGKey(1)), np.float64)
  assert t.min() >= float(sde.eps) * (1 - 1e-6) and t.max() <= float(sde.T) * (1 + 1e-6)
  fn = lambda v: np.interp(v, grid, cdf)
  assert stats.kstest(t, fn).pvalue > 1e-3
  tu = np.asarray(sde.uniform_sample_t(jax.random.PRNGKey(2), (20000,)), np.float64)
  assert stats.kstest(tu, fn).pvalue < 1e-6


# -- generative family ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [SDES[IDS.index(i)] for i in ["vp", "subvp_T2", "ve_T0.6"]],
                         ids=["vp", "subvp_T2", "ve_T0.6"])
def test_reverse_family(sde):
  """reverse(s, c): drift f - (1+c)/2 g^2 s and diffusion sqrt(c) g (Cao et al., eq. 2), and for data
  N(0, s0^2) with the exact score -x/v_t, v_t = alpha^2 s0^2 + sigma^2, the reverse-time variance
  equation 2 a(t) v_t - h(t)^2 = dv_t/dt holds for every c (a = linear drift coefficient), i.e. the
  generative process has the forward marginals (float64, rel 1e-9 + 1e-12 of the O(g^2) terms)."""
  with jax.enable_x64(True):
    s = _f64(sde)
    s0 = 0.5
    var = lambda t: s.marginal_coeffs(t)[0] ** 2 * s0**2 + s.marginal_coeffs(t)[1] ** 2
    score = lambda x, t: -x / sde_lib.bcast(var(t), x)
    x = jnp.linspace(-3.0, 3.0, 7)[:, None]
    ts = jnp.linspace(float(s.eps), float(s.T), 7)
    for c in [0.0, 1.0, 2.5]:
      gen = s.reverse(score, c)
      g = s.diffusion(ts)
      np.testing.assert_allclose(gen.drift(x, ts), s.drift(x, ts) - 0.5 * (1 + c) * g[:, None] ** 2 * score(x, ts),
                                 rtol=1e-12)
      np.testing.assert_allclose(gen.diffusion(ts), math.sqrt(c) * g, rtol=1e-12)
      a = jax.vmap(lambda t: gen.drift(jnp.ones((1, 1)), t)[0, 0])(ts)
      lhs = 2 * a * var(ts) - gen.diffusion(ts) ** 2
      rhs = jax.vmap(jax.grad(var))(ts)
      # dv/dt -> 0 at large t is a difference of O(g^2) terms: absolute slack 1e-12 of their size.
      scale = jnp.abs(2 * a * var(ts)) + gen.diffusion(ts) ** 2 + s.diffusion(ts) ** 2
      assert np.all(np.abs(lhs - rhs) <= 1e-9 * np.abs(rhs) + 1e-12 * scale), (c, lhs, rhs)
    pf = s.probability_flow(score)
    np.testing.assert_allclose(pf.drift(x, ts), s.reverse(score, 0.0).drift(x, ts), rtol=0)
    np.testing.assert_allclose(pf.diffusion(ts), 0.0)


# -- prior ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior_logp_and_sample(sde):
  """prior_logp = sum of scipy norm.logpdf(z, 0, prior_std) over non-batch axes (rel 1e-5, float32);
  prior_sample has std prior_std within 5 SE (SE = std/sqrt(2n))."""
  std = float(sde.prior_std())
  z = np.asarray(sde.prior_sample(jax.random.PRNGKey(3), (4000, 3, 2)), np.float64)
  ref = stats.norm.logpdf(z, scale=std).reshape(4000, -1).sum(1)
  np.testing.assert_allclose(np.asarray(sde.prior_logp(jnp.asarray(z, jnp.float32))), ref, rtol=1e-5)
  assert abs(z.std() - std) < N_SIGMA * std / math.sqrt(2 * z.size)
  assert abs(z.mean()) < N_SIGMA * std / math.sqrt(z.size)
  np.testing.assert_allclose(sde.prior().log_prob(jnp.asarray(z[:5], jnp.float32)), ref[:5], rtol=1e-5)


# -- transformations ------------------------------------------------------------------------------------
def test_jit_vmap_grad_pass_through():
  """grad w.r.t. T of the VE prior log-density ((|z|^2/s^2 - D) log r sigma(T)^2/s^2 with
  s^2 = sigma(T)^2 - sigma(0)^2, Franzese et al. Table 1) and of the marginal
  log-density log N(z; 0, alpha_T^2 s0^2 + sigma_T^2) (vs central differences), vmap over t, and a
  jitted function of the SDE is traced once for different T (T is an array leaf)."""
  with jax.enable_x64(True):
    z = jnp.asarray([[1.0, -2.0, 30.0]])
    ve = _f64(sde_lib.VESDE())
    g = jax.grad(lambda T: ve.replace(T=T).prior_logp(z)[0])(1.0)
    s2 = ve.sigma(1.0) ** 2 - ve.sigma(0.0) ** 2
    ref = (jnp.sum(z**2) / s2 - 3) * ve.log_ratio() * ve.sigma(1.0) ** 2 / s2
    np.testing.assert_allclose(g, ref, rtol=1e-12)
    for sde in [_f64(sde_lib.VPSDE()), _f64(sde_lib.subVPSDE()), ve]:
      def logp_T(T, sde=sde):
        s = sde.replace(T=T)
        a, sig = s.marginal_coeffs(s.T)
        return sde_lib.gaussian_logp(z, jnp.sqrt(a**2 * 0.25 + sig**2))[0]
      h = 1e-6
      np.testing.assert_allclose(jax.grad(logp_T)(0.7), (logp_T(0.7 + h) - logp_T(0.7 - h)) / (2 * h),
                                 rtol=1e-6)
  traces = []

  @jax.jit
  def f(sde, x, key):
    traces.append(1)
    t = sde.uniform_sample_t(key, (x.shape[0],))
    return sde.perturb(x, t, jnp.ones_like(x)), t

  x = jnp.ones((8, 2))
  for T in [1.0, 0.6, 2.0]:
    xt, t = f(sde_lib.VPSDE(T=T), x, jax.random.PRNGKey(0))
    assert float(t.max()) <= T
  assert len(traces) == 1
  sde = sde_lib.VPSDE()
  ts = jnp.linspace(0.1, 0.9, 5)
  a_v, s_v = jax.vmap(sde.marginal_coeffs)(ts)
  a_b, s_b = sde.marginal_coeffs(ts)
  np.testing.assert_allclose(a_v, a_b, rtol=1e-6)
  np.testing.assert_allclose(s_v, s_b, rtol=1e-6)


# -- get_sde validation -----------------------------------------------------------------------------------
def _config(**kw):
  cfg = ml_collections.ConfigDict()
  cfg.sde = ml_collections.ConfigDict(dict(name="vpsde", beta_min=0.1, beta_max=20.0, sigma_min=0.01,
                                           sigma_max=50.0, T=1.0, eps=1e-5))
  cfg.sde.update(kw)
  return cfg.sde  # get_sde reads the attributes of an sde section


def test_get_sde_builds_and_validates():
  sde = sde_lib.get_sde(_config(T=0.6))
  assert isinstance(sde, sde_lib.VPSDE) and float(sde.T) == pytest.approx(0.6)
  assert isinstance(sde_lib.get_sde(_config(name="subVPSDE")), sde_lib.subVPSDE)
  ve = sde_lib.get_sde(_config(name="vesde", sigma_max=20.0))
  assert isinstance(ve, sde_lib.VESDE) and float(ve.sigma_max) == 20.0
  for kw, field in [(dict(eps=1.0), "sde.T"), (dict(eps=2.0, T=1.0), "sde.T"), (dict(eps=0.0), "sde.eps"),
                    (dict(beta_min=-0.1), "sde.beta_min"), (dict(beta_max=0.05), "sde.beta_max"),
                    (dict(name="vesde", sigma_min=-1.0), "sde.sigma_min"),
                    (dict(name="vesde", sigma_max=0.001), "sde.sigma_max"),
                    (dict(name="cld"), "sde.name")]:  # not an SDE of sde_lib
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      sde_lib.get_sde(_config(**kw))
