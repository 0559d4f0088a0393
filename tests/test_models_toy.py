"""Tests of models/ (registry, MLP) and models/utils.py (score_fn parameterizations).

Oracle: data x0 ~ N(mu, s0^2 I) has the closed-form marginal p_t = N(alpha_t mu, (alpha_t^2 s0^2 +
sigma_t^2) I) under VP / sub-VP / VE, so the exact score, noise (eps = -sigma_t s) and a = g s are
known; a module that outputs the exact quantity must give the exact score through get_score_fn.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import config_schema
import sde_lib
from configs.default_toy import get_default_toy_config
import models
from models import get_model, register_model, registered_models
from models.mlp import MLPScore
from models.utils import get_score_fn, init_model, input_scale, score_fn_from_config

MU, S0 = 0.7, 0.3


def cond_to_t(sde, cond):
  """Inverts sde.noise_conditioning (t for VP/sub-VP, log sigma(t) for VE)."""
  if isinstance(sde, sde_lib.VESDE):
    return (cond - jnp.log(sde.sigma_min)) / sde.log_ratio()
  return cond


def exact_score(sde, x, t):
  alpha, sigma = sde.marginal_coeffs(t)
  var = alpha**2 * S0**2 + sigma**2
  return -(x - sde_lib.bcast(alpha, x) * MU) / sde_lib.bcast(var, x)


class OracleNet(nn.Module):
  """Outputs the exact quantity a network with the given parameterization should predict."""
  sde: object
  parameterization: str
  scaled_input: bool = False  # undo the c_in(t) input scaling of get_score_fn

  @nn.compact
  def __call__(self, x, cond, train=False):
    # A dummy parameter so params is a non-empty tree that grad can flow into.
    w = self.param("w", nn.initializers.ones, ())
    t = cond_to_t(self.sde, cond)
    if self.scaled_input:
      x = x / sde_lib.bcast(input_scale(self.sde, t), x)
    s = exact_score(self.sde, x, t) * w
    if self.parameterization == "score":
      return s
    if self.parameterization == "noise":
      return -sde_lib.bcast(self.sde.marginal_coeffs(t)[1], x) * s
    return sde_lib.bcast(self.sde.diffusion(t), x) * s


SDES = [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE(), sde_lib.VPSDE(beta_min=1.0, beta_max=1.0, T=4.0)]


@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve", "vp_const_T4"])
@pytest.mark.parametrize("param", ["score", "noise", "a"])
@pytest.mark.parametrize("scaled", [False, True], ids=["raw_input", "c_in_input"])
def test_parameterizations_exact(sde, param, scaled):
  """Tolerance: rtol 1e-10 in float64 (the conversions are exact algebra)."""
  with jax.enable_x64(True):
    net = OracleNet(sde, param, scaled)
    params = init_model(net, jax.random.PRNGKey(0), (5, 3))
    score_fn = get_score_fn(sde, net, param, input_scaling=scaled)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64) * 2.0
    t = jnp.linspace(0.01, float(sde.T), 5)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    got = score_fn(params, x, t)
    want = exact_score(sde, x, t)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)
    # Scalar t broadcasts over the batch; train mode (rng) gives the same (no dropout here).
    got_s = score_fn(params, x, 0.3, rng=jax.random.PRNGKey(2))
    np.testing.assert_allclose(got_s, exact_score(sde, x, jnp.full((5,), 0.3)), rtol=1e-10)
    # jit and grad pass through: d/dw sum(score * w) = sum(score) at w = 1.
    g = jax.jit(jax.grad(lambda p: jnp.sum(score_fn(p, x, t))))(params)
    np.testing.assert_allclose(g["w"], jnp.sum(want), rtol=1e-10)


def test_input_scale():
  """c_in = 1 for VP (alpha^2 + sigma^2 = 1), 1/sqrt(1 + sigma_t^2) for VE; from config."""
  t = jnp.linspace(1e-3, 1.0, 7)
  np.testing.assert_allclose(input_scale(sde_lib.VPSDE(), t), 1.0, rtol=1e-6)
  ve = sde_lib.VESDE()
  np.testing.assert_allclose(input_scale(ve, t), 1 / np.sqrt(1 + ve.marginal_coeffs(t)[1] ** 2),
                             rtol=1e-6)
  config = get_default_toy_config()
  config.sde.name = "vesde"
  config.model.parameterization = "score"
  config.model.input_scaling = True
  ve = sde_lib.get_sde(config_schema.validate(config).sde)
  net = OracleNet(ve, "score", True)
  params = init_model(net, jax.random.PRNGKey(0), (4, 2))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 2)) * 10
  np.testing.assert_allclose(score_fn_from_config(config_schema.validate(config).model, ve, net)(params, x, 0.7),
                             exact_score(ve, x, jnp.full((4,), 0.7)), rtol=1e-5)


def test_unknown_parameterization():
  with pytest.raises(ValueError, match="model.parameterization"):
    get_score_fn(sde_lib.VPSDE(), MLPScore(), "eps")


@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal", "concat"])
def test_mlp_shapes_jit_grad_vmap(embedding):
  config = get_default_toy_config()
  config.model.widths = (16, 16)
  config.model.embedding = embedding
  config.model.parameterization = "score"
  model = get_model(config)
  assert isinstance(model, MLPScore) and model.widths == (16, 16)
  sde = sde_lib.get_sde(config_schema.validate(config).sde)
  params = init_model(model, jax.random.PRNGKey(0), (4, 2))
  score_fn = get_score_fn(sde, model, "noise")
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
  t = jax.random.uniform(jax.random.PRNGKey(2), (8,), minval=1e-3, maxval=1.0)
  out = jax.jit(score_fn)(params, x, t)
  assert out.shape == (8, 2) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  # Per-example independence: vmap over single examples equals the batched call.
  single = jax.vmap(lambda xi, ti: score_fn(params, xi[None], ti[None])[0])(x, t)
  np.testing.assert_allclose(single, out, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(score_fn(p, x, t) ** 2))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # The network depends on t (conditioning is wired in).
  out2 = score_fn(params, x, t * 0.5)
  assert float(jnp.max(jnp.abs(out2 - out))) > 1e-6


def test_mlp_dropout_train_vs_eval():
  model = MLPScore(widths=(32, 32), dropout=0.5)
  params = init_model(model, jax.random.PRNGKey(0), (4, 3))
  score_fn = get_score_fn(sde_lib.VPSDE(), model, "score")
  x = jnp.ones((4, 3))
  e1, e2 = score_fn(params, x, 0.5), score_fn(params, x, 0.5)
  np.testing.assert_array_equal(e1, e2)  # eval mode is deterministic
  tr1 = score_fn(params, x, 0.5, rng=jax.random.PRNGKey(1))
  tr2 = score_fn(params, x, 0.5, rng=jax.random.PRNGKey(2))
  assert float(jnp.max(jnp.abs(tr1 - tr2))) > 1e-6  # dropout active in train mode
  np.testing.assert_array_equal(tr1, score_fn(params, x, 0.5, rng=jax.random.PRNGKey(1)))


def test_fourier_frequencies_not_trained():
  model = MLPScore(widths=(8,), embedding="fourier")
  params = init_model(model, jax.random.PRNGKey(0), (2, 2))
  score_fn = get_score_fn(sde_lib.VPSDE(), model, "score")
  grads = jax.grad(lambda p: jnp.sum(score_fn(p, jnp.ones((2, 2)), 0.3)))(params)
  w_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
             if "GaussianFourierProjection" in jax.tree_util.keystr(path)]
  assert w_grads and all(float(jnp.max(jnp.abs(g))) == 0.0 for g in w_grads)


def test_registry():
  assert "mlp" in registered_models()
  config = ml_collections.ConfigDict({"model": {"name": "no_such_net"}})
  with pytest.raises(ValueError, match="model.name.*no_such_net"):
    get_model(config)
  bad = get_default_toy_config()
  bad.model.activation = "sigmoidish"
  with pytest.raises(ValueError, match="model.activation"):
    get_model(bad)
  bad = get_default_toy_config()
  bad.model.embedding = "learned"
  with pytest.raises(ValueError, match="model.embedding"):
    get_model(bad)

  @register_model("_test_tiny")
  class Tiny(nn.Module):
    @classmethod
    def from_config(cls, config):
      return cls()

    @nn.compact
    def __call__(self, x, cond, train=False):
      return nn.Dense(x.shape[-1])(x)

  try:
    assert isinstance(get_model(ml_collections.ConfigDict({"model": {"name": "_TEST_tiny"}})), Tiny)
    with pytest.raises(ValueError, match="registered twice"):
      register_model("_test_tiny")(MLPScore)
  finally:
    models._MODELS.pop("_test_tiny", None)
