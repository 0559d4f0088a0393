"""Dequantization q(u | x) of discrete data: uniform and variational (Song et al. 2021b, "Maximum
likelihood training of score-based diffusion models" [SF], Sec. 5.2, eq. 13; Ho et al. 2019,
"Flow++", Sec. 3.1).

Integer data k in {0..L-1}^D are dequantized to k + u, u in [0, 1)^D, and scaled to model space
y = (k + u) / L (or 2 (k + u) / L - 1 when ``centered``), the scaling of ``likelihood.bits_per_dim``.
For any q(u | k) on [0, 1)^D, Jensen gives the lower bound on the discrete log-likelihood

    log P(k) = log int p_u(k + u) du >= E_{u ~ q(.|k)}[log p_u(k + u) - log q(u | k)]      ([SF] eq. 13)

with p_u(k + u) = p_y(y) |dy/du| (``likelihood.bits_per_dim`` holds that log-det); its gap is
KL[q(.|k) || q*(.|k)] with the optimum q*(u | k) = p_u(k + u) / P(k). Uniform dequantization is
q = U[0, 1)^D (log q = 0); variational dequantization fits a conditional flow q_phi (this module).

:class:`Dequantizer` is q_phi(u | k): s = f^{-1}(z; c(k)), z ~ N(0, I), by a ``flows`` model
(:class:`flows.Glow` for images, :class:`flows.CouplingFlow` for vectors) whose conditioners all see
features c(k) of the data (a small conv net / MLP: the context input of ``flows``), then
u = Phi(s) (:class:`flows.NormalCDF`, the standard normal CDF), so u lies in (0, 1)^D and
log q(u | k) = log p_S(s) - log|det du/ds| by the bijectors' log-dets. Flow++ squashes with a
sigmoid; Phi is the squash under which the flow's identity map (its initialisation: actnorm
standardises Phi^{-1}(u) ~ N(0, I), zero-initialised couplings) gives exactly q = U(0, 1)^D, so the
fit starts from the uniform-dequantization objective instead of a logit-normal q that is
0.014 bits/dim worse on digits before the first step.

:func:`make_train_step` builds the jitted Adam step of [SF] eq. 13 for any continuous model
``log_p_fn(y, key) -> log p_y(y)``: the exact density (tests) or minus the ScoreFlow bound of a
frozen score model (``likelihood.scoreflow_bound``, eq. 39, ``--mode=fit_dequantizer``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

import checkpoints
import likelihood
import training

Array = jax.Array


DEQUANTIZATIONS = ("uniform", "variational")
SQUASH = "normal_cdf"  # saved with a fit: a fit made with another squash (sigmoid) is refused


# ---------------------------------------------------------------------------------------------------
# Scaling (the one shared with likelihood.bits_per_dim)
# ---------------------------------------------------------------------------------------------------

def scale(k: Array, u: Array, num_levels: int, centered: bool) -> Array:
  """y = (k + u) / L, or 2 (k + u) / L - 1 when ``centered`` ([SF] Sec. 5.2; ``uniform_dequantize``
  with a given u)."""
  y = (k + u) / num_levels
  return 2.0 * y - 1.0 if centered else y


def discrete_log_prob(logp_y_minus_log_q: Array, shape: Sequence[int], num_levels: int,
                      centered: bool) -> Array:
  """E_q[log p_u(k + u) - log q(u | k)] in nats from log p_y(y) - log q(u | k): adds log|dy/du|,
  the offset of ``likelihood.bits_per_dim`` (taken from it, so both paths share one constant)."""
  d = math.prod(shape)
  bpd = likelihood.bits_per_dim(logp_y_minus_log_q, shape, centered=centered,
                                num_levels=num_levels)
  return -bpd * d * math.log(2.0)


# ---------------------------------------------------------------------------------------------------
# q_phi(u | k): a conditional flow squashed by the normal CDF
# ---------------------------------------------------------------------------------------------------

class Dequantizer(nn.Module):
  """q_phi(u | k) on (0, 1)^D (Flow++ Sec. 3.1; [SF] Sec. 5.2). ``event_shape`` (H, W, C): a
  :class:`flows.Glow` with ``num_levels`` levels of ``num_steps`` steps; (D,): a spline
  :class:`flows.CouplingFlow` of ``num_steps`` layers. Its conditioners get ``context_features``
  features of k / (L - 1) - 1/2 (two 3x3 convs, or a two-layer MLP, of width ``hidden``). Latent ->
  u: flow inverse, then :class:`flows.NormalCDF`. Initialise with uniform u (:func:`init_variables`):
  the flow's actnorm layers standardise Phi^{-1}(u) ~ N(0, I), so q starts at U(0, 1)^D."""
  event_shape: tuple[int, ...]
  num_levels: int  # grey levels L of the data
  num_steps: int = 4
  flow_levels: int = 1
  hidden: int = 32
  context_features: int = 8

  def setup(self):
    import flows  # here, not at the top: distrax and TFP load only when a dequantizer is built
    shape = tuple(int(s) for s in self.event_shape)
    h = self.hidden
    if len(shape) == 3:
      self.flow = flows.Glow(shape, num_levels=self.flow_levels, num_steps=self.num_steps,
                             hidden=h)
      self.features = [nn.Conv(h, (3, 3), padding="SAME"),
                       nn.Conv(self.context_features, (3, 3), padding="SAME")]
    elif len(shape) == 1:
      self.flow = flows.CouplingFlow(shape[0], num_layers=self.num_steps, hidden=(h, h),
                                     transformer="spline")
      self.features = [nn.Dense(h), nn.Dense(self.context_features)]
    else:
      raise ValueError(f"Dequantizer models vectors (D,) or images (H, W, C), got {shape}")
    self.squash = flows.distrax.Block(flows.NormalCDF(), len(shape))

  def context(self, k: Array) -> Array:
    """Features c(k) fed to every coupling conditioner."""
    h = k / max(self.num_levels - 1, 1) - 0.5
    return self.features[1](nn.gelu(self.features[0](h)))

  def log_prob(self, u: Array, k: Array) -> Array:
    """log q(u | k) = log p_S(Phi^{-1} u) + log|det d Phi^{-1}(u)/du| per example (B,)."""
    s, ld = self.squash.inverse_and_log_det(u)
    return self.flow.log_prob(s, self.context(k)) + ld

  def sample_and_log_prob(self, key: Array, k: Array) -> tuple[Array, Array]:
    """One u ~ q(. | k) per row of k and log q(u | k): s ~ p_S, u = Phi(s),
    log q = log p_S(s) - log|det du/ds|."""
    s, log_ps = self.flow.sample_and_log_prob(key, k.shape[0], self.context(k))
    u, ld = self.squash.forward_and_log_det(s)
    return u, log_ps - ld

  def __call__(self, u: Array, k: Array) -> Array:
    return self.log_prob(u, k)


