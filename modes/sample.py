"""``--mode=sample``: ``sampling.n_samples`` samples from a workdir's checkpoint, started from its
prior, into ``workdir/samples/`` (``samples.npz``, ``samples.png``, ``report.json``: sampler, c, T,
NFE, time)."""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

import run_lib
from modes import register_mode


@register_mode("sample")
def sample(config: ml_collections.ConfigDict, workdir: str, sample_folder: str = "samples"):
  cfg = run_lib.validate_config(config)  # the typed sections
  with run_lib.model_outputs(config, workdir, sample_folder) as (model, out_dir):
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x5A)
    t0 = time.time()
    x, nfe = run_lib.generate(cfg, model, cfg.sampling.n_samples, key)
    report = {"step": model.step, "n_samples": len(x), "method": cfg.sampling.method,
              "c": cfg.sampling.c, "T": cfg.sde.T, "eps": cfg.sde.eps, "nfe": nfe,
              "seconds": time.time() - t0, "finite": bool(np.all(np.isfinite(x)))}
    run_lib.save_samples_npz(os.path.join(out_dir, "samples.npz"), x)
    run_lib.save_samples_png(os.path.join(out_dir, "samples.png"), x, cfg,
                             run_lib.toy_reference(cfg, len(x)))
    run_lib.write_json(os.path.join(out_dir, "report.json"), report)
  logging.info("samples: %s", report)
  return report
