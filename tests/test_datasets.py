"""Tests of datasets.py and the experiment configs.

TFDS is exercised on ``tfds.testing.mock_data`` with a small metadata directory (train 20 / test 9
examples) and an ``as_dataset`` replacement that honours the requested (sub)split, so per-process
sharding is real. Every mock image is random (not mirror-symmetric) and carries its global index in
the two top corners (pixel [0, 0, 0] and [0, -1, 0], unchanged by a horizontal flip).
"""
from __future__ import annotations

import collections
import glob
import importlib
import math
import os
import re

import jax
import numpy as np
import pytest

import config_schema
import datasets
from configs.default import get_default_config
from conftest import N_MOCK, TEST_OFFSET

def _config(dataset: str = "cifar10", **data):
  config = get_default_config()
  spec = datasets._IMAGE_DATASETS.get(dataset)
  config.data.dataset = dataset
  if spec is not None:
    config.data.image_size = spec.native_size[0] if dataset != "celeb_a" else 64
    config.data.num_channels = spec.num_channels
    config.data.num_grey_levels = spec.num_grey_levels
  for k, v in data.items():
    config.data[k] = v
  config.training.batch_size = 8
  config.training.ref_batch_size = 8
  config.eval.batch_size = 4
  return config


def _ids(batch: np.ndarray) -> np.ndarray:
  """Global ids of uint8-level mock images (undo the [0, 1] scaling)."""
  return np.rint(batch[:, 0, 0, 0] * 255).astype(int)


# ------------------------------------------------------------------------------------------------
# TFDS path (mocked)
# ------------------------------------------------------------------------------------------------


def test_tfds_shapes_and_ranges(mock_tfds):
  for name, shape in [("cifar10", (32, 32, 3)), ("celeb_a", (64, 64, 3))]:
    it = datasets.get_dataset(_config(name), split="train", shuffle=True, process_index=0,
                              process_count=1)
    x = next(it)
    assert x.shape == (8,) + shape and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
  # Centered: exactly 2x - 1 of the uncentered batch at the same position; range [-1, 1].
  u = next(datasets.get_dataset(_config("cifar10"), split="train", shuffle=True, process_count=1,
                                process_index=0))
  c = next(datasets.get_dataset(_config("cifar10", centered=True), split="train", shuffle=True,
                                process_count=1, process_index=0))
  np.testing.assert_allclose(c, 2 * u - 1, atol=1e-6)
  assert c.min() < -0.99 and c.max() > 0.99  # random mock pixels reach both ends
  # Without dequantization every value is k / 255 exactly.
  np.testing.assert_allclose(u * 255, np.rint(u * 255), atol=1e-4)


def test_tfds_random_flip(mock_tfds):
  kw = dict(split="train", shuffle=True, process_index=0, process_count=1, batch_size=16)
  plain = next(datasets.get_dataset(_config("cifar10", random_flip=False), **kw))
  flipped = next(datasets.get_dataset(_config("cifar10", random_flip=True), **kw))
  same = np.all(flipped == plain, axis=(1, 2, 3))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)  # each image is either untouched or exactly mirrored
  assert same.any() and mirrored.any()  # P(all equal) = 2^-15 for this fixed seed: it is not


def test_tfds_sharding_two_processes(mock_tfds):
  """Eval: each process reads a disjoint shard of the split. Training: each process gets its half
  of every global batch (disjoint), and the halves make the one-process global batch."""
  config = _config("cifar10")
  seen_eval = []
  for p in range(2):
    ev = datasets.get_dataset(config, split="train", shuffle=False, repeat=False, process_index=p,
                              process_count=2)
    rows = [(b.index[b.mask], _ids(b.image)[b.mask]) for b in ev]
    idx = np.concatenate([r[0] for r in rows])
    np.testing.assert_array_equal(idx, np.concatenate([r[1] for r in rows]))  # image <-> index
    seen_eval.append(set(idx.tolist()))
  assert not seen_eval[0] & seen_eval[1]
  assert seen_eval[0] | seen_eval[1] == set(range(N_MOCK["train"]))
  one = datasets.get_dataset(config, split="train", shuffle=True, process_index=0, process_count=1)
  two = [datasets.get_dataset(config, split="train", shuffle=True, process_index=p,
                              process_count=2) for p in range(2)]
  epoch0 = []
  for step in range(5):  # 40 rows of a 20-example split: crosses epochs
    halves = [next(it) for it in two]
    np.testing.assert_array_equal(np.concatenate(halves), next(one))
    epoch0 += [_ids(h) for h in halves] if step < 2 else []
  assert len(set(np.concatenate(epoch0).tolist())) == 16  # the first 16 rows of one epoch
  test = datasets.get_dataset(config, split="test", shuffle=False, repeat=False, process_index=1,
                              process_count=2)
  b = next(test)
  assert set(_ids(b.image)[b.mask].tolist()) <= set(range(TEST_OFFSET, TEST_OFFSET + 9))


