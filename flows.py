"""Normalizing flows on distrax bijectors: the auxiliary prior nu_phi of Franzese et al. ("How much is
enough? A study on diffusion times", Sec. 3.1 / Sec. 4, "Glow [15] ... for CIFAR10") and the
conditional flow of variational dequantization (Song et al. 2021b, "Maximum likelihood training of
score-based diffusion models", Sec. 6; Ho et al. 2019, Flow++).

A flow is a bijection f: x -> z (data -> latent, the *normalizing* direction) with a base density
p_Z, so that by the change of variables (Dinh et al. 2017, "Density estimation using Real NVP",
eq. 3; Kingma & Dhariwal 2018, "Glow", eq. 2-3)

    log p_X(x) = log p_Z(f(x)) + log |det df/dx|,          x = f^{-1}(z), z ~ p_Z  (sampling).

Two models, both flax modules whose layers build distrax bijectors from their parameters:

* :class:`CouplingFlow` for vectors ``(B, D)`` (toy data): per layer an optional actnorm and a masked
  coupling (alternating masks) whose elementwise transformer is affine (Real NVP, eq. 6-9; log-scale
  soft-clamped with tanh, or scale = softplus bounded below) or a rational-quadratic spline (Durkan
  et al. 2019, "Neural spline flows"; also a learned monotone map when D = 1) with an MLP conditioner.
* :class:`Glow` for images ``(B, H, W, C)`` (NHWC): multi-scale levels of squeeze, K steps of
  [actnorm, invertible 1x1 convolution (LU-decomposed or plain), affine coupling with a
  convolutional conditioner] and a factor-out split (Glow Sec. 3 and Fig. 2; Real NVP Sec. 3.6).

Every coupling conditioner's last layer is zero-initialised, so each coupling starts as the identity.
Every conditioner accepts an optional ``context`` array (``(B, Cc)`` or, for Glow, an image
``(B, H, W, Cc)`` that is squeezed along with the levels) for conditional flows q(u | x).

Variables: ``model.init`` returns ``{'params': ...}`` plus, for the LU 1x1 convolution, the constant
collection ``'constants'`` (permutation and signs of the LU factorisation). Only ``'params'`` is
trained. The pure functions :func:`init_variables`, :func:`log_prob`, :func:`sample`,
:func:`forward` and :func:`inverse` take ``(model, variables, ...)`` and are jit-able (the module is a
hashable static value). :func:`flow_spec` / :func:`make_flow` convert a model to a JSON-able dict
and back.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

import parallel  # noqa: F401  (process-wide XLA options and compilation cache: parallel.py)


def _import_distrax():
  """distrax imports tensorflow_probability, which, when TensorFlow is already imported (a TFDS
  pipeline, a notebook), force-loads its Keras layers and then fails without the tf-keras package
  (whose install pulls a second, full TensorFlow). distrax uses only TFP's JAX substrate, which
  needs neither: TensorFlow is hidden from that check for the import (tests/test_flows.py)."""
  if "distrax" in sys.modules:
    return sys.modules["distrax"]
  tf = sys.modules.pop("tensorflow", None)
  try:
    import distrax as module
  finally:
    if tf is not None:
      sys.modules["tensorflow"] = tf
  return module


distrax = _import_distrax()
Array = jax.Array
Variables = Any  # flax variable dict {'params': ..., 'constants': ...}

SCALE_FNS = ("tanh", "softplus")
TRANSFORMERS = ("affine", "spline")
BASES = ("standard", "learned")
_MIN_SCALE = 1e-3


# ---------------------------------------------------------------------------------------------------
# Elementwise transformers (inner bijectors of the couplings)
# ---------------------------------------------------------------------------------------------------

def log_scale_from_raw(raw: Array, scale_fn: str = "tanh", bound: float = 3.0) -> Array:
  """Stabilised log-scale of an affine coupling; 0 at raw = 0 (identity at init).

  'tanh': log s = bound * tanh(raw / bound), |log s| < bound (soft clamp, as in Real NVP's tanh
  scale). 'softplus': s = min_scale + softplus(raw + c) with softplus(c) = 1 - min_scale, so s is
  bounded below (no division blow-up in the inverse) and grows only linearly.
  """
  if scale_fn == "tanh":
    return bound * jnp.tanh(raw / bound)
  if scale_fn == "softplus":
    c = math.log(math.expm1(1.0 - _MIN_SCALE))
    return jnp.log(_MIN_SCALE + jax.nn.softplus(raw + c))
  raise ValueError(f"flow scale must be one of {SCALE_FNS}, got {scale_fn!r}")


def affine_transformer(params: Array, scale_fn: str, bound: float) -> distrax.Bijector:
  """y = x exp(log s) + shift elementwise; ``params[..., 0]`` shift, ``params[..., 1]`` raw scale."""
  return distrax.ScalarAffine(shift=params[..., 0],
                              log_scale=log_scale_from_raw(params[..., 1], scale_fn, bound))


def spline_transformer(params: Array, bound: float) -> distrax.Bijector:
  """Rational-quadratic spline on [-bound, bound], identity outside (Durkan et al. 2019, Sec. 3.1);
  ``params[..., :]`` of length 3 * num_bins + 1; all-zero parameters give the identity."""
  return distrax.RationalQuadraticSpline(params, range_min=-bound, range_max=bound,
                                         boundary_slopes="identity")


def _num_transformer_params(transformer: str, num_bins: int) -> int:
  if transformer == "affine":
    return 2
  if transformer == "spline":
    return 3 * num_bins + 1
  raise ValueError(f"flow transformer must be one of {TRANSFORMERS}, got {transformer!r}")


# ---------------------------------------------------------------------------------------------------
# Squeeze (space-to-depth) and the invertible 1x1 convolution
# ---------------------------------------------------------------------------------------------------

def squeeze(x: Array) -> Array:
  """(..., H, W, C) -> (..., H/2, W/2, 4C): each 2x2 patch becomes channels (Real NVP Sec. 3.6)."""
  *lead, h, w, c = x.shape
  x = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
  x = jnp.swapaxes(x, -4, -3)  # (..., H/2, W/2, 2, 2, C)
  return x.reshape(*lead, h // 2, w // 2, 4 * c)


def unsqueeze(x: Array) -> Array:
  """Inverse of :func:`squeeze`: (..., H, W, 4C) -> (..., 2H, 2W, C)."""
  *lead, h, w, c4 = x.shape
  c = c4 // 4
  x = x.reshape(*lead, h, w, 2, 2, c)
  x = jnp.swapaxes(x, -4, -3)  # (..., H, 2, W, 2, C)
  return x.reshape(*lead, 2 * h, 2 * w, c)


class NormalCDF(distrax.Bijector):
  """u = Phi(s), the standard normal CDF, elementwise: (-inf, inf) -> (0, 1);
  log|du/ds| = log N(s; 0, 1). With s ~ N(0, 1), u ~ U(0, 1) exactly."""

  def __init__(self):
    super().__init__(event_ndims_in=0)

  def forward_and_log_det(self, s: Array) -> tuple[Array, Array]:
    return jax.scipy.special.ndtr(s), jax.scipy.stats.norm.logpdf(s)

  def inverse_and_log_det(self, u: Array) -> tuple[Array, Array]:
    s = jax.scipy.special.ndtri(u)
    return s, -jax.scipy.stats.norm.logpdf(s)


class ChannelMix(distrax.Bijector):
  """Invertible 1x1 convolution y[..., j] = sum_i x[..., i] W[i, j] on (..., H, W, C) events with
  log|det J| = H W log|det W| (Glow, Sec. 3.2, Table 1). ``weight_inv`` and ``log_abs_det`` are given
  by the caller (triangular solves / sum log|s| for the LU form, inv / slogdet for the plain one)."""

  def __init__(self, weight: Array, weight_inv: Array, log_abs_det: Array):
    super().__init__(event_ndims_in=3, is_constant_jacobian=True)
    self._w, self._w_inv, self._log_abs_det = weight, weight_inv, log_abs_det

  def _logdet(self, x: Array) -> Array:
    h, w = x.shape[-3], x.shape[-2]
    return jnp.broadcast_to(h * w * self._log_abs_det, x.shape[:-3])

  def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
    return jnp.einsum("...c,cd->...d", x, self._w), self._logdet(x)

  def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
    return jnp.einsum("...c,cd->...d", y, self._w_inv), -self._logdet(y)


# ---------------------------------------------------------------------------------------------------
# Layers: each module returns the distrax bijector of its data -> latent map
# ---------------------------------------------------------------------------------------------------

class ActNorm(nn.Module):
  """Per-channel affine y = x exp(log s) + b (Glow, Sec. 3.1). With ``data_init`` and a data-side
  input ``h`` at initialisation, b and log s are set so that y has zero mean and unit variance per
  channel on that batch; otherwise the layer starts at the identity. ``event_ndims``: 1 for vectors,
  3 for images."""
  features: int
  event_ndims: int
  data_init: bool = True

  @nn.compact
  def __call__(self, h: Optional[Array] = None) -> distrax.Bijector:
    use_data = self.data_init and h is not None
    axes = None if h is None else tuple(range(h.ndim - 1))

    def init_log_scale(_):
      if not use_data:
        return jnp.zeros((self.features,))
      return -jnp.log(jnp.std(h, axis=axes) + 1e-6)

    log_scale = self.param("log_scale", init_log_scale)

    def init_shift(_):
      if not use_data:
        return jnp.zeros((self.features,))
      return -jnp.mean(h, axis=axes) * jnp.exp(log_scale)

    shift = self.param("shift", init_shift)
    return distrax.Block(distrax.ScalarAffine(shift=shift, log_scale=log_scale), self.event_ndims)


class Invertible1x1Conv(nn.Module):
  """Invertible 1x1 convolution (Glow, Sec. 3.2), initialised as a random rotation. ``lu=True``:
  W = P L (U + diag(sign(s) exp(log s))) with P and sign(s) constants (collection 'constants'),
  L unit lower and U strictly upper triangular, log|det W| = sum log s (O(C)); ``lu=False``: a free
  W with slogdet and an explicit inverse."""
  features: int
  lu: bool = True

  @nn.compact
  def __call__(self, h: Optional[Array] = None) -> distrax.Bijector:
    del h
    c = self.features
    if not self.lu:
      w = self.param("kernel", nn.initializers.orthogonal(), (c, c))
      return ChannelMix(w, jnp.linalg.inv(w), jnp.linalg.slogdet(w)[1])
    # Initial W0 = P L U, a random rotation. flax also evaluates initialisers abstractly (shape
    # checks) when the variables exist, so outside initialisation they see a placeholder.
    first = self.is_initializing() and not self.has_variable("constants", "perm")
    rng = self.make_rng("params") if first else None

    def lu0():
      w0 = nn.initializers.orthogonal()(rng, (c, c)) if rng is not None else jnp.eye(c)
      return jax.scipy.linalg.lu(w0)

    perm = self.variable("constants", "perm", lambda: lu0()[0]).value
    sign_s = self.variable("constants", "sign_s", lambda: jnp.sign(jnp.diag(lu0()[2]))).value
    lower = self.param("lower", lambda _: jnp.tril(lu0()[1], -1))
    upper = self.param("upper", lambda _: jnp.triu(lu0()[2], 1))
    log_s = self.param("log_s", lambda _: jnp.log(jnp.abs(jnp.diag(lu0()[2]))))
    eye = jnp.eye(c, dtype=lower.dtype)
    l_mat = jnp.tril(lower, -1) + eye
    u_mat = jnp.triu(upper, 1) + jnp.diag(sign_s * jnp.exp(log_s))
    w = perm @ l_mat @ u_mat
    # W^{-1} = U^{-1} L^{-1} P^T by two triangular solves (no general inverse).
    l_inv_pt = solve_triangular(l_mat, perm.T, lower=True, unit_diagonal=True)
    w_inv = solve_triangular(u_mat, l_inv_pt, lower=False)
    return ChannelMix(w, w_inv, jnp.sum(log_s))


class MLPConditioner(nn.Module):
  """MLP from the masked input (B, D) and an optional context (B, Cc) to transformer parameters
  (B, D, P); the last layer is zero-initialised (the coupling starts at the identity)."""
  event_dim: int
  num_params: int
  hidden: Sequence[int] = (64, 64)

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    h = x if context is None else jnp.concatenate([x, _broadcast_batch(context, x)], axis=-1)
    for width in self.hidden:
      h = nn.gelu(nn.Dense(width)(h))
    out = nn.Dense(self.event_dim * self.num_params, kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros)(h)
    return out.reshape(*x.shape[:-1], self.event_dim, self.num_params)


class ConvConditioner(nn.Module):
  """Glow's coupling network (Sec. 3.3): conv 3x3 - ReLU - conv 1x1 - ReLU - zero-initialised
  conv 3x3, on the unchanged channels concatenated with an optional context image; returns
  (B, H, W, out_channels, 2) affine parameters."""
  out_channels: int
  hidden: int = 64

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    h = x if context is None else jnp.concatenate([x, context], axis=-1)
    h = nn.relu(nn.Conv(self.hidden, (3, 3), padding="SAME")(h))
    h = nn.relu(nn.Conv(self.hidden, (1, 1))(h))
    out = nn.Conv(2 * self.out_channels, (3, 3), padding="SAME",
                  kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)(h)
    return out.reshape(*out.shape[:-1], self.out_channels, 2)


class MaskedCouplingLayer(nn.Module):
  """Coupling y = m x + (1 - m) tau(x; g(m x, context)) on vectors (Real NVP, eq. 9), as a
  ``distrax.MaskedCoupling`` with an :class:`MLPConditioner`; ``mask`` True = unchanged."""
  mask: tuple[bool, ...]
  hidden: Sequence[int] = (64, 64)
  transformer: str = "affine"
  scale: str = "tanh"
  scale_bound: float = 3.0
  num_bins: int = 8
  spline_range: float = 5.0

  def setup(self):
    self.conditioner = MLPConditioner(len(self.mask), _num_transformer_params(self.transformer,
                                                                              self.num_bins),
                                      tuple(self.hidden))

  def __call__(self, h: Optional[Array] = None, context: Optional[Array] = None) -> distrax.Bijector:
    del h

    def inner(params):
      if self.transformer == "affine":
        return affine_transformer(params, self.scale, self.scale_bound)
      return spline_transformer(params, self.spline_range)

    return distrax.MaskedCoupling(mask=jnp.asarray(self.mask), event_ndims=1,
                                  conditioner=lambda xm: self.conditioner(xm, context),
                                  bijector=inner)


class SplitCouplingLayer(nn.Module):
  """Glow's affine coupling on (B, H, W, C) (Sec. 3.3): the first C//2 channels (the last ones when
  ``swap``) condition an affine map of the others, as a ``distrax.SplitCoupling``."""
  features: int
  hidden: int = 64
  swap: bool = False
  scale: str = "tanh"
  scale_bound: float = 3.0

  def setup(self):
    split = self.features // 2
    self.conditioner = ConvConditioner(split if self.swap else self.features - split, self.hidden)

  def __call__(self, h: Optional[Array] = None, context: Optional[Array] = None) -> distrax.Bijector:
    del h
    return distrax.SplitCoupling(
        split_index=self.features // 2, event_ndims=3, swap=self.swap,
        conditioner=lambda x1: self.conditioner(x1, context),
        bijector=lambda p: affine_transformer(p, self.scale, self.scale_bound))


# ---------------------------------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------------------------------

def _broadcast_batch(context: Array, x: Array) -> Array:
  """Broadcasts a per-example context (B, Cc) against x's leading axes."""
  return jnp.broadcast_to(context, x.shape[:-1] + context.shape[-1:])


