"""Xu et al., "Stable Target Field", Table 1 shape (EDM + Heun, 35 NFE: DSM vs STF) on the offline
digits: the same seed, steps, network and sampler, only ``training.target`` differs
(``configs/digits_edm_dsm.py`` vs ``configs/digits_edm_stf.py``, reference batch 1024).

  python experiments/stf_edm_digits.py --out DIR [--smoke | --long | --full]

Default: 500 training steps per target (6 CPU-minutes measured for both); ``--long`` (the committed
results): the configs' 1000 steps; ``--full``: 5000 steps and 360 samples.

Each run trains with ``--mode=train`` and evaluates with ``--mode=eval`` into DIR/<target>/ (a normal
workdir: resume, re-evaluate or sample it with main.py). Writes DIR/result.json, DIR/table.md
(bits/dim of the probability-flow ODE on the 360 test images, Heun samples' NFE, the digits
classifier metrics, final held-out loss) and DIR/samples_dsm_vs_stf.png. The paper's claim is
about sample quality and training stability at equal compute: STF's lower-variance target gives
lower (better) feature distance and a smoother loss; on 1000 digits steps the effect is small, so
the table shows standard errors and the loss curves (DIR/loss_dsm_vs_stf.png) sit beside it.
Units: bits/dim; feature distance in the classifier's feature space (lower is better); classifier
score exp(E KL(p(y|x) || p(y))) (higher is better, 10 at most); entropy in nats.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

from configs.digits_edm_dsm import get_config as dsm_config  # noqa: E402
from configs.digits_edm_stf import get_config as stf_config  # noqa: E402

TARGETS = {"dsm": dsm_config, "stf": stf_config}
METRICS = (("bpd", "bits/dim (ODE)"), ("bound_bpd", "bound (bits/dim)"),
           ("sampling_nfe", "Heun NFE"), ("digits_feature_distance", "feature distance ↓"),
           ("digits_classifier_score", "classifier score ↑"),
           ("digits_mean_entropy", "mean entropy (nats)"), ("final_heldout_loss", "held-out loss"))


def scaled_config(target: str, scale: str):
  """The target's digits EDM config at the run's scale ('smoke', 'default', 'long': the configs as
  they are, 'full')."""
  config = TARGETS[target]()
  if scale == "default":
    config.model.ema_rate = common.SHORT_RUN_EMA_RATE
    config.training.n_iters = 500
    config.training.snapshot_freq = config.training.snapshot_freq_for_preemption = 250
  if scale == "smoke":
    config.model.nf = 8
    config.model.attn_resolutions = ()
    config.training.batch_size = 16
    config.training.ref_batch_size = 64 if target == "stf" else 16
    config.training.n_iters = 20
    config.optim.warmup = 0
    config.eval.use_ema = False  # 20 steps: the EMA would still be the initialization
    config.training.log_freq = config.training.eval_freq = 10
    config.training.snapshot_freq = config.training.snapshot_freq_for_preemption = 20
    config.eval.rtol = config.eval.atol = 1e-2
    config.eval.batch_size = 120
    config.eval.bound_time_samples = 1
    config.eval.num_samples = 16
  elif scale == "full":
    config.training.n_iters = 5000
    config.training.snapshot_freq = 1000
    config.eval.num_samples = 360
  return config


def run_one(target: str, scale: str, out: str) -> dict:
  """Trains and evaluates one target in out/<target>; returns its report plus the loss curve."""
  import run_lib
  from modes.evaluate import evaluate
  from modes.train import train
  config = scaled_config(target, scale)
  workdir = os.path.join(out, target)
  train(config, workdir)
  report = evaluate(config, workdir)
  train_curve, heldout = run_lib.read_loss_curves(workdir)
  report["final_heldout_loss"] = heldout[-1][1]
  report["heldout_loss_curve"] = heldout
  report["train_loss_curve"] = train_curve
  report["ref_batch_size"] = int(config.training.ref_batch_size)
  report["n_iters"] = int(config.training.n_iters)
  return report


def summarize(result: dict) -> list[dict]:
  """The README's claim rows from this script's result.json (experiments/claims.py)."""
  dsm, stf = result["runs"]["dsm"], result["runs"]["stf"]
  return [{"claim": "STF improves EDM + Heun (35 NFE) samples over DSM at equal training",
           "paper": "Xu et al., Table 1", "printed": "CIFAR-10 FID 1.97 → 1.92 (DDPM++), 1.98 → 1.90 (NCSN++)",
           "reproduced": f"digits, {stf['n_iters']} steps, n = {stf['ref_batch_size']}: feature "
                         f"distance {dsm['digits_feature_distance']:.2f} → "
                         f"{stf['digits_feature_distance']:.2f}, bits/dim {dsm['bpd']:.3f} → "
                         f"{stf['bpd']:.3f} (± {stf['bpd_stderr']:.3f})",
           "command": "python experiments/stf_edm_digits.py --out DIR"}]


def write(reports: dict, out: str, scale: str = "default", seconds: float = float("nan")) -> None:
  result = {"runs": {t: {k: v for k, v in r.items() if not k.endswith("failed_indices")}
                     for t, r in reports.items()}, "scale": scale, "seconds": seconds,
            "claim": "Xu et al. Table 1: STF improves EDM + Heun (35 NFE) samples over DSM at "
                     "equal training; here on digits at CPU scale",
            "units": {"bpd": "bits/dim", "digits_mean_entropy": "nats"}}
  lines = [f"Scale {scale!r}, {common.duration(seconds)}.", "",
           "| target | n (ref. batch) | steps | " + " | ".join(h for _, h in METRICS) + " |",
           "|---|---|---|" + "---|" * len(METRICS)]
  for t, r in reports.items():
    cells = []
    for k, _ in METRICS:
      v = r.get(k, float("nan"))
      se = r.get(f"{k}_stderr")
      cells.append(f"{v:.4g} ± {se:.2g}" if se is not None else f"{v:.4g}")
    lines.append(f"| {t.upper()} | {r['ref_batch_size']} | {r['n_iters']} | " + " | ".join(cells)
                 + " |")
  common.write(out, result, lines)
  _figures(reports, out)


def _figures(reports: dict, out: str) -> None:
  from PIL import Image
  with common.figure(os.path.join(out, "samples_dsm_vs_stf.png"), 1, len(reports), figsize=(4 * len(reports), 4.8)) as (fig, axes):
    for ax, (t, r) in zip(np.atleast_1d(axes), reports.items()):
      ax.imshow(np.asarray(Image.open(os.path.join(out, t, "eval", "samples.png"))), cmap="gray")
      ax.set_title(f"EDM-{t.upper()}, Heun {r['sampling_nfe']:.0f} NFE\n{r['bpd']:.3f} bits/dim",
                   fontsize=10)
      ax.axis("off")
  with common.figure(os.path.join(out, "loss_dsm_vs_stf.png"), figsize=(6, 4)) as (fig, ax):
    for t, r in reports.items():
      s, v = zip(*r["train_loss_curve"])
      ax.plot(s, v, lw=0.7, alpha=0.6, label=f"{t.upper()} train")
      s, v = zip(*r["heldout_loss_curve"])
      ax.plot(s, v, "o-", label=f"{t.upper()} held-out")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("EDM loss w.r.t. own target")
    ax.legend()


def main(argv=None) -> None:
  parser = common.parser(__doc__, long="1000 steps each",
                         full="5000 steps each, 360 samples")
  args = parser.parse_args(argv)
  scale = common.start(args)  # absl at INFO: the modes' progress lines (rate, ETA)
  reports, seconds = {}, float("nan")
  for target, done in common.each(list(TARGETS)):
    reports[target] = run_one(target, scale, args.out)
    seconds = done(f"{target}: {reports[target]['bpd']:.4f} bits/dim, feature distance "
                   f"{reports[target].get('digits_feature_distance', float('nan')):.4f}")
  write(reports, args.out, scale, seconds=seconds)


if __name__ == "__main__":
  main()