def init_variables(model: Dequantizer, key: Array, k: Array) -> dict:
  """Variables of ``model`` from a batch of levels k, initialised on u ~ U(0, 1) (see the class)."""
  k_u, k_init = jax.random.split(key)
  u = jax.random.uniform(k_u, k.shape, minval=1e-3, maxval=1.0 - 1e-3)
  return model.init(k_init, u, jnp.asarray(k, jnp.float32), method="log_prob")


def log_prob(model: Dequantizer, variables, u: Array, k: Array) -> Array:
  """log q(u | k) per example (B,)."""
  return model.apply(variables, u, jnp.asarray(k, jnp.float32), method="log_prob")


def sample_and_log_prob(model: Dequantizer, variables, key: Array,
                        k: Array) -> tuple[Array, Array]:
  """(u, log q(u | k)), one draw per row of k."""
  return model.apply(variables, key, jnp.asarray(k, jnp.float32), method="sample_and_log_prob")


# ---------------------------------------------------------------------------------------------------
# The dequantized log-likelihood and its fit
# ---------------------------------------------------------------------------------------------------

def dequantized_log_p(log_p_fn: Callable[[Array, Array], Array], k: Array, key: Array, *,
                      num_levels: int, centered: bool, sample_q: Optional[Callable] = None,
                      dtype=jnp.float32) -> Array:
  """log p_y(y) - log q(u | k) with u ~ q(. | k) (one draw per example), y = scale(k, u): pass to
  ``likelihood.bits_per_dim`` / :func:`discrete_log_prob`, which add log|dy/du|. ``sample_q(key,
  k) -> (u, log q)``; None is uniform dequantization (log q = 0). ``log_p_fn(y, key)`` gives
  log p_y (the ODE's log p, or minus the ScoreFlow bound)."""
  k = jnp.asarray(k).astype(dtype)
  k_q, k_p = jax.random.split(key)
  if sample_q is None:
    u, log_q = jax.random.uniform(k_q, k.shape, dtype), jnp.zeros(k.shape[:1], dtype)
  else:
    u, log_q = sample_q(k_q, k)
  y = scale(k, u.astype(dtype), num_levels, centered)
  return log_p_fn(y, k_p) - log_q.astype(dtype)


