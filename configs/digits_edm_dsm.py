"""digits (the offline default data), EDM formulation, denoising score matching: the STF paper's
headline setting (Xu et al., Table 1: EDM + Heun, 35 NFE) at the scale of a 2-core CPU.

As configs/digits_vp.py (tiny U-Net, 1000 iterations, batch 128, dequantized 8x8 digits in
[-1, 1]) with configs/cifar_edm_dsm.py's formulation: sde_lib.EDM with t = sigma on [0.002, 80],
rho = 7, sigma_data = 0.5; 'edm' preconditioning and loss weighting, ln sigma ~ N(-1.2, 1.2^2);
loss summed over dimensions; deterministic Heun with 18 noise levels -> 35 NFE. The learning rate,
warmup, EMA and clipping are digits_vp's (a 1000-step run, not EDM's 390k).
"""
import ml_collections

from configs.cifar_edm_dsm import edm_formulation
from configs.digits_vp import get_config as digits_vp_config


def get_config() -> ml_collections.ConfigDict:
  return edm_formulation(digits_vp_config())
