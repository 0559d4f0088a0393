"""CelebA 64x64, VE SDE, NCSN++ cont., Stable Target Field target with reference batch n = 1024
(Xu et al., "Stable target field", §6.2 and Appendix D.1 agree on 1024 for CelebA 64^2; Table 2:
FID 5.34 with RK45, 8.28 with PC). Everything else as configs/celeba64_ve_dsm.py."""
import ml_collections

from configs.celeba64_ve_dsm import get_config as ve_dsm_config


def get_config() -> ml_collections.ConfigDict:
  config = ve_dsm_config()
  config.training.target = "stf"
  config.training.ref_batch_size = 1024
  return config
