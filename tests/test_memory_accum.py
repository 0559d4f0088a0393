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
