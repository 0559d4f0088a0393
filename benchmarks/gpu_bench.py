"""Throughput of the published-size programs on whatever accelerator JAX sees (run by gpu.sh).

Phases, each on every local device (the CLI's mesh), each timed apart from its compilation, in an
overall time box (``--budget-s``; a phase that would start with less than ``--min-phase-s`` left is
recorded as skipped):

* ``train_{dsm,stf}_{f32,bf16}``: ``modes/train.py``'s step of DDPM++ cont. (61.8M, CIFAR-10
  shape) at batch ``--train-batch`` (128) with the DSM target and with the STF target at reference
  batch ``--ref-batch`` (4096), in float32 and with ``model.dtype='bfloat16'`` (the model's own
  option: bfloat16 activations and matmuls / convolutions, float32 parameters, optimizer and loss).
  Compiled ahead of time (lowering and XLA compile timed), ``--warmup`` steps, then steps until
  ``--train-steps`` or ``--measure-s``: images/s = batch / median step time; the compiled
  program's memory analysis and the device's peak bytes in use are recorded;
* ``bpd``: ``--mode=eval``'s per-example probability-flow ODE likelihood (Hutchinson, Dopri5,
  rtol = atol = 1e-5) of DDPM++ through ``likelihood.dataset_bits_per_dim`` on random 8-bit
  images, ``--eval-batches`` batches of ``--eval-batch``; examples/s and mean NFE from the batches
  after the first (whose time less theirs is the compile time); score evaluations/s = examples/s x
  NFE, which does not depend on how hard the ODE is (fresh weights give an easier ODE than trained
  ones: examples/s of a trained model ~ evaluations/s / its NFE);
* ``pc``: ``run_lib.generate`` (the ``--mode=sample`` path) with NCSN++ cont. (VE), PC sampling,
  one Langevin corrector step, ``--pc-steps`` steps (score_sde: 1000; cost is linear in steps);
* ``heun``: ``run_lib.generate`` with the EDM DDPM++ and Heun's 18 steps (35 NFE);
* ``peer``: ``benchmarks/peer_score_sde.py`` (score_sde_pytorch side by side) when it exists,
  torch imports and ``$PEER_DIR`` points to a score_sde_pytorch checkout; otherwise "skipped: why".

Writes ``<out-dir>/gpu_bench_<time>.json`` (device, JAX version, every phase's timings and compile
times; rewritten after every phase) and a markdown summary beside it. ``--tiny``: a tiny network,
8x8 images and a few steps, for the CPU smoke test (seconds). JAX's persistent compilation cache
is switched off unless ``--keep-cache``, so compile times are cold.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import memory, programs  # noqa: E402

PHASES = ("train_dsm_f32", "train_stf_f32", "train_dsm_bf16", "train_stf_bf16", "bpd", "pc", "heun",
          "peer")
PEER_SCRIPT = os.path.join(programs.REPO, "benchmarks", "peer_score_sde.py")
# Full size (the papers') and tiny (CPU smoke test) settings of each option.
SIZES = {
    "full": dict(train_batch=128, ref_batch=4096, train_steps=30, warmup=2, measure_s=20.0,
                 eval_batch=64, eval_batches=3, sample_batch=64, sample_batches=3, pc_steps=100,
                 heun_steps=18, max_steps=4096, budget_s=450.0, min_phase_s=25.0),
    "tiny": dict(train_batch=4, ref_batch=8, train_steps=3, warmup=1, measure_s=5.0, eval_batch=4,
                 eval_batches=2, sample_batch=4, sample_batches=2, pc_steps=2, heun_steps=2,
                 max_steps=64, budget_s=3600.0, min_phase_s=0.0),
}


def device_info() -> dict:
  d = jax.devices()[0]
  return dict(platform=d.platform, device_kind=d.device_kind, device_count=jax.device_count(),
              jax=jax.__version__, jaxlib=importlib.metadata.version("jaxlib"),
              default_matmul_precision=jax.config.jax_default_matmul_precision,
              compilation_cache=bool(jax.config.jax_enable_compilation_cache))


def peak_device_bytes() -> int | None:
  """The first device's peak bytes in use so far (GPU / TPU allocators), None where unknown."""
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _sync(tree) -> None:
  jax.block_until_ready(tree)


