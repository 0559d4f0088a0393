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

from experiments import cifar_tables as ct


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
    return ct.Cell(f"cell{i}", {"i": i}, go, nfe=10 * i, work={"sample": 100.0 * i},
                   printed={"fid": float(i) if i else None})
  return [make(i) for i in range(3)]


def test_grid_runs_skips_and_resumes(tmp_path):
  """An interrupted grid keeps its finished cells; the rerun runs only the rest; the table shows
  printed beside reproduced."""
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
  assert "| i | FID (printed) | FID (reproduced) |" in table
  assert "| 2 | 2 | 2.5 |" in table and "| 0 | – | 0.5 |" in table
