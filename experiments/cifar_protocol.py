"""What the four CIFAR-10 table scripts share: the printed numbers (transcribed once, checked
against ../shared/papers by tests/test_cifar_tables.py), the FID protocol of each paper, one
cell-grid runner (skip, resume, table, figure, dry run), and the stages a cell is made of
(import or train a model, sample in resumable chunks, FID, eval, fit a prior / dequantizer),
each through scorelab's public modes (``modes.*``: sharded over every device and process).

A cell is one printed number's worth of work (e.g. Cao et al. Table 1 at 500 steps, c = 2). Its
result is ``OUT/cells/<name>/result.json``: a cell with a result is skipped; a cell without one
runs its stages, each of which skips or resumes its own outputs (a training run resumes from its
latest checkpoint, sampling from its last finished chunk, a dequantizer fit from its last save).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

PAPERS_DIR = os.path.join(ROOT, "..", "shared", "papers")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "score_sde_pytorch")  # copies of ../shared/fixtures
SMOKE_CHECKPOINT = os.path.join(FIXTURES, "checkpoint_ddpmpp_nf16.pth")
CELLS_DIR = "cells"
SAMPLE_CHUNK = 5000  # samples per resumable sampling chunk (a multiple of the sampling batch)
SEED = 42  # config.seed of every cell; sampling chunk j uses seed SEED + j (run_lib.generate)


# -- the printed numbers ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PrintedRow:
  """One printed row: ``label`` starts its line in the table that follows ``table`` (the caption's
  first words) in ``../shared/papers/<paper>``, and ``values`` are its numbers in print order."""
  paper: str
  table: str
  label: str
  columns: tuple[str, ...]
  values: tuple[str, ...]

  def number(self, column: str) -> float:
    return float(self.values[self.columns.index(column)])


CAO = "ode_vs_sde_generative_diffusion_coefficient.txt"
SCOREFLOW = "maximum_likelihood_training_scoreflow.txt"
STF = "stable_target_field.txt"
FRANZESE = "diffusion_time_how_much_is_enough.txt"

CAO_STEPS = ("100", "200", "500", "1000", "2000", "3000", "4000")
_CAO_T1 = "Table 1: **CIFAR-10:**"
_SF_T2 = "Table 2: Negative log-likelihood (bits/dim) and sample quality"
_SF_COLS = ("nll_uniform", "bound_uniform", "nll_variational", "bound_variational", "fid")
_STF_T1 = "Table 1: CIFAR-10 sample quality (FID, Inception)"
_STF_COLS = ("inception_score", "fid", "nfe")
_FR_T3 = "Table 3: Experimental results on CIFAR10"
FRANZESE_COLUMNS = ("fid", "bpd", "nfe_sde", "nfe_ode")

PRINTED: dict[str, dict[str, PrintedRow]] = {
    "cao": {c: PrintedRow(CAO, _CAO_T1, f"$h^2/g^2 = {c}$", CAO_STEPS, v) for c, v in {
        "0": ("22.43", "8.12", "7.20", "6.89", "6.98", "7.27", "7.33"),
        "1": ("31.72", "15.72", "7.23", "6.70", "6.71", "6.95", "7.08"),
        "2": ("52.77", "26.68", "10.78", "6.99", "6.70", "6.69", "6.98"),
        "4": ("92.83", "46.11", "20.47", "10.17", "7.20", "7.09", "7.01")}.items()},
    # CIFAR-10 columns only (the rows continue with ImageNet 32x32).
    "scoreflow": {f"{m}, {s}": PrintedRow(SCOREFLOW, _SF_T2, f"{m}\t{s}", _SF_COLS, v)
                  for (m, s), v in {
        ("Baseline", "VP"): ("3.16", "3.28", "3.04", "3.14", "3.98"),
        ("Baseline + LW", "VP"): ("3.06", "3.18", "2.94", "3.03", "5.18"),
        ("Baseline + LW + IS", "VP"): ("2.95", "3.08", "2.83", "2.94", "6.03"),
        ("Deep", "VP"): ("3.13", "3.25", "3.01", "3.10", "3.09"),
        ("Deep + LW", "VP"): ("3.06", "3.17", "2.93", "3.02", "7.88"),
        ("Deep + LW + IS", "VP"): ("2.93", "3.06", "2.80", "2.92", "5.34"),
        ("Baseline", "subVP"): ("2.99", "3.09", "2.88", "2.98", "3.20"),
        ("Baseline + LW", "subVP"): ("2.97", "3.07", "2.86", "2.96", "7.33"),
        ("Baseline + LW + IS", "subVP"): ("2.94", "3.05", "2.84", "2.94", "5.58"),
        ("Deep", "subVP"): ("2.96", "3.06", "2.85", "2.95", "2.86"),
        ("Deep + LW", "subVP"): ("2.95", "3.05", "2.85", "2.94", "6.57"),
        ("Deep + LW + IS", "subVP"): ("2.90", "3.02", "2.81", "2.90", "5.40")}.items()},
    "stf": {k: PrintedRow(STF, _STF_T1, label, _STF_COLS, v) for k, (label, v) in {
        "dsm_ddpmpp": ("DSM - Heun, DDPM++", ("9.78", "1.97", "35")),
        "stf_ddpmpp": ("STF (ours) - Heun, DDPM++", ("9.79", "1.92", "35")),
        "dsm_ncsnpp": ("DSM - Heun, NCSN++", ("9.82", "1.98", "35")),
        "stf_ncsnpp": ("STF (ours) - Heun, NCSN++", ("9.93", "1.90", "35"))}.items()},
    "franzese": {k: PrintedRow(FRANZESE, _FR_T3, label, FRANZESE_COLUMNS, v) for k, (label, v) in {
        "gaussian_1.0": ("ScoreSDE [29]", ("3.64", "3.09", "1000", "221")),
        "gaussian_0.6": ("ScoreSDE (T = 0.6)", ("5.74", "3.07", "600", "200")),
        "gaussian_0.4": ("ScoreSDE (T = 0.4)", ("24.91", "3.09", "400", "187")),
        "gaussian_0.2": ("ScoreSDE (T = 0.2)", ("339.72", "3.38", "200", "176")),
        "flow_0.6": ("Our (T = 0.6)", ("3.72", "3.07", "600", "200")),
        "flow_0.4": ("Our (T = 0.4)", ("5.44", "3.06", "400", "187")),
        "flow_0.2": ("Our (T = 0.2)", ("14.38", "3.06", "200", "176"))}.items()},
}


def printed_numbers_in_paper(row: PrintedRow) -> list[str]:
  """The numbers the paper prints on ``row``'s line (the first line starting with its label within
  4000 characters after the table's caption), HTML / LaTeX markup dropped."""
  with open(os.path.join(PAPERS_DIR, row.paper)) as f:
    text = f.read()
  start = text.index(row.table)
  for line in text[start:start + 4000].splitlines():
    if line.strip().startswith(row.label):
      rest = re.sub(r"<[^>]+>|\$[^$]*\$", " ", line.strip()[len(row.label):])
      return re.findall(r"\d+(?:\.\d+)?", rest)
  raise ValueError(f"{row.paper}: no line starting with {row.label!r} after {row.table!r}")


