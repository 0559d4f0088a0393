"""digits, VP SDE, likelihood weighting g(t)^2 with importance-sampled time (Song et al. 2021,
ScoreFlow §5.1), uniformly dequantized data; otherwise configs/digits_vp.py."""
import ml_collections

from configs.digits_vp import get_config as digits_vp_config


def get_config() -> ml_collections.ConfigDict:
  config = digits_vp_config()
  config.training.weighting = "likelihood_is"
  return config