class _FlowMethods:
  """Base density, log_prob and sampling shared by the flow modules (which define ``event_shape``,
  ``base``, ``forward`` and ``inverse``)."""

  def _setup_base(self) -> None:
    """Creates the learned base's parameters (call from ``setup``)."""
    if self.base not in BASES:
      raise ValueError(f"flow base must be one of {BASES}, got {self.base!r}")
    if self.base == "learned":
      shape = tuple(self.event_shape)
      self.base_loc = self.param("base_loc", nn.initializers.zeros, shape)
      self.base_log_scale = self.param("base_log_scale", nn.initializers.zeros, shape)

  def _base(self) -> distrax.Distribution:
    """p_Z: N(0, I), or N(m, diag(exp(2 log s))) with learned m, log s (base='learned')."""
    shape = tuple(self.event_shape)
    if self.base == "learned":
      loc, scale = self.base_loc, jnp.exp(self.base_log_scale)
    else:
      loc, scale = jnp.zeros(shape), jnp.ones(shape)
    return distrax.Independent(distrax.Normal(loc, scale), len(shape))

  def log_prob(self, x: Array, context: Optional[Array] = None) -> Array:
    """log p_X(x) = log p_Z(f(x)) + log|det df/dx| per example, shape (B,)."""
    z, logdet = self.forward(x, context)
    return self._base().log_prob(z) + logdet

  def sample(self, key: Array, n: int, context: Optional[Array] = None) -> Array:
    """n samples x = f^{-1}(z), z ~ p_Z, shape (n, *event_shape)."""
    return self.sample_and_log_prob(key, n, context)[0]

  def sample_and_log_prob(self, key: Array, n: int,
                          context: Optional[Array] = None) -> tuple[Array, Array]:
    """(x, log p_X(x)) in one pass: x = f^{-1}(z), log p_X(x) = log p_Z(z) - log|det dx/dz|."""
    base = self._base()
    z = base.sample(seed=key, sample_shape=(n,))
    x, logdet = self.inverse(z, context)
    return x, base.log_prob(z) - logdet


