"""The config schema: every field of every section in one table, and the rules that tie fields.

``SCHEMA`` maps each dotted field (``seed``, ``training.batch_size``, ...) to a ``Field``: its kind
(int, float, bool, str, tuple of ints or numbers), range or choices, and a one-line doc. Choice
lists come from the module that owns them (losses, samplers, likelihood, models, sde_lib, datasets,
toy_data). ``model.*`` fields with ``models`` set belong to those networks only. ``RULES`` are the
cross-field rules. ``validate(config)`` is the one config check of scorelab: it raises
``ValueError`` whose message starts with the dotted field name, reads no file and builds no model,
and returns the config as a ``Config`` of typed, frozen sections (``Config.training``,
``Config.sampling``, ...: one dataclass per section, built from SCHEMA, every value cast to its
declared kind). The entry (``run_lib``, ``modes/``) validates once and hands these sections down;
the science modules (losses, samplers, ...) read their attributes and never import this module
(the arrow points down: DESIGN.md, "Import rules"; tests/test_layering.py).
Defaults live in configs/default.py (shared), default_toy.py (MLP) and default_image.py (U-Nets).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np

import auxiliary
import controllable
import datasets
import dequantization
import likelihood
import losses
import models
import samplers
import sde_lib
import toy_data
import training
from models import mlp, ncsnpp
from models.utils import PARAMETERIZATIONS, get_score_fn

SECTIONS = ("training", "sde", "model", "optim", "data", "sampling", "eval", "prior",
            "dequantizer", "classifier")
TOP_LEVEL = ("seed",) + SECTIONS
VECTOR_MODELS = ("mlp",)  # networks of (B, D) vectors (toy data)
IMAGE_MODELS = ("ncsnpp", "ddpmpp", "unet", "songunet")  # NCSN++-family U-Nets of (B, H, W, C)
SONGUNET = dict(models=("songunet",))  # EDM's SongUNet (models/songunet.py) only


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field. ``kind``: 'int' | 'float' | 'bool' | 'str' | 'ints' | 'floats' (tuples);
  bounds ``ge``/``gt``/``le``/``lt`` apply to the value (to every element for tuples); ``choices``
  is a tuple or a function returning one (a registry); ``models`` lists the ``model.name`` values
  that use a model field (None: every model)."""
  kind: str
  doc: str
  ge: Optional[float] = None
  gt: Optional[float] = None
  le: Optional[float] = None
  lt: Optional[float] = None
  choices: Optional[tuple | Callable[[], Sequence[str]]] = None
  models: Optional[tuple[str, ...]] = None
  nonempty: bool = False

  def options(self) -> Optional[tuple]:
    """The allowed values of a choice field (resolving registries), else None."""
    if self.choices is None:
      return None
    return tuple(self.choices() if callable(self.choices) else self.choices)

  def requirement(self) -> str:
    """What a valid value is, in words (the middle of the error message)."""
    if self.choices is not None:
      return f"one of {self.options()}"
    if self.kind == "bool":
      return "a bool (True or False)"
    if self.kind == "str":
      return "a string"
    noun = {"int": "int", "ints": "int", "float": "finite number", "floats": "finite number"}[self.kind]
    if self.gt == 0 and self.ge is None and self.le is None and self.lt is None:
      item = f"positive {noun}"
    elif self.ge == 0 and self.gt is None and self.le is None and self.lt is None:
      item = f"non-negative {noun}"
    elif self.ge == 1 and noun == "int" and self.le is None and self.lt is None:
      item = "positive int"
    else:
      lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
      hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
      if lo and hi:
        item = f"{noun} in {lo}, {hi}"
      elif lo:
        item = f"{noun} {'>=' if self.ge is not None else '>'} {lo[1:]}"
      elif hi:
        item = f"{noun} {'<=' if self.le is not None else '<'} {hi[:-1]}"
      else:
        item = noun
    if self.kind in ("ints", "floats"):
      return f"a {'non-empty ' if self.nonempty else ''}tuple of {item}s"
    return f"an {item}" if item[0] in "aeiou" else f"a {item}"

  def _in_range(self, v) -> bool:
    return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

  def check(self, name: str, value: Any) -> None:
    """Raises ValueError "<name> must be <requirement>, got <value>" for an invalid value."""
    if self.kind in ("ints", "floats"):
      elem = _is_int if self.kind == "ints" else _is_number
      ok = (isinstance(value, (tuple, list)) and (len(value) > 0 or not self.nonempty)
            and all(elem(v) and self._in_range(v) for v in value))
    elif self.choices is not None:
      ok = isinstance(value, str) and value in self.options()
    elif self.kind == "bool":
      ok = isinstance(value, (bool, np.bool_))
    elif self.kind == "str":
      ok = isinstance(value, str)
    elif self.kind == "int":
      ok = _is_int(value) and self._in_range(value)
    else:
      ok = _is_number(value) and self._in_range(value)
    if not ok:
      raise ValueError(f"{name} must be {self.requirement()}, got {value!r}")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
  return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)


