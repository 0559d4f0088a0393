"""The published-size programs that benchmarks/memory.py compiles and benchmarks/gpu_bench.py runs,
built as the CLI builds them (one place, so both measure the same programs).

* ``train_program``: ``modes/train.py``'s step: the config's network, ``losses.get_loss_fn``, the
  optimizer of ``training.make_optimizer``, ``training.make_train_step`` on a mesh (state replicated,
  batch sharded; no donation, as modes/train.py);
* ``likelihood_program``: the per-example probability-flow ODE log-likelihood of
  ``--mode=eval`` (``modes.evaluate._likelihood_fns``' batch function under
  ``parallel.per_example``: per-example adaptive Dopri5, ``eval.divergence`` / tolerances);
* ``sample_program``: ``run_lib.generate``'s per-sample program (the configured sampler on a batch
  of one, vmapped over the samples' keys).

Each returns a ``Program``: the jitted function, its arguments as ``jax.ShapeDtypeStruct`` trees
(``jax.eval_shape``: nothing of full size is allocated; ``fn.lower(*abstract).compile()``) and a
``make_args()`` that allocates real ones. The published configurations are ``MODELS``; ``tiny``
shrinks any of them (network, image size) for CPU smoke runs.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Published sizes: name -> (config module in configs/, overrides "section.field": value, what it is).
MODELS = {
    "ddpmpp": ("cifar_vp_dsm", {}, "DDPM++ cont. (VP), CIFAR-10, 61.8M"),
    "ddpmpp_deep": ("cifar_vp_dsm", {"model.num_res_blocks": 8},
                    "DDPM++ cont. deep (8 blocks), CIFAR-10, 106.6M"),
    "ncsnpp": ("cifar_ve_dsm", {}, "NCSN++ cont. (VE), CIFAR-10, 62.8M"),
    "edm": ("cifar_edm_dsm", {}, "EDM DDPM++ (ch_mult 2,2,2), CIFAR-10"),
    "celeba64": ("celeba64_ve_dsm", {}, "NCSN++ cont. (VE), CelebA 64x64"),
    "ddpmpp_stf": ("cifar_vp_stf", {}, "DDPM++ cont. (VP), STF target, reference batch 4096"),
    # EDM's own CIFAR-10 networks (models/songunet.py, configs/default_image.songunet_model).
    "edm_ddpmpp": ("cifar_edm_dsm", {"songunet": "ddpmpp"}, "EDM DDPM++ (SongUNet), CIFAR-10, 55.7M"),
    "edm_ncsnpp": ("cifar_edm_dsm", {"songunet": "ncsnpp"}, "EDM NCSN++ (SongUNet), CIFAR-10, 56.4M"),
    # ScoreFlow (Song et al. 2021b) Table 2's DDPM++ cont. VP (likelihood weighting + IS), whose
    # variational dequantizer the ``dequantizer`` program fits (dequantizer.* of configs/default.py).
    "scoreflow": ("cifar_vp_lw_is", {}, "DDPM++ cont. (VP), LW + IS, CIFAR-10 (ScoreFlow), 61.8M"),
}
# The papers' global training batches: score_sde (Song et al. 2021) 128, EDM (Karras et al. 2022)
# 512; benchmarks/memory.py --accum gives the training.grad_accum_steps that reach them.
PAPER_BATCH = {"ddpmpp": 128, "ddpmpp_deep": 128, "ncsnpp": 128, "edm": 512, "edm_ddpmpp": 512,
               "edm_ncsnpp": 512}
# A network and image small enough to compile and run in seconds on one CPU core.
TINY = {"model.nf": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1,
        "model.attn_resolutions": (), "model.dropout": 0.0, "data.image_size": 8}


def override(config, values: dict) -> Any:
  """``config`` with ``{"section.field": value}`` set (fields must exist), in place."""
  for dotted, value in values.items():
    section, field = dotted.split(".")
    if field not in config[section]:
      raise KeyError(f"unknown config field {dotted!r}")
    config[section][field] = value
  return config


def get_config(model: str, tiny: bool = False, **values):
  """The config of ``MODELS[model]`` (``tiny``: with ``TINY``), then ``values`` ("section__field"
  keyword names are accepted as "section.field")."""
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
  module, fixed, _ = MODELS[model]
  config = importlib.import_module(f"configs.{module}").get_config()
  fixed = dict(fixed)
  if "songunet" in fixed:
    from configs.default_image import songunet_model
    songunet_model(config.model, fixed.pop("songunet"))
  override(config, fixed)
  if tiny:
    override(config, TINY)
  return override(config, {k.replace("__", "."): v for k, v in values.items()})


@dataclasses.dataclass
class Program:
  """A jitted program, its abstract arguments, real arguments on demand, items (images or
  examples) per call and the parameter count of its network."""
  name: str
  fn: Callable
  abstract: tuple
  make_args: Callable[[], tuple]
  items: int
  params: int

  def compile(self):
    """``fn.lower(*abstract).compile()``: the XLA executable (nothing of full size allocated)."""
    return self.fn.lower(*self.abstract).compile()


def _network(config):
  """(sde, score_fn(params, x, t, rng), event shape, abstract params, params maker, count)."""
  import datasets
  import sde_lib
  from models import get_model
  from models.utils import init_model, score_fn_from_config
  import config_schema
  cfg = config_schema.validate(config)  # the typed sections the science takes
  sde = sde_lib.get_sde(cfg.sde)
  model = get_model(cfg)
  event = tuple(datasets.dataset_info(cfg).shape)
  init = lambda: init_model(model, jax.random.PRNGKey(0), (1,) + event)  # noqa: E731
  abstract = jax.eval_shape(init)
  count = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract))
  return sde, score_fn_from_config(cfg.model, sde, model), event, abstract, init, count


def _data(shape) -> np.ndarray:
  return np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)


def train_program(config, batch: int, mesh, accum_steps: int = 1) -> Program:
  """``modes/train.py``'s train step at global batch ``batch`` x ``accum_steps`` in
  ``accum_steps`` micro-batches of ``batch`` (training.grad_accum_steps; STF: the reference batch
  is ``training.ref_batch_size``, at least the global batch) on ``mesh``."""
  import losses
  import run_lib
  import training
  tr = config.training
  tr.batch_size = batch * accum_steps
  tr.grad_accum_steps = accum_steps
  tr.ref_batch_size = (max(int(tr.ref_batch_size), tr.batch_size) if tr.target == "stf"
                       else tr.batch_size)
  sde, score_fn, event, abstract_params, init, count = _network(config)
  cfg = run_lib.validate_config(config)  # the typed sections the science takes
  optimizer = training.make_optimizer(cfg.optim)
  key = jax.random.PRNGKey(1)
  step = training.make_train_step(losses.get_loss_fn(cfg.training, sde, score_fn), optimizer,
                                  cfg.model.ema_rate, mesh=mesh,
                                  accum_steps=cfg.training.grad_accum_steps)
  rows = (run_lib.train_batch_rows(config),) + event
  state = jax.eval_shape(lambda p: training.init_train_state(p, optimizer, key), abstract_params)

  def make_args():  # one jitted init (eager per-leaf ops would each compile)
    real = jax.jit(lambda p: training.init_train_state(p, optimizer, key))(init())
    return training.replicate(real, mesh), training.shard_batch(_data(rows), mesh)

  return Program("train", step, (state, jax.ShapeDtypeStruct(rows, jnp.float32)), make_args,
                 tr.batch_size, count)


def score_model(config, params):
  """A ``run_lib.ScoreModel`` of fresh parameters (abstract or real) of the config's network,
  with the SDE's Gaussian prior: what sample / eval load from a checkpoint."""
  import run_lib
  sde, score_fn, event, _, _, _ = _network(config)
  return run_lib.ScoreModel(sde=sde, score_fn=lambda x, t: score_fn(params, x, t), event_shape=event,
                            step=0, prior=sde.prior(), params=params, apply=score_fn)


