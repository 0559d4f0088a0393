"""Divergence of a batched vector field: Hutchinson's trace estimator and the exact trace.

The one implementation of probes and jvp divergences, shared by the implicit / sliced score-
matching losses (``losses``: Huang et al., "A variational perspective on diffusion-based generative
models and score matching", eq. 25 and Appendix A) and the probability-flow ODE likelihood and the
CT-ELBO (``likelihood``: Song et al., ScoreFlow, Sec. 3; Grathwohl et al. 2018, FFJORD).

Skilling-Hutchinson (Hutchinson 1989): for a probe v with E[v v^T] = I, E[v^T J v] = tr J. ``fn``
maps ``(B, *event) -> (B, *event)`` with examples independent of each other, so one tangent per
example gives every example's estimate at once. Depends on nothing of the project (sde_lib does not
use it); every function is pure and jit / vmap / grad-safe (string options are static).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

import parallel  # noqa: F401  (process-wide XLA options and compilation cache: parallel.py)

Array = jax.Array
PROBES = ("rademacher", "gaussian")  # random probe distributions
DIVERGENCE_PROBES = PROBES + ("exact",)  # 'exact': the trace from D Jacobian columns


def _sum_event(v: Array) -> Array:
  return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def sample_probe(key: Array, shape, probe: str = "rademacher", dtype=jnp.float32) -> Array:
  """Probe v with i.i.d. entries and E[v v^T] = I: Rademacher (+-1) or standard Gaussian."""
  if probe == "rademacher":
    return jax.random.rademacher(key, shape, dtype=dtype)
  if probe == "gaussian":
    return jax.random.normal(key, shape, dtype=dtype)
  raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")


def probe_quadratic(fn: Callable[[Array], Array], x: Array, v: Array) -> tuple[Array, Array]:
  """(fn(x), v^T (d fn / dx) v per example) for probes ``v`` of the shape of ``x`` (B, *event), or
  of shape (P, B, *event): P probes per example (one linearization, P tangents), the quadratic
  forms then (P, B). One ``jax.jvp`` for a single probe."""
  if v.shape == x.shape:
    out, jv = jax.jvp(fn, (x,), (v,))
    return out, _sum_event(v * jv)
  assert v.shape[1:] == x.shape, f"probes v: want (P, *{x.shape}), got {v.shape}"
  out, lin = jax.linearize(fn, x)
  jv = jax.vmap(lin)(v)
  return out, jax.vmap(_sum_event)(v * jv)


def exact_divergence(fn: Callable[[Array], Array], x: Array) -> tuple[Array, Array]:
  """(fn(x), tr (d fn / dx) per example) from one linearization and the D Jacobian columns (the
  per-example basis vectors e_i, vmapped): cost ~ D jvps, for small D."""
  d = math.prod(x.shape[1:])
  out, lin = jax.linearize(fn, x)
  basis = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:]), (d,) + x.shape)
  cols = jax.vmap(lin)(basis)  # cols[i] = J e_i for every example
  return out, jnp.sum(jax.vmap(_sum_event)(basis * cols), axis=0)


def divergence(fn: Callable[[Array], Array], x: Array, key: Array | None = None,
               probe: str = "rademacher", n_probes: int = 1) -> tuple[Array, Array]:
  """(fn(x), per-example divergence) of a batched map fn: (B, *event) -> (B, *event).

  ``probe`` 'rademacher' | 'gaussian': Hutchinson with ``n_probes`` independent probes per example,
  averaged (variance / n_probes; Rademacher is exact for a diagonal Jacobian); 'exact': the trace."""
  if probe == "exact":
    return exact_divergence(fn, x)
  assert n_probes >= 1, f"n_probes must be >= 1, got {n_probes}"
  if key is None:
    raise ValueError("a Hutchinson divergence needs a PRNG key for the probes")
  if n_probes == 1:
    return probe_quadratic(fn, x, sample_probe(key, x.shape, probe, x.dtype))
  out, quad = probe_quadratic(fn, x, sample_probe(key, (n_probes,) + x.shape, probe, x.dtype))
  return out, jnp.mean(quad, axis=0)
