"""Tests of score_sde_import: published score_sde checkpoints mapped onto models/ncsnpp.py.

Oracle: ../shared/fixtures/score_sde_pytorch, two checkpoints written by score_sde_pytorch's own
code (DDPM++ VP and NCSN++ VE, nf 16, 1 residual block) with the raw outputs and scores that code
computed on fixed inputs (NCHW). Also: hand-built torch zip archives (strided views, dtypes, a
disallowed global), a score_sde-style Flax msgpack written from our params in their naming, and the
variance-scaling rule of the attention init.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import pickle
import sys
import types
import zipfile

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_schema
import models
import score_sde_import as ssi
import run_lib
import sde_lib
from configs import cifar_ve_dsm, cifar_vp_dsm
from models import layers
from models import utils as mutils

# Byte-for-byte copies of ../shared/fixtures/score_sde_pytorch (a clone is enough).
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "score_sde_pytorch")
# kind -> (our config module, parameter count stated by the fixture README)
KINDS = {"ddpmpp": (cifar_vp_dsm, 446_051), "ncsnpp": (cifar_ve_dsm, 461_427)}
TOL = 1e-5  # float32: the networks agree to rounding
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def _config(kind: str, **model):
  config = KINDS[kind][0].get_config()
  config.model.nf = 16
  config.model.num_res_blocks = 1
  for k, v in model.items():
    config.model[k] = v
  return config


def _ckpt(kind: str) -> str:
  return os.path.join(FIXTURES, f"checkpoint_{kind}_nf16.pth")


@functools.lru_cache(maxsize=None)
def _imported(kind: str):
  return ssi.import_pytorch_checkpoint(_config(kind), _ckpt(kind))


def _rel(a, b) -> np.ndarray:
  """Per-example relative L2 error |a - b| / |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
  return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------------------
# Imported fixtures reproduce score_sde_pytorch.

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_imported_checkpoint_matches_score_sde_outputs(kind):
  """Raw outputs and scores (models.utils.score_fn_from_config with the importer's overrides) equal
  score_sde_pytorch's for the online and the EMA weights; every tensor is used; step, EMA decay
  and the parameter count come through.

  The raw network, given score_sde's own labels, matches to TOL (VE: score_sde divides by sigma(t)
  inside the network, so its out_* is our output / labels). Through our score_fn:
  * VE: sde.noise_conditioning(t) = log sigma(t) with sigma(t) computed as score_sde does (a
    float32 power), bit-identical to log(labels); score_fn matches the fixture's score to TOL.
  * VP: score_sde's std = sqrt(1 - exp(2 log m)) in float32 cancels at t = 1e-3 (std ~ 0.0105,
    1.2e-4 relative error), ours (sqrt(-expm1(-B))) does not: score_fn matches the fixture's score
    to TOL where t >= 0.1 and -out / exact std everywhere, and the fixture's score is exactly its
    output over that float32 formula."""
  r = _imported(kind)
  config = ssi.apply_overrides(_config(kind), r["config_overrides"])
  io = np.load(os.path.join(FIXTURES, f"io_{kind}_nf16.npz"))
  assert r["step"] == 123456
  n_params = sum(math.prod(np.shape(v)) for v in jax.tree_util.tree_leaves(r["params"]))
  assert n_params == KINDS[kind][1]
  ve = kind == "ncsnpp"
  assert r["config_overrides"] == {
      "model.parameterization": "scale_by_sigma" if ve else "noise",
      "model.time_embedding_scale": 1.0 if ve else 999.0, "model.input_scaling": False,
      "model.center_input": ve, "model.ema_rate": 0.999 if ve else 0.9999}

  typed = config_schema.validate(config)
  sde = sde_lib.get_sde(typed.sde)
  model = models.get_model(config)
  score_fn = mutils.score_fn_from_config(typed.model, sde, model)
  x, t, labels = _nhwc(io["x"]), jnp.asarray(io["t"]), np.asarray(io["labels"])
  # score_sde's network input: log(labels) = log sigma(t) for VE, labels = 999 t for VP.
  cond = jnp.log(labels) if ve else jnp.asarray(labels) / config.model.time_embedding_scale
  np.testing.assert_array_equal(sde.noise_conditioning(t), cond)  # sigma(t) as score_sde computes it

  @jit
  def run(params):
    return mutils.apply_model(model, params, x, cond), score_fn(params, x, t)

  for which, params in (("model", r["params"]), ("ema", r["ema_params"])):
    out, score = (np.asarray(a, np.float64) for a in run(params))
    ref_out, ref_score = (np.asarray(_nhwc(io[f"{k}_{which}"]), np.float64)
                          for k in ("out", "score"))
    if ve:
      assert _rel(out / labels[:, None, None, None], ref_out).max() < TOL  # measured 1.3e-6
      assert _rel(score, ref_score).max() < TOL  # measured 1.3e-6
    else:
      far = np.asarray(io["t"]) >= 0.1  # no float32 cancellation in score_sde's std there
      assert _rel(out, ref_out).max() < TOL  # measured 4.0e-6
      assert _rel(score[far], ref_score[far]).max() < TOL
      tt = np.asarray(io["t"], np.float64)
      log_m = -0.25 * tt**2 * (sde.beta_max - sde.beta_min) - 0.5 * tt * sde.beta_min
      std = np.sqrt(-np.expm1(2.0 * log_m))[:, None, None, None]
      assert _rel(score, -ref_out / std).max() < TOL
      t32 = np.asarray(io["t"], np.float32)
      log_m32 = (np.float32(-0.25) * t32**2 * np.float32(sde.beta_max - sde.beta_min)
                 - np.float32(0.5) * t32 * np.float32(sde.beta_min))
      std32 = np.sqrt(np.float32(1.0) - np.exp(np.float32(2.0) * log_m32))[:, None, None, None]
      np.testing.assert_allclose(-ref_out / std32, ref_score, rtol=1e-5, atol=1e-6)
  # Online and EMA weights differ; the frozen Fourier frequencies come from the model for both.
  assert not np.allclose(r["params"]["Conv_0"]["kernel"], r["ema_params"]["Conv_0"]["kernel"])
  if ve:
    np.testing.assert_array_equal(r["params"]["GaussianFourierProjection_0"]["W"],
                                  r["ema_params"]["GaussianFourierProjection_0"]["W"])


