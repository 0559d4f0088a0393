"""Noise-conditional classifier p_t(y | x_t) for class-guided sampling.

Song et al. 2021 ("Score-based generative modeling through SDEs", Sec. 5 and Appendix I.1): the
score of p_t(x | y) is grad log p_t(x) + grad_x log p_t(y | x), with p_t(y | x_t) a classifier
trained on forward-noised data x_t ~ p_0t(x_t | x_0) at t ~ U(eps, T) by cross-entropy. score_sde
used a Wide-ResNet with a time embedding on CIFAR-10; here a small residual conv net of
configurable width (``classifier.widths``, channels per resolution, halving in between) and depth
(``classifier.num_res_blocks`` per resolution), each block conditioned on a Gaussian Fourier
embedding of ``sde.noise_conditioning(t)`` (t for VP / sub-VP, log sigma for VE) as a per-channel
bias, as in the score networks (models/layers.py). The last feature map is flattened into the
linear output layer, not averaged as in a WRN: on 8x8 digits where a stroke lies matters, and a
global average of a few channels learns several times slower. The input is scaled by c_in(t) =
1 / sqrt(alpha_t^2 + sigma_t^2) (models.utils.input_scale) so VE inputs stay of unit scale.

``logits_fn(sde, model)`` gives ``(params, x, t) -> (B, n_classes)`` unnormalized log p_t(y | x_t):
pure, jit / vmap / grad-safe.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from models import layers
from models.utils import input_scale
from sde_lib import bcast

Array = jax.Array
LogitsFn = Callable[[object, Array, Array], Array]  # (params, x, t) -> (B, n_classes)
FOURIER_SCALE = 16.0  # std of the embedding frequencies (NCSN++'s value, Song et al. App. H.1)


class _TimeResBlock(nn.Module):
  """GroupNorm-swish-conv twice, time embedding added as a per-channel bias, residual (1x1
  projection when the width changes)."""
  features: int

  @nn.compact
  def __call__(self, h: Array, temb: Array) -> Array:
    out = layers.conv(self.features)(nn.swish(layers.group_norm(h.shape[-1])(h)))
    out = out + layers.dense(self.features)(nn.swish(temb))[:, None, None, :]
    out = layers.conv(self.features, init_scale=0.0)(
        nn.swish(layers.group_norm(self.features)(out)))
    skip = h if h.shape[-1] == self.features else layers.dense(self.features)(h)
    return skip + out


class NoiseConditionalClassifier(nn.Module):
  """(B, H, W, C) images and their noise conditioning (B,) -> (B, n_classes) logits."""
  n_classes: int
  widths: Sequence[int] = (32, 64)
  num_res_blocks: int = 1
  embedding_dim: int = 64

  @classmethod
  def from_config(cls, config, n_classes: int) -> "NoiseConditionalClassifier":
    c = config.classifier
    return cls(n_classes=int(n_classes), widths=tuple(int(w) for w in c.widths),
               num_res_blocks=int(c.num_res_blocks), embedding_dim=int(c.embedding_dim))

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    assert x.ndim == 4, f"x must be (B, H, W, C) images, got shape {x.shape}"
    cond = jnp.broadcast_to(jnp.asarray(cond, x.dtype), x.shape[:1])
    temb = layers.GaussianFourierProjection(self.embedding_dim // 2, FOURIER_SCALE)(cond)
    temb = layers.dense(self.embedding_dim)(temb)
    h = layers.conv(self.widths[0])(x)
    for level, width in enumerate(self.widths):
      if level:  # halve the resolution between levels (odd sizes round up)
        h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
      for _ in range(self.num_res_blocks):
        h = _TimeResBlock(width)(h, temb)
    h = nn.swish(layers.group_norm(h.shape[-1])(h))
    return layers.dense(self.n_classes)(h.reshape(h.shape[0], -1))


def logits_fn(sde, model: nn.Module) -> LogitsFn:
  """(params, x, t) -> logits of p_t(y | x_t); ``t`` scalar or (B,). The network sees
  c_in(t) x_t and ``sde.noise_conditioning(t)``."""

  def logits(params, x: Array, t: Array) -> Array:
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    return model.apply({"params": params}, bcast(input_scale(sde, t), x) * x,
                       sde.noise_conditioning(t))

  return logits


def init_params(model: nn.Module, key: Array, event_shape: Sequence[int]):
  """The 'params' of ``model`` for one (1, *event_shape) input."""
  x = jnp.zeros((1,) + tuple(event_shape), jnp.float32)
  return jax.jit(model.init)(key, x, jnp.zeros((1,), jnp.float32))["params"]


def cross_entropy_loss_fn(sde, logits: LogitsFn):
  """``loss_fn(params, (x0, y), key) -> (loss, metrics)``: mean cross-entropy -log p_t(y | x_t)
  (nats) with t ~ U(eps, T) and x_t = alpha_t x0 + sigma_t z (``sde.perturb``), the classifier
  objective of Song et al. 2021, App. I.1; metrics: the batch's accuracy."""

  def loss_fn(params, batch, key: Array):
    x0, y = batch
    t_key, z_key = jax.random.split(key)
    t = sde.uniform_sample_t(t_key, (x0.shape[0],))
    xt = sde.perturb(x0, t, jax.random.normal(z_key, x0.shape, x0.dtype))
    out = logits(params, xt, t)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
    return loss, {"accuracy": jnp.mean(jnp.argmax(out, -1) == y)}

  return loss_fn