# -- the FID protocol of each paper ----------------------------------------------------------------
INCEPTION = ("the inception-2015-12-05 Inception-v3, pool3 (2048-D); scorelab runs pytorch-fid's "
             "port of that graph (docs/fid.md: bilinear resize to 299 without antialiasing)")
FID_PROTOCOL = {
    "cao": dict(n_samples=10_000, reference="CIFAR-10 training set (50,000 images)",
                rounding="score_sde",
                paper="Table 1 caption: 'evaluate FIDs on 10^4 samples'; the network is not named "
                      "(they sample score_sde's checkpoint with score_sde's code, whose FID is "
                      "TF-GAN's Inception-v3 pool_3 against the training-set statistics)"),
    "scoreflow": dict(n_samples=50_000, reference="CIFAR-10 training set (50,000 images)",
                      rounding="score_sde",
                      paper="App. 'Sample quality': 'FID values are computed on 50000 samples from "
                            "p_ODE ... between samples and training/test data for CIFAR-10/"
                            "ImageNet'; the network is not named (score_flow's code: TF-GAN's "
                            "Inception-v3)"),
    "stf": dict(n_samples=50_000, reference="CIFAR-10 training set (50,000 images)",
                rounding="edm",
                paper="App. D.1: EDM's protocol, 'per 2.5M images on 50k samples as in Karras et "
                      "al.'; EDM's fid.py uses the same 2015-12-05 graph (its own port)"),
    "franzese": dict(n_samples=50_000, reference="CIFAR-10 training set (50,000 images)",
                     rounding="score_sde",
                     paper="neither the sample count nor the network is stated in the text we "
                           "have; 5x10^4 as score_sde's setup [29] that they follow"),
}