def test_scale_by_sigma_parameterization():
  """'scale_by_sigma' is score_sde's VE scale_by_sigma, s = h / sigma(t) (not the marginal std),
  and is refused for SDEs without a noise scale sigma(t)."""
  class Echo(nn.Module):  # h = cond everywhere
    @nn.compact
    def __call__(self, x, cond, train=False):
      return jnp.broadcast_to(cond[:, None, None, None], x.shape)

  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
  t = jnp.array([0.001, 0.5, 1.0])
  score = mutils.get_score_fn(sde, Echo(), "scale_by_sigma")({}, jnp.zeros((3, 2, 2, 1)), t)
  sigma = 0.01 * 5000.0 ** np.asarray(t, np.float64)
  np.testing.assert_allclose(score[:, 0, 0, 0], np.log(sigma) / sigma, rtol=2e-6)
  assert "scale_by_sigma" in mutils.PARAMETERIZATIONS
  with pytest.raises(ValueError, match="scale_by_sigma"):
    mutils.get_score_fn(sde_lib.VPSDE(), Echo(), "scale_by_sigma")


@pytest.mark.parametrize("kind,override,tensor,field", [
    ("ddpmpp", dict(nf=32), "module.all_modules.0.weight", "model.nf"),
    ("ncsnpp", dict(num_res_blocks=2), "module.all_modules.5.Conv_2.weight",
     "model.num_res_blocks"),
    ("ncsnpp", dict(attn_resolutions=(8,)), "module.all_modules.8.GroupNorm_0.weight",
     "model.attn_resolutions"),
    ("ncsnpp", dict(fir=False), "module.all_modules.6.Conv2d_0.weight", "model.fir"),
])
def test_wrong_config_names_first_mismatching_tensor(kind, override, tensor, field):
  with pytest.raises(ValueError) as err:
    ssi.import_pytorch_checkpoint(_config(kind, **override), _ckpt(kind))
  msg = str(err.value)
  assert tensor in msg and field in msg, msg
  assert "checkpoint_" in msg


