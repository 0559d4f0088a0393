"""Building blocks of the image score networks (DDPM++ / NCSN++ / small U-Net), Flax linen.

Architecture of Song et al. 2021 ("Score-Based Generative Modeling through SDEs", Appendix H.1):
GroupNorm + swish pre-activation residual blocks (Ho et al. 2020) with the time embedding added as a
per-channel bias, optional BigGAN-style resampling inside the block, skip rescaling by 1/sqrt(2),
zero-initialised ("init_scale = 0") last layers, single-head self-attention, Gaussian Fourier or
sinusoidal noise-level embeddings. No BatchNorm, so no mutable collections.

Every module takes a ``dtype`` (compute dtype, e.g. ``jnp.bfloat16``); parameters stay float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import up_or_down_sampling as ud

Array = jax.Array
Dtype = Any


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """DDPM initializer: variance scaling, fan_avg, uniform; scale 0 becomes 1e-10 (Ho et al.
  2020)."""
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def conv(features: int, kernel: int = 3, init_scale: float = 1.0, stride: int = 1,
         dtype: Dtype = jnp.float32, name: Optional[str] = None) -> nn.Conv:
  """A 'SAME'-padded k x k convolution with bias (score_sde's conv3x3 / conv1x1)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 kernel_init=default_init(init_scale), dtype=dtype, name=name)


def dense(features: int, init_scale: float = 1.0, dtype: Dtype = jnp.float32,
          name: Optional[str] = None) -> nn.Dense:
  """Dense layer (also the 1x1 'NIN' projection on the channel axis) with DDPM init."""
  return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype, name=name)


