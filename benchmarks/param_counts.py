"""Parameter counts of the image score networks, via jax.eval_shape (nothing is materialized).

    python benchmarks/param_counts.py [--out counts.json]

Prints a JSON object {config name: {"params": int, "millions": float, "input": [H, W, C]}}; with
``--out`` also writes it to that file. The CIFAR-10 counts reproduce score_sde's published model
sizes (DDPM++ cont. 61.80M, NCSN++ cont. 62.75M; deep variants 106.63M / 107.59M); the exact
integers are asserted in tests/test_image_models.py against a closed-form count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models.ddpmpp import DDPMpp, ddpmpp_cifar_config, ddpmpp_deep_cifar_config  # noqa: E402
from models.ncsnpp import NCSNpp, ncsnpp_cifar_config, ncsnpp_deep_cifar_config  # noqa: E402
from models.unet import UNet, unet_digits_config, unet_mnist_config  # noqa: E402

CONFIGS = {
    "ddpmpp_cifar10": (DDPMpp, ddpmpp_cifar_config, (32, 32, 3)),
    "ddpmpp_deep_cifar10": (DDPMpp, ddpmpp_deep_cifar_config, (32, 32, 3)),
    "ncsnpp_cifar10": (NCSNpp, ncsnpp_cifar_config, (32, 32, 3)),
    "ncsnpp_deep_cifar10": (NCSNpp, ncsnpp_deep_cifar_config, (32, 32, 3)),
    "unet_mnist": (UNet, unet_mnist_config, (28, 28, 1)),
    "unet_digits": (UNet, unet_digits_config, (8, 8, 1)),
}


def count_params(model, event_shape) -> int:
  """Number of scalars in the 'params' collection of ``model`` for inputs (1, *event_shape)."""
  x = jnp.zeros((1, *event_shape))
  shapes = jax.eval_shape(lambda k: model.init(k, x, jnp.zeros((1,))), jax.random.PRNGKey(0))
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="", help="optional JSON file to write")
  args = parser.parse_args()
  result = {}
  for name, (cls, cfg_fn, event) in CONFIGS.items():
    n = count_params(cls.from_config(cfg_fn()), event)
    result[name] = {"params": n, "millions": round(n / 1e6, 2), "input": list(event)}
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
