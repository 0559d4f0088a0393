"""Generative samplers on device (docs/samplers.md): probability-flow ODE, the generative SDE family
in c (Cao et al., eq. 2-3, h^2 = c g^2), predictor-corrector, the exponential integrator, EDM's Heun
sampler and DDIM.

A sampler has the field's shape (k-diffusion's ``sample_heun(model, x, sigmas, callback=...)``):
``sampler(score_fn, sde, x, key, time_grid, *, step_hook=None, **method_options) -> (x, stats)``,
x drawn from the prior at t_0 and time_grid the decreasing times t_0 > ... > t_N; it runs under
``jax.jit`` and ``stats`` holds the exact NFE. ``build`` (and ``get_sampler``, from the ``sampling``
config section) owns the prior draw, the score perturbation, the default grid and the final
Tweedie step.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Optional, Protocol, Sequence

import parallel  # noqa: F401  (before diffrax: process-wide XLA and equinox setup, parallel.py)
import diffrax
import jax
import jax.numpy as jnp
import lineax as lx

import sde_lib
from sde_lib import bcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
Stats = dict[str, Array]
StepHook = Callable[[Array, Array, Array, Array], Array]  # (x, t, key, i) -> x


class Prior(Protocol):
  """What a sampler needs of a prior: ``sample(key, shape)`` and per-example ``log_prob(x)``."""

  def sample(self, key: Array, shape: Sequence[int]) -> Array:
    ...

  def log_prob(self, x: Array) -> Array:
    ...


# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------

ODE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
# Drift (score) evaluations per step of each solver: FSAL ODE solvers 6 (+1 at the start), the SDE
# solvers evaluate every stage afresh (diffrax disables FSAL for stochastic terms).
ODE_STAGE_COST = {"tsit5": 6, "dopri5": 6}
SDE_SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "sra1": diffrax.SRA1,
               "shark": diffrax.ShARK}
SDE_STAGE_COST = {"euler": 1, "heun": 2, "sra1": 2, "shark": 2}
# Solvers that need space-time Levy area from the Brownian path (additive-noise SRK methods).
_NEEDS_LEVY_AREA = ("sra1", "shark")
# sampling.solver values: an ODE solver for method 'ode', an SDE solver for 'sde' (where an ODE
# solver name, the shared default, means Euler-Maruyama).
SOLVERS = tuple(ODE_SOLVERS) + tuple(SDE_SOLVERS)
PC_PREDICTORS = ("reverse_diffusion", "euler_maruyama")
# SDEs whose linear drift the exponential integrator integrates in closed form (sde.name values).
EXPONENTIAL_SDES = ("vpsde", "subvpsde", "vesde", "edm")
EXPONENTIAL_SDE_CLASSES = (sde_lib.VPSDE, sde_lib.subVPSDE, sde_lib.VESDE, sde_lib.EDM)


def _check_c(c: Array | float) -> None:
  """ValueError naming sampling.c for a (concrete) negative c; traced values are not checked."""
  if isinstance(c, (int, float)) and c < 0:
    raise ValueError(f"sampling.c must be >= 0, got {c}")


def perturbed_score(score_fn: ScoreFn, score_perturbation: Optional[ScoreFn],
                    epsilon: Array | float = 0.0) -> ScoreFn:
  """s + epsilon E(x, t): the inexact score of Cao et al., eq. 6 (identity when E is None)."""
  if score_perturbation is None:
    return score_fn
  epsilon = jnp.asarray(epsilon)

  def fn(x: Array, t: Array) -> Array:
    return score_fn(x, t) + epsilon * score_perturbation(x, t)

  return fn


# Pulse-shaped score errors of Cao et al., Appendix G.2, eq. 44 (generative time u = T - t):
# E(x, t) = m(u) * score(x, t) with m = 1 (case1), -1 (case2), (1 + sin(2 pi u / T)) / 2 (case3),
# 1[u < edge T] (case4: early pulse, edge 0.95) and 1[u > edge T] (case5: late pulse, edge 0.99).
PERTURBATIONS = ("none", "case1", "case2", "case3", "case4", "case5")
PULSE_EDGES = {"case4": 0.95, "case5": 0.99}  # the paper's pulse edges (fractions of T)


def pulse_multiplier(case: str, u: Array, T: Array | float, edge: Optional[float] = None) -> Array:
  """m(u) of Cao et al., eq. 44 at generative time u in [0, T] (``edge``: the pulse edge of
  case4/case5 as a fraction of T, default ``PULSE_EDGES``; not used by the other cases)."""
  u = jnp.asarray(u)
  if case not in PERTURBATIONS[1:]:
    raise ValueError(f"sampling.perturbation must be one of {PERTURBATIONS[1:]} here, got {case!r}")
  if case in PULSE_EDGES:
    edge = PULSE_EDGES[case] if edge is None else edge
    inside = u < edge * T if case == "case4" else u > edge * T
    return inside.astype(u.dtype)
  if edge is not None:
    raise ValueError(f"sampling.perturbation_edge is only used by {tuple(PULSE_EDGES)}, got "
                     f"{edge!r} with {case!r}")
  if case == "case3":
    return 0.5 * (1.0 + jnp.sin(2.0 * jnp.pi * u / T))
  return jnp.full_like(u, 1.0 if case == "case1" else -1.0)


def pulse_perturbed_score(score_fn: ScoreFn, sde, case: str, epsilon: Array | float,
                          edge: Optional[float] = None) -> ScoreFn:
  """s + epsilon E = (1 + epsilon m(T - t)) s: the score with the eq. 44 error of Cao et al.
  (Appendix G.2; E is proportional to the score itself, so this costs no extra evaluation)."""
  epsilon = jnp.asarray(epsilon)

  def fn(x: Array, t: Array) -> Array:
    T = jnp.asarray(sde.T)
    m = pulse_multiplier(case, T - jnp.asarray(t), T, edge)
    return (1.0 + epsilon * bcast(m, x).astype(x.dtype)) * score_fn(x, t)

  return fn


def tweedie_denoise(sde, score_fn: ScoreFn, x: Array, t: Array) -> Array:
  """E[x_0 | x_t] = (x_t + sigma_t^2 grad log p_t(x_t)) / alpha_t (Tweedie's formula for
  x_t = alpha_t x_0 + sigma_t z; one score evaluation)."""
  return _tweedie(sde, x, t, score_fn(x, t))


def _tweedie(sde, x: Array, t: Array, score: Array) -> Array:
  """Tweedie's E[x_0 | x_t] from a score value already computed at (x, t)."""
  alpha, sigma = sde.marginal_coeffs(t)
  return (x + bcast(sigma, x) ** 2 * score) / bcast(alpha, x)