class CouplingFlow(_FlowMethods, nn.Module):
  """Coupling flow for vectors (B, D): ``num_layers`` x [ActNorm (optional), masked coupling], masks
  alternating between even and odd coordinates (all coordinates transformed when D = 1, which
  gives a learned elementwise map). ``transformer`` 'affine' (Real NVP) or 'spline' (RQ-NSF)."""
  event_dim: int
  num_layers: int = 6
  hidden: Sequence[int] = (64, 64)
  transformer: str = "affine"
  scale: str = "tanh"
  scale_bound: float = 3.0
  num_bins: int = 8
  spline_range: float = 5.0
  actnorm: bool = True
  data_init: bool = True
  base: str = "standard"

  @property
  def event_shape(self) -> tuple[int, ...]:
    return (self.event_dim,)

  def setup(self):
    self._setup_base()
    _num_transformer_params(self.transformer, self.num_bins)
    log_scale_from_raw(jnp.zeros(()), self.scale, self.scale_bound)
    d = self.event_dim
    layers = []
    for i in range(self.num_layers):
      if self.actnorm:
        layers.append(ActNorm(d, 1, self.data_init))
      mask = tuple(bool((j + i) % 2) for j in range(d)) if d > 1 else (False,)
      layers.append(MaskedCouplingLayer(mask, tuple(self.hidden), self.transformer, self.scale,
                                        self.scale_bound, self.num_bins, self.spline_range))
    self.layers = layers

  def forward(self, x: Array, context: Optional[Array] = None) -> tuple[Array, Array]:
    """z = f(x) (data -> latent) and log|det df/dx| per example."""
    logdet = jnp.zeros(x.shape[:-1], x.dtype)
    for layer in self.layers:
      x, ld = _call_layer(layer, x, context).forward_and_log_det(x)
      logdet = logdet + ld
    return x, logdet

  def inverse(self, z: Array, context: Optional[Array] = None) -> tuple[Array, Array]:
    """x = f^{-1}(z) (latent -> data) and log|det df^{-1}/dz| per example."""
    logdet = jnp.zeros(z.shape[:-1], z.dtype)
    for layer in reversed(self.layers):
      z, ld = _call_layer(layer, None, context).inverse_and_log_det(z)
      logdet = logdet + ld
    return z, logdet

  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    return self.log_prob(x, context)


