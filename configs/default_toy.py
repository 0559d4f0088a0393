"""Shared defaults of the toy (low-dimensional) experiments: small MLP, small batches, minutes on CPU.

Builds on ``configs/default.py``; the MLP's own model fields (``widths``, ``activation``,
``embedding``, ``embedding_dim``, ``fourier_scale``) are declared here (config_schema: model.name
'mlp' only).
"""
import ml_collections

from configs.default import get_default_config


def get_default_toy_config() -> ml_collections.ConfigDict:
  config = get_default_config()

  training = config.training
  training.batch_size = 256
  training.ref_batch_size = 256
  training.n_iters = 5000
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_freq = 2500
  training.snapshot_freq_for_preemption = 500
  training.max_to_keep = 2
  training.reduce_mean = False  # toy dimensions are small; sum over D as score_sde does
  training.eval_batch_size = 1024  # held-out points per evaluation (fixed set, drawn once)

  model = config.model
  model.name = "mlp"
  model.parameterization = "noise"
  model.widths = (128, 128, 128)  # hidden layer widths
  model.activation = "silu"  # 'gelu' | 'relu' | 'silu' | 'softplus' | 'swish' | 'tanh'
  model.embedding = "fourier"  # 'fourier' | 'sinusoidal' | 'concat' (raw t appended to x)
  model.embedding_dim = 32  # time embedding size
  model.fourier_scale = 4.0  # std of the Gaussian Fourier frequencies
  model.ema_rate = 0.999
  model.dropout = 0.0

  optim = config.optim
  optim.lr = 2e-3
  optim.warmup = 100
  optim.grad_clip = 1.0

  data = config.data
  data.dataset = "gmm_2d"
  data.image_size = 0  # unused for toy data
  data.num_channels = 0

  sampling = config.sampling
  sampling.n_samples = 2000
  sampling.batch_size = 2000
  sampling.n_steps = 1000
  sampling.denoise = False

  config.eval.batch_size = 1000
  config.eval.divergence = "exact"  # D <= 64: exact Jacobian trace is affordable
  config.eval.num_samples = 2000
  return config


def get_config() -> ml_collections.ConfigDict:
  return get_default_toy_config()
