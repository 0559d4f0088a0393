"""Controllable generation on the offline digits (Song et al. 2021, "Score-based generative modeling
through SDEs", §5 and App. I): class-guided samples and bottom-half inpainting, with the ODE
(c = 0) and the reverse SDEs c = 1, 2 (Cao et al.'s question on a conditional task).

  python experiments/controllable_digits.py --out DIR [--score-workdir WD] [--smoke | --long | --full]

1. The score model: ``configs/digits_vp.py`` trained by ``--mode=train`` into DIR/score_model (or
   the workdir WD of ``python main.py --config=configs/digits_vp.py --mode=train --workdir=WD``,
   used at its latest checkpoint, not trained further; result.json gives its step). The noise-conditional classifier p_t(y | x_t):
   ``--mode=train_classifier`` into <score workdir>/classifier/ (its held-out accuracy-vs-t curve
   is copied to DIR/classifier_accuracy_vs_t.png).
2. Guided samples of every class: the score of p_t(x | y) = s_theta + s grad log p_t(y | x)
   (``controllable.class_conditional_score``; s = 1 is Bayes' rule, s > 1 guidance), drawn with
   fixed Euler(-Maruyama) steps of the generative SDE h^2 = c g^2 (``sampling.method='sde'``;
   inpainting's step hook: the same update as 'pc' with predictor 'euler_maruyama', no corrector).
   Each sample is classified by the held-out digits classifier of the evaluation
   (``evaluation.train_digits_classifier``, scikit-learn MLP), here fitted on datasets.py's
   *train* split so that no test digit was seen (its own default split overlaps our test split);
   per class: the share of samples that are the requested digit.
3. Inpainting of the test digits (default: the first 120; ``--long``: all 360) with the bottom
   half hidden (``controllable.imputation_hook``, App. I.2, replacement at every step): how often the held-out classifier recovers the true label
   from the inpainted image, against the mean-fill baseline (bottom half = the training split's
   mean image) and against unconditional samples (no observation: chance level), and the mean
   squared error of the hidden half (grey levels in [0, 1]). Images are classified after
   quantization to the 17 grey levels (``datasets.quantize``).

Writes DIR/result.json, DIR/table.md, DIR/guided_c*_s*.png (rows: digits 0-9), DIR/inpainting.png
(rows: truth, observed top half, mean fill, c = 0, 1, 2), DIR/guided_accuracy.png.
Default: the digits_vp model (1000 steps), classifier 900 steps, 12 samples per digit for each of
(c, s) = (0, 1), (1, 1), (1, 3), the first 120 test digits inpainted, 100 sampler steps;
``--long``: 2000 classifier steps, 36 per digit for c = 0, 1, 2 and s = 1, 3, all 360 test
digits, 500 sampler steps; ``--smoke``: tiny networks, a few samples.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

CS = (0.0, 1.0, 2.0)  # generative diffusion h^2 = c g^2: the ODE and two reverse SDEs
SCALES = {  # per class, sampler steps, (c, s) guidance settings, test images inpainted
    "smoke": dict(per_class=2, n_steps=20, guidance=((1.0, 1.0), (1.0, 4.0)), n_test=20,
                  classifier_steps=40),
    "default": dict(per_class=12, n_steps=100, guidance=((0.0, 1.0), (1.0, 1.0), (1.0, 3.0)),
                    n_test=120, classifier_steps=900),
    "long": dict(per_class=36, n_steps=500,
                 guidance=((0.0, 1.0), (1.0, 1.0), (2.0, 1.0), (0.0, 3.0), (1.0, 3.0),
                           (2.0, 3.0)), n_test=360, classifier_steps=2000),
    "full": dict(per_class=100, n_steps=1000,
                 guidance=((0.0, 1.0), (1.0, 1.0), (2.0, 1.0), (0.0, 3.0), (1.0, 3.0),
                           (2.0, 3.0)), n_test=360, classifier_steps=2000),
}
BATCH = 60  # samples per vmapped sampler call


def scaled_config(scale: str):
  """configs/digits_vp.py (the main job's model) with the classifier and sampler of this scale."""
  from configs.digits_vp import get_config
  config = get_config()
  s = config.sampling
  s.method, s.solver, s.adaptive, s.n_steps = "sde", "euler", False, SCALES[scale]["n_steps"]
  config.classifier.n_iters = SCALES[scale]["classifier_steps"]
  if scale == "smoke":
    config.model.nf, config.model.attn_resolutions = 8, ()
    config.training.n_iters, config.training.log_freq = 20, 10
    config.training.eval_freq = config.training.snapshot_freq = 20
    config.training.snapshot_freq_for_preemption = 20
    config.training.batch_size = config.training.ref_batch_size = 32
    config.optim.warmup, config.eval.use_ema = 0, False
    c = config.classifier
    c.widths, c.batch_size, c.lr, c.warmup = (8,), 32, 1e-2, 0
    c.ema_rate, c.log_freq, c.snapshot_freq, c.curve_times = 0.5, 20, 40, 3
  return config


def train_models(config, workdir: str, train_score: bool = True) -> None:
  """--mode=train (unless ``train_score`` is False: a given workdir is used at its latest
  checkpoint) and --mode=train_classifier (a finished classifier is left as it is)."""
  from modes.train import train
  from modes.train_classifier import train_classifier
  if train_score:
    train(config, workdir)
  train_classifier(config, workdir)


def heldout_classifier():
  """(the scikit-learn digits classifier of evaluation.py fitted on datasets.py's train split,
  its accuracy on the 360 test digits)."""
  import datasets
  import evaluation
  config = scaled_config("default")
  split = {s: (datasets.load_levels(config, s)[0] / 16.0, datasets.load_labels(config, s)[0])
           for s in ("train", "test")}
  clf = evaluation.train_digits_classifier(*split["train"], *split["test"])
  return clf, clf.test_accuracy


def predict(clf, x: np.ndarray, info) -> np.ndarray:
  """Labels the held-out classifier gives model-space images (quantized to the grey levels)."""
  import datasets
  import evaluation
  levels = datasets.quantize(np.asarray(x), info, dequantized=True).astype(np.float64)
  return np.argmax(evaluation.digits_probs(clf, levels / (info.num_grey_levels - 1)), axis=1)


def draw(config, model, n: int, key, name: str, score_for, hook_for=None, args=()):
  """n samples; sample i is the sampler run alone from fold_in(key, i) with the score (and step
  hook) that ``score_for(*args[i])`` (``hook_for``) make; vmapped in padded batches of BATCH."""
  import jax
  import jax.numpy as jnp
  import samplers
  from progress import Progress
  sample_fn = samplers.get_sampler(config.sampling, model.sde, (1,) + model.event_shape,
                                   prior=model.prior)

  def one(k, *a):
    hook = None if hook_for is None else hook_for(*a)
    return sample_fn(score_for(*a), k, step_hook=hook)[0][0]

  run = jax.jit(jax.vmap(one))
  out = []
  with Progress(name, n, "samples") as progress:
    for start in range(0, n, BATCH):
      idx = np.minimum(np.arange(start, start + BATCH), n - 1)  # the last batch padded
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx))
      x = np.asarray(run(keys, *[jnp.asarray(a[idx]) for a in args]))
      out.append(x[:min(BATCH, n - start)])
      progress.update(len(out[-1]))
  return np.concatenate(out)