def fid_note(paper: str) -> str:
  import evaluation
  p = FID_PROTOCOL[paper]
  return (f"FID on {p['n_samples']:,} samples against the {p['reference']} with {INCEPTION}, "
          f"on 8-bit images ({evaluation.ROUNDINGS[p['rounding']]}; the reference: the dataset's "
          "uint8 pixels), weights read without torch. "
          f"Paper: {p['paper']}. Absolute FIDs differ by the resize (TF vs pytorch-fid) and the "
          "sampling seed; differences between cells are what the table compares.")


# -- FID -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """``features(uint8 images, NHWC) -> (pool features (N, D), logits (N, K) or None)``."""
  name: str
  tag: str
  features: Callable[[np.ndarray], tuple[np.ndarray, Optional[np.ndarray]]]


def inception_net(weights: str = "") -> FeatureNet:
  """The FID Inception-v3 (evaluation.py), weights resolved as eval's (docs/fid.md)."""
  import evaluation
  import inception_weights
  variables = evaluation.load_inception_params(
      inception_weights.resolve_inception_weights(weights))

  def features(images):
    pool3 = evaluation.inception_features(variables, images).pool3
    return pool3, evaluation.unbiased_logits(variables, pool3)

  return FeatureNet("FID Inception-v3 pool3 (2048-D)", "inception", features)


