"""Small U-Net for MNIST-sized images and the offline 8x8 ``digits`` data.

Franzese et al. ("How much is enough? A study on diffusion times in score-based generative models",
Appendix H.2) train on MNIST the score_sde NCSN++-codebase network reduced to 64 features,
ch_mult = (1, 2) and attention at resolution 8, with the VP SDE. We take the remaining settings
from the VP (DDPM++) configuration: BigGAN residual blocks without FIR, no progressive paths,
sinusoidal embedding of 999 t, skip rescaling, zero-initialised last layers. The paper does not
state num_res_blocks; we keep score_sde's 4 for MNIST (an assumption) and use 2 for digits.

Attention is applied at every feature-map size listed in ``attn_resolutions``: on 28x28 MNIST with
ch_mult (1, 2) the sizes are 28 and 14, so attention at 8 is only reached by 32x32 (padded) MNIST
with a third level or by the 8x8 digits; the middle block always has attention. Field list: see
models/ncsnpp.py. Input height/width must be divisible by 2^(len(ch_mult) - 1).
"""
from __future__ import annotations

from typing import Sequence

from models import register_model
from models.ddpmpp import DDPMpp, ddpmpp_cifar_config


@register_model("unet")
class UNet(DDPMpp):
  """DDPM++-style U-Net with the diffusion-time paper's MNIST widths as defaults."""
  nf: int = 64
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (8,)


def unet_mnist_config() -> dict:
  """The diffusion-time paper's MNIST model (28x28x1): nf 64, ch_mult (1, 2), attention at 8."""
  return dict(ddpmpp_cifar_config(), name="unet", nf=64, ch_mult=(1, 2), num_res_blocks=4,
              attn_resolutions=(8,))


def unet_digits_config() -> dict:
  """A tiny U-Net for scikit-learn's 8x8 digits: nf 32, ch_mult (1, 2), 2 blocks, attention at 4."""
  return dict(unet_mnist_config(), nf=32, num_res_blocks=2, attn_resolutions=(4,), dropout=0.1)
