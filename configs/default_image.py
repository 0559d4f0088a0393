"""Shared defaults of the image experiments (score_sde's CIFAR-10 training setup).

Builds on ``configs/default.py``. Values follow Song et al. 2021 ("Score-Based Generative Modeling
through SDEs", Appendix H and its public configs ``default_cifar10_configs.py``): batch 128,
Adam lr 2e-4 (beta1 0.9, eps 1e-8), linear warmup 5000, gradient clipping at norm 1,
1.3M iterations, dropout 0.1, random horizontal flips, EMA 0.9999 (DDPM++ cont.) / 0.999 (NCSN++
cont.). The model section holds every field of models/ncsnpp.py with the DDPM++ cont. (VP) values;
VE / NCSN++ experiments override the differing fields with ``ncsnpp_cont_model``.

Fields declared here: the score-network fields of ``config.model`` (models/ncsnpp.py documents
each; config_schema: model.name 'ncsnpp' | 'ddpmpp' | 'unet' only).
"""
import ml_collections

from configs.default import get_default_config


def ddpmpp_cont_model(model: ml_collections.ConfigDict) -> None:
  """DDPM++ cont. (score_sde configs/vp/cifar10_ddpmpp_continuous.py), in place."""
  model.name = "ddpmpp"
  model.parameterization = "noise"  # score = -eps_hat / sigma_t (score_sde's continuous VP)
  model.ema_rate = 0.9999
  model.nf = 128  # base channels
  model.ch_mult = (1, 2, 2, 2)  # channel multiplier per resolution (len - 1 halvings)
  model.num_res_blocks = 4  # residual blocks per resolution
  model.attn_resolutions = (16,)  # feature-map sizes with self-attention (and the middle block)
  model.dropout = 0.1
  model.resamp_with_conv = True  # conv in stand-alone up/down-sampling layers ('ddpm' blocks)
  model.fir = False  # FIR up/down-sampling with fir_kernel
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = True  # residual sums / sqrt(2)
  model.resblock_type = "biggan"  # 'biggan' | 'ddpm'
  model.progressive = "none"  # output path: 'none' | 'output_skip' | 'residual'
  model.progressive_input = "none"  # input path: 'none' | 'input_skip' | 'residual'
  model.progressive_combine = "sum"  # 'sum' | 'cat'
  model.embedding_type = "positional"  # 'positional' (sinusoidal) | 'fourier'
  model.fourier_scale = 16.0  # std of the Fourier frequencies (embedding_type 'fourier')
  model.time_embedding_scale = 999.0  # score_sde's continuous VP labels 999 t
  model.init_scale = 0.0  # init scale of each block's last conv (0 -> 1e-10)
  model.conditional = True  # use the noise-level embedding
  model.center_input = False  # set to (not data.centered): score_sde maps [0, 1] inputs to 2x - 1
  model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' | 'float16'


def ncsnpp_cont_model(model: ml_collections.ConfigDict) -> None:
  """NCSN++ cont. (score_sde configs/ve/cifar10_ncsnpp_continuous.py), in place: FIR resampling,
  no progressive output path, residual progressive input, Gaussian Fourier features of log sigma,
  EMA 0.999."""
  ddpmpp_cont_model(model)
  model.name = "ncsnpp"
  model.ema_rate = 0.999
  model.fir = True
  model.progressive = "none"
  model.progressive_input = "residual"
  model.embedding_type = "fourier"
  model.time_embedding_scale = 1.0


def songunet_model(model: ml_collections.ConfigDict, arch: str = "ddpmpp") -> None:
  """EDM's SongUNet (models/songunet.py; Karras et al. 2022, Table 7) with its CIFAR-10 DDPM++ or
  NCSN++ settings, in place; declares its own fields channel_mult_noise and augment_dim.
  ``--mode=import`` of an EDM pickle sets these from the pickle (edm_pickle.py)."""
  from models.songunet import songunet_cifar_config
  ddpmpp_cont_model(model)
  for key, value in songunet_cifar_config(arch).items():
    model[key] = value
  model.channel_mult_noise = 2 if arch == "ncsnpp" else 1  # noise embedding width / nf
  model.augment_dim = 9  # augmentation labels of EDM's CIFAR-10 models (zeros at sampling)


def get_default_image_config() -> ml_collections.ConfigDict:
  config = get_default_config()  # score_sde's CIFAR-10 training, SDE and optimizer settings

  config.training.snapshot_freq_for_preemption = 10_000

  ddpmpp_cont_model(config.model)

  data = config.data
  data.dataset = "cifar10"
  data.image_size = 32
  data.num_channels = 3
  data.num_grey_levels = 256
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  config.model.center_input = True  # data in [0, 1]: the network sees 2x - 1 (score_sde)

  sampling = config.sampling
  sampling.method = "sde"  # reverse SDE (c = 1), Euler-Maruyama, as score_sde's VP 'pc' sampler
  sampling.c = 1.0
  sampling.n_samples = 50_000
  sampling.batch_size = 500

  evaluate = config.eval
  evaluate.batch_size = 1024
  evaluate.num_samples = 50_000
  evaluate.fid = True
  return config


def get_config() -> ml_collections.ConfigDict:
  return get_default_image_config()
