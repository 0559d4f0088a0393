"""Sample-quality metrics: FID / Inception Score, a digits feature distance, toy-data divergences.

* FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
  equilibrium", their definition of the FID): ``||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``
  between Gaussians fitted to Inception pool3 features. The network is the FID Inception-v3 (the TF graph
  ``inception-2015-12-05`` as ported by pytorch-fid: 1008 logits, average pools that exclude padding,
  max pool in the last block), written here in Flax linen with parameter names following the torch
  state dict (``Mixed_5b/branch1x1/conv/kernel`` ...) so the conversion script is a renaming.
* Inception Score (Salimans et al. 2016): ``exp E_x KL(p(y|x) || p(y))`` over splits.
* Inception sees 8-bit images, as in the papers' code: samples are rounded to uint8 by
  :func:`quantize_8bit` (score_sde's truncation or EDM's round half up, ``ROUNDINGS``), reference
  images are the dataset's own uint8 pixels (:func:`levels_to_uint8`).
* ``digits`` (8x8): Inception does not apply, so a small scikit-learn MLP classifier trained on the
  digits train split provides the feature space (its last hidden layer); the "digits feature
  distance" is the Frechet distance in that space, plus an IS-style score from its class posterior.
* Toy distributions (Cao et al., "Exploring the optimal choice for generative processes in diffusion
  models: ODE vs SDE", Appendix H.3): KL / JS between 100-bins-per-dimension histograms and the
  Wasserstein distance between the two sample sets.

Everything that looks at images on device (Inception) is a pure jitted function of
``(variables, images)``; statistics and divergences are float64 NumPy on the host. The only file
helpers are the weight / statistics (de)serializers the brief asks for (``save_*`` / ``load_*``);
run_lib decides when to call them.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Array = jax.Array
Variables = dict[str, Any]

INCEPTION_SIZE = 299  # input resolution of the FID Inception network
INCEPTION_MIN_SIZE = 75  # smallest input the network accepts without a shape error
FID_NUM_CLASSES = 1008  # logits of the inception-2015-12-05 graph (1000 ImageNet classes + 8 unused)
POOL3_DIM = 2048
# Trainable parameters of pytorch-fid's FIDInceptionV3 (conv kernels, BatchNorm scale/bias, fc):
# torchvision's inception_v3 has 27,161,264 with aux logits and a 1000-way fc; minus the aux head
# (3,326,696) plus 8 more fc classes (8 * 2048 + 8 = 16,392) gives 23,850,960. BatchNorm running
# means / variances are state ('batch_stats'), not parameters.
FID_INCEPTION_PARAM_COUNT = 23_850_960


# ----------------------------------------------------------------------------------------------
# FID Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture", Fig. 5-7; the
# FID variant of pytorch-fid / TTUR).
# ----------------------------------------------------------------------------------------------

def _pad(p: tuple[int, int]) -> list[tuple[int, int]]:
  return [(p[0], p[0]), (p[1], p[1])]


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, self.kernel, self.strides, padding=_pad(self.padding), use_bias=False,
                precision=jax.lax.Precision.HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: Array) -> Array:
  """3x3 / stride 1 average pool whose mean excludes the zero padding (TF semantics)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17 (Mixed_6a)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorized 7x7 convolutions (Mixed_6b..e)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8 (Mixed_7a)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with expanded 1x3 / 3x1 filter banks (Mixed_7b, Mixed_7c).

  ``pool='avg'`` (Mixed_7b) averages without padding; ``pool='max'`` (Mixed_7c) reproduces the
  max pool of the FID graph (pytorch-fid's FIDInceptionE_2).
  """
  pool: str = "avg"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_same(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3 on inputs already scaled to [-1, 1], NHWC (299x299 for FID, >= 75x75).

  Returns ``(pool3, logits)``: the 2048-d global average pool (FID features) and the 1008 logits
  (Inception Score). Dropout before the fc layer is the identity at evaluation.
  """
  num_classes: int = FID_NUM_CLASSES

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, precision=jax.lax.Precision.HIGHEST, name="fc")(pool3)
    return pool3, logits


