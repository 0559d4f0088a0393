"""auxiliary.py: p_noise of Table 1, the DPGMM prior against scikit-learn, saving / restoring, and
the paper's toy (Franzese et al., App. H.1: 0.3 N(1, 0.1^2) + 0.7 N(3, 0.5^2), VE SDE, T = 0.2)
with the exact score: a fitted prior closes the likelihood gap of p_noise and starts samplers."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import auxiliary as aux
import config_schema
import flows
import likelihood
import samplers
import sde_lib
import toy_data
from configs.toy_gmm_1d_diffusion_time import get_config

N_SIGMA = 5.0  # tolerances of Monte Carlo comparisons, in standard errors
T_TOY = 0.2


# -- p_noise (sde_lib) ----------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0.1, 0.3, 1.0])
def test_gaussian_prior_variance_is_table_1(T):
  """VE: p_noise = N(0, (sigma(T)^2 - sigma(0)^2) I), the forward marginal's variance for zero data
  (marginal_coeffs), rel 1e-12 in float64, and prior().log_prob is that Gaussian's density.
  VP / sub-VP: p_noise = N(0, I) (Table 1), the T -> infinity limit of the marginal variance
  (1 - e^{-B(T)}, resp. its square), not its value at finite T."""
  with jax.enable_x64(True):
    ve = sde_lib.VESDE(T=jnp.float64(T))
    _, s = ve.marginal_coeffs(ve.T)
    np.testing.assert_allclose(ve.prior_std() ** 2, s**2, rtol=1e-12)
    np.testing.assert_allclose(ve.prior_std() ** 2, ve.sigma(T) ** 2 - ve.sigma(0.0) ** 2,
                               rtol=1e-12)
    z = jnp.asarray([[0.3, -1.0], [2.0, 0.5]])
    ref = -0.5 * jnp.sum(z**2, 1) / s**2 - jnp.log(2 * jnp.pi * s**2)
    np.testing.assert_allclose(ve.prior().log_prob(z), ref, rtol=1e-12)
    for cls in (sde_lib.VPSDE, sde_lib.subVPSDE):
      sde = cls(T=jnp.float64(T))
      assert float(sde.prior_std()) == 1.0
      np.testing.assert_allclose(sde.replace(T=jnp.float64(3.0)).marginal_coeffs(3.0)[1], 1.0,
                                 atol=1e-12)


# -- DPGMM -----------------------------------------------------------------------------------------
def _clusters(key, n, d, sep=3.0):
  """Three separated Gaussian clusters in d dimensions (anisotropic scales)."""
  k1, k2 = jax.random.split(key)
  centres = sep * jnp.eye(3, d)
  comp = jax.random.randint(k1, (n,), 0, 3)
  scales = 0.2 + 0.3 * jnp.arange(d) / max(d - 1, 1)
  return centres[comp] + scales * jax.random.normal(k2, (n, d))


def _sklearn_plugin_log_prob(bgm, x):
  """scikit-learn's score_samples of the plug-in mixture (weights_, means_, covariances_) of a
  fitted BayesianGaussianMixture: a GaussianMixture carrying those parameters."""
  from sklearn.mixture import GaussianMixture
  gm = GaussianMixture(bgm.n_components, covariance_type=bgm.covariance_type)
  gm.weights_, gm.means_, gm.covariances_ = bgm.weights_, bgm.means_, bgm.covariances_
  gm.precisions_cholesky_ = bgm.precisions_cholesky_
  return gm.score_samples(x)


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_dpgmm_log_prob_matches_sklearn_and_moments(cov):
  """DPGMM ('full' on 2-D vectors, 'diag' on 4x4x1 images) from a fitted BayesianGaussianMixture:
  log_prob equals scikit-learn's score_samples of the plug-in mixture within 1e-6 (float64); the
  three clusters give 3
  effective components (threshold 1e-2); 20k samples have the mixture's mean and variance per
  coordinate within 5 standard errors (SE of the variance from the samples' 4th moment)."""
  shape = (2,) if cov == "full" else (4, 4, 1)
  d = math.prod(shape)
  x = np.asarray(_clusters(jax.random.PRNGKey(1), 900, d), np.float64).reshape(-1, *shape)
  from sklearn.mixture import BayesianGaussianMixture
  bgm = BayesianGaussianMixture(n_components=8, covariance_type=cov, max_iter=100,
                                weight_concentration_prior_type="dirichlet_process",
                                random_state=0)
  flat = x.reshape(len(x), -1)
  bgm.fit(flat)
  test_x = np.concatenate([flat[:200], flat[:50] + 0.7])
  with jax.enable_x64(True):
    p64 = aux.mixture_from_sklearn(bgm, shape)
    ours = jax.jit(lambda p, y: p.log_prob(y))(p64, jnp.asarray(test_x.reshape(-1, *shape)))
    assert ours.dtype == jnp.float64
    np.testing.assert_allclose(ours, _sklearn_plugin_log_prob(bgm, test_x), rtol=0, atol=1e-6)
  prior = aux.mixture_from_sklearn(bgm, shape)  # float32, as priors are used
  assert int(prior.effective_components(1e-2)) == 3
  assert int(prior.effective_components(0.0)) == 8 and prior.n_components == 8
  n = 20000
  s = np.asarray(jax.jit(lambda p, k: p.sample(k, (n, *shape)))(prior, jax.random.PRNGKey(3)),
                 np.float64).reshape(n, d)
  mean, var = np.asarray(prior.mean()), np.asarray(prior.variance())
  centred = s - s.mean(0)
  assert np.all(np.abs(s.mean(0) - mean) < N_SIGMA * np.sqrt(var / n))
  se_var = np.std(centred**2, axis=0) / math.sqrt(n)
  assert np.all(np.abs(s.var(0) - var) < N_SIGMA * se_var)


def test_dpgmm_log_prob_is_normalised():
  """The plug-in DPGMM density integrates to 1 on a 1-D grid (trapezoid, 1e-6): it is a proper
  density (BayesianGaussianMixture.score_samples is a variational expectation, not normalised)."""
  x = np.concatenate([np.random.default_rng(0).normal(0, 0.3, 300),
                      np.random.default_rng(1).normal(2, 0.5, 300)])[:, None]
  prior, _ = aux.fit_dpgmm(x, jax.random.PRNGKey(0), n_components=5, max_iter=200)
  grid = np.linspace(-6.0, 8.0, 20001)[:, None]
  dens = np.exp(np.asarray(jax.jit(lambda p, y: p.log_prob(y))(prior, jnp.asarray(grid)),
                           np.float64))
  np.testing.assert_allclose(np.trapezoid(dens, grid[:, 0]), 1.0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("cov,max_iter", [("full", 23), ("diag", 400)])
def test_dpgmm_chunked_fit_equals_one_fit(cov, max_iter):
  """The warm-started chunks (progress after each) are exactly one scikit-learn fit of the same
  iterations: bitwise equal weights, means, covariances and lower bound, the same iteration count
  and convergence; the callback sees the cumulative count. 23 iterations stop unconverged mid-chunk
  (chunks 10, 10, 3); 400 converge inside a chunk. fit_dpgmm reports the same."""
  from sklearn.mixture import BayesianGaussianMixture
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 0.3, (150, 2)), rng.normal(2, 0.5, (150, 2))])
  key = jax.random.PRNGKey(3)
  kw = dict(n_components=6, covariance_type=cov, weight_concentration_prior_type="dirichlet_process",
            tol=1e-3, reg_covar=1e-6, random_state=int(aux._numpy_rng(key).integers(0, 2**31 - 1)))
  one = BayesianGaussianMixture(max_iter=max_iter, **kw).fit(x)
  chunked, seen = BayesianGaussianMixture(warm_start=True, **kw), []
  n_iter = aux._fit_in_chunks(chunked, x, max_iter, 10,
                              lambda n, m: seen.append((n, m["lower_bound"])))
  for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "lower_bound_"):
    np.testing.assert_array_equal(getattr(chunked, name), getattr(one, name), err_msg=name)
  assert n_iter == one.n_iter_ and chunked.converged_ == one.converged_ == (max_iter == 400)
  assert [n for n, _ in seen] == list(range(10, n_iter, 10)) + [n_iter]
  assert seen[-1][1] == one.lower_bound_
  _, info = aux.fit_dpgmm(x, key, n_components=6, covariance_type=cov, max_iter=max_iter, chunk=10)
  assert (info["n_iter"], info["converged"], info["lower_bound"]) == (
      one.n_iter_, one.converged_, one.lower_bound_)