def with_c(config, c: float, hooked: bool = False):
  """The config with sampling.c = c; ``hooked``: 'pc' with Euler-Maruyama and no corrector, the
  fixed-step 'sde' update as a scan that takes a step hook (diffrax's 'sde' takes none)."""
  config = config.copy_and_resolve_references()
  config.sampling.c = float(c)
  if hooked:
    s = config.sampling
    s.method, s.predictor, s.n_corrector_steps = "pc", "euler_maruyama", 0
  return config


def guided(config, model, logits_fn, clf, scale: str, key) -> dict:
  """Per (c, s): the samples of each class and the share the held-out classifier agrees with."""
  import controllable
  import datasets
  info = datasets.dataset_info(config)
  per_class = SCALES[scale]["per_class"]
  labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
  runs = {}
  for c, s in SCALES[scale]["guidance"]:
    score_for = lambda y, s=s: controllable.class_conditional_score(  # noqa: E731
        model.score_fn, logits_fn, y[None], s)
    x = draw(with_c(config, c), model, len(labels), key, f"guided samples (c={c:g}, s={s:g})",
             score_for, args=(labels,))
    hit = predict(clf, x, info) == labels
    per = hit.reshape(10, per_class).mean(axis=1)
    runs[f"c={c:g},s={s:g}"] = {"c": c, "s": s, "accuracy": float(hit.mean()),
                                "accuracy_stderr": float(np.sqrt(hit.mean() * (1 - hit.mean())
                                                                 / len(hit))),
                                "per_class": per.tolist(), "samples": x}
  return runs


