"""Evaluation throughput: examples/s of bits/dim (probability-flow ODE) and of the ScoreFlow bound
on 1 and on N devices (``parallel.map_dataset``: per-example solves under shard_map).

One process with N devices (on CPU: ``--xla_force_host_platform_device_count``, set here when
XLA_FLAGS does not set it); the same examples, keys and model are evaluated on meshes of 1 and N
devices, interleaved (1, N, 1, N, ...; medians); the first batch of each pass (it compiles) is
timed apart, examples/s are of the later batches. The per-example NFE
and bits/dim of the two meshes are compared too (they must agree). On a CPU the simulated
devices share the same cores, so the ratio measures the overhead of sharding, not a speed-up;
on a GPU/TPU host the ideal ratio is N.

  python benchmarks/eval_throughput.py [--config digits_vp] [--devices 4] [--examples 120]
      [--rounds 3] [--out benchmarks/results/eval_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "4")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={n}").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import datasets  # noqa: E402
import likelihood  # noqa: E402
import parallel  # noqa: E402
import run_lib  # noqa: E402
import sde_lib  # noqa: E402


def _model(config):
  """A ScoreModel of the config with freshly initialised parameters (throughput only)."""
  cfg = run_lib.validate_config(config)
  sde = sde_lib.get_sde(cfg.sde)
  _, score_fn, state = run_lib.init_state(cfg, sde, jax.random.PRNGKey(0))
  return run_lib.ScoreModel(sde=sde, score_fn=lambda x, t: score_fn(state.params, x, t),
                            event_shape=tuple(datasets.dataset_info(config).shape), step=0,
                            prior=sde.prior(), params=state.params, apply=score_fn)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="digits_vp")
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--examples", type=int, default=120)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "eval_throughput.json"))
  args = p.parse_args()
  import importlib
  from modes.evaluate import _likelihood_fns
  config = importlib.import_module(f"configs.{args.config}").get_config()
  config.eval.divergence = "hutchinson"
  model = _model(config)
  info = datasets.dataset_info(config)
  levels, _, _ = datasets.load_levels(config, str(config.eval.split))
  levels = levels[:args.examples]
  logp_fn, neg_bound_fn = _likelihood_fns(config, model)
  meshes = {1: parallel.make_mesh(jax.devices()[:1]),
            args.devices: parallel.make_mesh(jax.devices()[:args.devices])}

  def run(fn, mesh):
    """(seconds per example after the first batch, which includes the compile; first batch s; r)."""
    stamps = [time.perf_counter()]
    r = likelihood.dataset_bits_per_dim(
        parallel.per_example(fn), model.params,
        datasets.array_eval_batches(levels, int(config.eval.batch_size)), jax.random.PRNGKey(1),
        num_levels=info.num_grey_levels, centered=info.centered, mesh=mesh,
        on_batch=lambda n: stamps.append(time.perf_counter()))
    per_example = (stamps[-1] - stamps[1]) / (len(levels) - int(config.eval.batch_size))
    return per_example, stamps[1] - stamps[0], r

  out = {"config": args.config, "examples": len(levels), "eval_batch_size":
         int(config.eval.batch_size), "backend": jax.default_backend(),
         "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
         "load_avg_1min_start": os.getloadavg()[0]}
  for name, fn in (("bpd_ode", logp_fn), ("bound", neg_bound_fn)):
    compile_s, first, times = {}, {}, {d: [] for d in meshes}
    for r in range(args.rounds):
      for d, mesh in meshes.items():
        per_example, first_batch_s, res = run(fn, mesh)
        times[d].append(per_example)
        compile_s.setdefault(d, first_batch_s)
        first.setdefault(d, res)
    med = {d: float(np.median(t)) for d, t in times.items()}
    a, b = first[1], first[args.devices]
    out[name] = {
        "examples_per_s": {str(d): 1.0 / med[d] for d in meshes},
        "seconds_per_example": {str(d): t for d, t in times.items()},
        "first_batch_s_incl_compile": {str(d): s for d, s in compile_s.items()},
        "scaling": med[1] / med[args.devices],
        "bpd": {str(d): first[d]["bpd"] for d in meshes},
        "max_abs_bpd_difference": float(np.nanmax(np.abs(a["bpd_per_example"] -
                                                         b["bpd_per_example"]))),
    }
    if "nfe" in a:
      out[name]["mean_nfe"] = float(np.mean(a["nfe"]))
      out[name]["nfe_identical"] = bool(np.array_equal(a["nfe"], b["nfe"]))
    print(name, json.dumps(out[name]["examples_per_s"]), "scaling", out[name]["scaling"],
          flush=True)
  out["load_avg_1min_end"] = os.getloadavg()[0]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
