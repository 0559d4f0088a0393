"""Memory and compile budgets of the published-size programs, without a GPU: XLA's memory analysis.

For every model (``programs.MODELS``: DDPM++ 61.8M and deep, NCSN++ 62.8M, EDM CIFAR, CelebA 64,
DDPM++ with the STF target), program (``train`` step, per-example ``likelihood``, ``sample``) and
per-device batch, the program is lowered and compiled on ONE device from abstract arguments
(``jax.ShapeDtypeStruct`` via ``jax.eval_shape``: nothing of full size is allocated) and
``compiled.memory_analysis()`` is recorded: argument, output, alias, temporary and generated-code
bytes, and the peak = argument + output + temp - alias (XLA's own ``peak_memory_in_bytes`` is
recorded beside it). From two or more batches the script fits bytes = a + b * batch (least
squares) and gives the largest per-device batch whose peak fits ``--usable-fraction`` of 16 / 40 /
80 GiB, read off the compiled peaks joined by straight lines (``fit``). Compile
times (lowering and XLA compilation apart) are recorded too; JAX's persistent compilation cache is
switched off in this process so they are cold compiles.

  python benchmarks/memory.py                                   # train step of every model
  python benchmarks/memory.py --programs likelihood,sample --models ddpmpp,ncsnpp --batches 4,16
  python benchmarks/memory.py --tiny --batches 2,4 --out /tmp/m.json   # a seconds-long smoke run
  python benchmarks/memory.py --report                          # only rewrite memory.md
  python benchmarks/memory.py --accum --fast-compile            # micro-batches, grad_accum_steps
  python benchmarks/memory.py --dequantizer --fast-compile      # ScoreFlow's dequantizer fit step

``--accum``: for the published CIFAR-10 trainings (DDPM++ cont., EDM's DDPM++ and NCSN++) the
accumulated train step (``train_accum``: training.grad_accum_steps = 2 micro-batches of each
``--batches`` size) is compiled; the largest per-device micro-batch under 16 / 40 / 80 GiB is
read off its peaks as above, and the training.grad_accum_steps that reach the papers' global
batches (``programs.PAPER_BATCH``: score_sde 128, EDM 512) with it; into memory_accum.json / .md.

``--dequantizer``: one step of ScoreFlow's variational dequantizer fit (``programs.
dequantizer_program``: ``--mode=fit_dequantizer``'s eq. 13 step through the frozen DDPM++ cont. VP
of configs/cifar_vp_lw_is.py, ``dequantizer.*`` as configs/default.py) per dequantizer batch; the
program ``dequantizer_noremat`` is the same step lowered with ``jax.checkpoint`` as the identity
(what the per-draw remat of ``likelihood._time_integral`` / ``eps_correction`` saves); into
memory_dequantizer.json / .md.

Results accumulate in ``--out`` (default benchmarks/results/memory.json; entries of the same
model, program, batch and dtype are replaced), the table in memory.md beside it. How far a CPU
analysis stands in for a GPU's: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import programs  # noqa: E402

RESULTS = os.path.join(programs.REPO, "benchmarks", "results")
GIB = 2**30
CAPACITIES_GIB = (16, 40, 80)
# JAX on GPU preallocates 75% of the device memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION);
# the rest holds the CUDA context, cuDNN / cuBLAS workspaces and the allocator's slack.
USABLE_FRACTION = 0.75
STATS = ("argument", "output", "alias", "temp", "generated_code")
# XLA:CPU's LLVM code generation at -O0: buffer assignment, hence the memory analysis, is done
# before it and does not change (checked: identical bytes for the tiny and the 61.8M train step),
# while compiling takes ~2.5x less time. The compile times of such entries are not reported.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# --accum: the published CIFAR-10 trainings (score_sde DDPM++ cont., EDM DDPM++ / NCSN++).
ACCUM_MODELS = "ddpmpp,edm_ddpmpp,edm_ncsnpp"
# --dequantizer: ScoreFlow's CIFAR-10 model (configs/cifar_vp_lw_is.py) and its dequantizer fit.
DEQUANTIZER_MODELS = "scoreflow"


def memory_stats(compiled) -> dict:
  """Bytes of ``compiled.memory_analysis()`` per device, and the peak (argument + output + temp -
  alias: what is live at once when arguments stay alive across the call)."""
  m = compiled.memory_analysis()
  out = {f"{k}_bytes": int(getattr(m, f"{k}_size_in_bytes")) for k in STATS}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  out["xla_peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  return out


def measure(model: str, program: str, batch: int, tiny: bool, dtype: str, mesh,
            fast_compile: bool = False) -> dict:
  """Lowers and compiles one program from abstract arguments; its memory stats and times.
  ``fast_compile``: LLVM at -O0 (``FAST_COMPILE``), same memory analysis, not its compile time."""
  config = programs.get_config(model, tiny, model__dtype=dtype)
  prog = programs.PROGRAMS[program](config, batch, mesh)
  compiled, times = compile_timed(prog, FAST_COMPILE if fast_compile else None)
  accum = programs.ACCUM_STEPS if program == "train_accum" else 1
  extra = ({f"dequantizer_{k}": config.dequantizer[k] for k in (
      "batch_size", "bound_time_samples", "flow_steps", "flow_levels", "flow_hidden",
      "context_features")} if program.startswith("dequantizer") else {})
  return dict(model=model, program=program, batch=batch, dtype=dtype, tiny=tiny,
              params=prog.params, grad_accum_steps=accum, fast_compile=fast_compile, **times, **memory_stats(compiled),
              load_average=os.getloadavg(), **extra)


def compile_timed(prog, options: dict | None = None):
  """(executable, lowering and compile seconds, wall and CPU of this process) of a Program
  compiled from its abstract arguments."""
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = prog.fn.lower(*prog.abstract)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile(options)
  t2, c2 = time.perf_counter(), time.process_time()
  return compiled, dict(lower_s=t1 - t0, compile_s=t2 - t1, lower_cpu_s=c1 - c0,
                        compile_cpu_s=c2 - c1)


def fit(rows: list[dict], usable: float, capacities=CAPACITIES_GIB) -> dict:
  """bytes = a + b * batch by least squares over ``rows`` (>= 2 batches) and its max relative
  residual; and the largest per-device batch whose peak fits ``usable`` x capacity (GiB), read off
  the measured peaks joined by straight lines (beyond the largest compiled batch: the slope of the
  last two, marked as extrapolated). XLA:CPU's bytes per example grow with the batch (see
  benchmarks/README.md), so the piecewise curve, not the single line, decides."""
  batch = np.array([r["batch"] for r in rows], float)
  peak = np.array([r["peak_bytes"] for r in rows], float)
  b, a = np.polyfit(batch, peak, 1)
  fits, extrapolated = {}, {}
  for cap in capacities:
    room = usable * cap * GIB
    i = int(np.searchsorted(peak, room))  # first measured peak above the room
    j = min(max(i, 1), len(batch) - 1)  # the segment (j - 1, j) that holds or extends to it
    slope = (peak[j] - peak[j - 1]) / (batch[j] - batch[j - 1])
    best = batch[j - 1] + (room - peak[j - 1]) / slope if slope > 0 else np.inf
    fits[f"{cap}GiB"] = max(int(best), 0) if np.isfinite(best) else None
    extrapolated[f"{cap}GiB"] = bool(i == len(batch) or i == 0)
  return dict(fixed_bytes=float(a), bytes_per_example=float(b),
              max_rel_residual=float(np.max(np.abs(a + b * batch - peak) / peak)),
              batches=[int(v) for v in batch], max_batch=fits, extrapolated=extrapolated,
              usable_fraction=usable)


def summarize(entries: list[dict], usable: float) -> dict:
  """Fits of every (model, program, dtype, tiny) group with at least two distinct batches."""
  groups: dict[str, list] = {}
  for e in entries:
    groups.setdefault(group_key(e), []).append(e)
  out = {}
  for key, rows in groups.items():
    rows = sorted(rows, key=lambda r: r["batch"])
    if len({r["batch"] for r in rows}) >= 2:
      out[key] = fit(rows, usable)
  return out


def group_key(e: dict) -> str:
  return f"{e['model']}/{e['program']}/{e['dtype']}" + ("/tiny" if e["tiny"] else "")


def _gib(v: float) -> str:
  return f"{v / GIB:.2f}"


def markdown(result: dict) -> str:
  """The table of memory.md / benchmarks/README.md."""
  fits, entries = result["fits"], result["entries"]
  lines = [
      "| model | program | dtype | params | per-device batch: peak GiB (temp GiB) | compile s "
      "wall (CPU) | fit: fixed GiB + MiB / example | max batch 16 / 40 / 80 GiB |",
      "|---|---|---|---|---|---|---|---|"]
  groups: dict[str, list] = {}
  for e in entries:
    groups.setdefault(group_key(e), []).append(e)
  for key, rows in groups.items():
    rows = sorted(rows, key=lambda r: r["batch"])
    r0 = rows[0]
    cells = ", ".join(f"{r['batch']}: {_gib(r['peak_bytes'])} ({_gib(r['temp_bytes'])})"
                      for r in rows)
    cold = [r for r in rows if not r.get("fast_compile")]
    comp = (f"{np.mean([r['compile_s'] + r['lower_s'] for r in cold]):.0f}" if cold else "(-O0)")
    cpu = [r["compile_cpu_s"] + r["lower_cpu_s"] for r in cold if "compile_cpu_s" in r]
    comp += f" ({np.mean(cpu):.0f} CPU s)" if cpu else ""
    f = fits.get(key)
    fit_cell = (f"{_gib(f['fixed_bytes'])} + {f['bytes_per_example'] / 2**20:.1f}"
                + (f" (off by up to {100 * f['max_rel_residual']:.0f} %)"
                   if f["max_rel_residual"] > 0.01 else "") if f else "one batch only")
    caps = " / ".join(f"{v}{'*' if f['extrapolated'][k] else ''}"
                      for k, v in f["max_batch"].items()) if f else "–"
    name = r0["model"] + (" (tiny)" if r0["tiny"] else "")
    lines.append(f"| {name} | {r0['program']} | {r0['dtype']} | {r0['params'] / 1e6:.2f}M | "
                 f"{cells} | {comp} | {fit_cell} | {caps} |")
  usable = result.get("usable_fraction", USABLE_FRACTION)
  lines += ["", f"Peak = argument + output + temp - alias bytes of XLA:{result.get('backend', 'cpu')}"
            f"'s memory analysis on one device; fit: least-squares line over the compiled "
            f"batches; max batch: largest per-device batch whose peak is <= {usable:.2f} x "
            "capacity (JAX's default GPU preallocation), read off the compiled batches' peaks "
            "joined by straight lines (* = beyond the compiled batches: extrapolated with the "
            "last segment's slope). Compile s = lowering + XLA compilation, cold (no "
            "persistent cache), wall (CPU seconds of the process), on the machine and load "
            "recorded in memory.json; (-O0) = compiled with --fast-compile, time not comparable."]
  return "\n".join(lines) + "\n"


def accum_steps_for(global_batch: int, micro: int | None) -> int | None:
  """The fewest micro-batches k dividing ``global_batch`` whose micro-batch global_batch / k is
  at most ``micro`` (None: not even one example fits)."""
  if not micro:
    return None
  return next(k for k in range(1, global_batch + 1) if global_batch % k == 0
              and global_batch // k <= micro)


def accum_plan(result: dict) -> dict:
  """Per model with a ``train_accum`` fit: its paper's global batch and, per capacity, the
  largest micro-batch and the training.grad_accum_steps (and micro-batch) that reach it."""
  plan = {}
  for key, f in result["fits"].items():
    model, program = key.split("/")[:2]
    if program != "train_accum":
      continue
    g = programs.PAPER_BATCH.get(model)
    caps = {}
    for cap, micro in f["max_batch"].items():
      k = accum_steps_for(g, micro) if g else None
      caps[cap] = dict(max_micro_batch=micro, extrapolated=f["extrapolated"][cap],
                       grad_accum_steps=k, micro_batch=g // k if k else None)
    plan[key] = dict(model=model, global_batch=g, capacities=caps)
  return plan


def accum_markdown(result: dict) -> str:
  """The table of memory_accum.md: micro-batches and training.grad_accum_steps per capacity."""
  plan = result.get("accum_plan", {})
  if not plan:
    return ""
  entries = {group_key(e): e for e in result["entries"]}
  lines = ["", "## Gradient accumulation: micro-batch per device and training.grad_accum_steps", "",
           "| model | params | paper's global batch | largest micro-batch 16 / 40 / 80 GiB | "
           "grad_accum_steps x micro-batch 16 / 40 / 80 GiB |", "|---|---|---|---|---|"]
  for key, p in plan.items():
    e = entries[key]
    caps = p["capacities"].values()
    micro = " / ".join(f"{c['max_micro_batch']}{'*' if c['extrapolated'] else ''}" for c in caps)
    steps = " / ".join(f"{c['grad_accum_steps']} x {c['micro_batch']}" if c["grad_accum_steps"]
                       else "–" for c in caps)
    name = p["model"] + (" (tiny)" if e["tiny"] else "")
    lines.append(f"| {name}: {programs.MODELS[p['model']][2]} | {e['params'] / 1e6:.2f}M | "
                 f"{p['global_batch']} | {micro} | {steps} |")
  lines += ["", "Micro-batch: the per-device batch of one accumulation step, the largest whose "
            "compiled peak (train step with training.grad_accum_steps = "
            f"{programs.ACCUM_STEPS}, XLA:{result.get('backend', 'cpu')}'s memory analysis) fits "
            "the usable fraction of the capacity, as in the table above; grad_accum_steps: the "
            "fewest k dividing the paper's global batch (score_sde 128, EDM 512) with global / k "
            "<= that micro-batch, on one device (on D devices a micro-batch is spread over all of "
            "them, global / (k D) rows each: take the fewest k with global / (k D) <= the "
            "micro-batch). Only the global batch's input rows (B x 3072 floats, 6 MiB at 512) "
            "grow with k. * = extrapolated beyond the compiled micro-batches."]
  return "\n".join(lines) + "\n"


def dequantizer_markdown(result: dict) -> str:
  """The remat comparison of memory_dequantizer.md: per model and dequantizer batch, the peak of
  the fit step with the per-draw ``jax.checkpoint`` and without it (where compiled)."""
  rows: dict[tuple, dict] = {}
  for e in result["entries"]:
    if e["program"] in ("dequantizer", "dequantizer_noremat"):
      rows.setdefault((e["model"], e["tiny"], e["dtype"], e["batch"]), {})[e["program"]] = e
  if not rows:
    return ""
  lines = ["", "## Dequantizer fit: with and without the per-draw remat", "",
           "| model | dequantizer batch | bound_time_samples | peak GiB (temp) with jax.checkpoint | "
           "peak GiB (temp) without | without / with |", "|---|---|---|---|---|---|"]
  for (model, tiny, _, batch), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][3])):
    w, wo = r.get("dequantizer"), r.get("dequantizer_noremat")
    cell = lambda e: f"{_gib(e['peak_bytes'])} ({_gib(e['temp_bytes'])})" if e else "–"  # noqa: E731
    ratio = f"{wo['peak_bytes'] / w['peak_bytes']:.1f}x" if w and wo else "–"
    n_t = (w or wo).get("dequantizer_bound_time_samples", "?")
    lines.append(f"| {model}{' (tiny)' if tiny else ''} | {batch} | {n_t} | {cell(w)} | "
                 f"{cell(wo)} | {ratio} |")
  lines += ["", "One step of --mode=fit_dequantizer (ScoreFlow eq. 13 with the eq. 39 bound of the "
            "frozen score network: bound_time_samples draws each of the time integral and of the "
            "eps correction, sequential in lax.map; Adam on the dequantizer's parameters). 'with': "
            "each draw under jax.checkpoint (likelihood._time_integral / eps_correction), the "
            "backward pass recomputes one draw at a time; 'without': the same program lowered "
            "with jax.checkpoint replaced by the identity, so every draw's activations of the "
            "score network are kept for the backward pass. Peak as in the table above."]
  return "\n".join(lines) + "\n"


def _load(path: str) -> dict:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {"entries": []}


def _key(e: dict) -> tuple:
  return e["model"], e["program"], e["batch"], e["dtype"], e["tiny"]


def merge(result: dict, other: dict) -> dict:
  """``result`` with ``other``'s entries added (replacing those of the same key) and its
  run fields where ``result`` has none."""
  keys = {_key(e) for e in other["entries"]}
  merged = dict(other, **result)
  merged["entries"] = [e for e in result["entries"] if _key(e) not in keys] + other["entries"]
  return merged


def write(result: dict, out: str) -> str:
  """memory.json at ``out`` and memory.md beside it (same stem)."""
  result["fits"] = summarize(result["entries"], result["usable_fraction"])
  result["accum_plan"] = accum_plan(result)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  text = markdown(result) + accum_markdown(result) + dequantizer_markdown(result)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write("# Memory and compile budgets (benchmarks/memory.py)\n\n" + text)
  return text


def run(args) -> dict:
  """Compiles every (model, program, batch) of ``args`` in turn, merging into ``args.out``."""
  from progress import Progress
  import parallel
  mesh = parallel.make_mesh(jax.devices()[:1])
  result = _load(args.out)
  result.update(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                jax=jax.__version__, usable_fraction=args.usable_fraction, cpu_count=os.cpu_count())
  jobs = [(m, p, b) for m in args.models.split(",") for p in args.programs.split(",")
          for b in sorted(int(v) for v in args.batches.split(","))]
  with Progress("compile", len(jobs), "programs", every_s=0.0) as prog:
    for m, p, b in jobs:
      e = measure(m, p, b, args.tiny, args.dtype, mesh, args.fast_compile)
      result = merge(result, {"entries": [e]})
      write(result, args.out)  # after every compile: an interrupted run keeps what it did
      prog.update(1, model=m, program=p, batch=b, compile_s=round(e["compile_s"], 1),
                  peak_GiB=round(e["peak_bytes"] / GIB, 3))
      print(json.dumps({k: e[k] for k in ("model", "program", "batch", "lower_s", "compile_s",
                                          "peak_bytes", "temp_bytes")}), flush=True)
  return result


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=None, help=f"comma list of {sorted(programs.MODELS)} "
                 "(default ddpmpp,ddpmpp_deep,ncsnpp,edm,celeba64; --accum: "
                 f"{ACCUM_MODELS})")
  p.add_argument("--programs", default=None,
                 help="comma list of train,likelihood,sample,train_accum,dequantizer,"
                 "dequantizer_noremat (default train; --accum: train_accum; --dequantizer: "
                 "dequantizer)")
  p.add_argument("--batches", default=None, help="per-device (micro-)batches to compile (>= 2 "
                 "to fit; default 8,32; --accum: 32,128)")
  p.add_argument("--accum", action="store_true", help="the published CIFAR-10 trainings' "
                 "micro-batches per memory size and the training.grad_accum_steps reaching the "
                 "papers' global batches (--out default memory_accum.json)")
  p.add_argument("--dequantizer", action="store_true", help="ScoreFlow's variational "
                 "dequantizer fit step (programs dequantizer, dequantizer_noremat) of the frozen "
                 "DDPM++ cont. VP (--out default memory_dequantizer.json)")
  p.add_argument("--dtype", default="float32", help="model.dtype (compute dtype)")
  p.add_argument("--tiny", action="store_true", help="tiny network and 8x8 images (smoke test)")
  p.add_argument("--usable-fraction", type=float, default=USABLE_FRACTION)
  p.add_argument("--out", default=None, help="default benchmarks/results/memory.json "
                 "(--accum: memory_accum.json)")
  p.add_argument("--fast-compile", action="store_true",
                 help="LLVM -O0: the same memory analysis sooner, compile times not reported")
  p.add_argument("--merge", default="", help="with --report: comma list of JSON files whose "
                 "entries are merged into --out")
  p.add_argument("--report", action="store_true", help="only rewrite the markdown from --out")
  p.add_argument("--keep-cache", action="store_true",
                 help="leave JAX's persistent compilation cache as configured (default: off)")
  args = p.parse_args(argv)
  defaults = (ACCUM_MODELS, "train_accum", "32,128", "memory_accum.json") if args.accum else (
      DEQUANTIZER_MODELS, "dequantizer", "1,4,16", "memory_dequantizer.json") if (
      args.dequantizer) else ("ddpmpp,ddpmpp_deep,ncsnpp,edm,celeba64", "train", "8,32",
                              "memory.json")
  for name, value in zip(("models", "programs", "batches", "out"), defaults):
    if getattr(args, name) is None:
      setattr(args, name, os.path.join(RESULTS, value) if name == "out" else value)
  for name in args.models.split(","):
    programs.get_config(name)  # unknown names fail before any compilation
  for name in args.programs.split(","):
    if name not in programs.PROGRAMS:
      p.error(f"--programs: unknown {name!r}; choose from {sorted(programs.PROGRAMS)}")
  if args.report:
    result = _load(args.out)
    for path in filter(None, args.merge.split(",")):
      result = merge(result, _load(path))
    result.setdefault("usable_fraction", args.usable_fraction)
  else:
    if not args.keep_cache:
      jax.config.update("jax_enable_compilation_cache", False)  # cold compile times
    result = run(args)
  print(write(result, args.out))
  return result


if __name__ == "__main__":
  from absl import logging
  logging.set_verbosity(logging.INFO)  # progress lines
  main()
