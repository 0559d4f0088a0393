"""Priors of the generative process as objects: the SDE's Gaussian p_noise and auxiliary models
nu_phi fitted to the forward marginal p(x, T) (Franzese et al., "How much is enough? A study on
diffusion times in score-based generative models", Sec. 3 and 3.1, eq. 10-11; Sec. 4, "Our
auxiliary models": a Dirichlet-process GMM for low dimension / MNIST, Glow for images).

Every prior has ONE interface, the one of ``sde_lib.GaussianPrior`` that samplers and likelihood use:
``sample(key, shape)`` with ``shape = (n, *event)`` and per-example ``log_prob(x)`` for x of shape
``(B, *event)``. Priors are pytrees (flax struct dataclasses), so they pass through ``jax.jit``.

Kinds:
* ``gaussian``: ``sde.prior()`` (N(0, s^2 I) of Table 1; nothing is fitted).
* ``dpgmm``: :class:`MixturePrior`, a truncated Dirichlet-process GMM fitted by scikit-learn's
  variational ``BayesianGaussianMixture`` (float64) and evaluated in JAX as the plug-in mixture
  sum_k w_k N(mu_k, Sigma_k) of its posterior-mean weights, means and covariances (the distribution
  ``BayesianGaussianMixture.sample`` draws from); 'full' or 'diag' covariances.
* ``flow``: :class:`FlowPrior`, a ``flows`` model fitted by maximum likelihood with optax.

Fitting minimises the cross-entropy E_{p(x,T)}[-log nu_phi(x)] (Sec. 3.1: it equals
KL[p(x,T) || nu_phi] up to the entropy of p(x,T)) on samples x_T = alpha_T x_0 + sigma_T eps of the
forward marginal (:func:`forward_samples`), independent of the score model (so it can run
concurrently with score training). :func:`fit_prior` reports the held-out cross-entropy in nats/dim.

Saving: :func:`to_pytree` gives the arrays (an orbax-saveable pytree), :func:`prior_spec` a small
JSON-able dict of the static config; :func:`from_pytree` (spec, tree) rebuilds the prior and
:func:`abstract_pytree` (spec) gives the restore target (shapes and dtypes).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.scipy.special import logsumexp

import pytrees
import toy_data
import training
from sde_lib import GaussianPrior

Array = jax.Array


def _flows():
  """The ``flows`` module, imported on first use: it loads distrax and TensorFlow Probability
  (seconds at start-up, TensorFlow included), which a run without a flow never needs."""
  import flows
  return flows


KINDS = ("gaussian", "dpgmm", "flow")
COVARIANCE_TYPES = ("full", "diag")
# How p(x, T) is sampled for fitting (Franzese et al.): forward marginal samples x_T = a_T x_0 +
# s_T eps (Sec. 3.1, no score model), or the probability-flow ODE push-forward of data (Sec. 3.2).
FIT_METHODS = ("concurrent", "sequential")


def _numpy_rng(key: Array) -> np.random.Generator:
  """A NumPy generator seeded from a JAX key (host-side draws for the scikit-learn fit and the
  fit / held-out split, with no device computation)."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return np.random.default_rng(np.asarray(data).astype(np.uint32).ravel().tolist())