def make_train_step(model: Dequantizer, constants: dict, log_p_fn: Callable[[Array, Array], Array],
                    optimizer, *, num_levels: int, centered: bool):
  """Jitted ``step(params, opt_state, k, key) -> (params, opt_state, loss)`` of [SF] eq. 13:
  minimises E_k E_{u~q}[-log p_u(k + u) + log q(u | k)] / D (nats/dim; reparameterised u, so the
  gradient flows through ``log_p_fn``'s input). ``log_p_fn(y, key) -> log p_y(y)``: e.g. minus
  ``likelihood.scoreflow_bound``'s ``nll_bound`` of a frozen score model ([SF] eq. 39)."""
  import optax

  def loss_fn(params, k, key):
    variables = {"params": params, **constants}
    sample_q = lambda kq, kk: sample_and_log_prob(model, variables, kq, kk)  # noqa: E731
    lp = dequantized_log_p(log_p_fn, k, key, num_levels=num_levels, centered=centered,
                           sample_q=sample_q)
    shape = k.shape[1:]
    return -jnp.mean(discrete_log_prob(lp, shape, num_levels, centered)) / math.prod(shape)

  @jax.jit
  def step(params, opt_state, k, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, k, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


make_optimizer = training.warmup_cosine_adam  # Adam, warmup + cosine decay, clipping


def model_spec(model: Dequantizer) -> dict[str, Any]:
  """JSON-able static fields of ``model`` (saved with it; a saved fit must match them)."""
  return {"event_shape": [int(s) for s in model.event_shape], "num_levels": int(model.num_levels),
          "num_steps": int(model.num_steps), "flow_levels": int(model.flow_levels),
          "hidden": int(model.hidden), "context_features": int(model.context_features),
          "squash": SQUASH}


# ---------------------------------------------------------------------------------------------------
# A fit as saved (``--mode=fit_dequantizer``) and as eval uses it
# ---------------------------------------------------------------------------------------------------

def from_section(d, event_shape: Sequence[int], num_levels: int) -> Dequantizer:
  """q_phi(u | k) of the ``dequantizer`` config section ``d`` for data of ``event_shape`` with
  ``num_levels`` grey levels."""
  return Dequantizer(tuple(event_shape), int(num_levels), num_steps=d.flow_steps,
                     flow_levels=d.flow_levels, hidden=d.flow_hidden,
                     context_features=d.context_features)


def fit_tree(params, constants: dict, opt_state) -> dict:
  """The arrays of a fit as saved: parameters, flax constants and the optimizer state's leaves."""
  leaves = jax.tree_util.tree_leaves(opt_state)
  return {"params": params, "opt_state": {str(i): x for i, x in enumerate(leaves)},
          **({"constants": constants} if constants else {})}


def check_fit(meta: dict, model: Dequantizer, sde_name: str, T: float, where: str) -> None:
  """Refuses a saved dequantizer of another architecture, SDE or diffusion time."""
  spec = model_spec(model)
  for key in sorted(spec):
    if meta["spec"].get(key) != spec[key]:
      raise ValueError(f"the dequantizer in {where} has {key}={meta['spec'].get(key)!r}, the config "
                       f"gives {spec[key]!r} (dequantizer.* / data.*): use the same values, or "
                       f"delete {where} and run --mode=fit_dequantizer again")
  if meta["sde"] != sde_name or not math.isclose(meta["T"], T, rel_tol=1e-9):
    raise ValueError(f"the dequantizer in {where} was fitted for sde.name={meta['sde']!r}, "
                     f"sde.T={meta['T']:g}, not {sde_name!r}, {T:g}; run "
                     "--mode=fit_dequantizer again with this config")


def restore_fit(where: str, model: Dequantizer, sde_name: str, T: float, params, constants: dict,
                opt_state):
  """(params, constants, opt_state, meta) of the fit saved in ``where`` (verified, checked)."""
  check_fit(checkpoints.read_tree_meta(where), model, sde_name, T, where)
  like = fit_tree(params, constants, opt_state)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), like)
  tree, meta = checkpoints.restore_tree(where, abstract)
  leaves, treedef = jax.tree_util.tree_flatten(opt_state)
  opt_state = jax.tree_util.tree_unflatten(treedef, [tree["opt_state"][str(i)]
                                                     for i in range(len(leaves))])
  logging.info("dequantizer: step %d restored from %s", meta["step"], where)
  return tree["params"], tree.get("constants", {}), opt_state, meta


