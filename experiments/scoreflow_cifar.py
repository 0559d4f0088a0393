"""Song et al., "Maximum Likelihood Training of Score-Based Diffusion Models" (ScoreFlow), Table 2,
one CIFAR-10 row for a given model: NLL of the probability-flow ODE and the bound (eq. 39) in
bits/dim with uniform dequantization, then with variational dequantization (q_phi(u | k) fitted
to the frozen model through the bound, eq. 13, then evaluated), and the FID of ODE samples
(Dormand-Prince RK45, rtol = atol = 1e-5).

  python experiments/scoreflow_cifar.py --checkpoint CKPT --row "Baseline + LW + IS, VP" --out DIR
  python experiments/scoreflow_cifar.py --full --row "Baseline + LW + IS, VP" --out DIR

``--row`` names the Table 2 row the model is (it picks the printed numbers and, for --full or the
import, the SDE, weighting and depth: 'Deep' is DDPM++ with 8 residual blocks). The model lives in
DIR/model (imported by ``--mode=import`` or trained by ``--mode=train``); three cells: 'uniform'
(``--mode=eval``), 'variational' (``--mode=fit_dequantizer`` then ``--mode=eval`` with
eval.dequantization='variational') and 'fid' (``--mode=sample`` in resumable chunks + FID).
Likelihoods are one pass over the 10^4 test images (the paper: ~5x10^4 draws with replacement
from the test set, 95% CI radius ~0.006 bits/dim); checkpoint: the last (the paper: 'the last
checkpoint of each setting'). Writes DIR/result.json, DIR/table.md and
DIR/nll_printed_vs_reproduced.png.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cifar_protocol as ct  # noqa: E402

DEFAULT_ROW = "Baseline + LW + IS, VP"
WEIGHTING = {"": "default", " + LW": "likelihood", " + LW + IS": "likelihood_is"}
ODE_NFE = 550.0  # an estimate for the dry run: ScoreFlow §6, 'around 550' score evaluations
DEQUANTIZER_ITERS = 300_000  # ScoreFlow App. B: the dequantizer trained for 300,000 iterations
# Training iterations of --full as yang-song/score_flow's configs (commit a92204e): 1,300,001 in
# configs/default_cifar10_configs.py (training.n_iters; configs/default.py's default here), 950,001
# for the deep rows in configs/vp/cifar10_ddpmpp_deep_continuous.py; both train on data that is not
# dequantized (data.uniform_dequantization = False there and in configs/cifar_vp_lw_is.py).
DEEP_ITERS = 950_001
SMOKE_FIELDS = {"dequantizer.n_iters": 2, "dequantizer.batch_size": 4,
                     "dequantizer.bound_time_samples": 1, "dequantizer.flow_steps": 1,
                     "dequantizer.flow_hidden": 8, "dequantizer.context_features": 4,
                     "dequantizer.save_freq": 1, "sampling.rtol": 1e-2, "sampling.atol": 1e-2}


def row_config(row: str, run: ct.Run):
  """The row's model: configs/cifar_vp_lw_is.py or cifar_subvp_lw_is.py with the row's weighting
  ('Baseline' sigma^2, '+ LW' g^2, '+ LW + IS' g^2 with importance-sampled t) and depth."""
  from configs import cifar_subvp_lw_is, cifar_vp_lw_is
  model, sde = row.rsplit(", ", 1)
  config = (cifar_subvp_lw_is if sde == "subVP" else cifar_vp_lw_is).get_config()
  depth, weighting = ("Deep", model[4:]) if model.startswith("Deep") else ("Baseline", model[8:])
  fields = {"training.weighting": WEIGHTING[weighting], "sampling.method": "ode",
            "sampling.solver": "dopri5", "sampling.rtol": 1e-5, "sampling.atol": 1e-5,
            "eval.fid": False, "eval.num_samples": 64, "eval.ct_elbo": False,
            "dequantizer.n_iters": DEQUANTIZER_ITERS}
  if depth == "Deep":
    fields["model.num_res_blocks"] = 8
    fields["training.n_iters"] = DEEP_ITERS
  config = ct.with_fields(config, **fields)
  config.seed = ct.SEED
  if run.smoke:
    config = ct.with_fields(config, **ct.smoke_fields(), **SMOKE_FIELDS)
  return config


def cells(run: ct.Run, config, row: str) -> list[ct.Cell]:
  workdir = os.path.join(run.args.out, "model")
  printed = ct.PRINTED["scoreflow"][row]
  n = 4 if run.smoke else ct.FID_PROTOCOL["scoreflow"]["n_samples"]
  n_test = 9 if run.smoke else 10_000
  state = {}

  def model_config():
    if "config" not in state:
      state["config"] = ct.prepare_model(config, workdir, run.checkpoints[0]
                                         if run.checkpoints else "")
    return state["config"]

  def likelihood(dequantization: str):
    def go():
      cfg = ct.with_fields(model_config(), **{"eval.dequantization": dequantization})
      if dequantization == "variational":
        from modes.fit_dequantizer import fit_dequantizer
        fit_dequantizer(cfg, workdir)  # resumes from its last save; returns at once when done
      r = ct.evaluate_once(cfg, workdir, f"table_{dequantization}")
      return {"nll": r["bpd"], "nll_stderr": r["bpd_stderr"], "bound": r["bound_bpd"],
              "bound_stderr": r["bound_bpd_stderr"], "nfe": r["likelihood_nfe"],
              "n_examples": r["bpd_n_examples"]}
    return go

  def fid():
    cfg = model_config()
    net = run.feature_net()
    ref = ct.reference_stats(cfg, net, run.args.out, run.args.fid_stats)
    samples, nfe = ct.sample_chunks(cfg, workdir, "scoreflow_ode", n, run.chunk())
    return dict(ct.fid_of(samples, cfg, net, ref), nfe=nfe, n_samples=len(samples))

  bound_work = n_test * float(config.eval.bound_time_samples)
  train = (float(config.training.n_iters) * float(config.training.batch_size)  # counted once,
           if run.scale == "full" else 0.0)  # with the first cell, which trains the model
  d = config.dequantizer
  fit_work = float(d.n_iters) * float(d.batch_size) * float(d.bound_time_samples)
  return [
      ct.Cell("uniform", {"cell": "uniform dequantization"}, likelihood("uniform"), ODE_NFE,
              {"train": train, "likelihood": n_test * ODE_NFE, "bound": bound_work},
              {"nll": printed.number("nll_uniform"), "bound": printed.number("bound_uniform")}),
      ct.Cell("variational", {"cell": "variational dequantization"}, likelihood("variational"),
              ODE_NFE, {"dequantizer": fit_work, "likelihood": n_test * ODE_NFE,
                        "bound": bound_work},
              {"nll": printed.number("nll_variational"),
               "bound": printed.number("bound_variational")}),
      ct.Cell("fid", {"cell": "ODE samples (RK45)"}, fid, ODE_NFE, {"sample": n * ODE_NFE},
              {"fid": printed.number("fid")})]


TABLE = {"table": "ScoreFlow, Table 2 (CIFAR-10): NLL and bound with uniform / variational "
                  "dequantization, FID of ODE samples; one row per checkpoint",
         "checkpoint": "the row's model from github.com/yang-song/score_flow ('Code and "
                       "checkpoint are released', the paper's checklist)",
         "command": "python experiments/scoreflow_cifar.py --checkpoint FILE --row "
                    "'Baseline + LW + IS, VP' --out DIR",
         "device_time": ("≈ 102 A100-hours per row from --checkpoint (32 H100, 58 TPU v4; the "
                         "dequantizer fit 95 %); --full ≈ 154 (training 51); XLA's FLOP count at "
                         "35 % of peak (--dry-run)"),
         "printed": "Baseline + LW + IS, VP: 2.95 / 3.08 → 2.83 / 2.94 bits/dim, FID 6.03"}


def reproduced(result: dict) -> str:
  """The 'reproduced' cell of the README's CIFAR-10 tables block (experiments/claims.py)."""
  c = result["cells"]
  u, v, f = (c[k]["measured"] for k in ("uniform", "variational", "fid"))
  return (f"{result['row']}: {u['nll']:.2f} / {u['bound']:.2f} → {v['nll']:.2f} / "
          f"{v['bound']:.2f} bits/dim, FID {f['fid']:.2f}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ct.add_flags(parser, "a score_flow / score_sde checkpoint of the --row model")
  parser.add_argument("--row", default=DEFAULT_ROW, choices=sorted(ct.PRINTED["scoreflow"]))
  run = ct.parse(parser, argv)
  config = row_config(run.args.row, run)
  header = (f"ScoreFlow Table 2, row '{run.args.row}' (CIFAR-10; bits/dim, FID of RK45 ODE "
            f"samples), scale {run.scale!r}. {ct.fid_note('scoreflow')}")
  columns = [("nll", "NLL (bits/dim)"), ("bound", "bound (bits/dim)"), ("fid", "FID"),
             ("nfe", "NFE")]
  return ct.finish(run, cells(run, config, run.args.row), config, columns, header,
                   {"paper": "ScoreFlow, Table 2", "row": run.args.row,
                    "fid_protocol": ct.FID_PROTOCOL["scoreflow"],
                    "checkpoint_choice": "the last checkpoint (as the paper), EMA parameters"})


if __name__ == "__main__":
  main()