def _event_split(shape: Sequence[int], event_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Leading (sample) dimensions of ``shape``, which must end with ``event_shape``."""
  shape = tuple(int(s) for s in shape)
  k = len(event_shape)
  if len(shape) < k or shape[len(shape) - k:] != tuple(event_shape):
    raise ValueError(f"sample shape {shape} must end with the prior's event shape {event_shape}")
  return shape[:len(shape) - k]


# ---------------------------------------------------------------------------------------------------
# Dirichlet-process Gaussian mixture
# ---------------------------------------------------------------------------------------------------

@pytrees.dataclass
class MixturePrior:
  """nu(x) = sum_k w_k N(vec(x); mu_k, Sigma_k) on flattened events (D = prod(event_shape)).

  Fields: ``weights`` (K,) summing to 1, ``means`` (K, D), ``covariances`` (K, D, D) for
  ``covariance_type='full'`` (evaluated by ``toy_data.GaussianMixture``) or the variances (K, D)
  for 'diag' (no D x D array is formed, as for images).
  """
  weights: Array
  means: Array
  covariances: Array
  event_shape: tuple[int, ...] = struct.field(pytree_node=False)
  covariance_type: str = struct.field(pytree_node=False, default="full")

  @property
  def n_components(self) -> int:
    return self.means.shape[0]

  @property
  def dim(self) -> int:
    return self.means.shape[-1]

  def mixture(self) -> toy_data.GaussianMixture:
    """The 'full' mixture as a ``toy_data.GaussianMixture`` (density, score, moments)."""
    if self.covariance_type != "full":
      raise ValueError("mixture() needs covariance_type='full'")
    return toy_data.GaussianMixture(self.weights, self.means, self.covariances)

  def log_prob(self, x: Array) -> Array:
    """log nu(x) per example, shape (B,): log-sum-exp over k of log w_k + log N(x; mu_k, Sigma_k)."""
    flat = x.reshape(x.shape[0], -1).astype(self.means.dtype)
    if self.covariance_type == "full":
      return self.mixture().log_prob(flat)
    # diag: |x - mu|^2_prec = x^2 . prec - 2 x . (mu prec) + mu^2 . prec, as matrix products.
    prec = 1.0 / self.covariances
    quad = (flat**2 @ prec.T - 2.0 * flat @ (self.means * prec).T
            + jnp.sum(self.means**2 * prec, axis=1))
    log_det = jnp.sum(jnp.log(self.covariances), axis=1)
    terms = (jnp.log(self.weights) - 0.5 * (log_det + self.dim * math.log(2 * math.pi))
             - 0.5 * quad)
    return logsumexp(terms, axis=1)

  def sample(self, key: Array, shape: Sequence[int]) -> Array:
    """Draws of shape ``(..., *event_shape)``: k ~ Cat(w), then mu_k + Sigma_k^{1/2} z."""
    lead = _event_split(shape, self.event_shape)
    n = math.prod(lead)
    if self.covariance_type == "full":
      flat = self.mixture().sample(key, n)
    else:
      k_comp, k_noise = jax.random.split(key)
      comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
      z = jax.random.normal(k_noise, (n, self.dim), self.means.dtype)
      flat = self.means[comp] + jnp.sqrt(self.covariances[comp]) * z
    return flat.reshape(*lead, *self.event_shape)

  def mean(self) -> Array:
    """E[vec x] = sum_k w_k mu_k, shape (D,)."""
    return self.weights @ self.means

  def variance(self) -> Array:
    """Var[vec x] per coordinate (law of total variance), shape (D,)."""
    var = self.covariances if self.covariance_type == "diag" else jnp.diagonal(
        self.covariances, axis1=-2, axis2=-1)
    m = self.mean()
    return self.weights @ (var + self.means**2) - m**2

  def effective_components(self, threshold: float = 1e-2) -> Array:
    """Number of components with weight above ``threshold`` (the complexity proxy of Franzese et
    al., Fig. 4)."""
    return jnp.sum(self.weights > threshold)


def mixture_from_sklearn(model, event_shape: Sequence[int]) -> MixturePrior:
  """The plug-in mixture (weights_, means_, covariances_) of a fitted scikit-learn
  ``BayesianGaussianMixture`` / ``GaussianMixture`` ('full' or 'diag'); arrays in the default JAX
  float dtype (float64 under ``jax.enable_x64``)."""
  cov_type = model.covariance_type
  if cov_type not in COVARIANCE_TYPES:
    raise ValueError(f"prior.covariance_type must be one of {COVARIANCE_TYPES}, got {cov_type!r}")
  weights = np.asarray(model.weights_, np.float64)
  return MixturePrior(jnp.asarray(weights / weights.sum()), jnp.asarray(model.means_),
                      jnp.asarray(model.covariances_), tuple(int(s) for s in event_shape), cov_type)


def fit_dpgmm(samples: Array, key: Array, *, n_components: int = 20,
              covariance_type: str = "full", weight_concentration_prior: Optional[float] = None,
              max_iter: int = 500, tol: float = 1e-3, reg_covar: float = 1e-6,
              init_params: str = "kmeans", threshold: float = 1e-2, chunk: int = 10,
              callback: Optional[Callable[[int, dict], None]] = None) -> tuple[MixturePrior, dict]:
  """Fits a truncated Dirichlet-process GMM (stick-breaking, ``n_components`` = truncation level)
  by variational inference (scikit-learn ``BayesianGaussianMixture`` with
  ``weight_concentration_prior_type='dirichlet_process'``) on flattened float64 samples (N, *event).

  The EM iterations run in warm-started chunks of ``chunk`` (one initialization, then each fit
  continues from the last parameters and lower bound), which is exactly one fit of ``max_iter``
  iterations; ``callback(iterations so far, {'lower_bound': ...})`` after each chunk shows progress.
  Returns ``(prior, info)`` with info ``effective_components`` (weights > ``threshold``),
  ``weights``, ``converged``, ``n_iter``, ``lower_bound``. The seed comes from ``key``.
  """
  from sklearn.mixture import BayesianGaussianMixture
  x = np.asarray(samples, np.float64)
  n = x.shape[0]
  _check_dpgmm_args(n, int(n_components), covariance_type, int(max_iter), int(chunk))
  seed = int(_numpy_rng(key).integers(0, 2**31 - 1))
  model = BayesianGaussianMixture(
      n_components=int(n_components), covariance_type=covariance_type,
      weight_concentration_prior_type="dirichlet_process",
      weight_concentration_prior=weight_concentration_prior, tol=tol, reg_covar=reg_covar,
      init_params=init_params, random_state=seed, warm_start=True)
  n_iter = _fit_in_chunks(model, x.reshape(n, -1), int(max_iter), int(chunk), callback)
  prior = mixture_from_sklearn(model, x.shape[1:])
  weights = np.asarray(prior.weights, np.float64)
  info = dict(effective_components=int(np.sum(weights > threshold)), threshold=float(threshold),
              weights=weights.tolist(), converged=bool(model.converged_), n_iter=n_iter,
              lower_bound=float(model.lower_bound_))
  return prior, info


def _check_dpgmm_args(n: int, n_components: int, covariance_type: str, max_iter: int,
                      chunk: int) -> None:
  if n_components < 1:
    raise ValueError(f"prior.n_components must be >= 1, got {n_components}")
  if n_components > n:
    raise ValueError(f"prior.n_components={n_components} exceeds the number of fitting samples "
                     f"({n}); use fewer components or more samples")
  if covariance_type not in COVARIANCE_TYPES:
    raise ValueError(f"prior.covariance_type must be one of {COVARIANCE_TYPES}, "
                     f"got {covariance_type!r}")
  if max_iter < 1 or chunk < 1:
    raise ValueError(f"prior.max_iter={max_iter} and chunk={chunk} must be >= 1")


def _fit_in_chunks(model, flat: np.ndarray, max_iter: int, chunk: int,
                   callback: Optional[Callable[[int, dict], None]]) -> int:
  """Runs ``model`` (``warm_start=True``) for up to ``max_iter`` EM iterations, ``chunk`` per
  ``fit``, until it converges; returns the iterations run. scikit-learn's warm start keeps the
  parameters and the lower bound between fits, so the chunks add up to one uninterrupted fit."""
  from sklearn.exceptions import ConvergenceWarning
  done = 0
  while done < max_iter:
    model.max_iter = min(chunk, max_iter - done)
    with warnings.catch_warnings():  # non-convergence is reported in info['converged']
      warnings.simplefilter("ignore", ConvergenceWarning)
      model.fit(flat)
    done += int(model.n_iter_)
    if callback is not None:
      callback(done, {"lower_bound": float(model.lower_bound_)})
    if model.converged_:
      break
  return done


# ---------------------------------------------------------------------------------------------------
# Flow prior
# ---------------------------------------------------------------------------------------------------

@pytrees.dataclass
class FlowPrior:
  """nu_phi(x) of a ``flows`` model (``model`` static, ``variables`` the pytree of arrays)."""
  variables: Any
  model: nn.Module = struct.field(pytree_node=False)

  @property
  def event_shape(self) -> tuple[int, ...]:
    return tuple(self.model.event_shape)

  def log_prob(self, x: Array) -> Array:
    """log nu_phi(x) per example, shape (B,) (change of variables, flows.log_prob)."""
    return _flows().log_prob(self.model, self.variables, x)

  def sample(self, key: Array, shape: Sequence[int]) -> Array:
    """Draws of shape ``(..., *event_shape)``."""
    lead = _event_split(shape, self.event_shape)
    n = math.prod(lead)
    return _flows().sample(self.model, self.variables, key, n).reshape(*lead, *self.event_shape)


def fit_flow(spec: dict, samples: Array, key: Array, *, steps: int = 2000, lr: float = 1e-3,
             batch_size: int = 256, grad_clip: float = 1.0, warmup: int = 100,
             log_every: int = 100, heldout: Optional[Array] = None,
             callback: Optional[Callable[[int, dict], None]] = None,
             init_batch: int = 1024) -> tuple[FlowPrior, dict]:
  """Maximum-likelihood fit of the flow ``spec`` (``flows.make_flow``) to ``samples`` (N, *event):
  Adam (warmup + cosine decay of ``lr``, global-norm clipping) on minibatches of ``batch_size``
  drawn with replacement, loss = -mean log nu_phi(x) / D (nats/dim), the cross-entropy of Sec. 3.1.

  Every ``log_every`` steps (one jitted ``lax.scan`` each) ``callback(step, metrics)`` receives
  ``{'loss'}`` (mean over those steps) and ``{'heldout'}`` when ``heldout`` samples are given. Returns
  ``(prior, history)`` with history lists ``step``, ``loss`` (and ``heldout``). The steps run in
  ``training.train_loop`` (progress, metrics lines): a non-finite loss raises FloatingPointError
  naming the step.
  """
  model = _flows().make_flow(spec)
  x = jnp.asarray(samples)
  n, d = x.shape[0], math.prod(x.shape[1:])
  if tuple(x.shape[1:]) != tuple(model.event_shape):
    raise ValueError(f"samples of shape {tuple(x.shape[1:])} do not match the flow's event shape "
                     f"{tuple(model.event_shape)}")
  if steps < 1 or batch_size < 1 or log_every < 1:
    raise ValueError(f"fit_flow needs steps, batch_size, log_every >= 1, got {steps}, "
                     f"{batch_size}, {log_every}")
  k_init, k_train = jax.random.split(key)
  init = jax.jit(_flows().init_variables, static_argnums=0)
  variables = init(model, k_init, x[:min(n, init_batch)])
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  opt = training.warmup_cosine_adam(lr, steps, grad_clip, warmup)
  opt_state = opt.init(params)

  def loss_fn(p, batch):
    return -jnp.mean(model.apply({"params": p, **rest}, batch, method="log_prob")) / d

  run, eval_ce = _scan_steps(loss_fn, opt, x, batch_size), jax.jit(loss_fn)
  history = {"step": [], "loss": [], **({"heldout": []} if heldout is not None else {})}

  def step_fn(state, keys):
    p, s, loss = run(*state, keys)
    return (p, s), {"loss": loss}

  def on_loss(step: int, loss: float) -> None:
    history["step"].append(step)
    history["loss"].append(loss)

  def evaluate(step: int, state) -> None:
    metrics = {"loss": history["loss"][-1]}
    if heldout is not None:
      metrics["heldout"] = float(eval_ce(state[0], jnp.asarray(heldout)))
      history["heldout"].append(metrics["heldout"])
    if callback is not None:
      callback(step, metrics)

  chunks = (jax.random.split(jax.random.fold_in(k_train, done), min(log_every, steps - done))
            for done in range(0, steps, log_every))
  (params, _), _ = training.train_loop(step_fn, (params, opt_state), chunks, start=0, stop=steps,
                                       title="fit flow prior", log_every=log_every,
                                       on_loss=on_loss, evaluate=evaluate, eval_every=log_every,
                                       stride=log_every)
  return FlowPrior({"params": params, **rest}, model), history


def _scan_steps(loss_fn: Callable, opt, x: Array, batch_size: int) -> Callable:
  """jit (params, opt_state, keys) -> (params, opt_state, mean loss): one step of ``opt`` per key
  (``lax.scan``) on a minibatch of ``x`` drawn with replacement."""
  import optax

  def one_step(carry, k):
    p, s = carry
    batch = x[jax.random.randint(k, (batch_size,), 0, x.shape[0])]
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  @jax.jit
  def run(p, s, keys):
    (p, s), losses = jax.lax.scan(one_step, (p, s), keys)
    return p, s, jnp.mean(losses)

  return run


# ---------------------------------------------------------------------------------------------------
# Forward-marginal samples, cross-entropy, fit_prior
# ---------------------------------------------------------------------------------------------------

def forward_samples(sde, x0: Array, key: Array, t: Optional[Array | float] = None) -> Array:
  """x_t = alpha_t x_0 + sigma_t eps, eps ~ N(0, I) (``sde.perturb``), at t = sde.T by default: i.i.d.
  draws of p(x, T) from data draws x_0 (Franzese et al., Sec. 3.1)."""
  t = sde.T if t is None else t
  noise = jax.random.normal(key, x0.shape, x0.dtype)
  return sde.perturb(x0, jnp.asarray(t, x0.dtype), noise)


_log_prob = jax.jit(lambda prior, x: prior.log_prob(x))  # priors are pytrees: one trace per kind


def cross_entropy(prior, x: Array, batch_size: int = 1024) -> float:
  """E[-log nu(x)] / D over the rows of ``x`` (nats/dim), evaluated in batches."""
  x = jnp.asarray(x)
  d = math.prod(x.shape[1:])
  total = 0.0
  for i in range(0, x.shape[0], batch_size):
    total += float(np.sum(np.asarray(_log_prob(prior, x[i:i + batch_size]), np.float64)))
  return -total / (x.shape[0] * d)


def fit_prior(kind: str, samples: Array, key: Array, *, sde=None, heldout_fraction: float = 0.1,
              threshold: float = 1e-2, **options) -> tuple[Any, dict]:
  """Fits the prior ``kind`` ('gaussian' | 'dpgmm' | 'flow') to samples (N, *event) of p(x, T).

  The samples are shuffled and split into a fit set and a held-out set (``heldout_fraction``).
  ``options`` go to :func:`fit_dpgmm` (n_components, covariance_type, ...) or :func:`fit_flow`
  (``flow``: a flows spec, default :func:`flows.default_flow_spec`; steps, lr, batch_size,
  callback, ...). 'gaussian' needs ``sde`` and returns ``sde.prior()``.

  Returns ``(prior, info)``: info has ``kind``, ``n_fit``, ``n_heldout``, ``dim``,
  ``cross_entropy`` (held-out E[-log nu(x)] in nats/dim) and ``cross_entropy_fit``; with ``sde``
  also ``gaussian_cross_entropy`` (the same for p_noise); dpgmm adds ``effective_components``
  (weights > ``threshold``), ``weights``, ``converged``, ``n_iter``; flow adds ``history``.
  """
  if kind not in KINDS:
    raise ValueError(f"prior.kind must be one of {KINDS}, got {kind!r}")
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"prior.heldout_fraction must be in (0, 1), got {heldout_fraction}")
  x = np.asarray(samples)  # host copy: the split keeps float64 data exact for the DPGMM fit
  n = x.shape[0]
  n_held = max(1, int(round(heldout_fraction * n)))
  if n - n_held < 1:
    raise ValueError(f"fit_prior needs at least 2 samples, got {n}")
  perm = _numpy_rng(key).permutation(n)
  fit_x, held_x = x[perm[n_held:]], x[perm[:n_held]]
  k_fit = jax.random.fold_in(key, 1)
  info: dict[str, Any] = dict(kind=kind, n_fit=int(n - n_held), n_heldout=n_held,
                              dim=int(math.prod(x.shape[1:])))
  if kind == "gaussian":
    if sde is None:
      raise ValueError("prior.kind='gaussian' is the SDE's p_noise: pass sde=")
    if options:
      raise ValueError(f"prior.kind='gaussian' takes no options, got {sorted(options)}")
    prior = sde.prior()
  elif kind == "dpgmm":
    prior, extra = fit_dpgmm(fit_x, k_fit, threshold=threshold, **options)
    info.update(extra)
  else:
    spec = options.pop("flow", None) or _flows().default_flow_spec(x.shape[1:])
    prior, history = fit_flow(spec, fit_x, k_fit, heldout=held_x, **options)
    info["history"] = history
  info["cross_entropy"] = cross_entropy(prior, held_x)
  info["cross_entropy_fit"] = cross_entropy(prior, fit_x)
  if sde is not None:
    info["gaussian_cross_entropy"] = cross_entropy(sde.prior(), held_x)
  return prior, info


# ---------------------------------------------------------------------------------------------------
# Saving and restoring: (JSON spec, pytree of arrays)
# ---------------------------------------------------------------------------------------------------

def prior_spec(prior) -> dict:
  """JSON-able static description of ``prior`` (what :func:`from_pytree` needs beside the arrays)."""
  if isinstance(prior, GaussianPrior):
    return {"kind": "gaussian"}
  if isinstance(prior, MixturePrior):
    return {"kind": "dpgmm", "covariance_type": prior.covariance_type,
            "event_shape": list(prior.event_shape), "n_components": int(prior.n_components)}
  if isinstance(prior, FlowPrior):
    return {"kind": "flow", "flow": _flows().flow_spec(prior.model)}
  raise TypeError(f"not a prior object of auxiliary: {type(prior).__name__}")


def to_pytree(prior) -> dict:
  """The arrays of ``prior`` as a nested dict (saveable with orbax)."""
  if isinstance(prior, GaussianPrior):
    return {"std": jnp.asarray(prior.std)}
  if isinstance(prior, MixturePrior):
    return {"weights": prior.weights, "means": prior.means, "covariances": prior.covariances}
  if isinstance(prior, FlowPrior):
    return prior.variables
  raise TypeError(f"not a prior object of auxiliary: {type(prior).__name__}")


def from_pytree(spec: dict, tree) -> Any:
  """The prior of ``spec`` (from :func:`prior_spec`) with the arrays ``tree`` (from
  :func:`to_pytree`, e.g. as restored by orbax)."""
  kind = spec.get("kind")
  tree = jax.tree.map(jnp.asarray, tree)
  if kind == "gaussian":
    return GaussianPrior(tree["std"])
  if kind == "dpgmm":
    return MixturePrior(tree["weights"], tree["means"], tree["covariances"],
                        tuple(int(s) for s in spec["event_shape"]), spec["covariance_type"])
  if kind == "flow":
    return FlowPrior(tree, _flows().make_flow(spec["flow"]))
  raise ValueError(f"prior.kind must be one of {KINDS}, got {kind!r}")


def abstract_pytree(spec: dict, dtype=jnp.float32):
  """Shapes and dtypes (``jax.ShapeDtypeStruct``) of the pytree of ``spec``: an orbax restore
  target."""
  kind = spec.get("kind")
  if kind == "gaussian":
    return {"std": jax.ShapeDtypeStruct((), dtype)}
  if kind == "dpgmm":
    k, d = int(spec["n_components"]), math.prod(spec["event_shape"])
    cov = (k, d, d) if spec["covariance_type"] == "full" else (k, d)
    return {"weights": jax.ShapeDtypeStruct((k,), dtype),
            "means": jax.ShapeDtypeStruct((k, d), dtype),
            "covariances": jax.ShapeDtypeStruct(cov, dtype)}
  if kind == "flow":
    model = _flows().make_flow(spec["flow"])
    x = jnp.zeros((2, *model.event_shape), dtype)
    return jax.eval_shape(lambda: _flows().init_variables(model, jax.random.PRNGKey(0), x))
  raise ValueError(f"prior.kind must be one of {KINDS}, got {kind!r}")
