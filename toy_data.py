"""Toy data distributions with exact oracles (densities, marginals and scores under any SDE).

A Gaussian mixture stays a Gaussian mixture under the linear forward SDEs of ``sde_lib``: with
``x_t = alpha_t x_0 + sigma_t z`` (``alpha_t, sigma_t = sde.marginal_coeffs(t)``) component
``N(mu_k, Sigma_k)`` becomes ``N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I)`` (Franzese et al.,
"How much is enough?", Appendix H.1, eq. 32; Cao et al., "ODE vs SDE", Appendix H.2, "the exact
scores can be obtained analytically"). These closed forms are the oracles of the test suite.

Every distribution is an immutable pytree dataclass (``flax.struct``) with pure methods, so it can be
passed through ``jax.jit`` / ``vmap`` / ``grad``. Arrays have a leading batch axis: ``x`` is
``(n, D)``. Linear algebra uses Cholesky factors and triangular solves (no explicit inverses), which
keeps float32 accurate when ``sigma_t`` is tiny (small ``t``).
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular
from jax.scipy.special import logsumexp

import parallel  # noqa: F401  (process-wide XLA options and compilation cache: parallel.py)
import pytrees

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


@pytrees.dataclass
class GaussianMixture:
  """p(x) = sum_k w_k N(x; mu_k, Sigma_k) in D dimensions (a single Gaussian is K = 1).

  Fields: ``weights`` (K,) (normalised internally), ``means`` (K, D), ``covs`` (K, D, D) symmetric
  positive definite.
  """
  weights: Array
  means: Array
  covs: Array

  has_density: ClassVar[bool] = True

  # -- basic quantities ---------------------------------------------------------------------------
  @property
  def dim(self) -> int:
    return self.means.shape[-1]

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  def log_weights(self) -> Array:
    """log w_k, normalised so that sum_k w_k = 1."""
    w = jnp.asarray(self.weights)
    return jnp.log(w) - jnp.log(jnp.sum(w))

  def cholesky(self) -> Array:
    """Lower Cholesky factors L_k with Sigma_k = L_k L_k^T, shape (K, D, D)."""
    return jnp.linalg.cholesky(self.covs)

  def mean(self) -> Array:
    """E[x] = sum_k w_k mu_k, shape (D,)."""
    w = jnp.exp(self.log_weights())
    return jnp.einsum("k,kd->d", w, self.means)

  def cov(self) -> Array:
    """Cov[x] = sum_k w_k (Sigma_k + mu_k mu_k^T) - E[x] E[x]^T (law of total covariance)."""
    w = jnp.exp(self.log_weights())
    m = self.mean()
    centred = self.means - m
    return (jnp.einsum("k,kij->ij", w, self.covs)
            + jnp.einsum("k,ki,kj->ij", w, centred, centred))

  # -- sampling and density -----------------------------------------------------------------------
  def sample(self, key: Array, n: int | Sequence[int]) -> Array:
    """i.i.d. samples: component k ~ Cat(w), then x = mu_k + L_k z, z ~ N(0, I). ``n`` is a count
    (returns (n, D)) or a shape (..., D) (the prior interface ``sample(key, shape)``)."""
    n, shape = _num_and_shape(n, self.dim)
    return self._sample(key, n).reshape(shape)

  def _sample(self, key: Array, n: int) -> Array:
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, self.log_weights(), shape=(n,))
    z = jax.random.normal(k_noise, (n, self.dim), dtype=self.means.dtype)
    chol = self.cholesky()
    # (K, n, D): every component's affine map, then pick one per sample (avoids (n, D, D) gathers).
    xs = self.means[:, None, :] + jnp.einsum("kij,nj->kni", chol, z)
    return jnp.take_along_axis(xs, comp[None, :, None], axis=0)[0]

  def _component_terms(self, x: Array) -> tuple[Array, Array]:
    """Per-component log w_k + log N(x; mu_k, Sigma_k), shape (K, n), and the Cholesky factors."""
    chol = self.cholesky()
    d = self.dim

    def one(mu, lk):
      diff = (x - mu).T  # (D, n)
      z = solve_triangular(lk, diff, lower=True)
      half_logdet = jnp.sum(jnp.log(jnp.diagonal(lk)))
      return -0.5 * jnp.sum(z**2, axis=0) - half_logdet - 0.5 * d * math.log(2 * math.pi)

    logn = jax.vmap(one)(self.means, chol)
    return self.log_weights()[:, None] + logn, chol

  def log_prob(self, x: Array) -> Array:
    """Exact log p(x) per example, shape (n,): log-sum-exp over components of
    log w_k - 1/2 |L_k^{-1}(x - mu_k)|^2 - sum log diag L_k - D/2 log 2 pi."""
    terms, _ = self._component_terms(x)
    return logsumexp(terms, axis=0)

  def score(self, x: Array) -> Array:
    """grad_x log p(x) = -sum_k r_k(x) Sigma_k^{-1} (x - mu_k), r_k the posterior responsibilities
    (solved with the Cholesky factors), shape (n, D)."""
    terms, chol = self._component_terms(x)
    resp = jax.nn.softmax(terms, axis=0)  # (K, n)

    def prec_diff(mu, lk):
      return cho_solve((lk, True), (x - mu).T).T  # Sigma_k^{-1} (x - mu_k), (n, D)

    pd = jax.vmap(prec_diff)(self.means, chol)  # (K, n, D)
    return -jnp.einsum("kn,knd->nd", resp, pd)

  # -- marginals under a forward SDE ----------------------------------------------------------------
  def marginal(self, sde, t: Array) -> "GaussianMixture":
    """p_t for scalar t under ``sde``: components N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I)
    (Franzese et al., Appendix H.1, eq. 32, for any linear SDE of ``sde_lib``)."""
    alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
    eye = jnp.eye(self.dim, dtype=self.covs.dtype)
    return GaussianMixture(
        weights=self.weights,
        means=alpha * self.means,
        covs=alpha**2 * self.covs + sigma**2 * eye)

  def marginal_log_prob(self, sde, x: Array, t: Array) -> Array:
    """log p_t(x) per example, shape (n,); ``t`` scalar or per-example (n,)."""
    t = jnp.asarray(t)
    if t.ndim == 0:
      return self.marginal(sde, t).log_prob(x)
    return jax.vmap(lambda xi, ti: self.marginal(sde, ti).log_prob(xi[None])[0])(x, t)

  def marginal_score(self, sde, x: Array, t: Array) -> Array:
    """grad_x log p_t(x), shape (n, D); ``t`` scalar or per-example (n,)."""
    t = jnp.asarray(t)
    if t.ndim == 0:
      return self.marginal(sde, t).score(x)
    return jax.vmap(lambda xi, ti: self.marginal(sde, ti).score(xi[None])[0])(x, t)

  def marginal_logits(self, sde, x: Array, t: Array) -> Array:
    """log w_k + log N(x; alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I), shape (n, K): logits of
    the exact noise-conditional classifier p_t(k | x_t), the component posterior under the forward
    marginal (the oracle of class guidance, Song et al. 2021, App. I.1); ``t`` scalar or (n,)."""
    t = jnp.asarray(t)
    if t.ndim == 0:
      return self.marginal(sde, t)._component_terms(x)[0].T
    return jax.vmap(lambda xi, ti: self.marginal(sde, ti)._component_terms(xi[None])[0][:, 0])(x, t)

  def component(self, k: int) -> "GaussianMixture":
    """Component k alone, N(mu_k, Sigma_k), as a one-component mixture (p(x | y = k))."""
    return GaussianMixture(jnp.ones((1,)), self.means[k:k + 1], self.covs[k:k + 1])

  def score_fn(self, sde) -> ScoreFn:
    """The exact score oracle as a plain ``(x, t) -> score`` for samplers and likelihood."""
    def fn(x: Array, t: Array) -> Array:
      return self.marginal_score(sde, x, t)
    return fn


@pytrees.dataclass
class SwissRoll:
  """Swiss roll (x, y) = scale * (s sin s, s cos s), s ~ U(3 pi/2, 9 pi/2) (Cao et al., "ODE vs
  SDE", Appendix H.1). Samples only: the distribution lives on a curve and has no density."""
  scale: Array = 1.0

  has_density: ClassVar[bool] = False
  s_min: ClassVar[float] = 1.5 * math.pi
  s_max: ClassVar[float] = 4.5 * math.pi

  @property
  def dim(self) -> int:
    return 2

  def sample(self, key: Array, n: int | Sequence[int]) -> Array:
    """``n`` a count (returns (n, 2)) or a shape (..., 2)."""
    n, shape = _num_and_shape(n, self.dim)
    s = jax.random.uniform(key, (n,), minval=self.s_min, maxval=self.s_max)
    return (self.scale * jnp.stack([s * jnp.sin(s), s * jnp.cos(s)], axis=-1)).reshape(shape)


def _num_and_shape(n: int | Sequence[int], dim: int) -> tuple[int, tuple[int, ...]]:
  """(number of samples, output shape) from a count n or a shape (..., dim)."""
  if isinstance(n, (tuple, list)):
    shape = tuple(int(v) for v in n)
    if not shape or shape[-1] != dim:
      raise ValueError(f"sample shape {shape} must end with the event dimension {dim}")
    return math.prod(shape[:-1]), shape
  return int(n), (int(n), dim)


# -- builders with the papers' parameters -----------------------------------------------------------
def gaussian(mean, cov) -> GaussianMixture:
  """A single Gaussian N(mean, cov) in D dimensions: mean (D,), cov (D, D)."""
  mean = jnp.atleast_1d(jnp.asarray(mean, dtype=float))
  cov = jnp.asarray(cov, dtype=float).reshape(mean.shape[0], mean.shape[0])
  return GaussianMixture(jnp.ones((1,)), mean[None], cov[None])


def gaussian_1d(mean: float = 0.0, std: float = 1.0) -> GaussianMixture:
  """1-D Gaussian N(mean, std^2) (Cao et al., "ODE vs SDE", Sec. 3 / Appendix G: p_0 = N(0, s_0^2))."""
  return gaussian([mean], [[std**2]])


def _isotropic_mixture(weights, means, std: float) -> GaussianMixture:
  means = jnp.asarray(means, dtype=float)
  k, d = means.shape
  covs = jnp.broadcast_to(std**2 * jnp.eye(d), (k, d, d))
  return GaussianMixture(jnp.asarray(weights, dtype=float), means, covs)


def two_mode_gmm_1d() -> GaussianMixture:
  """pi N(1, 0.1^2) + (1 - pi) N(3, 0.5^2), pi = 0.3 (Franzese et al., "How much is enough?",
  Sec. 1 / Fig. 1 and Appendix H.1, eq. 32)."""
  return GaussianMixture(
      weights=jnp.asarray([0.3, 0.7]),
      means=jnp.asarray([[1.0], [3.0]]),
      covs=jnp.asarray([[[0.1**2]], [[0.5**2]]]))


def ode_sde_gmm_1d() -> GaussianMixture:
  """sum_{i=1,2} 0.5 N(x; (-1)^i, 0.01), i.e. modes at -1 and +1 with variance 0.01 (std 0.1)
  (Cao et al., "ODE vs SDE", Appendix H.1)."""
  return _isotropic_mixture([0.5, 0.5], [[-1.0], [1.0]], std=0.1)


def ode_sde_gmm_2d() -> GaussianMixture:
  """sum_{i,j=1,2} 0.25 N(x; ((-1)^i, (-1)^j), 0.05^2 I_2): four modes at (+-1, +-1), std 0.05
  (Cao et al., "ODE vs SDE", Appendix H.1, "2D 4-mode Gaussian mixture")."""
  means = [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
  return _isotropic_mixture([0.25] * 4, means, std=0.05)


four_mode_gmm_2d = ode_sde_gmm_2d  # the name Cao et al. use ("2D 4-mode Gaussian mixture")


def two_gaussians_64d() -> GaussianMixture:
  """1/2 N(mu, s^2 I_64) + 1/2 N(-mu, s^2 I_64), mu = 0.1 * 1, s = 1e-4 (Xu et al., "Stable Target
  Field", Appendix C, "Two Gaussians")."""
  mu = 0.1 * jnp.ones((64,))
  return _isotropic_mixture([0.5, 0.5], jnp.stack([mu, -mu]), std=1e-4)


_REGISTRY: dict[str, Callable[[], GaussianMixture | SwissRoll]] = {
    "gaussian_1d": gaussian_1d,
    "gmm_1d_diffusion_time": two_mode_gmm_1d,
    "gmm_1d": ode_sde_gmm_1d,
    "gmm_2d": ode_sde_gmm_2d,
    "swiss_roll": SwissRoll,
    "two_gaussians_64d": two_gaussians_64d,
}
TOY_DISTRIBUTIONS = tuple(sorted(_REGISTRY))


def get_toy_distribution(name: str) -> GaussianMixture | SwissRoll:
  """The toy distribution registered under ``name`` (the value of ``config.data.dataset``)."""
  if name not in _REGISTRY:
    raise ValueError(
        f"data.dataset={name!r} is not a toy distribution; valid names: {', '.join(TOY_DISTRIBUTIONS)}")
  return _REGISTRY[name]()
