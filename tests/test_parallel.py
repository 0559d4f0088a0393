"""Sharded evaluation (parallel.py): per-example results do not depend on the batch size, the
device count or the padding, on the 4 simulated CPU devices of conftest.py.

Tolerances: 1 vs 4 devices run the same per-example computation, but XLA may fuse and vectorize
a batch of B / 4 rows differently from B rows, so float32 results agree to ~1e-6 relative, not
bit for bit; integer outputs (NFE) and adaptive step counts must agree exactly.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_schema
import datasets
import likelihood
import parallel
import sde_lib
from configs.default_toy import get_default_toy_config


def _noisy_sum(consts, xs, keys):
  return {"y": xs.sum(-1) * consts + jax.vmap(lambda k: jax.random.normal(k))(keys),
          "row": xs[:, 0]}


@pytest.mark.parametrize("n_dev,batch", [(1, 7), (2, 8), (4, 12), (4, 4)])
def test_map_dataset_same_per_example_results_any_devices_and_batching(n_dev, batch):
  """23 examples in padded batches: every example once, in split order, with the same value
  (its key is fold_in(key, index)) whatever the batch size and the number of devices."""
  x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
  key = jax.random.PRNGKey(3)
  reference = parallel.map_dataset(_noisy_sum, jnp.float32(2.0),
                                   datasets.array_eval_batches(x, 23), key,
                                   mesh=parallel.make_mesh(jax.devices()[:1]))
  seen = []
  out = parallel.map_dataset(_noisy_sum, jnp.float32(2.0), datasets.array_eval_batches(x, batch),
                             key, mesh=parallel.make_mesh(jax.devices()[:n_dev]),
                             on_batch=seen.append)
  np.testing.assert_array_equal(out["row"], x[:, 0])  # order kept, padding dropped
  np.testing.assert_allclose(out["y"], reference["y"], rtol=1e-6)
  assert sum(seen) == 23
  assert np.std(out["y"] - 2 * x.sum(-1)) > 0.5  # the keys differ between examples


def test_per_example_key_makes_a_batch_function_batch_independent():
  """``per_example`` calls a batch function on each example alone: a batch-dependent statistic
  (the batch mean) becomes the example itself."""
  fn = parallel.per_example(lambda c, x, k: {"m": jnp.broadcast_to(x.mean(), x.shape[:1])})
  out = fn(None, jnp.arange(4.0)[:, None], jax.vmap(jax.random.PRNGKey)(jnp.arange(4)))
  np.testing.assert_allclose(out["m"], np.arange(4.0))


def _gaussian_image_model():
  """Data N(0, s0^2 I) on 8x8x1, VP SDE: the exact marginal score is -x / (alpha^2 s0^2 +
  sigma^2); its scale is the 'parameter' that sharded_map replicates."""
  config = get_default_toy_config()
  sde = sde_lib.get_sde(config_schema.validate(config).sde)

  def apply(params, x, t):
    alpha, sigma = sde.marginal_coeffs(t)
    var = alpha ** 2 * params ** 2 + sigma ** 2
    return -x / var[:, None, None, None]

  return sde, apply, jnp.float32(0.4)


@pytest.mark.parametrize("n_dev", [2, 4])
def test_bits_per_dim_ode_and_bound_same_on_one_and_n_devices(n_dev):
  """ODE bits/dim (adaptive per-example solves: NFE identical), and the ScoreFlow bound, of 10
  digit-shaped level images in batches of 4 (the last one padded): equal on 1 and n devices."""
  sde, apply, params = _gaussian_image_model()
  levels = np.random.default_rng(0).integers(0, 17, (10, 8, 8, 1)).astype(np.uint8)

  def logp(c, y, k):
    out = likelihood.log_likelihood(lambda x, t: apply(c, x, t), sde, y, k, rtol=1e-4, atol=1e-4)
    return {"logp": out["logp"], "nfe": out["nfe"]}

  def neg_bound(c, y, k):
    return {"logp": -likelihood.scoreflow_bound(lambda x, t: apply(c, x, t), sde, y, k,
                                                n_time_samples=8)["nll_bound"]}

  results = {}
  for devices in (1, n_dev):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    results[devices] = [likelihood.dataset_bits_per_dim(
        parallel.per_example(fn), params, datasets.array_eval_batches(levels, 4), key,
        num_levels=17, mesh=mesh) for fn, key in ((logp, jax.random.PRNGKey(0)),
                                                  (neg_bound, jax.random.PRNGKey(1)))]
  (ode1, bound1), (oden, boundn) = results[1], results[n_dev]
  np.testing.assert_array_equal(ode1["nfe"], oden["nfe"])
  np.testing.assert_allclose(ode1["bpd_per_example"], oden["bpd_per_example"], rtol=1e-5)
  np.testing.assert_allclose(bound1["bpd_per_example"], boundn["bpd_per_example"], rtol=1e-5)
  assert ode1["n"] == bound1["n"] == 10 and np.all(ode1["nfe"] > 3)


def test_toy_eval_and_samples_same_on_one_and_four_devices(tmp_path):
  """--mode=eval of a trained toy model (NLL by the ODE, the bound, samples) within
  ``use_devices(1)`` and on all 4 devices: the same report and the same samples."""
  from modes.evaluate import evaluate
  from modes.train import train
  from test_run_lib import tiny_config
  config = tiny_config(20)
  config.eval.num_likelihood_examples = 30
  config.eval.batch_size = 8
  config.eval.num_samples = 12
  config.sampling.batch_size = 8
  config.sampling.method, config.sampling.c, config.sampling.n_steps = "pc", 1.0, 50
  wd = str(tmp_path / "wd")
  train(config, wd)
  with parallel.use_devices(1):
    one = evaluate(config, wd, eval_folder="eval1")
  four = evaluate(config, wd, eval_folder="eval4")
  for key in ("nll", "nll_bound", "likelihood_nfe"):
    np.testing.assert_allclose(four[key], one[key], rtol=1e-5, err_msg=key)
  assert one["nll_n_examples"] == four["nll_n_examples"] == 30
  s1, s4 = (np.load(f"{wd}/{d}/samples.npz")["samples"] for d in ("eval1", "eval4"))
  assert s1.shape == (12, 2)
  # Fixed steps (predictor-corrector, reverse SDE): sample i uses its own noise on any device.
  # (With the adaptive 'ode' sampler, round-off-sized differences of 8-row vs 2-row steps flip a
  # few accept / reject decisions: samples then agree to ~3e-3, the mean NFE to ~1%.)
  np.testing.assert_allclose(s4, s1, rtol=1e-5, atol=1e-5)
  assert four["sampling_nfe"] == one["sampling_nfe"]


def test_distributed_flags_all_or_none():
  """No flags: one process (nothing started). A partial set names the missing flags; a process id
  out of range is named; both before jax.distributed is touched."""
  assert parallel.initialize_distributed() is False
  with pytest.raises(ValueError, match="--num_processes --process_id missing"):
    parallel.initialize_distributed(coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match="--process_id=2 not in"):
    parallel.initialize_distributed("127.0.0.1:1234", 2, 2)


# -- process-wide XLA setup ------------------------------------------------------------------------
# A serialized CPU executable carries its HLO module's DebugOptions; xla_cpu_experimental_ynn_fusion_type
# is field 422 of DebugOptions (xla/xla.proto), a packed repeated enum: tag bytes b"\xb2\x1a", a length
# byte, then the values (LIBRARY_FUSION_TYPE_REDUCE 3, INDIVIDUAL_DOT 4, INDIVIDUAL_CONVOLUTION 5).
_YNN_TAG = b"\xb2\x1a"
_FUSION_TYPES = {"LIBRARY_FUSION_TYPE_REDUCE": 3, "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT": 4,
                 "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION": 5}
_XLA_DEFAULT = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
                "LIBRARY_FUSION_TYPE_REDUCE")  # what XLA:CPU 0.10.2 uses when not told


def _packed(option: str) -> bytes:
  values = bytes(_FUSION_TYPES[v] for v in option.split(","))
  return _YNN_TAG + bytes([len(values)]) + values


def _ynn_fusion_options_of(compiled) -> set[str]:
  """Which of the two values the executable's DebugOptions hold (it keeps two copies: the compile
  options, from XLA_FLAGS, and its HLO module's, after a jit's ``compiler_options``)."""
  blob = compiled.runtime_executable().serialize()
  return {name for name, v in (("fast", parallel.CPU_COMPILER_OPTIONS[_YNN_NAME]),
                               ("xla_default", _XLA_DEFAULT)) if _packed(v) in blob}


_YNN_NAME = "xla_cpu_experimental_ynn_fusion_type"


def test_directly_jitted_sampler_gets_the_fast_cpu_options():
  """A plain ``jax.jit`` of ``samplers.pc_sampler`` (no ``compiler_options``, as in a notebook) is
  compiled with ``parallel.CPU_COMPILER_OPTIONS``: importing scorelab put them in XLA_FLAGS. The
  reading tells the values apart: XLA's default, given explicitly, reads as the default."""
  import samplers
  assert jax.devices()[0].platform == "cpu"
  sde = sde_lib.VPSDE()
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 1, 1)) * 0.1

  def score(x, t):
    conv = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return conv - x * sde_lib.bcast(t, x)

  def sample(key):
    return samplers.build(samplers.pc_sampler, sde, (1, 4, 4, 1), n_steps=1, n_corrector_steps=0)(
        score, key)[0]

  key = jax.random.PRNGKey(1)
  assert _ynn_fusion_options_of(jax.jit(sample).lower(key).compile()) == {"fast"}
  default = jax.jit(sample, compiler_options={_YNN_NAME: _XLA_DEFAULT}).lower(key).compile()
  assert "xla_default" in _ynn_fusion_options_of(default)


