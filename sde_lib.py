"""Forward SDEs of score-based diffusion models and their generative (reverse) family.

Every SDE is an immutable pytree dataclass (``flax.struct.dataclass``): its hyper-parameters,
including the diffusion time ``T`` and the smallest time ``eps``, are array leaves, so an SDE can be
passed through ``jax.jit``/``vmap``/``grad`` and sweeping ``T`` does not recompile.

Conventions
-----------
* ``x`` has a leading batch axis: shape ``(B, *event)``. ``t`` is a scalar or has shape ``(B,)``;
  per-time quantities (``diffusion``, ``marginal_coeffs``) have the shape of ``t`` and are broadcast
  against ``x`` with :func:`bcast`.
* ``marginal(x0, t)`` is the exact transition ``p_{0t}(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)`` of
  the SDE started at ``t = 0`` (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
  eqs. 29, 33 and Appendix B).  For VE we use the exact variance ``sigma_min^2 (r^{2t} - 1)``,
  ``r = sigma_max / sigma_min``, rather than score_sde's approximation ``sigma(t)^2``.
* ``EDM`` (Karras et al. 2022) uses the noise level as time, t = sigma: x_t = x_0 + t z on
  [eps, T] = [sigma_min, sigma_max]. ``noise_level(t) = sigma_t / alpha_t`` and its closed-form
  inverse ``inverse_noise_level`` map every SDE to EDM's sigma (samplers.heun_sampler).
* Changing ``T`` never changes beta(t) or sigma(t) (Franzese et al., "How much is enough? A study on
  diffusion times in score-based generative models", Appendix H.3).
* The generative family (Cao et al., "Exploring the optimal choice for generative processes in
  diffusion models: ordinary vs stochastic differential equations", eq. 2; Huang et al., "A
  variational perspective on diffusion-based generative models and score matching", eq. 13 with
  lambda = 1 - c) is
      dx = [f(x, t) - (1 + c)/2 g(t)^2 s(x, t)] dt + sqrt(c) g(t) dw_bar,
  integrated backwards from ``T`` to ``eps``; ``c = 0`` is the probability-flow ODE, ``c = 1`` the
  reverse SDE of Anderson (1982), ``c > 1`` adds more noise (h^2 = c g^2).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import parallel  # noqa: F401  (process-wide XLA options and compilation cache: parallel.py)
import pytrees

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]  # (x, t) -> score, parameters already bound


def bcast(v: Array, x: Array) -> Array:
  """Reshapes a per-example quantity ``v`` (scalar or shape ``(B,)``) to broadcast against ``x``."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def sum_except_batch(x: Array) -> Array:
  """Sums over every axis but the leading batch axis."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def gaussian_logp(z: Array, std: Array | float = 1.0) -> Array:
  """Per-example log N(z; 0, std^2 I) with ``std`` a scalar or of shape ``(B,)``."""
  d = math.prod(z.shape[1:])
  std = jnp.asarray(std)
  var = std**2
  sq = sum_except_batch(z**2)
  return -0.5 * d * jnp.log(2 * jnp.pi * var) - 0.5 * sq / var


class GenerativeSDE(NamedTuple):
  """Drift and diffusion of the generative process in *original* time t (run from T to eps)."""
  drift: Callable[[Array, Array], Array]  # (x, t) -> f - (1+c)/2 g^2 s
  diffusion: Callable[[Array], Array]  # t -> sqrt(c) g(t)


@pytrees.dataclass
class GaussianPrior:
  """Isotropic N(0, std^2 I) prior; auxiliary priors (auxiliary.py) share this interface:
  ``sample(key, shape)`` and per-example ``log_prob(x)``."""
  std: Array

  def sample(self, key: Array, shape) -> Array:
    return self.std * jax.random.normal(key, shape)

  def log_prob(self, x: Array) -> Array:
    return gaussian_logp(x, self.std)


class _SDE:
  """Shared behaviour. Subclasses define ``drift``, ``diffusion``, ``marginal_coeffs``,
  ``prior_std`` and the importance-sampling antiderivative."""

  # -- interface implemented by subclasses ------------------------------------------------------
  def drift(self, x: Array, t: Array) -> Array:
    raise NotImplementedError

  def diffusion(self, t: Array) -> Array:
    raise NotImplementedError

  def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
    """(alpha_t, sigma_t) with x_t = alpha_t x_0 + sigma_t z."""
    raise NotImplementedError

  def prior_std(self) -> Array:
    raise NotImplementedError

  def noise_conditioning(self, t: Array) -> Array:
    """The scalar a score network is conditioned on (t for VP/subVP, log sigma(t) for VE)."""
    return jnp.asarray(t)

  def inverse_noise_level(self, sigma: Array) -> Array:
    """The time t with ``noise_level(t) = sigma`` (closed form per SDE)."""
    raise NotImplementedError

  # -- shared ------------------------------------------------------------------------------------
  def noise_level(self, t: Array) -> Array:
    """EDM noise level sigma~(t) = sigma_t / alpha_t: x_t / alpha_t = x_0 + sigma~ z (Karras et al.
    2022, "Elucidating the design space", eq. 4 and Table 1: s(t) = alpha_t, sigma(t) = sigma~)."""
    alpha, sigma = self.marginal_coeffs(t)
    return sigma / alpha

  def marginal(self, x0: Array, t: Array) -> tuple[Array, Array]:
    """Mean (shape of x0) and std (shape of t) of p_{0t}(x_t | x0)."""
    alpha, sigma = self.marginal_coeffs(t)
    return bcast(alpha, x0) * x0, sigma

  def perturb(self, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = alpha_t x0 + sigma_t noise."""
    alpha, sigma = self.marginal_coeffs(t)
    return bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise

  def transition_score(self, xt: Array, x0: Array, t: Array) -> Array:
    """grad_{x_t} log p_{0t}(x_t | x0) = -(x_t - alpha_t x0) / sigma_t^2."""
    alpha, sigma = self.marginal_coeffs(t)
    return -(xt - bcast(alpha, xt) * x0) / bcast(sigma, xt) ** 2

  def prior(self) -> GaussianPrior:
    """The Gaussian prior p_noise at time T, as a prior object (sample / log_prob)."""
    return GaussianPrior(self.prior_std())

  def prior_sample(self, key: Array, shape) -> Array:
    return self.prior().sample(key, shape)

  def prior_logp(self, z: Array) -> Array:
    """Per-example log-density of the Gaussian prior (sum over non-batch axes)."""
    return self.prior().log_prob(z)

  def reverse(self, score_fn: ScoreFn, c: Array | float = 1.0) -> GenerativeSDE:
    """Generative family dx = [f - (1+c)/2 g^2 s] dt + sqrt(c) g dw_bar (Cao et al., eq. 2)."""
    c = jnp.asarray(c)

    def drift(x, t):
      g = bcast(self.diffusion(t), x)
      return self.drift(x, t) - 0.5 * (1.0 + c) * g**2 * score_fn(x, t)

    def diffusion(t):
      return jnp.sqrt(c) * self.diffusion(t)

    return GenerativeSDE(drift, diffusion)

  def probability_flow(self, score_fn: ScoreFn) -> GenerativeSDE:
    """c = 0: the probability-flow ODE (Song et al. 2021, eq. 13)."""
    return self.reverse(score_fn, 0.0)

  # Importance sampling of t with proposal p(t) ∝ g(t)^2 / sigma_t^2 on [eps, T]
  # (Song et al. 2021b, "Maximum likelihood training of score-based diffusion models", §5.1).
  def is_antiderivative(self, t: Array) -> Array:
    """Phi(t) with Phi'(t) = g(t)^2 / sigma_t^2."""
    raise NotImplementedError

  def is_inverse_antiderivative(self, y: Array) -> Array:
    """t with Phi(t) = y."""
    raise NotImplementedError

  def is_weight(self, t: Array) -> Array:
    """g(t)^2 / sigma_t^2, the unnormalized proposal density."""
    _, sigma = self.marginal_coeffs(t)
    return self.diffusion(t) ** 2 / sigma**2

  def is_normalizer(self) -> Array:
    """Z = Phi(T) - Phi(eps), so p(t) = g^2 / (sigma^2 Z)."""
    return self.is_antiderivative(self.T) - self.is_antiderivative(self.eps)

  def is_sample_t(self, key: Array, shape) -> Array:
    """Samples t ~ p(t) ∝ g^2/sigma^2 on [eps, T] by inverting the CDF."""
    u = jax.random.uniform(key, shape)
    lo = self.is_antiderivative(self.eps)
    hi = self.is_antiderivative(self.T)
    t = self.is_inverse_antiderivative(lo + u * (hi - lo))
    return jnp.clip(t, self.eps, self.T)

  def uniform_sample_t(self, key: Array, shape) -> Array:
    return jax.random.uniform(key, shape, minval=self.eps, maxval=self.T)

  def sample_time(self, key: Array, n: int, importance_sampling: bool) -> tuple[Array, Array]:
    """The one time sampler of losses and bounds: n times t on [eps, T] and 1 / p(t), which turns
    an integral over t into E_p[.]. Importance sampling p(t) = g^2 / (sigma_t^2 Z) (ScoreFlow
    §5.1, eq. 12; 1/p = Z sigma_t^2 / g^2) or uniform (1/p = T - eps)."""
    if importance_sampling:
      t = self.is_sample_t(key, (n,))
      return t, self.is_normalizer() / self.is_weight(t)
    t = self.uniform_sample_t(key, (n,))
    return t, jnp.broadcast_to(jnp.asarray(self.T - self.eps, t.dtype), (n,))

  def validate(self) -> None:
    """Raises ValueError naming the offending field (call outside jit)."""
    if not float(self.eps) > 0:
      raise ValueError(f"sde.eps must be > 0, got {float(self.eps)}")
    if not float(self.T) > float(self.eps):
      raise ValueError(f"sde.T must exceed sde.eps, got T={float(self.T)} eps={float(self.eps)}")