@dataclasses.dataclass(frozen=True)
class FittedDequantizer:
  """A fitted q_phi(u | k) as eval uses it (:meth:`lift`)."""
  model: Dequantizer
  variables: Any
  step: int
  num_levels: int
  centered: bool

  def sample_q(self, key, k):
    return sample_and_log_prob(self.model, self.variables, key, k)

  def lift(self, fn: Callable, dtype=jnp.float32) -> Callable:
    """``fn(consts, y, key) -> dict(logp=log p_y(y), ...)`` on continuous data -> the same on integer
    levels k with ``logp`` = log p_y(scale(k, u)) - log q(u | k), u ~ q(. | k) ([SF] eq. 13;
    ``likelihood.bits_per_dim`` then adds the scaling log-det, as on the uniform path)."""
    def g(consts, k, key):
      extra = {}

      def log_p(y, kp):
        extra.update(fn(consts, y, kp))
        return extra["logp"]

      lp = dequantized_log_p(log_p, k, key, num_levels=self.num_levels, centered=self.centered,
                             sample_q=self.sample_q, dtype=dtype)
      return dict(extra, logp=lp)

    return g


def load_fitted(where: str, model: Dequantizer, sde_name: str, T: float,
                centered: bool) -> FittedDequantizer:
  """The q_phi(u | k) fitted in ``where`` (verified); a clear error names ``--mode=fit_dequantizer``
  when there is none, or it was fitted for another model."""
  try:
    meta = checkpoints.read_tree_meta(where)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"eval.dequantization='variational': no fitted dequantizer in {where}; "
                            "run --mode=fit_dequantizer with this config first") from e
  check_fit(meta, model, sde_name, T, where)
  if meta["step"] < meta["n_iters"]:
    logging.warning("the dequantizer in %s was saved at step %d of %d (fit interrupted)", where,
                    meta["step"], meta["n_iters"])
  like = init_variables(model, jax.random.PRNGKey(0),
                        jnp.zeros((1,) + tuple(model.event_shape), jnp.int32))
  params, constants = like["params"], {k: v for k, v in like.items() if k != "params"}
  opt_state = make_optimizer(1.0, 2).init(params)  # structure only (verified too)
  params, constants, _, meta = restore_fit(where, model, sde_name, T, params, constants, opt_state)
  return FittedDequantizer(model, {"params": params, **constants}, int(meta["step"]),
                           model.num_levels, centered)
