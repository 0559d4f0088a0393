"""Tests of the image score networks (models/ncsnpp.py, ddpmpp.py, unet.py, layers.py) and of the
FIR resampling (models/up_or_down_sampling.py).

Oracles: a direct numpy evaluation of the upfirdn2d sum, jax.image.resize's (independently
implemented) bilinear / antialiased-linear resampling that [1, 3, 3, 1] FIR reproduces away from the
border, the kernel's impulse response, and a closed-form parameter count of the score_sde
architecture. Networks use tiny widths so the file runs in about a minute on 2 cores.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
import sde_lib
from models import layers
from models import up_or_down_sampling as ud
from models import utils as mutils
from models.ddpmpp import DDPMpp, ddpmpp_cifar_config, ddpmpp_deep_cifar_config
from models.ncsnpp import NCSNpp, ncsnpp_cifar_config, ncsnpp_deep_cifar_config
from models.unet import UNet, unet_digits_config, unet_mnist_config

K1 = np.array([1.0, 3.0, 3.0, 1.0])


# ------------------------------------------------------------------------------------------------
# FIR up/down-sampling.

def _upfirdn_numpy(x: np.ndarray, k2: np.ndarray, up: int, down: int, pad0: int, pad1: int):
  """Direct sum y[n] = sum_m x[m] K[n * down + (kh - 1) - pad0 - up * m] (true convolution of the
  zero-inserted, padded signal), per spatial axis, per channel; x is (H, W)."""
  h, w = x.shape
  kh = k2.shape[0]
  oh = (h * up + pad0 + pad1 - kh) // down + 1
  ow = (w * up + pad0 + pad1 - kh) // down + 1
  y = np.zeros((oh, ow))
  for a in range(oh):
    for b in range(ow):
      s = 0.0
      for i in range(h):
        for j in range(w):
          # position of x[i, j] in the padded up-sampled signal, relative to window start.
          u = up * i + pad0 - a * down
          v = up * j + pad0 - b * down
          if 0 <= u < kh and 0 <= v < kh:
            s += x[i, j] * k2[kh - 1 - u, kh - 1 - v]  # flipped kernel = convolution
      y[a, b] = s
  return y


def test_fir_matches_direct_numpy_sum():
  x = np.random.default_rng(0).normal(size=(2, 6, 5, 3))
  up = np.asarray(ud.upsample_2d(jnp.asarray(x, jnp.float32), K1, 2))
  down = np.asarray(ud.downsample_2d(jnp.asarray(x[:, :6, :4], jnp.float32), K1, 2))
  k_up = np.outer(K1, K1) / 64.0 * 4.0
  k_down = np.outer(K1, K1) / 64.0
  assert up.shape == (2, 12, 10, 3) and down.shape == (2, 3, 2, 3)
  for bi in range(2):
    for c in range(3):
      ref_up = _upfirdn_numpy(x[bi, :, :, c], k_up, 2, 1, 2, 1)
      ref_down = _upfirdn_numpy(x[bi, :6, :4, c], k_down, 1, 2, 1, 1)
      np.testing.assert_allclose(up[bi, :, :, c], ref_up, atol=1e-5)
      np.testing.assert_allclose(down[bi, :, :, c], ref_down, atol=1e-5)


def test_fir_is_bilinear_away_from_border():
  """[1,3,3,1] FIR = bilinear x2 upsampling and tent-filter x2 downsampling (half-pixel centres)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 2))
  up = ud.upsample_2d(x, K1, 2)
  ref = jax.image.resize(x, (1, 16, 16, 2), "linear")
  np.testing.assert_allclose(up[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5)
  down = ud.downsample_2d(x, K1, 2)
  ref = jax.image.resize(x, (1, 4, 4, 2), "linear", antialias=True)
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5)


