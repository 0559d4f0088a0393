"""Shared defaults of every scorelab experiment (ml_collections).

Experiment files in this folder start from ``get_default_config()`` and override what differs.
Command-line overrides: ``--config.sde.T=0.4``, ``--config.sampling.c=2.0`` and so on.
"""
import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42

  # Training (score_sde CIFAR-10 defaults where they apply).
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128
  training.n_iters = 1_300_001
  training.log_freq = 50  # steps between metric lines (stdout + TensorBoard)
  training.eval_freq = 1000  # steps between held-out loss evaluations
  training.snapshot_freq = 50_000  # steps between kept (periodic) checkpoints
  training.snapshot_freq_for_preemption = 5000  # steps between 'latest' checkpoints
  training.max_to_keep = 3
  # Weighting of the score-matching loss over time: 'default' (sigma_t^2, as score_sde),
  # 'likelihood' (g^2, ScoreFlow), 'likelihood_is' (g^2 with importance-sampled t, ScoreFlow §5.1),
  # 'noise_driven' / 'data_driven' (ODE-vs-SDE paper, Appendix I).
  training.weighting = "default"
  # Regression target: 'dsm' (denoising score matching) or 'stf' (Stable Target Field, Xu et al.).
  training.target = "dsm"
  training.ref_batch_size = 128  # STF reference batch n (>= batch_size; the batch is part of it)
  training.reduce_mean = False  # mean (True) or sum (False) over data dimensions

  # Forward SDE. T is the diffusion time (a free variable); changing it never changes beta/sigma.
  config.sde = sde = ml_collections.ConfigDict()
  sde.name = "vpsde"  # 'vpsde' | 'subvpsde' | 'vesde'
  sde.beta_min = 0.1
  sde.beta_max = 20.0
  sde.sigma_min = 0.01
  sde.sigma_max = 50.0
  sde.T = 1.0
  sde.eps = 1e-5

  # Score network.
  config.model = model = ml_collections.ConfigDict()
  model.name = "mlp"
  model.parameterization = "noise"  # 'score' | 'noise' (score = -eps/sigma_t) | 'a' (a = g * s)
  model.ema_rate = 0.9999
  model.dropout = 0.0

  # Optimizer (optax): clip global norm, Adam, linear warmup.
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "adam"
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 5000
  optim.grad_clip = 1.0

  # Data.
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "digits"
  data.centered = False  # images scaled to [-1, 1] when True, else [0, 1]
  data.random_flip = False
  data.uniform_dequantization = False
  data.num_grey_levels = 17  # digits; image configs set 256
  data.image_size = 8
  data.num_channels = 1
  data.tfds_data_dir = ""  # where prepared TFDS datasets live ('' = TFDS default)

  # Generation. c is the generative diffusion coefficient h^2 = c g^2 (Cao et al.):
  # c = 0 probability-flow ODE, c = 1 reverse SDE, c > 1 more noise.
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "ode"  # 'ode' | 'sde' | 'pc' | 'exponential'
  sampling.c = 1.0
  sampling.n_steps = 1000  # fixed-step solvers
  sampling.solver = "tsit5"  # adaptive ODE solver: 'tsit5' | 'dopri5'
  sampling.rtol = 1e-5
  sampling.atol = 1e-5
  sampling.snr = 0.16  # Langevin corrector signal-to-noise ratio
  sampling.n_corrector_steps = 1
  sampling.predictor = "reverse_diffusion"  # pc: 'reverse_diffusion' | 'euler_maruyama'
  sampling.adaptive = False  # sde: adaptive step size (needs an SDE solver with error estimate)
  sampling.max_steps = 100_000  # diffrax max_steps for adaptive solves
  sampling.denoise = True  # final Tweedie denoising step at eps
  sampling.n_samples = 64
  sampling.batch_size = 64
  sampling.prior = "gaussian"  # 'gaussian' | 'auxiliary' (fitted nu_phi for small T)

  # Evaluation.
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.batch_size = 256
  evaluate.checkpoint = -1  # step to evaluate; -1 = latest
  evaluate.use_ema = True
  evaluate.split = "test"
  evaluate.bpd = True  # exact bits/dim with the probability-flow ODE
  evaluate.bound = True  # ScoreFlow per-datapoint bound
  evaluate.divergence = "hutchinson"  # 'exact' | 'hutchinson'
  evaluate.hutchinson_probe = "rademacher"  # 'rademacher' | 'gaussian'
  evaluate.rtol = 1e-5
  evaluate.atol = 1e-5
  evaluate.float64 = False
  evaluate.num_samples = 1000  # samples for FID / sample-based metrics
  evaluate.fid = False
  evaluate.inception_weights = ""  # local .npz of converted Inception-v3 weights
  evaluate.fid_stats = ""  # reference statistics .npz (mu, sigma)
  return config