def train_phase(target: str, dtype: str, a, mesh) -> dict:
  """AOT compile of the train step, warm-up, then timed steps (each synchronised)."""
  config = programs.get_config("ddpmpp_stf" if target == "stf" else "ddpmpp", a.tiny,
                               model__dtype=dtype, training__ref_batch_size=a.ref_batch)
  prog = programs.train_program(config, a.train_batch, mesh)
  compiled, compile_times = memory.compile_timed(prog)
  state, batch = prog.make_args()
  for _ in range(a.warmup):
    state, m = compiled(state, batch)
  _sync(m)
  times, start = [], time.perf_counter()
  while len(times) < a.train_steps and (time.perf_counter() - start < a.measure_s or len(times) < 2):
    s = time.perf_counter()
    state, m = compiled(state, batch)
    _sync(m)
    times.append(time.perf_counter() - s)
  step = statistics.median(times)
  return dict(model="ddpmpp", target=target, dtype=dtype, params=prog.params,
              batch=a.train_batch, rows_per_step=int(batch.shape[0]), **compile_times,
              steps=len(times), step_s_median=step, step_s_all=times,
              images_per_s=a.train_batch / step, loss=float(m["loss"]),
              memory_analysis=memory.memory_stats(compiled))


class BatchClock:
  """Stands in for ``progress.Progress`` (same interface) and records when each batch ended."""
  last: "BatchClock | None" = None

  def __init__(self, name: str, total=None, unit: str = "items", **_):
    self.name, self.ends, self.sizes = name, [], []
    BatchClock.last = self

  def __enter__(self):
    self.t0 = time.perf_counter()
    return self

  def update(self, n: int = 1, **_) -> None:
    self.ends.append(time.perf_counter())
    self.sizes.append(n)

  def __exit__(self, *exc) -> None:
    pass


def batch_rates(t0: float, ends: list[float], sizes: list[int]) -> dict:
  """Compile estimate (first batch less the median later batch), items/s of the later batches."""
  spans = np.diff([t0] + ends)
  later = float(np.median(spans[1:])) if len(spans) > 1 else float(spans[0])
  return dict(batches=len(spans), batch_s_all=[float(s) for s in spans],
              first_batch_s=float(spans[0]), compile_s=float(max(spans[0] - later, 0.0)),
              batch_s_median=later, items_per_s=float(sizes[-1] / later))


def bpd_phase(a, mesh) -> dict:
  """``--mode=eval``'s bits/dim (probability-flow ODE) of DDPM++ with fresh weights."""
  import datasets
  import likelihood
  import parallel
  from modes import evaluate
  config = programs.get_config("ddpmpp", a.tiny, eval__max_steps=a.max_steps)
  _, _, event, _, init, count = programs._network(config)
  params = init()
  model = programs.score_model(config, params)
  logp_fn, _ = evaluate._likelihood_fns(config, model)
  rng = np.random.default_rng(0)
  n = a.eval_batch

  def batches():
    for i in range(a.eval_batches):
      yield datasets.EvalBatch(rng.integers(0, 256, (n,) + event).astype(np.int32),
                               np.ones(n, bool), np.arange(i * n, (i + 1) * n))

  clock = BatchClock("bpd")
  with clock:
    out = likelihood.dataset_bits_per_dim(parallel.per_example(logp_fn), params, batches(),
                                          jax.random.PRNGKey(0), num_levels=256,
                                          centered=bool(config.data.centered), mesh=mesh,
                                          on_batch=clock.update)
  r = batch_rates(clock.t0, clock.ends, clock.sizes)
  nfe = float(np.mean(out["nfe"][n:])) if len(out["nfe"]) > n else float(np.mean(out["nfe"]))
  rate = r.pop("items_per_s")
  return dict(model="ddpmpp", params=count, batch=n, divergence=str(config.eval.divergence),
              rtol=float(config.eval.rtol), mean_nfe=nfe, bpd=out["bpd"], n_failed=out["n_failed"],
              examples_per_s=rate, score_evals_per_s=rate * nfe, **r)