def test_fir_constant_image_and_impulse_response():
  ones = jnp.ones((1, 8, 8, 1))
  up = np.asarray(ud.upsample_2d(ones, K1, 2))[0, :, :, 0]
  # Interior keeps the constant; the zero padding leaves 3/4 on the border rows/cols.
  np.testing.assert_allclose(up[1:-1, 1:-1], 1.0, atol=1e-6)
  np.testing.assert_allclose(up[0, 1:-1], 0.75, atol=1e-6)
  np.testing.assert_allclose(up[0, 0], 0.75**2, atol=1e-6)
  down = np.asarray(ud.downsample_2d(ones, K1, 2))[0, :, :, 0]
  np.testing.assert_allclose(down[1:-1, 1:-1], 1.0, atol=1e-6)
  np.testing.assert_allclose(down[0, 1:-1], 7 / 8, atol=1e-6)
  # Up then down: the interior of a constant image survives exactly.
  updown = np.asarray(ud.downsample_2d(ud.upsample_2d(ones, K1, 2), K1, 2))[0, :, :, 0]
  np.testing.assert_allclose(updown[1:-1, 1:-1], 1.0, atol=1e-6)
  np.testing.assert_allclose(updown[0, 1:-1], (3 * 0.75 + 3 + 1) / 8, atol=1e-6)
  # Impulse at (2, 3): upsampled response is outer(k, k) / 16 on rows 3..6, cols 5..8.
  delta = jnp.zeros((1, 6, 6, 1)).at[0, 2, 3, 0].set(1.0)
  resp = np.asarray(ud.upsample_2d(delta, K1, 2))[0, :, :, 0]
  expect = np.zeros((12, 12))
  expect[3:7, 5:9] = np.outer(K1, K1) / 16.0
  np.testing.assert_allclose(resp, expect, atol=1e-7)
  # Downsampled impulse at (4, 4): y[a] = sum_k k[k] x[2a + k - 1] puts 1/8 at a = 1, 3/8 at a = 2.
  delta = jnp.zeros((1, 8, 8, 1)).at[0, 4, 4, 0].set(1.0)
  resp = np.asarray(ud.downsample_2d(delta, K1, 2))[0, :, :, 0]
  expect = np.zeros((4, 4))
  expect[1:3, 1:3] = np.outer([1.0, 3.0], [1.0, 3.0]) / 64.0
  np.testing.assert_allclose(resp, expect, atol=1e-7)


def test_fused_fir_resampling_convs_reduce_to_fir_with_identity_kernel():
  """With a centred identity 3x3 kernel and zero bias, the StyleGAN2-style fused layers (FIR
  Downsample / Upsample with_conv, used by progressive 'residual' paths) equal plain FIR
  down/up-sampling: the conv geometry (padding, stride, alignment) is exact."""
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 8, 2))
  eye = jnp.zeros((3, 3, 2, 2)).at[1, 1].set(jnp.eye(2))
  for layer, ref in ((layers.Downsample(with_conv=True, fir=True), ud.downsample_2d),
                     (layers.Upsample(with_conv=True, fir=True), ud.upsample_2d)):
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)["params"]
    (name,) = params.keys()
    p = {name: {"kernel": eye, "bias": jnp.zeros((2,))}}
    np.testing.assert_allclose(layer.apply({"params": p}, x), ref(x, K1, 2), atol=1e-5)


def test_naive_resampling_roundtrip():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 6, 3))
  np.testing.assert_allclose(ud.naive_downsample_2d(ud.naive_upsample_2d(x)), x, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Networks (tiny widths). Every check compiles once: XLA compilation of a U-Net dominates the cost,
# so each test folds init, forward passes and comparisons into one jitted function, compiled with
# the backend optimizations off (4x faster to compile; the nets are tiny).

TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), init_scale=1.0)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def _build(cls, base, **kw):
  return cls.from_config(dict(base, **dict(TINY, **kw)))


def _inputs(shape, key=0):
  x = jax.random.normal(jax.random.PRNGKey(key), shape)
  t = jnp.linspace(0.2, 0.8, shape[0])
  return x, t


def _rel(a, b):
  """Per-example relative difference |a - b| / |a|."""
  a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
  return jnp.linalg.norm(a - b, axis=1) / jnp.linalg.norm(a, axis=1)


CASES = [
    ("ncsnpp_32x32x3", NCSNpp, ncsnpp_cifar_config(), (2, 32, 32, 3), {}),
    ("ncsnpp_skip_16x16x3", NCSNpp, ncsnpp_cifar_config(), (2, 16, 16, 3),
     dict(progressive="output_skip", progressive_input="input_skip")),
    ("ncsnpp_ddpm_residual_uncond_16", NCSNpp, ncsnpp_cifar_config(), (2, 16, 16, 3),
     dict(progressive="residual", resblock_type="ddpm", conditional=False)),
    ("ddpmpp_zero_init_32x32x3", DDPMpp, ddpmpp_cifar_config(), (2, 32, 32, 3),
     dict(init_scale=0.0)),
    ("unet_28x28x1", UNet, unet_mnist_config(), (2, 28, 28, 1), dict(nf=8)),
    ("unet_8x8x1", UNet, unet_digits_config(), (3, 8, 8, 1), dict(nf=8, attn_resolutions=(4,))),
]