# -- time grids, the per-step hook, trajectories ---------------------------------------------------
HOOK_STREAM = 0x600C  # fold_in tag of the hook's keys (the samplers' own streams stay unchanged)


def uniform_time_grid(sde, n_steps: int) -> Array:
  """t_i = T - i (T - eps) / N for i < N and t_N = eps, shape (N + 1,): the fixed-step samplers'
  default grid (Song et al. 2021's discretization)."""
  if n_steps < 1:
    raise ValueError(f"sampling.n_steps must be >= 1, got {n_steps}")
  T, eps = jnp.asarray(sde.T), jnp.asarray(sde.eps)
  dt = (T - eps) / n_steps
  return jnp.append(T - dt * jnp.arange(n_steps), eps)


def _check_grid(time_grid: Array) -> Array:
  grid = jnp.asarray(time_grid)
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f"time_grid must be a 1-D array of at least 2 decreasing times (T -> eps), "
                     f"got shape {grid.shape}")
  return grid


@dataclasses.dataclass(frozen=True)
class Recording:
  """A step hook that records the trajectory (``build(record_trajectory=True)``): stats gain
  ``trajectory_t`` (N,), ``trajectory_x`` and ``trajectory_denoised`` (N, *shape), the state each
  step starts from (heun: after its churn) and E[x_0 | x_t] from that step's score (no extra NFE).
  ``hook`` (if any) runs as usual."""
  hook: Optional[StepHook] = None

  def __call__(self, x: Array, t: Array, key: Array, i: Array) -> Array:
    return x if self.hook is None else self.hook(x, t, key, i)


def _hooked(step_hook: Optional[StepHook], key: Array, x: Array, t: Array, i,
            stage: int = 0) -> Array:
  """step_hook(x, t, k, i) with k = fold_in(fold_in(key, HOOK_STREAM), 2 i + stage), a stream
  apart from the sampler's own (x itself without a hook)."""
  if step_hook is None:
    return x
  k = jax.random.fold_in(jax.random.fold_in(key, HOOK_STREAM), 2 * i + stage)
  return step_hook(x, jnp.asarray(t, x.dtype), k, i)


def _entry(step_hook: Optional[StepHook], t: Array, x: Array,
           denoised: Callable[[], Array]) -> Optional[Stats]:
  """One step's trajectory entry (t, x_t, E[x_0 | x_t]) when the hook is a ``Recording``."""
  if not isinstance(step_hook, Recording):
    return None
  return {"trajectory_t": jnp.asarray(t), "trajectory_x": x, "trajectory_denoised": denoised()}


def _fixed_stats(nfe: int, n: int, recorded: Optional[Stats]) -> Stats:
  return {"nfe": jnp.asarray(nfe), "num_steps": jnp.asarray(n), **(recorded or {})}


def _forward_time_terms(sde, score_fn: ScoreFn, c: Array) -> tuple[Callable, Callable]:
  """Drift and (scalar) diffusion of the generative family in forward time s = T - t."""
  gen = sde.reverse(score_fn, c)
  T = jnp.asarray(sde.T)

  def drift(s, x, args):
    return -gen.drift(x, T - s)

  def diffusion(s):
    return gen.diffusion(T - s)

  return drift, diffusion


def _int_stats(sol: diffrax.Solution) -> Stats:
  return {"num_steps": jnp.asarray(sol.stats["num_steps"]),
          "num_accepted_steps": jnp.asarray(sol.stats["num_accepted_steps"]),
          "num_rejected_steps": jnp.asarray(sol.stats["num_rejected_steps"]),
          "success": sol.result == diffrax.RESULTS.successful}


# ---------------------------------------------------------------------------------------------------
# Probability-flow ODE and the generative SDE family (diffrax, forward time s = T - t)
# ---------------------------------------------------------------------------------------------------

