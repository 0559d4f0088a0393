"""Tests of edm_pickle and models/songunet.py: EDM-format network pickles read as data and mapped
onto scorelab's SongUNet (Karras et al. 2022, Table 1 preconditioning, Table 7 networks).

Oracle: tests/fixtures/edm (a byte-for-byte copy of ../shared/fixtures/edm), two pickles written
by NVlabs/edm's own code (DDPM++ and NCSN++, model_channels 16, one block per level, augment_dim 9,
every parameter random) and D(x; sigma) that the pickles' own EDMPrecond.forward computed on fixed
NCHW inputs at sigma = 0.002, 0.5, 10, 80. Also: the published CIFAR-10 parameter counts (EDM's
classes: 55,733,891 and 56,397,827), hand-made malicious pickles, and --mode=import of a fixture.
"""
from __future__ import annotations

import functools
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edm_pickle
import run_lib
import score_sde_import as ssi
import sde_lib
from configs import cifar_edm_dsm, default_image
from models import get_model, songunet

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "edm")
ARCHS = ("ddpmpp", "ncsnpp")
# float32 networks of ~40 layers: measured max |D_ours - D_EDM| <= 4e-6 (|D| <= 4.6); through the
# score (D = x + sigma^2 s, |x| up to ~300 at sigma = 80) <= 3e-5.
TOL_D, TOL_SCORE = 2e-5, 2e-4
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def _pkl(arch: str) -> str:
  return os.path.join(FIXTURES, f"network-snapshot-edm_{arch}_c16.pkl")


def _io(arch: str):
  io = np.load(os.path.join(FIXTURES, f"io_edm_{arch}_c16.npz"))
  with open(os.path.join(FIXTURES, f"io_edm_{arch}_c16.json")) as f:
    meta = json.load(f)
  nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731
  return nhwc(io["x"]), np.asarray(io["sigma"]), nhwc(io["denoised"]), meta


@functools.lru_cache(maxsize=None)
def _imported(arch: str):
  config = cifar_edm_dsm.get_config()
  imp = edm_pickle.import_edm_pickle(config, _pkl(arch))
  return imp, ssi.apply_overrides(config, imp["config_overrides"])


@pytest.mark.parametrize("arch", ARCHS)
def test_fixture_denoiser_matches_edm(arch):
  """D(x; sigma) of the imported network (sde_lib.EDM preconditioning around models/songunet.py)
  equals the pickle's own EDMPrecond.forward within TOL_D, and the score wrapper's D = x +
  sigma^2 s within TOL_SCORE; the config is set from the recorded constructor arguments and the
  parameter count is the fixture's."""
  imp, config = _imported(arch)
  x, sigma, ref, meta = _io(arch)
  ov = imp["config_overrides"]
  assert ov["model.name"] == "songunet" and ov["model.nf"] == meta["model_channels"] == 16
  assert ov["model.ch_mult"] == tuple(meta["channel_mult"]) and ov["model.num_res_blocks"] == 1
  assert ov["model.augment_dim"] == 9 and ov["model.dropout"] == 0.13
  assert ov["sde.name"] == "edm" and ov["sde.sigma_data"] == 0.5
  ncsn = arch == "ncsnpp"
  assert ov["model.embedding_type"] == ("fourier" if ncsn else "positional")
  assert ov["model.progressive_input"] == ("residual" if ncsn else "none")
  assert ov["model.fir_kernel"] == ((1, 3, 3, 1) if ncsn else (1, 1))
  assert ov["model.channel_mult_noise"] == (2 if ncsn else 1)
  assert imp["edm"]["n_params"] == meta["n_params"]
  assert imp["edm"]["precond"] == "EDMPrecond" and imp["edm"]["model"] == "SongUNet"

  cfg = run_lib.validate_config(config)
  sde = sde_lib.get_sde(cfg.sde)
  model = get_model(config)
  params = jax.tree.map(jnp.asarray, imp["ema_params"])

  @jit
  def both(params, x, sigma):
    c_skip, c_out, c_in, c_noise = sde.preconditioning(sigma)
    out = model.apply({"params": params}, sde_lib.bcast(c_in, x) * x, c_noise)
    d = sde_lib.bcast(c_skip, x) * x + sde_lib.bcast(c_out, x) * out
    return d, sde.denoiser_score(out, x, sigma)

  d, score = both(params, jnp.asarray(x), jnp.asarray(sigma))
  np.testing.assert_allclose(np.asarray(d), ref, rtol=0, atol=TOL_D)
  d_score = x + sigma[:, None, None, None] ** 2 * np.asarray(score, np.float64)
  np.testing.assert_allclose(d_score, ref, rtol=0, atol=TOL_SCORE)


@pytest.mark.parametrize("arch,expected", [("ddpmpp", 55_733_891), ("ncsnpp", 56_397_827)])
def test_cifar10_parameter_counts_are_edms(arch, expected):
  """EDM's CIFAR-10 networks (model_channels 128, 4 blocks, channel_mult (2, 2, 2), attention at
  16, augment_dim 9) have EDM's parameter counts (jax.eval_shape, nothing initialized); the
  NCSN++ Fourier frequencies (an EDM buffer) are the 128 frozen extra scalars of 'params'. The
  network is the one a config selects (configs/default_image.songunet_model, validated)."""
  config = cifar_edm_dsm.get_config()
  default_image.songunet_model(config.model, arch)
  run_lib.validate_config(config)
  model = get_model(config)
  assert model == songunet.SongUNet.from_config(songunet.songunet_cifar_config(arch))
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))),
                          jax.random.PRNGKey(0))["params"]
  total = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  assert songunet.trainable_param_count(shapes) == expected
  assert total == expected + (128 if arch == "ncsnpp" else 0)