def _int(doc: str, **kw) -> Field:
  return Field("int", doc, **kw)


def _float(doc: str, **kw) -> Field:
  return Field("float", doc, **kw)


def _bool(doc: str, **kw) -> Field:
  return Field("bool", doc, **kw)


def _str(doc: str, **kw) -> Field:
  return Field("str", doc, **kw)


def _choice(choices, doc: str, **kw) -> Field:
  return Field("str", doc, choices=choices, **kw)


def _data_names() -> tuple[str, ...]:
  return tuple(toy_data.TOY_DISTRIBUTIONS) + tuple(datasets.IMAGE_DATASETS)


_MLP = dict(models=VECTOR_MODELS)
_UNET = dict(models=IMAGE_MODELS)

SCHEMA: dict[str, Field] = {
    "seed": _int("root of every random stream (init, data, noise, sampling, evaluation)", ge=0),
    # -- training ---------------------------------------------------------------------------------
    "training.batch_size": _int("training batch B (global, over all devices)", ge=1),
    "training.grad_accum_steps": _int(
        "gradient accumulation: micro-batches k of B / k rows per optimizer update (same update "
        "as one batch; B divisible by k x devices)", ge=1),
    "training.n_iters": _int("number of training steps", ge=1),
    "training.log_freq": _int("steps between metric lines", ge=1),
    "training.eval_freq": _int("steps between held-out loss evaluations", ge=1),
    "training.snapshot_freq": _int("steps between kept (periodic) checkpoints", ge=1),
    "training.snapshot_freq_for_preemption": _int("steps between 'latest' checkpoints", ge=1),
    "training.max_to_keep": _int("periodic checkpoints kept", ge=1),
    "training.weighting": _choice(losses.WEIGHTINGS, "time weighting lambda(t) of the loss"),
    "training.target": _choice(losses.TARGETS, "objective: DSM, Stable Target Field, ISM or SSM"),
    "training.n_probes": _int("ism / ssm: Hutchinson probes per example (averaged)", ge=1),
    "training.hutchinson_probe": _choice(losses.PROBES, "ism / ssm: Hutchinson probe distribution"),
    "training.ref_batch_size": _int("STF reference batch n (contains the training batch)", ge=1),
    "training.prng_impl": _choice(
        losses.PRNG_IMPLS, "PRNG implementation of the loss's t, noise and dropout (losses.step_key)"),
    "training.reduce_mean": _bool("mean (True) or sum (False) of the loss over data dimensions"),
    "training.eval_batch_size": _int(
        "held-out rows per loss evaluation (whole training batches, at least one)", ge=1),
    # -- sde ----------------------------------------------------------------------------------------
    "sde.name": _choice(tuple(sorted(sde_lib.SDES)), "forward SDE"),
    "sde.beta_min": _float("VP / sub-VP beta(0)", gt=0),
    "sde.beta_max": _float("VP / sub-VP beta(1) (beta linear in t)", gt=0),
    "sde.sigma_min": _float("VE sigma(0); EDM smallest noise level (= sde.eps)", gt=0),
    "sde.sigma_max": _float("VE sigma(1) (sigma geometric in t); EDM largest (= sde.T)", gt=0),
    "sde.T": _float("diffusion time T (free; beta / sigma do not change with it)", gt=0),
    "sde.eps": _float("smallest time: train, sample and evaluate on [eps, T]", gt=0),
    "sde.rho": _float("EDM: exponent of the Heun time steps (Karras et al. 2022, eq. 5)", gt=0),
    "sde.sigma_data": _float("EDM: data std of the preconditioning and loss weight", gt=0),
    "sde.P_mean": _float("EDM: mean of ln sigma of the training noise levels"),
    "sde.P_std": _float("EDM: std of ln sigma of the training noise levels", gt=0),
    # -- model (every network) ------------------------------------------------------------------------
    "model.name": _choice(models.registered_models, "score network (models registry)"),
    "model.parameterization": _choice(PARAMETERIZATIONS, "what the network outputs"),
    "model.ema_rate": _float("EMA decay of the parameters", ge=0, le=1),
    "model.dropout": _float("dropout rate (train mode only)", ge=0, lt=1),
    "model.input_scaling": _bool("feed x * c_in(t), c_in = 1/sqrt(alpha^2 + sigma^2) (EDM)"),
    "model.fourier_scale": _float("std of the Gaussian Fourier frequencies", gt=0,
                                  models=VECTOR_MODELS + IMAGE_MODELS),
    # -- model: MLP ---------------------------------------------------------------------------------
    "model.widths": Field("ints", "hidden layer widths", ge=1, nonempty=True, **_MLP),
    "model.activation": _choice(mlp.ACTIVATIONS, "hidden activation", **_MLP),
    "model.embedding": _choice(mlp.EMBEDDINGS, "how the noise level enters", **_MLP),
    "model.embedding_dim": _int("time embedding size", ge=1, **_MLP),
    # -- model: NCSN++ / DDPM++ / U-Net -------------------------------------------------------------
    "model.nf": _int("base number of channels", ge=1, **_UNET),
    "model.ch_mult": Field("ints", "channel multiplier per resolution", ge=1, nonempty=True, **_UNET),
    "model.num_res_blocks": _int("residual blocks per resolution", ge=1, **_UNET),
    "model.attn_resolutions": Field("ints", "feature-map sizes with self-attention", ge=1, **_UNET),
    "model.resamp_with_conv": _bool("conv in stand-alone up/down-sampling layers", **_UNET),
    "model.fir": _bool("FIR up/down-sampling", **_UNET),
    "model.fir_kernel": Field("floats", "FIR kernel", nonempty=True, **_UNET),
    "model.skip_rescale": _bool("divide residual sums by sqrt(2)", **_UNET),
    "model.resblock_type": _choice(ncsnpp.RESBLOCK_TYPES, "residual block type", **_UNET),
    "model.progressive": _choice(ncsnpp.PROGRESSIVE, "progressive output path", **_UNET),
    "model.progressive_input": _choice(ncsnpp.PROGRESSIVE_INPUT, "progressive input path",
                                       **_UNET),
    "model.progressive_combine": _choice(ncsnpp.PROGRESSIVE_COMBINE, "how progressive paths join",
                                         **_UNET),
    "model.embedding_type": _choice(ncsnpp.EMBEDDING_TYPES, "noise-level embedding", **_UNET),
    "model.time_embedding_scale": _float("factor on the conditioning before the embedding", gt=0,
                                         **_UNET),
    "model.init_scale": _float("init scale of each block's last conv (0 -> 1e-10)", ge=0, **_UNET),
    "model.conditional": _bool("use the noise-level embedding", **_UNET),
    "model.center_input": _bool("map inputs x -> 2x - 1 first (data in [0, 1])", **_UNET),
    "model.dtype": _choice(tuple(ncsnpp.DTYPES), "compute dtype (params stay float32)", **_UNET),
    "model.channel_mult_noise": _int("noise embedding width / nf (EDM: 1 DDPM++, 2 NCSN++)", ge=1,
                                     **SONGUNET),
    "model.augment_dim": _int("augmentation labels fed to the embedding (EDM CIFAR-10: 9; 0: none)",
                              ge=0, **SONGUNET),
    # -- optim --------------------------------------------------------------------------------------
    "optim.optimizer": _choice(training.OPTIMIZERS, "optimizer (weight decay is decoupled)"),
    "optim.lr": _float("peak learning rate", gt=0),
    "optim.beta1": _float("Adam beta1", ge=0, lt=1),
    "optim.beta2": _float("Adam beta2", ge=0, lt=1),
    "optim.eps": _float("Adam eps", gt=0),
    "optim.weight_decay": _float("decoupled weight decay (0: none)", ge=0),
    "optim.warmup": _int("linear warmup steps (0: none)", ge=0),
    "optim.grad_clip": _float("global gradient-norm clip (0: none)", ge=0),
    # -- data ---------------------------------------------------------------------------------------
    "data.dataset": _choice(_data_names, "toy distribution or image dataset"),
    "data.centered": _bool("images in [-1, 1] (True) or [0, 1] (False)"),
    "data.random_flip": _bool("random horizontal flips of training images"),
    "data.uniform_dequantization": _bool("training images (k + u) / L, u ~ U[0, 1)"),
    "data.num_grey_levels": _int("grey levels L (the dataset's own count is used)", ge=2),
    "data.image_size": _int("image height = width (0 for toy data)", ge=0),
    "data.num_channels": _int("image channels (0 for toy data)", ge=0),
    "data.tfds_data_dir": _str("prepared TFDS datasets ('' = TFDS default)"),
    "data.download": _bool("download missing TFDS datasets and FID Inception weights on first "
                           "use (process 0); False: never, fail at once"),
    "data.train_split": _str("image split trained on"),
    # -- sampling -------------------------------------------------------------------------------------
    "sampling.method": _choice(samplers.registered_samplers, "sampler (samplers registry)"),
    "sampling.c": _float("generative diffusion h^2 = c g^2: 0 ODE ('ode', 'heun', 'ddim' need "
                         "0), 1 reverse SDE", ge=0),
    "sampling.n_steps": _int("steps of fixed-step samplers (first step of the adaptive SDE)",
                             ge=1),
    "sampling.solver": _choice(samplers.SOLVERS,
                               "ODE solver for 'ode'; SDE solver for 'sde' (ODE name: Euler)"),
    "sampling.rtol": _float("relative tolerance of adaptive solves (ODE, adaptive SDE)", gt=0),
    "sampling.atol": _float("absolute tolerance of adaptive solves (ODE, adaptive SDE)", gt=0),
    "sampling.snr": _float("'pc': Langevin corrector signal-to-noise ratio", ge=0),
    "sampling.n_corrector_steps": _int("'pc': Langevin steps per predictor step", ge=0),
    "sampling.predictor": _choice(samplers.PC_PREDICTORS, "'pc': predictor"),
    "sampling.adaptive": _bool("'sde': adaptive steps (needs a solver with an error estimate)"),
    "sampling.max_steps": _int("step bound of adaptive solves (ODE, adaptive SDE)", ge=1),
    "sampling.denoise": _bool("final Tweedie denoising step at eps"),
    "sampling.S_churn": _float("'heun': stochasticity S_churn (0: deterministic)", ge=0),
    "sampling.S_min": _float("'heun': churn only for noise levels >= S_min", ge=0),
    "sampling.S_max": _float("'heun': churn only for noise levels <= S_max", gt=0),
    "sampling.S_noise": _float("'heun': std factor of the churn noise", gt=0),
    "sampling.perturbation": _choice(samplers.PERTURBATIONS,
                                     "eq. 44 score error of Cao et al., Appendix G.2"),
    "sampling.perturbation_epsilon": _float("magnitude epsilon of the score error (0 iff 'none')"),
    "sampling.perturbation_edge": _float("case4/case5 pulse edge as a fraction of T (0: paper's)",
                                         ge=0, lt=1),
    "sampling.n_samples": _int("samples drawn by --mode=sample", ge=1),
    "sampling.batch_size": _int("samples per sampler call", ge=1),
    "sampling.condition": _choice(controllable.CONDITIONS, "controllable generation (Song et al. "
                                  "2021, App. I): class guidance, inpainting, colorization"),
    "sampling.class_label": _int("'class': class drawn (-1: every class in turn)", ge=-1),
    "sampling.guidance_scale": _float("'class': scale s of the classifier gradient (1: Bayes)",
                                      ge=0),
    "sampling.mask": _str("'inpaint': hidden part of the eval.split images: 'bottom_half', "
                          "'centre' or 'random:<fraction kept>'"),
    # -- eval ---------------------------------------------------------------------------------------
    "eval.batch_size": _int("examples per likelihood batch", ge=1),
    "eval.checkpoint": _int("checkpoint step to evaluate (-1: latest)", ge=-1),
    "eval.use_ema": _bool("evaluate the EMA parameters"),
    "eval.split": _str("image split evaluated, or a slice of it: 'test[:120]'"),
    "eval.bpd": _bool("exact log-likelihood (bits/dim) with the probability-flow ODE"),
    "eval.bound": _bool("ScoreFlow per-datapoint bound"),
    "eval.divergence": _choice(likelihood.DIVERGENCES, "ODE divergence: exact or Hutchinson"),
    "eval.hutchinson_probe": _choice(likelihood.PROBES, "Hutchinson probe distribution"),
    "eval.rtol": _float("relative tolerance of the likelihood ODE", gt=0),
    "eval.atol": _float("absolute tolerance of the likelihood ODE", gt=0),
    "eval.float64": _bool("likelihood in float64"),
    "eval.num_samples": _int("samples for FID / sample metrics; toy held-out set size", ge=1),
    "eval.fid": _bool("FID / Inception Score of samples (images)"),
    "eval.inception_weights": _str("converted Inception-v3 .npz; '' = the cache, fetched on first use"),
    "eval.fid_stats": _str("reference statistics .npz (mu, sigma); '' = none"),
    "eval.bound_time_samples": _int("time samples per example of the ScoreFlow bound and CT-ELBO",
                                    ge=1),
    "eval.ct_elbo": _bool("CT-ELBO of the plug-in reverse SDE (Huang et al. eq. 25), ISM + DSM forms"),
    "eval.ct_elbo_lambdas": Field("floats", "toy data: lambda-family CT-ELBOs (Huang et al. eq. 27)",
                                  lt=1),
    "eval.num_likelihood_examples": _int("toy data: held-out points of the NLL", ge=1),
    "eval.max_steps": _int("likelihood ODE step limit; more is a failed solve", ge=1),
    "eval.max_failed_fraction": _float("eval fails when more likelihood solves fail", ge=0, le=1),
    "eval.dequantization": _choice(dequantization.DEQUANTIZATIONS, "images: uniform u or the "
                                   "fitted q_phi(u | k) of --mode=fit_dequantizer"),
    # Prior of the generative process (Franzese et al.): p_noise or a fitted auxiliary nu_phi.
    "prior.kind": _choice(auxiliary.KINDS, "'gaussian' (p_noise) or a fitted 'dpgmm' / 'flow'"),
    "prior.fit": _choice(auxiliary.FIT_METHODS, "samples of p(x, T): forward marginal or ODE"),
    "prior.n_fit_samples": _int("samples of p(x, T) drawn for fitting (held-out part included)",
                                ge=2),
    "prior.heldout_fraction": _float("fraction held out for the cross-entropy", gt=0, lt=1),
    "prior.n_components": _int("DPGMM truncation level", ge=1),
    "prior.covariance_type": _choice(auxiliary.COVARIANCE_TYPES, "DPGMM covariance"),
    "prior.weight_threshold": _float("DPGMM: a component is effective above this weight",
                                     gt=0, lt=1),
    "prior.max_iter": _int("DPGMM: variational EM iterations at most (stops once converged)",
                           ge=1),
    "prior.flow_layers": _int("flow: coupling layers (vectors) / steps per level (Glow)", ge=1),
    "prior.flow_hidden": _int("flow: conditioner width", ge=1),
    "prior.flow_levels": _int("flow: Glow levels (images)", ge=1),
    "prior.flow_steps": _int("flow: optimizer steps", ge=1),
    "prior.flow_lr": _float("flow: peak learning rate", gt=0),
    "prior.flow_batch_size": _int("flow: minibatch size", ge=1),
    # variational dequantization q_phi(u | k) (ScoreFlow Sec. 5.2; --mode=fit_dequantizer)
    "dequantizer.flow_steps": _int("Glow steps per level", ge=1),
    "dequantizer.flow_levels": _int("Glow levels (2^levels divides the image size)", ge=1),
    "dequantizer.flow_hidden": _int("conditioner width (and of the feature net of x)", ge=1),
    "dequantizer.context_features": _int("channels of the features of x fed to conditioners", ge=1),
    "dequantizer.n_iters": _int("optimizer steps", ge=1),
    "dequantizer.lr": _float("peak learning rate", gt=0),
    "dequantizer.batch_size": _int("images per step", ge=1),
    "dequantizer.bound_time_samples": _int("time samples per example of the ScoreFlow bound", ge=1),
    "dequantizer.save_freq": _int("steps between saves (resume point)", ge=1),
    # noise-conditional classifier p_t(y | x_t) (Song et al. 2021 Sec. 5; --mode=train_classifier)
    "classifier.widths": Field("ints", "channels per resolution (halved in between): the width",
                               ge=1, nonempty=True),
    "classifier.num_res_blocks": _int("time-conditioned residual blocks per resolution", ge=1),
    "classifier.embedding_dim": _int("noise-level embedding size", ge=2),
    "classifier.n_iters": _int("training steps", ge=1),
    "classifier.batch_size": _int("global training batch", ge=1),
    "classifier.lr": _float("peak learning rate", gt=0),
    "classifier.warmup": _int("linear warmup steps (0: none)", ge=0),
    "classifier.ema_rate": _float("EMA decay of the parameters", ge=0, le=1),
    "classifier.use_ema": _bool("guided sampling uses the EMA parameters"),
    "classifier.log_freq": _int("steps between metric lines", ge=1),
    "classifier.snapshot_freq": _int("steps between checkpoints", ge=1),
    "classifier.curve_times": _int("t values of the held-out accuracy-vs-t curve", ge=1),
}


