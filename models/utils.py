"""Score-function wrappers: the only view of a network that losses, samplers and likelihood get.

Parameterizations (DESIGN.md, Contracts):
* 'score': the network output is s_theta(x, t) directly (Song et al. 2021).
* 'noise': the network predicts eps; s = -eps_hat / sigma_t (Ho et al. 2020; Song et al. 2021,
  Appendix C, continuous DDPM).
* 'a': the network outputs a = g(t) s (Huang et al., "A variational perspective ...", Section 6,
  eq. 24 with a = g^T s_theta); s = a / g(t).
* 'scale_by_sigma' (VE only): s = h / sigma(t) with the noise scale sigma(t) = sigma_min
  (sigma_max / sigma_min)^t, score_sde's ``model.scale_by_sigma`` (Song et al. 2021, NCSN++ cont.):
  note the + sign and sigma(t), not the marginal std sqrt(sigma(t)^2 - sigma_min^2) of 'noise'.
  Chosen by score_sde_import for imported VE checkpoints, so their score is score_sde's exactly.
* 'edm' (sde 'edm' only): EDM preconditioning (Karras et al. 2022, Table 1, eq. 7), the network is
  F in D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), fed c_in x and c_noise = ln(sigma) / 4;
  s = (D - x) / sigma^2 = c_out F / sigma^2 - x / (sigma^2 + sigma_data^2) (Tweedie). The
  preconditioning and that score are ``sde_lib.EDM``'s (``preconditioning``, ``denoiser_score``:
  the EDM parameterization lives there). c_in is built in (no input_scaling).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import sde_lib
from sde_lib import bcast

Array = jax.Array
PARAMETERIZATIONS = ("score", "noise", "a", "scale_by_sigma", "edm")
TrainScoreFn = Callable[..., Array]  # (params, x, t, rng=None) -> score


def apply_model(model: nn.Module, params, x: Array, cond: Array, rng: Optional[Array] = None) -> Array:
  """Network output; ``rng=None`` is eval mode (no dropout), else train mode with dropout ``rng``."""
  if rng is None:
    return model.apply({"params": params}, x, cond, train=False)
  return model.apply({"params": params}, x, cond, train=True, rngs={"dropout": rng})


def input_scale(sde, t: Array) -> Array:
  """c_in(t) = 1 / sqrt(alpha_t^2 + sigma_t^2): unit-variance network input for unit-variance data
  (Karras et al. 2022, "Elucidating the design space", Table 1 c_in). Identically 1 for VP."""
  alpha, sigma = sde.marginal_coeffs(t)
  return jax.lax.rsqrt(alpha**2 + sigma**2)


def get_score_fn(sde, model: nn.Module, parameterization: str = "score",
                 input_scaling: bool = False) -> TrainScoreFn:
  """Returns score_fn(params, x, t, rng=None) -> score with the shape of x.

  ``t`` is a scalar or of shape (B,); the network is conditioned on ``sde.noise_conditioning(t)``.
  With ``input_scaling`` the network sees ``input_scale(sde, t) * x`` (matters for VE, where
  |x_t| grows to sigma_max); the output conversions are unchanged.
  """
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"model.parameterization must be one of {PARAMETERIZATIONS}, "
                     f"got {parameterization!r}")
  if parameterization == "scale_by_sigma" and not isinstance(sde, sde_lib.VESDE):
    raise ValueError("model.parameterization 'scale_by_sigma' divides by the VE noise scale "
                     f"sigma(t); sde {type(sde).__name__} has none (use 'noise')")
  if parameterization == "edm":
    return _edm_score_fn(sde, model, input_scaling)

  def score_fn(params, x: Array, t: Array, rng: Optional[Array] = None) -> Array:
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    x_in = bcast(input_scale(sde, t), x) * x if input_scaling else x
    out = apply_model(model, params, x_in, sde.noise_conditioning(t), rng)
    if parameterization == "score":
      return out
    if parameterization == "noise":
      _, sigma = sde.marginal_coeffs(t)
      return -out / bcast(sigma, x)
    if parameterization == "scale_by_sigma":
      return out / bcast(sde.sigma(t), x)
    return out / bcast(sde.diffusion(t), x)

  return score_fn


def _edm_score_fn(sde, model: nn.Module, input_scaling: bool) -> TrainScoreFn:
  """score_fn of the 'edm' parameterization (Karras et al. 2022, Table 1 preconditioning)."""
  if not isinstance(sde, sde_lib.EDM):
    raise ValueError("model.parameterization 'edm' needs sde.name='edm' (sigma_data and the EDM "
                     f"preconditioning), got sde {type(sde).__name__}")
  if input_scaling:
    raise ValueError("model.input_scaling must be False with model.parameterization='edm' "
                     "(c_in is part of the EDM preconditioning)")

  def score_fn(params, x: Array, t: Array, rng: Optional[Array] = None) -> Array:
    sigma = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    _, _, c_in, c_noise = sde.preconditioning(sigma)
    out = apply_model(model, params, bcast(c_in, x) * x, c_noise, rng)
    return sde.denoiser_score(out, x, sigma)

  return score_fn


def score_fn_from_config(model_cfg, sde, model: nn.Module) -> TrainScoreFn:
  """get_score_fn with the ``model`` config section's ``parameterization`` and ``input_scaling``
  (a typed section, ``config_schema.validate(config).model``): what training used, so evaluation
  and sampling must build it the same way."""
  return get_score_fn(sde, model, model_cfg.parameterization, model_cfg.input_scaling)


def init_model(model: nn.Module, key: Array, sample_shape: Sequence[int]):
  """Initializes the 'params' collection from a zero input of shape (B, *event) and cond (B,)."""
  shape = tuple(sample_shape)

  @jax.jit  # one compilation instead of one per initializer op
  def init(key):
    pkey, dkey = jax.random.split(key)
    x = jnp.zeros(shape, jnp.float32)
    cond = jnp.zeros(shape[:1], jnp.float32)
    return model.init({"params": pkey, "dropout": dkey}, x, cond, train=False)["params"]

  return init(key)
