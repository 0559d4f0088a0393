"""What every experiment script shares: its command line (``--out DIR`` and the run sizes), its
loop over runs with a progress line, writing ``result.json`` / ``table.md``, and its figures.

The run sizes, chosen by one set of flags (each script keeps its own ``SCALES`` table saying what
each size means for its claim):

* ``--smoke``: seconds to minutes, tiny networks; what ``tests/test_experiments.py`` runs.
* default: about 15 minutes on a 2-core CPU, 6-18 measured (the digits scripts: fewer steps, a
  narrower network where stated, the first 120 test images via ``eval.split='test[:120]'``).
* ``--long``: the committed digits runs of ``results/`` (hours on 2 CPU cores; whole test split).
* ``--full``: the paper's scale, for a GPU / TPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Iterable, Iterator, Sequence

SIZES = ("smoke", "long", "full")
HELP = {"smoke": "seconds to minutes: tiny networks (the test suite's size)",
        "long": "the committed runs of results/: hours on 2 CPU cores",
        "full": "the paper's scale (GPU / TPU)"}

# The default size trains 300-500 steps. The EMA keeps rate^n of the initialization after n steps:
# with the digits configs' 0.995 that is 22% at 300 steps, and such a model evaluates at 4.19
# bits/dim where its raw parameters give 2.82 (stf_digits, VP, 300 steps, measured). 0.98 keeps
# 0.2% at 300 steps (an average over the last ~50).
SHORT_RUN_EMA_RATE = 0.98


def add_flags(parser: argparse.ArgumentParser, sizes: Sequence[str] = SIZES,
              **details: str) -> None:
  """The size flags ``--smoke`` / ``--long`` / ``--full`` (or those of ``sizes``), mutually
  exclusive; the default is ~15 CPU-minutes. ``details[name]`` is appended to that flag's help."""
  group = parser.add_mutually_exclusive_group()
  for name in sizes:
    text = HELP[name] + (f" ({details[name]})" if name in details else "")
    group.add_argument(f"--{name}", action="store_true", help=text)


def chosen(args: argparse.Namespace) -> str:
  """The size the flags chose: 'smoke', 'long', 'full' or 'default'."""
  for name in SIZES:
    if getattr(args, name, False):
      return name
  return "default"


def parser(doc: str, sizes: Sequence[str] = SIZES, **details: str) -> argparse.ArgumentParser:
  """An experiment's command line: described by the first line of ``doc``, ``--out DIR`` and the
  size flags (``add_flags``)."""
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument("--out", required=True)
  add_flags(p, sizes, **details)
  return p


def start(args: argparse.Namespace) -> str:
  """The chosen size, with absl logging at INFO (the modes' progress lines: rate, ETA)."""
  from absl import logging
  logging.set_verbosity(logging.INFO)
  return chosen(args)


def each(jobs: Sequence, t0: float | None = None) -> Iterator[tuple]:
  """``(job, done)`` per job in turn: ``done(text)`` prints ``text (i/n, s)``, the job's count and
  the seconds since ``t0`` (default: when the first job began), and returns those seconds."""
  t0 = time.time() if t0 is None else t0
  for i, job in enumerate(jobs):
    def done(text: str, i: int = i) -> float:
      print(f"{text} ({i + 1}/{len(jobs)}, {time.time() - t0:.0f} s)", flush=True)
      return time.time() - t0
    yield job, done


def write(out: str, result: dict, lines: Iterable[str] | None = None) -> None:
  """``out/result.json`` (indent 2) and, given ``lines``, ``out/table.md``; ``out`` is made."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f, indent=2)
  if lines is not None:
    with open(os.path.join(out, "table.md"), "w") as f:
      f.write("\n".join(lines) + "\n")


def duration(seconds: float) -> str:
  """'12 min in all' for a table's header; runs committed before the time was recorded say so."""
  return "run time not recorded" if seconds != seconds else f"{seconds / 60:.0f} min in all"


@contextlib.contextmanager
def figure(path: str, *args, **kwargs):
  """``(fig, axes)`` of ``plt.subplots(*args, **kwargs)`` (Agg backend); on leaving the block the
  figure is laid out (``tight_layout``) and saved to ``path`` at 100 dpi, then closed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(*args, **kwargs)
  try:
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)
