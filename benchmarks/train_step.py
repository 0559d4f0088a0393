"""Train-step throughput (images/s) of DDPM++ cont. and what changes it, measured A/B interleaved.

Every variant runs in its own worker process (XLA_FLAGS and JAX_* switches are read once per
process), built exactly as ``run_lib.train`` builds it (model, ``losses.get_loss_fn``, optimizer,
sharded ``training.make_train_step``) from ``configs/cifar_vp_dsm.py`` at CIFAR shape (32x32x3) with
random data (throughput does not depend on pixel values). Workers compile first; then the parent
asks each in turn (A, B, C, A, B, C, ...) for one untimed step and ``--steps`` timed steps per
round, and reports the median per-step time of each variant over ``--rounds`` rounds, with the
load average of every round: the machine is shared, so only interleaved medians compare.

Studies (``--study``; results in benchmarks/results/train_step_<study>.json, the table of all in
benchmarks/results/train_step.md):

* ``knobs``: the issue-11 small shape (nf 32, 1 res block, batch 16: 1,771,203 parameters) with
  each knob alone: training.prng_impl, JAX's classic threefry, dropout off (the RNG's upper bound),
  XLA:CPU convolution / math options, bfloat16 compute (model.dtype), donated state;
* ``sizes``: default vs ``--best`` (a comma list of knob names) at both published shapes (also nf
  64, 2 res blocks, batch 32: 9,864,771 parameters), against the PyTorch figures of issue 11;
* ``targets``: DSM vs STF (reference batch 4096, Xu et al. Algorithm 1) vs likelihood weighting
  with importance-sampled t (ScoreFlow §5.1) at batch ``--target-batch``;
* ``devices``: 1 vs 4 devices (``--xla_force_host_platform_device_count``) at the same global batch;
* ``conv``: one 3x3 conv layer at the shapes of both models: forward, input and weight gradient
  with XLA:CPU's default (YNNPACK) convolutions and with Eigen's (``eigen_conv``).

  python benchmarks/train_step.py --study knobs [--rounds 5] [--steps 3]
  python benchmarks/train_step.py --study sizes --best rbg,donate
  python benchmarks/train_step.py --report      # only rewrite train_step.md from the JSON files
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
sys.path.insert(0, REPO)
from benchmarks.worker_process import WorkerProcess  # noqa: E402

# The issue-11 shapes (CIFAR-10, DDPM++ VP continuous) and score_sde_pytorch's images/s there
# (PyTorch 2 threads on an idle 2-core CPU, as reported in the issue; not re-measured here).
SHAPES = {"small": dict(nf=32, num_res_blocks=1, batch=16, params=1_771_203, pytorch=79.6),
          "large": dict(nf=64, num_res_blocks=2, batch=32, params=9_864_771, pytorch=24.4)}
_NO_YNN_CONV = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
# XLA:CPU's own default, given explicitly to variants that do not set the flag: importing scorelab
# would otherwise add parallel.CPU_COMPILER_OPTIONS (eigen_conv's effect) to every worker.
_XLA_DEFAULT_YNN = ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_REDUCE")
# Knob name -> the change it makes: config overrides ("section.field": value), environment of the
# worker, donate (make_train_step's donate_argnums for the state).
KNOBS = {
    "default": {},
    "rbg": {"cfg": {"training.prng_impl": "rbg"}},
    "unsafe_rbg": {"cfg": {"training.prng_impl": "unsafe_rbg"}},
    "philox4x32": {"cfg": {"training.prng_impl": "philox4x32"}},
    "threefry_classic": {"env": {"JAX_THREEFRY_PARTITIONABLE": "false"}},
    "no_dropout": {"cfg": {"model.dropout": 0.0}},  # not a knob: the dropout RNG's upper bound
    "eigen_conv": {"xla": [_NO_YNN_CONV]},  # convolutions by Eigen instead of YNNPACK
    "fast_math": {"xla": ["--xla_cpu_enable_fast_math=true"]},
    "bf16": {"cfg": {"model.dtype": "bfloat16"}},
    "donate": {"donate": True},
}


def variant(knobs: list[str], shape: str = "small", **extra) -> dict:
  """Worker spec of the knobs combined (names from KNOBS) at ``shape``; ``extra`` cfg / env."""
  spec = {"name": "+".join(knobs), "shape": shape, "cfg": {}, "env": {}, "xla": [], "donate": False}
  for k in knobs:
    for field in ("cfg", "env"):
      spec[field].update(KNOBS[k].get(field, {}))
    spec["xla"] += KNOBS[k].get("xla", [])
    spec["donate"] |= KNOBS[k].get("donate", False)
  for field in ("cfg", "env"):
    spec[field].update(extra.get(field, {}))
  spec["xla"] += extra.get("xla", [])
  spec["name"] = extra.get("name", spec["name"])
  return spec


# -- worker ------------------------------------------------------------------------------------------
def _worker(spec: dict) -> None:
  """Builds the train step of ``spec``, compiles it, then serves 'N' (one untimed + N timed steps)
  on stdin with one JSON line each on stdout."""
  import importlib
  import math

  import jax
  import numpy as np

  import config_schema
  import datasets
  import losses
  import sde_lib
  import training
  from models import get_model
  from models.utils import init_model, score_fn_from_config

  shape = SHAPES[spec["shape"]]
  config = importlib.import_module("configs.cifar_vp_dsm").get_config()
  config.model.nf = shape["nf"]
  config.model.num_res_blocks = shape["num_res_blocks"]
  config.training.batch_size = config.training.ref_batch_size = shape["batch"]
  for dotted, value in spec["cfg"].items():
    section, field = dotted.split(".")
    config[section][field] = value
  config = config_schema.validate(config)  # the typed sections
  tr = config.training
  sde = sde_lib.get_sde(config.sde)
  model = get_model(config)
  score_fn = score_fn_from_config(config.model, sde, model)
  event = tuple(datasets.dataset_info(config).shape)
  key = jax.random.PRNGKey(0)
  params = init_model(model, key, (1,) + event)
  n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  optimizer = training.make_optimizer(config.optim)
  mesh = training.make_mesh()
  state = training.init_train_state(params, optimizer, key, mesh=mesh)
  step_fn = training.make_train_step(losses.get_loss_fn(config.training, sde, score_fn),
                                     optimizer, config.model.ema_rate, mesh=mesh,
                                     donate=spec["donate"])
  rows = tr.ref_batch_size if tr.target == "stf" else tr.batch_size
  data = np.random.default_rng(0).uniform(-1, 1, (rows,) + event).astype(np.float32)
  batch = training.shard_batch(data, mesh)
  t0 = time.perf_counter()
  state, m = step_fn(state, batch)
  jax.block_until_ready(m["loss"])
  ready = {"compile_s": time.perf_counter() - t0, "params": n_params, "rows_per_step": rows,
           "batch_size": tr.batch_size, "devices": len(jax.devices()), "jax": jax.__version__,
           "loss": float(m["loss"])}
  print("READY " + json.dumps(ready), flush=True)
  for line in sys.stdin:
    n = int(line)
    state, m = step_fn(state, batch)  # untimed: caches warm after another worker ran
    jax.block_until_ready(m["loss"])
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
      state, m = step_fn(state, batch)
    jax.block_until_ready(m["loss"])
    dt, dc = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    print("RESULT " + json.dumps({"step_s": dt, "cpu_s": dc, "loss": float(m["loss"])}),
          flush=True)


# -- parent --------------------------------------------------------------------------------------------
class Worker(WorkerProcess):
  """A worker subprocess of one variant (its own XLA_FLAGS / JAX switches)."""

  def __init__(self, spec: dict, devices: int = 1):
    env = dict(os.environ, **spec["env"])
    flags = list(spec["xla"]) + [f"--xla_force_host_platform_device_count={devices}"]
    if not any(f.startswith("--xla_cpu_experimental_ynn_fusion_type=") for f in flags):
      flags.append(_XLA_DEFAULT_YNN)
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    self.spec = spec
    super().__init__(__file__, ["--worker", json.dumps(spec)], f"train_step_{spec['name']}", env,
                     REPO)

  def run(self, steps: int) -> dict:
    return self.request(str(steps))


def interleaved(specs: list[dict], rounds: int, steps: int, devices: list[int] | None = None) -> dict:
  """Starts one worker per spec (compiling one at a time), then ``rounds`` rounds of A, B, C, ...;
  per variant: the median step time, images/s at it, and every round's time; plus the load
  average (1, 5, 15 min) before compiling, after compiling and after every round. The CPU time
  of the worker per step (all threads, ``time.process_time``) is recorded too: on a shared
  machine it inflates less than wall time, a second view of the same comparison."""
  devices = devices or [1] * len(specs)
  out = {"load_average_start": os.getloadavg(), "rounds": rounds, "steps_per_round": steps,
         "variants": {}}
  workers = []
  for spec, dev in zip(specs, devices):
    try:
      w = Worker(spec, dev)
      workers.append(w)
      out["variants"][spec["name"]] = dict(spec, **w.info, step_s_rounds=[], cpu_s_rounds=[])
      print(f"compiled {spec['name']}: {json.dumps(w.info)}", flush=True)
    except RuntimeError as e:  # e.g. an XLA option this jaxlib rejects
      out["variants"][spec["name"]] = dict(spec, error=str(e)[-1500:])
      print(f"FAILED {spec['name']}: {str(e)[-500:]}", flush=True)
  out["load_average_compiled"] = os.getloadavg()
  out["load_average_rounds"] = []
  for r in range(rounds):
    for w in workers:
      got = w.run(steps)
      out["variants"][w.spec["name"]]["step_s_rounds"].append(got["step_s"])
      out["variants"][w.spec["name"]]["cpu_s_rounds"].append(got["cpu_s"])
    out["load_average_rounds"].append(os.getloadavg())
    print(f"round {r + 1}/{rounds}: load {os.getloadavg()}", flush=True)
  for w in workers:
    w.close()
    v = out["variants"][w.spec["name"]]
    v["step_s_median"] = statistics.median(v["step_s_rounds"])
    v["cpu_s_median"] = statistics.median(v["cpu_s_rounds"])  # CPU seconds (all threads) / step
    v["images_per_s"] = v["batch_size"] / v["step_s_median"]
  out["load_average_end"] = os.getloadavg()
  return out


def _relative(result: dict, base: str) -> None:
  """images/s of each variant / the base variant's (medians), in place."""
  b = result["variants"][base].get("images_per_s")
  for v in result["variants"].values():
    if b and "images_per_s" in v:
      v["speedup_vs_" + base] = v["images_per_s"] / b


