"""Xu et al., "Stable Target Field for Reduced Variance Score Estimation in Diffusion Models",
Table 1, EDM rows: EDM trained with denoising score matching (DSM) vs the stable target field
(STF), the same network, seed and schedule; deterministic Heun, 18 noise levels = 35 NFE; FID and
Inception Score of 5x10^4 samples, for the DDPM++ or the NCSN++ rows (``--arch``).

  python experiments/stf_edm_cifar.py --checkpoint DSM.pkl STF.pkl --out DIR   # the authors' models
  python experiments/stf_edm_cifar.py --full --arch ncsnpp --out DIR           # both trainings

``--checkpoint`` takes two EDM network pickles (DSM first: NVlabs' edm-cifar10-32x32-uncond-vp.pkl
and the STF authors' release, or any ``network-snapshot-*.pkl``), read as data by
``--mode=import`` (edm_pickle.py: nothing in them runs), which configures the network from the
pickle; score_sde-format files are imported onto configs/cifar_vp_dsm.py's DDPM++ as before.
``--full`` trains EDM's SongUNet (``--arch``) with configs/cifar_edm_dsm.py and cifar_edm_stf.py:
200M images at batch 512 (``--grad-accum 4``: micro-batches of 128 fit one 80 GB device,
benchmarks/results/memory_accum.md), STF
reference batch 1024 as the authors' released models (``--ref-batch 4096``: the main text), a
snapshot every 2.5M images kept, so the best snapshot can be chosen (``--eval-step``) as the
paper does. Each target is scored ``--seeds`` times (3: mean ± sd and minimum, as EDM). Writes
DIR/result.json, DIR/table.md, DIR/fid_printed_vs_reproduced.png.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import cifar_protocol as ct  # noqa: E402

TARGETS = ("dsm", "stf")
SNAPSHOT_IMAGES = 2_500_000  # App. D.1: a snapshot per 2.5M images, as EDM (snapshot_ticks 50 x 50 kimg)
REF_BATCH = 1024  # App. D.1 and the released checkpoints (github.com/Newbeeer/stf: --rbatch 1024)
PRINTED_CHOICE = ("the paper prints, per row, the lowest FID over snapshots taken every 2.5M "
                  "images (App. D.1, 'as in Karras et al.'), and EDM reports the minimum of three "
                  "FID evaluations: compare the printed value with the minimum column")
HEUN = {"sampling.method": "heun", "sampling.n_steps": 18, "sampling.c": 0.0,
        "sampling.S_churn": 0.0, "sampling.denoise": True}  # 2 * 18 - 1 = 35 NFE


def _edm_pickles(run: ct.Run) -> bool:
  return bool(run.checkpoints) and all(c.endswith(".pkl") for c in run.checkpoints)


def target_config(target: str, run: ct.Run):
  """--full: EDM's SongUNet (--arch) with the EDM config of the target, snapshots every 2.5M images
  kept; --checkpoint of EDM pickles: the EDM config (the import sets the network from the pickle);
  score_sde files / --smoke: score_sde's DDPM++ cont. VP (the importer's architecture). All with
  the same Heun sampler."""
  from configs import cifar_edm_dsm, cifar_edm_stf, cifar_vp_dsm
  from configs.default_image import songunet_model
  if run.scale == "full":
    config = (cifar_edm_stf if target == "stf" else cifar_edm_dsm).get_config()
    songunet_model(config.model, run.args.arch)
    tr = config.training
    if target == "stf":
      tr.ref_batch_size = run.args.ref_batch or REF_BATCH
    tr.snapshot_freq = max(1, round(SNAPSHOT_IMAGES / tr.batch_size))
    tr.max_to_keep = tr.n_iters // tr.snapshot_freq + 1
    if run.args.grad_accum > 1:
      tr.grad_accum_steps = run.args.grad_accum
  elif _edm_pickles(run):
    config = cifar_edm_dsm.get_config()
  else:
    config = cifar_vp_dsm.get_config()
  config = ct.with_fields(config, **HEUN, **{"eval.checkpoint": run.args.eval_step})
  config.seed = ct.SEED
  return ct.with_fields(config, **ct.smoke_fields()) if run.smoke else config


def _check_arch(cfg, arch: str, source: str) -> None:
  """The imported network is the row's architecture (NCSN++: Fourier embedding)."""
  imported = "ncsnpp" if cfg.model.embedding_type == "fourier" else "ddpmpp"
  if imported != arch:
    raise ValueError(f"{source} holds EDM's {imported} network but --arch={arch}: pass "
                     f"--arch={imported} (it picks the printed row)")


def cells(run: ct.Run) -> list[ct.Cell]:
  """One cell per (target, seed): seed k samples with config.seed + 1000 k."""
  n = 4 if run.smoke else ct.FID_PROTOCOL["stf"]["n_samples"]
  shared = {}

  def make(i: int, target: str, k: int) -> ct.Cell:
    config = target_config(target, run)
    workdir = os.path.join(run.args.out, target)

    def go():
      if target not in shared:
        shared[target] = ct.prepare_model(config, workdir,
                                          run.checkpoints[i] if run.checkpoints else "")
        if _edm_pickles(run):
          _check_arch(shared[target], run.args.arch, run.checkpoints[i])
      cfg = shared[target].copy_and_resolve_references()
      cfg.seed = ct.SEED + 1000 * k
      if "fid" not in shared:
        net = run.feature_net()
        shared["fid"] = net, ct.reference_stats(cfg, net, run.args.out, run.args.fid_stats)
      samples, nfe = ct.sample_chunks(cfg, workdir, f"stf_heun35_seed{k}", n, run.chunk())
      return dict(ct.fid_of(samples, cfg, *shared["fid"],
                            rounding=ct.FID_PROTOCOL["stf"]["rounding"]),
                  nfe=nfe, n_samples=len(samples))

    row = ct.PRINTED["stf"][f"{target}_{run.args.arch}"]
    train = (float(config.training.n_iters) * float(config.training.batch_size)
             if run.scale == "full" and k == 0 else 0.0)
    return ct.Cell(f"{target}_seed{k}", {"target": target.upper(), "seed": k}, go, nfe=35,
                   work={"train": train, "sample": n * 35.0},
                   printed={m: row.number(m) for m in ("fid", "inception_score", "nfe")})

  return [make(i, t, k) for i, t in enumerate(TARGETS) for k in range(run.args.seeds)]


