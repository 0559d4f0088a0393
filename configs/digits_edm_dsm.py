"""digits (the offline default data), EDM formulation, denoising score matching: the STF paper's
headline setting (Xu et al., Table 1: EDM + Heun, 35 NFE) at the scale of a 2-core CPU.

As configs/digits_vp.py (tiny U-Net, 1000 iterations, batch 128, dequantized 8x8 digits in
[-1, 1]) with configs/cifar_edm_dsm.py's formulation: sde_lib.EDM with t = sigma on [0.002, 80],
rho = 7, sigma_data = 0.5; 'edm' preconditioning and loss weighting, ln sigma ~ N(-1.2, 1.2^2);
loss summed over dimensions; deterministic Heun with 18 noise levels -> 35 NFE. The learning rate,
warmup, EMA and clipping are digits_vp's (a 1000-step run, not EDM's 390k).
"""
import ml_collections

from configs.digits_vp import get_config as digits_vp_config


def get_config() -> ml_collections.ConfigDict:
  config = digits_vp_config()
  sde = config.sde
  sde.name = "edm"
  sde.sigma_min = sde.eps = 0.002
  sde.sigma_max = sde.T = 80.0
  sde.rho = 7.0
  sde.sigma_data = 0.5
  sde.P_mean = -1.2
  sde.P_std = 1.2

  training = config.training
  training.weighting = "edm"
  training.target = "dsm"
  training.reduce_mean = False

  model = config.model
  model.parameterization = "edm"
  model.input_scaling = False  # c_in is part of the preconditioning
  model.embedding_type = "positional"
  model.time_embedding_scale = 1.0  # conditioned on c_noise = ln(sigma) / 4

  sampling = config.sampling
  sampling.method = "heun"
  sampling.n_steps = 18  # 2 * 18 - 1 = 35 NFE
  sampling.denoise = True
  sampling.c = 0.0
  sampling.S_churn = 0.0
  return config
