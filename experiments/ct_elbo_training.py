"""Huang et al., "A variational perspective on diffusion-based generative models and score
matching", §6.1 / Fig. 3 shape: the negative CT-ELBO of the plug-in reverse SDE (eq. 25, ISM and
DSM forms, with ScoreFlow's eps correction) measured throughout training, next to the probability-
flow ODE's NLL of the same checkpoints, against training steps and against training time, for
models trained with DSM (score_sde's sigma^2 weighting, biased as an ELBO), DSM with likelihood
weighting and importance-sampled t (the debiased estimator of §6.2) and sliced score matching
(SSM, likelihood weighting). On the Swiss roll (the paper's toy) and, with ``--digits``, on digits.

  python experiments/ct_elbo_training.py --out DIR [--smoke | --long | --full] [--digits]

Default: the Swiss roll (~3 CPU-minutes); with ``--digits`` also digits at 300 steps, 3
checkpoints, the first 60 test images, ODE tolerance 1e-4 (18 CPU-minutes measured in all).
``--long --digits``: 600 digits steps, 5 checkpoints, all 360 test images.

Each objective is a normal workdir DIR/<data>_<objective>/ trained by ``--mode=train`` with a
checkpoint every n_iters / n_evals steps (all kept) and evaluated per checkpoint by ``--mode=eval``
(``eval.checkpoint``, ``eval.ct_elbo=True``) into eval_step<k>/. Training time per step is the
train call's wall time over its steps (the x-axis of the "runtime" panel). Writes DIR/result.json,
DIR/table.md and DIR/elbo_vs_training.png. Units: nats per example (toy), bits/dim (digits).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

OBJECTIVES = (("dsm_default", "dsm", "default"), ("dsm_lw_is", "dsm", "likelihood_is"),
              ("ssm_lw", "ssm", "likelihood"))
SCALES = {  # steps and evaluated checkpoints per run (toy / digits), held-out toy points, time
  # samples, the evaluated digits split
    "smoke": dict(toy_iters=40, n_evals=2, digits_iters=20, digits_evals=2, points=64,
                  time_samples=4, split="test"),
    "default": dict(toy_iters=4000, n_evals=5, digits_iters=300, digits_evals=3, points=500,
                    time_samples=64, split="test[:60]"),
    "long": dict(toy_iters=4000, n_evals=5, digits_iters=600, digits_evals=5, points=500,
                 time_samples=64, split="test"),
    "full": dict(toy_iters=20000, n_evals=10, digits_iters=5000, digits_evals=10, points=2000,
                 time_samples=256, split="test"),
}


def run_config(data: str, target: str, weighting: str, scale: str):
  """configs/toy_swiss_roll.py or configs/digits_vp.py with the objective, checkpoints kept for
  every evaluation and the CT-ELBO switched on."""
  s = SCALES[scale]
  if data == "digits":
    from configs.digits_vp import get_config
    config = get_config()
    n_iters, n_evals = s["digits_iters"], s["digits_evals"]
    config.eval.split = s["split"]
    if scale == "default":  # ~4 CPU-minutes an objective: train 1 min, 3 checkpoints' evals
      config.model.ema_rate = common.SHORT_RUN_EMA_RATE
      config.eval.rtol = config.eval.atol = 1e-4
    config.eval.bound = False
    if scale == "smoke":
      config.model.nf, config.model.attn_resolutions = 8, ()
      config.training.batch_size = config.training.ref_batch_size = 16
      config.eval.rtol = config.eval.atol = 1e-2
      config.eval.batch_size = 120
  else:
    from configs.toy_swiss_roll import get_config
    config = get_config()
    n_iters, n_evals = s["toy_iters"], s["n_evals"]
    config.eval.divergence = "exact"  # 2-D: the ODE's NLL without Hutchinson noise
    # Every objective gets the same smooth network: with the config's ReLU MLP, SSM (LW) fell into
    # its trivial zero (all units dead, s = 0: loss exactly 0.0 from step ~1200, ODE NLL frozen
    # at 11.89 nats) -- the sliced objective's v^T (ds/dx) v term gives dead ReLUs no way back.
    config.model.activation = "swish"
    config.eval.num_likelihood_examples = s["points"]
  config.training.target, config.training.weighting = target, weighting
  config.training.n_iters = n_iters
  every = max(1, n_iters // n_evals)
  config.training.snapshot_freq = config.training.snapshot_freq_for_preemption = every
  config.training.max_to_keep = n_evals + 1
  config.training.eval_freq = every
  config.eval.ct_elbo = True
  config.eval.bound_time_samples = s["time_samples"]
  config.eval.num_samples = 16 if (data, scale) == ("digits", "default") else 64
  if scale == "smoke":
    config.optim.warmup = 0
    config.eval.use_ema = False
  return config


def run_objective(data: str, name: str, target: str, weighting: str, scale: str, out: str) -> dict:
  """Train one objective, then evaluate each kept checkpoint; one curve per metric."""
  from modes.evaluate import evaluate
  from modes.train import train
  config = run_config(data, target, weighting, scale)
  wd = os.path.join(out, f"{data}_{name}")
  t0 = time.time()
  train(config, wd)
  seconds_per_step = (time.time() - t0) / int(config.training.n_iters)
  every = int(config.training.snapshot_freq)
  points = []
  for step in range(every, int(config.training.n_iters) + 1, every):
    cfg = config.copy_and_resolve_references()
    cfg.eval.checkpoint = step
    rep = evaluate(cfg, wd, eval_folder=f"eval_step{step}")
    unit = "bpd" if data == "digits" else "nll"
    points.append({"step": step, "train_seconds": step * seconds_per_step,
                   "ode": rep[unit], "ode_stderr": rep[f"{unit}_stderr"],
                   "ct_elbo_ism": rep[f"ct_elbo_ism_{unit}"],
                   "ct_elbo_ism_stderr": rep[f"ct_elbo_ism_{unit}_stderr"],
                   "ct_elbo_dsm": rep[f"ct_elbo_dsm_{unit}"],
                   "ct_elbo_dsm_stderr": rep[f"ct_elbo_dsm_{unit}_stderr"]})
  return {"data": data, "objective": name, "target": target, "weighting": weighting,
          "seconds_per_step": seconds_per_step, "unit": "bits/dim" if data == "digits" else "nats",
          "points": points}


def summarize(result: dict) -> list[dict]:
  """The README's claim rows from this script's result.json (experiments/claims.py)."""
  cells = []
  for r in result["runs"]:
    last = r["points"][-1]
    cells.append(f"{r['data']} {r['objective']}: −ELBO {last['ct_elbo_ism']:.3f} vs ODE "
                 f"{last['ode']:.3f} {r['unit']}")
  return [{"claim": "the plug-in reverse SDE's −CT-ELBO (a bound on its own NLL, not on the "
                    "ODE's) tracks the ODE's NLL through training (score matching maximizes it)",
           "paper": "Huang et al., §6.1, Fig. 3", "printed": "qualitative (Swiss roll)",
           "reproduced": "; ".join(cells),
           "command": "python experiments/ct_elbo_training.py --out DIR"}]


def write(runs: list[dict], out: str, scale: str, seconds: float = float("nan")) -> None:
  result = {"runs": runs, "scale": scale, "seconds": seconds,
            "digits_eval_split": SCALES[scale]["split"],
            "claim": "Huang et al. §6.1 / Fig. 3: -CT-ELBO of the plug-in reverse SDE vs the "
                     "ODE's NLL through training, by iterations and by runtime"}
  lines = [f"Scale {scale!r}, {common.duration(seconds)}; digits evaluated on "
           f"{SCALES[scale]['split']!r}.", "",
           "| data | objective | step | train time (s) | ODE NLL | −CT-ELBO (ISM form) | "
           "−CT-ELBO (DSM form) | unit |", "|---|---|---|---|---|---|---|---|"]
  for r in runs:
    for p in r["points"]:
      lines.append(f"| {r['data']} | {r['objective']} | {p['step']} | {p['train_seconds']:.0f} | "
                   f"{p['ode']:.3f} ± {p['ode_stderr']:.3f} | {p['ct_elbo_ism']:.3f} ± "
                   f"{p['ct_elbo_ism_stderr']:.3f} | {p['ct_elbo_dsm']:.3f} ± "
                   f"{p['ct_elbo_dsm_stderr']:.3f} | {r['unit']} |")
  common.write(out, result, lines)
  _figure(runs, out)


def _figure(runs: list[dict], out: str) -> None:
  datas = sorted({r["data"] for r in runs})
  with common.figure(os.path.join(out, "elbo_vs_training.png"), len(datas), 2, figsize=(10, 3.8 * len(datas)), squeeze=False) as (fig, axes):
    for i, data in enumerate(datas):
      for j, (x_key, x_label) in enumerate((("step", "training step"),
                                            ("train_seconds", "training time (s)"))):
        ax = axes[i, j]
        for k, r in enumerate(r for r in runs if r["data"] == data):
          x = [p[x_key] for p in r["points"]]
          color = f"C{k}"
          ax.plot(x, [p["ct_elbo_ism"] for p in r["points"]], "o-", color=color,
                  label=f"{r['objective']}: −CT-ELBO")
          ax.plot(x, [p["ode"] for p in r["points"]], "s--", color=color, alpha=0.6,
                  label=f"{r['objective']}: ODE NLL")
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{data}: {runs[0]['unit'] if data != 'digits' else 'bits/dim'}")
        if j == 0:
          ax.legend(fontsize=7)


def main(argv=None) -> None:
  parser = common.parser(__doc__, smoke="40 steps, 2 evals",
                         long="digits: 600 steps, 5 evals, 360 test images",
                         full="the paper's 20k toy steps, 10 evals")
  parser.add_argument("--digits", action="store_true", help="also on digits (slower)")
  args = parser.parse_args(argv)
  scale = common.start(args)  # absl at INFO: the modes' progress lines (rate, ETA)
  runs = []
  jobs = [(d, o) for d in (("swiss_roll", "digits") if args.digits else ("swiss_roll",))
          for o in OBJECTIVES]
  for (data, (name, target, weighting)), done in common.each(jobs):
    runs.append(run_objective(data, name, target, weighting, scale, args.out))
    last = runs[-1]["points"][-1]
    seconds = done(f"{data}/{name}: ODE {last['ode']:.4f}, -CT-ELBO {last['ct_elbo_ism']:.4f}")
    write(runs, args.out, scale, seconds=seconds)


if __name__ == "__main__":
  main()