def _log_expm1(x: Array) -> Array:
  """log(exp(x) - 1) for x > 0, stable for small and large x (both branches NaN-free for grad)."""
  small = jnp.log(jnp.expm1(jnp.minimum(x, 1.0)))
  large = x + jnp.log(-jnp.expm1(-jnp.maximum(x, 1.0)))
  return jnp.where(x > 1.0, large, small)


def _inv_log_expm1(y: Array) -> Array:
  """x with log(exp(x) - 1) = y, i.e. softplus(y) = log1p(exp(y))."""
  return jax.nn.softplus(y)


class _LinearBeta(_SDE):
  """Drift -1/2 beta(t) x with beta(t) = beta_min + t (beta_max - beta_min), shared by VP and
  sub-VP (Song et al. 2021, eqs. 11-12). Subclasses hold the fields beta_min, beta_max, T, eps."""

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def int_beta(self, t):
    """B(t) = int_0^t beta(s) ds."""
    return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

  def drift(self, x, t):
    return -0.5 * bcast(self.beta(t), x) * x

  def prior_std(self):
    return jnp.asarray(1.0)

  def validate(self):
    super().validate()
    if not float(self.beta_min) > 0:
      raise ValueError(f"sde.beta_min must be > 0, got {float(self.beta_min)}")
    if not float(self.beta_max) >= float(self.beta_min):
      raise ValueError(f"sde.beta_max must be >= sde.beta_min, got {float(self.beta_max)}")