def preprocess_for_inception(images: Array, size: int = INCEPTION_SIZE) -> Array:
  """uint8 or [0, 1] float NHWC images -> float32 in [-1, 1], 3 channels, ``size`` x ``size``.

  Bilinear resize with half-pixel centres and no antialiasing, i.e. torch's
  ``F.interpolate(mode='bilinear', align_corners=False)`` as used by pytorch-fid; grey images are
  repeated to RGB.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  else:
    x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
  return 2.0 * x - 1.0


# ----------------------------------------------------------------------------------------------
# 8-bit images: what the papers' code hands Inception (docs/fid.md, "8-bit inputs").
# ----------------------------------------------------------------------------------------------

# How each codebase rounds samples before Inception (name -> what it does, for reports). score_sde:
# yang-song/score_sde run_lib.py (evaluate; score_flow's run_lib the same), after the sampler's
# inverse scaler u = (x + 1) / 2 in float32. EDM: NVlabs/edm generate.py, on x in [-1, 1]:
# floor(127.5 x + 128) = floor(255 u + 1/2). The two differ by one level on about half the values.
ROUNDINGS = {
    "score_sde": "score_sde's np.clip(u * 255., 0, 255).astype(np.uint8), u = (x + 1) / 2: "
                 "truncation, floor(255 u)",
    "edm": "EDM's (x * 127.5 + 128).clip(0, 255).to(torch.uint8): round half up, "
           "floor(255 u + 1/2)"}


def quantize_8bit(samples: np.ndarray | Array, centered: bool, rounding: str) -> np.ndarray:
  """Model-space samples (data in [-1, 1] when ``centered``, else [0, 1]) -> uint8 images, rounded
  as the ``rounding`` paper's code does before its Inception features (``ROUNDINGS``):

  * ``'score_sde'``: u = (x + 1) / 2 (``datasets.inverse_scale``), ``clip(u * 255, 0, 255)``,
    truncated: floor(255 u);
  * ``'edm'``: ``clip(x * 127.5 + 128, 0, 255)``, truncated: floor(255 u + 1/2) (uncentered
    samples are first mapped to x = 2 u - 1, EDM's data range).

  The arithmetic is float32 in the original order (float64 samples are cast first), so boundary
  values round as in those codebases. Non-finite samples: ValueError (a cast would hide them)."""
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")
  x = np.asarray(samples, np.float32)
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise ValueError(f"{bad} of {x.size} sample values are not finite; FID needs finite samples")
  if rounding == "score_sde":
    import datasets
    y = datasets.inverse_scale(x, centered) * np.float32(255.0)
  else:
    y = (x if centered else x * np.float32(2.0) - np.float32(1.0)) * np.float32(127.5) \
        + np.float32(128.0)
  return np.clip(y, np.float32(0.0), np.float32(255.0)).astype(np.uint8)


def rounding_for(sde) -> str:
  """The paper convention of a model: ``'edm'`` for ``sde_lib.EDM`` models (Karras et al. 2022 and
  STF, which evaluates with EDM's code), ``'score_sde'`` for VP / sub-VP / VE (score_sde,
  score_flow, and Cao et al. / Franzese et al., who evaluate with score_sde's code)."""
  import sde_lib
  return "edm" if isinstance(sde, sde_lib.EDM) else "score_sde"


def levels_to_uint8(levels, num_levels: int):
  """Integer grey levels k in {0, ..., L-1} (numpy or jax) -> the 8-bit image, round half up of
  255 k / (L - 1) in integer arithmetic: the level itself for L = 256 (the reference images of
  score_sde's and EDM's statistics are the dataset's uint8 pixels)."""
  if not 2 <= num_levels <= 256:
    raise ValueError(f"num_levels must be in [2, 256], got {num_levels}")
  k = levels.astype("int32")
  return ((k * 510 + (num_levels - 1)) // (2 * (num_levels - 1))).astype("uint8")


def inception_param_shapes(image_size: int = INCEPTION_MIN_SIZE) -> Variables:
  """Shape/dtype tree ``{'params': ..., 'batch_stats': ...}`` of the network (no FLOPs, eval_shape)."""
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), dummy)


def init_inception_params(key: Array, image_size: int = INCEPTION_MIN_SIZE) -> Variables:
  """Randomly initialised variables (tests and converter checks; real use loads weights)."""
  return InceptionV3().init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))


