"""scorelab side by side with score_sde_pytorch (the peer) on identical imported weights.

The weights are the shared nf-16 DDPM++ fixture (``tests/fixtures/score_sde_pytorch``, a copy of ../shared/fixtures, written
by the peer's own code: VP SDE, continuous, 446,051 parameters), the EMA set on both sides; scorelab
reads it with ``score_sde_import.import_pytorch_checkpoint``. Two worker processes (one per side,
the peer's modules share names with scorelab's) build everything once; then the parent asks them
in turn, A, B, A, B, ..., for

* sampling: PC, 200 steps of the reverse-diffusion predictor, one Langevin corrector step each
  (snr 0.16), denoised, 16 samples: scorelab by ``run_lib.generate`` (the ``--mode=sample`` path,
  its program compiled once before the rounds), the peer by ``sampling.get_pc_sampler``;
* likelihood: bits/dim of the probability-flow ODE (RK45 / Dopri5, rtol = atol = 1e-5, Hutchinson
  divergence with Rademacher probes, eps 1e-5) of ``--examples`` fixed dequantized images, one
  example per solve: scorelab by the ``--mode=eval`` per-example function
  (``parallel.map_dataset``), the peer by ``likelihood.get_likelihood_fn`` on a batch of one.
  Each round draws new probes on both sides; bits/dim agree when their difference is within 3
  standard errors of the Hutchinson noise measured over the rounds.

Medians over ``--rounds`` rounds, with the load average after every round (the machine may be
shared: only interleaved medians compare). JSON and a markdown table go to benchmarks/results/.
Both sides use ``--threads`` CPU threads (torch.set_num_threads; XLA's CPU client is
single-process and uses the machine's cores).

It needs torch and a copy of score_sde_pytorch (``--peer_dir``); without them it prints why and
exits 0 without measuring (it is not part of the test suite):

  python benchmarks/peer_score_sde.py --peer_dir=/path/to/score_sde_pytorch [--rounds 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.worker_process import WorkerProcess, write_report  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
FIXTURE = os.path.join(REPO, "tests", "fixtures", "score_sde_pytorch", "checkpoint_ddpmpp_nf16.pth")
PEER_FILES = ("sampling.py", "likelihood.py", "sde_lib.py", "models/ncsnpp.py",
              "configs/vp/cifar10_ddpmpp_continuous.py")
SNR, EPS_SAMPLING, EPS_LIKELIHOOD, TOL = 0.16, 1e-3, 1e-5, 1e-5


def unavailable(peer_dir: str | None, fixture: str = FIXTURE) -> str | None:
  """Why the comparison cannot run here (None: it can)."""
  if importlib.util.find_spec("torch") is None:
    return "torch is not installed (pip install torch; it is not a scorelab requirement)"
  if not peer_dir:
    return "no --peer_dir: give the path of a score_sde_pytorch snapshot"
  missing = [f for f in PEER_FILES if not os.path.isfile(os.path.join(peer_dir, f))]
  if missing:
    return f"--peer_dir={peer_dir} is not a score_sde_pytorch snapshot (missing {', '.join(missing)})"
  if not os.path.isfile(fixture):
    return f"the fixture {fixture} is missing"
  return None


def test_images(n: int):
  """n fixed dequantized CIFAR-shaped images in [0, 1) (NHWC), the same on both sides: smooth
  random colour fields quantized to 256 levels, plus uniform dequantization noise."""
  import numpy as np
  rng = np.random.default_rng(0)
  coarse = rng.uniform(0, 1, (n, 4, 4, 3))
  smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
  levels = np.clip(np.floor(256 * (0.8 * smooth + 0.2 * rng.uniform(0, 1, smooth.shape))), 0, 255)
  return ((levels + rng.uniform(0, 1, levels.shape)) / 256).astype(np.float32)


# -- workers (one process per side) ----------------------------------------------------------------
def _serve(tasks: dict, ready: dict) -> None:
  """READY line, then one RESULT line per request ('<task> <round>') read from stdin."""
  print("READY " + json.dumps(ready), flush=True)
  for line in sys.stdin:
    task, r = line.split()
    t0 = time.perf_counter()
    out = tasks[task](int(r))
    print("RESULT " + json.dumps(dict(out, seconds=time.perf_counter() - t0)), flush=True)


def _scorelab_worker(spec: dict) -> None:
  import jax
  import numpy as np

  import datasets
  import likelihood
  import parallel
  import run_lib
  import score_sde_import as ssi
  import sde_lib
  from configs import cifar_vp_dsm
  from models import get_model
  from models.utils import score_fn_from_config
  from modes.evaluate import _likelihood_fns

  config = cifar_vp_dsm.get_config()
  config.model.nf, config.model.num_res_blocks = 16, 1
  imported = ssi.import_pytorch_checkpoint(config, FIXTURE)
  config = ssi.apply_overrides(config, dict(imported["config_overrides"], **{
      "sampling.method": "pc", "sampling.n_steps": spec["steps"], "sampling.n_corrector_steps": 1,
      "sampling.snr": SNR, "sampling.predictor": "reverse_diffusion", "sampling.denoise": True,
      "sampling.c": 1.0, "sampling.n_samples": spec["samples"],
      "sampling.batch_size": spec["samples"], "eval.divergence": "hutchinson",
      "eval.hutchinson_probe": "rademacher", "eval.rtol": TOL, "eval.atol": TOL}))
  import config_schema
  config = config_schema.validate(config)  # the typed sections the library takes
  sde = sde_lib.get_sde(config.sde)
  assert abs(float(sde.eps) - EPS_LIKELIHOOD) < 1e-12, sde.eps
  apply = score_fn_from_config(config.model, sde, get_model(config))
  params = imported["ema_params"]
  model = run_lib.ScoreModel(sde=sde, score_fn=lambda x, t: apply(params, x, t),
                             event_shape=(32, 32, 3), step=int(imported["step"]),
                             prior=sde.prior(), params=params, apply=apply)
  per_sample = run_lib.per_sample_fn(config, model)
  per_example_logp = parallel.per_example(_likelihood_fns(config, model)[0])  # --mode=eval's
  y = 2 * test_images(spec["examples"]) - 1  # centered data
  key = jax.random.PRNGKey(0)

  def sample(r):
    x, nfe = run_lib.generate(config, model, spec["samples"], jax.random.fold_in(key, r),
                              per_sample=per_sample)
    return {"nfe": nfe, "finite": bool(np.all(np.isfinite(x)))}

  def bpd(r):
    out = parallel.map_dataset(per_example_logp, params, datasets.array_eval_batches(y, 1),
                               jax.random.fold_in(key, 1000 + r))
    return {"bpd": [float(v) for v in likelihood.bits_per_dim(out["logp"], y.shape[1:],
                                                               centered=True)],
            "nfe": [float(v) for v in out["nfe"]]}

  t0 = time.perf_counter()
  sample(10_000)  # compiles; ``per_sample`` keeps the program for the rounds
  compile_sample = time.perf_counter() - t0
  _serve({"sample": sample, "likelihood": bpd},
         {"sample_first_call_s": compile_sample, "jax": jax.__version__,
          "devices": len(jax.devices()),
          "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))})


def _peer_worker(spec: dict) -> None:
  ours = (os.path.dirname(os.path.abspath(__file__)), REPO)  # likelihood.py etc. of our own
  sys.path[:] = [spec["peer_dir"]] + [p for p in sys.path if p and os.path.abspath(p) not in ours]
  import torch
  import torch.utils.cpp_extension
  torch.utils.cpp_extension.load = lambda *a, **k: None  # op/: CUDA kernels, unused on CPU
  torch.set_num_threads(spec["threads"])
  import likelihood
  import sampling
  import sde_lib
  from configs.vp import cifar10_ddpmpp_continuous
  from models import ncsnpp  # noqa: F401  (registers the model)
  from models import utils as mutils
  from models.ema import ExponentialMovingAverage

  config = cifar10_ddpmpp_continuous.get_config()
  config.model.nf, config.model.num_res_blocks = 16, 1
  config.device = torch.device("cpu")
  model = mutils.create_model(config)
  state = torch.load(FIXTURE, map_location="cpu", weights_only=False)
  model.load_state_dict(state["model"])
  ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
  ema.load_state_dict(state["ema"])
  ema.copy_to(model.parameters())
  model.eval()
  sde = sde_lib.VPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max, N=spec["steps"])
  inverse_scaler = lambda x: (x + 1.0) / 2.0  # noqa: E731  (centered data)
  sampler = sampling.get_pc_sampler(
      sde, (spec["samples"], 3, 32, 32), sampling.ReverseDiffusionPredictor,
      sampling.LangevinCorrector, inverse_scaler, snr=SNR, n_steps=1, probability_flow=False,
      continuous=True, denoise=True, eps=EPS_SAMPLING, device="cpu")
  likelihood_fn = likelihood.get_likelihood_fn(sde, inverse_scaler, hutchinson_type="Rademacher",
                                               rtol=TOL, atol=TOL, method="RK45",
                                               eps=EPS_LIKELIHOOD)
  y = torch.from_numpy(2 * test_images(spec["examples"]) - 1).permute(0, 3, 1, 2).contiguous()

  def sample(r):
    torch.manual_seed(r)
    x, nfe = sampler(model)
    return {"nfe": float(nfe), "finite": bool(torch.isfinite(x).all())}

  def bpd(r):
    torch.manual_seed(1000 + r)
    out = [likelihood_fn(model, y[i:i + 1]) for i in range(len(y))]
    return {"bpd": [float(b[0]) for b, _, _ in out], "nfe": [float(n) for _, _, n in out]}

  _serve({"sample": sample, "likelihood": bpd},
         {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "params": sum(p.numel() for p in model.parameters())})


# -- parent ----------------------------------------------------------------------------------------
class Worker(WorkerProcess):
  """The worker of one side ('scorelab' or 'peer', run in the peer's checkout)."""

  def __init__(self, side: str, spec: dict):
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    cwd = spec["peer_dir"] if side == "peer" else REPO
    super().__init__(__file__, ["--worker", side, "--spec", json.dumps(spec)], f"peer_{side}", env,
                     cwd, close_timeout_s=120)

  def ask(self, task: str, r: int) -> dict:
    return self.request(f"{task} {r}")


def run(args) -> dict:
  spec = {"peer_dir": os.path.abspath(args.peer_dir), "samples": args.samples, "steps": args.steps,
          "examples": args.examples, "threads": args.threads}
  out = {"load_average_start": os.getloadavg(), "rounds": args.rounds, "spec": spec,
         "sampling": f"PC, {args.steps} steps, 1 corrector step (snr {SNR}), denoised, "
                     f"{args.samples} samples",
         "likelihood": f"probability-flow ODE, RK45/Dopri5 rtol=atol={TOL}, Hutchinson "
                       f"(Rademacher), {args.examples} examples, one per solve"
                       if args.examples else "not run (--examples 0)"}
  workers = {}
  for side in ("scorelab", "peer"):
    workers[side] = Worker(side, spec)
    print(f"{side} ready: {json.dumps(workers[side].info)}", flush=True)
  out["sides"] = {s: dict(w.info, sample=[], likelihood=[]) for s, w in workers.items()}
  out["load_average_rounds"] = []
  for r in range(args.rounds):
    order = ("scorelab", "peer") if r % 2 == 0 else ("peer", "scorelab")
    for task in ("sample", "likelihood") if args.examples else ("sample",):
      for side in order:
        got = workers[side].ask(task, r)
        out["sides"][side][task].append(got)
        print(f"round {r + 1}/{args.rounds} {side} {task}: {json.dumps(got)}", flush=True)
    out["load_average_rounds"].append(os.getloadavg())
    with open(args.out + ".partial", "w") as f:  # what a stopped run leaves
      json.dump(out, f, indent=2)
  for w in workers.values():
    w.close()
  out["load_average_end"] = os.getloadavg()
  summarize(out, args.samples, args.examples)
  return out


def summarize(out: dict, samples: int, examples: int) -> None:
  """Medians, images/s, s per example, NFE, and the bits/dim agreement test."""
  import numpy as np
  for side in out["sides"].values():
    side["sample_s_median"] = statistics.median(g["seconds"] for g in side["sample"])
    side["images_per_s"] = samples / side["sample_s_median"]
    if not examples:  # --examples 0: sampling only
      continue
    side["likelihood_s_per_example_median"] = statistics.median(
        g["seconds"] / examples for g in side["likelihood"])
    bpd = np.array([g["bpd"] for g in side["likelihood"]])  # (rounds, examples)
    side["bpd_mean"] = bpd.mean(0).tolist()
    side["bpd_hutchinson_std"] = bpd.std(0, ddof=1).tolist() if len(bpd) > 1 else None
    side["nfe_median"] = float(np.median([g["nfe"] for g in side["likelihood"]]))
  a, b = out["sides"]["scorelab"], out["sides"]["peer"]
  out["images_per_s_ratio"] = a["images_per_s"] / b["images_per_s"]
  if not examples:
    return
  out["likelihood_speedup"] = b["likelihood_s_per_example_median"] / a[
      "likelihood_s_per_example_median"]
  if a["bpd_hutchinson_std"] is not None:
    n = len(a["likelihood"])
    se = np.sqrt((np.square(a["bpd_hutchinson_std"]) + np.square(b["bpd_hutchinson_std"])) / n)
    diff = np.abs(np.subtract(a["bpd_mean"], b["bpd_mean"]))
    out["bpd_abs_diff"] = diff.tolist()
    out["bpd_diff_stderr"] = se.tolist()
    out["bpd_agree_within_3_stderr"] = bool(np.all(diff <= 3 * se))


def markdown(out: dict) -> str:
  a, b = out["sides"]["scorelab"], out["sides"]["peer"]
  loads = [f"{l[0]:.1f}" for l in out["load_average_rounds"]]
  rows = [
      f"Sampling: {out['sampling']}. Likelihood: {out['likelihood']}. {out['rounds']} interleaved "
      f"rounds; 1-min load average after each round: {', '.join(loads)}; medians.", "",
      "| | scorelab | score_sde_pytorch | scorelab / peer |", "|---|---|---|---|",
      f"| sampling, images/s | {a['images_per_s']:.3f} | {b['images_per_s']:.3f} | "
      f"{out['images_per_s_ratio']:.2f}× |"]
  if "likelihood_speedup" in out:
    rows += [
      f"| likelihood, s per example | {a['likelihood_s_per_example_median']:.1f} | "
      f"{b['likelihood_s_per_example_median']:.1f} | {out['likelihood_speedup']:.2f}× faster |",
      f"| likelihood NFE (median) | {a['nfe_median']:.0f} | {b['nfe_median']:.0f} | |",
      f"| bits/dim per example (mean over rounds) | "
      f"{', '.join(f'{v:.4f}' for v in a['bpd_mean'])} | "
      f"{', '.join(f'{v:.4f}' for v in b['bpd_mean'])} | |"]
  if "bpd_agree_within_3_stderr" in out:
    rows.append(f"| \\|Δ bits/dim\\| vs Hutchinson std. error | "
                f"{', '.join(f'{d:.4f}' for d in out['bpd_abs_diff'])} | "
                f"{', '.join(f'{s:.4f}' for s in out['bpd_diff_stderr'])} | agree within 3 s.e.: "
                f"{out['bpd_agree_within_3_stderr']} |")
  rows.append(f"\nscorelab: jax {a.get('jax')}, first sampling call (compile + run) "
              f"{a['sample_first_call_s']:.1f} s; peer: torch {b.get('torch')}, "
              f"{b.get('threads')} threads; parameters {a['params']:,} / {b['params']:,}.")
  return "\n".join(rows) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--peer_dir", default=None, help="a score_sde_pytorch snapshot")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--samples", type=int, default=16)
  p.add_argument("--steps", type=int, default=200, help="PC predictor steps")
  p.add_argument("--examples", type=int, default=2,
                 help="likelihood examples per round (0: sampling only)")
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  p.add_argument("--out", default=os.path.join(RESULTS, "peer_score_sde.json"))
  p.add_argument("--worker", choices=("scorelab", "peer"), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    (_scorelab_worker if args.worker == "scorelab" else _peer_worker)(json.loads(args.spec))
    return
  why = unavailable(args.peer_dir)
  if why:
    print(f"peer_score_sde: skipped, {why}")
    return
  write_report(run(args), args.out, markdown)


if __name__ == "__main__":
  main()
