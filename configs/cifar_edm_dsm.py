"""CIFAR-10, EDM formulation, DDPM++ backbone, denoising score matching (Karras et al. 2022,
"Elucidating the design space of diffusion-based generative models", Table 1 and the CIFAR-10
DDPM++ setup of their Table 7; Xu et al., "Stable target field", Table 1 baseline "DSM - Heun,
DDPM++": FID 1.97 with 35 NFE).

EDM in scorelab (sde_lib.EDM): time is the noise level, t = sigma on [eps, T] = [0.002, 80]; the
network is preconditioned (model.parameterization 'edm': c_skip, c_out, c_in, c_noise = ln(sigma)/4
with sigma_data = 0.5, data in [-1, 1]); training noise ln sigma ~ N(-1.2, 1.2^2) with
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (training.weighting 'edm'); the loss
is summed over dimensions and averaged over the batch as EDM's. Sampling: deterministic Heun, 18
noise levels with rho = 7 and sigma_N = 0 -> 35 NFE (Algorithm 1).

EDM's training recipe: batch 512, 200M images (390,625 steps), Adam lr 1e-3 (betas 0.9 / 0.999,
eps 1e-8) with a 10M-image linear ramp-up (19,531 steps), no gradient clipping, EMA half-life 0.5M
images (0.5^(512 / 500000) = 0.99929 per step), dropout 0.13; DDPM++ with 128 base channels,
channel multipliers (2, 2, 2), 4 residual blocks per resolution, attention at 16x16, positional
embedding of c_noise itself (time_embedding_scale 1). Not reproduced: EDM's non-leaking
augmentation (p = 0.12); random horizontal flips are used instead.
"""
import ml_collections

from configs.default_image import get_default_image_config


def edm_formulation(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The EDM formulation on any image config (shared with configs/digits_edm_dsm.py): the SDE,
  'edm' preconditioning, log-normal noise levels and weighting, summed loss, Heun 35 NFE."""
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
  model.time_embedding_scale = 1.0  # the network is conditioned on c_noise = ln(sigma) / 4
  sampling = config.sampling
  sampling.method = "heun"
  sampling.n_steps = 18  # 2 * 18 - 1 = 35 NFE
  sampling.denoise = True  # the last step goes to sigma = 0
  sampling.c = 0.0
  sampling.S_churn = 0.0
  return config


def get_config() -> ml_collections.ConfigDict:
  config = edm_formulation(get_default_image_config())
  training = config.training
  training.batch_size = 512
  training.ref_batch_size = 512
  training.n_iters = 390_625  # 200M images
  training.eval_batch_size = 512

  model = config.model
  model.nf = 128
  model.ch_mult = (2, 2, 2)
  model.num_res_blocks = 4
  model.attn_resolutions = (16,)
  model.dropout = 0.13
  model.ema_rate = 0.5 ** (512 / 500_000)  # EMA half-life 0.5M images

  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 19_531  # 10M images
  optim.grad_clip = 0.0

  config.data.centered = True  # [-1, 1]: sigma_data = 0.5
  model.center_input = False
  return config
