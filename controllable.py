"""Controllable generation (Song et al. 2021, "Score-based generative modeling through SDEs", §5
and Appendix I): class-conditional scores, imputation (inpainting) and colorization.

* Class guidance (§5, eq. 14; App. I.1): the score of p_t(x | y) is
  grad log p_t(x) + grad_x log p_t(y | x); ``class_conditional_score`` returns it, with a guidance
  scale s on the classifier term (s = 1: Bayes' rule, exact; s != 1: guidance), as an ordinary
  ``(x, t) -> score``, so every sampler and every c takes it unchanged. The classifier is a plain
  ``logits_fn(x, t) -> (B, n_classes)`` of unnormalized logits of p_t(y | x_t).
* Imputation (App. I.2): with the known part Omega(x) = y observed, each step of a fixed-step
  sampler is followed by replacing the known part of x_t by a forward-noised observation
  alpha_t y + sigma_t z (score_sde's ``get_pc_inpainter``); ``imputation_hook`` is that
  replacement as a sampler ``step_hook(x, t, key, i) -> x`` (samplers.py). It approximates
  sampling p(x_unknown | y): the unknown part is driven by the joint score with a noised y, not by
  the conditional score (tests/test_controllable.py measures the gap on a Gaussian).
* Colorization (App. I.3): imputation in an orthogonal basis of the colour channels whose first
  direction is gray, (1, 1, 1) / sqrt(3), and the other two colour directions; the gray coordinate
  is known (``colorization_hook``), so every output keeps the input's gray channel. Because the
  forward noise is isotropic, noising in the rotated basis is noising in the original one.

All functions are pure and jit / vmap-safe; randomness comes from explicit keys.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp


Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
LogitsFn = Callable[[Array, Array], Array]  # (x, t) -> (B, n_classes) unnormalized logits
StepHook = Callable[[Array, Array, Array, Array], Array]  # (x, t, key, i) -> x (samplers.StepHook)

CONDITIONS = ("none", "class", "inpaint", "colorize")  # sampling.condition
MASKS = ("bottom_half", "centre", "random:<fraction>")  # sampling.mask for inpainting


# -- class guidance --------------------------------------------------------------------------------
def classifier_log_prob(logits_fn: LogitsFn, x: Array, t: Array, label: Array) -> Array:
  """log p_t(y | x_t) per example, shape (B,): the log-softmax of the logits at ``label`` (an int
  or per-example (B,) ints)."""
  logp = jax.nn.log_softmax(logits_fn(x, t), axis=-1)
  label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), logp.shape[:1])
  return jnp.take_along_axis(logp, label[:, None], axis=-1)[:, 0]


def class_conditional_score(score_fn: ScoreFn, logits_fn: LogitsFn, label: Array | int,
                            scale: Array | float = 1.0) -> ScoreFn:
  """s(x, t) + scale * grad_x log p_t(y | x): the score of p_t(x | y) (Song et al. 2021, eq. 14
  and App. I.1) for scale = 1, classifier guidance for scale != 1. The gradient is taken of the
  batch sum, which is per example because each example's logits depend on its own x only."""
  scale = jnp.asarray(scale)

  def score(x: Array, t: Array) -> Array:
    grad = jax.grad(lambda v: jnp.sum(classifier_log_prob(logits_fn, v, t, label)))(x)
    return score_fn(x, t) + scale.astype(x.dtype) * grad

  return score


# -- imputation and colorization -------------------------------------------------------------------
def replace_known(x: Array, known: Array, mask: Array, basis: Optional[Array] = None) -> Array:
  """x with its known part (``mask`` true) replaced by ``known``; with an orthogonal ``basis``
  (C, C) the mask applies to the coordinates x @ basis of the last (channel) axis. Without a basis
  the known entries are ``known`` bit for bit."""
  mask = jnp.asarray(mask).astype(bool)
  if basis is None:
    return jnp.where(mask, known, x)
  mixed = jnp.where(mask, known @ basis, x @ basis)
  return mixed @ basis.T