# -- cross-field rules ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
  """A check across fields of the typed ``Config`` (every field of ``sections`` already has its
  kind and range); it reads only ``sections`` and raises ValueError naming a field."""
  sections: tuple[str, ...]
  doc: str
  check: Callable[[Any], None]


def _ref_batch(config) -> None:
  tr = config.training
  if tr.ref_batch_size < tr.batch_size:
    raise ValueError(f"training.ref_batch_size must be >= training.batch_size="
                     f"{tr.batch_size}, got {tr.ref_batch_size}")


def _grad_accum(config) -> None:
  tr = config.training
  if tr.batch_size % tr.grad_accum_steps:
    raise ValueError(f"training.grad_accum_steps={tr.grad_accum_steps} must divide "
                     f"training.batch_size={tr.batch_size}")


def _model_fields(config) -> None:
  m = config.model
  for dotted, field in SCHEMA.items():
    key = dotted.split(".", 1)[1] if dotted.startswith("model.") else None
    if key is None or field.models is None:
      continue
    given = getattr(m, key) is not None
    if m.name in field.models and not given:
      raise ValueError(f"{dotted}: missing config field (model.name={m.name!r} uses it)")
    if m.name not in field.models and given:
      raise ValueError(f"{dotted}: not a field of model.name={m.name!r} (only of {field.models}); "
                       "remove it or change model.name")