def ode_sampler(score_fn: ScoreFn, sde, x: Array, key: Array, time_grid: Array, *,
                solver: str = "tsit5", rtol: float = 1e-5, atol: float = 1e-5,
                max_steps: int = 100_000, dt0: Optional[Array | float] = None
                ) -> tuple[Array, Stats]:
  """Probability-flow ODE dx = [f - 1/2 g^2 s] dt (Song et al. 2021, eq. 13) from t_0 to t_N (the
  grid's ends; adaptive Tsit5 / Dopri5 steps, PID rtol/atol, first step dt0 default (t_0 - t_N) /
  100; the key is not used). NFE = 1 + 6 num_steps, rejections included (docs/samplers.md)."""
  if solver not in ODE_SOLVERS:
    raise ValueError(f"sampling.solver must be one of {sorted(ODE_SOLVERS)} for the ODE, got {solver!r}")
  drift, _ = _forward_time_terms(sde, score_fn, jnp.zeros(()))
  term = diffrax.ODETerm(drift)
  s0, s1 = jnp.asarray(sde.T) - time_grid[0], jnp.asarray(sde.T) - time_grid[-1]
  dt0 = (s1 - s0) / 100.0 if dt0 is None else jnp.asarray(dt0)
  diffrax_solver = ODE_SOLVERS[solver]()
  # Hand diffrax a valid first-same-as-last state (one evaluation at the initial point) so that no
  # stage is ever recomputed: NFE = 1 + 6 * num_steps exactly, rejections included.
  solver_state = (jnp.asarray(False), drift(s0, x, None))
  if (jax.tree_util.tree_structure(diffrax_solver.init(term, s0, s1, x, None))
      != jax.tree_util.tree_structure(solver_state)):
    raise RuntimeError("unexpected diffrax solver state layout; update samplers.ode_sampler")
  sol = diffrax.diffeqsolve(
      term, diffrax_solver, t0=s0, t1=s1, dt0=dt0, y0=x,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, solver_state=solver_state, throw=False)
  stats = _int_stats(sol)
  return sol.ys[0], {**stats, "nfe": 1 + ODE_STAGE_COST[solver] * stats["num_steps"]}


def _check_sde_solver(solver: str, adaptive: bool) -> None:
  """ValueError naming sampling.solver unless it is an SDE solver usable with ``adaptive``."""
  if solver not in SDE_SOLVERS:
    raise ValueError(f"sampling.solver must be one of {sorted(SDE_SOLVERS)} for the SDE, got {solver!r}")
  if adaptive and solver == "euler":
    raise ValueError("sampling.solver='euler' (Euler-Maruyama, also what an ODE solver name means "
                     "for the SDE) has no error estimate; use heun/sra1/shark when adaptive")


def sde_sampler(score_fn: ScoreFn, sde, x: Array, key: Array, time_grid: Array, *,
                c: Array | float = 1.0, solver: str = "euler", adaptive: bool = False,
                rtol: float = 1e-3, atol: float = 1e-3, max_steps: Optional[int] = None,
                brownian_tol: Optional[float] = None) -> tuple[Array, Stats]:
  """dx = [f - (1 + c)/2 g^2 s] dt + sqrt(c) g dw_bar (Cao et al., eq. 2-3 with h^2 = c g^2) by
  diffrax in forward time s = T - t: fixed steps to every t_i, or (``adaptive``) PID steps from
  t_0 to t_N starting with the mean step (docs/samplers.md). No step hook: 'pc' runs hooks."""
  _check_sde_solver(solver, adaptive)
  _check_c(c)
  drift, diffusion = _forward_time_terms(sde, score_fn, jnp.asarray(c))
  s_grid = jnp.asarray(sde.T) - time_grid
  s0, s1, n = s_grid[0], s_grid[-1], s_grid.shape[0] - 1
  levy = diffrax.SpaceTimeLevyArea if solver in _NEEDS_LEVY_AREA else diffrax.BrownianIncrement
  bm_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)

  def diffusion_vf(s, x, args):
    return lx.DiagonalLinearOperator(jnp.broadcast_to(diffusion(s).astype(x.dtype), x.shape))

  if adaptive:
    tol = (s1 - s0) * 2.0**-14 if brownian_tol is None else brownian_tol
    bm = diffrax.VirtualBrownianTree(s0, s1, tol=tol, shape=bm_shape, key=key, levy_area=levy)
    controller, dt0 = diffrax.PIDController(rtol=rtol, atol=atol), (s1 - s0) / n
    steps = 16 * n if max_steps is None else max_steps
    adjoint = diffrax.RecursiveCheckpointAdjoint()
  else:
    bm = diffrax.UnsafeBrownianPath(shape=bm_shape, key=key, levy_area=levy)
    controller, dt0 = diffrax.StepTo(ts=s_grid), None
    steps = n if max_steps is None else max(max_steps, n)
    adjoint = diffrax.ForwardMode()  # UnsafeBrownianPath is not reverse-differentiable
  terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion_vf, bm))
  sol = diffrax.diffeqsolve(
      terms, SDE_SOLVERS[solver](), t0=s0, t1=s1, dt0=dt0, y0=x, stepsize_controller=controller,
      saveat=diffrax.SaveAt(t1=True), max_steps=steps, adjoint=adjoint, throw=False)
  stats = _int_stats(sol)
  return sol.ys[0], {**stats, "nfe": SDE_STAGE_COST[solver] * stats["num_steps"]}


# ---------------------------------------------------------------------------------------------------
# Predictor-corrector (Song et al. 2021, Algorithms 2-3)
# ---------------------------------------------------------------------------------------------------

