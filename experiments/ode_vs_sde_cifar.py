"""Cao et al., "Exploring the optimal choice for generative processes in diffusion models: ordinary
vs stochastic differential equations", Table 1: FID of score_sde's published VP DDPM++ cont.
checkpoint (vp/cifar10_ddpmpp_continuous) against Euler-Maruyama steps {100, ..., 4000} and
c = h^2 / g^2 in {0, 1, 2, 4}, no corrector, 10^4 samples per cell (App. H: T = 1,
g^2 = 0.1 + 19.9 t, Euler-Maruyama).

  python experiments/ode_vs_sde_cifar.py --checkpoint checkpoint_8.pth --out DIR [--dry-run]
  python experiments/ode_vs_sde_cifar.py --full --out DIR      # trains configs/cifar_vp_dsm.py

The checkpoint is imported once into DIR/model (``--mode=import``, score_sde_pytorch ``.pth`` or
score_sde Flax file); each cell samples it (``--mode=sample``) in resumable chunks of seed 42 + j
with Cao et al.'s own sampler conventions (CAO_CONVENTIONS), and measures the FID against the
CIFAR-10 training statistics. ``--steps`` / ``--cs`` pick a
sub-grid. Writes DIR/result.json, DIR/table.md (printed beside reproduced per cell) and
DIR/fid_vs_steps.png. Checkpoint: the given file as it is (its EMA parameters, eval.use_ema).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cifar_protocol as ct  # noqa: E402

STEPS = tuple(int(s) for s in ct.CAO_STEPS)
CS = (0, 1, 2, 4)
SMOKE_GRID = ((2, 3), (0, 1))  # steps, c


# Cao et al.'s own Euler-Maruyama (github.com/yucaoyc/OptimalDiffusion, Image-examples/lib/
# generate_batch.py `generate_batch_sample` and lib/sdes.py `PluginReverseSDE.em`, commit 93a4364):
# N uniform steps of the generative time over [0, T], the score evaluated at t_i = T - i T / N
# (i < N, never at t = 0), the state after the last step returned as it is (no final denoising
# step, no last mean), NFE = N; then clipped to [0, 1] and cast to 8 bits (torchvision ToPILImage:
# x * 255 truncated) for pytorch-fid. Here: the same N score evaluations on the uniform grid from
# T to sde.eps = 1e-5 (score_sde's training range; the last step ends at t = 1e-5, where the VP
# noise std is 1.0e-3, a quarter of one 8-bit level, instead of 0) and no final denoising step.
# Their repository holds the App. I.3 CIFAR-10 runs (their own U-Net); Table 1's score_sde
# checkpoint is sampled here with the same conventions.
CAO_CONVENTIONS = {"sampling.method": "sde", "sampling.solver": "euler", "sampling.denoise": False}


def base_config(run: ct.Run):
  """score_sde's vp/cifar10_ddpmpp_continuous (configs/cifar_vp_dsm.py), sampled by Euler-Maruyama
  without a corrector, as Cao et al.'s code samples (CAO_CONVENTIONS)."""
  from configs.cifar_vp_dsm import get_config
  config = ct.with_fields(get_config(), **CAO_CONVENTIONS)
  config.seed = ct.SEED
  return ct.with_fields(config, **ct.smoke_fields()) if run.smoke else config


def cells(run: ct.Run, config, workdir: str, steps, cs) -> list[ct.Cell]:
  n = 4 if run.smoke else ct.FID_PROTOCOL["cao"]["n_samples"]
  state = {}

  def model_config():  # imported (or trained) once, for every cell
    if "config" not in state:
      state["config"] = ct.prepare_model(config, workdir, run.checkpoints[0]
                                         if run.checkpoints else "")
      net = run.feature_net()
      state["fid"] = net, ct.reference_stats(state["config"], net, run.args.out,
                                             run.args.fid_stats)
    return state["config"]

  def make(s: int, c: int) -> ct.Cell:
    def go():
      cfg = ct.with_fields(model_config(), **{"sampling.n_steps": s, "sampling.c": float(c)})
      samples, nfe = ct.sample_chunks(cfg, workdir, f"cao_steps{s}_c{c}", n, run.chunk())
      net, ref = state["fid"]
      return dict(ct.fid_of(samples, cfg, net, ref), nfe=nfe, n_samples=len(samples))
    row = ct.PRINTED["cao"][str(c)]
    printed = row.number(str(s)) if str(s) in row.columns else None
    return ct.Cell(f"steps{s}_c{c}", {"steps": s, "c": c}, go, nfe=s,
                   work={"sample": n * s}, printed={"fid": printed})

  return [make(s, c) for c in cs for s in steps]