def _model_data(config) -> None:
  m, info = config.model, datasets.dataset_info(config)
  if m.name in IMAGE_MODELS and not info.is_image:
    raise ValueError(f"model.name={m.name!r} needs image data, got data.dataset={info.name!r}")
  if m.name in VECTOR_MODELS and info.is_image:
    raise ValueError(f"model.name={m.name!r} needs vector (toy) data, got "
                     f"data.dataset={info.name!r}")
  if m.name in IMAGE_MODELS:
    factor = 2 ** (len(m.ch_mult) - 1)
    if info.shape[0] % factor:
      raise ValueError(f"model.ch_mult has {len(m.ch_mult)} resolutions: data.image_size="
                       f"{info.shape[0]} must be divisible by {factor}")
    if m.center_input and info.centered:
      raise ValueError("model.center_input maps x -> 2x - 1 and needs data in [0, 1], got "
                       "data.centered=True")


def _edm_weighting(config) -> None:
  weighting, sde = config.training.weighting, config.sde.name
  if weighting == "edm" and sde != "edm":
    raise ValueError(f"training.weighting='edm' (log-normal sigma, Karras et al. 2022) needs "
                     f"sde.name='edm', got sde.name={sde!r}")


def _splits(config) -> None:
  known = datasets.split_names(config)
  for field, split in (("data.train_split", config.data.train_split),
                       ("eval.split", config.eval.split)):
    if known and datasets.parse_split(split)[0] not in known:
      raise ValueError(f"{field} must be a split of {config.data.dataset!r} {known} or a "
                       f"slice 'name[start:end]' of one, got {split!r}")