@pytest.mark.parametrize("name,cls,base,shape,kw", CASES, ids=[c[0] for c in CASES])
def test_output_shape_and_conditioning(name, cls, base, shape, kw):
  """Output has the input's shape; a different noise level changes every example's output (the
  batch holds each image twice, with cond and cond + 0.3: GroupNorm and attention act per example)
  unless conditional=False, where the two halves must agree exactly."""
  model = _build(cls, base, **kw)
  x, t = _inputs(shape)
  y, _ = jit(model.init_with_output)(jax.random.PRNGKey(1), jnp.concatenate([x, x]),
                                     jnp.concatenate([t, t + 0.3]))
  y1, y2 = y[: shape[0]], y[shape[0]:]
  assert y1.shape == x.shape and y1.dtype == x.dtype
  assert bool(jnp.all(jnp.isfinite(y)))
  if kw.get("init_scale", 1.0) == 0.0:
    # score_sde's init_scale = 0: every residual branch ends in a ~0 conv (variance scale 1e-10),
    # so the initial net is ~0 and (almost) independent of cond.
    assert float(jnp.max(jnp.abs(y))) < 1e-3
  elif kw.get("conditional", True):
    rel = _rel(y1, y2)
    assert bool(jnp.all(rel > 1e-3)), rel
  else:
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


@pytest.mark.slow  # ~25 s of compiles on 2 cores
def test_dropout_only_in_train_mode():
  """Train mode: identical inputs get different dropout masks, a new key changes the output, the
  same key reproduces it. Eval mode: needs no dropout rng and is deterministic."""
  model = _build(DDPMpp, ddpmpp_cifar_config(), dropout=0.5)
  x, t = _inputs((1, 16, 16, 3))
  xx, tt = jnp.concatenate([x, x]), jnp.concatenate([t, t])

  @jit
  def run(dkey):
    params = model.init(jax.random.PRNGKey(1), xx, tt)["params"]
    ev = model.apply({"params": params}, xx, tt, train=False)  # no 'dropout' rng supplied
    tr = model.apply({"params": params}, xx, tt, train=True, rngs={"dropout": dkey})
    return ev, tr

  ev, tr1 = run(jax.random.PRNGKey(2))
  _, tr1b = run(jax.random.PRNGKey(2))
  _, tr2 = run(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(np.asarray(ev[0]), np.asarray(ev[1]))
  np.testing.assert_array_equal(np.asarray(tr1), np.asarray(tr1b))
  assert float(_rel(tr1[:1], tr1[1:])[0]) > 1e-2
  assert float(jnp.max(_rel(tr1, tr2))) > 1e-2
  assert float(jnp.max(_rel(ev, tr1))) > 1e-2


def test_jit_and_grad_through_score_fn():
  """The network behind models.get_model / models.utils.get_score_fn (VE, 'noise'): score equals
  -net(x, log sigma(t)) / sigma_t; gradients w.r.t. params and x are finite and non-zero; the
  Fourier frequencies get no gradient (fixed, as in score_sde)."""
  cfg = ml_collections.ConfigDict({"model": dict(ncsnpp_cifar_config(), **dict(TINY, nf=8))})
  model = models.get_model(cfg)
  assert isinstance(model, NCSNpp)
  sde = sde_lib.VESDE()
  score_fn = mutils.get_score_fn(sde, model, "noise")
  x, _ = _inputs((2, 8, 8, 3))
  t = jnp.array([0.1, 0.7])

  @jit
  def run(key):
    params = mutils.init_model(model, key, x.shape)
    score = score_fn(params, x, t)
    net = model.apply({"params": params}, x, jnp.log(sde.sigma(t)))
    loss = lambda p, x: jnp.mean(score_fn(p, x, t, jax.random.PRNGKey(3)) ** 2)
    return score, net, jax.grad(loss, argnums=(0, 1))(params, x)

  score, net, (gp, gx) = run(jax.random.PRNGKey(0))
  _, sigma = sde.marginal_coeffs(t)
  np.testing.assert_allclose(score, -net / sigma[:, None, None, None], rtol=1e-5, atol=1e-7)
  leaves = jax.tree_util.tree_leaves(gp)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.sum(g**2)) for g in leaves) > 0
  assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.sum(gx**2)) > 0
  assert float(jnp.max(jnp.abs(gp["GaussianFourierProjection_0"]["W"]))) == 0.0


def test_bfloat16_compute():
  """dtype='bfloat16': params stay float32, output float32 and within 5% of the float32 net
  (bf16 has an 8-bit mantissa, ~4e-3 relative error per op)."""
  cfg32 = dict(ddpmpp_cifar_config(), **dict(TINY, nf=8))
  m32 = DDPMpp.from_config(cfg32)
  m16 = DDPMpp.from_config(dict(cfg32, dtype="bfloat16"))
  x, t = _inputs((2, 8, 8, 3))
  p16 = jax.eval_shape(m16.init, jax.random.PRNGKey(1), x, t)["params"]
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(p16))

  @jit
  def run(key):
    y32, v = m32.init_with_output(key, x, t)
    return y32, m16.apply(v, x, t)

  y32, y16 = run(jax.random.PRNGKey(1))
  assert y16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y16)))
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert 0 < rel < 5e-2, rel


