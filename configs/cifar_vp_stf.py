"""CIFAR-10, VP SDE, DDPM++ cont., Stable Target Field target (Xu et al. 2023, §6.2: score_sde's
VP hyper-parameters, reference batch n = 4096 on CIFAR-10; the small batch of 128 is the first
rows of the reference batch, Algorithm 1).

Note: the STF paper's main text (§6.2) gives n = 4096 for CIFAR-10, its Appendix D.1 says 1024;
we follow the main text. Override with --config.training.ref_batch_size=1024."""
import ml_collections

from configs.cifar_vp_dsm import get_config as vp_dsm_config


def get_config() -> ml_collections.ConfigDict:
  config = vp_dsm_config()
  config.training.target = "stf"
  config.training.ref_batch_size = 4096
  return config