def study_knobs(args) -> dict:
  names = args.knobs.split(",")  # "a+b": knobs a and b together
  res = interleaved([variant(n.split("+")) for n in names], args.rounds, args.steps)
  _relative(res, "default")
  return res


def study_sizes(args) -> dict:
  best = args.best.split(",")
  specs = []
  for shape in ("small", "large"):
    specs += [variant(["default"], shape, name=f"default@{shape}"),
              variant(best, shape, name=f"{'+'.join(best)}@{shape}")]
  res = interleaved(specs, args.rounds, args.steps)
  for shape, s in SHAPES.items():
    for v in res["variants"].values():
      if v["shape"] == shape and "images_per_s" in v:
        v["pytorch_images_per_s"] = s["pytorch"]
        v["ratio_vs_pytorch"] = v["images_per_s"] / s["pytorch"]
        assert v["params"] == s["params"], (v["name"], v["params"], s["params"])
  return res


def study_targets(args) -> dict:
  best = args.best.split(",")
  b = args.target_batch
  cfg = {"training.batch_size": b}
  specs = [variant(best, name="dsm", cfg=dict(cfg, **{"training.ref_batch_size": b})),
           variant(best, name="stf", cfg=dict(cfg, **{"training.target": "stf",
                                                      "training.ref_batch_size": args.ref_batch})),
           variant(best, name="likelihood_is",
                   cfg=dict(cfg, **{"training.ref_batch_size": b,
                                    "training.weighting": "likelihood_is"}))]
  res = interleaved(specs, args.rounds, args.steps)
  v = res["variants"]
  res["stf_over_dsm_step_time"] = v["stf"]["step_s_median"] / v["dsm"]["step_s_median"]
  res["likelihood_is_over_dsm_step_time"] = (v["likelihood_is"]["step_s_median"]
                                            / v["dsm"]["step_s_median"])
  res["stf_over_dsm_per_round"] = [s / d for s, d in zip(v["stf"]["step_s_rounds"],
                                                           v["dsm"]["step_s_rounds"])]
  _cpu_ratios(res)
  return res