def smoke_net(dim: int = 16, seed: int = 0) -> FeatureNet:
  """The test suite's stand-in: 8x8 average pooling, a fixed random projection to ``dim`` and
  tanh. Its 'FID' is a Frechet distance in this space, comparable to nothing printed."""
  def features(images):
    x = np.asarray(images, np.float64) / 255.0
    n, h, w, c = x.shape
    pooled = x.reshape(n, 8, h // 8, 8, w // 8, c).mean(axis=(2, 4)).reshape(n, -1)
    proj = np.random.default_rng(seed).normal(size=(pooled.shape[1], dim)) / 8.0
    return np.tanh((pooled - 0.5) @ proj), None

  return FeatureNet("smoke: random projection of 8x8-pooled images (not an FID)", "smoke",
                    features)


def reference_stats(config, net: FeatureNet, out: str, given: str = ""):
  """(mu, sigma) of the training split under ``net``: ``given`` (.npz with mu, sigma), else
  computed once into ``OUT/fid_ref_<tag>_<dataset>_train.npz``."""
  import datasets
  import evaluation
  if given:
    return evaluation.load_stats(given)
  import run_lib
  path = os.path.join(out, f"fid_ref_{net.tag}_{config.data.dataset}_train.npz")
  if os.path.exists(path):
    return evaluation.load_stats(path)
  levels, _, _ = datasets.load_levels(config, str(config.data.train_split))
  images = evaluation.levels_to_uint8(levels, datasets.dataset_info(config).num_grey_levels)
  stats = evaluation.compute_statistics(net.features(images)[0])
  if run_lib.is_main():  # every process computed them (features are split over all of them)
    evaluation.save_stats(path, *stats)
  return stats


def fid_of(samples: np.ndarray, config, net: FeatureNet, ref,
           rounding: Optional[str] = None) -> dict[str, float]:
  """FID (and Inception Score when the net has logits) of samples in model space, rounded to
  8-bit images first (``evaluation.quantize_8bit``; ``rounding`` None: the model's paper's
  convention, ``evaluation.rounding_for`` its SDE; a table passes ``FID_PROTOCOL[paper]``'s)."""
  import evaluation
  import run_lib
  import sde_lib
  if rounding is None:
    rounding = evaluation.rounding_for(sde_lib.get_sde(run_lib.validate_config(config).sde))
  images = evaluation.quantize_8bit(samples, bool(config.data.centered), rounding)
  pool, logits = net.features(images)
  out = {"fid": evaluation.fid_from_stats(*evaluation.compute_statistics(pool), *ref)}
  if logits is not None:
    out["inception_score"] = evaluation.inception_score(logits, from_logits=True)[0]
  return out


# -- configs ---------------------------------------------------------------------------------------
def with_fields(config, **fields):
  """A copy of ``config`` with dotted fields set: ``with_fields(c, **{'sampling.c': 2.0})``."""
  config = copy.deepcopy(config)
  for dotted, value in fields.items():
    section, name = dotted.split(".")
    config[section][name] = value
  return config


def smoke_fields() -> dict[str, Any]:
  """The ``--smoke`` size on the shared nf-16 fixture network and mock CIFAR-10 (20 train / 9 test
  images in the suite): 4 samples, loose likelihood tolerances, one bound time sample."""
  return {"model.nf": 16, "model.num_res_blocks": 1, "sampling.batch_size": 4,
          "eval.batch_size": 12, "eval.rtol": 0.1, "eval.atol": 0.1, "eval.num_samples": 4,
          "eval.bound_time_samples": 1, "eval.max_steps": 64, "eval.max_failed_fraction": 1.0,
          "eval.fid": False}


# -- the grid --------------------------------------------------------------------------------------
# Cost of one network evaluation of each kind relative to a forward pass (assumed, not measured):
# training and fitting a dequantizer back-propagate (forward + backward ~ 3 forwards); a
# likelihood ODE step evaluates the score and one vector-Jacobian product (Hutchinson).
WORK_COST = {"sample": 1.0, "likelihood": 3.0, "bound": 1.0, "train": 3.0, "dequantizer": 3.0}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One printed number's worth of work. ``run()`` does it (its stages skip / resume what exists)
  and returns the measured values; ``work`` counts its network evaluations by kind (images x
  NFE, ``WORK_COST``); ``printed`` holds the paper's value of each measured column (None where
  the paper prints none)."""
  name: str
  params: dict[str, Any]
  run: Callable[[], dict[str, Any]]
  nfe: float
  work: dict[str, float]
  printed: dict[str, Optional[float]]


def cell_result_path(out: str, name: str) -> str:
  return os.path.join(out, CELLS_DIR, name, "result.json")


def run_grid(cells: Sequence[Cell], out: str) -> dict[str, dict[str, Any]]:
  """Runs every cell without a result (in order), writing each result as it finishes; returns
  {name: result} of all cells. A cell that raises leaves no result: the next run resumes it."""
  import run_lib
  from progress import Progress
  results = {}
  with Progress("table cells", len(cells), "cells") as progress:
    for cell in cells:
      path = cell_result_path(out, cell.name)
      if os.path.exists(path):
        with open(path) as f:  # the params in the cell's own order (the JSON's keys are sorted)
          results[cell.name] = dict(json.load(f), params=cell.params, skipped=True)
      else:
        t0 = time.time()
        measured = cell.run()
        results[cell.name] = {"params": cell.params, "measured": measured, "printed": cell.printed,
                              "nfe": cell.nfe, "seconds": time.time() - t0}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        run_lib.write_json(path, results[cell.name])
        results[cell.name]["skipped"] = False
      progress.update(1, cell=cell.name)
  return results


def _fmt(v) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "–"
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def table_markdown(results: dict[str, dict], columns: Sequence[tuple[str, str]],
                   header: str) -> str:
  """One row per cell: its parameters, then 'printed | reproduced' for each (key, title) column."""
  first = next(iter(results.values()))
  keys = list(first["params"])
  head = keys + [h for _, title in columns for h in (f"{title} (printed)", f"{title} (reproduced)")]
  lines = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results.values():
    row = [_fmt(r["params"][k]) for k in keys]
    for key, _ in columns:
      row += [_fmt(r["printed"].get(key)), _fmt(r["measured"].get(key))]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def figure_printed_vs_reproduced(results: dict[str, dict], column: str, title: str,
                                 path: str) -> None:
  """Scatter of the reproduced against the printed value of ``column`` per cell, with y = x."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = [(r["printed"].get(column), r["measured"].get(column), name)
         for name, r in results.items()]
  pts = [(p, m, n) for p, m, n in pts if p is not None and m is not None]
  fig, ax = plt.subplots(figsize=(5, 5))
  if pts:
    p, m, names = zip(*pts)
    ax.scatter(p, m)
    for x, y, n in pts:
      ax.annotate(n, (x, y), fontsize=6)
    lo, hi = min(p + m), max(p + m)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="reproduced = printed")
    ax.legend()
  ax.set_xlabel(f"{title}, printed")
  ax.set_ylabel(f"{title}, reproduced")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_outputs(out: str, results: dict, columns, header: str, extra: dict) -> dict:
  """OUT/result.json (cells, protocol, scale) and OUT/table.md; returns the result."""
  import run_lib
  result = dict(extra, cells={k: {kk: vv for kk, vv in v.items() if kk != "skipped"}
                              for k, v in results.items()})
  run_lib.write_json(os.path.join(out, "result.json"), result)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table_markdown(results, columns, header))
  return result