def test_wrong_sde_is_refused():
  """A VP (DDPM++) checkpoint under the VE (NCSN++) config fails on its first tensor, naming the
  embedding; an NCSN++ checkpoint under a VP SDE or another sigma_max is refused by field name."""
  with pytest.raises(ValueError, match=r"module\.all_modules\.0\.weight .*model\.embedding_type"):
    ssi.import_pytorch_checkpoint(_config("ncsnpp", nf=16), _ckpt("ddpmpp"))
  with pytest.raises(ValueError, match=r"module\.all_modules\.0\.W .*model\.embedding_type"):
    ssi.import_pytorch_checkpoint(_config("ddpmpp"), _ckpt("ncsnpp"))
  config = _config("ncsnpp")
  config.sde.name = "vpsde"
  with pytest.raises(ValueError, match="sde.name"):
    ssi.import_pytorch_checkpoint(config, _ckpt("ncsnpp"))
  config = _config("ncsnpp")
  config.sde.sigma_max = 348.0
  with pytest.raises(ValueError, match=r"module\.sigmas.*sde\.sigma_max=50"):
    ssi.import_pytorch_checkpoint(config, _ckpt("ncsnpp"))


# ------------------------------------------------------------------------------------------------
# The torch-free reader.

def _write_archive(path, obj, storages: dict[str, np.ndarray], torch_globals: dict) -> None:
  """A torch.save-style zip: pickle ``obj`` with fake ``torch`` modules providing the globals
  (restored afterwards) and storages as persistent ids."""
  class Pickler(pickle.Pickler):
    def persistent_id(self, o):
      return o if isinstance(o, tuple) and o[:1] == ("storage",) else None

  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
  torch._utils = utils
  for qual, fn in torch_globals.items():
    mod = utils if qual.startswith("_utils.") else torch
    name = qual.split(".")[-1]
    fn.__module__, fn.__qualname__, fn.__name__ = mod.__name__, name, name
    setattr(mod, name, fn)
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    with zipfile.ZipFile(path, "w") as zf:
      with zf.open("archive/data.pkl", "w") as f:
        Pickler(f, protocol=2).dump(obj)
      zf.writestr("archive/byteorder", "little")
      for key, arr in storages.items():
        zf.writestr(f"archive/data/{key}", arr.tobytes())
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


