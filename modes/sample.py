"""``--mode=sample``: ``sampling.n_samples`` samples from a workdir's checkpoint, started from its
prior, into ``workdir/samples/`` (``samples.npz``, ``samples.png``, ``report.json``: sampler, c, T,
NFE, time).

With ``sampling.condition`` (controllable generation, Song et al. 2021, Sec. 5 and App. I) the
outputs go to ``workdir/samples_<condition>/``:
* 'class': ``sampling.n_samples`` samples of ``sampling.class_label`` (-1: of every class in turn)
  guided by the classifier of --mode=train_classifier with scale ``sampling.guidance_scale``:
  ``class_<y>.png``, ``classes.png`` (a row per class), ``samples.npz``, ``report.json`` (per class:
  NFE and the share the guiding classifier assigns to y at t = eps, %).
* 'inpaint' / 'colorize': the first ``sampling.n_samples`` images of ``eval.split`` with the part
  hidden by ``sampling.mask`` (or their colour) imputed: ``original.png``, ``observation.png``,
  ``mask.png`` (inpaint), ``samples.png``, ``samples.npz``, ``report.json`` (MSE of the imputed
  part, gray-channel error).
"""
from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import controllable
import datasets
import run_lib
from modes import register_mode


@register_mode("sample")
def sample(config: ml_collections.ConfigDict, workdir: str, sample_folder: str = "samples"):
  cfg = run_lib.validate_config(config)  # the typed sections
  if cfg.sampling.condition != "none":
    return sample_conditional(config, workdir, f"{sample_folder}_{cfg.sampling.condition}")
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


def sample_conditional(config: ml_collections.ConfigDict, workdir: str, folder: str) -> dict:
  """Class-guided samples, inpaintings or colorizations into ``workdir/folder`` (module doc).
  Fails before any work on a bad combination (config_schema) or a missing classifier."""
  cfg = run_lib.validate_config(config)  # the typed sections
  condition = cfg.sampling.condition
  logits_fn = None
  if condition == "class":
    try:
      logits_fn = run_lib.load_classifier(config, workdir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"sampling.condition='class' needs a trained classifier: {e}") from e
  with run_lib.model_outputs(config, workdir, folder) as (model, out_dir):
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x5A)
    t0 = time.time()
    if condition == "class":
      report = _class_guided(cfg, model, logits_fn, key, out_dir)
    else:
      report = _imputed(cfg, model, key, out_dir)
    report.update(step=model.step, condition=condition, method=cfg.sampling.method,
                  c=cfg.sampling.c, T=cfg.sde.T, eps=cfg.sde.eps, seconds=time.time() - t0)
    run_lib.write_json(os.path.join(out_dir, "report.json"), report)
  logging.info("%s samples: %s", condition, report)
  return report


def _class_guided(config, model, logits_fn, key, out_dir: str) -> dict:
  """sampling.n_samples guided samples of each requested class, their PNGs and per-class rows."""
  n, scale = config.sampling.n_samples, config.sampling.guidance_scale
  label = config.sampling.class_label
  labels = list(range(run_lib.classifier_classes(config))) if label < 0 else [label]
  eps = jnp.asarray(config.sde.eps, jnp.float32)
  rows, per_class = [], {}
  for y in labels:
    x, nfe = run_lib.generate(config, run_lib.guided_model(model, logits_fn, y, scale), n,
                              jax.random.fold_in(key, y))
    predicted = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x), eps), axis=-1))
    per_class[str(y)] = {"n_samples": len(x), "nfe": nfe, "finite": bool(np.all(np.isfinite(x))),
                         "guiding_classifier_agrees_percent":
                             100.0 * float(np.mean(predicted == y))}
    run_lib.save_samples_png(os.path.join(out_dir, f"class_{y}.png"), x, config)
    rows.append(x)
  samples = np.stack(rows)  # (classes, n, *event)
  if run_lib.is_main():
    np.savez(os.path.join(out_dir, "samples.npz"), samples=samples, labels=np.asarray(labels))
  _save_rows_png(os.path.join(out_dir, "classes.png"), samples[:, :10], config)
  return {"labels": labels, "guidance_scale": scale, "n_samples_per_class": n,
          "per_class": per_class}


def _imputed(config, model, key, out_dir: str) -> dict:
  """Inpaintings / colorizations of the first sampling.n_samples images of eval.split."""
  info = datasets.dataset_info(config)
  original = run_lib.eval_images(config, config.sampling.n_samples)
  lo = -1.0 if info.centered else 0.0
  if config.sampling.condition == "inpaint":
    keys = jax.random.split(jax.random.fold_in(key, 0x3A5C), len(original))
    known = np.asarray(jax.vmap(lambda k: controllable.inpainting_mask(
        config.sampling.mask, info.shape, k))(keys))
    basis = None
    observation = np.where(known, original, 0.5 * (lo + 1.0))  # hidden part: mid gray
  else:
    known = np.broadcast_to(np.asarray(controllable.gray_mask(info.shape[-1])), original.shape)
    basis = controllable.colorization_basis()
    observation = np.broadcast_to(np.asarray(controllable.gray(original)), original.shape)
  x, nfe = run_lib.impute(config, model, original, known, key, basis)
  images = {"original": original, "observation": observation, "samples": x}
  report = {"n_images": len(x), "split": config.eval.split, "nfe": nfe,
            "finite": bool(np.all(np.isfinite(x)))}
  if basis is None:
    images["mask"] = np.where(known, 1.0, lo).astype(np.float32)
    hidden = ~known
    report.update(mask=config.sampling.mask,
                  known_percent=100.0 * float(np.mean(known)),
                  mse_hidden=float(np.sum((x - original) ** 2 * hidden) / max(np.sum(hidden), 1)),
                  mse_hidden_gray_fill=float(np.sum((observation - original) ** 2 * hidden)
                                             / max(np.sum(hidden), 1)))
  else:
    report.update(gray_max_abs_error=float(np.max(np.abs(np.asarray(
        controllable.gray(x) - controllable.gray(original))))),
                  mse_colour=float(np.mean((x - original) ** 2)))
  for name, value in images.items():
    run_lib.save_samples_png(os.path.join(out_dir, f"{name}.png"), value, config)
  if run_lib.is_main():
    np.savez(os.path.join(out_dir, "samples.npz"), **images)
  return report


def _save_rows_png(path: str, rows: np.ndarray, config) -> None:
  """A grid with one row per leading index of ``rows`` (classes, k, H, W, C), process 0 only."""
  if not run_lib.is_main():
    return
  import evaluation
  from PIL import Image
  info = datasets.dataset_info(config)
  flat = rows.reshape((-1,) + rows.shape[2:])
  grid = evaluation.image_grid(np.clip(datasets.inverse_scale(flat, info.centered), 0, 1),
                               nrow=rows.shape[1])
  scale = max(1, int(math.ceil(256 / grid.shape[1])))
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                               Image.NEAREST).save(path)