# -- dry run ---------------------------------------------------------------------------------------
def seconds_per_evaluation(config, batch: int, repeats: int = 3) -> tuple[float, str]:
  """Measured seconds per image per network forward pass of ``config``'s network (random
  parameters: the cost does not depend on them) at ``batch`` images, on this machine's default
  device; and that device's description."""
  import jax
  import jax.numpy as jnp
  import datasets
  import run_lib
  import sde_lib
  cfg = run_lib.validate_config(config)  # the typed sections
  sde = sde_lib.get_sde(cfg.sde)
  _, score_fn, state = run_lib.init_state(cfg, sde, jax.random.PRNGKey(0))
  shape = (batch,) + tuple(datasets.dataset_info(config).shape)
  x, t = jnp.zeros(shape), jnp.full((batch,), 0.5 * float(sde.T))
  f = jax.jit(lambda p, x, t: score_fn(p, x, t))
  f(state.params, x, t).block_until_ready()  # compile
  t0 = time.perf_counter()
  for _ in range(repeats):
    f(state.params, x, t).block_until_ready()
  seconds = (time.perf_counter() - t0) / repeats / batch
  dev = jax.devices()[0]
  return seconds, f"{dev.platform} ({getattr(dev, 'device_kind', '?')}) x{jax.device_count()}"


