"""Generative samplers on device: probability-flow ODE, the generative SDE family in c,
predictor-corrector, the exponential integrator, EDM's Heun sampler and DDIM.

Every sampler is a pure function ``sampler(score_fn, sde, key, shape, **options) -> (samples, stats)``
that runs entirely under ``jax.jit`` (no host round trip per step). ``score_fn(x, t)`` is a plain
score (parameters bound, see models.utils); ``sde`` is an ``sde_lib`` SDE whose ``T`` and ``eps`` are
array leaves, so passing the SDE as a jit argument sweeps ``T``/``eps`` without recompiling; ``c``,
``snr`` and ``epsilon`` are array arguments as well. Static options: ``shape``, solver names, step
counts and ``max_steps``.

The generative family (Cao et al., "Exploring the optimal choice for generative processes in
diffusion models: ordinary vs stochastic differential equations", eq. 2-3, with h^2 = c g^2) is

    dx = [f(x, t) - (1 + c)/2 g(t)^2 s(x, t)] dt + sqrt(c) g(t) dw_bar,   t from T down to eps.

The diffrax-based samplers integrate it in forward time ``s = T - t`` on ``[0, T - eps]``:

    dx = -[f(x, T - s) - (1 + c)/2 g^2 s(x, T - s)] ds + sqrt(c) g(T - s) dW_s,

because diffrax's stochastic Runge-Kutta solvers are wrong when integrating backwards in time
(diffrax issue #598), and one convention serves the ODE and the SDEs.

``stats`` always holds ``'nfe'``, the exact number of calls to ``score_fn`` (the tests check it
against a counting wrapper), and the solver's step counts. NFE bookkeeping for diffrax:
* FSAL Runge-Kutta ODE solvers (Tsit5, Dopri5: 7 stages, the last reused) cost 6 calls per step,
  accepted or rejected, plus 1 call at the initial point. We pass the solver state (first-stage
  value) ourselves, because diffrax otherwise re-evaluates the first stage after every rejection of
  the very first step, which the solve statistics cannot reveal.
* SDE solvers are not FSAL in diffrax: Euler 1, Heun / SRA1 / ShARK 2 drift calls per step.
* ``denoise`` adds 1 call (Tweedie's formula at ``eps``).

Options shared by all samplers:
* ``denoise``: return E[x_0 | x_eps] = (x + sigma_eps^2 s(x, eps)) / alpha_eps (Tweedie's formula for
  the Gaussian transition x_eps = alpha_eps x_0 + sigma_eps z) instead of x_eps.
* ``prior``: any object with ``sample(key, shape)`` and ``log_prob(x)`` (default ``sde.prior()``;
  auxiliary priors of Franzese et al. share this interface).
* ``score_perturbation`` E(x, t) and ``epsilon``: the sampler uses s + epsilon E(x, t) (Cao et al.,
  eq. 6; the pulse-shaped errors of their Section 3.4 and Appendix G). The eq. 44 errors E = m s
  (cases 1-5, ``pulse_perturbed_score``) are what ``sampling.perturbation`` selects in get_sampler.
* ``x_init``: start from these values instead of a prior draw (e.g. for pathwise comparisons).

Options of the fixed-step samplers (``pc_sampler``, ``exponential_integrator_sampler``,
``heun_sampler``, ``ddim_sampler``; ``sde_sampler`` with fixed steps):
* ``time_grid``: the times t_0 > t_1 > ... > t_N of the N steps, any 1-D array (k-diffusion's
  ``sigmas`` argument, in time): ``uniform_time_grid(sde, n)`` (the default, N = n_steps) or
  ``edm_time_grid(sde, n)`` (Karras et al. 2022, eq. 5; heun's default with n = n_steps noise
  levels) or a user grid. The grid overrides ``n_steps``; NFE counts follow N.
* ``step_hook(x, t, key, i) -> x``: applied inside the scan after step i, x then being at time
  t = t_{i+1} (after a final denoising step: t = 0); the functional form of k-diffusion's
  ``callback``. Its keys fold_in(fold_in(key, HOOK_STREAM), .) leave the sampler's own random
  streams, so a hook that returns x unchanged changes nothing. controllable.py's imputation and
  colorization are hooks. ('sde': fixed Euler-Maruyama steps only, run as
  ``pc_sampler(predictor='euler_maruyama', n_corrector_steps=0)``, the same update.)
* ``record_trajectory``: stats gain ``trajectory_t`` (N,), ``trajectory_x`` and
  ``trajectory_denoised`` (N, *shape): the state each step starts from (heun: after its churn)
  and E[x_0 | x_t] (Tweedie) from the score that step evaluates, at no extra NFE.
The adaptive samplers ('ode', adaptive 'sde') refuse a hook or a grid with an error naming
``sampling.method``.
"""
from __future__ import annotations

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