def inpainting(config, model, clf, scale: str, key) -> dict:
  """Bottom-half inpainting of the first n test digits with each c, the mean-fill baseline and
  unconditional samples (c = 1): label recovery and MSE of the hidden half."""
  import jax.numpy as jnp
  import controllable
  import datasets
  info = datasets.dataset_info(config)
  n = SCALES[scale]["n_test"]
  levels = datasets.load_levels(config, "test")[0][:n]
  labels = datasets.load_labels(config, "test")[0][:n]
  truth = datasets.scale_images(levels, info.num_grey_levels, info.centered, 0.5).astype(np.float32)
  known = np.asarray(controllable.inpainting_mask("bottom_half", info.shape, None))
  masks = np.broadcast_to(known, truth.shape)
  train = datasets.load_levels(config, "train")[0]
  mean = datasets.scale_images(train.mean(axis=0), info.num_grey_levels, info.centered, 0.5)
  results = {"true image": truth, "mean fill": np.where(masks, truth, mean).astype(np.float32)}
  for c in CS:
    hook_for = lambda obs, m: controllable.imputation_hook(model.sde, obs[None], m[None])  # noqa: E731
    results[f"inpainted, c={c:g}"] = draw(with_c(config, c, hooked=True), model, n, key,
                                          f"inpainting (c={c:g})", lambda *a: model.score_fn,
                                          hook_for, args=(truth, masks))
  results["unconditional, c=1"] = draw(with_c(config, 1.0), model, n, key, "unconditional (c=1)",
                                       lambda *a: model.score_fn, args=(truth,))
  hidden = ~known
  out = {}
  for name, x in results.items():
    hit = predict(clf, x, info) == labels
    err = (datasets.inverse_scale(x, info.centered) - datasets.inverse_scale(truth, info.centered))
    mse = np.mean(err[:, hidden] ** 2, axis=1)
    out[name] = {"recovered": float(hit.mean()),
                 "recovered_stderr": float(np.sqrt(hit.mean() * (1 - hit.mean()) / n)),
                 "hidden_mse": float(mse.mean()), "hidden_mse_stderr": float(mse.std(ddof=1)
                                                                            / np.sqrt(n)),
                 "images": x}
  out["_known_top_half"] = known
  return out


