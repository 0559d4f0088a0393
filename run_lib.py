"""What every mode of ``main.py`` shares (the modes themselves live in ``modes/``, one file each):

* the config: ``validate_config`` (the schema of ``config_schema``, before any file is touched;
  it returns the typed ``config_schema.Config`` whose sections the science modules take),
  ``check_resumable`` (a restart may change only ``RESUMABLE_FIELDS`` / ``RESUMABLE_SECTIONS``),
  ``write_config`` (``config.json`` on first start);
* the data stream: ``get_data_sampler`` and ``data_stream_batch`` (a pure function of (seed, step),
  so a resumed run draws exactly the batches an uninterrupted run would);
* the loss log (``LossLog``: ``train_loss.csv``, ``eval_loss.csv`` and TensorBoard, rows past the
  last checkpoint dropped at restart);
* the trained model of a workdir (``load_score_model`` -> ``ScoreModel``: SDE, score_fn, event
  shape, step, prior) that sample and eval pass on, and ``generate``;
* the noise-conditional classifier of a workdir (``load_classifier`` -> ``logits_fn(x, t)``, from
  ``DIR/classifier/`` that ``--mode=train_classifier`` writes);
* writing reports and figures (``write_json``, ``save_samples_png``);
* the finished batches of eval's per-example passes, kept across preemptions
  (``PartialResults``, ``eval_stores``: ``<eval folder>/partial/<stage>/``).

Only ``run_lib``, ``modes/``, ``checkpoints`` and ``main.py`` touch files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import checkpoints
import config_schema
import datasets
import parallel
import sde_lib
import toy_data
from parallel import is_main
from progress import Progress

Array = jax.Array

# Config fields that may change between a run and its resumption (everything else must match).
RESUMABLE_FIELDS = ("training.n_iters", "training.log_freq", "training.eval_freq",
                    "training.grad_accum_steps",  # the same update for any k (training.py)
                    "training.snapshot_freq", "training.snapshot_freq_for_preemption",
                    "training.max_to_keep")
RESUMABLE_SECTIONS = ("sampling.", "eval.", "prior.", "dequantizer.", "classifier.")
# What eval / sample rebuild from a workdir: these fields must match its config.json (sde.T and
# sde.eps may differ: one trained model is evaluated over diffusion times, Franzese et al.).
MODEL_FIELDS = ("model.", "sde.", "data.dataset", "data.image_size", "data.num_channels",
                "data.centered", "data.num_grey_levels")
FREE_AT_EVAL = ("model.ema_rate", "model.dropout", "sde.T", "sde.eps")

CONFIG_FILE = "config.json"
PRIOR_DIR = "prior"
DEQUANTIZER_DIR = "dequantizer"  # --mode=fit_dequantizer's q_phi(u | k)
LOSS_FILE = "train_loss.csv"
EVAL_FILE = "eval_loss.csv"


# -- configuration --------------------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict) -> config_schema.Config:
  """Checks every field against ``config_schema`` (ValueError naming the dotted field) and returns
  the typed config (``config_schema.Config``: frozen sections, values of their declared kinds),
  what the lower floors take (``sde_lib.get_sde(cfg.sde)``, ``losses.get_loss_fn(cfg.training,
  ...)``, ``samplers.get_sampler(cfg.sampling, ...)``). Touches no file, so it runs before the
  workdir is created or modified. Files (config.json, resumption checks) keep the ConfigDict."""
  return config_schema.validate(config)


def _flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """Flattens a config (via its JSON form, so tuples and lists compare equal) to dotted keys."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  out = {}

  def rec(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        rec(v, prefix + k + ".")
      else:
        out[prefix + k] = v

  rec(config, "")
  return out


def check_resumable(config: ml_collections.ConfigDict, workdir: str,
                    action: str = "resume") -> None:
  """Refuses (ValueError naming the field) a config that differs from ``workdir/config.json`` in a
  field that changes the run (or the model that eval / sample rebuild). A workdir without
  config.json is accepted."""
  if action == "resume":
    compared = lambda k: not (k in RESUMABLE_FIELDS or k.startswith(RESUMABLE_SECTIONS))  # noqa: E731
  else:
    compared = lambda k: k.startswith(MODEL_FIELDS) and k not in FREE_AT_EVAL  # noqa: E731
  check_same_config(config, workdir, compared, action)


def check_same_config(config: ml_collections.ConfigDict, folder: str,
                      compared: Callable[[str], bool], action: str) -> None:
  """ValueError naming the first dotted field with ``compared(field)`` whose value in ``config``
  differs from ``folder/config.json`` (absent file: nothing to compare)."""
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _flat_config(json.load(f))
  given = _flat_config(config)
  for key in sorted(set(saved) | set(given)):
    if not compared(key):
      continue
    if key not in saved:  # a field added to scorelab after this run started
      logging.warning("config field %s is not in %s: continuing with %r", key, path, given[key])
      continue
    a, b = saved[key], given.get(key, "<absent>")
    if a != b:
      raise ValueError(f"config field {key} differs from the run in {folder} (saved {a!r}, "
                       f"given {b!r}); {action} with the same value"
                       + (" or use a new workdir" if action == "resume" else ""))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """``workdir/config.json`` (atomically, on the first start only, by process 0)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if is_main() and not os.path.exists(path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)


def open_checkpoints(config, workdir: str, read_only: bool = False) -> checkpoints.CheckpointStore:
  """The workdir's checkpoint store: the latest every ``snapshot_freq_for_preemption`` steps, and
  ``max_to_keep`` kept every ``snapshot_freq`` (``checkpoints.CheckpointStore``)."""
  tr = config.training
  return checkpoints.CheckpointStore(workdir, keep_every=tr.snapshot_freq,
                                     max_to_keep=tr.max_to_keep, read_only=read_only)


# -- data ------------------------------------------------------------------------------------------
def train_batch_rows(config) -> int:
  """Rows drawn per step: the STF reference batch (Xu et al., Alg. 1) or the training batch."""
  return config.training.ref_batch_size if config.training.target == "stf" else config.training.batch_size


def data_samples(config, key, n: int) -> jax.Array:
  """n training points x_0 in model space: toy draws, or training images cycled with fresh
  uniform dequantization per draw."""
  name = config.data.dataset
  if name in toy_data.TOY_DISTRIBUTIONS:
    return toy_data.get_toy_distribution(name).sample(key, n)
  info = datasets.dataset_info(config)
  levels, _, _ = datasets.load_levels(config, str(config.data.train_split))
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()[-1])
  idx = rng.integers(0, len(levels), n)
  return jnp.asarray(datasets.scale_images(levels[idx], info.num_grey_levels, info.centered,
                                           noise=rng.uniform(size=(n,) + levels.shape[1:])),
                     jnp.float32)


def get_data_sampler(config, split: str | None = None):
  """The training data stream (``split=None``) or a held-out one, with ``batch_at(step)``: the
  ``datasets.ToyIterator`` of a toy distribution (held out: its own seed, ``config.seed + 1``), or
  a ``datasets.ArrayIterator`` over ``split`` (default ``data.train_split``) for image data."""
  rows = train_batch_rows(config)
  if config.data.dataset in toy_data.TOY_DISTRIBUTIONS:
    return datasets.get_dataset(config, batch_size=rows,
                                seed=config.seed + (0 if split is None else 1))
  split = config.data.train_split if split is None else split
  return datasets.get_dataset(config, split=split, shuffle=True, batch_size=rows)


def data_stream_batch(source, step: int | Array) -> Array:
  """The batch of training step ``step`` (0-based): ``source.batch_at(step)``, a pure function of
  (seed, step) for toy data and an exact seek into the shuffled epoch stream for images, so a
  resumed run draws exactly the batches an uninterrupted run would."""
  return source.batch_at(int(step))


# -- the loss log ----------------------------------------------------------------------------------
def _read_rows(path: str, upto: int) -> list[tuple[int, float]]:
  """(step, value) rows of a CSV with steps <= ``upto`` (a cut last line is skipped)."""
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        parts = line.strip().split(",")
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) <= upto:
          rows[int(parts[0])] = float(parts[1])
  return sorted(rows.items())


def read_loss_curves(workdir: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
  """The (step, loss) rows of a workdir's training and held-out loss logs."""
  return tuple(_read_rows(os.path.join(workdir, name), math.inf) for name in (LOSS_FILE, EVAL_FILE))


def _write_rows(path: str, rows: list[tuple[int, float]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("step,loss\n")
    f.writelines(f"{s},{l!r}\n" for s, l in rows)
  os.replace(tmp, path)


class LossLog:
  """Per-step training losses and held-out losses of a run, kept consistent with its checkpoints.

  ``add(step, loss)`` records a step's loss (fetched and checked finite by ``training.train_loop``);
  ``flush()`` (called before every checkpoint) appends the new rows to ``train_loss.csv``. At
  ``open`` rows a killed run wrote past its last checkpoint are dropped (they are recomputed
  identically). Only process 0 writes.
  """

  def __init__(self, workdir: str, start_step: int):
    self.workdir = workdir
    self.train = _read_rows(os.path.join(workdir, LOSS_FILE), start_step)
    self.eval = _read_rows(os.path.join(workdir, EVAL_FILE), start_step)
    self.new: dict[int, float] = {}
    self.new_eval: dict[int, float] = {}
    self._flushed = len(self.train)
    self.writer = None
    if is_main():
      _write_rows(os.path.join(workdir, LOSS_FILE), self.train)
      _write_rows(os.path.join(workdir, EVAL_FILE), self.eval)
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def add(self, step: int, loss: float) -> None:
    self.new[step] = loss
    self.train.append((step, loss))
    self.scalar("train/loss", loss, step)

  def add_eval(self, step: int, value: float) -> None:
    self.new_eval[step] = value
    self.eval.append((step, value))
    self.scalar("eval/loss", value, step)

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self.writer is not None:
      self.writer.add_scalar(tag, value, step)

  def flush(self) -> None:
    """Rows first, then the checkpoint: rows past the last committed checkpoint are dropped on
    restart, so the files never hold losses of steps a resumed run would redo differently."""
    if is_main():
      with open(os.path.join(self.workdir, LOSS_FILE), "a") as f:
        f.writelines(f"{s},{l!r}\n" for s, l in self.train[self._flushed:])
      _write_rows(os.path.join(self.workdir, EVAL_FILE), self.eval)
    self._flushed = len(self.train)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


# -- the trained model of a workdir ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScoreModel:
  """A trained model as sample / eval use it: ``score_fn(x, t)`` (parameters bound, eval mode),
  its SDE, event shape, checkpoint step, and the prior the generative process starts from; also
  ``apply(params, x, t)`` and ``params`` apart (what ``parallel.sharded_map`` replicates)."""
  sde: Any
  score_fn: Callable[[Array, Array], Array]
  event_shape: tuple[int, ...]
  step: int
  prior: Any
  params: Any = None
  apply: Optional[Callable[[Any, Array, Array], Array]] = None

  def bound_score(self, params) -> Callable[[Array, Array], Array]:
    """score_fn(x, t) of ``params`` (``params`` None: the bound ``score_fn``)."""
    return self.score_fn if self.apply is None else functools.partial(self.apply, params)


def init_state(config: config_schema.Config, sde, key: Array, template: bool = False):
  """(model, score_fn(params, x, t, rng), fresh TrainState) of the typed config
  (``validate_config``). ``template``: parameters are zeros of the network's shapes and dtypes
  (``jax.eval_shape`` of its init, nothing compiled: the init of a published-size network is a
  compile of tens of seconds on CPU), for a state that a checkpoint or an import overwrites."""
  import training
  from models import get_model
  from models.utils import init_model, score_fn_from_config
  model = get_model(config)
  score_fn = score_fn_from_config(config.model, sde, model)
  event_shape = tuple(datasets.dataset_info(config).shape)
  init_key, state_key = jax.random.split(key)
  if template:
    shapes = jax.eval_shape(lambda k: init_model(model, k, (1,) + event_shape), init_key)
    params = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), shapes)
  else:
    params = init_model(model, init_key, (1,) + event_shape)
  state = training.init_train_state(params, training.make_optimizer(config.optim), state_key)
  return model, score_fn, state


def load_prior(config, sde, workdir: str):
  """The prior of the generative process: the SDE's Gaussian p_noise (``prior.kind='gaussian'``)
  or the nu_phi fitted by ``--mode=fit_prior`` in ``workdir/prior`` (verified), which must be of
  ``prior.kind`` and fitted for this SDE and T; a clear error names what to run otherwise."""
  import auxiliary
  kind = config.prior.kind
  if kind == "gaussian":
    return sde.prior()
  where = os.path.join(workdir, PRIOR_DIR)
  try:
    meta = checkpoints.read_tree_meta(where)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"prior.kind={kind!r}: no fitted prior in {where}; run --mode=fit_prior "
                            "with this config first") from e
  fitted = (meta["spec"]["kind"], meta["sde"], float(meta["T"]))
  wanted = (kind, config.sde.name, float(sde.T))
  if fitted[:2] != wanted[:2] or not math.isclose(fitted[2], wanted[2], rel_tol=1e-9):
    raise ValueError(f"prior.kind={kind!r}: the prior in {where} was fitted as kind={fitted[0]!r} "
                     f"for sde.name={fitted[1]!r}, sde.T={fitted[2]:g}, not for {wanted}; run "
                     "--mode=fit_prior again with this config")
  tree, _ = checkpoints.restore_tree(where, auxiliary.abstract_pytree(meta["spec"]))
  return auxiliary.from_pytree(meta["spec"], tree)


