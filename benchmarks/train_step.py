"""Train-step throughput (images/s) of the jitted, sharded train step: DSM vs STF target.

For each config (default: digits_vp and cifar_vp_stf at tiny width) it builds the real model, loss,
optimizer and ``losses.make_train_step`` exactly as ``run_lib.train`` does, feeds random data of the
dataset's shape (throughput does not depend on pixel values), and times ``--steps`` steps after a
compile + warm-up step, for ``training.target='dsm'`` and ``'stf'`` with reference batch
``--ref-batch``. The STF paper reports ~20% overhead on GPU for CIFAR-10 (n = 4096, B = 128).

  python benchmarks/train_step.py [--configs digits_vp,cifar_vp_stf] [--batch 64] [--ref-batch 1024]
      [--nf 32] [--steps 20] [--out benchmarks/results/train_step.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import datasets  # noqa: E402
import losses  # noqa: E402
import sde_lib  # noqa: E402
from models import get_model  # noqa: E402
from models.utils import init_model, score_fn_from_config  # noqa: E402


def throughput(config, steps: int) -> dict:
  """Images/s (training images, i.e. batch_size per step) of the train step for ``config``."""
  sde = sde_lib.get_sde(config)
  model = get_model(config)
  score_fn = score_fn_from_config(config, sde, model)
  shape = tuple(datasets.dataset_info(config).shape)
  key = jax.random.PRNGKey(0)
  params = init_model(model, key, (1,) + shape)
  optimizer = losses.make_optimizer(config)
  mesh = losses.make_mesh()
  state = losses.init_train_state(params, optimizer, key, mesh=mesh)
  step_fn = losses.make_train_step(losses.get_loss_fn(config, sde, score_fn), optimizer,
                                   config.model.ema_rate, mesh=mesh)
  tr = config.training
  rows = tr.ref_batch_size if tr.target == "stf" else tr.batch_size
  batch = losses.shard_batch(np.random.default_rng(0).uniform(-1, 1, (rows,) + shape)
                             .astype(np.float32), mesh)
  t0 = time.time()
  state, m = step_fn(state, batch)
  jax.block_until_ready(m["loss"])
  compile_s = time.time() - t0
  t0 = time.time()
  for _ in range(steps):
    state, m = step_fn(state, batch)
  jax.block_until_ready(m["loss"])
  run_s = time.time() - t0
  return {"target": tr.target, "batch_size": tr.batch_size, "rows_per_step": rows,
          "compile_s": compile_s, "step_s": run_s / steps,
          "images_per_s": tr.batch_size * steps / run_s}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="digits_vp,cifar_vp_stf")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--ref-batch", type=int, default=1024)
  p.add_argument("--nf", type=int, default=32, help="model width for the image models (tiny)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "train_step.json"))
  args = p.parse_args(argv)
  results = {"devices": [str(d) for d in jax.devices()], "load_average": os.getloadavg(),
             "cases": []}
  for name in args.configs.split(","):
    for target in ("dsm", "stf"):
      config = importlib.import_module(f"configs.{name}").get_config()
      config.model.nf = args.nf
      config.training.batch_size = args.batch
      config.training.target = target
      config.training.ref_batch_size = args.ref_batch if target == "stf" else args.batch
      r = throughput(config, args.steps)
      r["config"] = name
      results["cases"].append(r)
      print(json.dumps(r), flush=True)
    dsm, stf = results["cases"][-2:]
    results[f"{name}_stf_overhead"] = dsm["images_per_s"] / stf["images_per_s"] - 1.0
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps({k: v for k, v in results.items() if k.endswith("overhead")}, indent=2))
  return results


if __name__ == "__main__":
  main()
