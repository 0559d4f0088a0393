"""Smoke runs of benchmarks/gpu_bench.py and benchmarks/memory.py at tiny sizes on CPU (in process):
they run end to end and write JSON whose timings are positive and finite, and the memory fit
grows with the batch. The throughput numbers themselves are benchmarks, not tested."""
import json
import math
import os

import pytest

from benchmarks import gpu_bench, memory


def _positive(d: dict, *keys: str) -> None:
  for k in keys:
    assert math.isfinite(d[k]) and d[k] > 0, (k, d[k])


def _check_phase(name: str, r: dict) -> None:
  assert "error" not in r and "skipped" not in r, (name, r)
  if name.startswith("train_"):
    _positive(r, "images_per_s", "compile_s", "lower_s", "step_s_median")
    _positive(r["memory_analysis"], "argument_bytes", "temp_bytes", "peak_bytes")
    assert math.isfinite(r["loss"])
  elif name == "bpd":
    _positive(r, "examples_per_s", "score_evals_per_s", "mean_nfe", "first_batch_s", "bpd")
    assert r["compile_s"] >= 0 and r["n_failed"] == 0
  else:
    _positive(r, "images_per_s", "nfe_per_image", "first_batch_s")
    assert r["finite"] and r["compile_s"] >= 0


def _run_gpu_bench(tmp_path, phases: str) -> dict:
  res = gpu_bench.main(["--tiny", "--keep-cache", "--phases", phases, "--out-dir", str(tmp_path)])
  with open(res["json"]) as f:
    written = json.load(f)
  assert written["tiny"] and written["device"]["jax"] and written["wall_s"] > 0
  assert os.path.exists(os.path.splitext(res["json"])[0] + ".md")
  for name in phases.split(","):
    if name != "peer":
      _check_phase(name, written["phases"][name])
  return written


def test_gpu_bench_tiny(tmp_path, monkeypatch):
  """One train phase (STF target, bfloat16) and the peer's skip reason; every phase: the slow
  test below (each phase compiles its own programs, ~10-30 CPU-seconds each at the tiny size)."""
  monkeypatch.delenv("PEER_DIR", raising=False)
  res = _run_gpu_bench(tmp_path, "train_stf_bf16,peer")
  r = res["phases"]["train_stf_bf16"]
  assert r["dtype"] == "bfloat16" and r["rows_per_step"] == 8  # the tiny reference batch
  assert res["phases"]["peer"]["skipped"]


@pytest.mark.slow
def test_gpu_bench_tiny_all_phases(tmp_path, monkeypatch):
  monkeypatch.delenv("PEER_DIR", raising=False)
  res = _run_gpu_bench(tmp_path, ",".join(gpu_bench.PHASES))
  assert res["phases"]["heun"]["nfe_per_image"] == 3  # 2 Heun steps, the last Euler only


@pytest.mark.slow  # ~30 s of compiles; gpu_bench's smoke run stays in the default suite
def test_memory_tiny(tmp_path):
  """Two per-device batches of the tiny train step: bytes grow with the batch, the fit is exact
  for two points and the largest batch grows with the capacity."""
  out = str(tmp_path / "memory.json")
  res = memory.main(["--tiny", "--keep-cache", "--fast-compile", "--models", "ddpmpp",
                     "--programs", "train", "--batches", "1,3", "--out", out])
  rows = sorted(res["entries"], key=lambda e: e["batch"])
  assert [e["batch"] for e in rows] == [1, 3]
  assert rows[1]["temp_bytes"] > rows[0]["temp_bytes"] > 0
  assert rows[0]["argument_bytes"] > 4 * 4 * rows[0]["params"]  # params, EMA, Adam mu and nu
  fit = res["fits"]["ddpmpp/train/float32/tiny"]
  assert fit["bytes_per_example"] > 0 and fit["max_rel_residual"] < 1e-9
  caps = list(fit["max_batch"].values())
  assert 0 < caps[0] < caps[1] < caps[2]
  assert "| ddpmpp (tiny) | train |" in open(str(tmp_path / "memory.md")).read()