def flatten_variables(variables: Variables) -> dict[str, np.ndarray]:
  """Nested variables -> ``{'params/Mixed_5b/branch1x1/conv/kernel': array, ...}``."""
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays / ShapeDtypeStructs."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def save_inception_params(variables: Variables, path: str) -> None:
  """Writes variables as an .npz keyed by flax path (``params/...``, ``batch_stats/...``)."""
  with open(path, "wb") as f:
    np.savez(f, **flatten_variables(variables))


def check_inception_variables(flat: dict[str, np.ndarray], source: str) -> None:
  """Raises ValueError naming ``source`` and the parameter if ``flat`` does not fit the network."""
  expected = {k: v.shape for k, v in flatten_variables_shapes().items()}
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise ValueError(
        f"Inception weights {source!r} do not match the FID Inception-v3: "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}). "
        "Convert pytorch-fid's weights with scripts/convert_inception_weights.py (docs/fid.md).")
  for k, shape in expected.items():
    if tuple(flat[k].shape) != tuple(shape):
      raise ValueError(f"Inception weights {source!r}: parameter {k} has shape "
                       f"{tuple(flat[k].shape)}, expected {tuple(shape)}")


def flatten_variables_shapes() -> dict[str, jax.ShapeDtypeStruct]:
  return traverse_util.flatten_dict(dict(inception_param_shapes()), sep="/")


