"""CelebA 64x64, VE SDE, NCSN++ cont., denoising score matching: score_sde's CelebA settings (Song
et al. 2021, configs/default_celeba_configs.py: sigma_min 0.01, sigma_max 90, data in [0, 1],
random flips, loss summed over dimensions, Langevin corrector snr 0.17) with the CIFAR-10 NCSN++
cont. network (EMA 0.999). Images: central 140x140 crop resized to 64x64 (Song & Ermon 2020;
datasets.py 'celeb_a'). 1M iterations (Xu et al., "Stable target field", Appendix D.1). Samplers
of Table 2: PC (predictor-corrector, the default here) and RK45 (sampling.method='ode' with
sampling.c=0, rtol = atol = 1e-4, Appendix D.2). FID on 10k samples against the test split (Appendix D.3)."""
import ml_collections

from configs.default_image import get_default_image_config, ncsnpp_cont_model


def get_config() -> ml_collections.ConfigDict:
  config = get_default_image_config()
  config.sde.name = "vesde"
  config.sde.sigma_min = 0.01
  config.sde.sigma_max = 90.0
  config.training.weighting = "default"
  config.training.target = "dsm"
  config.training.reduce_mean = False
  config.training.n_iters = 1_000_001
  ncsnpp_cont_model(config.model)
  data = config.data
  data.dataset = "celeb_a"
  data.image_size = 64
  data.num_channels = 3
  data.centered = False
  data.random_flip = True
  config.model.center_input = True  # score_sde: [0, 1] data enter NCSN++ as 2x - 1
  sampling = config.sampling
  sampling.method = "pc"
  sampling.c = 1.0  # reverse-diffusion predictor of the reverse SDE
  sampling.snr = 0.17
  sampling.n_corrector_steps = 1
  sampling.rtol = sampling.atol = 1e-4  # RK45 (method 'ode') tolerances for CelebA
  sampling.n_samples = 10_000
  config.eval.num_samples = 10_000
  config.eval.split = "test"
  return config
