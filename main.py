"""scorelab entry point.

  python main.py --config=configs/toy_swiss_roll.py --workdir=/tmp/sr --mode=train \
      --config.training.n_iters=2000

``--config`` is an ml_collections config file; ``--config.a.b=value`` overrides any field. The
config is validated against ``config_schema`` before the workdir is touched. Several processes
(hosts): ``--distributed=auto`` (TPU pod slices, SLURM) or ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` on each (see README, "Several hosts"). Modes register
themselves in ``modes/`` (``modes.registered_modes()``).
"""
from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import jax

import checkpoints
import modes
import parallel
import run_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.DEFINE_enum("mode", "train", list(modes.registered_modes()), "What to run.")
flags.DEFINE_string("checkpoint", None, "--mode=import: the score_sde_pytorch .pth or score_sde / "
                    "score_flow Flax checkpoint to import into --workdir.")
flags.DEFINE_enum("distributed", "off", ["off", "auto"], "Several processes (jax.distributed): "
                  "'auto' lets JAX detect the cluster (Cloud TPU pod slices, SLURM, Open MPI, "
                  "Kubernetes); or give --coordinator_address, --num_processes and --process_id.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_string("compilation_cache_dir", None, "Directory of JAX's persistent compilation "
                    "cache, shared safely by several processes; '' turns it off. Default: "
                    f"${parallel.CACHE_DIR_ENV}, else {parallel.DEFAULT_CACHE_DIR}.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """absl log filter: drops INFO/DEBUG records of orbax (one line per file it writes)."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def _check_config_args(argv: list[str]) -> None:
  """Names a missing --config file, or an override of a field the config does not have, before
  absl's flag parsing turns them into 'config_config' / a bare AttributeError."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None:
    return
  if not os.path.isfile(path.split(":", 1)[0]):
    sys.exit(f"error: --config={path}: no such config file")
  import importlib.util
  spec = importlib.util.spec_from_file_location("_scorelab_config", path.split(":", 1)[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(*path.split(":", 1)[1:])
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      dotted = arg[len("--config."):].split("=", 1)[0]
      node, parts = config, dotted.split(".")
      for i, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
          known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
          where = ".".join(parts[:i]) or "the config"
          sys.exit(f"error: --config.{dotted}: {dotted}: unknown config field "
                   f"(known fields of {where}: {known})")
        node = node[part]


def main(argv) -> None:
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.compilation_cache_dir is not None:
    parallel.set_compilation_cache(FLAGS.compilation_cache_dir)
  if parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id, auto=FLAGS.distributed == "auto"):
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  config = FLAGS.config
  run_lib.validate_config(config)  # fail at start, naming the field, before touching the workdir
  logging.info("mode=%s workdir=%s\n%s", FLAGS.mode, FLAGS.workdir, config)
  if FLAGS.checkpoint and FLAGS.mode != "import":
    raise app.UsageError("--checkpoint is only used by --mode=import")
  extra = {"checkpoint": FLAGS.checkpoint or ""} if FLAGS.mode == "import" else {}
  try:
    modes.get_mode(FLAGS.mode)(config, FLAGS.workdir, **extra)
  except checkpoints.DiskFullError as e:  # one line, exit status 1 (nothing else was changed)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  _check_config_args(sys.argv[1:])
  app.run(main)
