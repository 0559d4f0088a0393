"""Tests of losses.py against closed-form Gaussian / GMM oracles (toy_data) and a single-device run.

Monte Carlo comparisons use independent replicate losses (vmap over keys) and state their
tolerance in standard errors (SE). Timings and measured ratios are printed (run with -s).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import config_schema
import losses
import sde_lib
import toy_data
import training
from configs.default import get_default_config


def _config(**training):
  config = get_default_config()
  for k, v in training.items():
    config.training[k] = v
  return config


def _training(**training):
  """The typed training section (config_schema.validate at the boundary, as run_lib does)."""
  return config_schema.validate(_config(**training), sections=("training",)).training


def _gaussian_data(dtype=jnp.float64):
  """N(mu, diag(s^2)) in 2-D: an anisotropic Gaussian with closed-form marginals."""
  mu = np.array([1.0, -1.0])
  s = np.array([0.5, 2.0])
  return mu, s, toy_data.gaussian(mu, np.diag(s**2))


def _gaussian_score_fn(sde, mu, s):
  """Linear score family around the exact one: s_theta(x, t) = -(x - alpha (mu + c)) /
  (alpha^2 s^2 e^k + sigma^2); theta = (k, c) = 0 is the exact marginal score of N(mu, diag s^2)."""
  def score_fn(params, x, t, rng=None):
    alpha, sigma = sde.marginal_coeffs(t)
    a, sg = sde_lib.bcast(alpha, x), sde_lib.bcast(sigma, x)
    var = a**2 * s**2 * jnp.exp(params["k"]) + sg**2
    return -(x - a * (mu + params["c"])) / var
  return score_fn


def _replicator(loss_fn):
  """jit (params, batches, keys) -> independent replicate losses, one per (batch, key)."""
  return jax.jit(jax.vmap(lambda p, b, k: loss_fn(p, b, k)[0], in_axes=(None, 0, 0)))


def _mean_se(v):
  v = np.asarray(v)
  return v.mean(), v.std(ddof=1) / math.sqrt(v.size)


# -- configuration -------------------------------------------------------------------------------------
def test_config_errors_name_the_field():
  sde = sde_lib.VPSDE()
  fn = lambda p, x, t, rng=None: x
  with pytest.raises(ValueError, match="training.weighting"):
    losses.get_loss_fn(_training(weighting="uniform"), sde, fn)
  with pytest.raises(ValueError, match="training.target"):
    losses.get_loss_fn(_training(target="ncsn"), sde, fn)
  with pytest.raises(ValueError, match="training.ref_batch_size"):
    losses.get_loss_fn(_training(target="stf", batch_size=16, ref_batch_size=8), sde, fn)
  config = _config()
  config.optim.optimizer = "sgd"
  with pytest.raises(ValueError, match="optim.optimizer"):
    config_schema.validate(config, sections=("optim",))
  config = _config()
  config.optim.warmup = -1
  with pytest.raises(ValueError, match="optim.warmup"):
    config_schema.validate(config, sections=("optim",))
  # A wrongly sized STF batch fails when traced, naming the field.
  loss_fn = losses.get_loss_fn(_training(target="stf", batch_size=2, ref_batch_size=4), sde, fn)
  with pytest.raises(ValueError, match="training.ref_batch_size"):
    loss_fn({}, jnp.zeros((3, 2)), jax.random.PRNGKey(0))


def test_weightings_match_the_papers_formulas():
  """Cao et al. eq. 5 / 45 with varpi_t = sqrt(1 - exp(-t^2 (b1 - b0)/2 - t b0)) for VP; g^2 = beta;
  reduce_mean divides the loss by D."""
  sde = sde_lib.VPSDE()
  t = jnp.array([0.01, 0.2, 0.7, 1.0])
  varpi = jnp.sqrt(1 - jnp.exp(-0.5 * t**2 * (20.0 - 0.1) - 0.1 * t))
  want = {"default": varpi**2, "noise_driven": varpi**3, "data_driven": varpi**2 / (0.25 + varpi),
          "likelihood": 0.1 + t * (20.0 - 0.1)}
  for name, w in want.items():
    np.testing.assert_allclose(losses.loss_weight(sde, t, name), w, rtol=1e-5)
  fn = lambda p, x, t, rng=None: p * x
  x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 5))
  key = jax.random.PRNGKey(1)
  total = losses.get_loss_fn(_training(batch_size=8), sde, fn)(-1.0, x0, key)[0]
  mean = losses.get_loss_fn(_training(batch_size=8, reduce_mean=True), sde, fn)(-1.0, x0, key)[0]
  np.testing.assert_allclose(mean, total / 15, rtol=1e-6)


# -- STF target -------------------------------------------------------------------------------------------
SDES = [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE()]


@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve"])
def test_stf_target_matches_bruteforce_and_n1_is_dsm(sde):
  with jax.enable_x64(True):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    ref = jax.random.normal(k1, (7, 3, 2))  # n = 7 reference points with a (3, 2) event shape
    t = jnp.array([0.05, 0.3, 0.6, 0.95])
    xt = sde.perturb(ref[:4], t, jax.random.normal(k2, (4, 3, 2)))
    got = losses.stf_target(sde, xt, t, ref)
    # Brute force over the (B, n, D) tensor: log p_{0t}(x_t^i | x_j) and eq. 5 of Xu et al.
    alpha, sigma = sde.marginal_coeffs(t)
    mean = alpha[:, None, None, None] * ref[None]  # (B, n, 3, 2)
    logp = -jnp.sum((xt[:, None] - mean) ** 2, axis=(2, 3)) / (2 * sigma[:, None] ** 2)
    w = jax.nn.softmax(logp, axis=1)
    scores = -(xt[:, None] - mean) / sigma[:, None, None, None] ** 2
    want = jnp.einsum("bn,bnij->bij", w, scores)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(want))))
  # n = 1 (float32): the STF target of x_t's own clean point is the DSM target, bit for bit.
  x0 = jax.random.normal(k3, (5, 4))
  t = jnp.linspace(0.01, 1.0, 5)
  xt = sde.perturb(x0, t, jax.random.normal(k2, x0.shape))
  stf1 = jax.vmap(lambda x, r, ti: losses.stf_target(sde, x[None], ti, r[None])[0])(xt, x0, t)
  np.testing.assert_array_equal(stf1, losses.dsm_target(sde, x0, xt, t))
  # ... and the STF loss with n = B = 1 equals the DSM loss for the same key.
  fn = lambda p, x, t, rng=None: p * x
  key = jax.random.PRNGKey(3)
  dsm = losses.get_loss_fn(_training(target="dsm", batch_size=1), sde, fn)(0.3, x0[:1], key)[0]
  stf = losses.get_loss_fn(_training(target="stf", batch_size=1, ref_batch_size=1), sde, fn)(
      0.3, x0[:1], key)[0]
  assert float(dsm) == float(stf)


def test_stf_minimizer_is_the_true_score():
  """E[v_STF | x_t] on a 1-D GMM (toy_data.ode_sde_gmm_1d, VP, t = 0.3) for n in {1, 4, 16, 64}.

  Algorithm 1 (x_t perturbed from a member of the reference batch): the conditional mean is
  estimated by importance sampling x_1 ~ p_{0|t}(.|x_t) with weights p_{0t}(x_t|x_1)/p_t(x_t) (exact
  oracle). It matches grad log p_t within 4 SE for every n (it is unbiased, see losses.py). The same
  estimator applied to a reference batch that excludes x_1 (plain self-normalized importance
  sampling) detects that variant's bias, which shrinks monotonically with n."""
  with jax.enable_x64(True):
    sde = sde_lib.VPSDE()
    gmm = toy_data.ode_sde_gmm_1d()
    t = jnp.asarray(0.3)
    alpha, sigma = sde.marginal_coeffs(t)
    xt = jnp.array([[0.2]])
    true = float(gmm.marginal_score(sde, xt, t)[0, 0])
    log_pt = gmm.marginal_log_prob(sde, xt, t)[0]
    target = jax.jit(jax.vmap(lambda r: losses.stf_target(sde, xt, t, r)[0, 0]))
    biases = []
    for i, n in enumerate([1, 4, 16, 64]):
      k = 2**17 // n
      xs = gmm.sample(jax.random.PRNGKey(i), k * n).reshape(k, n, 1)
      logw = (-0.5 * (xt[0, 0] - alpha * xs[:, 0, 0]) ** 2 / sigma**2
              - 0.5 * jnp.log(2 * jnp.pi * sigma**2) - log_pt)
      est, se = _mean_se(jnp.exp(logw) * target(xs))
      print(f"n={n}: E[v_STF|x_t]={est:.5f} +- {se:.5f}, true score {true:.5f}")
      assert abs(est - true) < 4 * se, (n, est, true, se)
      # Reference batch without x_1: n fresh points from p_0.
      fresh = gmm.sample(jax.random.PRNGKey(100 + i), k * n).reshape(k, n, 1)
      est_x, se_x = _mean_se(target(fresh))
      biases.append(abs(est_x - true))
      print(f"  excluded-x_1 variant: {est_x:.5f} +- {se_x:.5f}, |bias| {biases[-1]:.5f}")
      if n <= 16:
        assert biases[-1] > 4 * se_x  # the test can see a bias where there is one
    assert all(a > b for a, b in zip(biases, biases[1:])), biases