def _per_example_program(name: str, config, batch: int, mesh, fn, x_shape) -> Program:
  """jit of the per-example ``fn(params, xs, keys)`` (one device's share of ``parallel.
  sharded_map``, with its compiler options) at ``batch`` rows."""
  import parallel
  _, _, _, abstract_params, init, count = _network(config)
  keys = jax.eval_shape(lambda: jax.vmap(jax.random.PRNGKey)(jnp.arange(batch)))
  jitted = jax.jit(fn, compiler_options=parallel.compiler_options(mesh))

  def make_args():
    return init(), _data((batch,) + x_shape), jax.vmap(jax.random.PRNGKey)(jnp.arange(batch))

  return Program(name, jitted, (abstract_params, jax.ShapeDtypeStruct((batch,) + x_shape,
                                                                      jnp.float32), keys),
                 make_args, batch, count)


def likelihood_program(config, batch: int, mesh) -> Program:
  """``--mode=eval``'s per-example ODE log-likelihood (eval.divergence, rtol / atol, max_steps)
  of ``batch`` examples on one device."""
  import parallel
  from modes import evaluate
  model = score_model(config, None)
  logp_fn, _ = evaluate._likelihood_fns(config, model)
  return _per_example_program("likelihood", config, batch, mesh, parallel.per_example(logp_fn),
                              model.event_shape)