def _initial_state(sde, key: Array, shape: Sequence[int], prior: Optional[Prior],
                   x_init: Optional[Array]) -> Array:
  if x_init is not None:
    return jnp.asarray(x_init)
  prior = sde.prior() if prior is None else prior
  return prior.sample(key, tuple(shape))


def _finish(sde, score_fn: ScoreFn, x: Array, nfe: Array, denoise: bool,
            hook: Optional[Callable] = None, i: int = 0) -> tuple[Array, Array]:
  """Tweedie's denoising step at eps when ``denoise`` (then the step hook, as step i at t = 0)."""
  if denoise:
    x = tweedie_denoise(sde, score_fn, x, jnp.asarray(sde.eps))
    return (x if hook is None else hook(x, 0.0, i)), nfe + 1
  return x, nfe


# -- fixed-step options: time grids, the per-step hook, trajectories ---------------------------------
StepHook = Callable[[Array, Array, Array, Array], Array]  # (x, t, key, i) -> x
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


def _grid_steps(sde, n_steps: int, time_grid: Optional[Array]) -> tuple[Array, Array, int]:
  """(t_i, t_{i+1}) of every step and the number of steps N, from ``time_grid`` (default
  ``uniform_time_grid(sde, n_steps)``)."""
  grid = uniform_time_grid(sde, n_steps) if time_grid is None else _check_grid(time_grid)
  return grid[:-1], grid[1:], grid.shape[0] - 1


def _hook_fn(step_hook: Optional[StepHook], key: Optional[Array]) -> Callable:
  """``apply(x, t, i, stage=0)`` = step_hook(x, t, its key, i) (the identity without a hook); the
  key is fold_in(fold_in(key, HOOK_STREAM), 2 i + stage)."""
  if step_hook is None:
    return lambda x, t, i, stage=0: x
  if key is None:
    raise ValueError("a step_hook needs the sampler's key, got key=None")
  base = jax.random.fold_in(key, HOOK_STREAM)

  def apply(x: Array, t: Array, i: Array, stage: int = 0) -> Array:
    k = jax.random.fold_in(base, 2 * i + stage)
    return step_hook(x, jnp.asarray(t, x.dtype), k, i)

  return apply


def _record(record: bool, t: Array, x: Array, denoised: Callable[[], Array]) -> Optional[Stats]:
  """One step's trajectory entry (t, x_t, E[x_0 | x_t]), if recorded (``denoised`` is lazy)."""
  if not record:
    return None
  return {"trajectory_t": jnp.asarray(t), "trajectory_x": x, "trajectory_denoised": denoised()}


def _refuse_hook(method: str, why: str, step_hook, time_grid, record_trajectory: bool) -> None:
  """ValueError naming sampling.method for fixed-step options given to an adaptive sampler."""
  given = [name for name, v in (("step_hook", step_hook), ("time_grid", time_grid),
                                ("record_trajectory", record_trajectory or None)) if v is not None]
  if given:
    raise ValueError(f"sampling.method={method!r} ({why}) takes no {', '.join(given)}: use a "
                     "fixed-step method ('pc', 'exponential', 'heun', 'ddim', or 'sde' with "
                     "adaptive=False and solver 'euler')")


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
# Probability-flow ODE
# ---------------------------------------------------------------------------------------------------

def ode_sampler(score_fn: ScoreFn, sde, key: Array, shape: Sequence[int], *,
                solver: str = "tsit5", rtol: float = 1e-5, atol: float = 1e-5,
                max_steps: int = 100_000, dt0: Optional[Array | float] = None,
                denoise: bool = False, prior: Optional[Prior] = None,
                score_perturbation: Optional[ScoreFn] = None, epsilon: Array | float = 0.0,
                x_init: Optional[Array] = None, time_grid: Optional[Array] = None,
                step_hook: Optional[StepHook] = None,
                record_trajectory: bool = False) -> tuple[Array, Stats]:
  """Probability-flow ODE dx = [f - 1/2 g^2 s] dt (Song et al. 2021, eq. 13; Cao et al. eq. 2-3
  with h = 0) from T to eps with an adaptive diffrax solver (Tsit5 / Dopri5, PID rtol/atol).

  ``dt0`` is the first step size (default (T - eps) / 100; the controller adapts it). ``stats``:
  nfe, num_steps, num_accepted_steps, num_rejected_steps, success (False if max_steps was hit).
  Adaptive: ``time_grid``, ``step_hook`` and ``record_trajectory`` are refused.
  """
  _refuse_hook("ode", "adaptive steps", step_hook, time_grid, record_trajectory)
  if solver not in ODE_SOLVERS:
    raise ValueError(f"sampling.solver must be one of {sorted(ODE_SOLVERS)} for the ODE, got {solver!r}")
  score = perturbed_score(score_fn, score_perturbation, epsilon)
  x0 = _initial_state(sde, key, shape, prior, x_init)
  drift, _ = _forward_time_terms(sde, score, jnp.zeros(()))
  term = diffrax.ODETerm(drift)
  s1 = jnp.asarray(sde.T) - jnp.asarray(sde.eps)
  dt0 = s1 / 100.0 if dt0 is None else jnp.asarray(dt0)
  diffrax_solver = ODE_SOLVERS[solver]()
  # Hand diffrax a valid first-same-as-last state (one evaluation at the initial point) so that no
  # stage is ever recomputed: NFE = 1 + 6 * num_steps exactly, rejections included.
  default_state = diffrax_solver.init(term, 0.0, s1, x0, None)
  f0 = drift(jnp.zeros(()), x0, None)
  solver_state = (jnp.asarray(False), f0)
  if jax.tree_util.tree_structure(default_state) != jax.tree_util.tree_structure(solver_state):
    raise RuntimeError("unexpected diffrax solver state layout; update samplers.ode_sampler")
  sol = diffrax.diffeqsolve(
      term, diffrax_solver, t0=0.0, t1=s1, dt0=dt0, y0=x0,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, solver_state=solver_state,
      throw=False)
  stats = _int_stats(sol)
  nfe = 1 + ODE_STAGE_COST[solver] * stats["num_steps"]
  x, stats["nfe"] = _finish(sde, score, sol.ys[0], nfe, denoise)
  return x, stats


