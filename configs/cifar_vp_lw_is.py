"""CIFAR-10, VP SDE, DDPM++ cont., likelihood weighting g(t)^2 with importance-sampled time
(Song et al. 2021, "Maximum Likelihood Training of Score-Based Diffusion Models", §5.1 and Table 2:
score_sde's DDPM++ training setup, horizontal flips, 1.3M iterations; data NOT dequantized in training,
as score_flow's configs/default_cifar10_configs.py (data.uniform_dequantization = False); eval
dequantizes uniformly or variationally); the bound with 1000 time samples per datapoint (App. B)."""
import ml_collections

from configs.cifar_vp_dsm import get_config as vp_dsm_config


def get_config() -> ml_collections.ConfigDict:
  config = vp_dsm_config()
  config.training.weighting = "likelihood_is"
  config.data.uniform_dequantization = False  # score_flow's default_cifar10_configs.py
  config.eval.bound_time_samples = 1000  # ScoreFlow App. B: 1000 time samples per datapoint
  config.sampling.method = "ode"  # ScoreFlow reports p_ODE likelihoods and ODE-sample FIDs
  config.sampling.c = 0.0
  config.eval.bpd = True
  config.eval.bound = True
  return config
