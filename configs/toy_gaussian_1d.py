"""1-D Gaussian p_0 = N(0, s_0^2) (Cao et al., "ODE vs SDE", Sec. 3 and Appendix G): f = -x/2,
g = 1 (VP with beta_min = beta_max = 1) and T = 2."""
from configs.default_toy import get_default_toy_config


def get_config():
  config = get_default_toy_config()
  config.data.dataset = "gaussian_1d"
  config.sde.name = "vpsde"
  config.sde.beta_min, config.sde.beta_max, config.sde.T = 1.0, 1.0, 2.0
  config.sde.eps = 1e-3
  config.training.n_iters = 3000
  config.sampling.method = "sde"
  config.sampling.c = 1.0  # reverse SDE
  return config
