"""Every experiments/ script runs at its smoke scale and writes result.json, table.md and a PNG."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

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


def test_readme_claims_table_is_generated_from_committed_results():
  """README's "paper claim → printed → reproduced" block is exactly what experiments/claims.py
  makes from experiments/results/*/result.json (not typed by hand, not stale)."""
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import claims
  assert claims.main(["--check"]) == 0
  rows, _ = claims.collect(os.path.join(REPO, "experiments", "results"))
  assert rows and all(set(claims.COLUMNS) <= set(r) for r in rows)


def test_stf_variance_two_gaussians_smoke(tmp_path):
  """Xu et al. Theorem 2 on Two Gaussians in 64-D: the Monte Carlo V_DSM(t) (losses.v_dsm) agrees
  with the script's closed form within 4 standard errors + 2%; V_STF(t; n) < V_DSM(t) for n >= 4
  at every t; the far-field ratio (n - 1) V_STF / V_DSM is within 0.5 of 1 at t = 1 (M = 128
  points: its standard error is ~0.1)."""
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "stf_variance_two_gaussians.py"),
                  "--smoke", "--out", out], check=True, timeout=600, capture_output=True)
  with open(os.path.join(out, "result.json")) as f:
    rows = json.load(f)["rows"]
  for r in rows:
    assert abs(r["v_dsm"] - r["v_dsm_closed_form"]) < 4 * r["v_dsm_stderr"] + 0.02 * r["v_dsm"]
    assert all(v < r["v_dsm"] for v in r["v_stf"].values())
  far = rows[-1]
  assert far["t"] == 1.0 and all(abs(q - 1.0) < 0.5 for q in far["ratio"].values())
  for png in ("variance_vs_t.png", "ratio_vs_t.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000


@pytest.mark.slow
def test_stf_edm_digits_smoke(tmp_path):
  """Two tiny EDM runs on digits (DSM, STF) train, evaluate bits/dim and sample with Heun at 35 NFE;
  the table and figures are written. Slow (two trainings and two likelihood evals): -m slow."""
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "stf_edm_digits.py"),
                  "--smoke", "--out", out], check=True, timeout=1200, capture_output=True)
  with open(os.path.join(out, "result.json")) as f:
    runs = json.load(f)["runs"]
  assert set(runs) == {"dsm", "stf"}
  for r in runs.values():
    assert r["sampling_nfe"] == 35 and np.isfinite(r["bpd"]) and r["bpd_n_examples"] == 360
    assert np.isfinite(r["digits_feature_distance"])
  assert runs["stf"]["ref_batch_size"] > runs["dsm"]["ref_batch_size"]
  for png in ("samples_dsm_vs_stf.png", "loss_dsm_vs_stf.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  assert "| STF |" in open(os.path.join(out, "table.md")).read()


@pytest.mark.slow
def test_diffusion_time_digits_smoke(tmp_path):
  """Tiny digits runs at T = 0.2 and 0.4 (Franzese et al., Table 2's small-T rows): on the same
  trained model, the concurrently fitted DPGMM prior gives lower bits/dim than the Gaussian
  p_noise at both T; the sequential DPGMM gives finite bits/dim; reverse-SDE steps scale with T;
  Fig. 4 has a median and band per T (the prior's cross-entropy on digits: test_auxiliary.py).
  Measured at this scale: 4.87 -> 3.98 bits/dim at T = 0.2. Slow (two trainings, six likelihood
  evals): -m slow."""
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "diffusion_time_digits.py"),
                  "--smoke", "--sequential", "--out", out], check=True, timeout=2400,
                 capture_output=True)
  with open(os.path.join(out, "result.json")) as f:
    result = json.load(f)
  rows = {r["T"]: r for r in result["rows"]}
  assert set(rows) == {0.2, 0.4} and rows[0.2]["sde_steps"] < rows[0.4]["sde_steps"]
  for r in rows.values():
    assert r["dpgmm_concurrent_bpd"] < r["gaussian_bpd"], r
    assert np.isfinite(r["dpgmm_sequential_bpd"])
  assert [r["T"] for r in result["effective_components"]] == [0.2, 1.0]
  for png in ("bpd_vs_T.png", "samples_vs_T.png", "components_vs_T.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  assert "| 0.2 |" in open(os.path.join(out, "table.md")).read()


@pytest.mark.slow
def test_diffusion_time_mnist_smoke(tmp_path):
  """The MNIST table's pipeline (issue 29) on 4 test digits with a 4-step model: one T = 1 model
  truncated at T = 0.2; at T = 0.2 the concurrently fitted DPGMM beats p_noise on the same images
  (paired change < 0; measured -1.33 ± 0.04 bits/dim at this scale); a rerun reads every cell
  back. Slow (~6 min on a loaded 2-core CPU): -m slow."""
  out = str(tmp_path / "out")
  cmd = [sys.executable, os.path.join(REPO, "experiments", "diffusion_time_mnist.py"), "--smoke",
         "--out", out]
  subprocess.run(cmd, check=True, timeout=2400, capture_output=True)
  with open(os.path.join(out, "result.json")) as f:
    result = json.load(f)
  rows = {r["T"]: r for r in result["rows"]}
  assert set(rows) == {1.0, 0.2} and set(rows[1.0]) == {"T", "gaussian"}
  small = rows[0.2]
  assert small["concurrent"]["paired_change"] < 0 < small["gaussian"]["bpd"]
  assert small["gaussian"]["nfe"] < rows[1.0]["gaussian"]["nfe"]  # a shorter ODE at small T
  assert os.path.getsize(os.path.join(out, "bpd_vs_T.png")) > 1000
  rerun = subprocess.run(cmd + ["--stage", "eval"], check=True, timeout=600, capture_output=True,
                         text=True)
  assert "fit prior" not in rerun.stderr  # every cell read back, nothing refitted


@pytest.mark.slow
def test_ct_elbo_training_smoke(tmp_path):
  """Swiss roll, three objectives (DSM sigma^2, DSM LW + IS, SSM LW), 40 steps, two checkpoints
  each evaluated with the CT-ELBO (ISM and DSM forms) and the ODE NLL: finite curves, the two
  forms of the ELBO agree within 5 standard errors + 0.5 nats (same quantity, different
  estimators), the table and figure are written. Slow (~10 min on a loaded 2-core CPU): -m slow."""
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "ct_elbo_training.py"),
                  "--smoke", "--out", out], check=True, timeout=2400, capture_output=True)
  with open(os.path.join(out, "result.json")) as f:
    runs = json.load(f)["runs"]
  assert [r["objective"] for r in runs] == ["dsm_default", "dsm_lw_is", "ssm_lw"]
  for r in runs:
    assert [p["step"] for p in r["points"]] == [20, 40] and r["seconds_per_step"] > 0
    for p in r["points"]:
      assert all(np.isfinite(p[k]) for k in ("ode", "ct_elbo_ism", "ct_elbo_dsm"))
      se = np.hypot(p["ct_elbo_ism_stderr"], p["ct_elbo_dsm_stderr"])
      assert abs(p["ct_elbo_ism"] - p["ct_elbo_dsm"]) < 5 * se + 0.5
  assert os.path.getsize(os.path.join(out, "elbo_vs_training.png")) > 1000


def _flat(d: dict, prefix: str = "") -> dict:
  """A config.json's fields as {'section.field': value}."""
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def _config_json(wd: str) -> dict:
  """A workdir's config.json, flat ({'section.field': value})."""
  with open(os.path.join(wd, "config.json")) as f:
    return _flat(json.load(f))


def _check_eval_folder(wd: str, folder: str) -> dict:
  """The eval report of ``wd/folder``; its samples.png is the grid of its samples.npz."""
  from conftest import assert_grid_png
  with open(os.path.join(wd, "config.json")) as f:
    centered = json.load(f)["data"]["centered"]
  with np.load(os.path.join(wd, folder, "samples.npz")) as z:
    assert_grid_png(os.path.join(wd, folder, "samples.png"), z["samples"], centered)
  with open(os.path.join(wd, folder, "report.json")) as f:
    return json.load(f)


def _check_figure(path: str, figsize: tuple[float, float]) -> None:
  """A matplotlib figure saved at 100 dpi (experiments/common.figure): a PNG of figsize x 100
  pixels (to rounding) that is not of one colour."""
  from PIL import Image
  with Image.open(path) as im:
    assert im.format == "PNG", path
    assert all(abs(n - 100 * s) <= 1 for n, s in zip(im.size, figsize)), (path, im.size, figsize)
    pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
  assert len(np.unique(pixels, axis=0)) > 10, f"{path}: blank"


def _check_stf_digits(out: str, cells) -> None:
  """experiments/stf_digits.py's smoke output for ``cells`` ((sde, weighting, target), in run
  order): each run's row is its workdir's (eval report, config, loss log); a DSM / STF pair
  differs in its config only by the target and the reference batch; table and figure."""
  import run_lib
  with open(os.path.join(out, "result.json")) as f:
    result = json.load(f)
  runs = result["runs"]
  assert [(r["sde"], r["weighting"], r["target"]) for r in runs] == list(cells)
  assert result["scale"] == "smoke" and result["window"] == 5
  table = open(os.path.join(out, "table.md")).read()
  configs = {}
  for r in runs:
    wd = os.path.join(out, f"{r['sde']}_{r['weighting']}_{r['target']}")
    report = _check_eval_folder(wd, "eval")
    for k in ("bpd", "bpd_stderr", "likelihood_nfe"):
      assert r[k] == report[k], (wd, k)
    assert np.isfinite(r["bpd"]) and report["bpd_n_failed"] == 0
    assert report["step"] == r["n_iters"] == 20 and report["sde"] == r["sde"]
    config = _config_json(wd)
    assert (config["training.target"], config["training.weighting"]) == (r["target"],
                                                                         r["weighting"])
    # 16 rows trained on a step; STF's target averages over a reference batch of 64 rows that
    # contains them. (A DSM run's ref_batch_size is unused; at smoke scale it is left at digits_vp's
    # 128, which the row and table report as n.)
    assert config["training.batch_size"] == 16
    assert config["training.ref_batch_size"] == r["ref_batch_size"]
    if r["target"] == "stf":
      assert r["ref_batch_size"] == 64
    train, heldout = run_lib.read_loss_curves(wd)
    np.testing.assert_array_equal(np.asarray(r["train_loss_curve"]), np.asarray(train))
    np.testing.assert_array_equal(np.asarray(r["heldout_loss_curve"]), np.asarray(heldout))
    assert [s for s, _ in train] == list(range(1, 21))  # every step's training loss
    losses = np.asarray([v for _, v in train])
    assert r["loss_variance_second_half"] == pytest.approx(np.var(losses[10:], ddof=1), rel=1e-9)
    assert r["loss_mean_second_half"] == pytest.approx(np.mean(losses[10:]), rel=1e-9)
    assert (f"| {r['sde']} | {r['weighting']} | {r['target'].upper()} | {r['ref_batch_size']} | "
            f"20 | {r['bpd']:.3f} ± {r['bpd_stderr']:.3f} |") in table
    configs[r["sde"], r["weighting"], r["target"]] = config
  for sde, weighting, target in cells:
    if target == "stf":
      dsm, stf = configs[sde, weighting, "dsm"], configs[sde, weighting, "stf"]
      assert set(dsm) == set(stf)
      assert {k for k in dsm if dsm[k] != stf[k]} == {"training.target", "training.ref_batch_size"}
  pairs = len({(s, w) for s, w, _ in cells})
  _check_figure(os.path.join(out, "loss_traces.png"), (4.2 * pairs, 6))


@pytest.mark.slow
def test_stf_digits_smoke(tmp_path):
  """DSM and STF on digits for VP, VE and VP + LW + IS (20 steps, nf 8): every run trains and
  evaluates to finite bits/dim; result.json holds what each run's workdir says (eval report,
  loss log) with the loss statistics of that log; each DSM / STF pair is the same run but for the
  target and its reference batch (64 rows); the eval sample grids, table and loss-trace figure
  are written. Slow (six trainings and evals): -m slow."""
  from experiments import stf_digits
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "stf_digits.py"),
                  "--smoke", "--out", out], check=True, timeout=3600, capture_output=True)
  _check_stf_digits(out, [(s, w, t) for s, w in stf_digits.SETTINGS for t in stf_digits.TARGETS])


def _check_scoreflow_digits(out: str, cells) -> None:
  """experiments/scoreflow_digits.py's smoke output for ``cells`` ((sde, eps, weighting), in run
  order): each cell's numbers are its two eval reports' (uniform; variational after the 4-step
  dequantizer fit) of one checkpoint, the paired Δ their per-image difference; the IS variance
  ratio is the ratio of its variances; table and figure."""
  import likelihood
  with open(os.path.join(out, "result.json")) as f:
    result = json.load(f)
  rows = result["rows"]
  assert [(r["sde"], r["eps"], r["weighting"]) for r in rows] == list(cells)
  table = open(os.path.join(out, "table.md")).read()
  for r, cell in zip(rows, cells):
    wd = os.path.join(out, f"{r['sde']}_{r['weighting']}")
    config = _config_json(wd)
    assert (config["sde.name"], config["sde.eps"], config["training.weighting"]) == cell
    reports = {d: _check_eval_folder(wd, f"eval_{d}") for d in ("uniform", "variational")}
    for d, report in reports.items():
      assert report["dequantization"] == d and report["step"] == 20 and report["eps"] == r["eps"]
      for k in ("bpd", "bpd_stderr", "bound_bpd", "bound_bpd_stderr", "likelihood_nfe"):
        assert r[f"{d}_{k}"] == report[k], (wd, d, k)
      assert np.isfinite(r[f"{d}_bpd"]) and np.isfinite(r[f"{d}_bound_bpd"])
    assert reports["variational"]["dequantizer_step"] == 4
    assert "dequantizer_step" not in reports["uniform"]
    for k in ("bpd", "bound_bpd"):
      diff = (np.asarray(reports["variational"][f"{k}_per_example"], np.float64)
              - np.asarray(reports["uniform"][f"{k}_per_example"], np.float64))
      mean, stderr = (float(v) for v in likelihood.mean_and_stderr(diff[np.isfinite(diff)]))
      assert r[f"delta_{k}"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
      assert r[f"delta_{k}_stderr"] == pytest.approx(stderr, rel=1e-9, abs=1e-12)
    assert f"| {r['uniform_bpd']:.3f} ± {r['uniform_bpd_stderr']:.3f} | " \
        f"{r['uniform_bound_bpd']:.3f} ± {r['uniform_bound_bpd_stderr']:.3f} |" in table
  v = result["is_variance"]
  if v is not None:
    assert v["draws"] == 8 and v["batch_size"] == 16
    assert v["likelihood"]["variance"] > 0 and v["likelihood_is"]["variance"] > 0
    assert v["variance_ratio"] == pytest.approx(
        v["likelihood"]["variance"] / v["likelihood_is"]["variance"], rel=1e-12)
  _check_figure(os.path.join(out, "bpd_cells.png"), (7, 4))


@pytest.mark.slow
def test_scoreflow_digits_smoke(tmp_path):
  """VP / sub-VP x three weightings x {uniform, variational} dequantization on digits (20 steps,
  nf 8): finite bits/dim and bound in every cell, taken from the cell's two eval reports of one
  checkpoint (the variational one after the dequantizer's fit), sub-VP at eps = 1e-2, the paired
  differences and the importance-sampling variance ratio recomputed from what they summarize, the
  eval sample grids, table and figure written. Slow (six trainings, dequantizer fits, twelve
  evals): -m slow."""
  from experiments import scoreflow_digits
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "scoreflow_digits.py"),
                  "--smoke", "--out", out], check=True, timeout=3600, capture_output=True)
  cells = [(s, e, w) for s, e in scoreflow_digits.SDES for w, _ in scoreflow_digits.WEIGHTINGS]
  assert [e for _, e, _ in cells] == [1e-5] * 3 + [1e-2] * 3
  _check_scoreflow_digits(out, cells)
  with open(os.path.join(out, "result.json")) as f:
    assert json.load(f)["is_variance"] is not None


def test_scale_flags_and_sizes():
  """``--smoke`` / ``--long`` / ``--full`` choose a size (mutually exclusive; none: the default);
  every digits script's default evaluates a slice of the test split and trains fewer steps than its
  ``--long`` run, which is the size of the committed results."""
  import importlib.util
  from experiments import common
  parser = common.parser("an experiment")
  assert [common.chosen(parser.parse_args(["--out", "DIR"] + a))
          for a in ([], ["--smoke"], ["--long"], ["--full"])] == ["default", "smoke", "long", "full"]
  with pytest.raises(SystemExit):
    parser.parse_args(["--out", "DIR", "--long", "--full"])
  for name in ("stf_digits", "diffusion_time_digits", "scoreflow_digits", "ct_elbo_training"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    default, long = mod.SCALES["default"], mod.SCALES["long"]
    assert default["split"].startswith("test[:") and long["split"] == "test", name
    steps = "digits_iters" if name == "ct_elbo_training" else "n_iters"
    assert default[steps] < long[steps], name
    with open(os.path.join(REPO, "experiments", "results", name, "result.json")) as f:
      committed = json.load(f)
    if name != "ct_elbo_training":  # its committed run is the Swiss roll at the default size
      assert committed["scale"] == "long", name


def test_diffusion_time_digits_ts_adds_rows(tmp_path):
  """``--ts`` keeps DIR's rows of other T values from a run of the same scale and dataset."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "diffusion_time_digits", os.path.join(REPO, "experiments", "diffusion_time_digits.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  with open(tmp_path / "result.json", "w") as f:
    json.dump({"scale": "long", "dataset": "digits", "rows": [{"T": 0.2}, {"T": 0.6}]}, f)
  assert mod._earlier_rows(str(tmp_path), "long", "digits", [0.6]) == [{"T": 0.2}]
  assert mod._earlier_rows(str(tmp_path), "default", "digits", [0.6]) == []
  assert mod._earlier_rows(str(tmp_path), "long", "mnist", [0.4]) == []


@pytest.mark.slow
def test_controllable_digits_smoke(tmp_path):
  """A tiny digits model and classifier: guided samples of every digit for each (c, s), bottom-half
  inpainting with c = 0, 1, 2, the mean-fill baseline and unconditional samples, all judged by the
  held-out classifier; the true images are recovered far above chance and every PNG is written
  (the tiny model's own numbers are not checked: 20 training steps)."""
  out = str(tmp_path / "out")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "controllable_digits.py"),
                  "--smoke", "--out", out], check=True, timeout=1800, capture_output=True)
  with open(os.path.join(out, "result.json")) as f:
    result = json.load(f)
  assert set(result["guided"]) == {"c=1,s=1", "c=1,s=4"}
  assert all(len(g["per_class"]) == 10 for g in result["guided"].values())
  inp = result["inpainting"]
  assert {"inpainted, c=0", "inpainted, c=1", "inpainted, c=2", "mean fill",
          "unconditional, c=1"} <= set(inp)
  assert inp["true image"]["recovered"] > 0.8 and inp["true image"]["hidden_mse"] == 0.0
  for png in ("inpainting.png", "guided_accuracy.png", "guided_c1_s4.png",
              "classifier_accuracy_vs_t.png"):
    assert os.path.getsize(os.path.join(out, png)) > 200, png
  assert "| mean fill |" in open(os.path.join(out, "table.md")).read()