def test_theorem2_far_field_variance_ratio():
  """(n-1) V_STF(t) / V_DSM(t) on Two Gaussians in 64-D under the VE SDE of Xu et al. (Appendix C):
  ≈ 1 in the far field (Theorem 2, exactly (n-1)/n when p_{0|t} = p_0); n = 1 gives V_STF = V_DSM."""
  with jax.enable_x64(True):
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
    data = toy_data.two_gaussians_64d()
    score = lambda x, t: data.marginal_score(sde, x, t[0])  # all examples share t
    m = 1024
    k0, k1, kz = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = data.sample(k0, m)
    v_dsm = jax.jit(lambda x: losses.v_dsm(sde, x, 1.0, kz, score))
    v_stf = jax.jit(lambda x, r: losses.v_stf(sde, x, r, 1.0, kz, score))
    vd = v_dsm(x0)
    v1 = v_stf(x0, jnp.zeros((m, 0, 64)))
    np.testing.assert_allclose(v1[0], vd[0], rtol=1e-10)
    for n in (16, 64):
      ref = data.sample(k1, m * (n - 1)).reshape(m, n - 1, 64)
      vs = v_stf(x0, ref)
      ratio = (n - 1) * vs[0] / vd[0]
      ratio_se = (n - 1) * vs[1] / vd[0]
      print(f"t=1 (far field), n={n}: (n-1) V_STF/V_DSM = {ratio:.4f} +- {ratio_se:.4f}"
            f" (expected (n-1)/n = {(n - 1) / n:.4f}); V_DSM = {vd[0]:.3e}")
      assert abs(ratio - (n - 1) / n) < 4 * ratio_se + 0.02
      assert abs(ratio - 1.0) < 0.1