def test_errors_name_the_field():
  """Bad options fail with a ValueError naming the config field (prior.*) or the shape."""
  x = np.random.default_rng(0).normal(size=(10, 2))
  with pytest.raises(ValueError, match="prior.n_components"):
    aux.fit_dpgmm(x, jax.random.PRNGKey(0), n_components=11)
  with pytest.raises(ValueError, match="prior.covariance_type"):
    aux.fit_dpgmm(x, jax.random.PRNGKey(0), n_components=2, covariance_type="tied")
  with pytest.raises(ValueError, match="prior.kind"):
    aux.fit_prior("gmm", x, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="prior.kind='gaussian'"):
    aux.fit_prior("gaussian", x, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="event shape"):
    aux.MixturePrior(jnp.ones(1), jnp.zeros((1, 2)), jnp.ones((1, 2)), (2,), "diag").sample(
        jax.random.PRNGKey(0), (3, 4))


# -- saving / restoring ----------------------------------------------------------------------------
def test_orbax_round_trip(tmp_path):
  """(JSON spec, pytree) of every kind survives orbax save / restore (restore target from
  abstract_pytree) and JSON: the restored prior's log_prob equals the original's."""
  import orbax.checkpoint as ocp
  x = np.asarray(_clusters(jax.random.PRNGKey(1), 300, 2), np.float32)
  mix = aux.MixturePrior(jnp.asarray([0.4, 0.6]), jnp.asarray([[0.0, 1.0], [2.0, -1.0]]),
                         jnp.asarray([[[1.0, 0.3], [0.3, 0.5]], [[0.2, 0.0], [0.0, 2.0]]]), (2,))
  model = flows.CouplingFlow(2, num_layers=2, hidden=(8,))
  variables = jax.jit(flows.init_variables, static_argnums=0)(model, jax.random.PRNGKey(0),
                                                             jnp.asarray(x))
  flow = aux.FlowPrior(variables, model)
  glow = flows.Glow((4, 4, 1), num_levels=1, num_steps=1, hidden=4)
  glow_prior = aux.FlowPrior(jax.jit(flows.init_variables, static_argnums=0)(
      glow, jax.random.PRNGKey(0), jnp.ones((2, 4, 4, 1))), glow)
  priors = {"gaussian": sde_lib.VESDE(T=0.3).prior(), "dpgmm": mix, "flow": flow,
            "glow": glow_prior}
  specs = json.loads(json.dumps({k: aux.prior_spec(p) for k, p in priors.items()}))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "priors", {k: aux.to_pytree(p) for k, p in priors.items()})
  ckpt.wait_until_finished()
  trees = ckpt.restore(tmp_path / "priors", {k: aux.abstract_pytree(s) for k, s in specs.items()})
  logp = jax.jit(lambda p, y: p.log_prob(y))
  for name, prior in priors.items():
    restored = aux.from_pytree(specs[name], trees[name])
    assert type(restored) is type(prior)
    y = jnp.ones((2, 4, 4, 1)) if name == "glow" else jnp.asarray(x[:5])
    np.testing.assert_array_equal(logp(restored, y), logp(prior, y))