# ---------------------------------------------------------------------------------------------------
# Generative SDE family (any c >= 0)
# ---------------------------------------------------------------------------------------------------

def _check_sde_solver(solver: str, adaptive: bool) -> None:
  """ValueError naming sampling.solver unless it is an SDE solver usable with ``adaptive``."""
  if solver not in SDE_SOLVERS:
    raise ValueError(f"sampling.solver must be one of {sorted(SDE_SOLVERS)} for the SDE, got {solver!r}")
  if adaptive and solver == "euler":
    raise ValueError("sampling.solver='euler' (Euler-Maruyama, also what an ODE solver name means "
                     "for the SDE) has no error estimate; use heun/sra1/shark when adaptive")


def sde_sampler(score_fn: ScoreFn, sde, key: Array, shape: Sequence[int], *,
                c: Array | float = 1.0, n_steps: int = 1000, solver: str = "euler",
                adaptive: bool = False, rtol: float = 1e-3, atol: float = 1e-3,
                max_steps: Optional[int] = None, brownian_tol: Optional[float] = None,
                denoise: bool = False, prior: Optional[Prior] = None,
                score_perturbation: Optional[ScoreFn] = None, epsilon: Array | float = 0.0,
                x_init: Optional[Array] = None, time_grid: Optional[Array] = None,
                step_hook: Optional[StepHook] = None,
                record_trajectory: bool = False) -> tuple[Array, Stats]:
  """dx = [f - (1 + c)/2 g^2 s] dt + sqrt(c) g dw_bar from T to eps (Cao et al., eq. 2-3 with
  h^2 = c g^2), integrated by diffrax in forward time s = T - t.

  Fixed steps (default): ``n_steps`` uniform steps (diffrax ``StepTo``) with a fast Brownian path
  (``UnsafeBrownianPath``, increments drawn per step; nothing but the final state is stored, so
  80k-step runs need O(batch) memory). ``solver``: 'euler' (Euler-Maruyama), 'heun', or the
  additive-noise stochastic Runge-Kutta methods 'sra1' / 'shark' (the noise sqrt(c) g(t) does not
  depend on x). ``adaptive=True``: PID step control with rtol/atol on a ``VirtualBrownianTree``
  (tolerance ``brownian_tol``, default (T - eps) * 2^-14), ``n_steps`` then sets the first step and
  ``max_steps`` (default 16 n_steps) bounds the work; Euler has no error estimate and is refused.
  ``time_grid`` (fixed steps): diffrax steps to s = T - t_i. A ``step_hook`` or
  ``record_trajectory`` (fixed Euler steps only) runs the same Euler-Maruyama update as a scan,
  ``pc_sampler(predictor='euler_maruyama', n_corrector_steps=0)`` (its own random stream).
  """
  _check_sde_solver(solver, adaptive)
  _check_c(c)
  if adaptive:
    _refuse_hook("sde", "adaptive=True", step_hook, time_grid, record_trajectory)
  if step_hook is not None or record_trajectory:
    if solver != "euler":
      raise ValueError(f"sampling.method='sde' takes a step_hook / record_trajectory with solver "
                       f"'euler' (Euler-Maruyama) only, got sampling.solver={solver!r}")
    return pc_sampler(score_fn, sde, key, shape, c=c, n_steps=n_steps, predictor="euler_maruyama",
                      n_corrector_steps=0, denoise=denoise, prior=prior,
                      score_perturbation=score_perturbation, epsilon=epsilon, x_init=x_init,
                      time_grid=time_grid, step_hook=step_hook,
                      record_trajectory=record_trajectory)
  c = jnp.asarray(c)
  score = perturbed_score(score_fn, score_perturbation, epsilon)
  k_prior, k_bm = jax.random.split(key)
  x0 = _initial_state(sde, k_prior, shape, prior, x_init)
  drift, diffusion = _forward_time_terms(sde, score, c)
  s1 = jnp.asarray(sde.T) - jnp.asarray(sde.eps)
  levy = diffrax.SpaceTimeLevyArea if solver in _NEEDS_LEVY_AREA else diffrax.BrownianIncrement
  bm_shape = jax.ShapeDtypeStruct(x0.shape, x0.dtype)

  def diffusion_vf(s, x, args):
    return lx.DiagonalLinearOperator(jnp.broadcast_to(diffusion(s).astype(x.dtype), x.shape))

  if adaptive:
    tol = s1 * 2.0**-14 if brownian_tol is None else brownian_tol
    bm = diffrax.VirtualBrownianTree(0.0, s1, tol=tol, shape=bm_shape, key=k_bm, levy_area=levy)
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    dt0 = s1 / n_steps
    t0, t1 = 0.0, s1
    steps = 16 * n_steps if max_steps is None else max_steps
    adjoint = diffrax.RecursiveCheckpointAdjoint()
  else:
    bm = diffrax.UnsafeBrownianPath(shape=bm_shape, key=k_bm, levy_area=levy)
    s_grid = (jnp.linspace(0.0, 1.0, n_steps + 1) * s1 if time_grid is None
              else jnp.asarray(sde.T) - _check_grid(time_grid))
    controller = diffrax.StepTo(ts=s_grid)
    n_steps = s_grid.shape[0] - 1
    t0, t1 = (0.0, s1) if time_grid is None else (s_grid[0], s_grid[-1])
    dt0 = None
    steps = n_steps if max_steps is None else max(max_steps, n_steps)
    adjoint = diffrax.ForwardMode()  # UnsafeBrownianPath is not reverse-differentiable
  terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion_vf, bm))
  sol = diffrax.diffeqsolve(
      terms, SDE_SOLVERS[solver](), t0=t0, t1=t1, dt0=dt0, y0=x0,
      stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True), max_steps=steps,
      adjoint=adjoint, throw=False)
  stats = _int_stats(sol)
  nfe = SDE_STAGE_COST[solver] * stats["num_steps"]
  x, stats["nfe"] = _finish(sde, score, sol.ys[0], nfe, denoise)
  return x, stats


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