def run(scale: str, out: str, score_workdir: str | None) -> dict:
  import jax
  import run_lib
  config = scaled_config(scale)
  workdir = score_workdir or os.path.join(out, "score_model")
  t0 = time.time()
  train_models(config, workdir, train_score=score_workdir is None)
  t_train = time.time() - t0
  model = run_lib.load_score_model(config, workdir)
  logits_fn = run_lib.load_classifier(config, workdir)
  clf, clf_acc = heldout_classifier()
  key = jax.random.PRNGKey(int(config.seed))
  runs = guided(config, model, logits_fn, clf, scale, jax.random.fold_in(key, 1))
  inpaint = inpainting(config, model, clf, scale, jax.random.fold_in(key, 2))
  with open(os.path.join(workdir, run_lib.CLASSIFIER_DIR, "accuracy_vs_t.json")) as f:
    curve = json.load(f)
  os.makedirs(out, exist_ok=True)
  shutil.copy(os.path.join(workdir, run_lib.CLASSIFIER_DIR, "accuracy_vs_t.png"),
              os.path.join(out, "classifier_accuracy_vs_t.png"))
  return {"guided": runs, "inpainting": inpaint, "classifier_curve": curve,
          "heldout_classifier_test_accuracy": clf_acc, "score_model_step": model.step,
          "score_workdir_reused": score_workdir is not None, "train_seconds": t_train,
          "n_steps": int(config.sampling.n_steps), "classifier_steps":
          int(config.classifier.n_iters), "per_class": SCALES[scale]["per_class"],
          "n_test": SCALES[scale]["n_test"]}


def _strip(result: dict) -> dict:
  """result.json's content: everything but the image arrays."""
  drop = ("samples", "images")
  return {"guided": {k: {a: b for a, b in v.items() if a not in drop}
                     for k, v in result["guided"].items()},
          "inpainting": {k: {a: b for a, b in v.items() if a not in drop}
                         for k, v in result["inpainting"].items() if not k.startswith("_")},
          **{k: v for k, v in result.items() if k not in ("guided", "inpainting")}}


def write(result: dict, out: str, scale: str, seconds: float) -> None:
  saved = dict(_strip(result), scale=scale, seconds=seconds,
               claim="Song et al. 2021 §5 / App. I: a noise-conditional classifier turns the "
                     "unconditional score model into class-conditional samplers (any c) and "
                     "the replacement method inpaints; here on digits at CPU scale",
               units={"accuracy": "share of samples", "recovered": "share of test images",
                      "hidden_mse": "mean squared error per hidden pixel, grey in [0, 1]",
                      "seconds": "s (wall)"})
  common.write(out, saved, table_lines(saved))
  _figures(result, out)


def table_lines(r: dict) -> list[str]:
  curve = r["classifier_curve"]
  lines = [f"Scale {r['scale']!r}, {common.duration(r['seconds'])}; digits_vp score model at step "
           f"{r['score_model_step']}, classifier {r['classifier_steps']} steps (held-out "
           f"accuracy {curve['accuracy'][0]:.3f} at t = {curve['t'][0]:.0e}, "
           f"{curve['accuracy'][len(curve['t']) // 2]:.3f} at t = "
           f"{curve['t'][len(curve['t']) // 2]:.2f}), {r['n_steps']} Euler(-Maruyama) steps. "
           f"Judge: the evaluation's scikit-learn digits classifier fitted on the train split "
           f"(test accuracy {r['heldout_classifier_test_accuracy']:.3f}).", "",
           "Class-guided samples: share classified as the requested digit "
           f"({r['per_class']} per digit)", "",
           "| c | s | all digits | " + " | ".join(str(d) for d in range(10)) + " |",
           "|---|---|---|" + "---|" * 10]
  for g in r["guided"].values():
    lines.append(f"| {g['c']:g} | {g['s']:g} | {g['accuracy']:.3f} ± {g['accuracy_stderr']:.3f} | "
                 + " | ".join(f"{a:.2f}" for a in g["per_class"]) + " |")
  lines += ["", f"Bottom-half inpainting of the first {r['n_test']} test digits: label recovered "
            "by the judge; MSE of the hidden half (grey levels in [0, 1])", "",
            "| image | label recovered | hidden-half MSE |", "|---|---|---|"]
  for name, v in r["inpainting"].items():
    lines.append(f"| {name} | {v['recovered']:.3f} ± {v['recovered_stderr']:.3f} | "
                 f"{v['hidden_mse']:.4f} ± {v['hidden_mse_stderr']:.4f} |")
  return lines