def _transition_coeffs(sde, t: Array, t_next: Array) -> tuple[Array, Array]:
  """(a, b^2) of the exact forward transition x_t = a x_{t'} + b z from t' = t_next to t:
  a = alpha_t / alpha_{t'}, b^2 = sigma_t^2 - a^2 sigma_{t'}^2 (for VP a^2 = 1 - beta_i of DDPM,
  for VE b^2 = sigma_t^2 - sigma_{t'}^2 of NCSN: score_sde's discretizations)."""
  alpha_t, sigma_t = sde.marginal_coeffs(t)
  alpha_s, sigma_s = sde.marginal_coeffs(t_next)
  a = alpha_t / alpha_s
  return a, jnp.maximum(sigma_t**2 - a**2 * sigma_s**2, 0.0)


def _batch_norm(v: Array) -> Array:
  """Mean over the batch of the per-example L2 norms (score_sde's Langevin step size)."""
  return jnp.mean(jnp.sqrt(sde_lib.sum_except_batch(v**2)))


def pc_sampler(score_fn: ScoreFn, sde, x: Array, key: Array, time_grid: Array, *,
               step_hook: Optional[StepHook] = None, c: Array | float = 1.0,
               predictor: str = "reverse_diffusion", snr: Array | float = 0.16,
               n_corrector_steps: int = 1) -> tuple[Array, Stats]:
  """Predictor-corrector (Song et al. 2021, Algorithms 2-3) whose predictor steps the c-family (Cao
  et al., eq. 2-3); docs/samplers.md. NFE = N (1 + n_corrector_steps)."""
  if predictor not in PC_PREDICTORS:
    raise ValueError(f"sampling.predictor must be one of {PC_PREDICTORS}, got {predictor!r}")
  if n_corrector_steps < 0:
    raise ValueError(f"sampling.n_corrector_steps must be >= 0, got {n_corrector_steps}")
  _check_c(c)
  c, snr, n = jnp.asarray(c), jnp.asarray(snr), time_grid.shape[0] - 1
  half_1pc = 0.5 * (1.0 + c)  # exactly 1.0 for c = 1: the c = 1 arithmetic is unchanged

  def corrector(carry, _):  # x <- x + e s + sqrt(2 e) z, e = 2 a^2 (snr |z| / |s|)^2
    x, t, a2, key = carry
    key, k = jax.random.split(key)
    s, z = score_fn(x, t), jax.random.normal(k, x.shape, x.dtype)
    e = 2.0 * a2 * (snr * _batch_norm(z) / _batch_norm(s)) ** 2
    return (x + e * s + jnp.sqrt(2.0 * e) * z, t, a2, key), None

  def one_step(carry, i):
    (x, k_i), t, t_to = carry, time_grid[i], time_grid[i + 1]
    a, b2 = _transition_coeffs(sde, t, t_to)
    k_i, k_corr, k_pred = jax.random.split(k_i, 3)
    if n_corrector_steps > 0:
      (x, _, _, _), _ = jax.lax.scan(corrector, (x, t, a**2, k_corr), None, n_corrector_steps)
      x = _hooked(step_hook, key, x, t, i, 1)
    s, z = score_fn(x, t), jax.random.normal(k_pred, x.shape, x.dtype)
    if predictor == "reverse_diffusion":
      x_to = (2.0 - bcast(a, x)) * x + half_1pc * b2 * s + jnp.sqrt(c * b2) * z
    else:
      g, dt = bcast(sde.diffusion(t), x), t - t_to
      x_to = x - (sde.drift(x, t) - half_1pc * g**2 * s) * dt + jnp.sqrt(c) * g * jnp.sqrt(dt) * z
    return ((_hooked(step_hook, key, x_to, t_to, i), k_i),
            _entry(step_hook, t, x, lambda: _tweedie(sde, x, t, s)))

  (x, _), recorded = jax.lax.scan(one_step, (x, key), jnp.arange(n))
  return x, _fixed_stats(n * (1 + n_corrector_steps), n, recorded)


# ---------------------------------------------------------------------------------------------------
# Exponential integrator (Cao et al., Appendix H.4)
# ---------------------------------------------------------------------------------------------------

def exponential_step_coeffs(sde, t: Array, dt: Array) -> tuple[Array, Array, Array]:
  """(gamma, k, v) of one exponential-integrator step from t to t' = t - dt (Cao et al., Appendix
  H.4): x <- gamma x + (1 + c) k s(x, t) + sqrt(c v) z solves the generative SDE exactly on [t', t]
  with the score frozen at s(x, t), for VP / sub-VP (f = -1/2 beta x) and VE / EDM (f = 0). The
  closed forms per SDE are derived in docs/samplers.md; expm1 keeps small steps accurate."""
  if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
    half = 0.5 * (sde.int_beta(t) - sde.int_beta(t - dt))
    gamma = jnp.exp(half)
    k, v = jnp.expm1(half), jnp.expm1(2.0 * half)
    if isinstance(sde, sde_lib.subVPSDE):
      e = jnp.exp(-2.0 * sde.int_beta(t - dt))
      k = k + e / 3.0 * jnp.expm1(-3.0 * half)
      v = v + e * jnp.expm1(-2.0 * half)
    return gamma, k, v
  if isinstance(sde, sde_lib.VESDE):
    d = sde.sigma(t) ** 2 * -jnp.expm1(-2.0 * dt * sde.log_ratio())
  elif isinstance(sde, sde_lib.EDM):
    d = dt * (2.0 * t - dt)
  else:
    raise ValueError(f"the exponential integrator supports sde.name in {EXPONENTIAL_SDES}, got "
                     f"{type(sde).__name__}")
  return jnp.ones_like(d), 0.5 * d, d