def pc_sampler(score_fn: ScoreFn, sde, key: Array, shape: Sequence[int], *,
               c: Array | float = 1.0, n_steps: int = 1000, predictor: str = "reverse_diffusion",
               snr: Array | float = 0.16, n_corrector_steps: int = 1,
               denoise: bool = False, prior: Optional[Prior] = None,
               score_perturbation: Optional[ScoreFn] = None, epsilon: Array | float = 0.0,
               x_init: Optional[Array] = None, time_grid: Optional[Array] = None,
               step_hook: Optional[StepHook] = None,
               record_trajectory: bool = False) -> tuple[Array, Stats]:
  """Predictor-corrector sampling (Song et al. 2021, "Score-based generative modeling through
  SDEs", Algorithms 2-3 and Appendix G), a ``lax.scan`` over the steps t_i -> t_{i+1} of
  ``time_grid`` (default: n_steps uniform steps), whose predictor steps the generative process of
  Cao et al. (eq. 2-3) with h^2 = c g^2: drift f - (1 + c)/2 g^2 s, diffusion sqrt(c) g (c = 1:
  score_sde's reverse SDE; c = 0: the probability-flow ODE).

  At each t_i: ``n_corrector_steps`` Langevin steps x <- x + e s + sqrt(2 e) z with
  e = 2 a^2 (snr |z| / |s|)^2 (norms averaged over the batch, a^2 = alpha_t^2 / alpha_{t'}^2 as
  score_sde's 1 - beta_i for VP and 1 for VE), then one predictor step to t' = t_{i+1}:
  'reverse_diffusion': x <- (2 - a) x + (1 + c)/2 b^2 s + sqrt(c) b z with the exact transition
  (a, b) of ``_transition_coeffs``: score_sde's ReverseDiffusionPredictor (DDPM/NCSN
  discretization, forward step x <- a x + b z, i.e. discrete drift (a - 1) x and diffusion b)
  with the reverse drift and diffusion of the c-family, x <- x - [(a - 1) x - (1 + c)/2 b^2 s]
  + sqrt(c) b z; 'euler_maruyama': x <- x - [f - (1 + c)/2 g^2 s] dt + sqrt(c) g sqrt(dt) z,
  dt = t_i - t_{i+1} (with no corrector: the fixed-step Euler-Maruyama of the c-family).
  The Langevin corrector targets p_t whatever c is. ``step_hook`` runs after the corrector (at
  t_i) and after the predictor (at t_{i+1}), as score_sde's inpainter replaces after both.
  NFE = N (1 + n_corrector_steps) (+1 with denoise).
  """
  if predictor not in PC_PREDICTORS:
    raise ValueError(f"sampling.predictor must be one of {PC_PREDICTORS}, got {predictor!r}")
  if n_corrector_steps < 0:
    raise ValueError(f"sampling.n_corrector_steps must be >= 0, got {n_corrector_steps}")
  _check_c(c)
  c = jnp.asarray(c)
  half_1pc = 0.5 * (1.0 + c)  # exactly 1.0 for c = 1: the c = 1 arithmetic is unchanged
  score = perturbed_score(score_fn, score_perturbation, epsilon)
  snr = jnp.asarray(snr)
  hook = _hook_fn(step_hook, key)
  k_prior, k_loop = jax.random.split(key)
  x = _initial_state(sde, k_prior, shape, prior, x_init)
  ts, t_next, n = _grid_steps(sde, n_steps, time_grid)

  def batch_norm(v):
    return jnp.mean(jnp.sqrt(sde_lib.sum_except_batch(v**2)))

  def corrector(carry, _):
    x, t, a2, key = carry
    key, k = jax.random.split(key)
    s = score(x, t)
    z = jax.random.normal(k, x.shape, x.dtype)
    step = 2.0 * a2 * (snr * batch_norm(z) / batch_norm(s)) ** 2
    x = x + step * s + jnp.sqrt(2.0 * step) * z
    return (x, t, a2, key), None

  def one_step(carry, inputs):
    x, key = carry
    i, t, t_to = inputs
    a, b2 = _transition_coeffs(sde, t, t_to)
    key, k_corr, k_pred = jax.random.split(key, 3)
    if n_corrector_steps > 0:
      (x, _, _, _), _ = jax.lax.scan(corrector, (x, t, a**2, k_corr), None,
                                     length=n_corrector_steps)
      x = hook(x, t, i, 1)
    s = score(x, t)
    z = jax.random.normal(k_pred, x.shape, x.dtype)
    if predictor == "reverse_diffusion":
      x_to = (2.0 - bcast(a, x)) * x + half_1pc * b2 * s + jnp.sqrt(c * b2) * z
    else:
      g, dt = bcast(sde.diffusion(t), x), t - t_to
      x_to = x - (sde.drift(x, t) - half_1pc * g**2 * s) * dt + jnp.sqrt(c) * g * jnp.sqrt(dt) * z
    return (hook(x_to, t_to, i), key), _record(record_trajectory, t, x,
                                               lambda: _tweedie(sde, x, t, s))

  (x, _), recorded = jax.lax.scan(one_step, (x, k_loop), (jnp.arange(n), ts, t_next))
  nfe = jnp.asarray(n * (1 + n_corrector_steps))
  x, nfe = _finish(sde, score, x, nfe, denoise, hook, n)
  return x, {"nfe": nfe, "num_steps": jnp.asarray(n), **(recorded or {})}


