"""Pulse-shaped score errors of Cao et al. (Appendix G, eq. 44): the multipliers, the config path
(sampling.perturbation) against the closed-form generated variance, and the Table 3 experiment.

Oracles: eq. 44 written out by hand; the generated variance of the 1-D Gaussian example solved
here in float64 with SciPy (V' = 2 a V + h^2, Appendix G.1); the case 1 / 4 / 5 leading-order
L(h) in closed form: with q(tau) = e^tau - 1 + sigma_0^2, int e^{-h^2 tau} (sigma_0^2 /
sigma_tau^2)^{1 + h^2} over [tau_a, tau_b] = sigma_0^{2 + 2h^2} / h^2 (q(tau_a)^{-h^2} -
q(tau_b)^{-h^2}).
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import config_schema
import sde_lib
import samplers
from configs.default import get_default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import pulse_perturbations as pp  # noqa: E402

T, SIGMA0 = 2.0, 0.5  # Appendix G's T; a sigma_0 < 1 (data narrower than the noise)


def test_pulse_multiplier_is_eq44():
  """m(u) of eq. 44 at generative times u (the paper's edges 0.95 T and 0.99 T by default)."""
  u = jnp.array([0.0, 0.5, 1.0, 1.5, 1.89, 1.91, 1.97, 1.99])
  expected = {
      "case1": np.ones(8), "case2": -np.ones(8),
      "case3": 0.5 * (1.0 + np.sin(2.0 * np.pi * np.asarray(u) / T)),
      "case4": (np.asarray(u) < 1.9).astype(float),  # u < 0.95 T
      "case5": (np.asarray(u) > 1.98).astype(float),  # u > 0.99 T
  }
  for case, m in expected.items():
    np.testing.assert_allclose(samplers.pulse_multiplier(case, u, T), m, atol=1e-6, err_msg=case)
  np.testing.assert_array_equal(samplers.pulse_multiplier("case4", u, T, edge=0.5),
                                (np.asarray(u) < 1.0).astype(np.float32))
  with pytest.raises(ValueError, match="perturbation_edge"):
    samplers.pulse_multiplier("case1", u, T, edge=0.5)
  # The perturbed score is (1 + eps m(T - t)) s: t is forward time.
  sde = sde_lib.VPSDE(T=T)
  x = jnp.ones((3, 1))
  t = jnp.array([0.01, 0.05, 1.0])  # u = 1.99, 1.95, 1.0: only the first is in case 5's pulse
  s = samplers.pulse_perturbed_score(lambda x, t: 2.0 * x, sde, "case5", 0.5)(x, t)
  np.testing.assert_allclose(s[:, 0], [3.0, 2.0, 2.0], rtol=1e-6)


def closed_form_var(c, eps, m, u_end):
  """Generated Var at generative time u_end (Appendix G.1): V' = 2 a V + c, V(0) = sigma_T^2,
  a = 1/2 - (1 + c)/2 (1 + eps m(u)) / sigma_{T-u}^2, sigma_t^2 = sigma_0^2 e^-t + 1 - e^-t."""
  def var(t):
    return SIGMA0**2 * math.exp(-t) + 1.0 - math.exp(-t)

  def rhs(u, v):
    return 2.0 * (0.5 - 0.5 * (1.0 + c) * (1.0 + eps * m(u)) / var(T - u)) * v + c

  v = var(T)
  for lo, hi in ((0.0, 1.9), (1.9, 1.98), (1.98, u_end)):  # the pulse edges of cases 4 and 5
    v = integrate.solve_ivp(rhs, (lo, hi), [v], method="Radau", rtol=1e-10, atol=1e-13).y[0, -1]
  return v


def test_config_perturbation_matches_closed_form_variance():
  """--mode=sample's path: get_sampler with sampling.perturbation = case4 / case5 (eps = 0.5) on
  the Appendix G process (VP with beta = 1, T = 2, prior p_T) gives the closed-form variance
  within Z = 4.5 standard errors + 2% (time discretization, 1000 steps; measured 2-3%), and the
  early pulse is damped by c = 4 while the late one is amplified (Props. 3.4-3.5; measured error
  ratios c = 4 / c = 0: 0.12 and 4.0). get_sampler applies the perturbation to the score for
  every method (one wrapper), so one method ('exponential') is exercised."""
  method = "exponential"
  n, eps, eps_sde = 10_000, 0.5, 1e-3
  sde = sde_lib.VPSDE(beta_min=1.0, beta_max=1.0, T=T, eps=eps_sde)
  prior = sde_lib.GaussianPrior(jnp.sqrt(SIGMA0**2 * math.exp(-T) - math.expm1(-T)))

  def score(x, t):
    return -x / (SIGMA0**2 * jnp.exp(-t) - jnp.expm1(-t))

  edges = {"case4": lambda u: float(u < 1.9), "case5": lambda u: float(u > 1.98)}
  err = {}
  for case, m in edges.items():
    for c in (0.0, 4.0):
      config = get_default_config()
      config.sampling.update(dict(method=method, c=c, n_steps=1000, denoise=False,
                                  perturbation=case, perturbation_epsilon=eps))
      sample_fn = samplers.get_sampler(
          config_schema.validate(config, sections=("sampling",)).sampling, sde, (n, 1), prior=prior)
      x = np.asarray(jax.jit(sample_fn, static_argnums=0)(score, jax.random.PRNGKey(3))[0],
                     np.float64)
      v = closed_form_var(c, eps, m, T - eps_sde)
      v_hat = float(np.mean(x**2))
      assert abs(v_hat - v) < (4.5 * math.sqrt(2.0 / n) + 0.02) * v, (case, c, v_hat, v)
      target = SIGMA0**2 * math.exp(-eps_sde) - math.expm1(-eps_sde)
      err[case, c] = abs(v - target)
  assert err["case4", 4.0] < 0.2 * err["case4", 0.0]  # early pulse suppressed by diffusion
  assert err["case5", 4.0] > 2.0 * err["case5", 0.0]  # late pulse amplified


@pytest.mark.parametrize("sigma0", [0.2, 1.5])
def test_leading_order_L_closed_forms(sigma0):
  """pulse_perturbations.leading_order_L (one quadrature) equals the closed forms of cases 1, 2,
  4, 5 to 1e-7 (relative), and (KL(eps) + KL(-eps)) / 2 eps^2 from the finite-eps variance ODE
  (an independent route) to 1e-3 at eps = 0.005."""
  def q(tau):
    return math.exp(tau) - 1.0 + sigma0**2

  def closed(h2, tau_a, tau_b):
    if h2 == 0.0:
      integral = sigma0**2 * math.log(q(tau_b) / q(tau_a))
    else:
      integral = sigma0 ** (2 + 2 * h2) / h2 * (q(tau_a) ** -h2 - q(tau_b) ** -h2)
    return ((1.0 + h2) / (2.0 * sigma0**2) * integral) ** 2

  for h2 in (0.0, 0.5, 4.0, 20.0):
    for case, (a, b) in (("case1", (0.0, T)), ("case2", (0.0, T)), ("case4", (0.05 * T, T)),
                         ("case5", (0.0, 0.01 * T))):
      ref = closed(h2, a, b)
      assert abs(pp.leading_order_L(sigma0, h2, case) - ref) <= 1e-7 * ref + 1e-15, (case, h2)
  for case in ("case1", "case3"):
    e = 0.005
    sym = sum(pp.gaussian_kl(sigma0**2, pp.generated_var(sigma0, 4.0, s * e, case))
              for s in (1.0, -1.0)) / (2 * e**2)
    ref = pp.leading_order_L(sigma0, 4.0, case)
    assert abs(sym - ref) < 1e-3 * ref, (case, sym, ref)


def test_pulse_experiment_smoke(tmp_path):
  """experiments/pulse_perturbations.py --smoke: Table 3 reproduced by the paper's regression
  protocol within 1% (cases 1, 3) and 3% (case 2) of the printed values (measured 0.4%, 0.0-1.6%,
  2.2%); the early pulse's L falls with h^2 (sigma_0 < 1) and the late pulse's exceeds the ODE's
  L(0) at every h^2 > 0; sampled KL / eps^2 agrees
  with the closed form within 4.5 SE + 10% of it (time discretization at 400 steps); PNGs exist."""
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "pulse_perturbations.py"),
                  "--smoke", "--out", out], check=True, timeout=600, capture_output=True)
  with open(os.path.join(out, "result.json")) as f:
    result = json.load(f)
  for row in result["table3"]:
    for case, tol in (("case1", 0.01), ("case2", 0.03), ("case3", 0.02)):
      printed, got = row[f"{case}_printed"], row[f"{case}_L_regression"]
      assert abs(got - printed) < tol * printed, (row["sigma0"], case, got, printed)
    assert abs(row["case1_L_exact"] - row["case2_L_exact"]) < 1e-9  # L is even in E
  claims = result["claims"]
  assert claims["case4_early_pulse_decays_with_h2_sigma0_lt_1"]
  assert claims["case5_late_pulse_above_ode_for_every_h2"]
  assert claims["case4_L_ratio_h2_max_over_h2_0"] < 1e-3
  assert claims["case5_L_ratio_max_over_h2_0"] > 10
  for r in result["sampled"]:
    ref = r["kl_over_eps2_closed_form"]
    assert abs(r["kl_over_eps2_sampled"] - ref) < 4.5 * r["kl_over_eps2_sampled_se"] + 0.1 * ref, r
  for png in ("L_vs_h2.png", "early_late.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  assert "| 0.2 | 0.2567 |" in open(os.path.join(out, "table.md")).read()
