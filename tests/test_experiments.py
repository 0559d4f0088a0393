"""Every experiments/ script runs at its smoke scale and writes result.json, table.md and a PNG."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_diffusion_time_toy_smoke(tmp_path):
  """At T = 0.1 the fitted DPGMM prior recovers the data's ELBO that p_noise loses (KL > 10 nats)."""
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "diffusion_time_toy.py"),
                  "--smoke", "--out", out], check=True, timeout=600, capture_output=True)
  with open(os.path.join(out, "result.json")) as f:
    rows = {r["T"]: r for r in json.load(f)["rows"]}
  small = rows[0.1]
  assert small["gaussian_kl_prior"] > 10 and abs(small["dpgmm_kl_prior"]) < 0.05
  assert small["dpgmm_elbo"] > small["gaussian_elbo"] + 10
  assert os.path.getsize(os.path.join(out, "elbo_vs_T.png")) > 1000
  assert "| 0.100 |" in open(os.path.join(out, "table.md")).read()