# ---------------------------------------------------------------------------------------------------
# Exponential integrator (Cao et al., Appendix H.4)
# ---------------------------------------------------------------------------------------------------

def exponential_step_coeffs(sde, t: Array, dt: Array) -> tuple[Array, Array, Array]:
  """(gamma, k, v) of one exponential-integrator step from t to t' = t - dt (Cao et al.,
  Appendix H.4): x <- gamma x + (1 + c) k s(x, t) + sqrt(c v) z is the exact solution of the
  generative SDE dx = [f - (1 + c)/2 g^2 s] dt + sqrt(c) g dw_bar on [t', t] with the score frozen
  at s(x, t), for the linear drift f = -1/2 beta x (VP, sub-VP) or f = 0 (VE, EDM).

  Derivation: with alpha = exp(-B/2), B(t) = int_0^t beta (alpha = 1 when f = 0), y = x / alpha
  has no linear term, dy = -(1 + c)/2 g^2 / alpha s dt + sqrt(c) g / alpha dw_bar, so
      gamma = alpha(t') / alpha(t),
      k = 1/2 alpha(t') int_{t'}^t g^2 / alpha du,  v = alpha(t')^2 int_{t'}^t g^2 / alpha^2 du.
  With h = (B(t) - B(t')) / 2 and e = exp(-2 B(t')):
  * VP (g^2 = beta): gamma = e^h, k = e^h - 1, v = e^{2h} - 1 (the paper's gamma_k form);
  * sub-VP (g^2 = beta (1 - e^{-2B})): the extra -beta e^{-2B} in g^2 integrates to
    k = e^h - 1 - e / 3 (1 - e^{-3h}),  v = e^{2h} - 1 - e (1 - e^{-2h});
  * VE / EDM (f = 0, g^2 = d sigma^2 / dt): gamma = 1, k = D / 2, v = D with
    D = sigma(t)^2 - sigma(t')^2 (VE: sigma(t)^2 (1 - (sigma_max / sigma_min)^{-2 dt});
    EDM: sigma = t, D = dt (2 t - dt)).
  expm1 keeps the small-step differences accurate in float32.
  """
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