def test_config_errors_name_the_field():
  x, t = _inputs((1, 16, 16, 3))
  with pytest.raises(ValueError, match="model.progressive"):
    jax.eval_shape(_build(NCSNpp, ncsnpp_cifar_config(), progressive="bogus").init,
                   jax.random.PRNGKey(0), x, t)
  with pytest.raises(ValueError, match="model.dtype"):
    _build(NCSNpp, ncsnpp_cifar_config(), dtype="int8")
  x, t = _inputs((1, 28, 28, 1))
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(_build(UNet, unet_mnist_config(), ch_mult=(1, 2, 2, 2)).init,
                   jax.random.PRNGKey(0), x, t)


# ------------------------------------------------------------------------------------------------
# Parameter counts of the published CIFAR-10 models.

def _closed_form_count(cfg: dict, channels: int = 3, size: int = 32) -> int:
  """Parameter count of score_sde's ncsnpp written out block by block (GroupNorm scale+bias,
  conv/dense kernel+bias); supports progressive 'none' with progressive_input 'none'/'residual'."""
  assert cfg["progressive"] == "none" and cfg["progressive_input"] in ("none", "residual")
  nf, mult, nb = cfg["nf"], cfg["ch_mult"], cfg["num_res_blocks"]
  temb_ch = 4 * nf
  gn = lambda c: 2 * c
  conv = lambda k, i, o: k * k * i * o + o
  dense = lambda i, o: i * o + o

  def res(i, o, resample=False):
    return (gn(i) + conv(3, i, o) + dense(temb_ch, o) + gn(o) + conv(3, o, o)
            + (conv(1, i, o) if (i != o or resample) else 0))

  attn = lambda c: gn(c) + 4 * dense(c, c)
  if cfg["embedding_type"] == "fourier":
    n = nf + dense(2 * nf, temb_ch)  # fixed frequencies W (nf) + first dense
  else:
    n = dense(nf, temb_ch)
  n += dense(temb_ch, temb_ch)
  n += conv(3, channels, nf)
  hs, ch, res_px, pyr_ch = [nf], nf, size, channels
  for lvl, m in enumerate(mult):
    for _ in range(nb):
      n += res(ch, nf * m)
      ch = nf * m
      n += attn(ch) if res_px in cfg["attn_resolutions"] else 0
      hs.append(ch)
    if lvl != len(mult) - 1:
      n += res(ch, ch, resample=True)
      res_px //= 2
      if cfg["progressive_input"] == "residual":
        n += conv(3, pyr_ch, ch)
        pyr_ch = ch
      hs.append(ch)
  n += 2 * res(ch, ch) + attn(ch)
  for lvl in reversed(range(len(mult))):
    for _ in range(nb + 1):
      n += res(ch + hs.pop(), nf * mult[lvl])
      ch = nf * mult[lvl]
    n += attn(ch) if res_px in cfg["attn_resolutions"] else 0
    if lvl != 0:
      n += res(ch, ch, resample=True)
      res_px *= 2
  return n + gn(ch) + conv(3, ch, channels)


# Exact counts of score_sde's CIFAR-10 configurations (scalars in the 'params' collection: conv /
# dense kernels and biases, GroupNorm scale and bias, and the 128 fixed Fourier frequencies of
# NCSN++, which score_sde also stores as a parameter). They equal the closed-form count above and,
# rounded, the published model sizes: DDPM++ cont. ~62M (61.80M), NCSN++ cont. ~63M (62.76M),
# deep variants ~107M / ~108M (106.63M / 107.59M).
PUBLISHED = {
    "ddpmpp": (DDPMpp, ddpmpp_cifar_config, 61_804_419),
    "ddpmpp_deep": (DDPMpp, ddpmpp_deep_cifar_config, 106_632_579),
    "ncsnpp": (NCSNpp, ncsnpp_cifar_config, 62_758_915),
    "ncsnpp_deep": (NCSNpp, ncsnpp_deep_cifar_config, 107_587_075),
}


def count_params(model, shape=(1, 32, 32, 3)) -> int:
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros(shape), jnp.zeros(shape[:1])),
                          jax.random.PRNGKey(0))
  return sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_cifar10_parameter_counts(name):
  cls, cfg_fn, expected = PUBLISHED[name]
  n = count_params(cls.from_config(cfg_fn()))
  assert n == _closed_form_count(cfg_fn())
  assert n == expected