class _Tensor:
  """Pickles like a torch tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""
  rebuild = None

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return (_Tensor.rebuild, self.args)


def test_reader_rebuilds_strided_views_and_dtypes(tmp_path):
  def _rebuild_tensor_v2(*a):
    raise AssertionError("never called while pickling")

  class FloatStorage:
    pass

  class DoubleStorage:
    pass

  _Tensor.rebuild = _rebuild_tensor_v2
  f32 = np.arange(12, dtype=np.float32) * 1.5
  f64 = np.linspace(-1.0, 1.0, 5)
  s32 = ("storage", FloatStorage, "0", "cpu", 12)
  s64 = ("storage", DoubleStorage, "1", "cpu", 5)
  obj = {"model": collections.OrderedDict(
      a=_Tensor(s32, 2, (2, 3), (1, 2)),  # transposed view with an offset
      b=_Tensor(s32, 0, (4,), (3,)),  # every third element of the same storage
      c=_Tensor(s64, 1, (3,), (1,)),
      d=_Tensor(s32, 5, (), ())), "step": 7, "other": [_Tensor(s64, 0, (5,), (1,))]}
  path = tmp_path / "ckpt.pth"
  _write_archive(path, obj, {"0": f32, "1": f64},
                 {"_utils._rebuild_tensor_v2": _rebuild_tensor_v2, "FloatStorage": FloatStorage,
                  "DoubleStorage": DoubleStorage})
  state = ssi.read_torch_checkpoint(str(path), keys=("model", "step"))
  m = state["model"]
  assert isinstance(m, collections.OrderedDict) and list(m) == ["a", "b", "c", "d"]
  np.testing.assert_array_equal(m["a"], [[f32[2], f32[4], f32[6]], [f32[3], f32[5], f32[7]]])
  np.testing.assert_array_equal(m["b"], f32[[0, 3, 6, 9]])
  assert m["c"].dtype == np.float64 and m["d"].shape == ()
  np.testing.assert_array_equal(m["c"], f64[1:4])
  assert float(m["d"]) == f32[5] and state["step"] == 7
  assert isinstance(state["other"][0], ssi.TensorRef)  # not requested: left unread
  np.testing.assert_array_equal(ssi.read_torch_checkpoint(str(path))["other"][0], f64)


def test_reader_refuses_disallowed_global(tmp_path):
  sentinel = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {sentinel}",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"model": Evil()}, protocol=2))
  with pytest.raises(ssi.UnsafePickleError, match=r"refusing to unpickle global (posix|os)\.sys"):
    ssi.read_torch_checkpoint(str(path))
  assert not sentinel.exists()
  with pytest.raises(ValueError, match="not a torch zip archive"):
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"a": 1}))
    ssi.read_torch_checkpoint(str(tmp_path / "legacy.pth"))


# ------------------------------------------------------------------------------------------------
# score_sde / score_flow Flax checkpoints.

def _flax_state(theirs, theirs_ema, step):
  """score_sde's training State as flax.serialization writes it (flax.optim Optimizer)."""
  return {"step": step, "optimizer": {"target": theirs, "state": {"step": step,
                                                                   "param_states": {}}},
          "lr": 2e-4, "model_state": {}, "ema_rate": 0.999, "params_ema": theirs_ema,
          "rng": np.zeros(2, np.uint32)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_flax_msgpack_round_trip(kind, tmp_path):
  """Our params of the imported fixture, renamed into score_sde's Flax naming and written as its
  State msgpack, import back exactly."""
  r = _imported(kind)
  config = _config(kind)
  theirs = ssi.to_score_sde_flax(config, r["params"])
  assert "ResnetBlockBigGANpp_0" in theirs and "AttnBlockpp_0" in theirs
  assert set(theirs["AttnBlockpp_0"]) == {"GroupNorm_0", "NIN_0", "NIN_1", "NIN_2", "NIN_3"}
  if kind == "ncsnpp":
    assert set(theirs["Downsample_0"]["Conv2d_0"]) == {"weight", "bias"}
  path = tmp_path / "checkpoint_5"
  path.write_bytes(flax.serialization.msgpack_serialize(
      _flax_state(theirs, ssi.to_score_sde_flax(config, r["ema_params"]), 5)))
  back = ssi.import_flax_checkpoint(config, str(tmp_path))  # a directory: newest checkpoint_<n>
  assert back["step"] == 5
  assert back["config_overrides"] == dict(r["config_overrides"], **{"model.ema_rate": 0.999})
  for a, b in (("params", "params"), ("ema_params", "ema_params")):
    ja, jb = jax.tree_util.tree_flatten_with_path(r[a]), jax.tree_util.tree_flatten_with_path(
        back[b])
    assert [p for p, _ in ja[0]] == [p for p, _ in jb[0]]
    for (_, u), (_, v) in zip(ja[0], jb[0]):
      np.testing.assert_array_equal(u, v)
  first = "GaussianFourierProjection_0/W" if kind == "ncsnpp" else "Dense_0/bias"
  with pytest.raises(ValueError, match=rf"tensor {first} .*model\.nf \(checkpoint 16, config 32"):
    ssi.import_flax_checkpoint(_config(kind, nf=32), str(path))


def test_flax_mapping_of_ddpm_blocks_and_fused_upsampling(tmp_path):
  """resblock_type 'ddpm' (NIN shortcut -> 1x1 Conv_2) and the FIR fused up-conv of progressive
  'residual' (Conv2d_0 -> ConvTranspose_0) round-trip through score_sde's naming."""
  config = _config("ncsnpp", resblock_type="ddpm", progressive="residual", ch_mult=(1, 2),
                   attn_resolutions=(16,))
  target, order = ssi.target_params(config)
  rng = np.random.default_rng(0)
  ours = jax.tree_util.tree_map(lambda s: rng.normal(size=s).astype(np.float32), target,
                                is_leaf=lambda s: isinstance(s, tuple))
  theirs = ssi.to_score_sde_flax(config, ours)
  assert "NIN_0" in theirs["ResnetBlockDDPMpp_1"] and "Conv2d_0" in theirs["Upsample_1"]
  assert {"ConvTranspose_0"} == set(ours["Upsample_1"])
  path = tmp_path / "checkpoint_1"
  path.write_bytes(flax.serialization.msgpack_serialize(_flax_state(theirs, theirs, 1)))
  back = ssi.import_flax_checkpoint(config, str(path))["params"]
  for (p, u), (q, v) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0] for t in (ours, back))):
    assert p == q
    np.testing.assert_array_equal(u, v)
  assert order[0] == "GaussianFourierProjection_0" and len(order) == len(target)


