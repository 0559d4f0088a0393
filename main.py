"""scorelab entry point.

  python main.py --config=configs/toy_swiss_roll.py --workdir=/tmp/sr --mode=train \
      --config.training.n_iters=2000

``--config`` is an ml_collections config file; ``--config.a.b=value`` overrides any field. The
config is validated (``run_lib.validate_config``) before the workdir is touched.
"""
from __future__ import annotations

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

import run_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.DEFINE_enum("mode", "train", sorted(run_lib.MODES), "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """absl log filter: drops INFO/DEBUG records of orbax (one line per file it writes)."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  run_lib.validate_config(config)  # fail at start, naming the field, before touching the workdir
  logging.info("mode=%s workdir=%s\n%s", FLAGS.mode, FLAGS.workdir, config)
  run_lib.MODES[FLAGS.mode](config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