# -- DSM objective on Gaussian data -----------------------------------------------------------------------
def _analytic_dsm(sde, s, weighting):
  """J at the exact score for N(mu, diag s^2): (1/(T-eps)) int lambda(t) (D/sigma_t^2 - tr C_t^{-1}) dt,
  C_t = alpha_t^2 diag(s^2) + sigma_t^2 I (E|grad log p_0t|^2 - E|grad log p_t|^2), by quadrature."""
  def integrand(t):
    alpha, sigma = (float(v) for v in sde.marginal_coeffs(jnp.asarray(t)))
    lam = float(losses.loss_weight(sde, jnp.asarray(t), weighting))
    return lam * (s.size / sigma**2 - np.sum(1.0 / (alpha**2 * s**2 + sigma**2)))
  eps, T = float(sde.eps), float(sde.T)
  val, _ = integrate.quad(integrand, eps, T, limit=200, points=[0.01, 0.1])
  return val / (T - eps)


@pytest.mark.parametrize("sde,weighting", [(sde_lib.VPSDE(eps=1e-3), "default"),
                                           (sde_lib.VESDE(sigma_max=5.0), "data_driven")],
                         ids=["vp-default", "ve-data_driven"])
def test_dsm_exact_score_is_minimizer_with_analytic_value(sde, weighting):
  with jax.enable_x64(True):
    mu, s, data = _gaussian_data()
    score_fn = _gaussian_score_fn(sde, mu, s)
    loss_fn = losses.get_loss_fn(_training(weighting=weighting, batch_size=64), sde, score_fn)
    reps, b = 400, 64
    keys = jax.random.split(jax.random.PRNGKey(1), reps)
    batches = data.sample(jax.random.PRNGKey(2), reps * b).reshape(reps, b, 2)
    exact = {"k": jnp.zeros(2), "c": jnp.zeros(2)}
    replicates = _replicator(loss_fn)
    base = replicates(exact, batches, keys)
    mean, se = _mean_se(base)
    want = _analytic_dsm(sde, s, weighting)
    print(f"{weighting}: DSM at exact score {mean:.4f} +- {se:.4f}, analytic {want:.4f}")
    assert abs(mean - want) < 4 * se
    # Perturbing the exact score in any direction increases the loss (common random numbers).
    dirs = [np.eye(4)[i] * sgn for i in range(4) for sgn in (1, -1)]
    dirs += list(np.random.default_rng(0).normal(size=(4, 4)))
    for d in dirs:
      d = 0.5 * d / np.linalg.norm(d)
      p = {"k": exact["k"] + d[:2], "c": exact["c"] + d[2:]}
      delta = replicates(p, batches, keys) - base
      dm, dse = _mean_se(delta)
      assert dm > 3 * dse, (d, dm, dse)