def _grid(images: np.ndarray, nrow: int, path: str) -> None:
  import evaluation
  from PIL import Image
  grid = evaluation.image_grid(np.clip((images + 1) / 2, 0, 1), nrow=nrow)
  Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def _figures(result: dict, out: str) -> None:
  per_class = result["per_class"]
  for g in result["guided"].values():
    _grid(g["samples"], per_class, os.path.join(out, f"guided_c{g['c']:g}_s{g['s']:g}.png"))
  rows = [v["images"][:12] for k, v in result["inpainting"].items()
          if not k.startswith(("_", "unconditional"))]
  observed = np.where(result["inpainting"]["_known_top_half"], rows[0], -1.0)
  _grid(np.concatenate([rows[0], observed] + rows[1:]), 12, os.path.join(out, "inpainting.png"))
  with common.figure(os.path.join(out, "guided_accuracy.png"), figsize=(7, 4)) as (fig, ax):
    for name, g in result["guided"].items():
      ax.plot(range(10), g["per_class"], "o-", label=f"{name}: {g['accuracy']:.2f}")
    ax.axhline(0.9, color="gray", ls="--", label="aim 0.9")
    ax.set_xticks(range(10))
    ax.set_xlabel("requested digit")
    ax.set_ylabel("share classified as requested")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)


def summarize(result: dict) -> list[dict]:
  """The README's claim rows from this script's result.json (experiments/claims.py)."""
  best = max(result["guided"].values(), key=lambda g: g["accuracy"])
  exact = [g for g in result["guided"].values() if g["s"] == 1.0]
  inp = result["inpainting"]
  rec = ", ".join(f"c = {k.split('c=')[1]}: {v['recovered']:.2f}" for k, v in inp.items()
                  if k.startswith("inpainted"))
  return [{"claim": "a noise-conditional classifier makes the unconditional score model a "
                    "class-conditional sampler (p_t(x \\| y) by Bayes' rule; s > 1: guidance)",
           "paper": "Song et al. 2021, §5, App. I.1", "printed": "qualitative (CIFAR-10 Fig. 4)",
           "reproduced": f"digits (score model {result['score_model_step']} steps, classifier "
                         f"{result['classifier_steps']}), share of guided samples of the requested "
                         "digit (held-out judge): s = 1: " + ", ".join(f"c = {g['c']:g}: {g['accuracy']:.2f}"
                                                      for g in exact)
                         + f"; best {best['accuracy']:.2f} (c = {best['c']:g}, s = {best['s']:g})",
           "command": "python experiments/controllable_digits.py --out DIR"},
          {"claim": "the replacement method inpaints with an unconditional score model (does "
                    "the digit survive? against filling in the mean image)",
           "paper": "Song et al. 2021, App. I.2", "printed": "qualitative (Fig. 5)",
           "reproduced": f"digits, bottom half of {result['n_test']} test digits hidden, true "
                         f"label recovered: {rec}; mean fill "
                         f"{inp['mean fill']['recovered']:.2f}, unconditional "
                         f"{inp['unconditional, c=1']['recovered']:.2f}, full image "
                         f"{inp['true image']['recovered']:.2f}",
           "command": "python experiments/controllable_digits.py --out DIR"}]


def main(argv=None) -> None:
  parser = common.parser(__doc__, long="36 guided samples per digit and setting, 500 steps",
                         full="100 per digit, 1000 steps")
  parser.add_argument("--score-workdir", default=None,
                      help="a finished digits_vp workdir to reuse (else DIR/score_model)")
  args = parser.parse_args(argv)
  scale = common.start(args)  # absl at INFO: the modes' progress lines (rate, ETA)
  t0 = time.time()
  result = run(scale, args.out, args.score_workdir)
  write(result, args.out, scale, seconds=time.time() - t0)
  print(open(os.path.join(args.out, "table.md")).read(), flush=True)


if __name__ == "__main__":
  main()