def require_checkpoint(workdir: str) -> None:
  """Fails at once (before any output folder is made) when the workdir has no checkpoint."""
  dirs = [os.path.join(workdir, d) for d in (checkpoints.DIR, checkpoints.LEGACY_DIR)]
  if not any(os.path.isdir(d) and any(s.isdigit() for s in os.listdir(d)) for d in dirs):
    raise FileNotFoundError(f"no checkpoint in {dirs[0]}: run --mode=train first")


def load_score_model(config: ml_collections.ConfigDict, workdir: str,
                     fitted_prior: bool = True) -> ScoreModel:
  """The workdir's checkpoint (the newest intact one, or step ``eval.checkpoint`` when >= 0; EMA
  parameters when ``eval.use_ema``) as a ``ScoreModel``. ``config`` is the ConfigDict (compared
  with the workdir's config.json). Read-only."""
  cfg = validate_config(config)
  sde = sde_lib.get_sde(cfg.sde)
  check_resumable(config, workdir, action="evaluate or sample")
  # Before the (slower) checkpoint: fail fast. Without ``fitted_prior``, p_noise (what
  # --mode=fit_prior uses while it fits the prior).
  prior = load_prior(cfg, sde, workdir) if fitted_prior else sde.prior()
  _, score_fn, state = init_state(cfg, sde, jax.random.PRNGKey(cfg.seed), template=True)
  want = cfg.eval.checkpoint
  with open_checkpoints(cfg, workdir, read_only=True) as store:
    state, step = store.restore(state, step=None if want < 0 else want)
  if step == 0:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, checkpoints.DIR)}: "
                            "run --mode=train first")
  params = state.ema_params if cfg.eval.use_ema else state.params
  bound = lambda x, t: score_fn(params, x, t)  # noqa: E731  (eval mode: no dropout)
  return ScoreModel(sde=sde, score_fn=bound, event_shape=tuple(datasets.dataset_info(cfg).shape),
                    step=step, prior=prior, params=params, apply=score_fn)


