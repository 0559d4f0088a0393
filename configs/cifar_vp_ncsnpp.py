"""CIFAR-10, VP SDE, NCSN++ cont.: score_sde's configs/vp/cifar10_ncsnpp_continuous.py (the network
of Franzese et al., "How much is enough?", App. H.2, Table 3): NCSN++ with FIR resampling and the
residual progressive input, positional (sinusoidal) embedding of 999 t, VP noise parameterization,
EMA 0.9999, score_sde's default weighting sigma_t^2 and data in [-1, 1]. Its published checkpoint
(vp/cifar10_ncsnpp_continuous) imports with --mode=import."""
import ml_collections

from configs.cifar_vp_dsm import get_config as vp_dsm_config
from configs.default_image import ncsnpp_cont_model


def get_config() -> ml_collections.ConfigDict:
  config = vp_dsm_config()
  model = config.model
  ncsnpp_cont_model(model)  # FIR, progressive_input 'residual'
  model.embedding_type = "positional"  # the VP config's embedding (VE's is Fourier)
  model.time_embedding_scale = 999.0  # score_sde's continuous VP labels 999 t
  model.parameterization = "noise"
  model.ema_rate = 0.9999
  config.sampling.method, config.sampling.solver = "sde", "euler"  # 'pc', euler_maruyama, no corrector
  return config
