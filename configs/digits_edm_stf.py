"""digits, EDM formulation, Stable Target Field target (Xu et al., Appendix A "VE and EDM":
w_k ∝ N(x_sigma; x_k, sigma^2 I) over the reference batch, Algorithm 1) with a reference batch of
n = 1024 of the 1,437 training images, as configs/digits_vp_stf.py; otherwise
configs/digits_edm_dsm.py (same seed, steps and sampler, so the two runs differ only in the target).
"""
import ml_collections

from configs.digits_edm_dsm import get_config as digits_edm_dsm_config


def get_config() -> ml_collections.ConfigDict:
  config = digits_edm_dsm_config()
  config.training.target = "stf"
  config.training.ref_batch_size = 1024
  return config