def _ct_elbo_lambdas(config) -> None:
  lambdas, dataset = config.eval.ct_elbo_lambdas, config.data.dataset
  if not lambdas:
    return
  if not config.eval.ct_elbo:
    raise ValueError(f"eval.ct_elbo_lambdas={lambdas} needs eval.ct_elbo=True")
  dist = (toy_data.get_toy_distribution(dataset) if dataset in toy_data.TOY_DISTRIBUTIONS
          else None)
  if dist is None or not hasattr(dist, "marginal_score"):
    raise ValueError(f"eval.ct_elbo_lambdas needs toy data with an exact marginal score (the "
                     f"lambda-ELBO uses it, Huang et al. Theorem 6), got data.dataset={dataset!r}")


def _prior_fit(config) -> None:
  p = config.prior
  n_fit = p.n_fit_samples - max(1, int(round(p.heldout_fraction * p.n_fit_samples)))
  if p.kind == "dpgmm" and p.n_components > n_fit:
    raise ValueError(f"prior.n_components must be <= the {n_fit} fitting samples "
                     f"(prior.n_fit_samples minus the held-out part), got {p.n_components}")


def _dequantizer(config) -> None:
  info = datasets.dataset_info(config)
  if config.eval.dequantization == "variational" and not info.is_image:
    raise ValueError(f"eval.dequantization='variational' needs image data, got data.dataset="
                     f"{info.name!r} (toy data are continuous)")
  f = 2 ** config.dequantizer.flow_levels
  if info.is_image and info.shape[0] % f:
    raise ValueError(f"dequantizer.flow_levels={config.dequantizer.flow_levels}: 2^levels = {f} "
                     f"must divide the image size {info.shape[0]}")