def load_inception_params(path: str) -> Variables:
  """Loads converted FID Inception weights (.npz keyed by flax path), checking every name/shape."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights file {path!r} (config.eval.inception_weights) not found. Download "
        "pytorch-fid's pt_inception-2015-12-05-6726825d.pth and convert it with "
        "scripts/convert_inception_weights.py; see docs/fid.md.")
  with np.load(path) as data:
    flat = {k: np.asarray(data[k]) for k in data.files}
  check_inception_variables(flat, path)
  nested = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()},
                                        sep="/")
  return nested


@functools.partial(jax.jit, static_argnames=("size",))
def inception_apply(variables: Variables, images: Array,
                    size: int = INCEPTION_SIZE) -> tuple[Array, Array]:
  """Jitted forward: raw images (uint8 or [0, 1], NHWC) -> ``(pool3 (B, 2048), logits (B, 1008))``."""
  return InceptionV3().apply(variables, preprocess_for_inception(images, size))


class InceptionOutputs(NamedTuple):
  pool3: np.ndarray  # (N, 2048) FID features
  logits: np.ndarray  # (N, 1008) for the Inception Score


def inception_map(variables: Variables, batches, size: int = INCEPTION_SIZE,
                  num_levels: int | None = None, on_batch=None) -> InceptionOutputs:
  """Pool3 features and logits of every example of a padded ``datasets.EvalBatch`` stream (this
  process's share; see ``parallel.map_dataset``): split over every device of every process, all
  rows returned to every process in example order, padding dropped. ``num_levels`` L: the
  batches hold integer grey levels, seen as the 8-bit images :func:`levels_to_uint8` (the level
  itself for L = 256); None: uint8 or [0, 1] floats as they are. ``on_batch(n)``: progress, as
  ``parallel.map_dataset``."""
  import parallel

  def features(v, x, keys):
    del keys  # deterministic
    pool3, logits = inception_apply(v, x if num_levels is None else levels_to_uint8(x, num_levels),
                                    size)
    return {"pool3": pool3, "logits": logits}

  out = parallel.map_dataset(features, variables, batches, jax.random.PRNGKey(0),
                             on_batch=on_batch)
  return InceptionOutputs(np.asarray(out["pool3"]), np.asarray(out["logits"]))


def inception_features(variables: Variables, images: np.ndarray | Array, batch_size: int = 100,
                       size: int = INCEPTION_SIZE) -> InceptionOutputs:
  """Pool3 features and logits of ``images`` (held by every process) in global batches of
  ``batch_size`` (one compilation; :func:`inception_map`: each process computes its share).
  ``images``: uint8 or [0, 1] floats, NHWC, 1 or 3 channels, any size (resized to ``size``, 299
  for FID)."""
  import datasets
  n, procs = images.shape[0], jax.process_count()
  if n == 0:
    return InceptionOutputs(np.zeros((0, POOL3_DIM), np.float32),
                            np.zeros((0, FID_NUM_CLASSES), np.float32))
  # A multiple of the process count; fewer images than a batch: one batch, not padded to 100.
  batch_size = -(-min(int(batch_size), n) // procs) * procs
  return inception_map(variables, datasets.array_eval_batches(np.asarray(images), batch_size),
                       size)


def unbiased_logits(variables: Variables, pool3: np.ndarray) -> np.ndarray:
  """``pool3 @ W_fc`` without the fc bias (float64): the logits of the original Inception Score
  code (Salimans et al. 2016 take ``softmax/logits/MatMul`` of the 2015 graph; torch-fidelity's
  ``logits_unbiased``)."""
  kernel = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  return np.asarray(pool3, np.float64) @ kernel


def inception_metrics(variables: Variables, images: np.ndarray,
                      ref_stats: tuple[np.ndarray, np.ndarray] | None = None, batch_size: int = 100,
                      splits: int = 10, size: int = INCEPTION_SIZE) -> dict[str, float]:
  """Entry point for ``--mode=eval``: Inception Score (unbiased logits, ``splits`` splits) of the
  8-bit ``images`` (uint8, :func:`quantize_8bit` of the samples, as the papers' code feeds
  Inception) and, given reference ``(mu, sigma)`` (``load_stats``), their FID.

  For ``--mode=fid_stats``: ``compute_statistics(inception_features(v, data, bs).pool3)`` then
  ``save_stats``.
  """
  if np.asarray(images).dtype != np.uint8:
    raise TypeError(f"inception_metrics takes uint8 images (evaluation.quantize_8bit of the "
                    f"samples, as score_sde / EDM round them), got {np.asarray(images).dtype}")
  out = inception_features(variables, images, batch_size, size)
  is_mean, is_std = inception_score(unbiased_logits(variables, out.pool3), splits, from_logits=True)
  result = {"inception_score": is_mean, "inception_score_std": is_std}
  if ref_stats is not None:
    result["fid"] = fid_from_stats(*compute_statistics(out.pool3), *ref_stats)
  return result


# ----------------------------------------------------------------------------------------------
# Frechet distance and Inception Score (host, float64).
# ----------------------------------------------------------------------------------------------

def compute_statistics(features: np.ndarray | Array) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance (float64) of features ``(N, D)``: the Gaussian fit of FID."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must have shape (N >= 2, D), got {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_eigh(a: np.ndarray, eigvals_only: bool = False):
  """Eigendecomposition of the symmetric part of ``a`` (LAPACK divide and conquer, float64) with
  round-off eigenvalues (below ``dim * eps * max |w|``, or negative) set to zero."""
  import scipy.linalg
  a = (a + a.T) / 2
  out = scipy.linalg.eigh(a, eigvals_only=eigvals_only, driver="evd")
  w = out if eigvals_only else out[0]
  tol = a.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
  w = np.where(w > tol, w, 0.0)
  return w if eigvals_only else (w, out[1])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root via eigendecomposition."""
  w, v = _psd_eigh(a)
  return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """``tr (S1 S2)^{1/2}`` for PSD S1, S2 as ``tr (S1^{1/2} S2 S1^{1/2})^{1/2}``.

  ``S1 S2`` is similar to the symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}``, so their square roots
  have the same eigenvalues; the symmetric form avoids the complex, non-symmetric ``sqrtm`` and
  its eps-offset fallback for singular covariances (fewer samples than feature dimensions).
  """
  s1 = _sqrtm_psd(np.asarray(sigma1, np.float64))
  m = s1 @ np.asarray(sigma2, np.float64) @ s1
  return float(np.sum(np.sqrt(_psd_eigh(m, eigvals_only=True))))


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                   sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, FID):
  ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``, float64."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"inconsistent statistics shapes: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                     f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"FID statistics {name} contain non-finite values")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID-style Frechet distance between the Gaussian fits of two feature sets."""
  return fid_from_stats(*compute_statistics(features1), *compute_statistics(features2))


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes reference statistics as .npz with keys ``mu``, ``sigma`` (pytorch-fid / TTUR format)."""
  with open(path, "wb") as f:
    np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``(mu, sigma)`` from an .npz with keys ``mu`` and ``sigma``."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"FID statistics file {path!r} (config.eval.fid_stats) not found; "
                            "compute it with main.py --mode=fid_stats (docs/fid.md; it downloads "
                            "the dataset and the Inception weights when data.download=True).")
  with np.load(path) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise ValueError(f"FID statistics file {path!r} must contain arrays 'mu' and 'sigma', "
                       f"found {data.files}")
    return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)