def exponential_integrator_sampler(score_fn: ScoreFn, sde, x: Array, key: Array,
                                   time_grid: Array, *, step_hook: Optional[StepHook] = None,
                                   c: Array | float = 1.0) -> tuple[Array, Stats]:
  """Exponential integrator of the c-family (Cao et al., Appendix H.4; Zhang & Chen's DEIS idea)
  for VP, sub-VP, VE and EDM: x <- gamma x + (1 + c) k s(x, t) + sqrt(c v) z, the linear drift
  integrated exactly and the score frozen per step (``exponential_step_coeffs``). NFE = N."""
  if not isinstance(sde, EXPONENTIAL_SDE_CLASSES):
    raise ValueError(f"the exponential integrator supports sde.name in {EXPONENTIAL_SDES}, got "
                     f"{type(sde).__name__}")
  _check_c(c)
  c, n = jnp.asarray(c), time_grid.shape[0] - 1

  def one_step(x, i):
    t, t_to = time_grid[i], time_grid[i + 1]
    z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    gamma, k, v = exponential_step_coeffs(sde, t, t - t_to)
    s = score_fn(x, t)
    x_to = gamma * x + (1.0 + c) * k * s + jnp.sqrt(c * v) * z
    return (_hooked(step_hook, key, x_to, t_to, i),
            _entry(step_hook, t, x, lambda: _tweedie(sde, x, t, s)))

  x, recorded = jax.lax.scan(one_step, x, jnp.arange(n))
  return x, _fixed_stats(n, n, recorded)


# ---------------------------------------------------------------------------------------------------
# EDM's Heun sampler (Karras et al. 2022, Algorithms 1-2) and DDIM (Song et al. 2021a)
# ---------------------------------------------------------------------------------------------------

def edm_sigma_steps(sigma_max: Array | float, sigma_min: Array | float, n_steps: int,
                    rho: Array | float = 7.0) -> Array:
  """EDM time steps sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho for i < N, and sigma_N = 0 (Karras et al. 2022, eq. 5); shape (N + 1,)."""
  if n_steps < 2:
    raise ValueError(f"sampling.n_steps must be >= 2 for the EDM time steps, got {n_steps}")
  rho = jnp.asarray(rho)
  hi, lo = jnp.asarray(sigma_max) ** (1.0 / rho), jnp.asarray(sigma_min) ** (1.0 / rho)
  frac = jnp.arange(n_steps) / (n_steps - 1)
  return jnp.append((hi + frac * (lo - hi)) ** rho, 0.0)


def edm_time_grid(sde, n_points: int, rho: Optional[Array | float] = None) -> Array:
  """The times t_i = inverse_noise_level(sigma_i) of EDM's noise levels sigma_0 > ... > sigma_{n-1}
  between noise_level(T) and noise_level(eps) (Karras et al. 2022, eq. 5; ``edm_sigma_steps``
  without its sigma_N = 0), shape (n,); rho: ``sde.rho`` if the SDE has one, else EDM's 7. For the
  EDM SDE (t = sigma) these are EDM's sigmas themselves: 'heun''s default grid."""
  rho = (sde.rho if isinstance(sde, sde_lib.EDM) else 7.0) if rho is None else rho
  T, eps = jnp.asarray(sde.T), jnp.asarray(sde.eps)
  sigmas = edm_sigma_steps(sde.noise_level(T), sde.noise_level(eps), n_points, rho)
  return sde.inverse_noise_level(sigmas[:-1])


def heun_sampler(score_fn: ScoreFn, sde, x: Array, key: Array, time_grid: Array, *,
                 step_hook: Optional[StepHook] = None, s_churn: float = 0.0,
                 s_min: Array | float = 0.0, s_max: Array | float = math.inf,
                 s_noise: Array | float = 1.0) -> tuple[Array, Stats]:
  """EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 1; Algorithm 2's churn when
  s_churn > 0) for any SDE, in y = x / alpha_t and sigma = noise_level(t) (eq. 4 with s(t) =
  alpha_t; docs/samplers.md), on the noise levels of time_grid. NFE = 2 N."""
  times = time_grid.astype(x.dtype)
  sigmas = sde.noise_level(time_grid).astype(x.dtype)
  n, gamma = times.shape[0] - 1, min(float(s_churn) / times.shape[0], math.sqrt(2.0) - 1.0)

  def d(y: Array, sigma: Array) -> Array:  # dy/dsigma = (y - D(y; sigma)) / sigma
    t = sde.inverse_noise_level(sigma)
    alpha = sde.marginal_coeffs(t)[0]
    return -sigma * alpha * score_fn(alpha * y, jnp.broadcast_to(t, y.shape[:1]).astype(y.dtype))

  def step(y: Array, i: Array) -> tuple[Array, Optional[Stats]]:
    sigma, sigma_next, t_hat = sigmas[i], sigmas[i + 1], times[i]
    if gamma > 0:  # churn: sigma^ = (1 + g) sigma_i, y += sqrt(sigma^2 - sigma_i^2) s_noise z
      g = jnp.where((sigma >= s_min) & (sigma <= s_max), gamma, 0.0)
      z = jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
      y = y + sigma * jnp.sqrt(g * (2.0 + g)) * s_noise * z
      sigma, t_hat = sigma * (1.0 + g), sde.inverse_noise_level(sigma * (1.0 + g))
    d_cur = d(y, sigma)
    y_next = y + (sigma_next - sigma) * d_cur
    y_next = y + 0.5 * (sigma_next - sigma) * (d_cur + d(y_next, sigma_next))
    if step_hook is not None:  # entries the hook leaves alone stay bit for bit
      alpha_next = sde.marginal_coeffs(times[i + 1])[0]
      x_next = alpha_next * y_next
      hooked = _hooked(step_hook, key, x_next, times[i + 1], i)
      y_next = jnp.where(hooked == x_next, y_next, hooked / alpha_next)
    return y_next, _entry(step_hook, t_hat, sde.marginal_coeffs(t_hat)[0] * y,
                          lambda: y - sigma * d_cur)  # D(y; sigma) = E[x_0 | x_t]

  y, recorded = jax.lax.scan(step, x / sde.marginal_coeffs(times[0])[0], jnp.arange(n))
  return sde.marginal_coeffs(times[n])[0] * y, _fixed_stats(2 * n, n, recorded)