def test_tfds_iterator_state_roundtrip_with_orbax(mock_tfds, tmp_path):
  import orbax.checkpoint as ocp
  config = _config("cifar10", random_flip=True, uniform_dequantization=True)
  kw = dict(split="train", shuffle=True, process_index=0, process_count=1)
  it = datasets.get_dataset(config, **kw)
  for _ in range(4):  # crosses an epoch boundary (20 examples, batch 8)
    next(it)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "state", it.get_state())
  expected = [next(it) for _ in range(3)]
  fresh = datasets.get_dataset(config, **kw)
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(tmp_path / "state")
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh), e)
  # Device prefetch keeps the position of the next batch returned, not of the next one read.
  pre = datasets.prefetch_to_device(datasets.get_dataset(config, **kw), size=3)
  next(pre)
  state = pre.get_state()
  want = np.asarray(next(pre))
  again = datasets.prefetch_to_device(datasets.get_dataset(config, **kw), size=3)
  again.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(again)), want)


def test_threaded_iterator_exact_state_and_errors():
  config = _config("digits", random_flip=True, uniform_dequantization=True)
  kw = dict(split="train", shuffle=True, process_index=0, process_count=1, batch_size=100)
  reference = datasets.get_dataset(config, **kw)
  want = [next(reference) for _ in range(20)]  # 2000 > 1437: crosses an epoch
  threaded = datasets.prefetch_to_device(datasets.get_dataset(config, **kw), size=2, host_buffer=4)
  for w in want[:5]:
    np.testing.assert_array_equal(np.asarray(next(threaded)), w)
  state = threaded.get_state()
  assert int(state["index"]) == 500  # the position of what was returned, not of the read-ahead
  threaded.set_state({"epoch": 0, "index": 1300})  # reposition while the thread runs ahead
  reference.set_state({"epoch": 0, "index": 1300})
  np.testing.assert_array_equal(np.asarray(next(threaded)), next(reference))

  class Broken:
    def __init__(self):
      self.n = 0

    def get_state(self):
      return {"n": self.n}

    def __next__(self):
      self.n += 1
      if self.n == 3:
        raise RuntimeError("bad record")
      return np.zeros(2)

  broken = datasets.ThreadedIterator(Broken(), 2)
  next(broken), next(broken)
  with pytest.raises(RuntimeError, match="bad record"):
    next(broken)


def test_prefetch_to_device_shards_over_the_mesh():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  devices = np.asarray(jax.local_devices())
  sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
  config = _config("digits")
  kw = dict(split="train", shuffle=True, process_index=0, process_count=1,
            batch_size=8 * len(devices))
  want = next(datasets.get_dataset(config, **kw))
  got = next(datasets.prefetch_to_device(datasets.get_dataset(config, **kw), sharding))
  assert got.sharding == sharding and len(got.addressable_shards) == len(devices)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_not_prepared_with_download_false_fails_at_once(tmp_path, monkeypatch):
  """data.download=False keeps the refusal: no probe, no download, nothing written, and the message
  names the dataset, the folder, the flag and how to provide the data."""
  import downloads
  import tensorflow_datasets as tfds

  def no_network(*args, **kwargs):
    raise AssertionError("the network was used")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  monkeypatch.setattr(downloads, "unreachable", no_network)
  config = _config("cifar10", tfds_data_dir=str(tmp_path), download=False)
  with pytest.raises(datasets.DatasetNotPreparedError) as err:
    datasets.get_dataset(config, split="train", shuffle=True, process_index=0, process_count=1)
  msg = str(err.value)
  assert "'cifar10'" in msg and "tfds build cifar10" in msg and "tfds_data_dir" in msg
  assert "data.download=False" in msg and str(tmp_path) in msg
  assert os.listdir(tmp_path) == []  # nothing was written