def sample_phase(model_name: str, a, mesh) -> dict:
  """``run_lib.generate`` (the --mode=sample path) of fresh weights, per-batch times."""
  import run_lib
  values = dict(sampling__batch_size=a.sample_batch)
  values["sampling__n_steps"] = a.pc_steps if model_name == "ncsnpp" else a.heun_steps
  config = programs.get_config(model_name, a.tiny, **values)
  _, _, _, _, init, count = programs._network(config)
  model = programs.score_model(config, init())
  with mock.patch.object(run_lib, "Progress", BatchClock):
    x, nfe = run_lib.generate(run_lib.validate_config(config), model, a.sample_batch * a.sample_batches,
                              jax.random.PRNGKey(0), mesh=mesh)
  clock = BatchClock.last
  r = batch_rates(clock.t0, clock.ends, clock.sizes)
  return dict(model=model_name, params=count, method=str(config.sampling.method),
              n_steps=int(config.sampling.n_steps), batch=a.sample_batch, nfe_per_image=nfe,
              images_per_s=r.pop("items_per_s"), finite=bool(np.all(np.isfinite(x))), **r)


def peer_phase(out_dir: str, remaining_s: float) -> dict:
  """benchmarks/peer_score_sde.py side by side, or why not."""
  peer_dir = os.environ.get("PEER_DIR", "")
  if not os.path.exists(PEER_SCRIPT):
    return {"skipped": "benchmarks/peer_score_sde.py does not exist in this checkout"}
  if importlib.util.find_spec("torch") is None:
    return {"skipped": "PyTorch is not installed"}
  if not peer_dir or not os.path.isdir(peer_dir):
    return {"skipped": f"PEER_DIR={peer_dir!r} is not a score_sde_pytorch checkout"}
  help_text = subprocess.run([sys.executable, PEER_SCRIPT, "--help"], capture_output=True,
                             text=True, timeout=120).stdout
  flag = re.search(r"--peer[-_]?(?:dir|path|root)?\b", help_text)
  out = os.path.join(out_dir, "peer_score_sde.json")
  cmd = [sys.executable, PEER_SCRIPT] + ([flag.group(0), peer_dir] if flag else []) + (
      ["--out", out] if "--out" in help_text else [])
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(remaining_s, 1.0))
  except subprocess.TimeoutExpired:
    return {"skipped": f"time box: peer still running after {remaining_s:.0f} s", "cmd": cmd}
  res = {"cmd": cmd, "returncode": proc.returncode, "stdout_tail": proc.stdout[-3000:],
         "stderr_tail": proc.stderr[-2000:]}
  if os.path.exists(out):
    with open(out) as f:
      res["result"] = json.load(f)
  return res


def run_phase(name: str, a, mesh, out_dir: str, remaining_s: float) -> dict:
  if name.startswith("train_"):
    _, target, dtype = name.split("_")
    return train_phase(target, {"f32": "float32", "bf16": "bfloat16"}[dtype], a, mesh)
  if name == "bpd":
    return bpd_phase(a, mesh)
  if name in ("pc", "heun"):
    return sample_phase({"pc": "ncsnpp", "heun": "edm"}[name], a, mesh)
  return peer_phase(out_dir, remaining_s)