# -- the noise-conditional classifier of a workdir (--mode=train_classifier) -----------------------
CLASSIFIER_DIR = "classifier"
# What load_classifier rebuilds: these fields must match classifier/config.json (sde.T, sde.eps free).
CLASSIFIER_FIELDS = ("classifier.widths", "classifier.num_res_blocks", "classifier.embedding_dim",
                     "sde.", "data.dataset", "data.image_size", "data.num_channels",
                     "data.centered")
# What a classifier run depends on (a resumed run must match), less what may change on resume.
CLASSIFIER_RUN_FIELDS = ("seed", "classifier.", "sde.", "data.", "optim.", "eval.split")
CLASSIFIER_RESUMABLE = ("classifier.n_iters", "classifier.log_freq", "classifier.snapshot_freq",
                        "classifier.curve_times", "classifier.use_ema")


def classifier_classes(config) -> int:
  """Number of classes of ``data.dataset``; ValueError naming data.dataset when it has no labels
  (toy data, celeb_a): a class-conditional classifier needs labelled images."""
  info = datasets.dataset_info(config)
  if not info.num_classes:
    raise ValueError(f"data.dataset={info.name!r} has no class labels: the noise-conditional "
                     "classifier (classifier section, --mode=train_classifier) needs a labelled "
                     f"image dataset (one of {datasets.LABELLED_DATASETS})")
  return info.num_classes