# ------------------------------------------------------------------------------------------------
# Initialization faithful to score_sde.

def test_attention_init_matches_score_sde_variance_scaling():
  """q, k, v projections: variance_scaling(0.1, fan_avg, uniform) (score_sde's NIN default); the
  output projection: init_scale 0 -> 1e-10. std = sqrt(scale / ((fan_in + fan_out) / 2))."""
  c = 64
  block = layers.AttnBlock(init_scale=0.0)
  params = jit(block.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, c)))["params"]
  for name, scale in (("Dense_0", 0.1), ("Dense_1", 0.1), ("Dense_2", 0.1), ("Dense_3", 1e-10)):
    w = np.asarray(params[name]["kernel"], np.float64)
    fan_in, fan_out = w.shape
    std = math.sqrt(scale / ((fan_in + fan_out) / 2))
    assert abs(w.std() / std - 1) < 0.05, (name, w.std(), std)
    assert np.abs(w).max() <= math.sqrt(3) * std * (1 + 1e-6)  # uniform on [-sqrt(3) std, +]
    np.testing.assert_array_equal(params[name]["bias"], 0.0)


def _import_fixture(tmp_path):
  import score_sde_import as si
  from modes.import_checkpoint import import_checkpoint
  config = _config("ddpmpp")
  wd = str(tmp_path / "imported")
  out = import_checkpoint(config, wd, checkpoint=os.path.join(FIXTURES, "checkpoint_ddpmpp_nf16.pth"))
  assert out["step"] == 123456
  config = si.apply_overrides(config, out["config_overrides"])
  config.sampling.method, config.sampling.c, config.sampling.n_steps = "sde", 1.0, 4
  config.sampling.n_samples = config.sampling.batch_size = 4
  return config, wd


def test_import_mode_writes_a_workdir_and_refuses_bad_reuse(tmp_path):
  """--mode=import of the DDPM++ fixture writes a workdir that loads at step 123456 with the
  fixture's EMA parameters, bit for bit; importing twice is refused; a config whose network differs from the
  imported one is refused naming the field, before any sampling."""
  from modes.import_checkpoint import import_checkpoint
  from modes.sample import sample
  config, wd = _import_fixture(tmp_path)
  model = run_lib.load_score_model(config, wd)
  assert model.step == 123456
  ema = _imported("ddpmpp")["ema_params"]  # what eval and sample use (eval.use_ema)
  assert jax.tree_util.tree_structure(model.params) == jax.tree_util.tree_structure(ema)
  for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileExistsError):
    import_checkpoint(config, wd, checkpoint=os.path.join(FIXTURES, "checkpoint_ddpmpp_nf16.pth"))
  other = ssi.apply_overrides(config, {"model.nf": 32})
  with pytest.raises(ValueError, match=r"model\.nf differs"):
    sample(other, wd)


def _direct(config):
  """(typed config, SDE, score_fn(params, x, t)) of ``config`` built from its sections, and the
  fixture's imported EMA parameters (``_imported``), without the workdir."""
  cfg = run_lib.validate_config(config)
  sde = sde_lib.get_sde(cfg.sde)
  return cfg, sde, mutils.score_fn_from_config(cfg.model, sde, models.get_model(cfg)), \
      _imported("ddpmpp")["ema_params"]


