"""``--mode=import --checkpoint=FILE``: a published score_sde or EDM model as a scorelab workdir.

Reads a score_sde_pytorch ``.pth`` or a score_sde / score_flow Flax checkpoint (``score_sde_import``),
maps every tensor onto the network of ``--config`` (an error names the first tensor that does not
fit), applies the config overrides that reproduce score_sde's score conventions, and writes
``config.json`` and a verified checkpoint holding params, EMA params, the step and a fresh optimizer
state. ``--mode=eval`` / ``--mode=sample`` then run on the workdir with the same config and
overrides (logged, and saved in ``import.json``).

An EDM network pickle (``network-snapshot-*.pkl`` of NVlabs/edm or of the Stable Target Field
authors' fork; ``edm_pickle``, read as data, its embedded code never run) configures the network
itself: the constructor arguments it records set model.* (songunet: channels, multipliers, blocks,
attention, embedding, encoder / decoder, resample filter, augment_dim, dropout), sde.name 'edm',
sde.sigma_data / P_mean / P_std and data.image_size / num_channels / centered over ``--config``;
``import.json`` lists every field set (``config_overrides``) and what the pickle held (``edm``).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

import checkpoints
import run_lib
import sde_lib
from modes import register_mode


@register_mode("import")
def import_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = ""):
  """Imports ``checkpoint`` into a new workdir; returns {'step', 'config_overrides', 'source'}."""
  import edm_pickle
  import score_sde_import
  run_lib.validate_config(config)
  if not checkpoint:
    raise ValueError("--mode=import needs --checkpoint=FILE (a score_sde_pytorch .pth, a "
                     "score_sde / score_flow Flax checkpoint or an EDM network .pkl)")
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint}: no such file")
  existing = os.path.join(workdir, checkpoints.DIR)
  if os.path.isdir(existing) and any(s.isdigit() for s in os.listdir(existing)):
    raise FileExistsError(f"{existing} already holds checkpoints: import into a new workdir")
  load = (score_sde_import.import_pytorch_checkpoint if checkpoint.endswith((".pth", ".pt"))
          else edm_pickle.import_edm_pickle if checkpoint.endswith(".pkl")
          else score_sde_import.import_flax_checkpoint)
  imported = load(config, checkpoint)  # every tensor mapped, or an error naming it
  config = score_sde_import.apply_overrides(config, imported["config_overrides"])
  cfg = run_lib.validate_config(config)
  _, _, state = run_lib.init_state(cfg, sde_lib.get_sde(cfg.sde), jax.random.PRNGKey(cfg.seed),
                                   template=True)  # every parameter is replaced by the import
  state = _with_params(cfg, state, imported)
  checkpoints.check_writable(workdir)
  with checkpoints.workdir_lock(workdir, "train"):
    run_lib.write_config(config, workdir)
    with run_lib.open_checkpoints(config, workdir) as store:
      store.save(imported["step"], state, {"data_position": imported["step"],
                                           "imported_from": imported["source"]})
      store.wait_until_finished()
    report = {"step": imported["step"], "config_overrides": imported["config_overrides"],
              "source": imported["source"]}
    if "edm" in imported:
      report["edm"] = imported["edm"]
    run_lib.write_json(os.path.join(workdir, "import.json"), report)
  flags = " ".join(f"--config.{k}={v}" for k, v in imported["config_overrides"].items())
  logging.info("imported %s (step %d) into %s; evaluate / sample with the same --config and %s",
               imported["source"], imported["step"], workdir, flags)
  return report


def _with_params(cfg, state, imported):
  """The fresh TrainState with the imported params, EMA params and step (optimizer state fresh,
  initialised on the imported params)."""
  import training
  params = jax.tree.map(jnp.asarray, imported["params"])
  ema = jax.tree.map(jnp.asarray, imported["ema_params"])
  jax.tree.map(lambda a, b: None, params, state.params)  # same tree, or an error
  fresh = training.init_train_state(params, training.make_optimizer(cfg.optim), state.rng)
  return fresh.replace(ema_params=ema, step=jnp.asarray(imported["step"], fresh.step.dtype))