class _StubBuilder:
  """Stands in for a TFDS builder: ``download_and_prepare`` writes the metadata file that marks a
  prepared dataset (or raises ``fail``) and counts its calls."""
  calls: list = []
  fail: Exception | None = None

  def __init__(self, name, data_dir=None):
    self.name, self.data_dir = name, os.path.join(data_dir, name, "1.0.0")

  def download_and_prepare(self):
    type(self).calls.append(self.data_dir)
    if self.fail is not None:
      raise self.fail
    os.makedirs(self.data_dir, exist_ok=True)
    with open(os.path.join(self.data_dir, "dataset_info.json"), "w") as f:
      f.write("{}")


@pytest.fixture
def stub_tfds(monkeypatch):
  """tfds.builder -> _StubBuilder (fresh call list, no failure)."""
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds, "builder", _StubBuilder)
  monkeypatch.setattr(_StubBuilder, "calls", [])
  monkeypatch.setattr(_StubBuilder, "fail", None)
  return _StubBuilder


def _online(monkeypatch):
  import downloads
  monkeypatch.setattr(downloads, "unreachable", lambda url, timeout_s=None: None)


def test_missing_dataset_is_downloaded_once_then_used_as_prepared(tmp_path, stub_tfds, monkeypatch):
  """data.download=True (the default): a dataset that is not prepared is downloaded and prepared
  into data.tfds_data_dir; once prepared, it is used without a network probe or a download."""
  import downloads
  assert get_default_config().data.download is True
  _online(monkeypatch)
  builder = datasets._tfds_builder("cifar10", str(tmp_path), True)
  assert stub_tfds.calls == [builder.data_dir] and builder.data_dir.startswith(str(tmp_path))
  monkeypatch.setattr(stub_tfds, "fail", AssertionError("downloaded a prepared dataset"))
  monkeypatch.setattr(downloads, "unreachable", stub_tfds.download_and_prepare)
  assert datasets._tfds_builder("cifar10", str(tmp_path), True).data_dir == builder.data_dir
  assert len(stub_tfds.calls) == 1


def test_offline_download_fails_fast_naming_the_flag(tmp_path, stub_tfds, monkeypatch):
  """Offline (a source host that never answers: DNS or firewall), the probe gives up after
  downloads.PROBE_TIMEOUT_S and the error names data.download, the URL and how to provide the data;
  no download is attempted. A download that fails half-way gives the same error, chained."""
  import socket
  import time
  import downloads
  monkeypatch.setattr(downloads, "PROBE_TIMEOUT_S", 0.5)

  def hang(*args, **kwargs):  # a firewall dropping packets: no answer for a long time
    time.sleep(5)
    raise TimeoutError("timed out")

  monkeypatch.setattr(socket, "create_connection", hang)
  with pytest.raises(datasets.DatasetNotPreparedError):  # TF / TFDS start-up (~4 s when this
    datasets._tfds_builder("cifar10", str(tmp_path), False)  # runs alone) is not the probe's time
  t0 = time.time()
  with pytest.raises(datasets.DatasetNotPreparedError) as err:
    datasets._tfds_builder("cifar10", str(tmp_path), True)
  assert time.time() - t0 < 3.0
  msg = str(err.value)
  assert "data.download" in msg and "did not answer within 0.5 s" in msg and "tfds build" in msg
  assert "www.cs.toronto.edu" in msg and stub_tfds.calls == []
  _online(monkeypatch)
  monkeypatch.setattr(stub_tfds, "fail", ConnectionError("reset by peer"))
  with pytest.raises(datasets.DatasetNotPreparedError, match="download failed.*reset by peer") as err:
    datasets._tfds_builder("cifar10", str(tmp_path), True)
  assert isinstance(err.value.__cause__, ConnectionError) and "data.download" in str(err.value)


