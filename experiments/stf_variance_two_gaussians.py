"""Xu et al., "Stable Target Field", Theorem 2 and Fig. 2(b) / 3(c) shape: the trace of covariance
of the DSM target V_DSM(t) (eq. 4) and of the STF target V_STF(t; n) (§5.2) on the paper's
Two Gaussians in 64-D (App. C: 1/2 N(mu, s^2 I) + 1/2 N(-mu, s^2 I), mu = 0.1 * 1, s = 1e-4; VE SDE,
sigma_m = 1e-2, sigma_M = 50), Monte Carlo (``losses.v_dsm`` / ``losses.v_stf`` with the exact
marginal score) against the closed form of V_DSM, and the ratio (n - 1) V_STF / V_DSM, which
Theorem 2 predicts -> 1 in the far field (large t, where p_{0|t} ~ p_0; exactly (n - 1)/n there).

  python experiments/stf_variance_two_gaussians.py --out DIR [--full | --smoke]

Closed form (derived here; App. C prints a variant with typos): with x_t = alpha x_0 + sigma z and
v = alpha^2 s^2 + sigma^2, the DSM target minus the true score is alpha (x_0 - E[x_0|x_t]) / sigma^2,
so V_DSM = alpha^2 / sigma^4 E tr Cov(x_0 | x_t). Given x_t the posterior is a two-component
mixture with covariances s^2 sigma^2 / v I, means 2 mu sigma^2 / v apart, and weight
w = sigmoid(2 alpha mu.x_t / v):
    V_DSM(t) = alpha^2 d s^2 / (sigma^2 v) + 4 alpha^2 |mu|^2 E[w (1 - w)] / v^2,
with E over u = mu.x_t / |mu| ~ N(alpha |mu|, v) (by symmetry), by Gauss-Hermite quadrature.
Writes DIR/result.json, DIR/table.md, DIR/variance_vs_t.png and DIR/ratio_vs_t.png.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

SCALES = {  # time grid, Monte Carlo points M (the paper: 1k), reference batch sizes n
    "smoke": dict(ts=(0.1, 0.5, 1.0), m=128, ns=(4, 16)),
    "default": dict(ts=tuple(np.round(np.linspace(0.05, 1.0, 12), 4)), m=1000,
                    ns=(4, 16, 64, 256)),
    "full": dict(ts=tuple(np.round(np.linspace(0.02, 1.0, 25), 4)), m=4000,
                 ns=(4, 16, 64, 256, 1024)),
}


def v_dsm_closed_form(sde, t: float, mu_norm: float, s: float, d: int, n_nodes: int = 200) -> float:
  """V_DSM(t) of 1/2 N(mu, s^2 I_d) + 1/2 N(-mu, s^2 I_d) (module docstring), float64 NumPy."""
  alpha, sigma = (float(v) for v in sde.marginal_coeffs(np.float64(t)))
  v = alpha**2 * s**2 + sigma**2
  nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)  # E over N(0, 1)
  u = alpha * mu_norm + np.sqrt(v) * nodes
  w = 1.0 / (1.0 + np.exp(-2.0 * alpha * mu_norm * u / v))
  e_w = float(np.sum(weights * w * (1.0 - w)) / np.sqrt(2.0 * np.pi))
  return alpha**2 * d * s**2 / (sigma**2 * v) + 4.0 * alpha**2 * mu_norm**2 * e_w / v**2


def measure(scale: str) -> list[dict]:
  """One row per t: closed-form and Monte Carlo V_DSM, V_STF per n, ratios, standard errors."""
  import jax
  import jax.numpy as jnp
  import losses
  import sde_lib
  import toy_data
  from progress import Progress
  s = SCALES[scale]
  rows = []
  with jax.enable_x64(True):
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
    data = toy_data.two_gaussians_64d()
    mu_norm = float(jnp.linalg.norm(data.means[0]))
    comp_std = float(jnp.sqrt(data.covs[0, 0, 0]))
    score = lambda x, t: data.marginal_score(sde, x, t[0])  # noqa: E731  (examples share t)
    v_dsm = jax.jit(lambda x, t, k: losses.v_dsm(sde, x, t, k, score))
    v_stf = jax.jit(lambda x, r, t, k: losses.v_stf(sde, x, r, t, k, score))
    m = s["m"]
    with Progress("V_DSM / V_STF over t", len(s["ts"]), "times") as progress:
      for i, t in enumerate(s["ts"]):
        k0, k1, kz = jax.random.split(jax.random.PRNGKey(i), 3)
        x0 = data.sample(k0, m)
        vd, vd_se = (float(v) for v in v_dsm(x0, t, kz))
        row = {"t": float(t), "v_dsm_closed_form": v_dsm_closed_form(sde, t, mu_norm, comp_std, 64),
               "v_dsm": vd, "v_dsm_stderr": vd_se, "v_stf": {}, "v_stf_stderr": {}, "ratio": {},
               "ratio_stderr": {}}
        for n in s["ns"]:
          ref = data.sample(jax.random.fold_in(k1, n), m * (n - 1)).reshape(m, n - 1, 64)
          vs, vs_se = (float(v) for v in v_stf(x0, ref, t, kz))
          row["v_stf"][str(n)], row["v_stf_stderr"][str(n)] = vs, vs_se
          row["ratio"][str(n)] = (n - 1) * vs / vd
          row["ratio_stderr"][str(n)] = (n - 1) * vs_se / vd
        rows.append(row)
        progress.update(1)
  return rows


def summarize(result: dict) -> list[dict]:
  """The README's claim rows from this script's result.json (experiments/claims.py)."""
  rows = result["rows"]
  far, ns = rows[-1], list(rows[-1]["ratio"])
  worst = max(abs(r["v_dsm"] - r["v_dsm_closed_form"]) / r["v_dsm_stderr"] for r in rows)
  return [{"claim": "V_STF(t; n) ≈ V_DSM(t) / (n − 1) in the far field (Two Gaussians, 64-D)",
           "paper": "Xu et al., Theorem 2, Fig. 3(c)", "printed": "qualitative",
           "reproduced": f"(n − 1) V_STF / V_DSM at t = {far['t']:g}: "
                         + ", ".join(f"{far['ratio'][n]:.2f} (n = {n})" for n in ns)
                         + f"; Monte Carlo V_DSM within {worst:.1f} s.e. of its closed form",
           "command": "python experiments/stf_variance_two_gaussians.py --out DIR"}]


def write(rows: list[dict], scale: str, out: str) -> None:
  ns = list(rows[0]["v_stf"])
  result = {"rows": rows, "scale": scale, "m_points": SCALES[scale]["m"],
            "claim": "Xu et al. Theorem 2 / Fig. 3(c): V_STF(t; n) ~ V_DSM(t) / (n - 1) on Two "
                     "Gaussians where p_{0|t} ~ p_0 (far field); V_DSM peaks in the "
                     "intermediate phase (Fig. 2(b))",
            "units": "V in (score units)^2 = 1 / (data units)^2"}
  lines = ["| t | V_DSM closed form | V_DSM Monte Carlo | "
           + " | ".join(f"V_STF, n={n}" for n in ns) + " | "
           + " | ".join(f"(n-1) V_STF / V_DSM, n={n}" for n in ns) + " |",
           "|---|---|---|" + "---|" * (2 * len(ns))]
  for r in rows:
    lines.append(f"| {r['t']:.3f} | {r['v_dsm_closed_form']:.4g} | {r['v_dsm']:.4g} ± "
                 f"{r['v_dsm_stderr']:.2g} | "
                 + " | ".join(f"{r['v_stf'][n]:.4g}" for n in ns) + " | "
                 + " | ".join(f"{r['ratio'][n]:.3f} ± {r['ratio_stderr'][n]:.3f}" for n in ns)
                 + " |")
  lines += ["", "Paper: qualitative (Fig. 2(b), 3(c)); Theorem 2 predicts ratio -> (n - 1)/n ~ 1 in "
            "the far field."]
  common.write(out, result, lines)
  _figures(rows, ns, out)


def _figures(rows: list[dict], ns: list[str], out: str) -> None:
  ts = [r["t"] for r in rows]
  with common.figure(os.path.join(out, "variance_vs_t.png"), figsize=(5.5, 4)) as (fig, ax):
    ax.plot(ts, [r["v_dsm_closed_form"] for r in rows], "k-", label="V_DSM, closed form")
    ax.errorbar(ts, [r["v_dsm"] for r in rows], [r["v_dsm_stderr"] for r in rows], fmt="ko",
                ms=3, label="V_DSM, Monte Carlo")
    for n in ns:
      ax.plot(ts, [r["v_stf"][n] for r in rows], "o--", ms=3, label=f"V_STF, n={n}")
    ax.set_yscale("log")
    ax.set_xlabel("t (VE, sigma_m = 0.01, sigma_M = 50)")
    ax.set_ylabel("trace of covariance of the target")
    ax.legend(fontsize=7)
  with common.figure(os.path.join(out, "ratio_vs_t.png"), figsize=(5.5, 4)) as (fig, ax):
    for n in ns:
      ax.errorbar(ts, [r["ratio"][n] for r in rows], [r["ratio_stderr"][n] for r in rows],
                  marker="o", ms=3, capsize=2, label=f"n={n}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("(n - 1) V_STF / V_DSM")
    ax.legend(fontsize=8)


def main(argv=None) -> None:
  parser = common.parser(__doc__, ("smoke", "full"), full="25 times, 4000 points, n up to 1024",
                         smoke="3 times, 128 points")
  args = parser.parse_args(argv)
  scale = common.start(args)  # progress lines (rate, ETA)
  t0 = time.time()
  rows = measure(scale)
  write(rows, scale, args.out)
  print(f"wrote {args.out}/table.md ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