def _flag_writer(flag: str) -> str:
  return f"open({flag!r}, 'w').write('ran')\n"


class _Reduce:
  """Pickles as fn(*args) (what a malicious pickle's REDUCE does)."""

  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _placeholder(arg):
  return arg


def _call_pickle(module: str, name: str, arg) -> bytes:
  """A protocol-3 pickle of {'ema': module.name(arg)} written without importing ``module``."""
  data = pickle.dumps({"ema": _Reduce(_placeholder, (arg,))}, protocol=3)
  here = f"c{_placeholder.__module__}\n{_placeholder.__qualname__}\n".encode()
  assert data.count(here) == 1
  return data.replace(here, f"c{module}\n{name}\n".encode())


def test_malicious_pickles_are_refused_with_nothing_executed(tmp_path):
  """Globals outside the allow-list (os.system, builtins.eval, also inside a nested storage
  stream) are refused by name before anything runs; a persistence meta whose module_src would
  write a file is read as data (its source hashed, never executed) and then refused as a network."""
  flag = str(tmp_path / "ran")
  bad = {"system": _Reduce(os.system, (f"touch {flag}",)),
         "eval": _Reduce(eval, (_flag_writer(flag),))}
  for name, payload in bad.items():
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(pickle.dumps({"ema": payload}, protocol=2))
    with pytest.raises(edm_pickle.UnsafePickleError,
                       match=rf"refusing to unpickle global \w+\.{name}"):
      edm_pickle.read_edm_pickle(str(path))
    assert not os.path.exists(flag)
  # A nested "storage" stream (torch.storage._load_from_bytes) whose object pickle names eval.
  nested = b"".join(pickle.dumps(v, protocol=2) for v in (
      0x1950A86A20F9469CFC6C, 1001, {"little_endian": True},
      _Reduce(eval, (_flag_writer(flag),)), []))
  path = tmp_path / "nested.pkl"
  path.write_bytes(_call_pickle("torch.storage", "_load_from_bytes", nested))
  with pytest.raises(edm_pickle.UnsafePickleError, match=r"refusing to unpickle global \w+\.eval"):
    edm_pickle.read_edm_pickle(str(path))
  assert not os.path.exists(flag)
  # A persistent object whose embedded module source would write the flag when executed.
  meta = dict(type="class", version=6, module_src=_flag_writer(flag) + "class EDMPrecond: pass\n",
              class_name="EDMPrecond", state={"_modules": {}, "_init_kwargs": {}})
  path = tmp_path / "src.pkl"
  path.write_bytes(_call_pickle("torch_utils.persistence", "_reconstruct_persistent_obj", meta))
  data = edm_pickle.read_edm_pickle(str(path))
  assert isinstance(data["ema"], edm_pickle.PersistentObject)
  assert data["ema"].class_name == "EDMPrecond" and len(data["ema"].module_src_sha256) == 64
  with pytest.raises(ValueError, match="only SongUNet"):
    edm_pickle.import_edm_pickle(cifar_edm_dsm.get_config(), str(path))
  assert not os.path.exists(flag)


def test_unsupported_networks_are_refused_by_name():
  """VP / VE preconditioning and class-conditional networks are named, not mis-imported."""
  def obj(name, kwargs=None, modules=None):
    return edm_pickle.PersistentObject(name, {"_init_kwargs": kwargs or {},
                                              "_modules": modules or {}}, "0" * 64, 6)
  with pytest.raises(ValueError, match="VPPrecond"):
    edm_pickle.edm_network({"ema": obj("VPPrecond")})
  with pytest.raises(ValueError, match="DhariwalUNet"):
    edm_pickle.edm_network({"ema": obj("EDMPrecond", modules={"model": obj("DhariwalUNet")})})
  net = obj("EDMPrecond", {"img_resolution": 32, "img_channels": 3},
            {"model": obj("SongUNet", {"label_dim": 10})})
  with pytest.raises(ValueError, match="label_dim=10: class-conditional"):
    edm_pickle.edm_config_overrides(net)


def test_import_mode_workdir_serves_the_score(tmp_path):
  """--mode=import of the DDPM++ fixture pickle with only --config=cifar_edm_dsm and the file:
  import.json lists the fields set from the pickle, config.json is the effective config, and the
  workdir's score_fn (run_lib.load_score_model, as --mode=sample uses it) reproduces EDM's D."""
  from modes.import_checkpoint import import_checkpoint
  config = cifar_edm_dsm.get_config()
  wd = str(tmp_path / "wd")
  report = import_checkpoint(config, wd, checkpoint=_pkl("ddpmpp"))
  assert report["step"] == 1 and report["edm"]["n_params"] == 393_331
  with open(os.path.join(wd, "import.json")) as f:
    saved = json.load(f)
  assert saved["config_overrides"]["model.name"] == "songunet"
  assert saved["config_overrides"]["model.nf"] == 16
  with open(os.path.join(wd, "config.json")) as f:
    effective = json.load(f)
  assert effective["model"]["name"] == "songunet" and effective["model"]["augment_dim"] == 9
  model = run_lib.load_score_model(ssi.apply_overrides(config, report["config_overrides"]), wd)
  x, sigma, ref, _ = _io("ddpmpp")
  score = jit(model.score_fn)(jnp.asarray(x[:2]), jnp.asarray(sigma[:2]))
  d = x[:2] + sigma[:2, None, None, None] ** 2 * np.asarray(score, np.float64)
  np.testing.assert_allclose(d, ref[:2], rtol=0, atol=TOL_SCORE)