def _cpu_ratios(res: dict) -> None:
  """The targets study's ratios from CPU time per step (medians and per round), in place."""
  v = res["variants"]
  for name in ("stf", "likelihood_is"):
    res[f"{name}_over_dsm_cpu_time"] = v[name]["cpu_s_median"] / v["dsm"]["cpu_s_median"]
  res["stf_over_dsm_cpu_per_round"] = [s / d for s, d in zip(v["stf"]["cpu_s_rounds"],
                                                               v["dsm"]["cpu_s_rounds"])]


def _conv_worker() -> None:
  """Per 3x3 conv layer of DDPM++ (NHWC, stride 1, SAME): median ms of the forward pass, the input
  gradient and the weight gradient, one JSON line (under this process's XLA_FLAGS)."""
  import jax
  from jax import lax

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def timed(f, *a, n=10):
    f = jax.jit(f)
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(5):
      t0 = time.perf_counter()
      for _ in range(n):
        r = f(*a)
      jax.block_until_ready(r)
      ts.append(1e3 * (time.perf_counter() - t0) / n)
    return statistics.median(ts)

  out = {}
  for b, h, c in CONV_LAYERS:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x, dy = jax.random.normal(k1, (b, h, h, c)), jax.random.normal(k2, (b, h, h, c))
    w = 0.1 * jax.random.normal(k3, (3, 3, c, c))
    out[f"B{b}_H{h}_C{c}"] = {
        "forward": timed(conv, x, w),
        "input_grad": timed(lambda d: jax.vjp(conv, x, w)[1](d)[0], dy),
        "weight_grad": timed(lambda d: jax.vjp(conv, x, w)[1](d)[1], dy)}
  print("RESULT " + json.dumps(out), flush=True)


