"""Two Gaussians in 64-D, 1/2 N(mu, s^2 I) + 1/2 N(-mu, s^2 I), mu = 0.1 * 1, s = 1e-4 (Xu et al.,
"Stable Target Field", Appendix C): VE SDE with sigma_m = 1e-2, sigma_M = 50, DSM target."""
from configs.default_toy import get_default_toy_config


def get_config():
  config = get_default_toy_config()
  config.data.dataset = "two_gaussians_64d"
  config.sde.name = "vesde"
  config.sde.sigma_min, config.sde.sigma_max, config.sde.T = 1e-2, 50.0, 1.0
  config.sde.eps = 1e-5
  config.training.batch_size = 128
  config.training.ref_batch_size = 128
  config.training.target = "dsm"
  config.model.widths = (256, 256, 256)
  config.model.embedding_dim = 64
  config.model.input_scaling = True  # VE: |x_t| grows to sigma_max; feed x * c_in(t)
  return config