def inception_score(logits_or_probs: np.ndarray | Array, splits: int = 10,
                    from_logits: bool | None = None) -> tuple[float, float]:
  """Inception Score ``exp E_x KL(p(y|x) || p(y))`` (Salimans et al. 2016): mean and std over splits.

  ``from_logits=None`` treats the input as probabilities when it is non-negative with rows summing
  to one, otherwise as logits (softmax in float64). ``p(y)`` is the marginal within each split.
  """
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2:
    raise ValueError(f"expected (N, classes), got {x.shape}")
  if from_logits is None:
    from_logits = not (np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))
  if from_logits:
    x = x - x.max(axis=1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=1, keepdims=True)
  else:
    p = x / x.sum(axis=1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    if part.shape[0] == 0:
      continue
    py = part.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(axis=1)
    scores.append(float(np.exp(kl.mean())))
  return float(np.mean(scores)), float(np.std(scores))


def mean_entropy(probs: np.ndarray) -> float:
  """Mean Shannon entropy (nats) of per-sample class posteriors: low = confident samples."""
  p = np.asarray(probs, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return float(-np.where(p > 0, p * np.log(p), 0.0).sum(axis=1).mean())


# ----------------------------------------------------------------------------------------------
# digits (8x8): a small classifier's feature space instead of Inception.
# ----------------------------------------------------------------------------------------------

class DigitsClassifier(NamedTuple):
  """An MLP trained on the digits train split, as plain arrays (features are a pure function)."""
  weights: tuple[np.ndarray, ...]
  biases: tuple[np.ndarray, ...]
  test_accuracy: float


def _digits_inputs(images: np.ndarray | Array) -> np.ndarray:
  x = np.asarray(images, np.float64)
  return x.reshape(x.shape[0], -1)


def load_digits_split(test_size: int = 360, seed: int = 0) -> tuple[np.ndarray, ...]:
  """scikit-learn's bundled digits in [0, 1], shape (N, 8, 8, 1), stratified train/test split.

  Returns ``(x_train, y_train, x_test, y_test)``. (run_lib may instead pass datasets.py's split to
  :func:`train_digits_classifier`.)
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=test_size, random_state=seed,
                                            stratify=d.target)
  return x_tr, y_tr, x_te, y_te


def train_digits_classifier(x_train: np.ndarray | None = None, y_train: np.ndarray | None = None,
                            x_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
                            hidden: Sequence[int] = (64,), seed: int = 0) -> DigitsClassifier:
  """Fits a deterministic scikit-learn MLPClassifier (ReLU, L-BFGS, seed ``seed``) on [0, 1] digits.

  Without arguments uses :func:`load_digits_split`. ``test_accuracy`` is measured on the test split.
  """
  from sklearn.neural_network import MLPClassifier
  if x_train is None:
    x_train, y_train, x_test, y_test = load_digits_split()
  clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), activation="relu", solver="lbfgs",
                      alpha=1e-3, max_iter=500, random_state=seed)
  from threadpoolctl import threadpool_limits
  with threadpool_limits(limits=1):  # a tiny problem: BLAS threads only add contention
    clf.fit(_digits_inputs(x_train), np.asarray(y_train))
  acc = float(clf.score(_digits_inputs(x_test), np.asarray(y_test))) if x_test is not None else float("nan")
  return DigitsClassifier(tuple(np.asarray(w) for w in clf.coefs_),
                          tuple(np.asarray(b) for b in clf.intercepts_), acc)


def digits_features(classifier: DigitsClassifier, images: np.ndarray | Array) -> np.ndarray:
  """Last hidden-layer (ReLU) activations of the classifier: the digits feature space."""
  h = _digits_inputs(images)
  for w, b in zip(classifier.weights[:-1], classifier.biases[:-1]):
    h = np.maximum(h @ w + b, 0.0)
  return h


def digits_probs(classifier: DigitsClassifier, images: np.ndarray | Array) -> np.ndarray:
  """Class posterior p(y|x) of the classifier (softmax of its output layer)."""
  logits = digits_features(classifier, images) @ classifier.weights[-1] + classifier.biases[-1]
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)


def digits_feature_distance(samples: np.ndarray | Array, reference: np.ndarray | Array,
                            classifier: DigitsClassifier | None = None) -> float:
  """Frechet distance (FID formula) between ``samples`` and ``reference`` in the hidden-feature space
  of the digits classifier (not Inception; numbers are not comparable with FID). Images in [0, 1]."""
  if classifier is None:
    classifier = train_digits_classifier()
  return frechet_distance(digits_features(classifier, samples), digits_features(classifier, reference))


def digits_metrics(classifier: DigitsClassifier, samples: np.ndarray | Array,
                   reference: np.ndarray | Array, splits: int = 1) -> dict[str, float]:
  """Digits sample metrics: feature distance, IS-style score and mean entropy of p(y|x)."""
  probs = digits_probs(classifier, samples)
  score, _ = inception_score(probs, splits=splits, from_logits=False)
  return {"feature_distance": digits_feature_distance(samples, reference, classifier),
          "classifier_score": score, "mean_entropy": mean_entropy(probs),
          "classifier_test_accuracy": classifier.test_accuracy}


# ----------------------------------------------------------------------------------------------
# Toy distributions (Cao et al., Appendix H.3).
# ----------------------------------------------------------------------------------------------

def _as_2d(x: np.ndarray | Array) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x[:, None] if x.ndim == 1 else x.reshape(x.shape[0], -1)


def _kl_js(p: np.ndarray, q: np.ndarray, eps: float) -> tuple[float, float]:
  p = (p + eps) / (p + eps).sum()
  q = (q + eps) / (q + eps).sum()
  m = 0.5 * (p + q)
  kl = float(np.sum(p * np.log(p / q)))
  js = float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))
  return kl, js


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Exact W1 between 1-D empirical distributions, column-wise for ``(n, k)`` inputs.

  Equal sizes: mean |sorted a - sorted b| (the monotone coupling is optimal in 1-D); otherwise
  scipy.stats.wasserstein_distance per column.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  a2, b2 = (a[:, None], b[:, None]) if a.ndim == 1 else (a, b)
  if a2.shape[0] == b2.shape[0]:
    w = np.mean(np.abs(np.sort(a2, axis=0) - np.sort(b2, axis=0)), axis=0)
  else:
    from scipy.stats import wasserstein_distance
    w = np.array([wasserstein_distance(a2[:, i], b2[:, i]) for i in np.arange(a2.shape[1])])
  return w[0] if a.ndim == 1 else w


def histogram_divergences(samples_p: np.ndarray | Array, samples_q: np.ndarray | Array,
                          bins: int = 100, range: Sequence[float] | Sequence[Sequence[float]] | None = None,
                          eps: float = 1e-10, n_projections: int = 64,
                          seed: int = 0) -> dict[str, float]:
  """Divergences between empirical densities (Cao et al., Appendix H.3: 100 bins per dimension).

  Returns, for p = first set ("true"), q = second ("generated"):
    ``kl`` = KL(p || q), ``js`` (nats, <= log 2): on the joint ``bins^d`` histogram (d <= 2), else
    the mean over per-axis histograms; ``kl_marginal`` / ``js_marginal``: mean over per-axis
    histograms; ``wasserstein``: W1 between the sample sets, exact in 1-D (sorted samples), sliced
    for d > 1 (mean of exact 1-D W1 over ``n_projections`` directions: evenly spaced angles in
    2-D, seeded random directions above);
    ``wasserstein_marginal``: mean per-axis W1.
  Empty bins get ``eps`` mass before renormalising, so KL stays finite. ``range`` = (lo, hi) for
  every axis or one (lo, hi) per axis; default the joint min/max of both sets.
  """
  xp, xq = _as_2d(samples_p), _as_2d(samples_q)
  if xp.shape[1] != xq.shape[1]:
    raise ValueError(f"dimension mismatch: {xp.shape[1]} vs {xq.shape[1]}")
  d = xp.shape[1]
  if range is None:
    both = np.concatenate([xp, xq])
    ranges = [(float(both[:, i].min()), float(both[:, i].max())) for i in np.arange(d)]
  elif np.ndim(range) == 1:
    ranges = [tuple(float(r) for r in range)] * d
  else:
    ranges = [tuple(float(r) for r in rr) for rr in range]
  if len(ranges) != d:
    raise ValueError(f"range has {len(ranges)} entries for {d} dimensions")
  marg = [_kl_js(np.histogram(xp[:, i], bins, ranges[i])[0].astype(np.float64),
                 np.histogram(xq[:, i], bins, ranges[i])[0].astype(np.float64), eps)
          for i in np.arange(d)]
  kl_m, js_m = float(np.mean([m[0] for m in marg])), float(np.mean([m[1] for m in marg]))
  if d <= 2:
    hp = np.histogramdd(xp, bins=bins, range=ranges)[0]
    hq = np.histogramdd(xq, bins=bins, range=ranges)[0]
    kl, js = _kl_js(hp.ravel(), hq.ravel(), eps)
  else:
    kl, js = kl_m, js_m
  w_marg = float(np.mean(wasserstein_1d(xp, xq)))
  if d == 1:
    w = w_marg
  else:
    if d == 2:  # evenly spaced angles in [0, pi): a deterministic quadrature over directions
      ang = np.pi * np.arange(n_projections) / n_projections
      dirs = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    else:
      dirs = np.random.default_rng(seed).normal(size=(n_projections, d))
      dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    w = float(np.mean(np.concatenate([wasserstein_1d(xp @ u.T, xq @ u.T)
                                      for u in np.array_split(dirs, max(1, n_projections // 16))])))
  return {"kl": kl, "js": js, "kl_marginal": kl_m, "js_marginal": js_m, "wasserstein": w,
          "wasserstein_marginal": w_marg}


# ----------------------------------------------------------------------------------------------
# Image grids.
# ----------------------------------------------------------------------------------------------

def image_grid(images: np.ndarray | Array, nrow: int = 8, padding: int = 2,
               pad_value: float = 1.0) -> np.ndarray:
  """Tiles NHWC images (floats in [0, 1] or uint8) into one uint8 image, ``nrow`` per row.

  Returns ``(H, W)`` for one channel, ``(H, W, 3)`` for three (ready for PIL / PNG).
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.dtype != np.uint8:
    x = np.round(np.clip(np.asarray(x, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
  n, h, w, c = x.shape
  if n == 0 or nrow < 1:
    raise ValueError(f"image_grid needs at least one image and nrow >= 1, got {n} images, nrow={nrow}")
  ncol = min(nrow, n)
  nrows = -(-n // ncol)
  fill = np.uint8(round(255 * pad_value))
  grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), fill, np.uint8)
  for i in np.arange(n):
    r, col = divmod(int(i), ncol)
    y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = x[i]
  return grid[..., 0] if c == 1 else grid
