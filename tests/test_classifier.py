"""The noise-conditional classifier p_t(y | x_t) (models/classifier.py), --mode=train_classifier and
run_lib.load_classifier (Song et al. 2021, Sec. 5 and App. I.1), and the class labels of
datasets.py they train on.

A tiny classifier (one level of 8 channels) trained 40 steps on digits: held-out accuracy at the
smallest t well above chance (10 %), near chance at t = T (where x_T carries no signal);
20 + 20 steps with a resume are bit-identical to 40 straight (slow: two more trainings).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
import run_lib
from configs.digits_vp import get_config as digits_config
from modes.train_classifier import train_classifier


def _config(**classifier):
  config = digits_config()
  c = config.classifier
  c.widths, c.num_res_blocks, c.embedding_dim = (8,), 1, 16
  c.n_iters, c.batch_size, c.lr, c.warmup = 40, 32, 1e-2, 0
  c.ema_rate, c.log_freq, c.snapshot_freq, c.curve_times = 0.5, 10, 20, 3
  for k, v in classifier.items():
    c[k] = v
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir of 40 straight steps, its result)."""
  straight = str(tmp_path_factory.mktemp("clf") / "straight")
  return straight, train_classifier(_config(), straight)


def test_digits_labels_are_the_images_classes():
  config = digits_config()
  levels, _, n = datasets.load_levels(config, "test")
  labels, start, n_labels = datasets.load_labels(config, "test")
  assert (n, n_labels, start) == (360, 360, 0) and labels.dtype == np.int32
  # Independent oracle: scikit-learn's own target of each test image (found by its pixels).
  from sklearn.datasets import load_digits
  d = load_digits()
  own = {np.rint(im).astype(np.uint8).tobytes(): y for im, y in zip(d.images, d.target)}
  assert all(own[lv[..., 0].tobytes()] == y for lv, y in zip(levels, labels))
  assert np.bincount(labels, minlength=10).min() >= 25  # every digit is in the test split
  # The labelled stream: row i of the labels is the class of row i of the (shuffled) images.
  config.data.uniform_dequantization = False
  x, y = datasets.get_labeled_dataset(config, split="test", batch_size=16).batch_at(30)
  k = np.rint((x + 1) / 2 * 16).astype(np.uint8)  # centered, k / 16 -> k
  assert all(own[img[..., 0].tobytes()] == lab for img, lab in zip(k, y))


def test_tfds_labels(mock_tfds):
  config = digits_config()
  config.data.dataset, config.data.image_size, config.data.num_grey_levels = "cifar10", 32, 256
  config.data.num_channels = 3
  labels, start, total = datasets.load_labels(config, "test", process_index=1, process_count=2)
  assert (start, total) == (5, 9)  # the second shard of 9: ids 105..108, label = id mod 10
  np.testing.assert_array_equal(labels, (np.arange(105, 109)) % 10)
  config.data.dataset = "celeb_a"
  with pytest.raises(ValueError, match=r"data.dataset='celeb_a' has no class labels"):
    datasets.load_labels(config, "test")


def test_classifier_learns(trained):
  straight, full = trained
  curve = full["curve"]
  assert curve["n_images"] == 360 and curve["t"][0] == pytest.approx(1e-5)
  # Held-out accuracy at t = eps after 40 steps: far above chance 0.1 (measured 0.6-0.8);
  # at t = T the input is pure noise (alpha_T = 0.0067) and accuracy is chance-level.
  assert curve["accuracy"][0] > 0.4, curve
  assert curve["accuracy"][-1] < 0.25, curve
  for ext in ("json", "png", "md"):
    assert os.path.exists(os.path.join(straight, "classifier", f"accuracy_vs_t.{ext}"))
  with open(os.path.join(straight, "classifier", "train_log.csv")) as f:
    assert [int(l.split(",")[0]) for l in f.readlines()[1:]] == [10, 20, 30, 40]


@pytest.mark.slow  # two more trainings (~70 s on the loaded 2 cores)
def test_classifier_resumes_bit_identically(trained, tmp_path):
  _, full = trained
  resumed = str(tmp_path / "resumed")
  first = train_classifier(_config(n_iters=20), resumed)
  second = train_classifier(_config(), resumed)
  assert (first["step"], first["curve"] is None, second["start_step"], second["step"]) == (
      20, False, 20, 40)
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), full["state"].params,
                      second["state"].params)
  assert all(jax.tree.leaves(same)), "resumed training differs from uninterrupted training"
  assert second["curve"] == full["curve"]
  with open(os.path.join(resumed, "classifier", "train_log.csv")) as f:
    assert [int(l.split(",")[0]) for l in f.readlines()[1:]] == [10, 20, 30, 40]


def test_loaded_logits_are_jit_vmap_and_grad_safe(trained):
  straight = trained[0]
  logits_fn = run_lib.load_classifier(_config(), straight)
  x = jnp.asarray(datasets.get_eval_dataset(digits_config()).__next__().image[:8])
  t = jnp.linspace(0.01, 0.9, 8)
  out = logits_fn(x, t)
  assert out.shape == (8, 10) and bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(jax.jit(logits_fn)(x, t), out, rtol=1e-5, atol=1e-5)
  one = jax.vmap(lambda xi, ti: logits_fn(xi[None], ti)[0])(x, t)
  np.testing.assert_allclose(one, out, rtol=1e-5, atol=1e-5)
  # grad_x log p_t(y | x): the guidance term; checked against a central difference along v.
  log_p = lambda x: jnp.sum(jax.nn.log_softmax(logits_fn(x, t))[:, 3])  # noqa: E731
  g = jax.jit(jax.grad(log_p))(x)
  v = jax.random.normal(jax.random.PRNGKey(0), x.shape)
  h = 1e-2
  fd = (log_p(x + h * v) - log_p(x - h * v)) / (2 * h)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
  np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=2e-2, atol=1e-3)


def test_config_errors_name_the_field(tmp_path, trained):
  from configs.toy_gmm_2d import get_config as toy_config
  wd = str(tmp_path / "wd")
  with pytest.raises(ValueError, match=r"data.dataset='gmm_2d' has no class labels"):
    train_classifier(toy_config(), wd)
  with pytest.raises(ValueError, match=r"^classifier.widths must be a non-empty tuple"):
    train_classifier(_config(widths=()), wd)
  with pytest.raises(ValueError, match=r"^classifier.batch_size=30 must be divisible"):
    train_classifier(_config(batch_size=30), wd)
  with pytest.raises(FileNotFoundError, match=r"run --mode=train_classifier"):
    run_lib.load_classifier(_config(), wd)
  straight = trained[0]
  with pytest.raises(ValueError, match=r"config field classifier.lr differs"):
    train_classifier(_config(lr=0.5, n_iters=50), straight)
  with pytest.raises(ValueError, match=r"config field classifier.widths differs"):
    run_lib.load_classifier(_config(widths=(16,)), straight)
  assert not os.path.exists(wd)  # every refusal came before any file was written