def ddim_sampler(score_fn: ScoreFn, sde, x: Array, key: Array, time_grid: Array, *,
                 step_hook: Optional[StepHook] = None) -> tuple[Array, Stats]:
  """Deterministic DDIM (Song et al. 2021a, eq. 12 with eta = 0): x0^ = (x_t + sigma_t^2 s) /
  alpha_t, x_{t'} = alpha_{t'} x0^ - sigma_{t'} sigma_t s; Euler's method for the probability-flow
  ODE in (x / alpha, sigma / alpha) (DDIM eq. 14), for every SDE of sde_lib. NFE = N."""
  times, n = time_grid.astype(x.dtype), time_grid.shape[0] - 1

  def one_step(x: Array, i: Array) -> tuple[Array, Optional[Stats]]:
    t, s = times[i], times[i + 1]
    alpha_t, sigma_t = sde.marginal_coeffs(t)
    alpha_s, sigma_s = sde.marginal_coeffs(s)
    score_t = score_fn(x, t)
    x0_hat = (x + sigma_t**2 * score_t) / alpha_t
    x_to = alpha_s * x0_hat - sigma_s * sigma_t * score_t
    return _hooked(step_hook, key, x_to, s, i), _entry(step_hook, t, x, lambda: x0_hat)

  x, recorded = jax.lax.scan(one_step, x, jnp.arange(n))
  return x, _fixed_stats(n, n, recorded)


# ---------------------------------------------------------------------------------------------------
# The builder: prior draw, score perturbation, time grid, Tweedie's final step
# ---------------------------------------------------------------------------------------------------

SAMPLER_FNS = {"ode": ode_sampler, "sde": sde_sampler, "pc": pc_sampler,
               "exponential": exponential_integrator_sampler, "heun": heun_sampler,
               "ddim": ddim_sampler}
# Default grids by sampler: the ODE's ends [T, eps], Heun's EDM levels, else uniform steps.
DEFAULT_GRIDS = {ode_sampler: lambda sde, n: uniform_time_grid(sde, 1), heun_sampler: edm_time_grid}
FIXED_STEP_METHODS = ("pc", "exponential", "heun", "ddim")


def _refuse_hook(sampler: Callable, option: str) -> ValueError:
  names = [k for k, v in SAMPLER_FNS.items() if v is sampler] or [sampler.__name__]
  return ValueError(f"sampling.method={names[0]!r} (diffrax steps) takes no {option}: use a "
                    f"fixed-step method {FIXED_STEP_METHODS} ('pc' with predictor="
                    "'euler_maruyama' and n_corrector_steps=0 is the fixed-step 'sde' with Euler)")


def build(sampler: Callable[..., tuple[Array, Stats]], sde, shape: Sequence[int], *,
          n_steps: int = 1000, time_grid: Optional[Array | Callable[[Any], Array]] = None,
          denoise: bool = False, prior: Optional[Prior] = None,
          score_perturbation: Optional[ScoreFn] = None, epsilon: Array | float = 0.0,
          record_trajectory: bool = False,
          **method_options) -> Callable[..., tuple[Array, Stats]]:
  """``sample_fn(score_fn, key, sde=sde, step_hook=None, x_init=None) -> (x, stats)``: ``sampler``
  from a ``prior`` draw (default ``sde.prior()``; key split(key)[0]) or ``x_init``, with the score
  s + epsilon E (Cao et al., eq. 6), on ``time_grid`` (an array or a function of the SDE; default
  ``DEFAULT_GRIDS`` or ``uniform_time_grid(sde, n_steps)``) and the sampler's key split(key)[1].
  ``denoise``: Tweedie's E[x_0 | x_{t_N}] (+1 NFE; then the hook once more, at t = 0)."""
  takes_hook = "step_hook" in inspect.signature(sampler).parameters
  if record_trajectory and not takes_hook:
    raise _refuse_hook(sampler, "record_trajectory")
  default_sde, shape = sde, tuple(shape)

  def sample_fn(score_fn: ScoreFn, key: Array, sde: Any = None,
                step_hook: Optional[StepHook] = None,
                x_init: Optional[Array] = None) -> tuple[Array, Stats]:
    sde = default_sde if sde is None else sde
    if step_hook is not None and not takes_hook:
      raise _refuse_hook(sampler, "step_hook")
    score = perturbed_score(score_fn, score_perturbation, epsilon)
    grid = (DEFAULT_GRIDS.get(sampler, uniform_time_grid)(sde, n_steps) if time_grid is None
            else _check_grid(time_grid(sde) if callable(time_grid) else time_grid))
    k_prior, k_run = jax.random.split(key)
    x = ((sde.prior() if prior is None else prior).sample(k_prior, shape) if x_init is None
         else jnp.asarray(x_init))
    hook = Recording(step_hook) if record_trajectory else step_hook
    x, stats = sampler(score, sde, x, k_run, grid, **method_options,
                       **({} if hook is None else {"step_hook": hook}))
    if denoise:
      x = _hooked(hook, k_run, tweedie_denoise(sde, score, x, grid[-1]), 0.0, grid.shape[0] - 1)
      stats = {**stats, "nfe": stats["nfe"] + 1}
    return x, stats

  return sample_fn


