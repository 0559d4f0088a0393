"""Parameter counts of the image score networks, via jax.eval_shape (nothing is materialized).

    python benchmarks/param_counts.py [--out counts.json]

Prints a JSON object {config name: {"params": int, "millions": float, "input": [H, W, C]}}; with
``--out`` also writes it to that file. The CIFAR-10 counts reproduce score_sde's published model
sizes (DDPM++ cont. 61.80M, NCSN++ cont. 62.75M; deep variants 106.63M / 107.59M); the exact
integers are asserted in tests/test_image_models.py against a closed-form count. EDM's SongUNet
(models/songunet.py) at EDM's CIFAR-10 settings has EDM's counts, 55,733,891 (DDPM++) and
56,397,827 (NCSN++; "edm_params" leaves out the 128 frozen Fourier frequencies, an EDM buffer),
asserted in tests/test_edm_pickle.py.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models.ddpmpp import DDPMpp, ddpmpp_cifar_config, ddpmpp_deep_cifar_config  # noqa: E402
from models.ncsnpp import NCSNpp, ncsnpp_cifar_config, ncsnpp_deep_cifar_config  # noqa: E402
from models.songunet import SongUNet, songunet_cifar_config, trainable_param_count  # noqa: E402
from models.unet import UNet, unet_digits_config, unet_mnist_config  # noqa: E402

CONFIGS = {
    "ddpmpp_cifar10": (DDPMpp, ddpmpp_cifar_config, (32, 32, 3)),
    "ddpmpp_deep_cifar10": (DDPMpp, ddpmpp_deep_cifar_config, (32, 32, 3)),
    "ncsnpp_cifar10": (NCSNpp, ncsnpp_cifar_config, (32, 32, 3)),
    "ncsnpp_deep_cifar10": (NCSNpp, ncsnpp_deep_cifar_config, (32, 32, 3)),
    "edm_ddpmpp_cifar10": (SongUNet, functools.partial(songunet_cifar_config, "ddpmpp"),
                           (32, 32, 3)),
    "edm_ncsnpp_cifar10": (SongUNet, functools.partial(songunet_cifar_config, "ncsnpp"),
                           (32, 32, 3)),
    "unet_mnist": (UNet, unet_mnist_config, (28, 28, 1)),
    "unet_digits": (UNet, unet_digits_config, (8, 8, 1)),
}


def param_shapes(model, event_shape):
  """The 'params' tree of ``model`` for inputs (1, *event_shape), as ShapeDtypeStructs."""
  x = jnp.zeros((1, *event_shape))
  shapes = jax.eval_shape(lambda k: model.init(k, x, jnp.zeros((1,))), jax.random.PRNGKey(0))
  return shapes["params"]


def count_params(model, event_shape) -> int:
  """Number of scalars in the 'params' collection of ``model`` for inputs (1, *event_shape)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(
      param_shapes(model, event_shape)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="", help="optional JSON file to write")
  args = parser.parse_args()
  result = {}
  for name, (cls, cfg_fn, event) in CONFIGS.items():
    shapes = param_shapes(cls.from_config(cfg_fn()), event)
    n = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))
    result[name] = {"params": n, "millions": round(n / 1e6, 2), "input": list(event)}
    if cls is SongUNet:  # what EDM counts (its Fourier frequencies are a buffer)
      result[name]["edm_params"] = trainable_param_count(shapes)
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
