"""benchmarks/memory.py --accum (tests/test_benchmarks_smoke.py's pattern): the grad_accum_steps
rule, and a tiny run of the accumulated train step's memory analysis (slow, as test_memory_tiny).
The published-size numbers are benchmarks (benchmarks/results/memory_accum.md), not tested."""
import pytest

from benchmarks import memory, programs


def test_accum_steps_for():
  """The fewest micro-batches k dividing the paper's global batch whose micro-batch fits."""
  assert memory.accum_steps_for(512, 304) == 2
  assert memory.accum_steps_for(512, 512) == memory.accum_steps_for(128, 1000) == 1
  assert memory.accum_steps_for(512, 100) == 8  # 512 / 4 = 128 > 100
  assert memory.accum_steps_for(128, 1) == 128
  assert memory.accum_steps_for(512, 0) is None and memory.accum_steps_for(512, None) is None
  assert programs.PAPER_BATCH["ddpmpp"] == 128 and programs.PAPER_BATCH["edm_ncsnpp"] == 512


@pytest.mark.slow  # ~40 s of compiles, as test_memory_tiny
def test_memory_accum_tiny(tmp_path):
  """--accum at the tiny size: the accumulated train step (2 micro-batches) compiles at two
  micro-batches, and the plan gives each capacity a micro-batch and the grad_accum_steps of
  EDM's global batch 512."""
  out = str(tmp_path / "memory_accum.json")
  res = memory.main(["--accum", "--tiny", "--keep-cache", "--fast-compile", "--models",
                     "edm_ncsnpp", "--batches", "1,3", "--out", out])
  rows = sorted(res["entries"], key=lambda e: e["batch"])
  assert [(e["batch"], e["grad_accum_steps"]) for e in rows] == [(1, 2), (3, 2)]
  assert rows[1]["temp_bytes"] > rows[0]["temp_bytes"] > 0
  plan = res["accum_plan"]["edm_ncsnpp/train_accum/float32/tiny"]
  assert plan["global_batch"] == 512
  for cap in plan["capacities"].values():
    assert cap["grad_accum_steps"] == memory.accum_steps_for(512, cap["max_micro_batch"])
  assert "grad_accum_steps x micro-batch" in open(str(tmp_path / "memory_accum.md")).read()


def test_dequantizer_markdown():
  """The remat table pairs the fit step with and without jax.checkpoint per batch."""
  e = lambda prog, peak: dict(model="scoreflow", tiny=False, dtype="float32", batch=1,  # noqa: E731
                              program=prog, peak_bytes=peak * memory.GIB, temp_bytes=peak * memory.GIB / 2,
                              dequantizer_bound_time_samples=16)
  text = memory.dequantizer_markdown({"entries": [e("dequantizer", 2), e("dequantizer_noremat", 7)]})
  assert "| scoreflow | 1 | 16 | 2.00 (1.00) | 7.00 (3.50) | 3.5x |" in text
  assert memory.dequantizer_markdown({"entries": []}) == ""


@pytest.mark.slow  # ~30 CPU s of compiles (75 s wall at load 7), as test_memory_accum_tiny
def test_memory_dequantizer_tiny(tmp_path):
  """--dequantizer at the tiny size and batch 1: ScoreFlow's dequantizer fit step compiles with
  and without the per-draw jax.checkpoint, the config's bound_time_samples (16) is recorded, the
  remat keeps less live, and memory_dequantizer.md holds the comparison."""
  out = str(tmp_path / "memory_dequantizer.json")
  res = memory.main(["--dequantizer", "--tiny", "--keep-cache", "--fast-compile", "--batches", "1",
                     "--programs", "dequantizer,dequantizer_noremat", "--out", out])
  rows = {e["program"]: e for e in res["entries"]}
  assert set(rows) == {"dequantizer", "dequantizer_noremat"}
  assert rows["dequantizer"]["dequantizer_bound_time_samples"] == 16
  assert rows["dequantizer"]["dequantizer_batch_size"] == 1
  assert 0 < rows["dequantizer"]["temp_bytes"] < rows["dequantizer_noremat"]["temp_bytes"]
  assert "without / with" in open(str(tmp_path / "memory_dequantizer.md")).read()