def _call_layer(layer: nn.Module, h: Optional[Array], context: Optional[Array]) -> distrax.Bijector:
  if isinstance(layer, (ActNorm, Invertible1x1Conv)):
    return layer(h)
  return layer(h, context)


class Glow(_FlowMethods, nn.Module):
  """Multi-scale Glow for images (B, H, W, C) (Kingma & Dhariwal 2018, Fig. 2): ``num_levels``
  levels of squeeze, ``num_steps`` x [ActNorm, invertible 1x1 conv, affine coupling], and (but for
  the last level) a split that factors half of the channels out to the latent. The latent has the
  data's shape: the factored-out halves are put back by the inverse squeezes (a fixed permutation
  of Glow's latents), with an isotropic base over all of it. H and W must be divisible by
  2^num_levels."""
  event_shape: tuple[int, int, int]
  num_levels: int = 2
  num_steps: int = 4
  hidden: int = 64
  lu: bool = True
  scale: str = "tanh"
  scale_bound: float = 3.0
  data_init: bool = True
  base: str = "standard"

  def setup(self):
    self._setup_base()
    h, w, c = self.event_shape
    if self.num_levels < 1 or self.num_steps < 1:
      raise ValueError(f"Glow needs num_levels >= 1 and num_steps >= 1, got {self.num_levels}, "
                       f"{self.num_steps}")
    f = 2**self.num_levels
    if h % f or w % f:
      raise ValueError(f"Glow with num_levels={self.num_levels} needs H and W divisible by {f}, "
                       f"got event_shape={tuple(self.event_shape)}")
    log_scale_from_raw(jnp.zeros(()), self.scale, self.scale_bound)
    steps = []
    for level in range(self.num_levels):
      ch = 4 * c * 2**level  # channels after this level's squeeze (halved by each earlier split)
      for k in range(self.num_steps):
        steps += [ActNorm(ch, 3, self.data_init), Invertible1x1Conv(ch, self.lu),
                  SplitCouplingLayer(ch, self.hidden, swap=bool(k % 2), scale=self.scale,
                                     scale_bound=self.scale_bound)]
    self.steps = steps

  def _level_steps(self, level: int) -> list[nn.Module]:
    n = 3 * self.num_steps
    return self.steps[level * n:(level + 1) * n]

  def _context(self, context: Optional[Array], level: int, spatial: tuple[int, int]):
    """The context at ``level``: an image is squeezed level + 1 times, a vector broadcast."""
    if context is None:
      return None
    if context.ndim == 2:
      return jnp.broadcast_to(context[:, None, None, :], (context.shape[0], *spatial,
                                                          context.shape[-1]))
    for _ in range(level + 1):
      context = squeeze(context)
    return context

  def _encode(self, x: Array, level: int, context: Optional[Array]) -> tuple[Array, Array]:
    h = squeeze(x)
    ctx = self._context(context, level, h.shape[-3:-1])
    logdet = jnp.zeros(h.shape[:-3], h.dtype)
    for layer in self._level_steps(level):
      h, ld = _call_layer(layer, h, ctx).forward_and_log_det(h)
      logdet = logdet + ld
    if level < self.num_levels - 1:
      z_out, h = jnp.split(h, 2, axis=-1)  # factor out half of the channels
      h, ld = self._encode(h, level + 1, context)
      h = jnp.concatenate([z_out, h], axis=-1)
      logdet = logdet + ld
    return unsqueeze(h), logdet

  def _decode(self, z: Array, level: int, context: Optional[Array]) -> tuple[Array, Array]:
    h = squeeze(z)
    ctx = self._context(context, level, h.shape[-3:-1])
    logdet = jnp.zeros(h.shape[:-3], h.dtype)
    if level < self.num_levels - 1:
      z_out, rest = jnp.split(h, 2, axis=-1)
      rest, ld = self._decode(rest, level + 1, context)
      h = jnp.concatenate([z_out, rest], axis=-1)
      logdet = logdet + ld
    for layer in reversed(self._level_steps(level)):
      h, ld = _call_layer(layer, None, ctx).inverse_and_log_det(h)
      logdet = logdet + ld
    return unsqueeze(h), logdet

  def forward(self, x: Array, context: Optional[Array] = None) -> tuple[Array, Array]:
    """z = f(x) (data -> latent, same shape) and log|det df/dx| per example."""
    return self._encode(x, 0, context)

  def inverse(self, z: Array, context: Optional[Array] = None) -> tuple[Array, Array]:
    """x = f^{-1}(z) (latent -> data) and log|det df^{-1}/dz| per example."""
    return self._decode(z, 0, context)

  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    return self.log_prob(x, context)


