"""flows.py: change of variables (round trip, log-det vs the brute-force Jacobian), identity at
initialisation, data-dependent actnorm, and the JSON spec."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

import flows

KEY = jax.random.PRNGKey(0)
init = jax.jit(flows.init_variables, static_argnums=0)  # eager flax/distrax init is slow on CPU


@jax.jit
def _perturbed(variables, key, scale):
  """Variables with every trainable leaf moved by scale * N(0, 1) (in the default float dtype): the
  zero-initialised last layers would otherwise make every coupling the identity (vacuous checks)."""
  flat, unravel = ravel_pytree(jax.tree.map(lambda a: a.astype(jnp.result_type(float)),
                                            variables["params"]))
  params = unravel(flat + scale * jax.random.normal(key, flat.shape, flat.dtype))
  rest = {c: jax.tree.map(lambda a: a.astype(jnp.result_type(float)), t)
          for c, t in variables.items() if c != "params"}
  return {**rest, "params": params}


CASES = {
    # name: (model, batch shape, context shape or None, perturbation scale, property at init)
    "coupling_affine_tanh_ctx": (flows.CouplingFlow(3, num_layers=4, hidden=(16,)), (6, 3),
                                 (6, 2), 0.3, None),
    "coupling_affine_softplus": (flows.CouplingFlow(2, num_layers=3, hidden=(16,), actnorm=False,
                                                    scale="softplus"), (6, 2), None, 0.3,
                                 "identity"),
    "coupling_spline_1d": (flows.CouplingFlow(1, num_layers=2, hidden=(8,), transformer="spline"),
                           (6, 1), None, 0.1, None),
    "glow_lu_4x4x2_ctx": (flows.Glow((4, 4, 2), num_levels=2, num_steps=1, hidden=8,
                                     data_init=False), (3, 4, 4, 2), (3, 4, 4, 1), 0.1,
                          "orthogonal"),
    "glow_plain_4x4x1_learned_base": (flows.Glow((4, 4, 1), num_levels=1, num_steps=1, hidden=8,
                                                 lu=False, base="learned"), (3, 4, 4, 1), None,
                                      0.1, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_change_of_variables(name):
  """For perturbed (non-identity) parameters, in float64: inverse(forward(x)) = x within 1e-9 (the
  requirement is 1e-5) and the two log-dets cancel (1e-9); log|det df/dx| equals slogdet of the
  jax.jacfwd Jacobian within 1e-8 (D <= 32); log_prob(x) = sum log N(f(x); 0, 1) + log|det J|
  (scipy) within 1e-8 (base N(0, I)); sample_and_log_prob agrees with log_prob on its draws (1e-8).
  At initialisation (zero-initialised conditioners): a coupling flow without actnorm is the identity
  (to rounding, 1e-12); a Glow without data-dependent init is orthogonal (|z| = |x|, log-det 0
  within 1e-9: rotations as 1x1 convolutions, identity couplings and actnorms)."""
  with jax.enable_x64(True):
    _check_change_of_variables(*CASES[name])


def _check_change_of_variables(model, shape, ctx_shape, scale, at_init):
  k_x, k_c, k_p, k_s = jax.random.split(KEY, 4)
  x = jax.random.normal(k_x, shape, jnp.float64)
  ctx = None if ctx_shape is None else jax.random.normal(k_c, ctx_shape, jnp.float64)
  v_init = init(model, KEY, x, ctx)
  v0, v = _perturbed(v_init, k_p, 0.0), _perturbed(v_init, k_p, scale)
  d = math.prod(shape[1:])

  @jax.jit
  def check(v, x, ctx):
    z, ld = flows.forward(model, v, x, ctx)
    xr, ild = flows.inverse(model, v, z, ctx)

    def single(xi, ci):
      c = None if ci is None else ci[None]
      return flows.forward(model, v, xi.reshape(1, *shape[1:]), c)[0].reshape(-1)

    jac = jax.vmap(jax.jacfwd(single), in_axes=(0, None if ctx is None else 0))(
        x.reshape(shape[0], d), ctx)
    return z, ld, xr, ild, jnp.linalg.slogdet(jac)[1], flows.log_prob(model, v, x, ctx)

  z0, ld0 = check(v0, x, ctx)[:2]  # same compiled function, initial parameters
  if at_init == "identity":
    np.testing.assert_allclose(z0, x, rtol=1e-12)  # softplus(c) = 1 - min_scale to rounding
    np.testing.assert_allclose(ld0, 0.0, atol=1e-12)
  elif at_init == "orthogonal":
    np.testing.assert_allclose(jnp.sum(z0**2, axis=(1, 2, 3)), jnp.sum(x**2, axis=(1, 2, 3)),
                               rtol=1e-9)
    np.testing.assert_allclose(ld0, 0.0, atol=1e-9)
  z, ld, xr, ild, brute, logp = check(v, x, ctx)
  assert z.dtype == jnp.float64
  assert float(jnp.max(jnp.abs(xr - x))) <= 1e-9
  np.testing.assert_allclose(ild, -ld, atol=1e-9)
  np.testing.assert_allclose(ld, brute, atol=1e-8)
  assert float(jnp.max(jnp.abs(z - x))) > 1e-2  # the flow is not the identity
  assert float(jnp.max(jnp.abs(ld))) > 1e-2
  if model.base == "standard":
    ref = stats.norm.logpdf(np.asarray(z)).reshape(shape[0], -1).sum(1) + np.asarray(ld)
    np.testing.assert_allclose(logp, ref, atol=1e-8)
  n = shape[0]

  @jax.jit
  def draw(v, k):
    xs, lps = model.apply(v, k, n, ctx, method="sample_and_log_prob")
    return xs, lps, flows.log_prob(model, v, xs, ctx)

  xs, lps, lps_ref = draw(v, k_s)
  assert xs.shape == shape
  np.testing.assert_allclose(lps, lps_ref, atol=1e-8)


def test_actnorm_data_init_standardises():
  """Data-dependent actnorm (Glow Sec. 3.1): at init the latent of the init batch has per-coordinate
  mean 0 and std 1 (within 1e-4; couplings are the identity at init) for data with mean 5, std 3."""
  x = 5.0 + 3.0 * jax.random.normal(KEY, (512, 3)) * jnp.asarray([1.0, 0.5, 2.0])
  m = flows.CouplingFlow(3, num_layers=2, hidden=(8,))
  z, _ = jax.jit(flows.forward, static_argnums=0)(m, init(m, KEY, x), x)
  np.testing.assert_allclose(jnp.mean(z, 0), 0.0, atol=1e-4)
  np.testing.assert_allclose(jnp.std(z, 0), 1.0, atol=1e-4)


def test_spec_round_trip_and_errors():
  """flow_spec survives JSON and rebuilds an equal module; bad options fail naming the field."""
  for m in (flows.CouplingFlow(2, hidden=(8, 8), transformer="spline"),
            flows.Glow((8, 8, 3), num_levels=3, lu=False)):
    spec = json.loads(json.dumps(flows.flow_spec(m)))
    assert flows.make_flow(spec) == m
  assert flows.default_flow_spec((4, 4, 1))["name"] == "glow"
  with pytest.raises(ValueError, match="prior.flow.name"):
    flows.make_flow({"name": "maf"})
  with pytest.raises(ValueError, match="unknown prior.flow option"):
    flows.make_flow({"name": "coupling", "event_dim": 2, "depth": 3})
  with pytest.raises(ValueError, match="divisible by 4"):
    g = flows.Glow((6, 6, 1), num_levels=2)
    flows.init_variables(g, KEY, jnp.zeros((1, 6, 6, 1)))
  with pytest.raises(ValueError, match="transformer"):
    m = flows.CouplingFlow(2, transformer="cubic")
    flows.init_variables(m, KEY, jnp.zeros((1, 2)))


def test_flows_import_after_tensorflow():
  """A fresh process that imports TensorFlow (as a TFDS pipeline does) before flows / auxiliary:
  the import works without tf-keras and a distrax bijector runs (flows._import_distrax)."""
  import subprocess
  import sys
  code = ("import tensorflow, tensorflow_datasets\n"
          "import auxiliary, flows, jax.numpy as jnp\n"
          "y = flows.distrax.ScalarAffine(shift=1.0, scale=2.0).forward(jnp.ones(2))\n"
          "assert float(y[0]) == 3.0 and 'tensorflow' in __import__('sys').modules\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": root})
  assert out.returncode == 0, out.stderr[-3000:]