def classifier_optimizer(config):
  """The score model's optimizer chain (``training.make_optimizer``: the optim section's Adam,
  clipping, weight decay) with ``classifier.lr`` and ``classifier.warmup``."""
  import training
  return training.make_optimizer(dataclasses.replace(config.optim, lr=config.classifier.lr,
                                                   warmup=config.classifier.warmup))


def init_classifier(config, sde, key: Array):
  """(logits(params, x, t), fresh TrainState, optimizer) of the config's classifier."""
  import training
  from models import classifier
  model = classifier.NoiseConditionalClassifier.from_config(config, classifier_classes(config))
  init_key, state_key = jax.random.split(key)
  params = classifier.init_params(model, init_key, datasets.dataset_info(config).shape)
  optimizer = classifier_optimizer(config)
  return (classifier.logits_fn(sde, model), training.init_train_state(params, optimizer, state_key),
          optimizer)


def open_classifier_checkpoints(config, workdir: str,
                                read_only: bool = False) -> checkpoints.CheckpointStore:
  """``workdir/classifier/checkpoints``: the latest every ``classifier.snapshot_freq`` steps."""
  return checkpoints.CheckpointStore(os.path.join(workdir, CLASSIFIER_DIR),
                                     keep_every=config.classifier.snapshot_freq, max_to_keep=1,
                                     read_only=read_only)