def imputation_hook(sde, observation: Array, mask: Array,
                    basis: Optional[Array] = None) -> StepHook:
  """The replacement step of Song et al. App. I.2 as a sampler ``step_hook``: the known part of x_t
  becomes alpha_t y + sigma_t z, z ~ N(0, I) from the hook's key (fresh each step), at the time t
  the sampler has just reached (t = 0 after a final denoising step: y itself). ``observation`` y
  and ``mask`` broadcast against x; ``basis``: as ``replace_known`` (colorization)."""
  observation = jnp.asarray(observation)

  def hook(x: Array, t: Array, key: Array, i: Array) -> Array:
    z = jax.random.normal(key, x.shape, x.dtype)
    y = jnp.broadcast_to(observation, x.shape).astype(x.dtype)
    return replace_known(x, sde.perturb(y, t, z), mask, basis)

  return hook


def colorization_basis(dtype=jnp.float32) -> Array:
  """The orthogonal (3, 3) matrix whose columns are gray (1, 1, 1)/sqrt 3 and the colour
  directions (-2, 1, 1)/sqrt 6 and (0, 1, -1)/sqrt 2 (Song et al. App. I.3): x @ M are the
  decoupled coordinates, the first being sqrt(3) times the gray value (channel mean)."""
  m = [[1 / math.sqrt(3), -2 / math.sqrt(6), 0.0],
       [1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)],
       [1 / math.sqrt(3), 1 / math.sqrt(6), -1 / math.sqrt(2)]]
  return jnp.asarray(m, dtype)


def gray(x: Array) -> Array:
  """The gray channel (mean over the last, colour, axis), keeping the axis: shape (..., 1)."""
  return jnp.mean(x, axis=-1, keepdims=True)


def gray_mask(num_channels: int = 3) -> Array:
  """The known coordinate of colorization in ``colorization_basis`` coordinates: gray only."""
  if num_channels != 3:
    raise ValueError(f"data.num_channels must be 3 for colorization (RGB), got {num_channels}")
  return jnp.asarray([True, False, False])


def colorization_hook(sde, image: Array) -> StepHook:
  """Colorization (Song et al. App. I.3): imputation of the two colour coordinates given the gray
  one of ``image`` (any colour image with the wanted gray channel, (..., 3)), in
  ``colorization_basis``."""
  basis = colorization_basis(jnp.asarray(image).dtype)
  return imputation_hook(sde, image, gray_mask(jnp.asarray(image).shape[-1]), basis)


# -- masks for inpainting --------------------------------------------------------------------------
def parse_mask(spec: str) -> tuple[str, float]:
  """('bottom_half' | 'centre' | 'random', fraction) of a ``sampling.mask`` value; ValueError
  naming the field otherwise."""
  if spec in ("bottom_half", "centre"):
    return spec, 0.0
  if spec.startswith("random:"):
    try:
      frac = float(spec.split(":", 1)[1])
    except ValueError:
      frac = -1.0
    if 0.0 < frac < 1.0:
      return "random", frac
  raise ValueError(f"sampling.mask must be one of {MASKS} (fraction in (0, 1): the share of "
                   f"pixels kept), got {spec!r}")


def inpainting_mask(spec: str, image_shape: tuple[int, ...], key: Array) -> Array:
  """Boolean mask of the KNOWN pixels of one (H, W, C) image, broadcast over channels:
  'bottom_half' hides the bottom half (the top is known), 'centre' hides the central
  (H/2, W/2) square, 'random:f' keeps each pixel with probability f (from ``key``)."""
  kind, frac = parse_mask(spec)
  h, w = image_shape[0], image_shape[1]
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  if kind == "bottom_half":
    known = jnp.broadcast_to(rows < h // 2, (h, w))
  elif kind == "centre":
    inside = ((rows >= h // 4) & (rows < h // 4 + h // 2)
              & (cols >= w // 4) & (cols < w // 4 + w // 2))
    known = ~inside
  else:
    known = jax.random.uniform(key, (h, w)) < frac
  return jnp.broadcast_to(known[:, :, None], tuple(image_shape))


def known_fraction(mask: Array) -> Array:
  """Share of known entries per example, shape (B,) (for reports)."""
  m = jnp.asarray(mask, jnp.float32)
  return jnp.mean(m.reshape(m.shape[0], -1), axis=-1)

