"""NCSN++ score network (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
Appendix H.1), the common backbone of DDPM++ (models/ddpmpp.py) and the small U-Net
(models/unet.py).

Contract: ``NCSNpp.from_config(config)`` builds the module from ``config.model``;
``model.apply({'params': p}, x, cond, train=False, rngs={'dropout': key})`` with ``x`` (B, H, W, C)
NHWC and ``cond`` (B,) = ``sde.noise_conditioning(t)`` (t for VP/subVP, log sigma(t) for VE) returns
an array of the shape of ``x``. The output is the raw network output: the score wrapper
(models/utils.py) applies the parameterization. score_sde's ``scale_by_sigma`` (VE: score = h /
sigma(t)) is *not* done here; use ``model.parameterization = 'noise'`` (score = -h / sigma_t),
which is the same function class up to the sign of h (the network learns either sign; with
init_scale = 0 the initial output is ~0 either way) and uses the exact marginal std sigma_t.
Inputs are not rescaled unless ``center_input`` (x -> 2x - 1, score_sde's behaviour when
``data.centered`` is False); models.utils' ``input_scaling`` (EDM c_in) is a departure from
score_sde, off for a faithful reproduction.

config.model fields (config_schema declares them, configs/default_image.py sets them all; a plain
dict given to ``from_config`` may omit some: defaults below are the NCSN++ cont. CIFAR-10 VE config):
  nf                  base width (128)
  ch_mult             width multiplier per resolution ((1, 2, 2, 2)); len(ch_mult) - 1 halvings
  num_res_blocks      residual blocks per resolution (4; 8 for the 'deep' variants)
  attn_resolutions    spatial sizes with self-attention ((16,)); attention also in the middle
  dropout             dropout rate in residual blocks (0.1), active only with train=True
  resamp_with_conv    conv in stand-alone Up/Downsample layers (True; used when resblock 'ddpm')
  fir                 FIR up/down-sampling (True) with kernel fir_kernel ((1, 3, 3, 1))
  skip_rescale        divide residual sums by sqrt(2) (True)
  resblock_type       'biggan' (resampling inside residual blocks) | 'ddpm' (separate layers)
  progressive         output path: 'none' | 'output_skip' | 'residual' ('none')
  progressive_input   input path: 'none' | 'input_skip' | 'residual' ('residual')
  progressive_combine 'sum' | 'cat' ('sum')
  embedding_type      'fourier' (Gaussian Fourier features) | 'positional' (sinusoidal)
  fourier_scale       std of the Fourier frequencies (16)
  time_embedding_scale  cond is multiplied by this before the embedding (1.0; DDPM++ uses 999 so
                      that VP's t in [0, 1] matches score_sde's continuous labels 999 t)
  init_scale          scale of the initializer of the last conv of each block (0 -> 1e-10)
  conditional         use the noise-level embedding (True)
  center_input        map x -> 2x - 1 first (False)
  dtype               compute dtype 'float32' | 'bfloat16' (params stay float32)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers, register_model

Array = jax.Array

# Choices of the config.model fields of the same names (config_schema reads them).
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("fourier", "positional")
RESBLOCK_TYPES = ("biggan", "ddpm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check(name: str, value: str, allowed: Sequence[str]) -> str:
  value = str(value).lower()
  if value not in allowed:
    raise ValueError(f"model.{name} must be one of {list(allowed)}, got {value!r}")
  return value


def module_kwargs(cls: type, config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The fields of module class ``cls`` found in ``config.model`` (or a model section / dict):
  lists become tuples, a ``dtype`` name its jnp dtype; other fields are left out."""
  cfg = config.model if hasattr(config, "model") else config
  cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name in ("parent", "name") or f.name not in cfg:
      continue
    v = cfg[f.name]
    if isinstance(v, list):
      v = tuple(v)
    if f.name == "dtype" and isinstance(v, str):
      if v not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {v!r}")
      v = DTYPES[v]
    kwargs[f.name] = v
  return kwargs