def load_classifier(config: ml_collections.ConfigDict, workdir: str) -> Callable[[Array, Array], Array]:
  """``logits_fn(x, t) -> (B, n_classes)``: unnormalized log p_t(y | x_t) of the classifier that
  --mode=train_classifier trained in ``workdir/classifier/`` (newest intact checkpoint; EMA
  parameters when ``classifier.use_ema``), parameters bound; pure, jit / vmap / grad-safe. Errors
  name the field (unlabelled data.dataset, a changed classifier / SDE field) or the mode to run."""
  cfg = validate_config(config)
  sde = sde_lib.get_sde(cfg.sde)
  classifier_classes(cfg)
  folder = os.path.join(workdir, CLASSIFIER_DIR)
  ckpt_dir = os.path.join(folder, checkpoints.DIR)
  if not (os.path.isdir(ckpt_dir) and any(s.isdigit() for s in os.listdir(ckpt_dir))):
    raise FileNotFoundError(f"no classifier checkpoint in {ckpt_dir}: run --mode=train_classifier "
                            "with this config first")
  check_same_config(config, folder, lambda k: k.startswith(CLASSIFIER_FIELDS)
                    and k not in FREE_AT_EVAL, "load the classifier")
  logits, state, _ = init_classifier(cfg, sde, jax.random.PRNGKey(cfg.seed))
  with open_classifier_checkpoints(cfg, workdir, read_only=True) as store:
    state, step = store.restore(state)
  logging.info("classifier of %s: step %d", folder, step)
  params = state.ema_params if cfg.classifier.use_ema else state.params
  return functools.partial(logits, params)


@contextlib.contextmanager
def model_outputs(config: ml_collections.ConfigDict, workdir: str, folder: str):
  """What eval and sample do first: validate the config, require a checkpoint, check
  ``workdir/folder`` writable, take its lock, load the model. Yields (model, output folder)."""
  cfg = validate_config(config)
  for field, size in (("sampling.batch_size", cfg.sampling.batch_size),
                      ("eval.batch_size", cfg.eval.batch_size)):  # each process takes its share
    if size % jax.process_count():
      raise ValueError(f"{field}={size} must be a multiple of the process count "
                       f"({jax.process_count()})")
  require_checkpoint(workdir)
  out_dir = checkpoints.check_writable(os.path.join(workdir, folder))
  with checkpoints.workdir_lock(workdir, folder):
    yield load_score_model(config, workdir), out_dir