# ---------------------------------------------------------------------------------------------------
# Config entry point
# ---------------------------------------------------------------------------------------------------

# A builder maps the ``config.sampling`` section (and the SDE) to (sampler, options of ``build``);
# it refuses, naming the field, a setting its sampler cannot honour. Ranges are config_schema's.
SamplerBuilder = Callable[[Any, Any], tuple[Callable[..., tuple[Array, Stats]], dict]]
_SAMPLERS: dict[str, SamplerBuilder] = {}


def register_sampler(name: str) -> Callable[[SamplerBuilder], SamplerBuilder]:
  """Decorator registering ``builder(sampling_cfg, sde) -> (sampler, kwargs)`` as
  ``sampling.method = name``."""

  def decorator(builder: SamplerBuilder) -> SamplerBuilder:
    if name in _SAMPLERS and _SAMPLERS[name] is not builder:
      raise ValueError(f"sampling method {name!r} registered twice")
    _SAMPLERS[name] = builder
    return builder

  return decorator


def registered_samplers() -> tuple[str, ...]:
  """Names accepted by ``config.sampling.method``."""
  return tuple(_SAMPLERS)


def _fixed_steps_only(cfg, method: str) -> None:
  if cfg.adaptive:
    raise ValueError(f"sampling.adaptive: method {method!r} has fixed steps only, got True")


def _deterministic_only(cfg, method: str) -> None:
  """The probability-flow ODE samplers are c = 0 by definition: refuse any other sampling.c."""
  if cfg.c != 0.0:
    raise ValueError(f"sampling.c must be 0 for method {method!r} (it integrates the "
                     f"probability-flow ODE, h = 0); use method 'sde', 'pc' or 'exponential' "
                     f"for c > 0, got {cfg.c!r}")


@register_sampler("ode")
def _ode_options(cfg, sde):
  """Probability-flow ODE (c = 0 by definition, so sampling.c must be 0; n_steps not used)."""
  if cfg.solver not in ODE_SOLVERS:
    raise ValueError(f"sampling.solver must be one of {sorted(ODE_SOLVERS)} for method 'ode', "
                     f"got {cfg.solver!r}")
  _deterministic_only(cfg, "ode")
  return ode_sampler, dict(solver=cfg.solver, rtol=cfg.rtol, atol=cfg.atol,
                           max_steps=cfg.max_steps)


@register_sampler("sde")
def _sde_options(cfg, sde):
  """Generative SDE family in c; adaptive steps use sampling.rtol, atol and max_steps."""
  solver = "euler" if cfg.solver in ODE_SOLVERS else cfg.solver
  _check_sde_solver(solver, cfg.adaptive)
  kwargs = dict(c=cfg.c, n_steps=cfg.n_steps, solver=solver, adaptive=cfg.adaptive)
  if cfg.adaptive:
    kwargs.update(rtol=cfg.rtol, atol=cfg.atol, max_steps=cfg.max_steps)
  return sde_sampler, kwargs


@register_sampler("pc")
def _pc_options(cfg, sde):
  """Predictor-corrector; the predictor steps the generative family with h^2 = sampling.c g^2."""
  _fixed_steps_only(cfg, "pc")
  return pc_sampler, dict(c=cfg.c, n_steps=cfg.n_steps, predictor=cfg.predictor, snr=cfg.snr,
                          n_corrector_steps=cfg.n_corrector_steps)


@register_sampler("exponential")
def _exponential_options(cfg, sde):
  """Exponential integrator of the generative family (VP, sub-VP, VE, EDM)."""
  if not isinstance(sde, EXPONENTIAL_SDE_CLASSES):
    raise ValueError(f"sampling.method='exponential' needs sde.name in {EXPONENTIAL_SDES}, got "
                     f"{type(sde).__name__}")
  _fixed_steps_only(cfg, "exponential")
  return exponential_integrator_sampler, dict(c=cfg.c, n_steps=cfg.n_steps)


