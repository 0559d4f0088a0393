"""2-D four-mode GMM trained with likelihood weighting lambda = g^2 and importance-sampled time
p(t) ∝ g^2 / sigma_t^2 (Song et al. 2021b, "Maximum likelihood training", Sec. 5.1), on the VP SDE
0.1..20, T = 1, in the a = g s parameterization (Huang et al., Sec. 6)."""
from configs.default_toy import get_default_toy_config


def get_config():
  config = get_default_toy_config()
  config.data.dataset = "gmm_2d"
  config.sde.name = "vpsde"
  config.sde.beta_min, config.sde.beta_max, config.sde.T = 0.1, 20.0, 1.0
  config.sde.eps = 1e-5
  config.training.weighting = "likelihood_is"
  config.model.parameterization = "a"
  config.sampling.method = "ode"
  config.sampling.c = 0.0
  return config