def per_sample_fn(config: config_schema.Config, model: ScoreModel) -> Callable:
  """The sampler of the typed config's ``sampling`` section as a per-example function
  ``(params, _, keys) -> dict(x, nfe)`` of ``parallel.sharded_map``: sample i is the sampler run on
  its own (a batch of one, vmapped) from its own key, so it does not depend on the batch size or
  the device / process count (PC's Langevin step size averages norms over the sampler's batch:
  here over the sample alone)."""
  import samplers
  one = samplers.get_sampler(config.sampling, model.sde, (1,) + model.event_shape,
                             prior=model.prior)

  def per_sample(params, _, keys):
    def single(k):
      x, stats = one(model.bound_score(params), k)
      return {"x": x[0], "nfe": jnp.mean(jnp.asarray(stats["nfe"], jnp.float32))}
    return jax.vmap(single)(keys)
  return per_sample


def generate(config: config_schema.Config, model: ScoreModel, n: int, key: Array, mesh=None,
             per_sample: Optional[Callable] = None, store: Optional[parallel.ResultStore] = None):
  """n samples of the sampler of the typed config's ``sampling`` section, started from ``model.prior``, in global batches of
  ``sampling.batch_size`` spread over every device of every process (``parallel.sharded_map``).
  Sample i is ``per_sample_fn`` run from the key fold_in(key, i), so the samples do not depend on
  the batch size or the device / process count. Passing the same ``per_sample`` again reuses its
  compiled program. ``store``: finished batches kept across preemptions (``PartialResults``).
  (samples (n, ...) on every process, mean NFE per sample)."""
  bs = config.sampling.batch_size
  n_proc, proc = jax.process_count(), jax.process_index()
  if bs % n_proc:
    raise ValueError(f"sampling.batch_size={bs} must be a multiple of the process count ({n_proc})")
  per_sample = per_sample_fn(config, model) if per_sample is None else per_sample
  local = bs // n_proc

  def batches():
    for i in range(int(math.ceil(n / bs))):
      index = i * bs + proc * local + np.arange(local)
      yield datasets.EvalBatch(np.zeros((local,), np.float32), index < n,
                               np.where(index < n, index, -1), min(bs, n - i * bs))

  with Progress(f"sampling ({config.sampling.method}, c={config.sampling.c})", n,
                "samples") as p:
    out = parallel.map_dataset(per_sample, model.params, batches(), key, mesh=mesh,
                               on_batch=p.update, store=store, on_resume=p.resumed)
  return out["x"], float(np.mean(out["nfe"]))


def toy_reference(config, n: int) -> np.ndarray | None:
  """n held-out samples of the toy distribution (a key of their own), or None for images."""
  name = config.data.dataset
  if name not in toy_data.TOY_DISTRIBUTIONS:
    return None
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xDA7A)
  return np.asarray(toy_data.get_toy_distribution(name).sample(key, n))


# -- reports and figures ---------------------------------------------------------------------------
def write_json(path: str, obj: dict) -> None:
  """``obj`` as JSON at ``path``, atomically, by process 0 only (the others return)."""
  if not is_main():
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def save_samples_npz(path: str, samples: np.ndarray) -> None:
  """``samples.npz`` (key ``samples``), by process 0 only."""
  if is_main():
    np.savez(path, samples=samples)