# ---------------------------------------------------------------------------------------------------
# Pure-function API and JSON specs
# ---------------------------------------------------------------------------------------------------

FLOWS = {"coupling": CouplingFlow, "glow": Glow}


def flow_spec(model: nn.Module) -> dict:
  """JSON-able static config of a flow module: ``{'name': 'coupling' | 'glow', **fields}``."""
  name = {cls: n for n, cls in FLOWS.items()}[type(model)]
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def make_flow(spec: dict) -> nn.Module:
  """The flow module described by ``spec`` (inverse of :func:`flow_spec`); lists become tuples."""
  spec = dict(spec)
  name = spec.pop("name", None)
  if name not in FLOWS:
    raise ValueError(f"prior.flow.name must be one of {sorted(FLOWS)}, got {name!r}")
  cls = FLOWS[name]
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(spec) - known)
  if unknown:
    raise ValueError(f"unknown prior.flow option(s) {unknown} for {name!r}; valid: {sorted(known)}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})


def default_flow_spec(event_shape: Sequence[int], **overrides) -> dict:
  """A coupling flow for vectors (D,) or a Glow for images (H, W, C), with ``overrides``."""
  event_shape = tuple(int(s) for s in event_shape)
  if len(event_shape) == 1:
    spec = {"name": "coupling", "event_dim": event_shape[0]}
  elif len(event_shape) == 3:
    spec = {"name": "glow", "event_shape": list(event_shape)}
  else:
    raise ValueError(f"flows model vectors (D,) or images (H, W, C), got event shape {event_shape}")
  spec.update(overrides)
  return spec


def init_variables(model: nn.Module, key: Array, x: Array,
                   context: Optional[Array] = None) -> Variables:
  """Variables of ``model`` from a data batch ``x`` (B, *event); actnorm layers with ``data_init``
  standardise their inputs on this batch (Glow, Sec. 3.1)."""
  return model.init(key, x, context, method="log_prob")


def log_prob(model: nn.Module, variables: Variables, x: Array,
             context: Optional[Array] = None) -> Array:
  """log p(x) per example (B,)."""
  return model.apply(variables, x, context, method="log_prob")


def sample(model: nn.Module, variables: Variables, key: Array, n: int,
           context: Optional[Array] = None) -> Array:
  """n samples (n, *event)."""
  return model.apply(variables, key, n, context, method="sample")


def forward(model: nn.Module, variables: Variables, x: Array,
            context: Optional[Array] = None) -> tuple[Array, Array]:
  """(z, log|det dz/dx|): data -> latent."""
  return model.apply(variables, x, context, method="forward")


def inverse(model: nn.Module, variables: Variables, z: Array,
            context: Optional[Array] = None) -> tuple[Array, Array]:
  """(x, log|det dx/dz|): latent -> data."""
  return model.apply(variables, z, context, method="inverse")
