"""``--mode=train_classifier``: the noise-conditional classifier p_t(y | x_t) of class-guided sampling
(Song et al. 2021, "Score-based generative modeling through SDEs", Sec. 5 and App. I.1), trained on
forward-noised labelled images, t ~ U(eps, T), by cross-entropy (``models/classifier.py``).

Everything lives in ``workdir/classifier/`` (``run_lib.CLASSIFIER_DIR``), beside the score model
and independent of it: ``config.json``, ``checkpoints/`` (``checkpoints.CheckpointStore``:
checksums, never a non-finite state, the latest every ``classifier.snapshot_freq`` steps and at
the end; SIGTERM checkpoints and stops), ``train_log.csv`` (step, loss in nats, batch accuracy
every ``classifier.log_freq`` steps) and, when training is complete, the held-out accuracy-vs-t
curve ``accuracy_vs_t.json`` / ``.png`` / ``.md`` on ``eval.split`` (each image noised once per t
with a fixed key). Step N's batch is ``LabeledIterator.batch_at(N - 1)`` and its key
fold_in(rng, N - 1), so a resumed run is bit-identical to an uninterrupted one. One writer: the
workdir's 'classifier' lock. ``run_lib.load_classifier`` loads the result for guided sampling.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import checkpoints
import datasets
import run_lib
import sde_lib
import training
from modes import register_mode
from progress import Progress

LOG_FILE = "train_log.csv"
CURVE_FILE = "accuracy_vs_t"


@register_mode("train_classifier")
def train_classifier(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) ``workdir/classifier``; returns ``{'step', 'start_step', 'log': [(step,
  loss, accuracy)], 'curve': accuracy-vs-t dict or None (training incomplete), 'state'}``."""
  cfg = run_lib.validate_config(config)  # the typed sections (config itself goes to files)
  sde = sde_lib.get_sde(cfg.sde)
  n_classes = run_lib.classifier_classes(cfg)  # names data.dataset when unlabelled
  folder = os.path.join(workdir, run_lib.CLASSIFIER_DIR)
  run_lib.check_same_config(config, folder, _compared_on_resume, "resume")
  mesh = training.make_mesh()
  if cfg.classifier.batch_size % mesh.size:
    raise ValueError(f"classifier.batch_size={cfg.classifier.batch_size} must be divisible by "
                     f"the number of devices ({mesh.size})")
  logits, state, optimizer = run_lib.init_classifier(
      cfg, sde, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xC1A5))
  stream = datasets.get_labeled_dataset(config, split=cfg.data.train_split,
                                        batch_size=cfg.classifier.batch_size)
  from models.classifier import cross_entropy_loss_fn
  train_step = training.make_train_step(cross_entropy_loss_fn(sde, logits), optimizer,
                                        cfg.classifier.ema_rate, mesh=mesh)
  checkpoints.check_writable(folder)
  with checkpoints.workdir_lock(workdir, run_lib.CLASSIFIER_DIR):
    run_lib.write_config(config, folder)
    with run_lib.open_classifier_checkpoints(cfg, workdir) as store:
      state, start = store.restore(training.replicate(state, mesh))
      shard = lambda b: jax.tree.map(lambda a: training.shard_batch(a, mesh), b)  # noqa: E731
      state, step, log = _loop(cfg, train_step, stream, shard, state, start, store, folder)
      store.wait_until_finished()
    curve = None
    if step >= cfg.classifier.n_iters:
      params = state.ema_params if cfg.classifier.use_ema else state.params
      curve = heldout_accuracy_curve(cfg, sde, logits, jax.device_get(params), n_classes)
      _write_curve(folder, curve)
  return {"step": step, "start_step": start, "log": log, "curve": curve, "state": state}


def _compared_on_resume(key: str) -> bool:
  return key.startswith(run_lib.CLASSIFIER_RUN_FIELDS) and key not in run_lib.CLASSIFIER_RESUMABLE