def save_samples_png(path: str, samples: np.ndarray, config,
                     reference: np.ndarray | None = None) -> None:
  """An image grid for images; a scatter plot (1-D: histogram) of generated vs data for toys.
  Process 0 only."""
  if not is_main():
    return
  info = datasets.dataset_info(config)
  if info.is_image:
    import evaluation
    from PIL import Image
    grid = evaluation.image_grid(np.clip(datasets.inverse_scale(samples, info.centered), 0, 1),
                                 nrow=int(math.ceil(math.sqrt(len(samples)))))
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 5))
  if samples.shape[-1] == 1:
    if reference is not None:
      ax.hist(reference[:, 0], bins=100, density=True, alpha=0.5, label="data")
    ax.hist(samples[:, 0], bins=100, density=True, alpha=0.5, label="generated")
  else:
    if reference is not None:
      ax.scatter(reference[:, 0], reference[:, 1], s=1, alpha=0.3, label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5, label="generated")
    ax.set_aspect("equal")
  ax.legend()
  ax.set_title(f"{config.data.dataset}: {config.sampling.method}, c={config.sampling.c}, "
               f"T={config.sde.T}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# -- eval's per-example passes across preemptions ------------------------------------------------
PARTIAL_DIR = "partial"
# Fields that change no per-example result: batch sizes (example i uses fold_in(key, i), whatever
# its batch), which checkpoint is picked (the fingerprint holds its step and a hash of its
# parameters), where data come from, training cadences.
PARTIAL_FREE_FIELDS = ("eval.batch_size", "sampling.batch_size", "eval.checkpoint",
                       "data.download", "data.tfds_data_dir") + RESUMABLE_FIELDS


def tree_digest(*trees) -> str:
  """sha256 of the leaves of pytrees (dtype, shape and bytes, in tree order): what identifies a
  checkpoint's parameters, a fitted prior or dequantizer."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(trees):
    if isinstance(leaf, jax.Array):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      if not leaf.is_fully_addressable:  # replicated over processes: this process's copy
        leaf = leaf.addressable_data(0)
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(repr(leaf).encode() if a.dtype == object else np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class PartialResults:
  """``parallel.ResultStore`` on files: ``<folder>/partial/<stage>/`` holds ``fingerprint.json``
  (what the results depend on: the stage, the pass's key, the checkpoint's step and parameter
  hash, the flattened config less ``PARTIAL_FREE_FIELDS``) and one ``batch-NNNNNN.npz`` per
  finished batch (split indices + per-example outputs), each written atomically (temporary file,
  rename) by process 0. A store whose fingerprint differs is discarded, with a log line naming
  what changed; unreadable batch files (a kill mid-write) are ignored and recomputed."""

  def __init__(self, folder: str, stage: str, fingerprint: dict[str, Any]):
    self.path = os.path.join(folder, PARTIAL_DIR, stage)
    self.stage = stage
    self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    self._next = 0

  def _fingerprint_file(self) -> str:
    return os.path.join(self.path, "fingerprint.json")

  def _stale(self, saved: dict | None) -> str | None:
    """Why the stored fingerprint ``saved`` differs (None: it is this pass's)."""
    if saved == self.fingerprint:
      return None
    if not isinstance(saved, dict):
      return "unreadable fingerprint"
    names = {"stage": "stage", "key": "key", "step": "step", "model": "checkpoint parameters"}
    why = [v for k, v in names.items() if saved.get(k) != self.fingerprint[k]]
    old, new = saved.get("config", {}), self.fingerprint["config"]
    fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    why += [f"config field {k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})"
            for k in fields[:5]] + ([f"{len(fields) - 5} more fields"] if len(fields) > 5 else [])
    return ", ".join(why) or "changed"

  def load(self) -> dict[str, np.ndarray]:
    if not os.path.exists(self._fingerprint_file()):
      return {}
    try:
      with open(self._fingerprint_file()) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      saved = None
    why = self._stale(saved)
    if why is not None:
      logging.warning("eval %s: discarding the partial results in %s (%s)", self.stage,
                      self.path, why)
      if is_main():
        shutil.rmtree(self.path, ignore_errors=True)
      return {}
    parts, numbers = [], []
    for name in sorted(os.listdir(self.path)):
      if not (name.startswith("batch-") and name.endswith(".npz")):
        continue
      numbers.append(int(name[6:-4]))
      try:
        with np.load(os.path.join(self.path, name)) as z:
          parts.append({k: z[k] for k in z.files})
      except Exception as e:  # noqa: BLE001  (a file cut short: recomputed)
        logging.warning("eval %s: ignoring unreadable %s (%s)", self.stage, name, e)
    self._next = max(numbers, default=-1) + 1
    if not parts:
      return {}
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # an example computed twice (a resumed pass recomputes a batch in part done): its last result
    last = len(out["index"]) - 1 - np.unique(out["index"][::-1], return_index=True)[1]
    out = {k: v[last] for k, v in out.items()}
    logging.info("eval %s: %d examples done before, read from %s", self.stage, len(last),
                 self.path)
    return out

  def add(self, results: dict[str, np.ndarray]) -> None:
    if not is_main():
      return
    if not os.path.exists(self._fingerprint_file()):
      os.makedirs(self.path, exist_ok=True)
      write_json(self._fingerprint_file(), self.fingerprint)
    path = os.path.join(self.path, f"batch-{self._next:06d}.npz")
    with open(path + ".tmp", "wb") as f:
      np.savez(f, **results)
    os.replace(path + ".tmp", path)
    self._next += 1


def eval_stores(config: ml_collections.ConfigDict, folder: str, model: ScoreModel,
                *extra) -> Callable[[str, Array], PartialResults]:
  """``stores(stage, key)``: the ``PartialResults`` of the pass ``stage`` with key ``key`` of
  ``model`` (step, parameters, prior; ``extra`` pytrees such as a fitted dequantizer) under the
  ConfigDict ``config``, in the eval folder ``folder``."""
  digest = tree_digest(model.params, model.prior, *extra)
  flat = {k: v for k, v in _flat_config(config).items() if k not in PARTIAL_FREE_FIELDS}

  def stores(stage: str, key: Array) -> PartialResults:
    data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) \
        else key
    return PartialResults(folder, stage, {"stage": stage, "step": int(model.step),
                                          "model": digest, "key": np.asarray(data).tolist(),
                                          "config": flat})
  return stores


def remove_partial_results(folder: str) -> None:
  """Drops ``<folder>/partial/`` (process 0), once the report holding every result is written."""
  if is_main():
    shutil.rmtree(os.path.join(folder, PARTIAL_DIR), ignore_errors=True)


# -- controllable generation (controllable.py; Song et al. 2021, Sec. 5 and App. I) ---------------
def guided_model(model: ScoreModel, logits_fn: Callable[[Array, Array], Array], label: int,
                 scale: float) -> ScoreModel:
  """``model`` with the class-conditional score of ``label`` (controllable.class_conditional_score:
  s + scale grad log p_t(label | x)) in place of its score, for ``generate``."""
  import controllable

  def apply(params, x: Array, t: Array) -> Array:
    return controllable.class_conditional_score(model.bound_score(params), logits_fn, label,
                                                scale)(x, t)

  score = controllable.class_conditional_score(model.score_fn, logits_fn, label, scale)
  return dataclasses.replace(model, apply=apply, score_fn=score)


def eval_images(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """The first ``n`` images of ``eval.split`` in model space (no dequantization), every process
  holding all of them; ValueError naming sampling.n_samples when the split is smaller."""
  info = datasets.dataset_info(config)
  levels, _, total = datasets.load_levels(config, config.eval.split)
  if n > total:
    raise ValueError(f"sampling.n_samples={n} exceeds the {total} images of eval.split="
                     f"{config.eval.split!r}")
  return datasets.scale_images(levels[:n], info.num_grey_levels, info.centered)


def impute(config: ml_collections.ConfigDict, model: ScoreModel, observations: np.ndarray,
           known: np.ndarray, key: Array, basis: Optional[Array] = None, mesh=None):
  """Imputations of ``observations`` (n, *event) whose entries ``known`` (bool, broadcast to the
  observations; in ``basis`` coordinates of the channels for colorization) are kept (Song et al.
  2021, App. I.2-I.3): the configured fixed-step sampler with ``controllable.imputation_hook``
  from ``model.prior``, the known part set to the observation at the end. Example i uses
  fold_in(key, i), over every device in global batches of ``sampling.batch_size``, as
  ``generate``. (imputed (n, *event), mean NFE per example)."""
  import controllable
  import samplers
  one = samplers.get_sampler(config.sampling, model.sde, (1,) + model.event_shape,
                             prior=model.prior)

  def per_example(params, pairs, keys):
    def single(pair, k):
      obs, mask = pair[0][None], pair[1][None] > 0.5
      hook = controllable.imputation_hook(model.sde, obs, mask, basis)
      x, stats = one(model.bound_score(params), k, step_hook=hook)
      return {"x": controllable.replace_known(x, obs, mask, basis)[0],
              "nfe": jnp.mean(jnp.asarray(stats["nfe"], jnp.float32))}
    return jax.vmap(single)(pairs, keys)

  observations = np.asarray(observations, np.float32)
  mask = np.broadcast_to(np.asarray(known, np.float32), observations.shape)
  batches = datasets.array_eval_batches(np.stack([observations, mask], axis=1),
                                        config.sampling.batch_size, "sampling.batch_size")
  with Progress(f"imputing ({config.sampling.method}, c={config.sampling.c})",
                len(observations), "images") as p:
    out = parallel.map_dataset(per_example, model.params, batches, key, mesh=mesh,
                               on_batch=p.update)
  return out["x"], float(np.mean(out["nfe"]))