def summary(result: dict) -> dict:
  """Per target: FID mean ± sd over the seeds, and the minimum (EDM's report)."""
  out = {}
  for target in TARGETS:
    fids = [c["measured"]["fid"] for c in result["cells"].values()
            if c["params"]["target"] == target.upper()]
    out[target] = {"fid_mean": float(np.mean(fids)), "fid_sd": float(np.std(fids, ddof=1))
                   if len(fids) > 1 else float("nan"), "fid_min": float(np.min(fids)),
                   "n_seeds": len(fids)}
  return out


def summary_markdown(s: dict, arch: str) -> str:
  lines = ["", f"FID over seeds ({PRINTED_CHOICE}):", "",
           "| target | FID mean ± sd | FID min | printed | seeds |", "|---|---|---|---|---|"]
  for target, v in s.items():
    printed = ct.PRINTED["stf"][f"{target}_{arch}"].number("fid")
    lines.append(f"| {target.upper()} | {v['fid_mean']:.2f} ± {v['fid_sd']:.2f} | "
                 f"{v['fid_min']:.2f} | {printed} | {v['n_seeds']} |")
  return "\n".join(lines) + "\n"


TABLE = {"table": "Xu et al. (STF), Table 1, EDM rows: DSM vs STF, Heun 35 NFE",
         "checkpoint": "the authors' EDM pickles (github.com/Newbeeer/stf; DSM: NVlabs' "
                       "edm-cifar10-32x32-uncond-vp.pkl), read as data; or --full",
         "command": "python experiments/stf_edm_cifar.py --checkpoint DSM.pkl STF.pkl --out DIR",
         "device_time": ("≈ 2.2 A100-hours from --checkpoint (0.7 H100, 1.2 TPU v4: 3 × 5×10⁴ "
                         "samples per target); --full ≈ 248 (two trainings of 2×10⁸ images: 99 %); "
                         "XLA's FLOP count at 35 % of peak (--dry-run)"),
         "printed": "FID 1.97 → 1.92 (DDPM++), 1.98 → 1.90 (NCSN++)"}


def reproduced(result: dict) -> str:
  """The 'reproduced' cell of the README's CIFAR-10 tables block (experiments/claims.py)."""
  s = result.get("summary") or summary(result)
  arch = {"ddpmpp": "DDPM++", "ncsnpp": "NCSN++"}[result.get("arch", "ddpmpp")]
  return (f"FID (min of {s['dsm']['n_seeds']}) {s['dsm']['fid_min']:.2f} → {s['stf']['fid_min']:.2f}"
          f" ({arch}, {result['scale']})")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ct.add_flags(parser, "two EDM network pickles (or score_sde-format files): DSM, then STF")
  parser.add_argument("--arch", choices=("ddpmpp", "ncsnpp"), default="ddpmpp",
                      help="the printed rows (and --full's network): EDM's DDPM++ or NCSN++")
  parser.add_argument("--seeds", type=int, default=0,
                      help="FID evaluations per target, each with its own samples (0: 3, smoke 1)")
  parser.add_argument("--ref-batch", type=int, default=0,
                      help=f"--full: STF reference batch (0: {REF_BATCH}, the released models')")
  parser.add_argument("--grad-accum", type=int, default=1,
                      help="--full: micro-batches per step (training.grad_accum_steps)")
  parser.add_argument("--eval-step", type=int, default=-1,
                      help="checkpoint step to sample (-1: the last)")
  run = ct.parse(parser, argv, n_checkpoints=2)
  if (run.args.ref_batch or run.args.grad_accum > 1) and run.scale != "full":
    parser.error("--ref-batch / --grad-accum set the training: they need --full")
  run.args.seeds = run.args.seeds or (1 if run.smoke else 3)
  arch = {"ddpmpp": "DDPM++", "ncsnpp": "NCSN++"}[run.args.arch]
  header = (f"Xu et al. Table 1, EDM + {arch} rows (Heun, 35 NFE), scale {run.scale!r}, "
            f"{run.args.seeds} FID evaluation(s) per target. {ct.fid_note('stf')}")
  columns = [("fid", "FID"), ("inception_score", "Inception Score"), ("nfe", "NFE")]
  result = ct.finish(run, cells(run), target_config("dsm", run), columns, header,
                     {"paper": "Xu et al. (STF), Table 1", "arch": run.args.arch,
                      "fid_protocol": ct.FID_PROTOCOL["stf"], "printed_choice": PRINTED_CHOICE,
                      "checkpoint_choice": f"eval.checkpoint={run.args.eval_step} (-1: the last; "
                                           "the paper: best FID per 2.5M images, as EDM)"})
  if result is not None:
    result["summary"] = summary(result)
    import run_lib
    run_lib.write_json(os.path.join(run.args.out, "result.json"), result)
    with open(os.path.join(run.args.out, "table.md"), "a") as f:
      f.write(summary_markdown(result["summary"], run.args.arch))
  return result


if __name__ == "__main__":
  main()
