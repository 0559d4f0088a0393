"""CIFAR-10, sub-VP SDE, DDPM++ cont., likelihood weighting with importance-sampled time
(Song et al. 2021, ScoreFlow §5.1 / Table 2; otherwise as configs/cifar_vp_lw_is.py)."""
import ml_collections

from configs.cifar_vp_lw_is import get_config as vp_lw_is_config


def get_config() -> ml_collections.ConfigDict:
  config = vp_lw_is_config()
  config.sde.name = "subvpsde"
  return config