def sample_program(config, batch: int, mesh) -> Program:
  """``run_lib.generate``'s per-sample program (``run_lib.per_sample_fn``: the configured sampler
  run on a batch of one per key, vmapped over ``batch`` keys), on one device."""
  import run_lib
  model = score_model(config, None)
  per_sample = run_lib.per_sample_fn(run_lib.validate_config(config), model)
  return _per_example_program("sample", config, batch, mesh, per_sample, ())


# Gradient accumulation's micro-batch memory: 2 micro-batches of the given batch (one live at a
# time; the global batch's input rows, B x D floats, are the only part that grows with k).
ACCUM_STEPS = 2
PROGRAMS = {"train": train_program, "likelihood": likelihood_program, "sample": sample_program,
            "train_accum": lambda config, batch, mesh: train_program(config, batch, mesh,
                                                                     ACCUM_STEPS)}


def dequantizer_program(config, batch: int, mesh) -> Program:
  """One step of ``--mode=fit_dequantizer`` (ScoreFlow §5.2, eq. 13): ``dequantization.
  make_train_step`` of the config's ``dequantizer`` section at ``dequantizer.batch_size = batch``
  levels, with log p = minus ``likelihood.scoreflow_bound`` of the frozen score network
  (``dequantizer.bound_time_samples`` draws of the time integral, prior and eps correction, as
  modes/fit_dequantizer.py). The score network's parameters are an argument (the mode closes over
  its loaded ones), so nothing of full size is allocated; one device (the mode has no mesh)."""
  del mesh
  import datasets
  import dequantization
  import likelihood
  import run_lib
  config.dequantizer.batch_size = batch
  sde, score_fn, event, abstract_params, init, count = _network(config)
  cfg = run_lib.validate_config(config)
  info = datasets.dataset_info(cfg)
  d, n_t = cfg.dequantizer, cfg.dequantizer.bound_time_samples
  model = dequantization.from_section(d, event, info.num_grey_levels)
  optimizer = dequantization.make_optimizer(d.lr, d.n_iters)
  levels = jax.ShapeDtypeStruct((batch,) + event, jnp.uint8)
  init_q = lambda: dequantization.init_variables(  # noqa: E731
      model, jax.random.PRNGKey(0), jnp.zeros((batch,) + event, jnp.uint8))
  variables = jax.eval_shape(init_q)
  prior = sde.prior()

  def step(score_params, params, constants, opt_state, k, key):
    def log_p_fn(y, kp):  # modes/fit_dequantizer.py's
      return -likelihood.scoreflow_bound(lambda x, t: score_fn(score_params, x, t), sde, y, kp,
                                         prior=prior, n_time_samples=n_t,
                                         n_prior_samples=n_t)["nll_bound"]
    inner = dequantization.make_train_step(model, constants, log_p_fn, optimizer,
                                           num_levels=info.num_grey_levels, centered=info.centered)
    return inner(params, opt_state, k, key)

  split = lambda v: (v["params"], {n: c for n, c in v.items() if n != "params"})  # noqa: E731
  params, constants = split(variables)
  opt_state = jax.eval_shape(optimizer.init, params)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(1))

  def make_args():
    p, c = split(jax.jit(init_q)())
    k = np.random.default_rng(0).integers(0, info.num_grey_levels, levels.shape, np.uint8)
    return init(), p, c, optimizer.init(p), jnp.asarray(k), jax.random.PRNGKey(1)

  return Program("dequantizer", jax.jit(step), (abstract_params, params, constants, opt_state,
                                                levels, key), make_args, batch, count)


PROGRAMS["dequantizer"] = dequantizer_program


class _WithoutRemat:
  """A jitted function lowered with ``jax.checkpoint`` replaced by the identity (the Monte Carlo
  draws of ``likelihood._time_integral`` / ``eps_correction`` then keep their activations for the
  backward pass): what the remat saves."""

  def __init__(self, fn):
    self.fn = fn

  def lower(self, *args):
    from unittest import mock
    with mock.patch.object(jax, "checkpoint", lambda f, *a, **k: f):
      return self.fn.lower(*args)

  def __call__(self, *args):
    return self.lower(*args).compile()(*args)


def dequantizer_noremat_program(config, batch: int, mesh) -> Program:
  """``dequantizer_program`` without the per-draw ``jax.checkpoint`` (``_WithoutRemat``)."""
  prog = dequantizer_program(config, batch, mesh)
  return dataclasses.replace(prog, name="dequantizer_noremat", fn=_WithoutRemat(prog.fn))


PROGRAMS["dequantizer_noremat"] = dequantizer_noremat_program