# -- the paper's toy with the exact score ----------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
  """VE SDE of App. H.1 (configs/toy_gmm_1d_diffusion_time) at T = 0.2, 8192 data samples pushed to
  p(x, T) (forward_samples), a DPGMM fitted on them, and a fresh held-out set of p(x, T)."""
  config = get_config()
  config.sde.T = T_TOY
  sde = sde_lib.get_sde(config_schema.validate(config).sde)
  dist = toy_data.get_toy_distribution("gmm_1d_diffusion_time")
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  x_T = aux.forward_samples(sde, dist.sample(k[0], 8192), k[1])
  prior, info = aux.fit_prior("dpgmm", x_T, k[2], sde=sde, n_components=3, max_iter=100)
  held = aux.forward_samples(sde, dist.sample(k[3], 4000), k[4])
  return dict(config=config, sde=sde, dist=dist, prior=prior, info=info, held=held)


def test_fitted_prior_cross_entropy(toy):
  """On fresh samples of p(x, T): the DPGMM's cross-entropy is below p_noise's and within 0.01
  nats of the exact p(x, T)'s (its entropy); fit_prior's held-out number agrees (0.05 nats)."""
  sde, prior, held = toy["sde"], toy["prior"], toy["held"]
  ce_nu = aux.cross_entropy(prior, held)
  ce_gauss = aux.cross_entropy(sde.prior(), held)
  ce_exact = aux.cross_entropy(toy["dist"].marginal(sde, sde.T), held)
  print(f"cross-entropy nats/dim: dpgmm {ce_nu:.4f}, p_noise {ce_gauss:.4f}, exact {ce_exact:.4f};"
        f" effective components {toy['info']['effective_components']}")
  assert ce_nu < ce_gauss - 1.0
  assert ce_nu - ce_exact < 0.01
  assert abs(toy["info"]["cross_entropy"] - ce_nu) < 0.05
  assert toy["info"]["cross_entropy"] < toy["info"]["gaussian_cross_entropy"]
  weights = np.asarray(toy["info"]["weights"])
  assert toy["info"]["effective_components"] == int(np.sum(weights > toy["info"]["threshold"]))