def test_importance_sampled_time_is_unbiased_with_lower_variance():
  """likelihood_is vs likelihood (uniform t), fixed non-exact linear score, VP on [1e-3, 0.5]."""
  with jax.enable_x64(True):
    mu, s, data = _gaussian_data()
    sde = sde_lib.VPSDE(eps=1e-3, T=0.5)
    score_fn = lambda p, x, t, rng=None: -(x - 0.5) / p
    reps, b = 2000, 16
    keys = jax.random.split(jax.random.PRNGKey(4), reps)
    batches = data.sample(jax.random.PRNGKey(5), reps * b).reshape(reps, b, 2)
    out = {}
    for w in ("likelihood", "likelihood_is"):
      loss_fn = losses.get_loss_fn(_training(weighting=w, batch_size=b), sde, score_fn)
      out[w] = np.asarray(_replicator(loss_fn)(2.0, batches, keys))
    (mu_u, se_u), (mu_i, se_i) = _mean_se(out["likelihood"]), _mean_se(out["likelihood_is"])
    ratio = out["likelihood"].var() / out["likelihood_is"].var()
    print(f"uniform {mu_u:.3f} +- {se_u:.3f}, IS {mu_i:.3f} +- {se_i:.3f}, variance ratio {ratio:.1f}")
    assert abs(mu_u - mu_i) < 3 * math.hypot(se_u, se_i)
    assert ratio > 2.0