def _condition(config) -> None:
  """sampling.condition fits the data and the sampler; its own fields are used (not ignored)."""
  cfg, info = config.sampling, datasets.dataset_info(config)
  condition = cfg.condition
  controllable.parse_mask(cfg.mask)
  unused = [(f, getattr(cfg, f)) for f, default, used_by in (("class_label", -1, "class"),
                                                             ("guidance_scale", 1.0, "class"),
                                                             ("mask", "bottom_half", "inpaint"))
            if condition != used_by and getattr(cfg, f) != default]
  if unused:
    f, v = unused[0]
    raise ValueError(f"sampling.{f}={v!r} is only used with sampling.condition="
                     f"{'inpaint' if f == 'mask' else 'class'!r}, got sampling.condition="
                     f"{condition!r}")
  if condition == "none":
    return
  if not info.is_image:
    raise ValueError(f"sampling.condition={condition!r} needs image data, got data.dataset="
                     f"{info.name!r} (toy data have no images to mask, colour or label)")
  if condition == "class" and not info.num_classes:
    raise ValueError(f"sampling.condition='class' needs a labelled dataset (a classifier of "
                     f"--mode=train_classifier), got data.dataset={info.name!r}")
  if condition == "class" and cfg.class_label >= info.num_classes:
    raise ValueError(f"sampling.class_label must be < {info.num_classes} (the classes of "
                     f"{info.name!r}) or -1, got {cfg.class_label}")
  if condition == "colorize" and info.shape[-1] != 3:
    raise ValueError(f"sampling.condition='colorize' needs RGB images (data.num_channels=3), got "
                     f"data.num_channels={info.shape[-1]} ({info.name!r})")
  if condition in ("inpaint", "colorize"):
    samplers.check_step_hook(cfg)