@pytrees.dataclass
class VPSDE(_LinearBeta):
  """Variance-preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, beta linear in t
  (Song et al. 2021, eq. 11; DDPM in the continuous limit)."""
  beta_min: float = 0.1
  beta_max: float = 20.0
  T: float = 1.0
  eps: float = 1e-5

  def diffusion(self, t):
    return jnp.sqrt(self.beta(t))

  def marginal_coeffs(self, t):
    b = self.int_beta(t)
    return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

  def is_antiderivative(self, t):
    # int beta / (1 - e^{-B}) dt = int dB e^B/(e^B - 1) = log(e^B - 1).
    return _log_expm1(self.int_beta(t))

  def is_inverse_antiderivative(self, y):
    return _t_from_int_beta(self, _inv_log_expm1(y))

  def inverse_noise_level(self, sigma):
    # sigma~^2 = e^{B(t)} - 1, so B = log(1 + sigma~^2).
    return _t_from_int_beta(self, jnp.log1p(jnp.asarray(sigma) ** 2))


def _t_from_int_beta(sde, b):
  """Solves beta_min t + 1/2 (beta_max - beta_min) t^2 = b for t >= 0 (stable quadratic root)."""
  d = sde.beta_max - sde.beta_min
  # t = 2b / (beta_min + sqrt(beta_min^2 + 2 d b)) avoids cancellation and handles d = 0.
  return 2.0 * b / (sde.beta_min + jnp.sqrt(sde.beta_min**2 + 2.0 * d * b))