# (batch, height = width, channels) of the 3x3 convs at the two shapes (nf 32 and 64 levels).
CONV_LAYERS = ((16, 32, 32), (16, 16, 64), (16, 8, 64), (32, 32, 64), (32, 16, 128))


def study_conv(args) -> dict:
  """Per-layer conv costs with XLA:CPU's default (YNNPACK convolutions) and with Eigen's, each in
  its own process, alternated ``args.rounds`` times (medians of the rounds)."""
  variants = {"default": [], "eigen_conv": KNOBS["eigen_conv"]["xla"]}
  rounds = {name: [] for name in variants}
  load = []
  for _ in range(args.rounds):
    for name, flags in variants.items():
      env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
      text = subprocess.run([sys.executable, os.path.abspath(__file__), "--conv-worker"], env=env,
                            capture_output=True, text=True, check=True, cwd=REPO).stdout
      rounds[name].append(json.loads(text.split("RESULT ", 1)[1]))
    load.append(os.getloadavg())
  med = {name: {layer: {op: statistics.median(r[layer][op] for r in rs) for op in rs[0][layer]}
                for layer in rs[0]} for name, rs in rounds.items()}
  return {"rounds": args.rounds, "load_average_rounds": load, "ms_median": med,
          "ms_rounds": rounds}


def study_devices(args) -> dict:
  best = args.best.split(",")
  specs = [variant(best, name="1_device"), variant(best, name="4_devices")]
  res = interleaved(specs, args.rounds, args.steps, devices=[1, 4])
  v = res["variants"]
  res["scaling_4_over_1"] = v["4_devices"]["images_per_s"] / v["1_device"]["images_per_s"]
  return res


# -- report ------------------------------------------------------------------------------------------
def _load(x) -> str:
  return "/".join(f"{a:.1f}" for a in x)


def _rounds_load(res: dict) -> str:
  ones = [la[0] for la in res.get("load_average_rounds", [])]
  return f"{min(ones):.1f}–{max(ones):.1f}" if ones else "–"


