"""Two Gaussians in 64-D with the Stable Target Field objective (Xu et al., Algorithm 1): each step
draws a reference batch of n = 1024 points, the first 128 are trained on and all n form the
self-normalized STF target. Same SDE / model as ``toy_two_gaussians_64d``."""
from configs.toy_two_gaussians_64d import get_config as get_dsm_config


def get_config():
  config = get_dsm_config()
  config.training.target = "stf"
  config.training.ref_batch_size = 1024
  return config
