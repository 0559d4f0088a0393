"""The CIFAR-10 table scripts (experiments/*_cifar.py) without the published checkpoints: each at
``--smoke`` on the shared nf-16 score_sde_pytorch fixture, mock CIFAR-10 (conftest) and a tiny
feature network in place of Inception; the printed numbers against the papers' text.

Oracles: the papers' own text (every transcribed number is found on its row of its table); the
grid runner's contract (a cell with a result is not rerun, a cell interrupted is rerun, its
finished stages are not); the FID of a sample set against the statistics of the same set is 0.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import cifar_protocol as ct


# -- the printed numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("paper", sorted(ct.PRINTED))
def test_printed_numbers_are_the_papers(paper):
  """Every transcribed row is the row the paper prints (same numbers, same order; the paper may
  print more columns after them, e.g. ScoreFlow's ImageNet ones)."""
  for key, row in ct.PRINTED[paper].items():
    found = ct.printed_numbers_in_paper(row)
    assert found[:len(row.values)] == list(row.values), (paper, key, found)
    assert len(row.columns) == len(row.values)


def test_printed_row_lookup_fails_on_a_wrong_label():
  row = ct.PRINTED["cao"]["0"]
  bad = ct.PrintedRow(row.paper, row.table, "$h^2/g^2 = 3$", row.columns, row.values)
  with pytest.raises(ValueError, match="no line starting"):
    ct.printed_numbers_in_paper(bad)


# -- the grid runner -------------------------------------------------------------------------------
def _cells(calls: list, fail: set):
  def make(i):
    def go():
      calls.append(i)
      if i in fail:
        raise RuntimeError(f"preempted in cell {i}")
      return {"fid": float(i) + 0.5}
    return ct.Cell(f"cell{i}", {"i": i, "c": 0}, go, nfe=10 * i, work={"sample": 100.0 * i},
                   printed={"fid": float(i) if i else None})
  return [make(i) for i in range(3)]


def test_grid_runs_skips_and_resumes(tmp_path):
  """An interrupted grid keeps its finished cells; the rerun runs only the rest; the table shows
  printed beside reproduced, parameters in the cells' order."""
  calls = []
  with pytest.raises(RuntimeError, match="preempted in cell 1"):
    ct.run_grid(_cells(calls, fail={1}), str(tmp_path))
  assert calls == [0, 1]
  assert os.path.exists(ct.cell_result_path(str(tmp_path), "cell0"))
  assert not os.path.exists(ct.cell_result_path(str(tmp_path), "cell1"))
  calls.clear()
  results = ct.run_grid(_cells(calls, fail=set()), str(tmp_path))
  assert calls == [1, 2]
  assert [results[f"cell{i}"]["skipped"] for i in range(3)] == [True, False, False]
  table = ct.table_markdown(results, [("fid", "FID")], "header")
  # the parameters in the cells' own order, also for a cell read back from its (sorted) JSON
  assert "| i | c | FID (printed) | FID (reproduced) |" in table
  assert "| 2 | 0 | 2 | 2.5 |" in table and "| 0 | 0 | – | 0.5 |" in table


def test_fid_of_a_set_against_its_own_statistics_is_zero(tmp_path):
  """fid_of rounds model-space samples to 8-bit images as the paper's code does (VP: score_sde's
  truncation, unless a rounding is given) and only those reach the features: the statistics of
  the same uint8 images give FID 0 (to rounding); a shifted set gives a positive distance."""
  from configs.cifar_vp_dsm import get_config
  import evaluation
  config = get_config()  # centered data: model space [-1, 1]
  rng = np.random.default_rng(0)
  levels = rng.integers(0, 256, size=(64, 32, 32, 3)).astype(np.uint8)
  samples = (2 * (levels + 0.25) / 255 - 1).astype(np.float32)  # inside level k's bin
  seen = []
  smoke = ct.smoke_net()
  net = ct.FeatureNet(smoke.name, smoke.tag, lambda x: (seen.append(x), smoke.features(x))[1])
  ref = evaluation.compute_statistics(net.features(levels)[0])
  assert ct.fid_of(samples, config, net, ref)["fid"] == pytest.approx(0.0, abs=1e-8)
  assert seen[-1].dtype == np.uint8 and np.array_equal(seen[-1], levels)
  ct.fid_of(samples + 1 / 255, config, net, ref, rounding="edm")  # 255 u = k + 0.75: k + 1
  assert np.array_equal(seen[-1], np.minimum(levels.astype(int) + 1, 255))
  assert ct.fid_of(np.clip(samples + 0.6, -1, 1), config, net, ref)["fid"] > 0.1


@pytest.mark.parametrize("argv, message", [
    (["--long"], "--long"),
    (["--full", "--checkpoint", ct.SMOKE_CHECKPOINT], "exclude each other"),
    (["--checkpoint", "/nonexistent.pth"], "no such file"),
    ([], "--checkpoint FILE"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, tmp_path, capsys):
  from experiments import ode_vs_sde_cifar
  with pytest.raises(SystemExit):
    ode_vs_sde_cifar.main(argv + ["--out", str(tmp_path)])
  assert message in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_seconds_per_evaluation_times_the_network():
  """The dry run's measurement: wall time of jitted forward passes per image, on this machine
  (a toy MLP here; the scripts time their own network at --measure-batch)."""
  from configs.toy_gaussian_1d import get_config
  seconds, device = ct.seconds_per_evaluation(get_config(), batch=8, repeats=2)
  assert 0 < seconds < 1 and device.startswith("cpu")


def test_dry_run_lists_cells_nfe_and_estimate(tmp_path, capsys, monkeypatch):
  """Cao's --dry-run prints every cell with NFE = steps (Cao et al.'s code: no final denoising
  step), its evaluations (samples x NFE) and
  evaluations x measured seconds; it runs nothing (no workdir). (The measured seconds: the test
  above; the fixture network's compile takes minutes on a loaded CPU: -m slow runs it.)"""
  from experiments import ode_vs_sde_cifar
  monkeypatch.setattr(ct, "seconds_per_evaluation", lambda config, batch: (1e-3, "cpu (stub)"))
  monkeypatch.setattr(ct, "flops_per_evaluation", lambda config: dict.fromkeys(ct.WORK_COST, 1e9))
  ode_vs_sde_cifar.main(["--smoke", "--dry-run", "--out", str(tmp_path)])
  text = capsys.readouterr().out
  assert "measured on cpu" in text and "4 cells" in text
  for s, c in [(2, 0), (3, 0), (2, 1), (3, 1)]:
    line = next(l for l in text.splitlines() if l.startswith(f"steps{s}_c{c} "))
    nfe, evals, hours = (float(v) for v in line.split()[1:4])
    assert nfe == s and evals == 4 * s
    assert hours == pytest.approx(1e-3 * evals / 3600, rel=1e-2)
  assert not os.path.exists(os.path.join(str(tmp_path), "model"))


@pytest.mark.slow
def test_dry_run_measures_the_fixture_network(tmp_path, capsys):
  from experiments import ode_vs_sde_cifar
  ode_vs_sde_cifar.main(["--smoke", "--dry-run", "--out", str(tmp_path)])
  text = capsys.readouterr().out
  line = next(l for l in text.splitlines() if l.startswith("steps3_c1 "))
  assert float(line.split()[3]) > 0 and "at batch 4" in text


@pytest.mark.parametrize("script, cells", [
    ("scoreflow_cifar", ["uniform", "variational", "fid"]),
    ("stf_edm_cifar", ["dsm_seed0", "dsm_seed1", "dsm_seed2", "stf_seed0", "stf_seed1",
                       "stf_seed2"]),
    ("diffusion_time_cifar", ["T1_gaussian", "T0.6_gaussian", "T0.6_flow", "T0.4_gaussian",
                              "T0.4_flow", "T0.2_gaussian", "T0.2_flow"]),
])
def test_dry_run_at_the_papers_scale(script, cells, tmp_path, capsys, monkeypatch):
  """--full --dry-run lists the paper-scale cells with their NFE and network evaluations (the
  timing itself is measured in the test above; here 1 ms per evaluation stands in)."""
  import importlib
  monkeypatch.setattr(ct, "seconds_per_evaluation", lambda config, batch: (1e-3, "cpu (stub)"))
  monkeypatch.setattr(ct, "flops_per_evaluation", lambda config: dict.fromkeys(ct.WORK_COST, 1e9))
  importlib.import_module(f"experiments.{script}").main(["--full", "--dry-run", "--out",
                                                         str(tmp_path)])
  lines = capsys.readouterr().out.splitlines()
  listed = [l.split()[0] for l in lines[2:2 + len(cells)]]
  assert listed == cells
  rows = {l.split()[0]: [float(v) for v in l.split()[1:4]] for l in lines[2:2 + len(cells)]}
  if script == "stf_edm_cifar":  # Heun 35 NFE; 390,625 steps x 512 images + 5e4 x 35 samples
    assert rows["stf_seed0"][0] == 35.0  # (training counted once, with the first seed's cell)
    assert rows["stf_seed0"][1] == pytest.approx(390_625 * 512 + 50_000 * 35, rel=1e-2)
    assert rows["stf_seed1"][1] == pytest.approx(50_000 * 35, rel=1e-2)
  if script == "scoreflow_cifar":  # training counted (1.3M steps x 128 images) with the first cell
    assert rows["uniform"][1] > 1_300_001 * 128
  if script == "diffusion_time_cifar":  # 1000 T Euler-Maruyama steps + the denoising step
    assert rows["T0.4_flow"][0] == 401.0 and rows["T1_gaussian"][0] == 1001.0


def test_tables_block_blank_until_a_result_is_committed(tmp_path):
  """claims.py lists the four CIFAR table scripts with a blank 'reproduced' cell when
  results/ has no run of theirs, and its --check passes on the committed files."""
  from experiments import claims
  rows = claims.collect_tables(str(tmp_path))
  assert [r["script"] for r in rows] == ["diffusion_time_cifar", "ode_vs_sde_cifar",
                                         "scoreflow_cifar", "stf_edm_cifar"]
  assert all(r["reproduced"] == "" and set(claims.TABLE_FIELDS) <= set(r) for r in rows)
  assert claims.main(["--check"]) == 0


# -- the scripts at --smoke (minutes on 2 CPU cores: every cell compiles the sampler) -------------
def _smoke(script: str, out: str, extra=()):
  import importlib
  return importlib.import_module(f"experiments.{script}").main(["--smoke", "--out", out,
                                                                *extra])


@pytest.fixture(scope="module")
def cao_smoke(mock_tfds_module, tmp_path_factory):
  """One smoke run (2 steps x 2 c, 4 samples per cell in chunks of 2); then one cell's result and
  its last chunk are deleted (a preempted cell) and the grid rerun."""
  out = str(tmp_path_factory.mktemp("cao"))
  first = _smoke("ode_vs_sde_cifar", out)
  chunk = os.path.join(out, "model", "cao_steps3_c1_part001")
  kept = os.path.join(out, "model", "cao_steps3_c1_part000", "samples.npz")
  before = (np.load(os.path.join(chunk, "samples.npz"))["samples"], os.path.getmtime(kept))
  os.remove(ct.cell_result_path(out, "steps3_c1"))
  os.remove(os.path.join(chunk, "report.json"))
  second = _smoke("ode_vs_sde_cifar", out)
  return out, first, second, before, (np.load(os.path.join(chunk, "samples.npz"))["samples"],
                                      os.path.getmtime(kept))


@pytest.mark.slow
def test_cao_smoke_grid_resume_skip_and_table(cao_smoke, tmp_path):
  out, first, second, before, after = cao_smoke
  assert sorted(first["cells"]) == ["steps2_c0", "steps2_c1", "steps3_c0", "steps3_c1"]
  for cell in first["cells"].values():
    assert np.isfinite(cell["measured"]["fid"]) and cell["measured"]["n_samples"] == 4
    assert cell["measured"]["nfe"] == cell["params"]["steps"] == cell["nfe"]  # measured
    assert cell["printed"] == {"fid": None}  # 2 and 3 steps: not in the paper's grid
  # The rerun skipped three cells and resumed the fourth at its missing chunk: the same samples
  # (seed 42 + chunk index), the finished chunk untouched, the same FID.
  np.testing.assert_array_equal(before[0], after[0])
  assert before[1] == after[1]
  assert second["cells"]["steps3_c1"]["measured"] == first["cells"]["steps3_c1"]["measured"]
  assert {k: v for k, v in second["cells"].items() if k != "steps3_c1"} == {
      k: v for k, v in first["cells"].items() if k != "steps3_c1"}
  table = open(os.path.join(out, "table.md")).read()
  assert "| steps | c | FID (printed) | FID (reproduced) | NFE (printed) | NFE (reproduced) |" \
      in table and "10,000 samples" in table
  assert os.path.exists(os.path.join(out, "fid_vs_steps.png"))
  # a committed result fills the README block's 'reproduced' cell
  from experiments import claims
  os.makedirs(tmp_path / "ode_vs_sde_cifar")
  with open(tmp_path / "ode_vs_sde_cifar" / "result.json", "w") as f:
    json.dump(second, f)
  row = next(r for r in claims.collect_tables(str(tmp_path)) if r["script"] == "ode_vs_sde_cifar")
  assert row["reproduced"].startswith("best FID ") and "(4 cells)" in row["reproduced"]


@pytest.mark.slow
def test_cao_paper_cells_carry_the_printed_numbers(mock_tfds_module, tmp_path):
  """A printed cell (100 steps, c = 2) shows the paper's 52.77 beside the reproduced value (the
  sampler here runs 100 Euler-Maruyama steps of the nf-16 fixture on 4 samples)."""
  result = _smoke("ode_vs_sde_cifar", str(tmp_path), ["--steps", "100", "--cs", "2"])
  cell = result["cells"]["steps100_c2"]
  assert cell["printed"]["fid"] == 52.77 and cell["nfe"] == 100
  assert "| 100 | 2 | 52.77 |" in open(os.path.join(str(tmp_path), "table.md")).read()


@pytest.mark.slow
def test_scoreflow_smoke(mock_tfds_module, tmp_path):
  """Uniform then variational dequantization (fit, then eval) and ODE samples' FID on the
  fixture; the printed Table 2 row beside each; rerun: every cell skipped."""
  out = str(tmp_path)
  first = _smoke("scoreflow_cifar", out)
  c = first["cells"]
  assert c["uniform"]["printed"] == {"nll": 2.95, "bound": 3.08}
  assert c["variational"]["printed"] == {"nll": 2.83, "bound": 2.94}
  for k in ("uniform", "variational"):
    assert np.isfinite(c[k]["measured"]["nll"]) and np.isfinite(c[k]["measured"]["bound"])
    assert c[k]["measured"]["n_examples"] == 9
  assert os.path.exists(os.path.join(out, "model", "dequantizer", "report.json"))
  assert np.isfinite(c["fid"]["measured"]["fid"]) and c["fid"]["printed"] == {"fid": 6.03}
  assert _smoke("scoreflow_cifar", out)["cells"] == c
  assert "| uniform dequantization | 2.95 |" in open(os.path.join(out, "table.md")).read()


@pytest.mark.slow
def test_stf_edm_smoke(mock_tfds_module, tmp_path):
  """Two imported models (the fixture for both), Heun 18 steps = 35 NFE, FID; printed DDPM++
  rows beside them."""
  result = _smoke("stf_edm_cifar", str(tmp_path))
  for t, fid in (("dsm", 1.97), ("stf", 1.92)):
    cell = result["cells"][f"{t}_seed0"]
    assert cell["measured"]["nfe"] == 35 and cell["printed"]["fid"] == fid
    assert np.isfinite(cell["measured"]["fid"])
  # the same network and seeds: the same samples, the same FID
  assert result["cells"]["dsm_seed0"]["measured"]["fid"] == \
      result["cells"]["stf_seed0"]["measured"]["fid"]
  assert result["summary"]["dsm"]["fid_min"] == result["cells"]["dsm_seed0"]["measured"]["fid"]


@pytest.mark.slow
def test_stf_edm_from_the_edm_pickles(mock_tfds_module, tmp_path):
  """--checkpoint of two EDM network pickles (the c16 fixtures: NCSN++ for both) imports them as
  data, configures SongUNet from the pickles, samples with Heun (35 NFE) and prints the NCSN++
  rows; --arch ddpmpp on an NCSN++ pickle is refused naming the flag."""
  pkl = os.path.join(os.path.dirname(__file__), "fixtures", "edm",
                     "network-snapshot-edm_ncsnpp_c16.pkl")
  from experiments import stf_edm_cifar
  base = ["--smoke", "--checkpoint", pkl, pkl]
  with pytest.raises(ValueError, match="--arch=ncsnpp"):
    stf_edm_cifar.main(base + ["--out", str(tmp_path / "wrong")])
  result = stf_edm_cifar.main(base + ["--arch", "ncsnpp", "--out", str(tmp_path / "ok")])
  cell = result["cells"]["stf_seed0"]
  assert cell["printed"]["fid"] == 1.90 and cell["measured"]["nfe"] == 35
  assert result["arch"] == "ncsnpp" and result["fid_protocol"]["rounding"] == "edm"


def test_stf_edm_full_config_is_the_authors_protocol():
  """--full: EDM's SongUNet of --arch, STF reference batch 1024 (the released models), a snapshot
  every 2.5M images kept (the paper picks the best), gradient accumulation when asked; the FID
  summary is mean ± sd and the minimum over seeds."""
  import argparse
  from experiments import stf_edm_cifar as stf
  args = argparse.Namespace(arch="ncsnpp", ref_batch=0, grad_accum=4, eval_step=-1)
  run = ct.Run(args, "full", [])
  config = stf.target_config("stf", run)
  tr = config.training
  assert config.model.name == "songunet" and config.model.embedding_type == "fourier"
  assert tr.ref_batch_size == 1024 and tr.grad_accum_steps == 4
  assert tr.snapshot_freq * tr.batch_size == pytest.approx(2.5e6, rel=1e-3)
  assert tr.max_to_keep * tr.snapshot_freq >= tr.n_iters
  cells = {"a": {"params": {"target": "DSM"}, "measured": {"fid": 2.0}},
           "b": {"params": {"target": "DSM"}, "measured": {"fid": 1.9}},
           "c": {"params": {"target": "STF"}, "measured": {"fid": 1.8}}}
  s = stf.summary({"cells": cells})
  assert s["dsm"]["fid_min"] == 1.9 and s["dsm"]["fid_mean"] == pytest.approx(1.95)
  assert s["dsm"]["fid_sd"] == pytest.approx(np.std([2.0, 1.9], ddof=1))
  assert "| DSM | 1.95 ± 0.07 | 1.90 | 1.98 | 2 |" in stf.summary_markdown(s, "ncsnpp")


@pytest.mark.slow
def test_diffusion_time_smoke(mock_tfds_module, tmp_path):
  """T in {1, 0.4}: p_noise and a fitted Glow nu_phi (T = 0.4 only, as the paper's rows); bits/dim
  with each prior, SDE samples' FID; printed Table 3 numbers beside them."""
  result = _smoke("diffusion_time_cifar", str(tmp_path))
  c = result["cells"]
  assert sorted(c) == ["T0.4_flow", "T0.4_gaussian", "T1_gaussian"]
  assert c["T0.4_flow"]["printed"]["bpd"] == 3.06 and c["T0.4_gaussian"]["printed"]["fid"] == 24.91
  assert os.path.exists(os.path.join(str(tmp_path), "T0.4", "prior", "report.json"))
  for cell in c.values():
    assert np.isfinite(cell["measured"]["bpd"]) and np.isfinite(cell["measured"]["fid"])
    assert cell["measured"]["nfe_sde"] == 3  # 2 smoke steps + the denoising step
  # p_noise and nu_phi at the same T: different priors, different bits/dim
  assert c["T0.4_flow"]["measured"]["bpd"] != c["T0.4_gaussian"]["measured"]["bpd"]


def test_xla_flop_count_is_the_hand_count_of_a_convolution():
  """The dry run's FLOPs are XLA's cost analysis; for one 3x3 'SAME' convolution it equals the hand
  count 2 x (multiply-adds over the taps inside the image): 2 N Cout Cin (sum of valid taps)."""
  import jax
  import jax.numpy as jnp
  n, h, w, cin, cout = 2, 16, 12, 8, 32
  conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xla = jax.jit(conv).lower(jnp.zeros((n, h, w, cin)), jnp.zeros((3, 3, cin, cout))).cost_analysis()
  valid = lambda size: 3 * size - 2  # noqa: E731  (taps inside the image, summed over one axis)
  assert xla["flops"] == 2 * n * cout * cin * valid(h) * valid(w)


def test_dry_run_flops_and_accelerator_hours():
  """flops_per_evaluation counts each work kind of a (tiny) DDPM++ without running it: a
  likelihood step (score + one VJP) and a training image (forward + backward) cost more than a
  forward pass (each between 1.5x and 4x); accelerator hours are FLOPs / (peak x utilisation)."""
  from configs.cifar_vp_dsm import get_config
  config = get_config()
  config.model.nf, config.model.num_res_blocks, config.model.ch_mult = 16, 1, (1, 2)
  f = ct.flops_per_evaluation(config)
  assert f["sample"] == f["bound"] > 0 and f["train"] == f["dequantizer"]
  for kind in ("likelihood", "train"):
    assert 1.5 < f[kind] / f["sample"] < 4, f
  hours = ct.accelerator_hours(3600 * 156e12 * ct.UTILISATION)
  assert hours["A100"] == pytest.approx(1.0)
  assert hours["H100 SXM"] < hours["TPU v4"] < hours["A100"]
