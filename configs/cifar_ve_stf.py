"""CIFAR-10, VE SDE, NCSN++ cont., Stable Target Field target (Xu et al. 2023, §6.2, reference
batch n = 4096; Appendix D.1 says 1024, override with --config.training.ref_batch_size=1024)."""
import ml_collections

from configs.cifar_ve_dsm import get_config as ve_dsm_config


def get_config() -> ml_collections.ConfigDict:
  config = ve_dsm_config()
  config.training.target = "stf"
  config.training.ref_batch_size = 4096
  return config
