"""``--mode=fid_stats``: reference FID statistics of ``eval.split`` of an image dataset."""
from __future__ import annotations

import os

import ml_collections
from absl import logging

import checkpoints
import datasets
import run_lib
from modes import register_mode
from progress import Progress


@register_mode("fid_stats")
def fid_stats(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Inception pool3 features of every example (weights ``eval.inception_weights``), written as
  ``workdir/fid_stats_<dataset>_<split>.npz`` with ``mu`` and ``sigma`` (the common format; set
  ``eval.fid_stats`` to it)."""
  import evaluation
  import inception_weights
  run_lib.validate_config(config)
  info = datasets.dataset_info(config)
  if not info.is_image:
    raise ValueError(f"data.dataset={info.name!r}: FID statistics need an image dataset")
  checkpoints.check_writable(workdir)
  with checkpoints.workdir_lock(workdir, "fid_stats"):
    variables = evaluation.load_inception_params(
        inception_weights.resolve_inception_weights(str(config.eval.inception_weights),
                                                    download=bool(config.data.download)))
    batches = datasets.get_eval_dataset(config, as_levels=True)  # this process's share
    with Progress("Inception features", batches.num_examples, "images") as p:
      # the dataset's 8-bit pixels, as score_sde's / EDM's reference statistics (docs/fid.md)
      feats = evaluation.inception_map(variables, batches, num_levels=info.num_grey_levels,
                                       on_batch=p.update).pool3
    split_tag = "".join(ch if ch.isalnum() else "_" for ch in str(config.eval.split)).strip("_")
    path = os.path.join(workdir, f"fid_stats_{info.name}_{split_tag}.npz")  # test[:120] -> test__120
    if run_lib.is_main():
      evaluation.save_stats(path, *evaluation.compute_statistics(feats))
  logging.info("FID statistics of %d %s/%s images written to %s", len(feats), info.name,
               config.eval.split, path)
  return path
