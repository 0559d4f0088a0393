"""digits, VP SDE, Stable Target Field target (Xu et al. 2023, Algorithm 1) with a reference batch
of n = 1024 (of the 1,437 training images); otherwise configs/digits_vp.py."""
import ml_collections

from configs.digits_vp import get_config as digits_vp_config


def get_config() -> ml_collections.ConfigDict:
  config = digits_vp_config()
  config.training.target = "stf"
  config.training.ref_batch_size = 1024
  return config