def exponential_integrator_sampler(score_fn: ScoreFn, sde, key: Array, shape: Sequence[int], *,
                                   c: Array | float = 1.0, n_steps: int = 1000,
                                   denoise: bool = False, prior: Optional[Prior] = None,
                                   score_perturbation: Optional[ScoreFn] = None,
                                   epsilon: Array | float = 0.0,
                                   x_init: Optional[Array] = None,
                                   time_grid: Optional[Array] = None,
                                   step_hook: Optional[StepHook] = None,
                                   record_trajectory: bool = False) -> tuple[Array, Stats]:
  """Exponential integrator of the generative family (Cao et al., Appendix H.4) for VP, sub-VP,
  VE and EDM: the linear part of the drift is integrated exactly and the score is frozen at the
  left end of each step, x <- gamma x + (1 + c) k s(x, t) + sqrt(c v) z with the closed forms
  (gamma, k, v) of ``exponential_step_coeffs`` on ``time_grid`` (default: the uniform grid
  t_i = T - i (T - eps) / N). For VP this is the paper's Y_{k+1} = gamma_k Y_k +
  (1 + c)(gamma_k - 1) S_k + sqrt(c (gamma_k^2 - 1)) Z_k (alpha^2 = c), valid for any T. It
  converges at first order to the ODE (c = 0, pathwise) and SDE (in law) solutions. The z's are
  drawn inside the loop (memory O(batch) for any n_steps). NFE = N (+1 denoise).
  """
  if not isinstance(sde, EXPONENTIAL_SDE_CLASSES):
    raise ValueError(f"the exponential integrator supports sde.name in {EXPONENTIAL_SDES}, got "
                     f"{type(sde).__name__}")
  _check_c(c)
  c = jnp.asarray(c)
  score = perturbed_score(score_fn, score_perturbation, epsilon)
  hook = _hook_fn(step_hook, key)
  k_prior, k_loop = jax.random.split(key)
  x = _initial_state(sde, k_prior, shape, prior, x_init)
  ts, t_next, n = _grid_steps(sde, n_steps, time_grid)

  def one_step(x, inputs):
    i, t, t_to = inputs
    z = jax.random.normal(jax.random.fold_in(k_loop, i), x.shape, x.dtype)
    gamma, k, v = exponential_step_coeffs(sde, t, t - t_to)
    s = score(x, t)
    x_to = gamma * x + (1.0 + c) * k * s + jnp.sqrt(c * v) * z
    return hook(x_to, t_to, i), _record(record_trajectory, t, x, lambda: _tweedie(sde, x, t, s))

  x, recorded = jax.lax.scan(one_step, x, (jnp.arange(n), ts, t_next))
  x, nfe = _finish(sde, score, x, jnp.asarray(n), denoise, hook, n)
  return x, {"nfe": nfe, "num_steps": jnp.asarray(n), **(recorded or {})}


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
  EDM SDE (t = sigma) these are EDM's sigmas themselves."""
  rho = (sde.rho if isinstance(sde, sde_lib.EDM) else 7.0) if rho is None else rho
  T, eps = jnp.asarray(sde.T), jnp.asarray(sde.eps)
  sigmas = edm_sigma_steps(sde.noise_level(T), sde.noise_level(eps), n_points, rho)
  return sde.inverse_noise_level(sigmas[:-1])


def _sigma_derivative(sde, score: ScoreFn) -> Callable[[Array, Array], Array]:
  """dy/dsigma = (y - D(y; sigma)) / sigma = -sigma alpha_t s(alpha_t y, t) with t = t(sigma): the
  probability-flow ODE of any SDE in EDM's variables y = x / alpha_t, sigma = sigma_t / alpha_t
  (Karras et al. 2022, eq. 4 with s(t) = alpha_t; ``sde.inverse_noise_level`` gives t)."""

  def d(y: Array, sigma: Array) -> Array:
    t = sde.inverse_noise_level(sigma)
    alpha = sde.marginal_coeffs(t)[0]
    return -sigma * alpha * score(alpha * y, jnp.broadcast_to(t, y.shape[:1]).astype(y.dtype))

  return d