@pytrees.dataclass
class subVPSDE(_LinearBeta):
  """Sub-VP SDE dx = -1/2 beta x dt + sqrt(beta (1 - e^{-2B(t)})) dw (Song et al. 2021, eq. 12)."""
  beta_min: float = 0.1
  beta_max: float = 20.0
  T: float = 1.0
  eps: float = 1e-5

  def diffusion(self, t):
    return jnp.sqrt(self.beta(t) * -jnp.expm1(-2.0 * self.int_beta(t)))

  def marginal_coeffs(self, t):
    b = self.int_beta(t)
    return jnp.exp(-0.5 * b), -jnp.expm1(-b)

  def is_antiderivative(self, t):
    # g^2/sigma^2 = beta (1 + e^{-B}) / (1 - e^{-B}); int dB (e^B + 1)/(e^B - 1) = 2 log(e^B - 1) - B.
    b = self.int_beta(t)
    return 2.0 * _log_expm1(b) - b

  def is_inverse_antiderivative(self, y):
    # Phi(B) = 2 log(e^B - 1) - B is increasing in B; solve for B by bisection in log-space bounds,
    # then map B to t. 60 halvings of [1e-12, 1e4] give ~1e-14 relative accuracy (float64).
    def phi(b):
      return 2.0 * _log_expm1(b) - b

    lo = jnp.full(jnp.shape(y), 1e-12)
    hi = jnp.full(jnp.shape(y), 1e4)

    def body(_, lohi):
      lo, hi = lohi
      mid = jnp.sqrt(lo * hi)  # geometric bisection: B spans many decades near t = eps
      mid = jnp.where(hi / lo < 4.0, 0.5 * (lo + hi), mid)
      go_up = phi(mid) < y
      return jnp.where(go_up, mid, lo), jnp.where(go_up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 100, body, (lo, hi))
    return _t_from_int_beta(self, 0.5 * (lo + hi))

  def inverse_noise_level(self, sigma):
    # sigma~ = (1 - e^{-B}) e^{B/2} = 2 sinh(B/2), so B = 2 asinh(sigma~ / 2).
    return _t_from_int_beta(self, 2.0 * jnp.arcsinh(0.5 * jnp.asarray(sigma)))