def test_flow_prior_fit(toy):
  """fit_prior('flow') (1-D rational-quadratic spline flow, 200 Adam steps) beats the best single
  Gaussian (entropy of N(m, v) with p(x, T)'s moments) on held-out p(x, T) samples, so it models the
  two modes; the callback sees every logging step."""
  sde, held = toy["sde"], toy["held"]
  x_T = aux.forward_samples(sde, toy["dist"].sample(jax.random.PRNGKey(5), 4096),
                            jax.random.PRNGKey(6))
  seen = []
  spec = dict(name="coupling", event_dim=1, num_layers=1, hidden=(16,), transformer="spline")
  prior, info = aux.fit_prior("flow", x_T, jax.random.PRNGKey(7), sde=sde, flow=spec, steps=200,
                              lr=5e-3, log_every=100, callback=lambda s, m: seen.append(s))
  assert seen == [100, 200] and info["history"]["step"] == seen
  var = float(np.var(np.asarray(held)))
  best_gauss = 0.5 * math.log(2 * math.pi * math.e * var)
  ce = aux.cross_entropy(prior, held)
  print(f"flow prior cross-entropy {ce:.4f} nats/dim vs best Gaussian {best_gauss:.4f}")
  assert ce < best_gauss - 0.02
  assert ce < info["gaussian_cross_entropy"] - 1.0