def test_xla_flags_after_backend_start_warn_and_change_nothing(monkeypatch):
  """Once JAX's backends run, XLA_FLAGS is not read again: scorelab warns and leaves it alone;
  a value of the flag the user set is kept as it is."""
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  with pytest.warns(UserWarning, match="imported after JAX started its backends"):
    assert not parallel.set_process_xla_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  mine = f"--{_YNN_NAME}=LIBRARY_FUSION_TYPE_REDUCE"
  monkeypatch.setenv("XLA_FLAGS", mine)
  assert parallel.set_process_xla_flags()
  assert os.environ["XLA_FLAGS"] == mine


def test_users_xla_flag_wins_in_the_cli_programs_too():
  """``compiler_options`` (the train step, the sharded eval programs) passes the fast CPU options
  unless the user set that flag in XLA_FLAGS: then the user's value stands (no explicit option)."""
  mesh = parallel.make_mesh()
  assert parallel.compiler_options(mesh) == parallel.CPU_COMPILER_OPTIONS
  code = ("import parallel; print(parallel.compiler_options(parallel.make_mesh()), "
          "parallel.set_process_xla_flags())")
  env = dict(os.environ, XLA_FLAGS=f"--{_YNN_NAME}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.split() == ["None", "True"], out.stdout + out.stderr[-2000:]


_CACHE_CHILD = """
import jax
import parallel
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
jax.jit(lambda x: jax.numpy.sin(x) @ x)(jax.numpy.ones((3, 3))).block_until_ready()
print(jax.config.jax_compilation_cache_dir, events.count("/jax/compilation_cache/cache_hits"),
      events.count("/jax/compilation_cache/cache_misses"))
"""


def test_compilation_cache_shared_by_processes(tmp_path):
  """SCORELAB_COMPILATION_CACHE_DIR turns JAX's persistent cache on there: of two processes
  started together, one at least compiles a program (a cache miss) and writes it under the file
  lock; a third process reads it (a hit, no miss). '' turns it off."""
  cache = tmp_path / "xla"
  env = dict(os.environ, SCORELAB_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def start(env):
    return subprocess.Popen([sys.executable, "-c", _CACHE_CHILD], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def result(p):
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    where, hits, misses = out.split()
    return where, int(hits), int(misses)

  both = [result(p) for p in (start(env), start(env))]
  assert all(where == str(cache) and hits + misses >= 1 for where, hits, misses in both)
  assert any(misses >= 1 for _, _, misses in both)  # the second may already find the first's entry
  assert any(f.name.endswith("-cache") for f in cache.iterdir())
  assert os.path.exists(cache / ".lockfile")  # writes and reads go through JAX's file lock
  again, off = start(env), start(dict(env, SCORELAB_COMPILATION_CACHE_DIR=""))
  where, hits, misses = result(again)
  assert hits >= 1 and misses == 0
  where, hits, misses = result(off)
  assert where == "None" and hits == misses == 0


_CALLBACK_CHILD = """
import jax, jax.numpy as jnp
import likelihood, samplers, sde_lib
sde, key = sde_lib.VPSDE(), jax.random.PRNGKey(0)
score = lambda x, t: -x
programs = {
    "likelihood": (lambda x, k: likelihood.solve_flow(score, sde, x, k, t0=sde.eps, t1=sde.T,
                                                      divergence="hutchinson")["delta"],
                   (jnp.ones((2, 3)), key)),
    "ode_sampler": (lambda k: samplers.build(samplers.ode_sampler, sde, (2, 3))(score, k)[0],
                    (key,)),
    "sde_sampler": (lambda k: samplers.build(samplers.sde_sampler, sde, (2, 3), n_steps=4)(
        score, k)[0], (key,)),
}
print(" ".join(name for name, (f, args) in programs.items()
               if "python_cpu_callback" in jax.jit(f).lower(*args).as_text()))
"""


def test_diffrax_solves_hold_no_host_callback():
  """JAX never caches a program with a host callback. Imported through scorelab, the likelihood
  ODE and the adaptive and fixed-grid samplers' diffrax solves hold none (equinox's checks as
  NaNs, parallel.set_equinox_error_mode); with the user's EQX_ON_ERROR=raise every one does, which
  shows the reading works."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "EQX_ON_ERROR"}
  procs = [subprocess.Popen([sys.executable, "-c", _CALLBACK_CHILD], cwd=root, env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for e in (env, dict(env, EQX_ON_ERROR="raise"))]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    outs.append(out.split())
  assert outs == [[], ["likelihood", "ode_sampler", "sde_sampler"]]


def test_equinox_error_mode_keeps_the_users_choice(monkeypatch):
  import equinox  # noqa: F401  (imported, as in any process that ran a scorelab solve)
  monkeypatch.setenv("EQX_ON_ERROR", "raise")
  assert not parallel.set_equinox_error_mode()  # equinox is imported here, with the user's value
  assert os.environ["EQX_ON_ERROR"] == "raise"
  monkeypatch.delenv("EQX_ON_ERROR")
  assert not parallel.set_equinox_error_mode()  # too late: equinox read its default already
  assert "EQX_ON_ERROR" not in os.environ