@pytest.mark.slow
def test_import_mode_then_sample(tmp_path):
  """--mode=sample on the imported workdir gives, at step 123456, the samples of the SDE sampler
  run directly on the fixture's imported EMA parameters (samplers.get_sampler of the sampling
  section, p_noise, sample i from fold_in(key, i) of sample mode's key fold_in(PRNGKey(seed),
  0x5A)), and samples.png is their grid. Minutes of DDPM++ compiles on 2 CPU cores: -m slow (the
  imported network's outputs are checked against score_sde_pytorch's in the default suite)."""
  import samplers
  from conftest import assert_grid_png
  from modes.sample import sample
  config, wd = _import_fixture(tmp_path)
  report = sample(config, wd)
  assert report["step"] == 123456 and report["n_samples"] == 4 and report["finite"]
  out = os.path.join(wd, "samples")
  with np.load(os.path.join(out, "samples.npz")) as z:
    x = z["samples"]
  cfg, sde, score, params = _direct(config)
  one = samplers.get_sampler(cfg.sampling, sde, (1, 32, 32, 3))
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x5A)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(4))

  def run(p, ks):
    def single(k):
      x, stats = one(functools.partial(score, p), k)
      return x[0], jnp.mean(jnp.asarray(stats["nfe"], jnp.float32))
    return jax.vmap(single)(ks)

  want, nfe = jit(run)(params, keys)
  assert x.shape == (4, 32, 32, 3) and np.all(np.isfinite(x))
  assert float(np.max(np.abs(np.asarray(want) - x[::-1]))) > 0.1  # samples are told apart
  np.testing.assert_allclose(x, np.asarray(want), rtol=1e-4, atol=1e-3)  # 4e-5 seen: 4 devices
  assert report["nfe"] == float(np.mean(nfe)) == 5  # 4 steps, then the noise-free last step
  assert_grid_png(os.path.join(out, "samples.png"), x, cfg.data.centered)


@pytest.mark.slow
def test_import_mode_then_eval_bits_per_dim(mock_tfds, tmp_path):
  """--mode=eval bits/dim of the imported DDPM++ on mocked CIFAR-shaped data (9 test images) at
  step 123456: the mean of its per-example bits/dim, which for the first and last image agree (to
  2e-3) with the probability-flow ODE likelihood computed directly on the imported EMA parameters
  (the image's levels, uniform dequantization and Hutchinson probe from eval's keys: fold_in(k, i)
  of the first key of split(fold_in(PRNGKey(seed), 0xE7A1), 3)). Minutes of per-example ODE
  solves and DDPM++ compiles on CPU: -m slow."""
  import likelihood
  from conftest import _mock_images, assert_grid_png
  from modes.evaluate import evaluate
  config, wd = _import_fixture(tmp_path)
  config.eval.num_samples, config.eval.bound, config.eval.fid = 4, False, False
  config.eval.batch_size, config.eval.rtol, config.eval.atol = 9, 0.1, 0.1
  report = evaluate(config, wd)
  assert report["step"] == 123456 and report["bpd_n_examples"] == 9 and report["bpd_n_failed"] == 0
  per_example = np.asarray(report["bpd_per_example"], np.float64)
  assert per_example.shape == (9,) and np.all(np.isfinite(per_example))
  np.testing.assert_allclose(report["bpd"], per_example.mean(), rtol=1e-6)  # float32 sums
  cfg, sde, score, params = _direct(config)
  ev = cfg.eval
  k_ll = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0xE7A1), 3)[0]
  levels = _mock_images("cifar10", np.arange(9), "test")

  @jit
  def bpd(p, level, key):
    k_deq, k_fn = jax.random.split(key)
    y = likelihood.uniform_dequantize(k_deq, level[None], 256, centered=True, dtype=jnp.float32)
    out = likelihood.log_likelihood(functools.partial(score, p), sde, y, k_fn, prior=sde.prior(),
                                    divergence=ev.divergence, probe=ev.hutchinson_probe,
                                    rtol=ev.rtol, atol=ev.atol, max_steps=ev.max_steps)
    return likelihood.bits_per_dim(out["logp"], (32, 32, 3), centered=True)[0], out["nfe"][0]

  assert cfg.data.centered and ev.divergence == "hutchinson"
  # 4e-4 and 5e-4 bits/dim seen (rounding moves the rtol = 0.1 solver's steps); another key's
  # dequantization and probe move them by 2e-2 and 1e-1
  tol = 2e-3
  for i in (0, 8):
    want, nfe = bpd(params, jnp.asarray(levels[i]), jax.random.fold_in(k_ll, i))
    assert abs(per_example[i] - float(want)) < tol, (i, per_example[i], float(want))
    assert report["likelihood_nfe_per_example"][i] == float(nfe)
    other, _ = bpd(params, jnp.asarray(levels[i]), jax.random.fold_in(k_ll, i + 1))
    assert abs(per_example[i] - float(other)) > 5 * tol  # the comparison tells the keys apart
  with np.load(os.path.join(wd, "eval", "samples.npz")) as z:
    assert_grid_png(os.path.join(wd, "eval", "samples.png"), z["samples"], True)