def test_probe_is_bounded_and_follows_the_proxy(monkeypatch):
  """A name that cannot resolve (.invalid, RFC 2606) is unreachable within the timeout, on any
  machine; file:// needs no network; with https_proxy set the proxy is probed, not the host."""
  import time
  import downloads
  t0 = time.time()
  assert downloads.unreachable("https://scorelab.invalid/x", 2.0) is not None
  assert time.time() - t0 < 3.0
  assert downloads.unreachable("file:///tmp/x") is None
  for k in ("no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY"):
    monkeypatch.delenv(k, raising=False)
  assert downloads._endpoint("https://www.cs.toronto.edu/a.tgz") == ("www.cs.toronto.edu", 443)
  monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
  assert downloads._endpoint("https://www.cs.toronto.edu/a.tgz") == ("proxy.example", 3128)


def test_only_process_0_downloads(tmp_path, stub_tfds, monkeypatch):
  """Several processes: process 0 downloads, every process meets at the barrier (also when process
  0 fails, which then raises); a process that cannot see the prepared folder says so."""
  from jax.experimental import multihost_utils
  barriers = []
  _online(monkeypatch)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(datasets.DatasetNotPreparedError, match="filesystem every host shares"):
    datasets._tfds_builder("cifar10", str(tmp_path), True)
  assert stub_tfds.calls == [] and barriers == ["downloads: tfds cifar10"]
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(stub_tfds, "fail", ConnectionError("down"))
  with pytest.raises(datasets.DatasetNotPreparedError, match="download failed"):
    datasets._tfds_builder("cifar10", str(tmp_path), True)
  assert len(stub_tfds.calls) == 1 and len(barriers) == 2
  monkeypatch.setattr(stub_tfds, "fail", None)
  datasets._tfds_builder("cifar10", str(tmp_path), True)
  assert len(stub_tfds.calls) == 2 and len(barriers) == 3


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


def test_digits_splits_fixed_and_disjoint():
  a, b = datasets._digits_levels(), datasets._digits_levels()
  sizes = {k: len(v) for k, v in a.items()}
  assert sizes == {"train": 1437, "test": 360, "validation": 144, "train_without_validation": 1293}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])  # deterministic
    assert a[k].shape[1:] == (8, 8, 1) and a[k].dtype == np.uint8
  from sklearn.datasets import load_digits
  raw = np.rint(load_digits().images).astype(np.uint8)[..., None]
  key = lambda arr: {x.tobytes() for x in arr}  # noqa: E731
  # train + test is the whole data set (as a multiset of images).
  np.testing.assert_array_equal(
      np.sort(np.concatenate([a["train"], a["test"]]).reshape(1797, -1), axis=0),
      np.sort(raw.reshape(1797, -1), axis=0))
  np.testing.assert_array_equal(
      np.concatenate([a["train_without_validation"], a["validation"]]), a["train"])
  assert len(key(a["validation"]) & key(a["train_without_validation"])) <= 2  # dup images only
  all_levels = np.unique(np.concatenate([v.ravel() for v in a.values()]))
  np.testing.assert_array_equal(all_levels, np.arange(17))  # 17 grey levels 0..16


def test_sliced_split_is_the_first_examples_of_its_split(mock_tfds):
  """eval.split='test[a:b]' (TFDS slicing syntax) evaluates examples a..b-1 of the split: digits
  (sliced here) and TFDS (sliced by TFDS), each sharded over processes like a whole split."""
  digits = _config("digits")
  whole = datasets._digits_levels()["test"]
  levels, start, total = datasets.load_levels(digits, "test[:120]")
  assert (start, total) == (0, 120)
  np.testing.assert_array_equal(levels, whole[:120])
  second, start, total = datasets.load_levels(digits, "test[100:200]", process_index=1,
                                              process_count=2)
  assert (start, total) == (50, 100)
  np.testing.assert_array_equal(second, whole[150:200])
  ev = datasets.get_dataset(_config("cifar10"), split="test[2:7]", shuffle=False, repeat=False,
                            process_index=0, process_count=1)
  ids = np.concatenate([_ids(b.image)[b.mask] for b in ev])
  np.testing.assert_array_equal(ids, np.arange(TEST_OFFSET + 2, TEST_OFFSET + 7))
  for bad, msg in (("test[a:b]", "neither a split name nor a slice"), ("tset[:3]", "not in 'digits'"),
                   ("test[400:]", "is empty")):
    with pytest.raises(ValueError, match=re.escape(msg)):
      datasets.load_levels(digits, bad)
  from configs.digits_vp import get_config
  digits = get_config()
  digits.eval.split = "test[:120]"
  config_schema.validate(digits)  # a slice of a known split is accepted before any work
  digits.eval.split = "tset[:120]"
  with pytest.raises(ValueError, match=r"eval\.split must be a split of 'digits'"):
    config_schema.validate(digits)


