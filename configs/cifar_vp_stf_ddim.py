"""CIFAR-10, VP SDE, DDPM++ cont., STF (configs/cifar_vp_stf.py) sampled with deterministic DDIM
(Song et al. 2021a, eta = 0) in 100 steps: Xu et al., "Stable target field", Table 1 "STF - DDIM"
(FID 5.06, 100 NFE) and Appendix D.2. The 100 steps are uniform in t on [eps, T] and the last one
lands on eps = 1e-5 (the training eps, no extra denoising evaluation: NFE = 100). Song et al. use a
quadratic subsequence of DDPM's 1000 steps for CIFAR-10, which scorelab does not offer."""
import ml_collections

from configs.cifar_vp_stf import get_config as vp_stf_config


def get_config() -> ml_collections.ConfigDict:
  config = vp_stf_config()
  sampling = config.sampling
  sampling.method = "ddim"
  sampling.n_steps = 100
  sampling.c = 0.0  # deterministic (eta = 0); not read by 'ddim'
  sampling.denoise = False  # NFE = n_steps
  return config
