"""Compile time with JAX's persistent compilation cache: a cold run, then a warm one.

Each job runs twice, each time in a fresh process (nothing kept in memory between them), with
``SCORELAB_COMPILATION_CACHE_DIR`` pointing at a directory that is empty before the first run
(``parallel.set_compilation_cache``). Compile time is the sum of JAX's backend-compile durations
(``/jax/core/compile/backend_compile_duration``: XLA's compile, or the cache read on a hit);
tracing and lowering to StableHLO (not cached) are reported apart. Goal: warm ≤ 20 % of cold.

Jobs:

* ``train_step``: the published-size train step (``configs/cifar_vp_stf.py``: DDPM++ cont. deep,
  STF target), built as ``--mode=train`` builds it, one step at batch ``--batch`` (reference batch
  ``--ref_batch``) on random CIFAR-shaped data;
* ``digits_eval``: the digits main job's ``--mode=eval`` (``configs/digits_vp.py``) on a workdir
  trained for ``--train_iters`` steps beforehand (not timed), the test split shrunk to
  ``--eval_split``, run in-process through ``main.py``.

  python benchmarks/compile_cache.py [--jobs train_step,digits_eval]

Writes benchmarks/results/compile_cache.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.worker_process import write_report  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
_YNN = "xla_cpu_experimental_ynn_fusion_type"
EVENTS = {"compile_s": "/jax/core/compile/backend_compile_duration",
          "trace_s": "/jax/core/compile/jaxpr_trace_duration",
          "lower_s": "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "cache_read_s": "/jax/compilation_cache/cache_retrieval_time_sec"}


# -- child: one job in this process, the durations summed ------------------------------------------
def _train_step(args) -> None:
  import jax
  import numpy as np

  import datasets
  import losses
  import sde_lib
  import training
  from configs import cifar_vp_stf
  from models import get_model
  from models.utils import init_model, score_fn_from_config
  config = cifar_vp_stf.get_config()
  config.training.batch_size, config.training.ref_batch_size = args.batch, args.ref_batch
  import config_schema
  cfg = config_schema.validate(config)  # the typed sections the science takes
  sde = sde_lib.get_sde(cfg.sde)
  model = get_model(cfg)
  score_fn = score_fn_from_config(cfg.model, sde, model)
  event = tuple(datasets.dataset_info(config).shape)
  optimizer = training.make_optimizer(cfg.optim)
  mesh = training.make_mesh()
  key = jax.random.PRNGKey(0)
  state = training.replicate(training.init_train_state(init_model(model, key, (1,) + event),
                                                       optimizer, key), mesh)
  step = training.make_train_step(losses.get_loss_fn(cfg.training, sde, score_fn), optimizer,
                                  cfg.model.ema_rate, mesh=mesh)
  rows = np.random.default_rng(0).uniform(-1, 1, (args.ref_batch,) + event).astype(np.float32)
  state, metrics = step(state, training.shard_batch(rows, mesh))
  jax.block_until_ready(metrics["loss"])


def _digits_eval(args) -> None:
  from absl import app
  sys.argv = ["main.py", "--config=configs/digits_vp.py", "--mode=eval", f"--workdir={args.workdir}",
              f"--config.eval.split={args.eval_split}"]
  import main
  try:
    app.run(main.main)
  except SystemExit as e:
    if e.code:
      raise


def _child(args) -> None:
  import jax
  durations = {k: 0.0 for k in EVENTS}
  names = {v: k for k, v in EVENTS.items()}

  def listen(event, duration, **_):
    if event in names:
      durations[names[event]] += duration
  jax.monitoring.register_event_duration_secs_listener(listen)
  t0 = time.perf_counter()
  {"train_step": _train_step, "digits_eval": _digits_eval}[args.child](args)
  durations["wall_s"] = time.perf_counter() - t0
  print("RESULT " + json.dumps(durations), flush=True)


# -- parent ----------------------------------------------------------------------------------------
def _run_child(job: str, cache: str, args, extra: list[str]) -> dict:
  env = dict(os.environ, SCORELAB_COMPILATION_CACHE_DIR=cache, JAX_PLATFORMS="cpu")
  if args.ynn_fusion_type is not None:  # the user's value: parallel.compiler_options leaves it
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --{_YNN}={args.ynn_fusion_type}".strip()
  cmd = [sys.executable, os.path.abspath(__file__), "--child", job, "--batch", str(args.batch),
         "--ref_batch", str(args.ref_batch), "--eval_split", args.eval_split] + extra
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
  if p.returncode or line is None:
    raise RuntimeError(f"{job} failed:\n{p.stderr[-3000:]}")
  return json.loads(line[len("RESULT "):])


def _train_digits(workdir: str, iters: int) -> None:
  cmd = [sys.executable, "main.py", "--config=configs/digits_vp.py", "--mode=train",
         f"--workdir={workdir}", f"--config.training.n_iters={iters}",
         f"--config.training.snapshot_freq={iters}", "--compilation_cache_dir="]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)


def measure(args) -> dict:
  out = {"load_average_start": os.getloadavg(), "jobs": {}}
  with tempfile.TemporaryDirectory(prefix="compile_cache_") as tmp:
    for job in args.jobs.split(","):
      extra = []
      if job == "digits_eval":
        workdir = os.path.join(tmp, "digits")
        _train_digits(workdir, args.train_iters)
        extra = ["--workdir", workdir]
      cache = os.path.join(tmp, f"xla_{job}")
      runs = {}
      for run in ("cold", "warm"):
        runs[run] = dict(_run_child(job, cache, args, extra), load_average=os.getloadavg())
        print(f"{job} {run}: {json.dumps(runs[run])}", flush=True)
      entries = [f for f in os.listdir(cache) if f.endswith("-cache")]
      out["jobs"][job] = dict(runs, cache_entries=len(entries), cache_mb=sum(
          os.path.getsize(os.path.join(cache, f)) for f in entries) / 2**20,
          warm_over_cold_compile=runs["warm"]["compile_s"] / runs["cold"]["compile_s"])
  out["settings"] = {"ynn_fusion_type": args.ynn_fusion_type, "batch": args.batch,
                     "ref_batch": args.ref_batch,
                     "eval_split": args.eval_split, "train_iters": args.train_iters}
  out["load_average_end"] = os.getloadavg()
  return out


def markdown(out: dict) -> str:
  rows = ["| job | run | compile s | trace + lower s | wall s | load (1 min) |",
          "|---|---|---|---|---|---|"]
  for job, r in out["jobs"].items():
    for run in ("cold", "warm"):
      x = r[run]
      rows.append(f"| {job} | {run} | {x['compile_s']:.1f} | {x['trace_s'] + x['lower_s']:.1f} | "
                  f"{x['wall_s']:.1f} | {x['load_average'][0]:.1f} |")
    rows.append(f"| {job} | warm / cold compile | **{100 * r['warm_over_cold_compile']:.1f} %** | "
                f"| | {r['cache_entries']} entries, {r['cache_mb']:.0f} MB |")
  return "\n".join(rows) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--jobs", default="train_step,digits_eval")
  p.add_argument("--batch", type=int, default=2, help="train_step: rows trained on")
  p.add_argument("--ref_batch", type=int, default=8, help="train_step: STF reference batch")
  p.add_argument("--train_iters", type=int, default=20, help="digits_eval: steps trained first")
  p.add_argument("--eval_split", default="test[:20]", help="digits_eval: the split evaluated")
  p.add_argument("--ynn_fusion_type", default=None,
                 help=f"XLA_FLAGS --{_YNN}= for the children (default: scorelab's "
                      "parallel.CPU_COMPILER_OPTIONS), e.g. LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
  p.add_argument("--out", default=os.path.join(RESULTS, "compile_cache.json"))
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    _child(args)
    return
  write_report(measure(args), args.out, markdown)


if __name__ == "__main__":
  main()
