"""CIFAR-10, VE SDE, NCSN++ cont., denoising score matching with the default weighting sigma_t^2
(Song et al. 2021, score_sde configs/ve/cifar10_ncsnpp_continuous.py: data in [0, 1], loss summed
over dimensions, EMA 0.999, predictor-corrector sampling with a Langevin corrector, snr 0.16)."""
import ml_collections

from configs.default_image import get_default_image_config, ncsnpp_cont_model


def get_config() -> ml_collections.ConfigDict:
  config = get_default_image_config()
  config.sde.name = "vesde"
  config.sde.sigma_min = 0.01
  config.sde.sigma_max = 50.0
  config.training.weighting = "default"
  config.training.target = "dsm"
  config.training.reduce_mean = False
  ncsnpp_cont_model(config.model)
  config.data.centered = False
  config.model.center_input = True  # score_sde: [0, 1] data enter NCSN++ as 2x - 1
  config.sampling.method = "pc"
  config.sampling.c = 1.0  # reverse-diffusion predictor of the reverse SDE
  config.sampling.snr = 0.16
  config.sampling.n_corrector_steps = 1
  return config
