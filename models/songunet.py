"""EDM's SongUNet: the DDPM++ / NCSN++ U-Nets as Karras et al. 2022 ("Elucidating the design space
of diffusion-based generative models", Table 7 and App. F.1) re-implemented them in NVlabs/edm
``training/networks.py``, written here from that architecture's description so that EDM-format
network pickles (edm_pickle.py) load tensor for tensor and parameter counts are EDM's:
55,733,891 (DDPM++) and 56,397,827 (NCSN++) at CIFAR-10 settings.

It is the network F of D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (Table 1; the
preconditioning is ``sde_lib.EDM``'s, model.parameterization 'edm'); ``cond`` is c_noise =
ln(sigma) / 4. How it differs from models/ncsnpp.py (why a module of its own):
* Mapping: embedding of c_noise (sinusoidal [sin, cos] of width nf * channel_mult_noise, or
  Fourier features of the same width with frequencies N(0, 16^2)), plus a bias-free linear map of
  ``augment_dim`` augmentation labels (zeros when none are given, as at sampling), then
  Dense-SiLU-Dense-SiLU to 4 nf: the blocks get SiLU'd features and add Dense(emb) as they are.
* Blocks (EDM ``UNetBlock``, adaptive_scale off): GN-SiLU-conv, + Dense(emb), GN-SiLU-dropout-conv,
  skip (1x1 conv when the width changes or the block resamples), sum times sqrt(1/2); attention
  (one head) *inside* the block, after the residual sum, with qkv channels interleaved per channel
  as (c, {q, k, v}). GroupNorm eps 1e-6, groups min(32, C / 4).
* Encoder: conv, then per level ``num_blocks`` blocks (a down block first below the top level);
  'residual' input path (NCSN++): the image pyramid goes through a fused 3x3 conv + FIR down and
  (x + aux) / sqrt(2); 'skip': FIR-down the image, 1x1 conv, add. Decoder: two middle blocks
  (attention in the first), per level an up block and ``num_blocks + 1`` blocks on the skip
  concatenation, attention only in the last of a level at an attention resolution; output
  GN-SiLU-conv at the top ('standard') or summed over levels ('skip').
* Resampling: the ``resample_filter`` (model.fir_kernel when model.fir, else [1, 1] = nearest /
  2x2 average) applied by upfirdn2d (models/up_or_down_sampling.py).
* Init: xavier-uniform everywhere (DDPM init), xavier x 1e-5 on each block's last conv, the
  attention projection and the output conv (init_scale 0 -> variance scale 1e-10), x sqrt(0.2) on
  qkv.
Module names follow EDM's (``enc_32x32_block0/conv0`` for ``enc.32x32_block0.conv0``).

config.model fields: those of models/ncsnpp.py, read as EDM's SongUNet arguments: nf
(model_channels), ch_mult (channel_mult), num_res_blocks (num_blocks), attn_resolutions, dropout,
embedding_type, fourier_scale, fir / fir_kernel (resample_filter), progressive ('none' =
decoder_type 'standard', 'output_skip' = 'skip'), progressive_input ('none' = encoder_type
'standard', 'input_skip' = 'skip', 'residual'), init_scale, time_embedding_scale, center_input,
dtype; and two of its own: channel_mult_noise, augment_dim. SongUNet has no choice in
skip_rescale (True), resblock_type ('biggan'), progressive_combine ('sum') or conditional (True):
other values are refused naming the field. The Fourier frequencies (EDM: a buffer) are the frozen
parameter ``map_noise/W`` (no gradient), so ``trainable_param_count`` leaves them out.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers, register_model
from models import up_or_down_sampling as ud
from models.ncsnpp import EMBEDDING_TYPES, PROGRESSIVE_INPUT, module_kwargs

Array = jax.Array
Dtype = Any
PROGRESSIVE = ("none", "output_skip")  # EDM decoder_type 'standard' | 'skip'
SKIP_SCALE = math.sqrt(0.5)
GN_EPS = 1e-6
FROZEN = (("map_noise", "W"),)  # parameter paths that receive no gradient (EDM buffers)


def _init(scale: float) -> nn.initializers.Initializer:
  """xavier-uniform with variance scale ``scale`` (0 -> 1e-10, EDM's init_weight 1e-5)."""
  return layers.default_init(scale)


def _norm(channels: int, dtype: Dtype, name: Optional[str] = None) -> nn.GroupNorm:
  """EDM GroupNorm: min(32, C // 4) groups, eps 1e-6."""
  return nn.GroupNorm(num_groups=min(32, channels // 4), epsilon=GN_EPS, dtype=dtype,
                      use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, scale: float, dtype: Dtype, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), padding="SAME", kernel_init=_init(scale),
                 dtype=dtype, name=name)


def _resample(x: Array, up: bool, down: bool, kernel: Sequence[float]) -> Array:
  """EDM Conv2d's (non-fused) resampling: transposed conv with 4 f / strided conv with f, f the
  normalized outer product of ``kernel`` = FIR up / down by 2 (upfirdn2d)."""
  if up:
    return ud.upsample_2d(x, kernel)
  if down:
    return ud.downsample_2d(x, kernel)
  return x


class UNetBlock(nn.Module):
  """EDM ``UNetBlock`` as SongUNet builds it (adaptive_scale off, resample_proj on, skip_scale
  sqrt(1/2), one attention head)."""
  out_ch: int
  up: bool = False
  down: bool = False
  attention: bool = False
  dropout: float = 0.0
  resample_filter: Sequence[float] = (1, 1)
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    c_in, dt = x.shape[-1], self.dtype
    h = nn.silu(_norm(c_in, dt, "norm0")(x))
    h = _conv(self.out_ch, 3, 1.0, dt, "conv0")(
        _resample(h, self.up, self.down, self.resample_filter))
    h = h + nn.Dense(self.out_ch, kernel_init=_init(1.0), dtype=dt, name="affine")(emb)[
        :, None, None, :]
    h = nn.silu(_norm(self.out_ch, dt, "norm1")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = _conv(self.out_ch, 3, self.init_scale, dt, "conv1")(h)
    skip = x
    if self.out_ch != c_in or self.up or self.down:
      skip = _conv(self.out_ch, 1, 1.0, dt, "skip")(
          _resample(x, self.up, self.down, self.resample_filter))
    x = (h + skip) * SKIP_SCALE
    if self.attention:
      b, hh, ww, c = x.shape
      qkv = _conv(3 * c, 1, 0.2, dt, "qkv")(_norm(c, dt, "norm2")(x))
      qkv = qkv.reshape(b, hh * ww, c, 3)  # EDM's channel layout: (c, {q, k, v})
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      logits = jnp.einsum("bqc,bkc->bqk", q.astype(jnp.float32),
                          k.astype(jnp.float32) / math.sqrt(c))
      w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      a = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, hh, ww, c)
      x = (_conv(c, 1, self.init_scale, dt, "proj")(a) + x) * SKIP_SCALE
    return x


class FusedDownConv(nn.Module):
  """EDM Conv2d(kernel=3, down=True, fused_resample=True), the NCSN++ input path: 3x3 conv with
  padding 1 + (len(filter) - 1) // 2, then FIR down by 2 (no padding), then the bias."""
  features: int
  resample_filter: Sequence[float] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad = 1 + (len(self.resample_filter) - 1) // 2
    kernel = self.param("kernel", _init(1.0), (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    h = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1),
                                     ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = ud.upfirdn2d(h, ud.make_kernel(self.resample_filter), down=2)
    return h + bias.astype(h.dtype)


def _check(name: str, value, allowed) -> Any:
  value = str(value).lower() if isinstance(value, str) else value
  if value not in allowed:
    raise ValueError(f"model.{name} must be one of {list(allowed)} for model.name='songunet' "
                     f"(EDM's SongUNet), got {value!r}")
  return value


@register_model("songunet")
class SongUNet(nn.Module):
  """EDM's DDPM++ / NCSN++ (``SongUNet``); see the module docstring. Defaults: EDM's CIFAR-10
  DDPM++ (``songunet_cifar_config('ddpmpp')``)."""
  nf: int = 128
  ch_mult: Sequence[int] = (2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.13
  embedding_type: str = "positional"
  fourier_scale: float = 16.0
  channel_mult_noise: int = 1
  augment_dim: int = 9
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  progressive: str = "none"
  progressive_input: str = "none"
  init_scale: float = 0.0
  time_embedding_scale: float = 1.0
  center_input: bool = False
  # Fixed in SongUNet; fields so that a config's values are checked, not ignored.
  skip_rescale: bool = True
  resblock_type: str = "biggan"
  progressive_combine: str = "sum"
  conditional: bool = True
  resamp_with_conv: bool = True  # unused (resampling happens inside the blocks)
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | dict) -> "SongUNet":
    """The module from ``config.model`` (or a model section / dict); fields that are not module
    fields are ignored, missing ones take the class defaults."""
    return cls(**module_kwargs(cls, config))

  @property
  def resample_filter(self) -> tuple[float, ...]:
    """EDM's resample_filter: fir_kernel with FIR, else [1, 1] (nearest / average pooling)."""
    return tuple(self.fir_kernel) if self.fir else (1.0, 1.0)

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool = False,
               augment_labels: Optional[Array] = None) -> Array:
    embedding = _check("embedding_type", self.embedding_type, EMBEDDING_TYPES)
    decoder = _check("progressive", self.progressive, PROGRESSIVE)
    encoder = _check("progressive_input", self.progressive_input, PROGRESSIVE_INPUT)
    _check("skip_rescale", self.skip_rescale, (True,))
    _check("resblock_type", self.resblock_type, ("biggan",))
    _check("progressive_combine", self.progressive_combine, ("sum",))
    _check("conditional", self.conditional, (True,))
    if x.ndim != 4:
      raise ValueError(f"expected NHWC input, got shape {x.shape}")
    levels = len(self.ch_mult)
    if x.shape[1] != x.shape[2] or x.shape[1] % 2 ** (levels - 1):
      raise ValueError(f"image size {x.shape[1:3]} must be square and divisible by "
                       f"2^(len(model.ch_mult) - 1) = {2 ** (levels - 1)}")
    out_dtype, dt, nf = x.dtype, self.dtype, self.nf
    out_ch, res0 = x.shape[-1], x.shape[1]
    filt = self.resample_filter
    emb_ch, noise_ch = 4 * nf, nf * self.channel_mult_noise
    cond = jnp.broadcast_to(jnp.asarray(cond, jnp.float32), (x.shape[0],))

    # Mapping (EDM SongUNet.forward; the sin / cos halves in the order after its swap).
    c = cond * self.time_embedding_scale
    if embedding == "fourier":
      emb = layers.GaussianFourierProjection(noise_ch // 2, self.fourier_scale,
                                             name="map_noise")(c)
    else:
      emb = layers.sinusoidal_embedding(c, noise_ch)
    if self.augment_dim:
      labels = (jnp.zeros((x.shape[0], self.augment_dim), jnp.float32) if augment_labels is None
                else jnp.asarray(augment_labels, jnp.float32))
      emb = emb + nn.Dense(noise_ch, use_bias=False, kernel_init=_init(1.0), dtype=dt,
                           name="map_augment")(labels)
    emb = nn.silu(nn.Dense(emb_ch, kernel_init=_init(1.0), dtype=dt, name="map_layer0")(emb))
    emb = nn.silu(nn.Dense(emb_ch, kernel_init=_init(1.0), dtype=dt, name="map_layer1")(emb))

    def block(h, name, ch, **kw):
      return UNetBlock(ch, dropout=self.dropout, resample_filter=filt, init_scale=self.init_scale,
                       dtype=dt, name=name, **kw)(h, emb, train)

    # Encoder.
    x = x.astype(dt)
    if self.center_input:
      x = 2.0 * x - 1.0
    aux, cout, skips = x, nf, []
    for level, mult in enumerate(self.ch_mult):
      res = res0 >> level
      tag = f"{res}x{res}"
      if level == 0:
        x = _conv(nf, 3, 1.0, dt, f"enc_{tag}_conv")(x)
      else:
        x = block(x, f"enc_{tag}_down", cout, down=True)
        if encoder == "input_skip":
          aux = _resample(aux, False, True, filt)
          x = x + _conv(cout, 1, 1.0, dt, f"enc_{tag}_aux_skip")(aux)
        elif encoder == "residual":
          x = aux = (x + FusedDownConv(cout, filt, dt, name=f"enc_{tag}_aux_residual")(aux)) \
              * SKIP_SCALE
      skips.append(x)
      for idx in range(self.num_res_blocks):
        cout = nf * mult
        x = block(x, f"enc_{tag}_block{idx}", cout, attention=res in self.attn_resolutions)
        skips.append(x)

    # Decoder.
    out = None
    for level in reversed(range(levels)):
      mult, res = self.ch_mult[level], res0 >> level
      tag = f"{res}x{res}"
      if level == levels - 1:
        x = block(x, f"dec_{tag}_in0", cout, attention=True)
        x = block(x, f"dec_{tag}_in1", cout)
      else:
        x = block(x, f"dec_{tag}_up", cout, up=True)
      for idx in range(self.num_res_blocks + 1):
        cout = nf * mult
        x = block(jnp.concatenate([x, skips.pop()], axis=-1), f"dec_{tag}_block{idx}", cout,
                  attention=idx == self.num_res_blocks and res in self.attn_resolutions)
      if decoder == "output_skip" or level == 0:
        if decoder == "output_skip" and out is not None:
          out = _resample(out, True, False, filt)
        h = nn.silu(_norm(cout, dt, f"dec_{tag}_aux_norm")(x))
        h = _conv(out_ch, 3, self.init_scale, dt, f"dec_{tag}_aux_conv")(h)
        out = h if out is None else h + out
    assert not skips
    return out.astype(out_dtype)


def songunet_cifar_config(arch: str = "ddpmpp") -> dict:
  """EDM's CIFAR-10 networks (``train.py --arch=ddpmpp|ncsnpp``, Karras et al. 2022, Table 7):
  model_channels 128, channel_mult (2, 2, 2), 4 blocks, attention at 16, dropout 0.13,
  augment_dim 9; DDPM++: positional embedding, standard encoder, filter [1, 1] (55,733,891
  parameters); NCSN++: Fourier embedding, residual encoder, FIR [1, 3, 3, 1], channel_mult_noise 2
  (56,397,827 trainable parameters and the 128 frozen Fourier frequencies)."""
  if arch not in ("ddpmpp", "ncsnpp"):
    raise ValueError(f"arch must be 'ddpmpp' or 'ncsnpp', got {arch!r}")
  ncsn = arch == "ncsnpp"
  return dict(name="songunet", nf=128, ch_mult=(2, 2, 2), num_res_blocks=4,
              attn_resolutions=(16,), dropout=0.13,
              embedding_type="fourier" if ncsn else "positional", fourier_scale=16.0,
              channel_mult_noise=2 if ncsn else 1, augment_dim=9, fir=ncsn,
              fir_kernel=(1, 3, 3, 1) if ncsn else (1, 1), progressive="none",
              progressive_input="residual" if ncsn else "none", init_scale=0.0,
              time_embedding_scale=1.0, center_input=False, skip_rescale=True,
              resblock_type="biggan", progressive_combine="sum", conditional=True,
              resamp_with_conv=True, dtype="float32")


def trainable_param_count(params_shapes) -> int:
  """Scalars of a 'params' tree (arrays or ShapeDtypeStructs) less the frozen ``FROZEN`` paths:
  what EDM counts as parameters (its Fourier frequencies are a buffer)."""
  flat = jax.tree_util.tree_flatten_with_path(params_shapes)[0]
  total = 0
  for path, leaf in flat:
    keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
    if keys not in FROZEN:
      total += math.prod(leaf.shape)
  return total