def figure(result: dict, path: str) -> None:
  """FID against steps per c: printed (dashed) and reproduced (solid)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, c in enumerate(sorted({r["params"]["c"] for r in result["cells"].values()})):
    rows = sorted((r for r in result["cells"].values() if r["params"]["c"] == c),
                  key=lambda r: r["params"]["steps"])
    s = [r["params"]["steps"] for r in rows]
    ax.plot(s, [r["measured"]["fid"] for r in rows], "o-", color=f"C{i}",
            label=f"c = {c} reproduced")
    printed = [(x, r["printed"]["fid"]) for x, r in zip(s, rows) if r["printed"]["fid"]]
    if printed:
      ax.plot(*zip(*printed), "x--", color=f"C{i}", label=f"c = {c} printed")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("Euler-Maruyama steps")
  ax.set_ylabel("FID")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


TABLE = {"table": "Cao et al., Table 1: FID vs Euler-Maruyama steps and c = h²/g² (28 cells)",
         "checkpoint": "score_sde's vp/cifar10_ddpmpp_continuous (yang-song/score_sde and "
                       "score_sde_pytorch READMEs link the checkpoints)",
         "command": "python experiments/ode_vs_sde_cifar.py --checkpoint FILE --out DIR",
         "device_time": ("≈ 45 A100-hours (14 H100, 25 TPU v4) for the 28 cells: 0.10 (100 steps) to 4.1 "
                         "(4000 steps) per cell; XLA's FLOP count at 35 % of peak (--dry-run)"),
         "printed": "FID 6.89 (c = 0, 1000 steps) vs 6.70 (c = 1) / 6.69 (c = 2, 3000 steps)"}


def reproduced(result: dict) -> str:
  """The 'reproduced' cell of the README's CIFAR-10 tables block (experiments/claims.py)."""
  cells = result["cells"].values()
  best = min(cells, key=lambda r: r["measured"]["fid"])
  return (f"best FID {best['measured']['fid']:.2f} at {best['params']['steps']} steps, "
          f"c = {best['params']['c']} ({len(result['cells'])} cells)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ct.add_flags(parser, "score_sde's vp/cifar10_ddpmpp_continuous checkpoint (.pth or Flax)")
  parser.add_argument("--steps", type=int, nargs="+", default=None)
  parser.add_argument("--cs", type=int, nargs="+", default=None)
  run = ct.parse(parser, argv)
  steps = run.args.steps or (SMOKE_GRID[0] if run.smoke else STEPS)
  cs = run.args.cs or (SMOKE_GRID[1] if run.smoke else CS)
  config = base_config(run)
  grid = cells(run, config, os.path.join(run.args.out, "model"), steps, cs)
  header = (f"Cao et al. Table 1 (CIFAR-10, VP DDPM++ cont., Euler-Maruyama, no corrector), scale "
            f"{run.scale!r}. Sampler conventions as Cao et al.'s code: N uniform steps from T to "
            f"eps = 1e-5, no final denoising step, NFE = N (measured NFE in the table). "
            f"{ct.fid_note('cao')}")
  result = ct.finish(run, grid, config, [("fid", "FID"), ("nfe", "NFE")], header,
                     {"paper": "Cao et al., Table 1", "fid_protocol": ct.FID_PROTOCOL["cao"],
                      "checkpoint_choice": "the given checkpoint's EMA parameters"})
  if result is not None:
    figure(result, os.path.join(run.args.out, "fid_vs_steps.png"))
  return result


if __name__ == "__main__":
  main()