def _loop(config, train_step, stream, shard, state, start: int, store, folder: str):
  """The steps from ``start`` to ``classifier.n_iters`` (or SIGTERM); (state, step, log rows)."""
  c = config.classifier
  rows, log_path = [], os.path.join(folder, LOG_FILE)
  _truncate_log(log_path, start)

  def save(step: int, state) -> None:
    _append_log(log_path, rows)
    store.save(step, state, {"data_position": step})

  batches = (shard(stream.batch_at(step)) for step in range(start, c.n_iters))
  state, step = training.train_loop(
      train_step, state, batches, start=start, stop=c.n_iters, title="train classifier",
      log_every=c.log_freq, show=("accuracy",), save=save, save_every=(c.snapshot_freq,),
      on_log=lambda step, m: rows.append((step, float(m["loss"]), float(m["accuracy"]))))
  return state, step, rows


def _truncate_log(path: str, upto: int) -> None:
  """Keeps the log rows of steps <= ``upto`` (a resumed run redoes later steps identically)."""
  kept = []
  if os.path.exists(path):
    with open(path) as f:
      kept = [l for l in f if l[:1].isdigit() and int(l.split(",")[0]) <= upto]
  if run_lib.is_main():
    with open(path, "w") as f:
      f.writelines(["step,loss_nats,batch_accuracy\n"] + kept)


def _append_log(path: str, rows: list) -> None:
  if run_lib.is_main():
    with open(path) as f:
      done = {int(l.split(",")[0]) for l in f if l[:1].isdigit()}
    with open(path, "a") as f:
      f.writelines(f"{s},{l!r},{a!r}\n" for s, l, a in rows if s not in done)


def heldout_accuracy_curve(config, sde, logits, params, n_classes: int) -> dict[str, Any]:
  """Accuracy and cross-entropy (nats) of the classifier on every image of ``eval.split`` at
  ``classifier.curve_times`` times t linear on [eps, T]; image i noised at time index j with
  key fold_in(fold_in(key, j), i) (the same draws for every checkpoint)."""
  split = str(config.eval.split)
  labels = np.asarray(datasets.load_labels(config, split)[0])
  ts = np.linspace(float(sde.eps), float(sde.T), int(config.classifier.curve_times))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xACC)

  @jax.jit
  def batch_stats(x0, y, index, t, t_key):
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(t_key, i), x0.shape[1:]))(index)
    out = logits(params, sde.perturb(x0, jnp.full(x0.shape[:1], t), z), t)
    return (jnp.argmax(out, -1) == y), optax.softmax_cross_entropy_with_integer_labels(out, y)

  correct, nll = np.zeros(len(ts)), np.zeros(len(ts))
  with Progress(f"classifier accuracy vs t ({split})", len(ts), "times") as progress:
    for j, t in enumerate(ts):
      for batch in datasets.get_eval_dataset(config, split=split):
        y = labels[np.maximum(batch.index, 0)]
        ok, ce = batch_stats(batch.image, y, batch.index, t, jax.random.fold_in(key, j))
        correct[j] += float(np.sum(np.asarray(ok) * batch.mask))
        nll[j] += float(np.sum(np.asarray(ce) * batch.mask))
      progress.update(1)
  n = len(labels)
  return {"split": split, "n_images": n, "n_classes": n_classes, "chance": 1.0 / n_classes,
          "t": ts.tolist(), "accuracy": (correct / n).tolist(), "cross_entropy_nats": (nll / n).tolist()}


def _write_curve(folder: str, curve: dict[str, Any]) -> None:
  """``accuracy_vs_t.json``, ``.md`` (table) and ``.png`` (process 0)."""
  run_lib.write_json(os.path.join(folder, CURVE_FILE + ".json"), curve)
  if not run_lib.is_main():
    return
  lines = [f"Held-out accuracy of p_t(y | x_t) on {curve['split']} ({curve['n_images']} images; "
           f"chance {curve['chance']:.3f})", "", "| t | accuracy | cross-entropy (nats) |",
           "|---|---|---|"]
  lines += [f"| {t:.4g} | {a:.3f} | {c:.3f} |" for t, a, c in
            zip(curve["t"], curve["accuracy"], curve["cross_entropy_nats"])]
  with open(os.path.join(folder, CURVE_FILE + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(curve["t"], curve["accuracy"], "o-", label=f"held-out ({curve['split']})")
  ax.axhline(curve["chance"], color="gray", ls="--", label="chance")
  ax.set_xlabel("diffusion time t")
  ax.set_ylabel("accuracy of argmax p_t(y | x_t)")
  ax.set_ylim(0, 1.02)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(folder, CURVE_FILE + ".png"), dpi=100)
  plt.close(fig)
