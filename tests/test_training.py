"""Tests of training.train_loop, the one loop of the score model, the classifier, the dequantizer and
the flow prior: cadences, the finiteness check, SIGTERM (checkpoint and stop), resumption and strides.

The step functions here are host counters (the state is the step reached and the loss a plain float),
so every cadence is checked exactly in milliseconds; the modes' own tests run the loop on devices.
"""
from __future__ import annotations

import math
import os
import signal

import pytest

import training


def _run(stop: int, start: int = 0, sigterm_at: int = 0, nan_at: int = 0, **kw):
  """Runs the loop of a counter; returns (final state, last step, events)."""
  events = {"saved": [], "evaluated": [], "logged": [], "losses": [], "handler": []}

  def step_fn(state, batch):
    events["handler"].append(signal.getsignal(signal.SIGTERM))
    if batch == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return state + 1, {"loss": math.nan if batch == nan_at else 1.0 / batch, "acc": 0.5}

  state, step = training.train_loop(
      step_fn, start, iter(range(start + 1, stop + 1)), start=start, stop=stop, title="counter",
      on_loss=lambda s, v: events["losses"].append(s),
      on_log=lambda s, m: events["logged"].append((s, sorted(m))),
      evaluate=lambda s, st: events["evaluated"].append((s, st)),
      save=lambda s, st: events["saved"].append((s, st)), **kw)
  return state, step, events


def test_cadences_and_the_last_step():
  """Metrics lines every log_every, evaluations every eval_every, checkpoints at each save_every
  multiple, and all of them at the last step; every step's loss handed on once, in order."""
  state, step, ev = _run(10, log_every=4, eval_every=5, save_every=(3, 6), show=("acc",))
  assert state == step == 10
  assert ev["losses"] == list(range(1, 11))
  assert [s for s, _ in ev["logged"]] == [4, 8, 10]
  assert ev["logged"][0][1] == ["acc", "loss", "steps_per_sec"]
  assert ev["evaluated"] == [(5, 5), (10, 10)]
  assert ev["saved"] == [(3, 3), (6, 6), (9, 9), (10, 10)]


def test_resume_starts_at_start_and_nothing_to_do_returns_start():
  state, step, ev = _run(10, start=6, log_every=2, save_every=(4,))
  assert (state, step) == (10, 10) and ev["losses"] == [7, 8, 9, 10]
  assert ev["saved"] == [(8, 8), (10, 10)]
  state, step, ev = _run(10, start=10, log_every=2)
  assert (state, step) == (10, 10) and ev["saved"] == [] and ev["losses"] == []


def test_sigterm_checkpoints_the_step_reached_and_stops():
  """A SIGTERM during step 7 (no checkpoint due) saves step 7 and returns it; the handler is the
  loop's only while it runs (the default one is back after)."""
  before = signal.getsignal(signal.SIGTERM)
  state, step, ev = _run(20, sigterm_at=7, log_every=5, save_every=(10,))
  assert (state, step) == (7, 7)
  assert ev["saved"] == [(7, 7)] and ev["losses"] == list(range(1, 8))
  assert ev["handler"][0] is not before and signal.getsignal(signal.SIGTERM) is before


def test_without_save_sigterm_is_left_alone():
  """A loop that cannot checkpoint (the flow prior's fit) does not swallow SIGTERM."""
  before = signal.getsignal(signal.SIGTERM)
  events = []
  training.train_loop(lambda s, b: (events.append(signal.getsignal(signal.SIGTERM)) or s,
                                    {"loss": 1.0}),
                      0, iter(range(3)), start=0, stop=3, title="t", log_every=1)
  assert events == [before] * 3


def test_non_finite_loss_stops_before_the_next_checkpoint():
  """A NaN loss at step 5 (lines every 4, checkpoints every 3) raises naming step 5 at the next
  fetch (the checkpoint due at step 6); the checkpoint of step 3 stays the last one."""
  with pytest.raises(FloatingPointError, match=r"counter: non-finite loss at step 5\b"):
    _run(10, nan_at=5, log_every=4, save_every=(3,))


def test_stride_counts_steps():
  """stride=4 over 10 steps: calls end at steps 4, 8 and 10; lines and evaluations at each."""
  calls = []

  def step_fn(state, batch):
    calls.append(batch)
    return state, {"loss": 1.0}

  seen = []
  _, step = training.train_loop(step_fn, None, iter("abc"), start=0, stop=10, title="t",
                                log_every=4, stride=4, eval_every=4,
                                evaluate=lambda s, st: seen.append(s))
  assert step == 10 and calls == ["a", "b", "c"] and seen == [4, 8, 10]
