"""Shared defaults of every scorelab experiment (ml_collections).

Experiment files in this folder start from ``get_default_config()`` and override what differs.
Command-line overrides: ``--config.sde.T=0.4``, ``--config.sampling.c=2.0`` and so on. Every field
is declared exactly once: here, or (network-specific ``model.*`` fields) in default_toy.py (MLP) and
default_image.py (NCSN++ / DDPM++ / U-Net). Types, ranges, choices and cross-field rules are in
``config_schema.py``; ``config_schema.validate(config)`` checks a config.
"""
import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42  # root of every random stream

  # Training (score_sde CIFAR-10 defaults where they apply).
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global training batch B
  # Gradient accumulation: the batch trained in k micro-batches of B / k (one optimizer update;
  # the same update as one batch of B). B must be divisible by k x the device count.
  training.grad_accum_steps = 1
  training.n_iters = 1_300_001  # training steps
  training.log_freq = 50  # steps between metric lines (stdout + TensorBoard)
  training.eval_freq = 1000  # steps between held-out loss evaluations
  training.snapshot_freq = 50_000  # steps between kept (periodic) checkpoints
  training.snapshot_freq_for_preemption = 5000  # steps between 'latest' checkpoints
  training.max_to_keep = 3  # periodic checkpoints kept
  # Weighting of the score-matching loss over time: 'default' (sigma_t^2, as score_sde),
  # 'likelihood' (g^2, ScoreFlow), 'likelihood_is' (g^2 with importance-sampled t, ScoreFlow §5.1),
  # 'noise_driven' / 'data_driven' (ODE-vs-SDE paper, Appendix I), 'edm' (log-normal sigma and
  # EDM's lambda(sigma), Karras et al. 2022; sde.name 'edm' only).
  training.weighting = "default"
  # Objective: 'dsm' (denoising score matching), 'stf' (Stable Target Field, Xu et al.), 'ism' /
  # 'ssm' (implicit / sliced score matching, the CT-ELBO integrand of Huang et al. eq. 25; not with
  # weighting 'edm').
  training.target = "dsm"
  training.n_probes = 1  # ism / ssm: Hutchinson probes per example (averaged)
  training.hutchinson_probe = "rademacher"  # ism / ssm: 'rademacher' | 'gaussian'
  training.ref_batch_size = 128  # STF reference batch n (>= batch_size; the batch is part of it)
  training.reduce_mean = False  # mean (True) or sum (False) over data dimensions
  # PRNG of the loss's t, noise and dropout (losses.step_key): 'threefry' (JAX's default, the
  # stream of older runs) | 'rbg' | 'unsafe_rbg' (XLA RngBitGenerator) | 'philox4x32'.
  training.prng_impl = "threefry"
  # Held-out rows per loss evaluation, in whole training batches (at least one).
  training.eval_batch_size = 128

  # Forward SDE. T is the diffusion time (a free variable); changing it never changes beta/sigma.
  config.sde = sde = ml_collections.ConfigDict()
  sde.name = "vpsde"  # 'vpsde' | 'subvpsde' | 'vesde' | 'edm'
  sde.beta_min = 0.1  # VP / sub-VP: beta(t) linear from beta_min (t = 0) to beta_max (t = 1)
  sde.beta_max = 20.0
  sde.sigma_min = 0.01  # VE: sigma(t) = sigma_min (sigma_max / sigma_min)^t
  sde.sigma_max = 50.0
  sde.T = 1.0  # diffusion time
  sde.eps = 1e-5  # smallest time: everything runs on [eps, T]
  # EDM (Karras et al. 2022, Table 1; sde.name 'edm'): time is the noise level (t = sigma), so an
  # EDM config sets T = sigma_max = 80 and eps = sigma_min = 0.002 (sde_lib.EDM).
  sde.rho = 7.0  # Heun time-step exponent (eq. 5)
  sde.sigma_data = 0.5  # preconditioning c_skip / c_out / c_in and loss weight
  sde.P_mean = -1.2  # training noise: ln sigma ~ N(P_mean, P_std^2)
  sde.P_std = 1.2

  # Score network: the fields every network has (its own fields: default_toy.py / default_image.py).
  config.model = model = ml_collections.ConfigDict()
  model.name = "mlp"  # models.registered_models()
  model.parameterization = "noise"  # 'score' | 'noise' (score = -eps/sigma_t) | 'a' (a = g * s)
  # | 'edm' (EDM preconditioning c_skip, c_out, c_in, c_noise; sde.name 'edm' only)
  model.ema_rate = 0.9999  # EMA decay of the parameters
  model.dropout = 0.0
  # Network input x * c_in(t), c_in = 1/sqrt(alpha_t^2 + sigma_t^2) (EDM); a no-op for VP, helps VE.
  model.input_scaling = False

  # Optimizer (optax): clip global norm, Adam, linear warmup.
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "adam"  # 'adam' | 'adamw' (the same chain: weight decay is decoupled)
  optim.lr = 2e-4  # peak learning rate
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0  # decoupled; 0 = none
  optim.warmup = 5000  # linear warmup steps; 0 = none
  optim.grad_clip = 1.0  # global-norm clipping; 0 = none

  # Data.
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "digits"  # a toy_data distribution or an image dataset (datasets.py)
  data.centered = False  # images scaled to [-1, 1] when True, else [0, 1]
  data.random_flip = False  # random horizontal flips of training images
  data.uniform_dequantization = False  # training images (k + u) / L
  data.num_grey_levels = 17  # digits; image configs set 256
  data.image_size = 8  # image height = width (0 for toy data)
  data.num_channels = 1  # (0 for toy data)
  data.tfds_data_dir = ""  # where prepared TFDS datasets live ('' = TFDS default)
  # Download what is missing on first use (TFDS datasets into data.tfds_data_dir, the FID Inception
  # weights into the cache; process 0 only); False: never download, fail at once saying how to
  # provide it. Offline, a download fails within seconds either way.
  data.download = True
  data.train_split = "train"  # image split trained on

  # Generation. c is the generative diffusion coefficient h^2 = c g^2 (Cao et al.):
  # c = 0 probability-flow ODE, c = 1 reverse SDE, c > 1 more noise.
  config.sampling = sampling = ml_collections.ConfigDict()
  # 'ode', 'heun' and 'ddim' integrate the probability-flow ODE and need c = 0; 'sde', 'pc'
  # (predictor) and 'exponential' sample the generative SDE for any c >= 0.
  # 'ode' | 'sde' | 'pc' | 'exponential' | 'heun' | 'ddim' (samplers.registered_samplers())
  sampling.method = "ode"
  sampling.c = 0.0
  sampling.n_steps = 1000  # fixed-step samplers; the adaptive SDE's first step is (T - eps) / n_steps
  # 'ode': 'tsit5' | 'dopri5'; 'sde': 'euler' | 'heun' | 'sra1' | 'shark' (an ODE name: 'euler').
  sampling.solver = "tsit5"
  sampling.rtol = 1e-5  # adaptive solves (the ODE; the SDE when adaptive): the only tolerances
  sampling.atol = 1e-5
  sampling.snr = 0.16  # pc: Langevin corrector signal-to-noise ratio
  sampling.n_corrector_steps = 1  # pc: Langevin steps per predictor step
  sampling.predictor = "reverse_diffusion"  # pc: 'reverse_diffusion' | 'euler_maruyama'
  sampling.adaptive = False  # sde: adaptive step size (needs an SDE solver with error estimate)
  sampling.max_steps = 100_000  # diffrax max_steps of adaptive solves (the ODE; the adaptive SDE)
  sampling.denoise = True  # final Tweedie denoising step at eps
  # heun (EDM Algorithm 2): churn gamma = min(S_churn / n_steps, sqrt 2 - 1) for noise levels in
  # [S_min, S_max], noise std factor S_noise. S_churn = 0 is the deterministic Algorithm 1.
  sampling.S_churn = 0.0
  sampling.S_min = 0.0
  sampling.S_max = 1e6  # EDM's inf (no upper limit): any value above the largest noise level
  sampling.S_noise = 1.0
  # Pulse-shaped score error of Cao et al. (Appendix G.2, eq. 44): the sampler uses
  # (1 + perturbation_epsilon m(T - t)) s; samplers.PERTURBATIONS: 'none' | 'case1' (m = 1) |
  # 'case2' (-1) | 'case3' ((1 + sin(2 pi u / T)) / 2) | 'case4' (1[u < edge T], early) |
  # 'case5' (1[u > edge T], late), u = T - t the generative time.
  sampling.perturbation = "none"
  sampling.perturbation_epsilon = 0.0  # epsilon (paper: 0.02); non-zero iff a case is chosen
  sampling.perturbation_edge = 0.0  # case4/case5 pulse edge / T; 0: the paper's 0.95 / 0.99
  sampling.n_samples = 64  # samples of --mode=sample
  sampling.batch_size = 64  # samples per sampler call
  # Controllable generation (Song et al. 2021, Sec. 5 and App. I; controllable.py) by --mode=sample:
  # 'none' | 'class' (guided by the classifier of --mode=train_classifier) | 'inpaint' (images of
  # eval.split, the part hidden by sampling.mask imputed) | 'colorize' (RGB images of eval.split
  # from their gray channel). 'inpaint' / 'colorize' need a fixed-step method (not 'ode').
  sampling.condition = "none"
  sampling.class_label = -1  # 'class': the class drawn; -1 = every class in turn
  sampling.guidance_scale = 1.0  # 'class': s of grad log p_t(x) + s grad log p_t(y | x); 1 = Bayes
  sampling.mask = "bottom_half"  # 'inpaint': hidden part, 'bottom_half' | 'centre' | 'random:<kept>'

  # Evaluation.
  # Prior of the generative process (Franzese et al., "How much is enough?", Sec. 3): the SDE's
  # Gaussian p_noise, or an auxiliary nu_phi fitted to p(x, T) by --mode=fit_prior (DIR/prior/),
  # which every sampler starts from and the likelihood / bound use in place of p_noise.
  config.prior = prior = ml_collections.ConfigDict()
  prior.kind = "gaussian"  # 'gaussian' | 'dpgmm' | 'flow'
  # 'concurrent': x_T = alpha_T x_0 + sigma_T z from data (Sec. 3.1; needs no score model, can run
  # beside training); 'sequential': the probability-flow ODE push-forward of data (Sec. 3.2).
  prior.fit = "concurrent"
  prior.n_fit_samples = 20_000  # samples of p(x, T) (data cycled with fresh noise)
  prior.heldout_fraction = 0.1  # held out for the reported cross-entropy (nats/dim)
  prior.n_components = 20  # DPGMM truncation level
  prior.covariance_type = "full"  # DPGMM: 'full' | 'diag'
  prior.weight_threshold = 1e-2  # DPGMM effective components: weight above this
  prior.max_iter = 500  # DPGMM: variational EM iterations at most (stops once converged)
  prior.flow_layers = 6  # coupling layers (vectors) / steps per level (Glow, images)
  prior.flow_hidden = 64  # conditioner width
  prior.flow_levels = 2  # Glow levels (images)
  prior.flow_steps = 2000  # Adam steps
  prior.flow_lr = 1e-3
  prior.flow_batch_size = 256

  # Variational dequantization q_phi(u | k) (ScoreFlow, Sec. 5.2, eq. 13; Flow++): a conditional
  # Glow + normal CDF fitted by --mode=fit_dequantizer (DIR/dequantizer/) to the trained score model
  # (frozen) through the ScoreFlow bound (eq. 39); eval uses it when eval.dequantization says so.
  config.dequantizer = dequantizer = ml_collections.ConfigDict()
  dequantizer.flow_steps = 4  # Glow steps per level
  dequantizer.flow_levels = 1  # Glow levels (2^levels divides the image size)
  dequantizer.flow_hidden = 32  # conditioner width (and of the feature net of x)
  dequantizer.context_features = 8  # channels of the features of x fed to every conditioner
  dequantizer.n_iters = 2000  # Adam steps
  dequantizer.lr = 1e-3  # peak learning rate (warmup, cosine decay)
  dequantizer.batch_size = 64
  dequantizer.bound_time_samples = 16  # time samples per example of the bound in the objective
  dequantizer.save_freq = 250  # steps between saves (a restart resumes from the last one)

  # Noise-conditional classifier p_t(y | x_t) of class-guided sampling (Song et al. 2021, Sec. 5 and
  # App. I.1), trained on forward-noised data, t ~ U(eps, T), by --mode=train_classifier into
  # DIR/classifier/ (image data with class labels; models/classifier.py). Its Adam takes beta1,
  # beta2, eps, grad_clip and weight_decay from the optim section, lr and warmup from here.
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.widths = (32, 64)  # channels per resolution, halved in between (the net's width)
  classifier.num_res_blocks = 1  # time-conditioned residual blocks per resolution (its depth)
  classifier.embedding_dim = 64  # noise-level embedding size
  classifier.n_iters = 2000  # training steps
  classifier.batch_size = 128  # global batch (training split data.train_split)
  classifier.lr = 1e-3  # peak learning rate
  classifier.warmup = 100  # linear warmup steps; 0 = none
  classifier.ema_rate = 0.99  # EMA decay of the parameters (0.99^2000: nothing of the init left)
  classifier.use_ema = True  # load_classifier (guided sampling) uses the EMA parameters
  classifier.log_freq = 100  # steps between metric lines (loss, accuracy, rate, ETA)
  classifier.snapshot_freq = 500  # steps between checkpoints (the latest is kept)
  classifier.curve_times = 10  # t values (linear on [eps, T]) of the held-out accuracy-vs-t curve

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.batch_size = 256
  evaluate.checkpoint = -1  # step to evaluate; -1 = latest
  evaluate.use_ema = True  # evaluate the EMA parameters
  evaluate.split = "test"  # image split evaluated
  evaluate.bpd = True  # exact bits/dim with the probability-flow ODE
  evaluate.bound = True  # ScoreFlow per-datapoint bound
  evaluate.divergence = "hutchinson"  # 'exact' | 'hutchinson'
  evaluate.hutchinson_probe = "rademacher"  # 'rademacher' | 'gaussian'
  evaluate.rtol = 1e-5  # likelihood ODE tolerances
  evaluate.atol = 1e-5
  evaluate.float64 = False  # likelihood in float64
  evaluate.num_samples = 1000  # samples for FID / sample-based metrics; toy held-out set size
  evaluate.fid = False  # FID / Inception Score of samples (images)
  evaluate.inception_weights = ""  # converted .npz; '' = $SCORELAB_CACHE/inception_fid.npz, fetched
  # and converted on first use (inception_weights.py, docs/fid.md)
  evaluate.fid_stats = ""  # reference statistics .npz (mu, sigma)
  evaluate.bound_time_samples = 64  # time samples per example of the ScoreFlow bound and CT-ELBO
  # CT-ELBO of the plug-in reverse SDE (Huang et al., eq. 25) in its ISM (Hutchinson) and DSM forms,
  # bits/dim (images) or nats (toy). Off by default: ~3x the ScoreFlow bound's cost per example.
  evaluate.ct_elbo = False
  # Toy data with exact marginal scores (eval.ct_elbo on): the CT-ELBO of the lambda-family of
  # plug-in reverse SDEs (eq. 27, Theorem 6; lambda = 1 - c), each lambda < 1, e.g. (0.0, 0.5, 0.9).
  evaluate.ct_elbo_lambdas = ()
  evaluate.num_likelihood_examples = 1000  # toy data: held-out points of the NLL
  evaluate.max_steps = 4096  # likelihood ODE: an example needing more steps is a failed solve
  # Failed likelihood solves (max_steps reached, non-finite) are counted, reported with their
  # example indices and excluded from the mean; eval fails when more than this fraction fail.
  evaluate.max_failed_fraction = 0.01
  # 'uniform' (u ~ U[0,1)) or 'variational' (the q_phi(u | k) of --mode=fit_dequantizer): bits/dim of
  # the ODE and of the bound are E_q[-log p(scale(k + u)) + log q(u | k)] + the scaling log-det.
  evaluate.dequantization = "uniform"
  return config
