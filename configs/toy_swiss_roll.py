"""Swiss roll (Cao et al., "ODE vs SDE", Appendix H.1-H.2): VP SDE with g_t = sqrt(0.1 (1 - t) + 20 t),
T = 1, batch 400, 3-layer net of widths 50, 50, 2 with ReLU, lr 0.01.

Deviation from the paper: Adam with linear warmup and gradient clipping at a constant lr instead
of halving the lr every 8,000 steps (training.make_optimizer has no step decay); 20,000 steps as in
the paper (about a minute on a 2-core CPU). The time t is appended to the input ('concat'), which is the paper's plain MLP.
"""
from configs.default_toy import get_default_toy_config


def get_config():
  config = get_default_toy_config()
  config.data.dataset = "swiss_roll"
  config.sde.name = "vpsde"
  config.sde.beta_min, config.sde.beta_max, config.sde.T = 0.1, 20.0, 1.0
  config.sde.eps = 1e-3
  config.training.batch_size = 400
  config.training.ref_batch_size = 400
  config.training.n_iters = 20_000
  config.training.snapshot_freq = 5000
  config.training.eval_freq = 2000
  config.training.eval_batch_size = 2000
  config.model.widths = (50, 50)
  config.model.activation = "relu"
  config.model.embedding = "concat"
  config.model.parameterization = "score"
  config.optim.lr = 1e-2
  config.optim.warmup = 100
  config.sampling.method = "sde"
  config.sampling.c = 1.0  # reverse SDE
  return config
