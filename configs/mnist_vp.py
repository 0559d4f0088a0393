"""MNIST, VP SDE, small U-Net: the setup of Franzese et al., "How much is enough? A study on
diffusion times in score-based generative models", Appendix H.2 / H.3.

VP with the default beta_min 0.1, beta_max 20; the score_sde CIFAR-10 optimizer with the warmup
reduced to 1000 and 65,000 iterations; the network reduced to 64 features, ch_mult (1, 2),
attention at resolution 8 (see models/unet.py: on 28x28 inputs the feature maps are 28 and 14, so
only the middle block attends; num_res_blocks 4 is our assumption). The diffusion time T is free:
--config.sde.T=0.4 trains, samples and evaluates on [eps, T] with unchanged beta(t).
"""
import ml_collections

from configs.default_image import get_default_image_config


def get_config() -> ml_collections.ConfigDict:
  config = get_default_image_config()
  config.sde.name = "vpsde"
  config.sde.T = 1.0  # the paper's sweep: 0.2, 0.4, 0.6, 1.0
  config.training.n_iters = 65_000
  config.training.snapshot_freq = 5000
  config.training.snapshot_freq_for_preemption = 1000
  config.training.reduce_mean = True
  config.optim.warmup = 1000

  model = config.model
  model.name = "unet"
  model.nf = 64
  model.ch_mult = (1, 2)
  model.num_res_blocks = 4
  model.attn_resolutions = (8,)

  data = config.data
  data.dataset = "mnist"
  data.image_size = 28
  data.num_channels = 1
  data.num_grey_levels = 256
  data.random_flip = False  # digits are not mirror-symmetric
  data.centered = True
  config.model.center_input = False  # data already in [-1, 1]

  config.sampling.n_samples = 10_000
  config.eval.num_samples = 10_000
  config.eval.fid = False  # no MNIST Inception statistics; bits/dim and ELBO terms instead
  return config
