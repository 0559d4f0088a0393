"""CIFAR-10, VP SDE, DDPM++ cont., denoising score matching with the default weighting sigma_t^2
(Song et al. 2021, score_sde configs/vp/cifar10_ddpmpp_continuous.py: data centered to [-1, 1],
loss averaged over dimensions, EMA 0.9999)."""
import ml_collections

from configs.default_image import get_default_image_config


def get_config() -> ml_collections.ConfigDict:
  config = get_default_image_config()
  config.sde.name = "vpsde"
  config.training.weighting = "default"
  config.training.target = "dsm"
  config.training.reduce_mean = True
  config.data.centered = True
  config.model.center_input = False  # data already in [-1, 1]
  return config