def heun_sampler(score_fn: ScoreFn, sde, key: Array, shape: Sequence[int], *, n_steps: int = 18,
                 rho: Optional[Array | float] = None, s_churn: float = 0.0,
                 s_min: Array | float = 0.0, s_max: Array | float = math.inf,
                 s_noise: Array | float = 1.0, denoise: bool = True,
                 prior: Optional[Prior] = None, score_perturbation: Optional[ScoreFn] = None,
                 epsilon: Array | float = 0.0,
                 x_init: Optional[Array] = None, time_grid: Optional[Array] = None,
                 step_hook: Optional[StepHook] = None,
                 record_trajectory: bool = False) -> tuple[Array, Stats]:
  """EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 1; Algorithm 2 when s_churn > 0)
  for any SDE, in y = x / alpha_t and sigma = noise_level(t) (``_sigma_derivative``; EDM and VE
  have alpha = 1, EDM sigma = t), on the noise levels sigma_i = noise_level(t_i) of ``time_grid``
  (default ``edm_time_grid(sde, n_steps, rho)``: EDM's N = n_steps levels, eq. 5; rho:
  ``sde.rho`` if the SDE has one, else EDM's 7) and sigma_N = 0.

  Each step from sigma_i: churn (gamma = min(s_churn / N, sqrt 2 - 1) where s_min <= sigma_i <=
  s_max, else 0; sigma^ = (1 + gamma) sigma_i, y += sqrt(sigma^2 - sigma_i^2) s_noise z), an Euler
  step to sigma_{i+1} and the trapezoidal correction. ``denoise=True`` (EDM): the last step goes
  to sigma_N = 0 with Euler only, which is Tweedie's E[x_0 | x_eps] (``tweedie_denoise``): NFE =
  2 N - 1 (18 levels: 35). ``denoise=False`` stops at sigma_{N-1} = noise_level(eps) and
  returns x_eps: NFE = 2 (N - 1). ``s_churn`` is a static float (0: deterministic).
  """
  score = perturbed_score(score_fn, score_perturbation, epsilon)
  hook = _hook_fn(step_hook, key)
  k_prior, k_loop = jax.random.split(key)
  x = _initial_state(sde, k_prior, shape, prior, x_init)
  grid = edm_time_grid(sde, n_steps, rho) if time_grid is None else _check_grid(time_grid)
  n = grid.shape[0]
  times = jnp.append(grid, 0.0).astype(x.dtype)  # sigma_N = 0 is t = 0
  sigmas = jnp.append(sde.noise_level(grid), 0.0).astype(x.dtype)
  step = _heun_step(sde, _sigma_derivative(sde, score), sigmas, times, k_loop,
                    min(float(s_churn) / n, math.sqrt(2.0) - 1.0), s_min, s_max, s_noise,
                    hook if step_hook is not None else None, record_trajectory)
  y = x / sde.marginal_coeffs(times[0])[0]
  y, recorded = jax.lax.scan(lambda y, i: step(y, i, True), y, jnp.arange(n - 1))
  if denoise:
    y, last = step(y, jnp.asarray(n - 1), False)
    if record_trajectory:
      recorded = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), recorded, last)
    stats = {"nfe": jnp.asarray(2 * n - 1), "num_steps": jnp.asarray(n)}
  else:
    y = sde.marginal_coeffs(times[n - 1])[0] * y
    stats = {"nfe": jnp.asarray(2 * (n - 1)), "num_steps": jnp.asarray(n - 1)}
  return y, {**stats, **(recorded or {})}


def _heun_step(sde, d: Callable, sigmas: Array, times: Array, key: Array, gamma: float,
               s_min, s_max, s_noise, hook: Optional[Callable], record: bool) -> Callable:
  """``step(y, i, second_order) -> (y_{i+1}, trajectory entry)`` of ``heun_sampler`` (y = x /
  alpha_t); the hook sees x = alpha_t y at t_{i+1}."""

  def step(y: Array, i: Array, second_order: bool) -> tuple[Array, Optional[Stats]]:
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if gamma > 0:
      g = jnp.where((sigma >= s_min) & (sigma <= s_max), gamma, 0.0)
      sigma_hat = sigma * (1.0 + g)
      z = jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
      y = y + sigma * jnp.sqrt(g * (2.0 + g)) * s_noise * z  # sqrt(sigma^2 - sigma_i^2), >= 0
    else:
      sigma_hat = sigma
    d_cur = d(y, sigma_hat)
    y_next = y + (sigma_next - sigma_hat) * d_cur
    if second_order:
      y_next = y + 0.5 * (sigma_next - sigma_hat) * (d_cur + d(y_next, sigma_next))
    if hook is not None:  # entries the hook leaves alone stay bit for bit
      alpha_next = sde.marginal_coeffs(times[i + 1])[0]
      x_next = alpha_next * y_next
      hooked = hook(x_next, times[i + 1], i)
      y_next = jnp.where(hooked == x_next, y_next, hooked / alpha_next)
    t_hat = sde.inverse_noise_level(sigma_hat) if gamma > 0 else times[i]
    return y_next, _record(record, t_hat, sde.marginal_coeffs(t_hat)[0] * y,
                           lambda: y - sigma_hat * d_cur)  # D(y; sigma) = E[x_0 | x_t]

  return step