@pytrees.dataclass
class VESDE(_SDE):
  """Variance-exploding SDE dx = sigma(t) sqrt(2 log r) dw, sigma(t) = sigma_min r^t,
  r = sigma_max / sigma_min (Song et al. 2021, eq. 9; NCSN in the continuous limit)."""
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  T: float = 1.0
  eps: float = 1e-5

  def log_ratio(self):
    return jnp.log(self.sigma_max / self.sigma_min)

  def sigma(self, t):
    """The noise scale sigma(t) = sigma_min r^t (score_sde's marginal-std approximation), computed
    as score_sde does (a power, not exp(t log r)): in float32 it is bit-identical to score_sde's
    network labels, whose log the NCSN++ Fourier features amplify."""
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** jnp.asarray(t)

  def drift(self, x, t):
    return jnp.zeros_like(x)

  def diffusion(self, t):
    return self.sigma(t) * jnp.sqrt(2.0 * self.log_ratio())

  def marginal_coeffs(self, t):
    # Var = int_0^t g^2 = sigma_min^2 (r^{2t} - 1), exact for the SDE started at t = 0.
    t = jnp.asarray(t)
    return jnp.ones_like(t), self.sigma_min * jnp.sqrt(jnp.expm1(2.0 * t * self.log_ratio()))

  def prior_std(self):
    """Std of p_noise = N(0, (sigma(T)^2 - sigma(0)^2) I) (Franzese et al., Table 1): the forward
    marginal's std at T, so p_noise is p(x, T) in the large-data limit (not score_sde's sigma(T))."""
    return self.marginal_coeffs(self.T)[1]

  def noise_conditioning(self, t):
    return jnp.log(self.sigma(t))

  def is_antiderivative(self, t):
    # g^2/sigma_t^2 = 2 log r r^{2t} / (r^{2t} - 1); antiderivative log(r^{2t} - 1).
    return _log_expm1(2.0 * t * self.log_ratio())

  def is_inverse_antiderivative(self, y):
    return _inv_log_expm1(y) / (2.0 * self.log_ratio())

  def inverse_noise_level(self, sigma):
    # sigma~^2 = sigma_min^2 (r^{2t} - 1) (the exact marginal std, alpha = 1).
    return jnp.log1p((jnp.asarray(sigma) / self.sigma_min) ** 2) / (2.0 * self.log_ratio())

  def validate(self):
    super().validate()
    if not float(self.sigma_min) > 0:
      raise ValueError(f"sde.sigma_min must be > 0, got {float(self.sigma_min)}")
    if not float(self.sigma_max) > float(self.sigma_min):
      raise ValueError(f"sde.sigma_max must exceed sde.sigma_min, got {float(self.sigma_max)}")