# Accelerators of the dry run's hardware-independent estimate: the vendor's stated dense peak for
# the precision these models train in (float32: TF32 tensor cores on A100 / H100 as PyTorch and
# XLA use by default; TPU matrix units at bf16 passes), and one stated utilisation for all.
ACCELERATORS = (("A100", 156e12, "TF32"), ("H100 SXM", 494.7e12, "TF32"), ("TPU v4", 275e12, "bf16"))
UTILISATION = 0.35  # model FLOPs utilisation assumed for conv U-Nets at the papers' batch sizes


def flops_per_evaluation(config) -> dict[str, float]:
  """XLA's FLOP count (cost analysis of the lowered program, batch 1, nothing compiled or run) of
  one network evaluation of each work kind: a forward pass ('sample', 'bound'), the score plus one
  vector-Jacobian product (a Hutchinson likelihood step), forward plus backward to the parameters
  ('train', 'dequantizer')."""
  import jax
  import jax.numpy as jnp
  import datasets
  import run_lib
  import sde_lib
  cfg = run_lib.validate_config(config)
  sde = sde_lib.get_sde(cfg.sde)
  _, score_fn, state = run_lib.init_state(cfg, sde, jax.random.PRNGKey(0), template=True)
  x = jnp.zeros((1,) + tuple(datasets.dataset_info(cfg).shape))
  t = jnp.full((1,), 0.5 * float(sde.T))

  def count(f) -> float:
    return float(jax.jit(f).lower(state.params, x, t).cost_analysis()["flops"])

  forward = count(lambda p, x, t: score_fn(p, x, t))
  likelihood = count(lambda p, x, t: jax.vjp(lambda y: score_fn(p, y, t), x)[1](x)[0])
  train = count(lambda p, x, t: jax.grad(lambda q: jnp.sum(score_fn(q, x, t) ** 2))(p))
  return {"sample": forward, "bound": forward, "likelihood": likelihood, "train": train,
          "dequantizer": train}


def accelerator_hours(flops: float) -> dict[str, float]:
  """Hours of ``flops`` on each of ACCELERATORS at its peak x UTILISATION."""
  return {name: flops / (peak * UTILISATION) / 3600 for name, peak, _ in ACCELERATORS}


def dry_run(cells: Sequence[Cell], config, batch: int, out: str = "") -> list[dict[str, Any]]:
  """Prints every cell, training included, with its NFE per sample, its network evaluations, the
  time on this machine (measured seconds per forward pass x evaluations x ``WORK_COST``), its
  FLOPs (``flops_per_evaluation``: XLA's count per kind x evaluations) and the hours those FLOPs
  take on ACCELERATORS at UTILISATION; marks cells with a result. Returns the rows."""
  per_eval, device = seconds_per_evaluation(config, batch)
  flops = flops_per_evaluation(config)
  names = [name for name, _, _ in ACCELERATORS]
  rows = []
  print(f"{len(cells)} cells; one forward pass = {per_eval * 1e3:.3g} ms per image measured on "
        f"{device} at batch {batch}; XLA counts {flops['sample'] / 1e9:.3g} GFLOP per forward, "
        f"{flops['likelihood'] / 1e9:.3g} per likelihood step, {flops['train'] / 1e9:.3g} per "
        f"training image; accelerators at {UTILISATION:.0%} of peak: " + ", ".join(
            f"{n} {p / 1e12:g} TFLOP/s {prec}" for n, p, prec in ACCELERATORS))
  print(f"{'cell':<28} {'NFE/sample':>10} {'network evals':>14} {'est. hours':>10} "
        f"{'PFLOP':>10} " + " ".join(f"{n + ' h':>11}" for n in names) + "  status")
  for cell in cells:
    evals = sum(cell.work.values())
    seconds = per_eval * sum(WORK_COST[k] * v for k, v in cell.work.items())
    cell_flops = sum(flops[k] * v for k, v in cell.work.items())
    hours = accelerator_hours(cell_flops)
    done = bool(out) and os.path.exists(cell_result_path(out, cell.name))
    rows.append({"cell": cell.name, "nfe": cell.nfe, "evaluations": evals, "seconds": seconds,
                 "flops": cell_flops, "accelerator_hours": hours, "done": done})
    print(f"{cell.name:<28} {cell.nfe:>10.0f} {evals:>14.3g} {seconds / 3600:>10.3g} "
          f"{cell_flops / 1e15:>10.4g} " + " ".join(f"{hours[n]:>11.3g}" for n in names)
          + f"  {'done (skipped)' if done else 'to run'}")
  todo = [r for r in rows if not r["done"]]
  total = sum(r["flops"] for r in todo)
  print(f"total still to run: {sum(r['seconds'] for r in todo) / 3600:.3g} hours on {device}; "
        f"{total / 1e15:.4g} PFLOP = " + ", ".join(
            f"{h:.3g} {n}-hours" for n, h in accelerator_hours(total).items()))
  return rows