def ddim_sampler(score_fn: ScoreFn, sde, key: Array, shape: Sequence[int], *, n_steps: int = 100,
                 denoise: bool = False, prior: Optional[Prior] = None,
                 score_perturbation: Optional[ScoreFn] = None, epsilon: Array | float = 0.0,
                 x_init: Optional[Array] = None, time_grid: Optional[Array] = None,
                 step_hook: Optional[StepHook] = None,
                 record_trajectory: bool = False) -> tuple[Array, Stats]:
  """Deterministic DDIM (Song et al. 2021a, "Denoising diffusion implicit models", eq. 12 with
  eta = 0) on ``time_grid`` (default t_i = T - i (T - eps) / N, i = 0..N): with
  eps^ = -sigma_t s(x_t, t) and x0^ = (x_t + sigma_t^2 s) / alpha_t, x_{t'} = alpha_{t'} x0^ +
  sigma_{t'} eps^. It is Euler's method for the probability-flow ODE in (x / alpha, sigma / alpha)
  (DDIM eq. 14; Karras et al. 2022, §3), so it converges to the ODE solution at first order;
  written for VP, it applies to every SDE of sde_lib. NFE = N (+1 with denoise, Tweedie at eps).
  """
  score = perturbed_score(score_fn, score_perturbation, epsilon)
  hook = _hook_fn(step_hook, key)
  x = _initial_state(sde, key, shape, prior, x_init)
  ts, t_next, n = _grid_steps(sde, n_steps, time_grid)
  ts, t_next = ts.astype(x.dtype), t_next.astype(x.dtype)

  def one_step(x: Array, inputs: tuple[Array, Array, Array]) -> tuple[Array, Optional[Stats]]:
    i, t, s = inputs
    alpha_t, sigma_t = sde.marginal_coeffs(t)
    alpha_s, sigma_s = sde.marginal_coeffs(s)
    score_t = score(x, t)
    x0_hat = (x + sigma_t**2 * score_t) / alpha_t
    x_to = alpha_s * x0_hat - sigma_s * sigma_t * score_t
    return hook(x_to, s, i), _record(record_trajectory, t, x, lambda: x0_hat)

  x, recorded = jax.lax.scan(one_step, x, (jnp.arange(n), ts, t_next))
  x, nfe = _finish(sde, score, x, jnp.asarray(n), denoise, hook, n)
  return x, {"nfe": nfe, "num_steps": jnp.asarray(n), **(recorded or {})}


# ---------------------------------------------------------------------------------------------------
# Config entry point
# ---------------------------------------------------------------------------------------------------

# A builder maps the ``config.sampling`` section (and the SDE) to (sampler, options); it refuses,
# naming the field, a setting its sampler cannot honour. Per-field ranges are config_schema's.
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
  ``step_hook`` (every fixed-step method; 'sde' with fixed Euler-Maruyama steps)."""
  euler = cfg.solver in ODE_SOLVERS or cfg.solver == "euler"  # an ODE solver name means Euler
  if cfg.method == "ode" or (cfg.method == "sde" and (cfg.adaptive or not euler)):
    raise ValueError(f"sampling.method={cfg.method!r} (adaptive={cfg.adaptive}, solver="
                     f"{cfg.solver!r}) takes no per-step hook (inpainting, colorization): use "
                     "'pc', 'exponential', 'heun', 'ddim' or 'sde' with fixed Euler steps")


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
  """(sampler, options) for the ``sampling`` config section (typed,
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
  """``sample_fn(score_fn, key, sde=sde) -> (samples, stats)`` from the ``sampling`` config
  section (typed, ``config_schema.validate(config).sampling``: field kinds and ranges are checked
  at that boundary), mapped to the sampler's options by the builder registered for
  ``sampling.method``. Passing ``sde`` to a jitted ``sample_fn`` sweeps T without recompiling;
  ``step_hook`` (fixed-step methods, e.g. controllable.py's imputation) is passed on.
  ``sampling.perturbation`` (not 'none') replaces the score by the eq. 44 error of Cao et al.,
  (1 + perturbation_epsilon m(T - t)) s (``pulse_perturbed_score``); it cannot be combined with an
  explicit ``score_perturbation``. Settings the sampler cannot honour raise ValueError naming the
  field (call outside jit).
  """
  fn, kwargs = sampler_kwargs(sampling, sde)
  pulse = perturbation_options(sampling)
  if pulse is not None and score_perturbation is not None:
    raise ValueError(f"sampling.perturbation={pulse[0]!r} and an explicit score_perturbation "
                     "cannot be combined; set sampling.perturbation='none'")
  kwargs.update(prior=prior, score_perturbation=score_perturbation, epsilon=epsilon)
  default_sde = sde
  shape = tuple(shape)

  def sample_fn(score_fn: ScoreFn, key: Array, sde: Any = None,
                step_hook: Optional[StepHook] = None) -> tuple[Array, Stats]:
    sde = default_sde if sde is None else sde
    if pulse is not None:
      score_fn = pulse_perturbed_score(score_fn, sde, *pulse)
    hook = {} if step_hook is None else {"step_hook": step_hook}
    return fn(score_fn, sde, key, shape, **kwargs, **hook)

  return sample_fn
