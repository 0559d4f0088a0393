"""DDPM++ score network (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
Appendix H.1 / Table 3, the VP/sub-VP model; Song et al. 2021b "Maximum Likelihood Training of
Score-Based Diffusion Models", §6 "Baseline" and "Deep").

DDPM++ is the NCSN++ backbone (models/ncsnpp.py) with: no FIR (nearest upsampling / average
pooling inside BigGAN residual blocks), no progressive input/output paths, sinusoidal embedding of
the time label 999 t, dropout 0.1, skip rescaling, zero-initialised last layers. The network output
is the noise prediction (config ``model.parameterization = 'noise'``: score = -h / sigma_t, exactly
score_sde's continuous VP/sub-VP score function). Field list: see models/ncsnpp.py.
"""
from __future__ import annotations

from models import register_model
from models.ncsnpp import NCSNpp, ncsnpp_cifar_config


@register_model("ddpmpp")
class DDPMpp(NCSNpp):
  """NCSN++ module with the DDPM++ cont. CIFAR-10 defaults (score_sde
  configs/vp/cifar10_ddpmpp_continuous.py)."""
  fir: bool = False
  progressive: str = "none"
  progressive_input: str = "none"
  embedding_type: str = "positional"
  time_embedding_scale: float = 999.0


def ddpmpp_cifar_config() -> dict:
  """DDPM++ cont. (VP / sub-VP) on CIFAR-10 (score_sde configs/vp/cifar10_ddpmpp_continuous.py):
  the NCSN++ config without FIR and progressive paths, with the positional embedding of 999 t;
  61,804,419 parameters (benchmarks/param_counts.py)."""
  return dict(ncsnpp_cifar_config(), name="ddpmpp", fir=False, progressive="none",
              progressive_input="none", embedding_type="positional", time_embedding_scale=999.0)


def ddpmpp_deep_cifar_config() -> dict:
  """DDPM++ cont. (deep): 8 residual blocks per resolution (score_sde
  configs/subvp/cifar10_ddpmpp_deep_continuous.py): 106,632,579 parameters."""
  return dict(ddpmpp_cifar_config(), num_res_blocks=8)
