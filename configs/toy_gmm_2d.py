"""2-D four-mode Gaussian mixture (Cao et al., "ODE vs SDE", Appendix H.1-H.2): modes (+-1, +-1),
std 0.05; VP with g_t = 1 (beta_min = beta_max = 1) and T = 4."""
from configs.default_toy import get_default_toy_config


def get_config():
  config = get_default_toy_config()
  config.data.dataset = "gmm_2d"
  config.sde.name = "vpsde"
  config.sde.beta_min, config.sde.beta_max, config.sde.T = 1.0, 1.0, 4.0
  config.sde.eps = 1e-3
  config.sampling.method = "sde"
  config.sampling.c = 1.0  # reverse SDE
  return config