# -- stages ----------------------------------------------------------------------------------------
def prepare_model(config, workdir: str, checkpoint: str = ""):
  """The model of ``workdir``: imported from ``checkpoint`` once (``--mode=import``; its
  ``import.json`` marks it done), else trained (``--mode=train``, resuming from the workdir's
  latest checkpoint). Returns the config with the importer's score conventions applied."""
  import score_sde_import
  from modes.import_checkpoint import import_checkpoint
  from modes.train import train
  if not checkpoint:
    train(config, workdir)
    return config
  marker = os.path.join(workdir, "import.json")
  if os.path.exists(marker):
    with open(marker) as f:
      overrides = json.load(f)["config_overrides"]
  else:
    overrides = import_checkpoint(config, workdir, checkpoint=checkpoint)["config_overrides"]
  return score_sde_import.apply_overrides(config, overrides)


def sample_chunks(config, workdir: str, tag: str, n: int, chunk: int = SAMPLE_CHUNK):
  """n samples by ``--mode=sample`` in chunks of ``chunk`` into ``workdir/<tag>_partNNN/``
  (chunk j with seed ``config.seed + j``; a chunk with its report.json is not redrawn, so a
  preempted run resumes at its last finished chunk). Returns (samples, mean NFE per sample)."""
  from modes.sample import sample
  parts, nfes = [], []
  for j, start in enumerate(range(0, n, chunk)):
    folder = os.path.join(workdir, f"{tag}_part{j:03d}")
    if not os.path.exists(os.path.join(folder, "report.json")):
      part = with_fields(config, **{"sampling.n_samples": min(chunk, n - start)})
      part.seed = int(config.seed) + j
      sample(part, workdir, sample_folder=os.path.basename(folder))
    with open(os.path.join(folder, "report.json")) as f:
      nfes.append(json.load(f)["nfe"])
    with np.load(os.path.join(folder, "samples.npz")) as z:
      parts.append(z["samples"])
  return np.concatenate(parts), float(np.mean(nfes))