RULES: tuple[Rule, ...] = (
    Rule(("prior",), "prior.n_components <= the DPGMM's fitting samples", _prior_fit),
    Rule(("data", "eval", "dequantizer"), "eval.dequantization='variational' needs images; "
         "2^dequantizer.flow_levels divides the image size", _dequantizer),
    Rule(("training",), "training.ref_batch_size >= training.batch_size", _ref_batch),
    Rule(("training",), "training.grad_accum_steps divides training.batch_size (per device: "
         "modes/train.py)", _grad_accum),
    Rule(("training",), "training.target 'ism' / 'ssm' not with training.weighting 'edm'; "
         "training.n_probes = 1 unless the target is 'ism' / 'ssm' (losses.check_objective)",
         lambda c: losses.check_objective(c.training.target, c.training.weighting,
                                          c.training.n_probes)),
    Rule(("sde",), "sde.T > sde.eps; beta_max >= beta_min (VP, sub-VP); sigma_max > sigma_min (VE)"
         " (sde_lib.get_sde)", lambda c: sde_lib.get_sde(c.sde)),
    Rule(("model",), "model.* fields of a network family: required when model.name uses them, "
         "refused otherwise", _model_fields),
    Rule(("training", "sde"), "training.weighting='edm' only with sde.name='edm'", _edm_weighting),
    Rule(("data",), "data.image_size / num_channels fit data.dataset (datasets.dataset_info)",
         lambda c: datasets.dataset_info(c)),
    Rule(("data", "eval"), "data.train_split and eval.split are splits of an image dataset",
         _splits),
    Rule(("data", "eval"), "eval.ct_elbo_lambdas only with eval.ct_elbo and toy data with an "
         "exact marginal score", _ct_elbo_lambdas),
    Rule(("model", "data"), "U-Nets need images whose size 2^(len(ch_mult) - 1) divides, MLPs "
         "vectors; model.center_input needs data.centered=False", _model_data),
    Rule(("model", "sde"), "the score wrapper takes model.parameterization for this SDE "
         "(models.utils.get_score_fn; no network is built)",
         lambda c: get_score_fn(sde_lib.get_sde(c.sde), None, c.model.parameterization,
                                c.model.input_scaling)),
    Rule(("sampling", "data"), "sampling.condition: images (labelled for 'class', RGB for "
         "'colorize'), a fixed-step method for 'inpaint' / 'colorize'; class_label, "
         "guidance_scale, mask only with their condition", _condition),
    Rule(("sampling", "sde"), "the sampler of sampling.method honours every sampling.* setting "
         "(samplers.sampler_kwargs)",
         lambda c: samplers.sampler_kwargs(c.sampling, sde_lib.get_sde(c.sde))),
)


# -- validation ---------------------------------------------------------------------------------------
def _is_section(v) -> bool:
  return hasattr(v, "keys") and hasattr(v, "__getitem__")


def _known(section: str) -> list[str]:
  return [k.split(".", 1)[1] for k in SCHEMA if k.startswith(section + ".")]


