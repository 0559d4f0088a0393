"""``training.prng_impl`` (losses.step_key): validated, honoured by the loss (t, noise and dropout
come from the chosen PRNG: another impl gives other draws of the same shapes), and exact resumption
still holds (the stored train-state rng is unchanged; the step key is a pure function of it).

Tiny MLP configs with dropout on the 4 simulated devices of conftest.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_schema
import losses
import sde_lib
from configs.default_toy import get_default_toy_config
from models import get_model
from models.utils import apply_model, init_model, score_fn_from_config
from modes.train import train
from test_run_lib import tiny_config as run_lib_tiny_config

OTHER_IMPLS = tuple(i for i in losses.PRNG_IMPLS if i != "threefry")


def tiny_config(impl: str = "threefry", n_iters: int = 20):
  """test_run_lib's tiny toy run, with dropout (the randomness prng_impl must change) and
  checkpoints every 10 steps."""
  c = run_lib_tiny_config(n_iters)
  c.training.prng_impl = impl
  c.training.eval_freq = c.training.snapshot_freq = c.training.snapshot_freq_for_preemption = 10
  c.model.dropout = 0.3
  return c


def test_default_and_schema():
  assert tiny_config().training.prng_impl == get_default_toy_config().training.prng_impl
  for impl in losses.PRNG_IMPLS:
    config_schema.validate(tiny_config(impl))
  c = tiny_config()
  c.training.prng_impl = "mersenne"
  with pytest.raises(ValueError, match=r"^training\.prng_impl"):
    config_schema.validate(c)
  with pytest.raises(ValueError, match=r"training\.prng_impl"):
    losses.step_key(jax.random.PRNGKey(0), "mersenne")


def test_threefry_keeps_the_key_of_older_runs():
  key = jax.random.fold_in(jax.random.PRNGKey(3), 7)
  np.testing.assert_array_equal(losses.step_key(key, "threefry"), key)


@pytest.mark.parametrize("impl", OTHER_IMPLS)
def test_step_key_is_a_pure_function_of_the_key(impl):
  key = jax.random.PRNGKey(0)
  a = jax.jit(losses.step_key, static_argnums=1)(key, impl)
  b = losses.step_key(key, impl)
  assert str(jax.random.key_impl(a)) == impl
  np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
  c = losses.step_key(jax.random.PRNGKey(1), impl)
  assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(c))


def _model_and_params(config):
  model = get_model(config)
  return model, init_model(model, jax.random.PRNGKey(0), (1, 2))


def test_dropout_mask_follows_the_impl():
  """Same step key, different impl -> a different dropout mask (output), same shape; eval mode
  (rng=None) does not depend on the impl."""
  config = tiny_config()
  model, params = _model_and_params(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  cond = jnp.full((64,), 0.5)
  key = jax.random.PRNGKey(2)
  outs = {i: apply_model(model, params, x, cond, losses.step_key(key, i)) for i in losses.PRNG_IMPLS}
  evals = {i: apply_model(model, params, x, cond, None) for i in losses.PRNG_IMPLS}
  for i in losses.PRNG_IMPLS:
    assert outs[i].shape == x.shape
    np.testing.assert_array_equal(apply_model(model, params, x, cond, losses.step_key(key, i)),
                                  outs[i])
    np.testing.assert_array_equal(evals[i], evals["threefry"])
  for i in OTHER_IMPLS:
    assert not np.allclose(outs[i], outs["threefry"]), i


def test_loss_fn_honours_the_config():
  """get_loss_fn reads training.prng_impl: another impl draws other t, noise and dropout masks."""
  results = {}
  for impl in losses.PRNG_IMPLS:
    config = tiny_config(impl)
    typed = config_schema.validate(config)
    sde = sde_lib.get_sde(typed.sde)
    model, params = _model_and_params(config)
    loss_fn = losses.get_loss_fn(typed.training, sde, score_fn_from_config(typed.model, sde, model))
    batch = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
    loss, metrics = jax.jit(loss_fn)(params, batch, jax.random.PRNGKey(4))
    assert np.isfinite(loss)
    results[impl] = (float(loss), float(metrics["t_mean"]))
  for impl in OTHER_IMPLS:
    assert results[impl][0] != results["threefry"][0], impl
    assert results[impl][1] != results["threefry"][1], impl


def test_resume_is_exact_with_rbg(tmp_path):
  """20 steps at once vs 10 + resume to 20 with prng_impl='rbg': the same losses bit for bit (the
  checkpointed rng restores and the step key is a function of it); resuming with another
  prng_impl is refused naming the field."""
  ref = train(tiny_config("rbg", 20), str(tmp_path / "ref"))
  wd = str(tmp_path / "wd")
  first = train(tiny_config("rbg", 10), wd)
  second = train(tiny_config("rbg", 20), wd)
  assert second["start_step"] == 10
  got = {**first["losses"], **second["losses"]}
  np.testing.assert_array_equal([got[s] for s in range(1, 21)],
                                [ref["losses"][s] for s in range(1, 21)])
  with pytest.raises(ValueError, match=r"training\.prng_impl"):
    train(tiny_config("threefry", 30), wd)
