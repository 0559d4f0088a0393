"""Smoke runs of benchmarks/gpu_bench.py and benchmarks/memory.py at tiny sizes on CPU (in process):
they run end to end and write the JSON and markdown that benchmarks/README.md describes (device,
versions, options, per phase its timings in seconds, compile times, memory analysis in bytes), with
timings that agree with each other (a rate is its count over its median seconds, a median is the
median of the recorded times, a phase lasts at least its parts); and the memory fit grows with the
batch. The throughput numbers themselves are benchmarks, not tested."""
import json
import math
import os
import statistics

import jax
import pytest

from benchmarks import gpu_bench, memory

REL = 1e-9  # derived numbers are computed from the recorded ones: equal up to float rounding


def _positive(d: dict, *keys: str) -> None:
  for k in keys:
    assert math.isfinite(d[k]) and d[k] > 0, (k, d[k])


def _check_batches(name: str, r: dict, batches: int, batch: int, rate: str) -> None:
  """bpd / pc / heun: per-batch seconds, compile = first batch less the median later batch,
  ``rate`` (per second) = batch / median later batch."""
  spans = r["batch_s_all"]
  assert r["batches"] == len(spans) == batches and r["batch"] == batch, (name, r)
  assert all(math.isfinite(s) and s > 0 for s in spans), (name, spans)
  assert r["first_batch_s"] == spans[0]
  assert r["batch_s_median"] == pytest.approx(statistics.median(spans[1:]), rel=REL)
  assert r["compile_s"] == pytest.approx(max(spans[0] - r["batch_s_median"], 0.0), rel=REL,
                                         abs=1e-12)
  assert r[rate] == pytest.approx(batch / r["batch_s_median"], rel=REL), (name, rate)
  assert r["phase_wall_s"] >= sum(spans)


def _check_phase(name: str, r: dict, options: dict) -> None:
  assert "error" not in r and "skipped" not in r, (name, r)
  _positive(r, "phase_wall_s", "phase_cpu_s")
  if name.startswith("train_"):
    _, target, dtype = name.split("_")
    assert (r["target"], r["dtype"]) == (target, {"f32": "float32", "bf16": "bfloat16"}[dtype])
    assert r["batch"] == options["train_batch"] and r["params"] > 0
    assert r["rows_per_step"] == (options["ref_batch"] if target == "stf" else r["batch"])
    _positive(r, "compile_s", "lower_s", "step_s_median")
    times = r["step_s_all"]
    assert r["steps"] == len(times) and 2 <= len(times) <= options["train_steps"]
    assert all(math.isfinite(t) and t > 0 for t in times)
    assert r["step_s_median"] == pytest.approx(statistics.median(times), rel=REL)
    assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s_median"], rel=REL)
    assert r["phase_wall_s"] >= r["lower_s"] + r["compile_s"] + sum(times)
    m = r["memory_analysis"]
    _positive(m, "argument_bytes", "temp_bytes", "peak_bytes")
    assert all(isinstance(v, int) and v >= 0 for v in m.values()), m
    assert m["peak_bytes"] == (m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"]
                               - m["alias_bytes"])
    assert math.isfinite(r["loss"]) and r["loss"] > 0
  elif name == "bpd":
    _check_batches(name, r, options["eval_batches"], options["eval_batch"], "examples_per_s")
    _positive(r, "mean_nfe", "bpd")
    assert r["score_evals_per_s"] == pytest.approx(r["examples_per_s"] * r["mean_nfe"], rel=REL)
    assert r["n_failed"] == 0 and r["divergence"] == "hutchinson"
  else:
    _check_batches(name, r, options["sample_batches"], options["sample_batch"], "images_per_s")
    assert r["n_steps"] == options[f"{name}_steps"] and r["nfe_per_image"] > 0 and r["finite"]


def _run_gpu_bench(tmp_path, phases: str) -> dict:
  res = gpu_bench.main(["--tiny", "--keep-cache", "--phases", phases, "--out-dir", str(tmp_path)])
  with open(res["json"]) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(res))  # the returned result is the one written
  d = written["device"]
  assert written["tiny"] and d["jax"] == jax.__version__ and d["jaxlib"]
  assert (d["platform"], d["device_count"]) == (jax.devices()[0].platform, jax.device_count())
  options = written["options"]
  assert {k: options[k] for k in gpu_bench.SIZES["tiny"]} == gpu_bench.SIZES["tiny"]
  assert list(written["phases"]) == phases.split(",")
  assert written["wall_s"] >= sum(r["phase_wall_s"] for r in written["phases"].values())
  with open(os.path.splitext(res["json"])[0] + ".md") as f:
    md = f.read()
  for name, r in written["phases"].items():
    if name == "peer":
      continue
    _check_phase(name, r, options)
    rate = r.get("examples_per_s", r.get("images_per_s"))
    unit = "examples/s" if name == "bpd" else "images/s"
    assert f"| {name} | {rate:.{1 if name.startswith('train_') else 2}f} {unit} | " \
        f"{r['compile_s']:.1f}" in md, (name, md)
  return written


@pytest.mark.slow  # a benchmark's smoke run, ~15 s
def test_gpu_bench_tiny(tmp_path, monkeypatch):
  """One train phase (STF target, bfloat16: the tiny reference batch of 8 rows a step) and the
  peer's skip reason; every phase: the slow test below (each phase compiles its own programs,
  ~10-30 CPU-seconds each at the tiny size)."""
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