@register_sampler("heun")
def _heun_options(cfg, sde):
  """EDM's Heun sampler: sampling.n_steps noise levels (>= 2), churn S_churn / S_min / S_max /
  S_noise; deterministic unless S_churn > 0 (its noise is EDM's churn, not the c-family, so
  sampling.c must be 0; solver is not used)."""
  _fixed_steps_only(cfg, "heun")
  _deterministic_only(cfg, "heun")
  if cfg.n_steps < 2:
    raise ValueError(f"sampling.n_steps must be >= 2 for method 'heun', got {cfg.n_steps!r}")
  if cfg.S_min > cfg.S_max:
    raise ValueError(f"sampling.S_max must be >= sampling.S_min={cfg.S_min!r}, got {cfg.S_max!r}")
  return heun_sampler, dict(n_steps=cfg.n_steps, s_churn=cfg.S_churn, s_min=cfg.S_min,
                            s_max=cfg.S_max, s_noise=cfg.S_noise)


@register_sampler("ddim")
def _ddim_options(cfg, sde):
  """Deterministic DDIM (eta = 0, Euler for the probability-flow ODE: sampling.c must be 0) with
  sampling.n_steps steps."""
  _fixed_steps_only(cfg, "ddim")
  _deterministic_only(cfg, "ddim")
  return ddim_sampler, dict(n_steps=cfg.n_steps)


SAMPLING_METHODS = registered_samplers()  # the built-in methods


def check_step_hook(cfg) -> None:
  """ValueError naming sampling.method unless ``config.sampling`` selects a sampler that takes a
  ``step_hook`` (the fixed-step methods; 'ode' and 'sde' run diffrax)."""
  if cfg.method in ("ode", "sde"):
    raise ValueError(f"sampling.method={cfg.method!r} takes no per-step hook (inpainting, "
                     f"colorization): use one of {FIXED_STEP_METHODS} ('pc' with predictor="
                     "'euler_maruyama' and n_corrector_steps=0 is the fixed-step 'sde' with Euler)")


def perturbation_options(cfg) -> Optional[tuple[str, float, Optional[float]]]:
  """(case, epsilon, edge) of the eq. 44 score error selected by the ``sampling`` section (None
  for 'none'), for ``pulse_perturbed_score``. Refuses, naming the field, an epsilon without a case,
  a case without an epsilon, and a pulse edge for a case without a pulse (edge 0: the paper's)."""
  case, epsilon, edge = cfg.perturbation, cfg.perturbation_epsilon, cfg.perturbation_edge
  if case == "none":
    if epsilon != 0.0 or edge != 0.0:
      field, value = (("perturbation_epsilon", epsilon) if epsilon != 0.0
                      else ("perturbation_edge", edge))
      raise ValueError(f"sampling.{field} must be 0 with sampling.perturbation='none', got "
                       f"{value!r}")
    return None
  if epsilon == 0.0:
    raise ValueError(f"sampling.perturbation_epsilon must be non-zero with sampling.perturbation="
                     f"{case!r} (the error is epsilon E, Cao et al. eq. 6), got {epsilon!r}")
  if case not in PULSE_EDGES and edge != 0.0:
    raise ValueError(f"sampling.perturbation_edge is only used by {tuple(PULSE_EDGES)} and must be "
                     f"0 with sampling.perturbation={case!r}, got {edge!r}")
  return case, epsilon, (edge if edge != 0.0 else None) if case in PULSE_EDGES else None


def sampler_kwargs(sampling, sde) -> tuple[Callable[..., tuple[Array, Stats]], dict]:
  """(sampler, options of ``build``) for the ``sampling`` config section (typed,
  ``config_schema.validate(config).sampling``) from the registry: the method's own options plus
  ``denoise``. ValueError names a field the sampler cannot honour (call outside jit); the score
  perturbation fields are checked here too (every sampler honours them, see get_sampler)."""
  if sampling.method not in _SAMPLERS:
    raise ValueError(f"sampling.method must be one of {registered_samplers()}, got "
                     f"{sampling.method!r}")
  perturbation_options(sampling)
  fn, kwargs = _SAMPLERS[sampling.method](sampling, sde)
  return fn, dict(kwargs, denoise=sampling.denoise)


def get_sampler(sampling, sde, shape: Sequence[int], prior: Optional[Prior] = None,
                score_perturbation: Optional[ScoreFn] = None,
                epsilon: Array | float = 0.0) -> Callable[..., tuple[Array, Stats]]:
  """``sample_fn(score_fn, key, sde=sde, step_hook=None) -> (samples, stats)``: ``build`` with the
  sampler and options that the ``sampling`` config section (typed, validated at the boundary)
  selects. ``sampling.perturbation`` (not 'none') replaces the score by the eq. 44 error of Cao
  et al., (1 + perturbation_epsilon m(T - t)) s, and cannot be combined with an explicit
  ``score_perturbation``. Unhonoured settings raise ValueError naming the field (outside jit)."""
  fn, kwargs = sampler_kwargs(sampling, sde)
  pulse = perturbation_options(sampling)
  if pulse is not None and score_perturbation is not None:
    raise ValueError(f"sampling.perturbation={pulse[0]!r} and an explicit score_perturbation "
                     "cannot be combined; set sampling.perturbation='none'")
  run = build(fn, sde, shape, prior=prior, score_perturbation=score_perturbation, epsilon=epsilon,
              **kwargs)
  default_sde = sde

  def sample_fn(score_fn: ScoreFn, key: Array, sde: Any = None,
                step_hook: Optional[StepHook] = None) -> tuple[Array, Stats]:
    sde = default_sde if sde is None else sde
    if pulse is not None:
      score_fn = pulse_perturbed_score(score_fn, sde, *pulse)
    return run(score_fn, key, sde, step_hook)

  return sample_fn