def test_digits_scaling_and_dequantization():
  levels = datasets._digits_levels()["train"]
  kw = dict(split="train", shuffle=False, process_index=0, process_count=1, batch_size=1437)
  x = next(datasets.get_dataset(_config("digits"), **kw))
  np.testing.assert_allclose(x, levels / 16.0, atol=1e-6)  # k / (L - 1)
  d = next(datasets.get_dataset(_config("digits", uniform_dequantization=True), **kw))
  assert d.min() >= 0.0 and d.max() < 1.0
  np.testing.assert_array_equal(np.floor(d * 17).astype(np.uint8), levels)  # (k + u) / L
  u = d * 17 - levels  # the noise: U[0, 1), mean 1/2, var 1/12 (tolerance ~ 5 sd of 91,968 draws)
  assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.003
  c = next(datasets.get_dataset(_config("digits", uniform_dequantization=True, centered=True),
                                **kw))
  np.testing.assert_allclose(c, 2 * d - 1, atol=1e-6)
  assert c.min() >= -1.0 and c.max() < 1.0
  # Determinism and seeds.
  again = next(datasets.get_dataset(_config("digits", uniform_dequantization=True), **kw))
  np.testing.assert_array_equal(again, d)
  other = next(datasets.get_dataset(_config("digits", uniform_dequantization=True), seed=7, **kw))
  assert not np.array_equal(other, d)
  info = datasets.dataset_info(_config("digits", uniform_dequantization=True))
  np.testing.assert_array_equal(datasets.quantize(d, info), levels)


@pytest.mark.parametrize("process_count,batch", [(1, 64), (3, 50), (4, 90), (7, 20)])
def test_padded_eval_covers_every_example_once(process_count, batch):
  """Every example once, in equal step counts; ``global_count`` (the progress of a multi-process
  eval) is the batch's real examples over all processes, also for unequal shards (7 of 360)."""
  config = _config("digits")
  levels = datasets._digits_levels()["test"]
  counts = np.zeros(len(levels), int)
  num_batches = set()
  real, told = collections.defaultdict(int), collections.defaultdict(set)
  for p in range(process_count):
    ev = datasets.get_dataset(config, split="test", shuffle=False, repeat=False, process_index=p,
                              process_count=process_count, batch_size=batch * process_count)
    num_batches.add(len(ev))
    got = list(ev)
    assert len(got) == len(ev)
    for j, b in enumerate(got):
      real[j] += int(np.sum(b.mask))
      told[j].add(b.global_count)
      assert b.image.shape == (batch, 8, 8, 1) and b.mask.shape == (batch,)
      np.testing.assert_array_equal(b.index < 0, ~b.mask)
      np.add.at(counts, b.index[b.mask], 1)
      np.testing.assert_allclose(b.image[b.mask], levels[b.index[b.mask]] / 16.0, atol=1e-6)
  assert len(num_batches) == 1  # every process runs the same number of eval steps
  assert num_batches.pop() == math.ceil(math.ceil(360 / process_count) / batch)
  np.testing.assert_array_equal(counts, 1)
  assert {j: told[j] for j in real} == {j: {n} for j, n in real.items()}


def test_batch_sizes_per_process_and_stf():
  config = _config("digits")
  config.training.batch_size, config.training.ref_batch_size = 8, 32
  assert next(datasets.get_dataset(config, process_index=0, process_count=2)).shape[0] == 4
  config.training.target = "stf"
  assert next(datasets.get_dataset(config, process_index=0, process_count=2)).shape[0] == 16
  with pytest.raises(ValueError, match="training.ref_batch_size"):
    datasets.get_dataset(config, process_index=0, process_count=3)