@pytrees.dataclass
class EDM(_SDE):
  """The EDM formulation (Karras et al. 2022, "Elucidating the design space of diffusion-based
  generative models", Table 1; Xu et al., "Stable target field", Appendix A "VE and EDM").

  Time convention: the time variable IS the noise level, t = sigma (EDM's sigma(t) = t, s(t) = 1),
  so x_t = x_0 + t z, drift 0 and g(t) = sqrt(2 t) (int_0^t g^2 = t^2): ``marginal_coeffs`` is
  (1, t), the probability-flow ODE dx/dt = -t s(x, t) is EDM's eq. 4, and likelihood, toy oracles
  and the generic samplers use it as any other SDE on [eps, T]. Hence T is sigma_max and eps is
  sigma_min (``validate`` requires both equalities; a truncated diffusion time is a smaller
  sigma_max). The prior is N(0, T^2 I). ``rho`` shapes the Heun time steps (samplers.heun_sampler);
  ``sigma_data``, ``P_mean``, ``P_std`` give the preconditioning, training noise and weighting."""
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  sigma_data: float = 0.5
  P_mean: float = -1.2
  P_std: float = 1.2
  T: float = 80.0
  eps: float = 0.002

  def drift(self, x, t):
    return jnp.zeros_like(x)

  def diffusion(self, t):
    return jnp.sqrt(2.0 * jnp.asarray(t))

  def marginal_coeffs(self, t):
    t = jnp.asarray(t)
    return jnp.ones_like(t), t

  def prior_std(self):
    return jnp.asarray(self.T)

  def noise_conditioning(self, t):
    """c_noise(sigma) = ln(sigma) / 4 (Karras et al. 2022, Table 1)."""
    return 0.25 * jnp.log(jnp.asarray(t))

  def inverse_noise_level(self, sigma):
    return jnp.asarray(sigma)

  def preconditioning(self, sigma: Array) -> tuple[Array, Array, Array, Array]:
    """(c_skip, c_out, c_in, c_noise) of D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
    (Karras et al. 2022, Table 1 and eq. 7)."""
    sigma = jnp.asarray(sigma)
    sd2 = self.sigma_data**2
    total = sigma**2 + sd2
    return (sd2 / total, sigma * self.sigma_data * jax.lax.rsqrt(total), jax.lax.rsqrt(total),
            self.noise_conditioning(sigma))

  def denoiser_weight(self, sigma: Array) -> Array:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 of the loss
    E ||D(x_0 + sigma n; sigma) - x_0||^2 (Karras et al. 2022, Table 1)."""
    sigma = jnp.asarray(sigma)
    return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

  def denoiser_score(self, output: Array, x: Array, sigma: Array) -> Array:
    """The score of network output F at (x, sigma) under the preconditioning:
    s = (D - x) / sigma^2 = c_out F / sigma^2 - x / (sigma^2 + sigma_data^2) (Tweedie; Karras et
    al. 2022, eq. 3 and Table 1), in this form to avoid the cancellation in D - x at small sigma.
    ``sigma`` is per example (B,)."""
    _, c_out, _, _ = self.preconditioning(sigma)
    return bcast(c_out / sigma**2, x) * output - x / bcast(sigma**2 + self.sigma_data**2, x)

  def score_matching_weight(self, sigma: Array) -> Array:
    """lambda(sigma) sigma^4: EDM's loss E lambda ||D - x_0||^2 as a score-matching weight, since
    D - x_0 = sigma^2 (s - grad log p_{0t}) (Karras et al. 2022, Table 1; losses 'edm')."""
    return self.denoiser_weight(sigma) * jnp.asarray(sigma)**4

  def lognormal_sample_t(self, key: Array, shape) -> Array:
    """Training noise levels ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)."""
    return jnp.exp(self.P_mean + self.P_std * jax.random.normal(key, shape))

  def is_antiderivative(self, t):
    # g^2 / sigma_t^2 = 2 t / t^2 = 2 / t.
    return 2.0 * jnp.log(t)

  def is_inverse_antiderivative(self, y):
    return jnp.exp(0.5 * y)

  def validate(self):
    super().validate()
    for name in ("sigma_min", "rho", "sigma_data", "P_std"):
      if not float(getattr(self, name)) > 0:
        raise ValueError(f"sde.{name} must be > 0, got {float(getattr(self, name))}")
    if not float(self.sigma_max) > float(self.sigma_min):
      raise ValueError(f"sde.sigma_max must exceed sde.sigma_min, got {float(self.sigma_max)}")
    for name, ref in (("T", "sigma_max"), ("eps", "sigma_min")):
      if not math.isclose(float(getattr(self, name)), float(getattr(self, ref)), rel_tol=1e-6):
        raise ValueError(f"sde.{name} must equal sde.{ref} for sde.name='edm' (time is the noise "
                         f"level), got {name}={float(getattr(self, name))} "
                         f"{ref}={float(getattr(self, ref))}")


SDES = {"vpsde": VPSDE, "subvpsde": subVPSDE, "vesde": VESDE, "edm": EDM}


def get_sde(cfg) -> _SDE:
  """Builds and validates the SDE named by ``cfg.name`` from an ``sde`` config section: any object
  with the fields as attributes, e.g. ``config_schema.validate(config).sde`` (typed, floats)."""
  name = cfg.name.lower()
  if name not in SDES:
    raise ValueError(f"sde.name must be one of {sorted(SDES)}, got {cfg.name!r}")
  cls = SDES[name]
  sde = cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__ if hasattr(cfg, f)})
  sde.validate()
  return sde
