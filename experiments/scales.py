"""The run sizes every experiment script offers, chosen by one set of flags:

* ``--smoke``: seconds to minutes, tiny networks; what ``tests/test_experiments.py`` runs.
* default: about 15 minutes on a 2-core CPU, 6-18 measured (the digits scripts: fewer steps, a
  narrower network where stated, the first 120 test images via ``eval.split='test[:120]'``).
* ``--long``: the committed digits runs of ``results/`` (hours on 2 CPU cores; whole test split).
* ``--full``: the paper's scale, for a GPU / TPU.

Each script keeps its own ``SCALES`` table (what each size means for its claim); this module only
parses the flags, so every script reads and names its sizes the same way.
"""
from __future__ import annotations

import argparse

HELP = {"smoke": "seconds to minutes: tiny networks (the test suite's size)",
        "long": "the committed runs of results/: hours on 2 CPU cores",
        "full": "the paper's scale (GPU / TPU)"}


def add_flags(parser: argparse.ArgumentParser, **details: str) -> None:
  """``--smoke`` / ``--long`` / ``--full``, mutually exclusive; the default is ~15 CPU-minutes.
  ``details[name]`` is appended to that flag's help."""
  group = parser.add_mutually_exclusive_group()
  for name in HELP:
    text = HELP[name] + (f" ({details[name]})" if name in details else "")
    group.add_argument(f"--{name}", action="store_true", help=text)


def chosen(args: argparse.Namespace) -> str:
  """The size the flags chose: 'smoke', 'long', 'full' or 'default'."""
  for name in ("smoke", "long", "full"):
    if getattr(args, name, False):
      return name
  return "default"


# The default size trains 300-500 steps. The EMA keeps rate^n of the initialization after n steps:
# with the digits configs' 0.995 that is 22% at 300 steps, and such a model evaluates at 4.19
# bits/dim where its raw parameters give 2.82 (stf_digits, VP, 300 steps, measured). 0.98 keeps
# 0.2% at 300 steps (an average over the last ~50).
SHORT_RUN_EMA_RATE = 0.98


def duration(seconds: float) -> str:
  """'12 min in all' for a table's header; runs committed before the time was recorded say so."""
  return "run time not recorded" if seconds != seconds else f"{seconds / 60:.0f} min in all"