def test_levels_and_info_feed_likelihood_bits_per_dim():
  """Contract with likelihood.py: the eval stream's raw levels + dataset_info give the right
  dequantization and bits/dim. Oracle: under the uniform density on the data range every discrete
  image has probability L^-D, i.e. exactly log2(L) bits/dim."""
  likelihood = pytest.importorskip("likelihood")
  for centered in (False, True):
    config = _config("digits", centered=centered)
    info = datasets.dataset_info(config)
    batch = next(datasets.get_dataset(config, split="test", shuffle=False, repeat=False,
                                      process_index=0, process_count=1, batch_size=32,
                                      as_levels=True))
    assert batch.image.dtype == np.uint8 and batch.image.max() <= 16
    y = np.asarray(likelihood.uniform_dequantize(jax.random.PRNGKey(0), batch.image,
                                                 info.num_grey_levels, info.centered))
    lo = -1.0 if centered else 0.0
    assert y.min() >= lo and y.max() < 1.0
    np.testing.assert_array_equal(datasets.quantize(y, info, dequantized=True), batch.image)
    logp_uniform = -info.dim * math.log(info.data_range) * np.ones(len(y))
    bpd = np.asarray(likelihood.bits_per_dim(logp_uniform, info.shape, centered=info.centered,
                                             num_levels=info.num_grey_levels))
    np.testing.assert_allclose(bpd, math.log2(17), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# toy data, errors, configs
# ------------------------------------------------------------------------------------------------


def test_toy_adapter_resumes_by_step():
  config = get_default_config()
  config.data.dataset = "gmm_2d"
  config.training.batch_size = 16
  it = datasets.get_dataset(config, process_index=0, process_count=1)
  first = [next(it) for _ in range(3)]
  assert first[0].shape == (16, 2) and not np.array_equal(first[0], first[1])
  again = datasets.get_dataset(config, process_index=0, process_count=1)
  again.set_state({"step": 2})
  np.testing.assert_array_equal(next(again), first[2])
  other = datasets.get_dataset(config, process_index=1, process_count=2)
  np.testing.assert_allclose(next(other), first[0][8:], rtol=1e-6)  # its half of the batch
  assert datasets.dataset_info(config).shape == (2,)


def test_unknown_dataset_names_the_field():
  config = _config("digits")
  config.data.dataset = "imagenet1k"
  with pytest.raises(ValueError, match="data.dataset"):
    datasets.get_dataset(config, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="data.dataset"):
    datasets.dataset_info(config)
  config = _config("digits", image_size=16)
  with pytest.raises(ValueError, match="data.image_size"):
    datasets.dataset_info(config)


CONFIG_FILES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not os.path.basename(p).startswith("__")
    and os.path.basename(p) != "default.py")  # the schema itself (get_default_config), not an experiment


def _keys(cfg, prefix=""):
  out = set()
  for k, v in cfg.items():
    out.add(prefix + k)
    if hasattr(v, "items"):
      out |= _keys(v, prefix + k + ".")
  return out


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_loads_with_the_shared_schema(name):
  module = importlib.import_module(f"configs.{name}")
  if not hasattr(module, "get_config"):
    pytest.skip(f"configs/{name}.py has no get_config (a helper module)")
  config = module.get_config()
  missing = _keys(get_default_config()) - _keys(config)
  assert not missing, f"configs/{name}.py lacks {sorted(missing)}"
  assert config.training.ref_batch_size >= config.training.batch_size
  assert 0 < config.sde.eps < config.sde.T
  info = datasets.dataset_info(config)  # dataset name known, shapes consistent
  import models
  for family in ("mlp", "ncsnpp", "ddpmpp", "unet"):  # modules register their names on import
    importlib.import_module(f"models.{family}")
  models.get_model(config)  # model name registered, model fields accepted
  if info.is_image:
    assert config.data.num_grey_levels == info.num_grey_levels
    assert config.model.center_input == (not config.data.centered)
    assert info.shape[0] % 2 ** (len(config.model.ch_mult) - 1) == 0
