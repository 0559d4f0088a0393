"""Benchmark: probability-flow ODE log-likelihood on device (diffrax) vs a SciPy host loop.

For the SAME jitted drift + divergence (``likelihood.drift_and_divergence``) it compares
  (a) ``likelihood.log_likelihood``: the whole batch solved on device in one jitted call, vmapped
      per example (per-example adaptive Dopri5 steps), and
  (b) SciPy ``solve_ivp(method='RK45')`` driving the jitted vector field from the host, once per
      example (``scipy_per_example``) and, as the original score_sde does, once for the whole
      flattened batch (``scipy_batched``, one shared step size; compared with the on-device
      ``per_example=False`` solve),
at rtol = atol = 1e-5 (ScoreFlow Appendix B). Reported per case: NFE per example, wall time after
warm-up, compile time separately, and max |delta log p| per example against SciPy. Cases: a toy
MLP (D = 2, four-mode GMM data, briefly DSM-trained) and a small U-Net on 8x8 digits (random
weights with non-zero output layers, Hutchinson divergence with the same probes in both solves).

Usage (from the repository root):
  python benchmarks/likelihood.py [--out benchmarks/results/likelihood.json] [--batch 8]
      [--cases mlp,unet] [--x64 [--reference]] [--repeats 3] [--mlp-train-steps 500]
Writes JSON to --out and prints it. Timings are only meaningful on an otherwise idle machine; the
JSON records the load average at start and end.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy
import scipy.integrate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import likelihood as L  # noqa: E402
import sde_lib  # noqa: E402
import toy_data  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------
def mlp_case(key, batch: int, train_steps: int, dtype) -> dict:
  """Toy MLP score model (models.mlp, noise parameterization) on the 2-D four-mode GMM, trained
  for ``train_steps`` Adam steps of sigma^2-weighted DSM (0 = random weights)."""
  import optax
  from models.mlp import MLPScore
  from models.utils import get_score_fn, init_model

  sde = sde_lib.VPSDE()
  gmm = toy_data.four_mode_gmm_2d()
  model = MLPScore(widths=(128, 128), embedding_dim=32)
  k_init, k_train, k_x = jax.random.split(key, 3)
  params = init_model(model, k_init, (8, 2))
  score = get_score_fn(sde, model, "noise")
  if train_steps:
    opt = optax.adam(2e-3)

    def loss(p, k):
      kx, kt, kz = jax.random.split(k, 3)
      x0 = gmm.sample(kx, 512)
      t = sde.uniform_sample_t(kt, (512,))
      z = jax.random.normal(kz, x0.shape)
      _, sigma = sde.marginal_coeffs(t)
      s = score(p, sde.perturb(x0, t, z), t)
      return jnp.mean(jnp.sum((sde_lib.bcast(sigma, s) * s + z) ** 2, axis=-1))

    @jax.jit
    def train(p, k):
      def step(carry, kk):
        p, o = carry
        g = jax.grad(loss)(p, kk)
        u, o = opt.update(g, o)
        return (optax.apply_updates(p, u), o), None
      (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(k, train_steps))
      return p

    params = train(params, k_train)
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
  x = gmm.sample(k_x, batch).astype(dtype)
  return dict(name="toy_mlp_gmm2d", sde=sde, score_fn=functools.partial(score, params), x=x,
              divergence="exact", train_steps=train_steps, num_levels=None)


def unet_case(key, batch: int, dtype) -> dict:
  """Small U-Net (models/unet.py: nf 16, ch_mult (1, 2), one block, attention at 4) on 8x8
  digits dequantized to [-1, 1] ((k + u)/17), random weights with init_scale = 1 so the output is
  not ~0; Hutchinson (Rademacher) divergence as for images in score_sde."""
  from sklearn.datasets import load_digits
  from models.unet import UNet
  from models.utils import get_score_fn, init_model

  sde = sde_lib.VPSDE()
  model = UNet(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
               init_scale=1.0, dtype=dtype)  # computation dtype (float64 with --x64)
  k_init, k_deq = jax.random.split(key)
  params = init_model(model, k_init, (2, 8, 8, 1))
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
  levels = load_digits().images[:batch].astype(np.int32)[..., None]  # (B, 8, 8, 1), 0..16
  x = L.uniform_dequantize(k_deq, jnp.asarray(levels), num_levels=17, centered=True, dtype=dtype)
  score = get_score_fn(sde, model, "noise")
  return dict(name="unet_digits8x8", sde=sde, score_fn=functools.partial(score, params), x=x,
              divergence="hutchinson", train_steps=0, num_levels=17)


# ------------------------------------------------------------------------------------------------
# Solves
# ------------------------------------------------------------------------------------------------
def _timed(fn, repeats: int):
  best = float("inf")
  out = None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return out, best


def run_diffrax(case, key, rtol, atol, repeats, per_example=True):
  sde, x = case["sde"], case["x"]
  fn = jax.jit(lambda x, k: L.log_likelihood(case["score_fn"], sde, x, k,
                                             divergence=case["divergence"], rtol=rtol, atol=atol,
                                             solver="dopri5", per_example=per_example))
  t0 = time.perf_counter()
  compiled = fn.lower(x, key).compile()
  compile_s = time.perf_counter() - t0
  out, run_s = _timed(lambda: compiled(x, key), repeats)
  return dict(compile_s=compile_s, run_s=run_s, logp=np.asarray(out["logp"], np.float64),
              nfe=np.asarray(out["nfe"]).tolist(), ok=bool(np.all(np.asarray(out["ok"]))))


def run_scipy(case, probes, rtol, atol, repeats, batched: bool):
  """SciPy RK45 driving the jitted vector field from the host (state in float64 on the host)."""
  sde, x = case["sde"], case["x"]
  field = L.drift_and_divergence(case["score_fn"], sde, case["divergence"])
  event = x.shape[1:]
  d = int(np.prod(event))
  dtype = x.dtype
  prior = sde.prior()
  eps, big_t = float(sde.eps), float(sde.T)
  if batched:
    jf = jax.jit(jax.vmap(field, in_axes=(0, None, 0)))
  else:
    jf = jax.jit(field)

  def solve_one(xi, vi, b):
    def fun(t, y):
      xs = jnp.asarray(y[:-b].reshape((b,) + event if batched else event), dtype)
      dx, div = jf(xs, jnp.asarray(t, dtype), vi)
      return np.concatenate([np.asarray(dx, np.float64).ravel(),
                             np.atleast_1d(np.asarray(div, np.float64))])
    y0 = np.concatenate([np.asarray(xi, np.float64).ravel(), np.zeros(b)])
    sol = scipy.integrate.solve_ivp(fun, (eps, big_t), y0, method="RK45", rtol=rtol, atol=atol)
    z = sol.y[:-b, -1].reshape((b,) + event)
    delta = sol.y[-b:, -1]
    return z, delta, sol.nfev, sol.success

  def run_all():
    if batched:
      z, delta, nfev, ok = solve_one(x, probes, x.shape[0])
      return z, delta, [nfev] * x.shape[0], ok
    zs, ds, nfes, oks = [], [], [], []
    for i in range(x.shape[0]):
      z, delta, nfev, ok = solve_one(x[i], probes[i], 1)
      zs.append(z[0]), ds.append(delta[0]), nfes.append(nfev), oks.append(ok)
    return np.stack(zs), np.asarray(ds), nfes, all(oks)

  # Compile time: the first call of the jitted field (trace + XLA compile).
  t0 = time.perf_counter()
  if batched:
    jax.block_until_ready(jf(x, jnp.asarray(eps, dtype), probes))
  else:
    jax.block_until_ready(jf(x[0], jnp.asarray(eps, dtype), probes[0]))
  compile_s = time.perf_counter() - t0
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = run_all()
    best = min(best, time.perf_counter() - t0)
  z, delta, nfes, ok = out
  with jax.enable_x64(True):
    logp = np.asarray(prior.log_prob(jnp.asarray(z, jnp.float64))) + delta
  return dict(compile_s=compile_s, run_s=best, logp=logp, nfe=[int(n) for n in nfes], ok=bool(ok))


def bench_case(case, key, rtol, atol, repeats, reference: bool) -> dict:
  x = case["x"]
  probes = (L.sample_probe(key, x.shape, "rademacher", x.dtype) if case["divergence"] == "hutchinson"
            else jnp.zeros_like(x))  # the probes log_likelihood draws from the same key
  dfx = run_diffrax(case, key, rtol, atol, repeats, per_example=True)
  dfb = run_diffrax(case, key, rtol, atol, repeats, per_example=False)
  sp = run_scipy(case, probes, rtol, atol, repeats, batched=False)
  sb = run_scipy(case, probes, rtol, atol, repeats, batched=True)
  nfe_d, nfe_s = np.asarray(dfx["nfe"], float), np.asarray(sp["nfe"], float)

  def summary(r, nfe_per_example=True):
    out = dict(compile_s=r["compile_s"], run_s=r["run_s"], ok=r["ok"])
    if nfe_per_example:
      out.update(nfe=r["nfe"], nfe_mean=float(np.mean(r["nfe"])), nfe_max=int(np.max(r["nfe"])))
    else:
      out.update(nfe=int(r["nfe"][0]))
    return out

  res = dict(
      case=case["name"], event_shape=list(x.shape[1:]), dim=int(np.prod(x.shape[1:])),
      batch=int(x.shape[0]), divergence=case["divergence"], train_steps=case["train_steps"],
      dtype=str(x.dtype), rtol=rtol, atol=atol,
      solver="diffrax.Dopri5 + likelihood.ScipyRK45Controller vs scipy solve_ivp RK45",
      diffrax_per_example=summary(dfx),
      scipy_per_example=summary(sp),
      diffrax_batched=summary(dfb, False),
      scipy_batched=summary(sb, False),
      nfe_ratio_per_example_mean=float(nfe_d.sum() / nfe_s.sum()),
      nfe_ratio_per_example=[float(r) for r in nfe_d / nfe_s],
      nfe_ratio_batched=float(dfb["nfe"][0] / sb["nfe"][0]),
      max_abs_dlogp_per_example=float(np.max(np.abs(dfx["logp"] - sp["logp"]))),
      max_abs_dlogp_batched=float(np.max(np.abs(dfb["logp"] - sb["logp"]))),
      logp_diffrax=[float(v) for v in dfx["logp"]],
      logp_scipy=[float(v) for v in sp["logp"]],
      speedup_per_example=float(sp["run_s"] / dfx["run_s"]),
      speedup_batched=float(sb["run_s"] / dfb["run_s"]),
  )
  if reference and res["dim"] <= 16:  # too expensive for the U-Net at 1e-10
    # Tight-tolerance on-device solve: the discretisation error of each method at rtol/atol.
    ref = run_diffrax(case, key, 1e-10, 1e-10, 1, per_example=True)
    res["reference_rtol_atol"] = 1e-10
    res["max_abs_err_vs_reference"] = dict(
        diffrax_per_example=float(np.max(np.abs(dfx["logp"] - ref["logp"]))),
        scipy_per_example=float(np.max(np.abs(sp["logp"] - ref["logp"]))),
        diffrax_batched=float(np.max(np.abs(dfb["logp"] - ref["logp"]))),
        scipy_batched=float(np.max(np.abs(sb["logp"] - ref["logp"]))))
  if case["num_levels"]:
    res["bpd_diffrax"] = [float(v) for v in L.bits_per_dim(
        jnp.asarray(dfx["logp"]), x.shape[1:], centered=True, num_levels=case["num_levels"])]
  res["goals"] = dict(
      nfe_within_10pct=bool(abs(res["nfe_ratio_per_example_mean"] - 1.0) <= 0.10
                            and abs(res["nfe_ratio_batched"] - 1.0) <= 0.10),
      logp_within_1e_3=bool(max(res["max_abs_dlogp_per_example"],
                                res["max_abs_dlogp_batched"]) <= 1e-3),
      on_device_not_slower=bool(dfx["run_s"] <= sp["run_s"] and dfb["run_s"] <= sb["run_s"]))
  return res


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "likelihood.json"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--cases", default="mlp,unet")
  p.add_argument("--rtol", type=float, default=1e-5)
  p.add_argument("--atol", type=float, default=1e-5)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--mlp-train-steps", type=int, default=500)
  p.add_argument("--x64", action="store_true", help="float64 network and solves")
  p.add_argument("--reference", action="store_true",
                 help="also a rtol = atol = 1e-10 solve (use with --x64) to report each method's error")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  load_start = os.getloadavg()
  results = []
  with jax.enable_x64(args.x64):
    dtype = jnp.float64 if args.x64 else jnp.float32
    key = jax.random.PRNGKey(args.seed)
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
      k_case, k_solve = jax.random.split(jax.random.fold_in(key, ("mlp", "unet").index(name)
                                                            if name in ("mlp", "unet") else 99))
      if name == "mlp":
        case = mlp_case(k_case, args.batch, args.mlp_train_steps, dtype)
      elif name == "unet":
        case = unet_case(k_case, args.batch, dtype)
      else:
        raise ValueError(f"--cases: unknown case {name!r} (mlp | unet)")
      results.append(bench_case(case, k_solve, args.rtol, args.atol, args.repeats, args.reference))
  report = dict(
      benchmark="likelihood: diffrax on-device vs scipy RK45 host loop",
      jax=jax.__version__, scipy=scipy.__version__, python=platform.python_version(),
      devices=[str(d) for d in jax.devices()], cpu_count=os.cpu_count(),
      loadavg_start=load_start, loadavg_end=os.getloadavg(),
      date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), args=vars(args),
      results=results)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
