"""1-D mixture 0.3 N(1, 0.1^2) + 0.7 N(3, 0.5^2) of Franzese et al., "How much is enough?"
(Sec. 1, Appendix H.1): VE SDE dx = sigma^t dw with s^2(t) = (sigma^{2t} - 1) / (2 log sigma).

In sde_lib's VE parameterization g = sigma_min r^t sqrt(2 log r) this is r = sigma and
sigma_min = 1 / sqrt(2 log sigma). The paper does not state sigma; we use sigma = 25 (the value
of the score-SDE tutorial it builds on). The diffusion time T is the swept variable
(``--config.sde.T=...``); beta / sigma schedules do not change with T.
"""
import math

from configs.default_toy import get_default_toy_config

SIGMA = 25.0


def get_config():
  config = get_default_toy_config()
  config.data.dataset = "gmm_1d_diffusion_time"
  config.sde.name = "vesde"
  config.sde.sigma_min = 1.0 / math.sqrt(2.0 * math.log(SIGMA))
  config.sde.sigma_max = SIGMA * config.sde.sigma_min
  config.sde.T = 1.0
  config.sde.eps = 1e-3
  config.training.batch_size = 512
  config.training.ref_batch_size = 512
  config.sampling.method = "ode"
  config.sampling.c = 0.0
  config.model.input_scaling = True  # VE: |x_t| grows to sigma_max; feed x * c_in(t)
  return config