@register_model("ncsnpp")
class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ U-Net (score_sde ``ncsnpp``); see the module docstring for the fields."""
  nf: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  fir: bool = True
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = "biggan"
  progressive: str = "none"
  progressive_input: str = "residual"
  progressive_combine: str = "sum"
  embedding_type: str = "fourier"
  fourier_scale: float = 16.0
  time_embedding_scale: float = 1.0
  init_scale: float = 0.0
  conditional: bool = True
  center_input: bool = False
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | dict) -> "NCSNpp":
    """Builds the module from ``config.model`` (or a model section / dict); fields that are not
    module fields (name, parameterization, ema_rate, ...) are ignored, missing ones take the class
    defaults."""
    return cls(**module_kwargs(cls, config))

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool = False) -> Array:
    progressive = _check("progressive", self.progressive, PROGRESSIVE)
    progressive_input = _check("progressive_input", self.progressive_input, PROGRESSIVE_INPUT)
    embedding_type = _check("embedding_type", self.embedding_type, EMBEDDING_TYPES)
    resblock_type = _check("resblock_type", self.resblock_type, RESBLOCK_TYPES)
    combine = _check("progressive_combine", self.progressive_combine, PROGRESSIVE_COMBINE)
    n_res = len(self.ch_mult)
    if x.ndim != 4:
      raise ValueError(f"expected NHWC input, got shape {x.shape}")
    if x.shape[1] % 2 ** (n_res - 1) or x.shape[2] % 2 ** (n_res - 1):
      raise ValueError(f"image size {x.shape[1:3]} must be divisible by 2^(len(model.ch_mult) - 1)"
                       f" = {2 ** (n_res - 1)}")
    out_dtype = x.dtype
    dt = self.dtype
    nf = self.nf
    channels = x.shape[-1]
    cond = jnp.broadcast_to(jnp.asarray(cond, jnp.float32), (x.shape[0],))

    # Noise-level embedding (Song et al. 2021, App. H.1): Fourier features of log sigma (VE) or
    # sinusoidal embedding of the time label, then Dense-swish-Dense to 4 nf.
    temb = None
    if self.conditional:
      c = cond * self.time_embedding_scale
      if embedding_type == "fourier":
        temb = layers.GaussianFourierProjection(nf, self.fourier_scale)(c)
      else:
        temb = layers.sinusoidal_embedding(c, nf)
      temb = layers.dense(nf * 4, dtype=dt)(temb)
      temb = layers.dense(nf * 4, dtype=dt)(nn.swish(temb))

    def res_block(h, out_ch=None, up=False, down=False):
      return layers.ResnetBlock(out_ch=out_ch, up=up, down=down, dropout=self.dropout, fir=self.fir,
                                fir_kernel=tuple(self.fir_kernel), skip_rescale=self.skip_rescale,
                                init_scale=self.init_scale, dtype=dt)(h, temb, train)

    def attn(h):
      return layers.AttnBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale,
                              dtype=dt)(h)

    def out_conv(h, features, init_scale):
      return layers.conv(features, 3, init_scale=init_scale, dtype=dt)(
          nn.swish(layers.group_norm(h.shape[-1], dt)(h)))

    resample = dict(fir=self.fir, fir_kernel=tuple(self.fir_kernel), dtype=dt)
    x = x.astype(dt)
    if self.center_input:
      x = 2.0 * x - 1.0

    # Downsampling path.
    input_pyramid = x if progressive_input != "none" else None
    hs = [layers.conv(nf, 3, dtype=dt)(x)]
    for i_level in range(n_res):
      for _ in range(self.num_res_blocks):
        h = res_block(hs[-1], nf * self.ch_mult[i_level])
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
        hs.append(h)
      if i_level != n_res - 1:
        if resblock_type == "ddpm":
          h = layers.Downsample(with_conv=self.resamp_with_conv, **resample)(hs[-1])
        else:
          h = res_block(hs[-1], down=True)
        if progressive_input == "input_skip":
          input_pyramid = layers.Downsample(with_conv=False, **resample)(input_pyramid)
          h = layers.Combine(combine, dtype=dt)(input_pyramid, h)
        elif progressive_input == "residual":
          input_pyramid = layers.Downsample(out_ch=h.shape[-1], with_conv=True,
                                            **resample)(input_pyramid)
          input_pyramid = layers._skip(input_pyramid, h, self.skip_rescale)
          h = input_pyramid
        hs.append(h)

    # Middle.
    h = hs[-1]
    h = res_block(h)
    h = attn(h)
    h = res_block(h)

    # Upsampling path.
    pyramid = None
    for i_level in reversed(range(n_res)):
      for _ in range(self.num_res_blocks + 1):
        h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), nf * self.ch_mult[i_level])
      if h.shape[1] in self.attn_resolutions:
        h = attn(h)
      if progressive == "output_skip":
        skip = out_conv(h, channels, self.init_scale)
        pyramid = skip if pyramid is None else (
            layers.Upsample(with_conv=False, **resample)(pyramid) + skip)
      elif progressive == "residual":
        if pyramid is None:
          pyramid = out_conv(h, h.shape[-1], 1.0)
        else:
          pyramid = layers.Upsample(out_ch=h.shape[-1], with_conv=True, **resample)(pyramid)
          pyramid = layers._skip(pyramid, h, self.skip_rescale)
          h = pyramid
      if i_level != 0:
        if resblock_type == "ddpm":
          h = layers.Upsample(with_conv=self.resamp_with_conv, **resample)(h)
        else:
          h = res_block(h, up=True)
    assert not hs

    if progressive == "output_skip":
      h = pyramid
    else:
      h = out_conv(h, channels, self.init_scale)
    return h.astype(out_dtype)


def ncsnpp_cifar_config() -> dict:
  """NCSN++ cont. (VE) on CIFAR-10: score_sde configs/ve/cifar10_ncsnpp_continuous.py (progressive
  'none', progressive_input 'residual', Fourier embedding of log sigma with scale 16, FIR);
  62,758,915 parameters. (The 'output_skip' / 'input_skip' paths of the paper's architecture search
  are available through the fields but are not what the released CIFAR-10 config uses.)"""
  return dict(name="ncsnpp", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
              dropout=0.1, resamp_with_conv=True, fir=True, fir_kernel=(1, 3, 3, 1),
              skip_rescale=True, resblock_type="biggan", progressive="none",
              progressive_input="residual", progressive_combine="sum", embedding_type="fourier",
              fourier_scale=16.0, time_embedding_scale=1.0, init_scale=0.0, conditional=True,
              center_input=False, dtype="float32")


def ncsnpp_deep_cifar_config() -> dict:
  """NCSN++ cont. (deep, VE): as ncsnpp_cifar_config with 8 residual blocks per resolution;
  107,587,075 parameters."""
  return dict(ncsnpp_cifar_config(), num_res_blocks=8)
