"""Xu et al., "Stable Target Field for Reduced Variance Score Estimation in Diffusion Models",
Table 1, EDM rows: EDM trained with denoising score matching (DSM) vs the stable target field
(STF), the same network, seed and schedule; deterministic Heun, 18 noise levels = 35 NFE; FID and
Inception Score of 5x10^4 samples.

  python experiments/stf_edm_cifar.py --full --out DIR         # both trainings, then the FIDs
  python experiments/stf_edm_cifar.py --checkpoint DSM.pth STF.pth --out DIR

``--full`` trains configs/cifar_edm_dsm.py and configs/cifar_edm_stf.py (EDM's DDPM++ recipe:
200M images at batch 512 = 390,625 steps; STF reference batch 4096 as the paper's §6.2, 1024 as
its App. D.1 and released checkpoints: ``--ref-batch 1024``) into DIR/dsm and DIR/stf
(``--mode=train``: a preempted run resumes from its latest checkpoint). ``--checkpoint`` takes two
score_sde-format files (DSM first), imported with configs/cifar_vp_dsm.py's DDPM++ (EDM's own
pickles are not score_sde files). Checkpoint: the last (the paper picks the best FID of
snapshots every 2.5M images, as EDM: ``--eval-step`` evaluates another kept step). Writes
DIR/result.json, DIR/table.md, DIR/fid_printed_vs_reproduced.png.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cifar_tables as ct  # noqa: E402

TARGETS = ("dsm", "stf")
HEUN = {"sampling.method": "heun", "sampling.n_steps": 18, "sampling.c": 0.0,
        "sampling.S_churn": 0.0, "sampling.denoise": True}  # 2 * 18 - 1 = 35 NFE


def target_config(target: str, run: ct.Run):
  """--full: the EDM config of the target; --checkpoint / --smoke: score_sde's DDPM++ cont. VP
  (the importer's architecture) with the same Heun sampler."""
  from configs import cifar_edm_dsm, cifar_edm_stf, cifar_vp_dsm
  if run.scale == "full":
    config = (cifar_edm_stf if target == "stf" else cifar_edm_dsm).get_config()
    if target == "stf" and run.args.ref_batch:
      config.training.ref_batch_size = run.args.ref_batch
  else:
    config = cifar_vp_dsm.get_config()
  config = ct.with_fields(config, **HEUN, **{"eval.checkpoint": run.args.eval_step})
  config.seed = ct.SEED
  return ct.with_fields(config, **ct.smoke_fields()) if run.smoke else config


def cells(run: ct.Run) -> list[ct.Cell]:
  n = 4 if run.smoke else ct.FID_PROTOCOL["stf"]["n_samples"]
  shared = {}

  def make(i: int, target: str) -> ct.Cell:
    config = target_config(target, run)
    workdir = os.path.join(run.args.out, target)

    def go():
      cfg = ct.prepare_model(config, workdir, run.checkpoints[i] if run.checkpoints else "")
      if "fid" not in shared:
        net = run.feature_net()
        shared["fid"] = net, ct.reference_stats(cfg, net, run.args.out, run.args.fid_stats)
      samples, nfe = ct.sample_chunks(cfg, workdir, "stf_heun35", n, run.chunk())
      return dict(ct.fid_of(samples, cfg, *shared["fid"]), nfe=nfe, n_samples=len(samples))

    row = ct.PRINTED["stf"][f"{target}_ddpmpp"]
    train = (float(config.training.n_iters) * float(config.training.batch_size)
             if run.scale == "full" else 0.0)
    return ct.Cell(target, {"target": target.upper()}, go, nfe=35,
                   work={"train": train, "sample": n * 35.0},
                   printed={k: row.number(k) for k in ("fid", "inception_score", "nfe")})

  return [make(i, t) for i, t in enumerate(TARGETS)]


TABLE = {"table": "Xu et al. (STF), Table 1, EDM rows: DSM vs STF, Heun 35 NFE",
         "checkpoint": "none needed: --full trains both (the authors' EDM checkpoints, "
                       "github.com/Newbeeer/stf, are EDM pickles, not score_sde files)",
         "command": "python experiments/stf_edm_cifar.py --full --out DIR",
         "device_time": ("≈ 1.25×10⁶ CPU-hours (two trainings of 2×10⁸ images; sampling 5×10⁴ × "
                         "35 NFE is 0.9% of it); CPU-measured extrapolation, see below"),
         "printed": "FID 1.97 → 1.92 (DDPM++), 1.98 → 1.90 (NCSN++)"}


def reproduced(result: dict) -> str:
  """The 'reproduced' cell of the README's CIFAR-10 tables block (experiments/claims.py)."""
  d, s = (result["cells"][t]["measured"] for t in TARGETS)
  return f"FID {d['fid']:.2f} → {s['fid']:.2f} (DDPM++, {result['scale']})"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ct.add_flags(parser, "two score_sde-format checkpoints: DSM, then STF")
  parser.add_argument("--ref-batch", type=int, default=0,
                      help="--full: STF reference batch (0: the config's 4096)")
  parser.add_argument("--eval-step", type=int, default=-1,
                      help="checkpoint step to sample (-1: the last)")
  run = ct.parse(parser, argv, n_checkpoints=2)
  if run.args.ref_batch and run.scale != "full":
    parser.error("--ref-batch sets the STF training's reference batch: it needs --full")
  header = (f"Xu et al. Table 1, EDM + DDPM++ rows (Heun, 35 NFE; printed NCSN++ rows: DSM 1.98, "
            f"STF 1.90), scale {run.scale!r}. {ct.fid_note('stf')}")
  columns = [("fid", "FID"), ("inception_score", "Inception Score"), ("nfe", "NFE")]
  return ct.finish(run, cells(run), target_config("dsm", run), columns, header,
                   {"paper": "Xu et al. (STF), Table 1", "fid_protocol": ct.FID_PROTOCOL["stf"],
                    "checkpoint_choice": f"eval.checkpoint={run.args.eval_step} (-1: the last; "
                                         "the paper: best FID per 2.5M images, as EDM)"})


if __name__ == "__main__":
  main()