def _conv_table(res: dict) -> list[str]:
  med = res["ms_median"]
  lines = [f"## conv: one 3x3 conv layer, ms (median of {res['rounds']} alternated runs, load "
           f"{_rounds_load(res)})", "",
           "| B, H=W, C | forward YNNPACK / Eigen | input grad YNNPACK / Eigen | "
           "weight grad YNNPACK / Eigen |", "|---|---|---|---|"]
  for layer in med["default"]:
    cells = [f"{med['default'][layer][op]:.2f} / {med['eigen_conv'][layer][op]:.2f}"
             for op in ("forward", "input_grad", "weight_grad")]
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  return lines + [""]


def report() -> str:
  """benchmarks/results/train_step.md from every train_step_<study>.json present."""
  lines = ["# Train-step throughput (benchmarks/train_step.py)", "",
           "Medians of interleaved rounds (A, B, A, B, ...), each variant in its own process; "
           "images/s = training batch / median step time. Load = 1-min load average over the "
           "rounds (2-core machine, shared).", ""]
  order = ("knobs", "sizes", "targets", "devices", "conv")
  paths = sorted(glob.glob(os.path.join(RESULTS, "train_step_*.json")),
                 key=lambda q: (order.index(os.path.basename(q)[11:-5].split("_")[0]), q))
  for path in paths:  # train_step_<study>[_<label>].json (a labelled rerun of a study)
    with open(path) as f:
      res = json.load(f)
    if res["study"] == "conv":
      lines += _conv_table(res)
      continue
    lines += [f"## {os.path.basename(path)[11:-5]}: `{' '.join(res['argv'])}` ({res['rounds']} "
              f"rounds x {res['steps_per_round']} steps, load {_rounds_load(res)}; at start "
              f"{_load(res['load_average_start'])})", ""]
    cols = ["variant", "shape", "params", "batch", "compile s", "median step ms", "images/s",
            "vs default", "vs PyTorch", "median CPU ms / step"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, v in res["variants"].items():
      if "error" in v:
        lines.append(f"| {name} | failed: {v['error'].splitlines()[-1][:80]} |")
        continue
      rel = next((f"{v[k]:.3f}x" for k in v if k.startswith("speedup_vs_")), "")
      pt = (f"{v['ratio_vs_pytorch']:.2f}x of {v['pytorch_images_per_s']}" if
            "ratio_vs_pytorch" in v else "")
      lines.append(f"| {name} | {v['shape']} | {v['params']:,} | {v['batch_size']} "
                   f"(rows {v['rows_per_step']}, {v['devices']} dev) | {v['compile_s']:.0f} | "
                   f"{1e3 * v['step_s_median']:.1f} | {v['images_per_s']:.1f} | {rel} | {pt} | "
                   f"{1e3 * v.get('cpu_s_median', float('nan')):.0f} |")
    extra = {k: v for k, v in res.items() if k.endswith(("_step_time", "_cpu_time", "_4_over_1"))}
    if extra:
      lines += [""] + [f"* {k}: {v:.3f}" for k, v in extra.items()]
    lines.append("")
  text = "\n".join(lines)
  with open(os.path.join(RESULTS, "train_step.md"), "w") as f:
    f.write(text)
  return text


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--study", choices=("knobs", "sizes", "targets", "devices", "conv"))
  p.add_argument("--knobs", default=",".join(KNOBS),
                 help="knobs study: comma list of KNOBS names, 'a+b' combines two")
  p.add_argument("--best", default="default", help="knob names combined for sizes/targets/devices")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per round")
  p.add_argument("--target-batch", type=int, default=128, help="targets study: training batch B")
  p.add_argument("--ref-batch", type=int, default=4096, help="targets study: STF reference batch")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--conv-worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--report", action="store_true", help="only rewrite train_step.md")
  args = p.parse_args(argv)
  if args.worker:
    return _worker(json.loads(args.worker))
  if args.conv_worker:
    return _conv_worker()
  if args.study:
    t0 = time.time()
    res = {"knobs": study_knobs, "sizes": study_sizes, "targets": study_targets,
           "devices": study_devices, "conv": study_conv}[args.study](args)
    res.update(study=args.study, argv=sys.argv[1:], wall_s=time.time() - t0,
               load_average=os.getloadavg(), cpu_count=os.cpu_count(), date=time.ctime())
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"train_step_{args.study}.json"), "w") as f:
      json.dump(res, f, indent=2)
  print(report())


if __name__ == "__main__":
  main()
