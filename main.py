"""scorelab entry point.

  python main.py --config=configs/toy_swiss_roll.py --workdir=/tmp/sr --mode=train \
      --config.training.n_iters=2000

``--config`` is an ml_collections config file; ``--config.a.b=value`` overrides any field. The
config is validated against ``config_schema`` before the workdir is touched. Modes register
themselves in ``modes/`` (``modes.registered_modes()``).
"""
from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import modes
import run_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.DEFINE_enum("mode", "train", list(modes.registered_modes()), "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """absl log filter: drops INFO/DEBUG records of orbax (one line per file it writes)."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def _check_config_file(argv: list[str]) -> None:
  """A missing or unreadable --config file is named before absl's flag parsing obscures it."""
  for i, arg in enumerate(argv):
    path = None
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
      sys.exit(f"error: --config={path}: no such config file")


def main(argv) -> None:
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  run_lib.validate_config(config)  # fail at start, naming the field, before touching the workdir
  logging.info("mode=%s workdir=%s\n%s", FLAGS.mode, FLAGS.workdir, config)
  modes.get_mode(FLAGS.mode)(config, FLAGS.workdir)


if __name__ == "__main__":
  _check_config_file(sys.argv[1:])
  app.run(main)