def markdown(res: dict) -> str:
  """The run's summary table."""
  d = res["device"]
  lines = [f"# gpu_bench {'(tiny, CPU smoke run)' if res['tiny'] else ''}: {d['device_kind']} "
           f"x{d['device_count']} ({d['platform']}), JAX {d['jax']}, {res['date']}", "",
           "| phase | throughput | compile s | detail |", "|---|---|---|---|"]
  for name, r in res["phases"].items():
    if "skipped" in r or "error" in r:
      lines.append(f"| {name} | – | – | {r.get('skipped') or 'error: ' + r['error'][-200:]} |")
    elif name.startswith("train_"):
      lines.append(f"| {name} | {r['images_per_s']:.1f} images/s | {r['compile_s']:.1f} "
                   f"(+{r['lower_s']:.1f} lowering) | batch {r['batch']} (rows {r['rows_per_step']}),"
                   f" median step {1e3 * r['step_s_median']:.1f} ms over {r['steps']} steps |")
    elif name == "bpd":
      lines.append(f"| bpd | {r['examples_per_s']:.2f} examples/s | {r['compile_s']:.1f} | "
                   f"mean NFE {r['mean_nfe']:.0f}, {r['score_evals_per_s']:.0f} score evals/s, "
                   f"batch {r['batch']} |")
    elif name in ("pc", "heun"):
      lines.append(f"| {name} | {r['images_per_s']:.2f} images/s | {r['compile_s']:.1f} | "
                   f"{r['method']}, {r['n_steps']} steps, NFE {r['nfe_per_image']:.0f}, "
                   f"batch {r['batch']} |")
    else:
      lines.append(f"| {name} | see peer_score_sde.json | – | return code {r.get('returncode')} |")
  lines += ["", f"Total {res['wall_s']:.0f} s; compile s of bpd / pc / heun = first batch less "
            "the median later batch."]
  return "\n".join(lines) + "\n"


def write(res: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(res, f, indent=2)
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(markdown(res))


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out-dir", default=os.path.join(programs.REPO, "benchmarks", "results", "gpu"))
  p.add_argument("--tiny", action="store_true", help="tiny network / batches / steps (CPU smoke)")
  p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {PHASES}")
  p.add_argument("--keep-cache", action="store_true",
                 help="leave JAX's persistent compilation cache as configured")
  for k, v in SIZES["full"].items():
    p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None,
                   help=f"default {v} (tiny: {SIZES['tiny'][k]})")
  a = p.parse_args(argv)
  for k, v in SIZES["tiny" if a.tiny else "full"].items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  bad = set(a.phases.split(",")) - set(PHASES)
  if bad:
    p.error(f"--phases: unknown {sorted(bad)}; choose from {PHASES}")
  return a


def main(argv=None) -> dict:
  """Runs the phases in order within the time box; returns (and writes) the result."""
  import parallel
  a = parse(argv)
  if not a.keep_cache:
    jax.config.update("jax_enable_compilation_cache", False)
  os.makedirs(a.out_dir, exist_ok=True)
  start = time.time()
  path = os.path.join(a.out_dir, time.strftime("gpu_bench_%Y%m%dT%H%M%S.json"))
  mesh = parallel.make_mesh()
  res = dict(device=device_info(), tiny=a.tiny, argv=sys.argv[1:] if argv is None else argv,
             options={k: v for k, v in vars(a).items()}, date=time.ctime(),
             load_average_start=os.getloadavg(), phases={}, wall_s=0.0, json=path)
  for name in a.phases.split(","):
    remaining = a.budget_s - (time.time() - start)
    if remaining < max(a.min_phase_s, 1e-9):
      res["phases"][name] = {"skipped": f"time box: {remaining:.0f} s of --budget-s left"}
      continue
    print(f"[gpu_bench] {name}: started ({remaining:.0f} s left)", flush=True)
    t0, c0 = time.time(), time.process_time()
    try:
      r = run_phase(name, a, mesh, a.out_dir, remaining)
    except Exception as e:  # noqa: BLE001  (one failed phase must not lose the others)
      r = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    r.update(phase_wall_s=time.time() - t0, phase_cpu_s=time.process_time() - c0,
             peak_device_bytes=peak_device_bytes(),
             load_average=os.getloadavg())
    res["phases"][name] = r
    res["wall_s"] = time.time() - start
    write(res, path)
    print(f"[gpu_bench] {name}: done in {r['phase_wall_s']:.1f} s: "
          + json.dumps({k: v for k, v in r.items() if isinstance(v, (int, float, str))})[:400],
          flush=True)
  res["wall_s"] = time.time() - start
  write(res, path)
  print(markdown(res))
  return res


if __name__ == "__main__":
  from absl import logging
  logging.set_verbosity(logging.INFO)  # progress lines of the library
  main()