def evaluate_once(config, workdir: str, folder: str) -> dict[str, Any]:
  """``--mode=eval`` into ``workdir/folder`` unless its report.json exists (then read)."""
  from modes.evaluate import evaluate
  path = os.path.join(workdir, folder, "report.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return evaluate(config, workdir, eval_folder=folder)


def fit_prior_once(config, workdir: str) -> None:
  """``--mode=fit_prior`` unless ``workdir/prior`` holds a fitted prior."""
  from modes.fit_prior import fit_prior
  import run_lib
  if not os.path.exists(os.path.join(workdir, run_lib.PRIOR_DIR, "report.json")):
    fit_prior(config, workdir)


# -- command line ----------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser, checkpoint_help: str) -> None:
  """The flags every table script takes."""
  parser.add_argument("--out", required=True, help="output folder (cells resume inside it)")
  parser.add_argument("--checkpoint", nargs="+", default=[], help=checkpoint_help)
  common.add_flags(parser, smoke="the shared nf-16 fixture network, a few samples, mock data in "
                   "the test suite", full="train at the paper's schedule (a GPU / TPU)",
                   long="not used by the CIFAR table scripts")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the cells, their NFE and estimated device time; run nothing")
  parser.add_argument("--measure-batch", type=int, default=0,
                      help="batch of the dry run's timed forward passes (0: the sampling batch "
                           "on an accelerator, 4 on CPU)")
  parser.add_argument("--fid-stats", default="", help="reference (mu, sigma) .npz; default: "
                      "computed once from the training split into OUT")
  parser.add_argument("--inception-weights", default="", help="as eval.inception_weights")
  parser.add_argument("--chunk", type=int, default=SAMPLE_CHUNK, help="samples per resumable "
                      "sampling chunk")


@dataclasses.dataclass
class Run:
  """What a script's cells need from the command line: size, source of the model, FID."""
  args: argparse.Namespace
  scale: str
  checkpoints: list[str]

  @property
  def smoke(self) -> bool:
    return self.scale == "smoke"

  def feature_net(self) -> FeatureNet:
    return smoke_net() if self.smoke else inception_net(self.args.inception_weights)

  def chunk(self) -> int:
    return 2 if self.smoke else int(self.args.chunk)


def parse(parser: argparse.ArgumentParser, argv, n_checkpoints: int = 1) -> Run:
  """Parses and checks the flags: ``--checkpoint`` (``n_checkpoints`` files) or ``--full`` (or
  ``--smoke``, which uses the shared fixture when no checkpoint is given)."""
  args = parser.parse_args(argv)
  scale = common.chosen(args)
  if scale == "long":
    parser.error("--long: the CIFAR table scripts run at --smoke, from --checkpoint, or --full")
  ckpts = list(args.checkpoint)
  if scale == "smoke" and not ckpts:
    ckpts = [SMOKE_CHECKPOINT] * n_checkpoints
  if ckpts and scale == "full":
    parser.error("--checkpoint and --full exclude each other (evaluate a published model, or "
                 "train one at the paper's schedule)")
  if not ckpts and scale != "full" and not args.dry_run:
    parser.error("give --checkpoint FILE (a published model) or --full (train one)")
  if ckpts and len(ckpts) != n_checkpoints:
    parser.error(f"--checkpoint takes {n_checkpoints} file(s), got {len(ckpts)}")
  for c in ckpts:
    if not os.path.exists(c):
      parser.error(f"--checkpoint {c}: no such file")
  return Run(args, scale, ckpts)


def measure_batch(run: Run, config) -> int:
  import jax
  if run.args.measure_batch:
    return int(run.args.measure_batch)
  return 4 if jax.devices()[0].platform == "cpu" else int(config.sampling.batch_size)


def finish(run: Run, cells: Sequence[Cell], config, columns, header: str,
           extra: dict) -> Optional[dict]:
  """The dry run, or the grid then result.json / table.md / the printed-vs-reproduced figure."""
  out = run.args.out
  if run.args.dry_run:
    dry_run(cells, config, measure_batch(run, config), out)
    return None
  os.makedirs(out, exist_ok=True)
  if run.smoke:
    header += ("\n\n**Smoke run**: a few samples of the nf-16 fixture (random weights) on the data "
               f"at hand, FID features: {smoke_net().name}. It tests the pipeline; its numbers "
               "are not comparable with the printed ones.")
  t0 = time.time()
  results = run_grid(cells, out)
  result = write_outputs(out, results, columns, header,
                         dict(extra, scale=run.scale, seconds=time.time() - t0,
                              checkpoints=run.checkpoints))
  key, title = columns[0]
  figure_printed_vs_reproduced(results, key, title, os.path.join(out, f"{key}_printed_vs_"
                                                                      "reproduced.png"))
  print(table_markdown(results, columns, header))
  return result
