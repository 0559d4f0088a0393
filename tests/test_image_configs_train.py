"""Every image experiment config runs one real training step (modes.train.train, checkpoint included)
with tiny widths: cifar10 / mnist on mocked TFDS data (tests/conftest.py), digits on the real
offline data. The configs' own SDE, weighting, target (STF reference batch), model family and data
scaling are kept; only sizes shrink (one resolution level; the down / up-sampling paths of every
family are exercised at full depth in tests/test_image_models.py)."""
from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest

import run_lib
import sde_lib
from conftest import tiny_config
from modes.fid_stats import fid_stats
from modes.train import train

IMAGE_CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if os.path.basename(p).startswith(("cifar_", "mnist_", "digits_", "celeba64_")))


def _tiny(name: str):
  """conftest's tiny U-Net (one resolution: half the compile time of two, the suite's budget) with
  one attention block, trained one step on batches of 4."""
  config = tiny_config(name, 1)
  config.model.attn_resolutions = (config.data.image_size,)  # one attention block
  tr = config.training
  tr.batch_size = 4
  tr.ref_batch_size = 8 if tr.target == "stf" else 4
  tr.eval_batch_size = tr.ref_batch_size  # one held-out batch
  return config


def test_all_image_configs_are_covered():
  assert {"cifar_vp_stf", "cifar_vp_dsm", "cifar_vp_lw_is", "cifar_subvp_lw_is", "cifar_ve_dsm",
          "cifar_ve_stf", "mnist_vp", "digits_vp", "cifar_edm_dsm", "cifar_edm_stf",
          "celeba64_ve_dsm", "celeba64_ve_stf", "cifar_vp_stf_ddim"} <= set(IMAGE_CONFIGS)
  assert DEFAULT_SET <= set(IMAGE_CONFIGS)


# In the default suite: VP + STF (the users' command) and EDM + STF (EDM's preconditioning);
# digits_vp trains in test_run_lib. The others (the same code paths at other sizes, SDEs and
# weightings; each a ~20 s compile on 2 cores) run with -m slow, for the suite's time budget.
DEFAULT_SET = {"cifar_vp_stf", "cifar_edm_stf"}


@pytest.mark.parametrize("name", [n if n in DEFAULT_SET else pytest.param(n, marks=pytest.mark.slow)
                                  for n in IMAGE_CONFIGS])
def test_one_train_step(name, mock_tfds, tmp_path):
  """One real step: finite training and held-out losses; an optimizer update moved the parameters
  (the EMA, r init + (1 - r) params, lags them: most tensors differ from it; a first step of
  warmup is small enough to leave some float32 tensors as they were); the checkpoint of
  step 1 restores exactly the state train returned."""
  config = _tiny(name)
  out = train(config, str(tmp_path))
  assert out["step"] == 1 and np.isfinite(out["losses"][1]) and np.isfinite(out["eval"][1])
  state = jax.device_get(out["state"])
  moved = [bool(np.any(p != e)) for p, e in zip(jax.tree.leaves(state.params),
                                                jax.tree.leaves(state.ema_params))]
  assert np.mean(moved) > 0.5, f"{sum(moved)} of {len(moved)} parameter tensors moved"
  cfg = run_lib.validate_config(config)
  _, _, like = run_lib.init_state(cfg, sde_lib.get_sde(cfg.sde), jax.random.PRNGKey(0),
                                  template=True)
  with run_lib.open_checkpoints(cfg, str(tmp_path), read_only=True) as store:
    restored, step = store.restore(like)
  assert step == 1
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~80 s on 2 cores; Inception statistics are tested in test_evaluation
def test_fid_stats_mode_writes_common_npz(mock_tfds, tmp_path):
  """--mode=fid_stats: Inception (random weights saved to a file) over the whole mocked test split;
  the .npz holds mu / sigma equal to the statistics of the features computed directly."""
  import jax
  import datasets
  import evaluation
  config = _tiny("cifar_vp_dsm")
  config.eval.batch_size = 4  # 9 test images: 3 batches, the last padded
  weights = str(tmp_path / "inception.npz")
  variables = evaluation.init_inception_params(jax.random.PRNGKey(0))
  evaluation.save_inception_params(variables, weights)
  config.eval.inception_weights = weights
  path = fid_stats(config, str(tmp_path / "wd"))
  mu, sigma = evaluation.load_stats(path)
  levels = np.concatenate([b.image[b.mask] for b in datasets.get_eval_dataset(config, as_levels=True)])
  assert len(levels) == 9
  feats = evaluation.inception_features(variables, levels.astype(np.float32) / 255.0).pool3
  mu2, sigma2 = evaluation.compute_statistics(feats)
  np.testing.assert_allclose(mu, mu2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, sigma2, rtol=1e-4, atol=1e-6)
  config.eval.inception_weights = str(tmp_path / "missing.npz")
  with pytest.raises(Exception, match="missing.npz"):
    fid_stats(config, str(tmp_path / "wd2"))