def test_peer_benchmark_skips_with_a_clear_message(tmp_path, capsys):
  """benchmarks/peer_score_sde.py (not in CI) measures nothing without torch or a snapshot of
  score_sde_pytorch, and says which is missing."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "peer_score_sde.py")
  spec = importlib.util.spec_from_file_location("peer_score_sde", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  bench.main(["--peer_dir", str(tmp_path), "--out", str(tmp_path / "out.json")])
  out = capsys.readouterr().out
  assert out.startswith("peer_score_sde: skipped, "), out
  if importlib.util.find_spec("torch") is None:
    assert "torch is not installed" in out
  else:
    assert f"--peer_dir={tmp_path} is not a score_sde_pytorch snapshot (missing sampling.py" in out
  assert not (tmp_path / "out.json").exists()


def test_vp_ncsnpp_checkpoint_imports_into_its_config(monkeypatch):
  """score_sde's vp/cifar10_ncsnpp_continuous (Franzese et al. App. H.2's network) is the VE NCSN++
  layout without the Fourier W (a positional embedding has no parameters): configs/cifar_vp_ncsnpp
  takes every tensor of such a checkpoint (built here from the VE fixture minus W) with score_sde's
  VP conventions, where the DDPM++ VP config refuses it."""
  from configs import cifar_vp_ncsnpp
  state = ssi.read_torch_checkpoint(_ckpt("ncsnpp"), keys=("model", "ema", "step"))
  fourier_w = [k for k in state["model"] if k == "module.all_modules.0.W"]  # GaussianFourierProjection
  assert len(fourier_w) == 1
  # ... and whose first dense layer reads the nf-wide sinusoidal embedding (Fourier's is 2 nf).
  model = {k: v for k, v in state["model"].items() if k not in fourier_w}
  dense = "module.all_modules.1.weight"
  model[dense] = model[dense][:, :16]
  shadow = list(state["ema"]["shadow_params"])
  assert shadow[0].shape == state["model"][dense].shape  # model.parameters() order
  shadow[0] = shadow[0][:, :16]
  vp_state = dict(state, model=model, ema=dict(state["ema"], shadow_params=shadow))
  monkeypatch.setattr(ssi, "read_torch_checkpoint", lambda path, keys=None: vp_state)
  config = cifar_vp_ncsnpp.get_config()
  config.model.nf, config.model.num_res_blocks = 16, 1
  imported = ssi.import_pytorch_checkpoint(config, "vp_ncsnpp_nf16.pth")
  n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(imported["params"]))
  assert n == 461_427 - int(np.prod(state["model"][fourier_w[0]].shape)) - 64 * 16
  assert imported["config_overrides"]["model.parameterization"] == "noise"
  assert imported["config_overrides"]["model.time_embedding_scale"] == 999.0
  with pytest.raises(ValueError):
    ssi.import_pytorch_checkpoint(_config("ddpmpp"), "vp_ncsnpp_nf16.pth")