def _check_structure(config, selected: Sequence[str]) -> None:
  """Unknown fields, missing sections and missing fields (model family fields: see RULES)."""
  if set(selected) == set(TOP_LEVEL):
    for key in config.keys():
      if key not in TOP_LEVEL:
        raise ValueError(f"{key}: unknown config field (known top-level fields: "
                         f"{', '.join(TOP_LEVEL)})")
  for section in selected:
    if section not in config:
      raise ValueError(f"{section}: missing config {'field' if section in SCHEMA else 'section'}")
    if section in SCHEMA:
      continue
    if not _is_section(config[section]):
      raise ValueError(f"{section} must be a config section, got {config[section]!r}")
    known = _known(section)
    for key in config[section].keys():
      if key not in known:
        raise ValueError(f"{section}.{key}: unknown config field (known fields of {section}: "
                         f"{', '.join(known)})")
    for key in known:
      if key not in config[section] and SCHEMA[f"{section}.{key}"].models is None:
        raise ValueError(f"{section}.{key}: missing config field "
                         f"({SCHEMA[section + '.' + key].doc})")


def validate(config, sections: Optional[Sequence[str]] = None) -> "Config":
  """Checks ``config`` (a ConfigDict or a nested dict) against SCHEMA and RULES; raises ValueError
  whose message starts with the dotted field name. ``sections`` (e.g. ``("training",)``) limits
  the check to those sections and the rules that read only them (the others are None in the
  result). Reads no file, builds no model. Returns the typed ``Config`` (``typed``)."""
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  selected = TOP_LEVEL if sections is None else tuple(sections)
  for s in selected:
    if s not in TOP_LEVEL:
      raise ValueError(f"unknown config section {s!r}; sections: {TOP_LEVEL}")
  _check_structure(config, selected)
  for name, field in SCHEMA.items():
    section, _, key = name.partition(".")
    if section not in selected:
      continue
    if not key:
      field.check(name, config[name])
    elif key in config[section]:
      field.check(name, config[section][key])
  checked = typed(config, selected)
  for rule in RULES:
    if set(rule.sections) <= set(selected):
      rule.check(checked)
  return checked


# -- typed sections --------------------------------------------------------------------------------
_CASTS: dict[str, Callable[[Any], Any]] = {
    "int": int, "float": float, "bool": bool, "str": str,
    "ints": lambda v: tuple(int(e) for e in v), "floats": lambda v: tuple(float(e) for e in v)}
_KIND_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "ints": tuple[int, ...],
               "floats": tuple[float, ...]}


def _to_dict(self) -> dict[str, Any]:
  """A typed config or section as a nested dict of the fields that are set (None: a network
  family's field of another family, or a section not validated, is left out)."""
  return {f.name: (v.to_dict() if hasattr(v, "to_dict") else v)
          for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


def _section_class(section: str) -> type:
  """A frozen dataclass of the fields of ``section`` in SCHEMA (model family fields may be None)."""
  fields = [(key, Optional[_KIND_TYPES[SCHEMA[f"{section}.{key}"].kind]],
             dataclasses.field(default=None)) for key in _known(section)]
  return dataclasses.make_dataclass(f"{section.capitalize()}Section", fields, frozen=True,
                                    namespace={"to_dict": _to_dict,
                                               "__doc__": f"Typed config.{section} (SCHEMA)."})


SECTION_CLASSES: dict[str, type] = {s: _section_class(s) for s in SECTIONS}


# A validated config: ``seed`` and one typed, frozen section per SECTIONS entry (None when not
# validated). What the lower floors take, e.g. ``losses.get_loss_fn(cfg.training, ...)``.
Config = dataclasses.make_dataclass(
    "Config", [("seed", Optional[int], dataclasses.field(default=None))]
    + [(s, Any, dataclasses.field(default=None)) for s in SECTIONS], frozen=True,
    namespace={"to_dict": _to_dict, "__doc__": "A validated config of typed sections "
               "(config_schema.validate): seed and one frozen dataclass per section."})


def _typed_section(config, section: str):
  values = config[section]
  return SECTION_CLASSES[section](**{
      key: _CASTS[SCHEMA[f"{section}.{key}"].kind](values[key]) for key in _known(section)
      if key in values})


def typed(config, sections: Optional[Sequence[str]] = None) -> Config:
  """``config`` as a ``Config`` of typed sections (each value cast to its SCHEMA kind); no checks:
  call ``validate``, which returns this, at the boundary."""
  selected = TOP_LEVEL if sections is None else tuple(sections)
  return Config(**{s: (_CASTS[SCHEMA[s].kind](config[s]) if s in SCHEMA
                      else _typed_section(config, s)) for s in selected})


def describe() -> str:
  """The schema as text: one line per field (name, requirement, doc), then the rules."""
  lines = [f"{name}: {f.requirement()}"
           + (f" [model.name in {f.models}]" if f.models else "") + f" -- {f.doc}"
           for name, f in SCHEMA.items()]
  return "\n".join(lines + ["rules:"] + [f"  {r.doc}" for r in RULES])