def test_likelihood_gap_closed_by_fitted_prior(toy):
  """Exact score, probability-flow ODE from x ~ p_eps: log p(x) with the fitted prior
  (likelihood.log_likelihood(..., prior=nu)) is within 10% of the gap that p_noise leaves to the
  exact log p_eps(x) (toy_data oracle), mean |gap| per example. The ODE path does not depend on the
  prior, so the p_noise value is log p_noise(z_T) + delta_logp of the same solve."""
  sde, dist, prior = toy["sde"], toy["dist"], toy["prior"]
  k1, k2 = jax.random.split(jax.random.PRNGKey(11))
  x = aux.forward_samples(sde, dist.sample(k1, 64), k2, t=sde.eps)
  out = jax.jit(lambda x, nu: likelihood.log_likelihood(dist.score_fn(sde), sde, x, None,
                                                        prior=nu, divergence="exact"))(x, prior)
  exact = dist.marginal_log_prob(sde, x, sde.eps)
  logp_gauss = sde.prior().log_prob(out["z"]) + out["delta_logp"]
  gap_nu = float(jnp.mean(jnp.abs(out["logp"] - exact)))
  gap_gauss = float(jnp.mean(jnp.abs(logp_gauss - exact)))
  print(f"mean |NLL gap| nats: fitted DPGMM {gap_nu:.4f}, p_noise {gap_gauss:.4f}")
  assert bool(jnp.all(out["ok"]))
  assert gap_nu <= 0.1 * gap_gauss


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_sampler_from_fitted_prior(toy, method):
  """get_sampler(config, sde, shape, prior=nu) with the exact score (ODE, and SDE c = 1 with 500
  Euler-Maruyama steps) gives samples with the mean and variance of p_eps within 5 standard errors
  + 0.02 (prior fit and discretisation)."""
  config, sde, dist = toy["config"], toy["sde"], toy["dist"]
  config.sampling.method = method
  config.sampling.c = 0.0 if method == "ode" else 1.0
  config.sampling.n_steps = 500
  n = 4000
  p_eps = dist.marginal(sde, sde.eps)
  mean, var = float(p_eps.mean()[0]), float(p_eps.cov()[0, 0])

  def moments(prior):
    fn = samplers.get_sampler(config_schema.validate(config).sampling, sde, (n, 1), prior=prior)
    x, stats = jax.jit(lambda nu, k: fn(dist.score_fn(sde), k))(prior, jax.random.PRNGKey(12))
    x = np.asarray(x[:, 0], np.float64)
    se_mean = x.std() / math.sqrt(n)
    se_var = np.std((x - x.mean()) ** 2) / math.sqrt(n)
    return x.mean(), x.var(), se_mean, se_var

  m, v, se_m, se_v = moments(toy["prior"])
  print(f"{method}: sample mean {m:.4f} (p_eps {mean:.4f}), var {v:.4f} (p_eps {var:.4f})")
  assert abs(m - mean) < N_SIGMA * se_m + 0.02
  assert abs(v - var) < N_SIGMA * se_v + 0.02


@pytest.mark.parametrize("kind", ["dpgmm", pytest.param("flow", marks=pytest.mark.slow)])
def test_digits_fitted_prior_beats_p_noise_at_small_T(kind):
  """digits (VP, T = 0.2, configs/digits_vp.py's scaling): a DPGMM (10 components, full
  covariance, 3000 samples) and a small Glow (1 level, 2 steps, 150 Adam steps) fitted to forward
  samples of p(x, T) have a held-out cross-entropy below p_noise = N(0, I)'s (Franzese et al.,
  Sec. 3: nu_phi buys back the KL[p(x, T) || p_noise] a small T leaves). Measured (nats/dim):
  p_noise 1.300, DPGMM 1.143, Glow 1.087; the test asks for a margin of 0.1."""
  from configs.digits_vp import get_config as digits_config
  from run_lib import data_samples
  config = digits_config()
  config.sde.T = 0.2
  sde = sde_lib.get_sde(config_schema.validate(config).sde)
  k_x, k_t, k_fit = jax.random.split(jax.random.PRNGKey(0), 3)
  x_t = aux.forward_samples(sde, data_samples(config, k_x, 3000), k_t)
  if kind == "dpgmm":
    options = dict(n_components=10, covariance_type="full")
  else:
    options = dict(flow=flows.default_flow_spec((8, 8, 1), num_levels=1, num_steps=2, hidden=16),
                   steps=150, lr=2e-3, batch_size=128)
  _, info = aux.fit_prior(kind, x_t, k_fit, sde=sde, heldout_fraction=0.2, **options)
  print(f"digits T=0.2 {kind}: held-out cross-entropy {info['cross_entropy']:.4f} nats/dim, "
        f"p_noise {info['gaussian_cross_entropy']:.4f}")
  assert info["cross_entropy"] < info["gaussian_cross_entropy"] - 0.1