@pytest.mark.parametrize("probe", ["rademacher", "exact"])  # gaussian: tests/test_ct_elbo.py
def test_ism_ssm_equal_dsm_up_to_constant(probe):
  """E[DSM - ISM] = E[DSM - SSM] = E_t[lambda D / sigma_t^2] (= D for the default weighting) with a
  non-exact linear score model on Gaussian data; paired samples (same key -> same t, x_t)."""
  with jax.enable_x64(True):
    mu, s, data = _gaussian_data()
    sde = sde_lib.VPSDE()
    # A full, non-symmetric A: the Hutchinson probes see off-diagonal terms.
    score_fn = lambda p, x, t, rng=None: -x @ p["a"].T + p["b"]
    params = {"a": jnp.array([[0.7, 0.4], [-0.3, 1.5]]), "b": jnp.array([0.3, -0.2])}
    reps, b = 300, 32
    keys = jax.random.split(jax.random.PRNGKey(6), reps)
    x0 = data.sample(jax.random.PRNGKey(7), reps * b).reshape(reps, b, 2)
    run = lambda f: jax.jit(jax.vmap(lambda x, k: f(sde, score_fn, params, x, k)[0]))(x0, keys)
    dsm = run(lambda *a: losses.dsm_loss(*a, weighting="default"))
    fns = {"ism": losses.ism_loss} if probe == "exact" else {"ism": losses.ism_loss,
                                                             "ssm": losses.ssm_loss}
    for name, f in fns.items():
      other = run(functools.partial(f, weighting="default", probe=probe))
      m, se = _mean_se(dsm - other)
      print(f"{name}/{probe}: E[DSM - {name}] = {m:.4f} +- {se:.4f} (want D = 2)")
      assert abs(m - 2.0) < 4 * se + 1e-9
    # Per-time offset helper agrees with the default-weighting constant.
    np.testing.assert_allclose(losses.dsm_ism_offset(sde, jnp.array([0.1, 0.9]), 2), 2.0)


# -- sharded train step ---------------------------------------------------------------------------------------
class _TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x, t):
    h = jnp.concatenate([x, t[:, None]], axis=-1)
    h = nn.silu(nn.Dense(32)(h))
    h = nn.silu(nn.Dense(32)(h))
    return nn.Dense(x.shape[-1])(h)


@pytest.mark.parametrize("target", ["dsm", "stf"])
def test_sharded_train_step_matches_single_device(target):
  assert len(jax.devices()) == 4, "tests/conftest.py simulates 4 CPU devices"
  sde = sde_lib.VPSDE()
  model = _TinyMLP()
  score_fn = lambda p, x, t, rng=None: model.apply(p, x, t)
  b, n = 8, 16
  config = _config(target=target, batch_size=b, ref_batch_size=n, weighting="likelihood_is")
  config.optim.warmup = 2
  config.optim.lr = 1e-2
  config = config_schema.validate(config, sections=("training", "optim"))
  loss_fn = losses.get_loss_fn(config.training, sde, score_fn)
  optimizer = training.make_optimizer(config.optim)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  data = toy_data.ode_sde_gmm_2d()
  rows = n if target == "stf" else b
  batches = data.sample(jax.random.PRNGKey(1), 3 * rows).reshape(3, rows, 2)
  finals = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = training.make_mesh(devices)
    step = training.make_train_step(loss_fn, optimizer, ema_rate=0.9, mesh=mesh)
    state = training.init_train_state(params, optimizer, jax.random.PRNGKey(2), mesh)
    for batch in batches:
      state, metrics = step(state, training.shard_batch(batch, mesh))
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
    finals.append(state)
  single, sharded = finals
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), single.params, params))
  assert max(moved) > 1e-3  # the steps did change the parameters
  for a, c in zip(jax.tree.leaves((single.params, single.ema_params)),
                  jax.tree.leaves((sharded.params, sharded.ema_params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=0)
  # The sharded eval step gives the loss of the plain function.
  eval_loss = losses.get_loss_fn(config.training, sde, score_fn, train=False)
  eval_step = training.make_eval_step(eval_loss, training.make_mesh())
  key = jax.random.PRNGKey(9)
  got = eval_step(sharded.ema_params, training.shard_batch(batches[0], training.make_mesh()), key)
  # float32 at t near eps (importance-sampled t concentrates there) amplifies reduction-order
  # differences between the compiled and the eager computation: 2e-4 relative.
  np.testing.assert_allclose(got["loss"], eval_loss(single.ema_params, batches[0], key)[0], rtol=2e-4)