def num_groups(channels: int) -> int:
  """GroupNorm groups: min(C // 4, 32) as in score_sde, lowered to a divisor of C (>= 1)."""
  g = max(1, min(channels // 4, 32))
  while channels % g:
    g -= 1
  return g


def group_norm(channels: int, dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups(channels), dtype=dtype)


def sinusoidal_embedding(t: Array, dim: int, max_positions: float = 10000.0) -> Array:
  """Transformer positional embedding of a (B,) array (Vaswani et al. 2017; DDPM, Ho et al. 2020):
  [sin(t w_i), cos(t w_i)] with w_i = max_positions^(-i / (dim/2 - 1))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_positions) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W c), cos(2 pi W c)], W ~ N(0, scale^2) fixed
  (Tancik et al. 2020; Song et al. 2021, Appendix H.1, scale 16 for NCSN++).

  W is stored as a parameter (as in score_sde, so it is counted and checkpointed) but receives no
  gradient unless ``trainable``."""
  embedding_size: int = 128
  scale: float = 16.0
  trainable: bool = False

  @nn.compact
  def __call__(self, c: Array) -> Array:
    w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    if not self.trainable:
      w = jax.lax.stop_gradient(w)
    proj = c.astype(jnp.float32)[:, None] * w[None, :] * (2.0 * jnp.pi)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def _skip(x: Array, h: Array, skip_rescale: bool) -> Array:
  """Residual sum, divided by sqrt(2) when skip_rescale (Song et al. 2021, App. H.1)."""
  return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a residual connection (DDPM, Ho et al. 2020).

  Init as score_sde's ``AttnBlockpp``: its NIN projections default to init_scale 0.1 (q, k, v);
  the output projection uses ``init_scale`` (0 -> 1e-10)."""
  skip_rescale: bool = True
  init_scale: float = 0.0
  qkv_init_scale: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = group_norm(c, self.dtype)(x)
    q, k, v = (dense(c, init_scale=self.qkv_init_scale, dtype=self.dtype)(h).reshape(b, hh * ww, c)
               for _ in range(3))  # Dense_0, Dense_1, Dense_2
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, hh, ww, c)
    h = dense(c, init_scale=self.init_scale, dtype=self.dtype)(h)
    return _skip(x, h, self.skip_rescale)


def _resample(x: Array, up: bool, down: bool, fir: bool, fir_kernel: Sequence[int]) -> Array:
  """x2 up or down resampling: FIR (upfirdn2d) or naive (nearest / average pooling)."""
  if up:
    return ud.upsample_2d(x, fir_kernel) if fir else ud.naive_upsample_2d(x)
  if down:
    return ud.downsample_2d(x, fir_kernel) if fir else ud.naive_downsample_2d(x)
  return x


class ResnetBlock(nn.Module):
  """Pre-activation residual block GN-swish-conv, + Dense(swish(temb)), GN-swish-dropout-conv.

  Without resampling this is the DDPM++ block (score_sde ``ResnetBlockDDPMpp``, 1x1 shortcut when
  the width changes); with ``up``/``down`` it is the BigGAN-style block (Brock et al. 2019;
  score_sde ``ResnetBlockBigGANpp``) that resamples both branches and always projects the
  shortcut."""
  out_ch: Optional[int] = None
  up: bool = False
  down: bool = False
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array], train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = nn.swish(group_norm(c, self.dtype)(x))
    h = _resample(h, self.up, self.down, self.fir, self.fir_kernel)
    x = _resample(x, self.up, self.down, self.fir, self.fir_kernel)
    h = conv(out_ch, 3, dtype=self.dtype)(h)
    if temb is not None:
      h = h + dense(out_ch, dtype=self.dtype)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(group_norm(out_ch, self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(out_ch, 3, init_scale=self.init_scale, dtype=self.dtype)(h)
    if c != out_ch or self.up or self.down:
      x = conv(out_ch, 1, dtype=self.dtype)(x)
    return _skip(x, h, self.skip_rescale)


class _Resample(nn.Module):
  """Fields shared by Upsample and Downsample (out_ch defaults to the input width)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32


class Upsample(_Resample):
  """x2 upsampling (score_sde ``layerspp.Upsample``). Without FIR: nearest neighbour, optionally
  followed by a 3x3 conv. With FIR: FIR upsampling, or with a conv the fused up-conv of StyleGAN2
  (Karras et al. 2020): stride-2 transposed 3x3 conv, then the FIR filter (gain 4, padding
  (1, 1))."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.with_conv:
      return _resample(x, True, False, self.fir, self.fir_kernel)
    if not self.fir:
      return conv(out_ch, 3, dtype=self.dtype)(ud.naive_upsample_2d(x))
    h = nn.ConvTranspose(out_ch, (3, 3), strides=(2, 2), padding="VALID",
                         kernel_init=default_init(), dtype=self.dtype)(x)  # (2H + 1, 2W + 1)
    k = ud.make_kernel(self.fir_kernel) * 4.0
    p = k.shape[0] - 2 - (3 - 1)
    return ud.upfirdn2d(h, k, pad=((p + 1) // 2 + 1, p // 2 + 1))


class Downsample(_Resample):
  """x2 downsampling (score_sde ``layerspp.Downsample``). Without FIR: stride-2 3x3 conv or 2x2
  average pooling. With FIR: FIR downsampling, or with a conv the fused down-conv of StyleGAN2:
  FIR blur (padding (2, 2)), then a stride-2 'VALID' 3x3 conv."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.with_conv:
      return _resample(x, False, True, self.fir, self.fir_kernel)
    if not self.fir:
      return conv(out_ch, 3, stride=2, dtype=self.dtype)(x)
    k = ud.make_kernel(self.fir_kernel)
    p = k.shape[0] - 2 + (3 - 1)
    h = ud.upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))  # (H + 1, W + 1)
    return nn.Conv(out_ch, (3, 3), strides=(2, 2), padding="VALID", kernel_init=default_init(),
                   dtype=self.dtype)(h)


class Combine(nn.Module):
  """Merges the input pyramid into the features: 1x1 conv of x to y's width, then sum or concat
  (NCSN++ progressive input, Song et al. 2021, App. H.1)."""
  method: str = "sum"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    h = conv(y.shape[-1], 1, dtype=self.dtype)(x)
    if self.method == "sum":
      return h + y
    if self.method == "cat":
      return jnp.concatenate([h, y], axis=-1)
    raise ValueError(f"model.progressive_combine must be 'sum' or 'cat', got {self.method!r}")
