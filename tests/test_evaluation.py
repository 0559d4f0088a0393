"""Tests of evaluation.py: FID / IS against closed forms and SciPy, the FID Inception network
(parameter count, serialization, weight conversion from torch .pth files written here by hand and
read without torch, an independent Keras Inception-v3 up to Mixed_7b), 8-bit FID inputs as
score_sde / EDM round them, the digits feature distance, histogram divergences (Cao et al.,
Appendix H.3), image grids.
"""
import collections
import importlib.util
import io
import os
import pickle
import re
import sys
import zipfile

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.special
import scipy.stats

import evaluation as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _converter():
  spec = importlib.util.spec_from_file_location(
      "convert_inception_weights", os.path.join(ROOT, "scripts", "convert_inception_weights.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _random_cov(rng: np.random.Generator, d: int, n: int | None = None) -> np.ndarray:
  a = rng.normal(size=(d, n or 2 * d))
  return a @ a.T / a.shape[1]


def _scipy_fid(mu1, s1, mu2, s2) -> float:
  """Reference: pytorch-fid / TTUR formula with scipy.linalg.sqrtm (float64)."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def random_variables():
  """Random FID-Inception variables (He-scaled kernels, non-trivial BatchNorm statistics), drawn
  with NumPy from the eval_shape tree (running flax init eagerly is slow on CPU)."""
  rng = np.random.default_rng(1)
  flat = {}
  for path, s in ev.flatten_variables_shapes().items():
    if path.endswith("kernel"):
      fan_in = int(np.prod(s.shape[:-1]))
      v = rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape)
    elif path.endswith("var"):
      v = rng.uniform(0.5, 2.0, s.shape)
    elif path.endswith("scale"):
      v = rng.uniform(0.5, 1.5, s.shape)
    else:  # BN bias / running mean, fc bias
      v = rng.normal(0.0, 0.1, s.shape)
    flat[path] = jnp.asarray(v, jnp.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------------------------------- FID

@pytest.mark.parametrize("d", [8, 64, 256])
def test_fid_matches_scipy_sqrtm_reference(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  ref = _scipy_fid(mu1, s1, mu2, s2)
  got = ev.fid_from_stats(mu1, s1, mu2, s2)
  assert abs(got - ref) / abs(ref) < 1e-6, (got, ref)


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  # full-rank (N > D) and rank-deficient (N < D, as with few samples of 2048-d features)
  for n, d in [(500, 64), (60, 128)]:
    feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 3.0 + 5.0
    mu, sigma = ev.compute_statistics(feats)
    scale = np.trace(sigma)
    assert abs(ev.fid_from_stats(mu, sigma, mu, sigma)) < 1e-6 * scale
    assert abs(ev.frechet_distance(feats, feats)) < 1e-6 * scale


def test_fid_closed_form_for_commuting_covariances():
  """Commuting S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FID = |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2."""
  rng = np.random.default_rng(3)
  d = 50
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  for s1, s2 in [(np.diag(a), np.diag(b)), ((q * a) @ q.T, (q * b) @ q.T)]:
    got = ev.fid_from_stats(mu1, s1, mu2, s2)
    assert abs(got - exact) / exact < 1e-9, (got, exact)
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2
  assert ev.fid_from_stats(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]),
                           np.array([[9.0]])) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_fid_from_samples_approaches_closed_form():
  """Sampling check: Gaussian fits of 20k samples reproduce the exact FID within 2%."""
  rng = np.random.default_rng(4)
  d = 5
  a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  f1 = rng.normal(size=(20000, d)) * np.sqrt(a)
  f2 = rng.normal(size=(20000, d)) * np.sqrt(b) + 0.5
  exact = d * 0.25 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert ev.frechet_distance(f1, f2) == pytest.approx(exact, rel=0.02)


def test_fid_rejects_inconsistent_shapes():
  with pytest.raises(ValueError, match="inconsistent"):
    ev.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_roundtrip_and_errors(tmp_path):
  rng = np.random.default_rng(5)
  mu, sigma = rng.normal(size=7), _random_cov(rng, 7)
  path = str(tmp_path / "stats.npz")
  ev.save_stats(path, mu, sigma)
  mu2, sigma2 = ev.load_stats(path)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    ev.load_stats(str(tmp_path / "nope.npz"))
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, mean=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    ev.load_stats(bad)


# -------------------------------------------------------------------------------- Inception Score

def test_inception_score_limits_and_reference():
  k, n = 10, 1000
  uniform = np.full((n, k), 1.0 / k)
  assert ev.inception_score(uniform, splits=10)[0] == pytest.approx(1.0, abs=1e-12)
  onehot = np.eye(k)[np.arange(n) % k]
  mean, std = ev.inception_score(onehot, splits=10)
  assert mean == pytest.approx(k, rel=1e-12) and std < 1e-12
  # Confident logits (margin 50) -> essentially one-hot.
  assert ev.inception_score(50.0 * onehot, splits=10, from_logits=True)[0] == pytest.approx(
      k, rel=1e-6)
  # Random posteriors, one split: exp(mean_i KL(p_i || mean p)) with scipy.special.rel_entr.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(200, 7)) * 2
  p = scipy.special.softmax(logits, axis=1)
  ref = np.exp(scipy.special.rel_entr(p, p.mean(0, keepdims=True)).sum(1).mean())
  assert ev.inception_score(logits, splits=1)[0] == pytest.approx(ref, rel=1e-10)
  assert ev.inception_score(p, splits=1)[0] == pytest.approx(ref, rel=1e-10)
  assert ev.mean_entropy(uniform) == pytest.approx(np.log(k), rel=1e-12)


# -------------------------------------------------------------------------- Inception network

def test_inception_param_count_is_the_fid_inception_count():
  shapes = ev.inception_param_shapes()
  # torchvision inception_v3: 27,161,264 parameters with the aux head (3,326,696) and a 1000-way fc;
  # the FID network drops the aux head and has 1008 classes (+8 * 2048 + 8).
  assert ev.count_params(shapes["params"]) == 27_161_264 - 3_326_696 + 8 * 2048 + 8 == 23_850_960
  flat = ev.flatten_variables_shapes()
  # 94 conv+BN units (conv kernel, BN scale/bias/mean/var) + fc kernel/bias = pytorch-fid's 472 keys
  assert len(flat) == 94 * 5 + 2
  assert flat["params/fc/kernel"].shape == (2048, 1008)
  assert flat["params/Conv2d_1a_3x3/conv/kernel"].shape == (3, 3, 3, 32)
  assert flat["params/Mixed_7c/branch3x3dbl_3b/conv/kernel"].shape == (3, 1, 384, 384)


def test_inception_pools_exclude_padding_and_pad_max_with_minus_inf():
  x = jnp.full((1, 5, 5, 2), 3.0)
  np.testing.assert_allclose(ev._avg_pool_same(x), 3.0, rtol=1e-6)  # zeros would pull borders down
  y = -1.0 - jnp.arange(25.0).reshape(1, 5, 5, 1)
  pooled = nn.max_pool(y, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
  assert float(pooled[0, 0, 0, 0]) == -1.0  # max over the valid neighbours, not the zero padding


def test_preprocess_matches_numpy_bilinear_reference():
  """jax.image.resize(bilinear, no antialias) = torch's interpolate(align_corners=False)."""
  def ref_resize(img, out):  # numpy reference of half-pixel bilinear with edge clamping
    n = img.shape[0]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = src - i0
    rows = img[i0] * (1 - lam)[:, None] + img[i1] * lam[:, None]
    return rows[:, i0] * (1 - lam)[None, :] + rows[:, i1] * lam[None, :]

  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
  out = np.asarray(ev.preprocess_for_inception(jnp.asarray(img), 299))
  assert out.shape == (2, 299, 299, 3)
  for i in range(2):
    ref = 2 * ref_resize(img[i, ..., 0] / 255.0, 299) - 1
    for c in range(3):
      np.testing.assert_allclose(out[i, ..., c], ref, atol=1e-5)
  # downsampling path (e.g. 400 -> 299) also matches (no antialiasing; antialiasing would differ by
  # ~0.1); jax computes the float32 sample positions, hence the looser tolerance
  big = rng.uniform(size=(1, 400, 400, 3)).astype(np.float32)
  out = np.asarray(ev.preprocess_for_inception(jnp.asarray(big), 299))
  np.testing.assert_allclose(out[0, ..., 1], 2 * ref_resize(big[0, ..., 1].astype(np.float64), 299) - 1,
                             atol=1e-4)


def test_inception_weights_save_load_give_identical_features(tmp_path, random_variables):
  path = str(tmp_path / "inception.npz")
  ev.save_inception_params(random_variables, path)
  loaded = ev.load_inception_params(path)
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 75, 75, 3))  # [0, 1] images, no resize
  p1, l1 = ev.inception_apply(random_variables, x, size=75)
  p2, l2 = ev.inception_apply(loaded, x, size=75)
  assert p1.shape == (2, 2048) and l1.shape == (2, 1008)
  assert np.all(np.isfinite(p1)) and float(jnp.std(p1)) > 0
  np.testing.assert_array_equal(np.asarray(p1), np.asarray(p2))
  np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))


def test_load_inception_params_errors_name_path_and_parameter(tmp_path, random_variables):
  with pytest.raises(FileNotFoundError, match="missing_weights.npz"):
    ev.load_inception_params(str(tmp_path / "missing_weights.npz"))
  flat = ev.flatten_variables(random_variables)
  bad = dict(flat)
  bad["params/Mixed_6b/branch7x7_2/conv/kernel"] = np.zeros((7, 1, 128, 128), np.float32)
  path = str(tmp_path / "bad_shape.npz")
  np.savez(path, **bad)
  with pytest.raises(ValueError, match=r"bad_shape.npz.*Mixed_6b/branch7x7_2/conv/kernel"):
    ev.load_inception_params(path)
  del bad["params/fc/bias"]
  path = str(tmp_path / "bad_keys.npz")
  np.savez(path, **bad)
  with pytest.raises(ValueError, match=r"bad_keys.npz.*fc/bias"):
    ev.load_inception_params(path)


def test_inception_features_batching_padding_sharding(random_variables):
  """5 grey uint8 images in batches of 4 (sharded over the 4 test devices, last batch padded)
  equal one direct unsharded forward pass (small 75 x 75 network input to keep this fast)."""
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, size=(5, 20, 20, 1), dtype=np.uint8)
  out = ev.inception_features(random_variables, imgs, batch_size=4, size=75)
  assert out.pool3.shape == (5, 2048) and out.logits.shape == (5, 1008)
  direct_pool, direct_logits = ev.inception_apply(random_variables, jnp.asarray(imgs), size=75)
  np.testing.assert_allclose(out.pool3, np.asarray(direct_pool), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.logits, np.asarray(direct_logits), rtol=1e-4, atol=1e-5)
  assert np.abs(out.pool3[0] - out.pool3[1]).max() > 0  # distinct images, distinct features
  bias = np.asarray(random_variables["params"]["fc"]["bias"])
  np.testing.assert_allclose(ev.unbiased_logits(random_variables, out.pool3), out.logits - bias,
                             rtol=1e-4, atol=1e-4 * np.abs(out.logits).max())
  # the eval entry point (same compiled shapes); its FID step is fid_from_stats on pool3 statistics
  # (a 2048-d FID costs seconds of LAPACK; here only its shape check is exercised)
  m = ev.inception_metrics(random_variables, imgs, None, batch_size=4, splits=1, size=75)
  with pytest.raises(ValueError, match="inconsistent"):
    ev.inception_metrics(random_variables, imgs, (np.zeros(3), np.eye(3)), batch_size=4, size=75)
  ref_is = ev.inception_score(ev.unbiased_logits(random_variables, out.pool3), splits=1)[0]
  assert m["inception_score"] == pytest.approx(ref_is, rel=1e-9) and m["inception_score"] >= 1.0


def test_inception_features_of_digits_resized_to_299(random_variables):
  """The FID path proper: 8x8 grey digits -> 299 x 299 RGB -> pool3 / logits."""
  x = ev.load_digits_split()[2][:2]  # two test digits in [0, 1], (2, 8, 8, 1)
  out = ev.inception_features(random_variables, x, batch_size=2)
  assert out.pool3.shape == (2, 2048) and out.logits.shape == (2, 1008)
  assert np.all(np.isfinite(out.pool3)) and np.all(np.isfinite(out.logits))
  assert np.all(out.pool3 >= 0)  # mean of ReLU outputs
  assert np.abs(out.pool3[0] - out.pool3[1]).max() > 0


def test_inception_matches_independent_keras_inception_v3_up_to_mixed_7b(random_variables):
  """Oracle: Keras' InceptionV3 (TF semantics: SAME avg pools exclude padding) with our weights.

  Keras' BN has no scale (gamma = 1), so ours is set to 1; the FID network differs from Keras only
  after Mixed_7b (max pool in Mixed_7c), so we compare the Mixed_7b output ('mixed9').
  """
  keras = pytest.importorskip("keras")
  model = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(75, 75, 3))
  convs = sorted([l for l in model.layers if l.__class__.__name__ == "Conv2D"],
                 key=lambda l: int((re.findall(r"_(\d+)$", l.name) or ["0"])[0]))
  bns = sorted([l for l in model.layers if l.__class__.__name__ == "BatchNormalization"],
               key=lambda l: int((re.findall(r"_(\d+)$", l.name) or ["0"])[0]))
  flat = ev.flatten_variables(random_variables)
  # conv units in definition order (torchvision / Keras build the branches in the same order)
  blocks = {
      "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
            "branch3x3dbl_3", "branch_pool"],
      "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
      "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"]
           + [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"],
      "D": ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)],
      "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
            "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]}
  layout = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
            ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
            ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
  conv_paths = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
  conv_paths += [f"{mixed}/{b}" for mixed, kind in layout for b in blocks[kind]]
  assert len(convs) == len(bns) == len(conv_paths) == 94
  new = dict(flat)
  for conv, bn, path in zip(convs, bns, conv_paths):
    conv.set_weights([flat[f"params/{path}/conv/kernel"]])
    bn.set_weights([flat[f"params/{path}/bn/bias"], flat[f"batch_stats/{path}/bn/mean"],
                    flat[f"batch_stats/{path}/bn/var"]])
    new[f"params/{path}/bn/scale"] = np.ones_like(flat[f"params/{path}/bn/scale"])
  variables = jax.tree_util.tree_map(jnp.asarray,
                                     traverse_util.unflatten_dict(new, sep="/"))
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 75, 75, 3)).astype(np.float32)
  keras_out = np.asarray(keras.Model(model.input, model.get_layer("mixed9").output)(x))
  _, state = ev.InceptionV3().apply(
      variables, jnp.asarray(x), mutable=["intermediates"],
      capture_intermediates=lambda mdl, name: mdl.name == "Mixed_7b" and name == "__call__")
  ours = np.asarray(state["intermediates"]["Mixed_7b"]["__call__"][0])
  assert ours.shape == keras_out.shape == (2, 1, 1, 2048)
  scale = np.abs(keras_out).max()
  assert scale > 0
  np.testing.assert_allclose(ours, keras_out, atol=1e-4 * scale)


# ------------------------------------------------------------- torch .pth files, read without torch

class _TorchName:
  """A torch global written into the pickle by name only (``torch._utils._rebuild_tensor_v2``,
  ``torch.FloatStorage``): nothing here defines or imports it."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("a name only: never called")


class _TorchPickler(pickle._Pickler):
  """Pure-Python pickler that writes ``_TorchName``s as GLOBAL opcodes and storage tuples as
  persistent ids, the way torch.save lays out a state dict."""
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_name(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_TorchName] = _save_name

  def persistent_id(self, obj):
    return obj if isinstance(obj, tuple) and obj[:1] == ("storage",) else None


class _PickledTensor:
  def __init__(self, storage, shape):
    stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    self.args = (storage, 0, tuple(shape), stride, False, collections.OrderedDict())

  def __reduce__(self):
    return _TorchName("torch._utils", "_rebuild_tensor_v2"), self.args


_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _write_torch_pth(path: str, state_dict: dict, legacy: bool) -> None:
  """Writes ``state_dict`` (name -> float32 / int64 array) as ``torch.save`` would: a zip archive
  (``archive/data.pkl`` + ``archive/data/<key>``) or the legacy stream (magic number, protocol
  1001, system info, the object, the storage keys, then each storage's int64 size and bytes)."""
  arrays, tensors = {}, collections.OrderedDict()
  for i, (name, value) in enumerate(state_dict.items()):
    arr = np.array(value, order="C")  # a copy; keeps 0-d arrays 0-d
    key = str(i)
    pid = ("storage", _TorchName("torch", _STORAGE_NAMES[arr.dtype]), key, "cpu", arr.size)
    tensors[name] = _PickledTensor(pid + (None,) if legacy else pid, arr.shape)
    arrays[key] = arr
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(tensors)
  if legacy:
    with open(path, "wb") as f:
      for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(head, f, protocol=2)
      f.write(buf.getvalue())
      pickle.dump(list(arrays), f, protocol=2)
      for arr in arrays.values():
        f.write(np.array([arr.size], "<i8").tobytes() + arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    return
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")
    for key, arr in arrays.items():
      zf.writestr(f"archive/data/{key}", arr.tobytes())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_state_dict_pth_is_read_without_torch(tmp_path, monkeypatch, legacy):
  """A small pytorch-fid-style state dict (a conv kernel, BN statistics with the int64
  num_batches_tracked, the fc bias) in both torch.save formats reads back exactly with torch
  unimportable; a .pth whose pickle names any other global is refused and nothing runs."""
  import inception_weights as iw
  import score_sde_import
  rng = np.random.default_rng(0)
  sd = {"Conv2d_1a_3x3.conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "Conv2d_1a_3x3.bn.running_var": rng.uniform(0.5, 2, size=4).astype(np.float32),
        "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(7, np.int64),
        "fc.bias": rng.normal(size=8).astype(np.float32)}
  path = str(tmp_path / "small.pth")
  _write_torch_pth(path, sd, legacy)
  assert zipfile.is_zipfile(path) != legacy
  monkeypatch.setitem(sys.modules, "torch", None)
  got = iw.read_state_dict(path)
  assert list(got) == list(sd)
  for k, v in sd.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape
    np.testing.assert_array_equal(got[k], v)
  assert iw.torch_key_to_flax("Conv2d_1a_3x3.bn.num_batches_tracked") is None  # dropped

  sentinel = tmp_path / "ran"

  class Evil:
    def __reduce__(self):
      return os.system, (f"touch {sentinel}",)

  evil = str(tmp_path / "evil.pth")
  with open(evil, "wb") as f:
    pickle.dump(Evil(), f, protocol=2)
  with pytest.raises(score_sde_import.UnsafePickleError, match="refusing to unpickle global"):
    iw.read_state_dict(evil)
  assert not sentinel.exists()


# ------------------------------------------------------------------------------ 8-bit FID inputs

def _float64_floor(v: np.ndarray) -> np.ndarray:
  return np.clip(np.floor(v), 0, 255).astype(np.uint8)


def test_quantize_8bit_rounds_as_score_sde_and_edm():
  """score_sde truncates 255 u (u = (x + 1) / 2); EDM floors 127.5 x + 128 = 255 u + 1/2 (round
  half up). Oracle: the same maps in float64 away from the level boundaries, and stated values."""
  rng = np.random.default_rng(0)
  x = rng.uniform(-1.2, 1.2, size=(3, 4, 4, 3)).astype(np.float32)
  u = (x.astype(np.float64) + 1) / 2
  for rounding, exact in (("score_sde", 255 * u), ("edm", 255 * u + 0.5)):
    q = ev.quantize_8bit(x, True, rounding)
    assert q.dtype == np.uint8 and q.shape == x.shape
    away = np.abs(exact - np.round(exact)) > 1e-3
    np.testing.assert_array_equal(q[away], _float64_floor(exact)[away])
    # uncentered samples are already u: the same images
    np.testing.assert_array_equal(ev.quantize_8bit(u.astype(np.float32), False, rounding)[away],
                                  q[away])
  mid = np.array([-1.0, -1.5, 0.0, 1.0, 1.3, 2 * 10.75 / 255 - 1], np.float32).reshape(1, 1, 2, 3)
  np.testing.assert_array_equal(ev.quantize_8bit(mid, True, "score_sde").ravel(),
                                [0, 0, 127, 255, 255, 10])
  np.testing.assert_array_equal(ev.quantize_8bit(mid, True, "edm").ravel(),
                                [0, 0, 128, 255, 255, 11])
  diff = ev.quantize_8bit(x, True, "edm").astype(int) - ev.quantize_8bit(x, True, "score_sde")
  assert set(np.unique(diff)) <= {0, 1} and 0.3 < diff.mean() < 0.7  # they differ by one level
  with pytest.raises(ValueError, match="not finite"):
    ev.quantize_8bit(np.array([[[[np.nan]]]]), True, "edm")
  with pytest.raises(ValueError, match="rounding"):
    ev.quantize_8bit(x, True, "round")
  with pytest.raises(TypeError, match="uint8"):
    ev.inception_metrics({}, x)


def test_levels_to_uint8_is_the_identity_on_8bit_data():
  k = np.arange(256)
  np.testing.assert_array_equal(ev.levels_to_uint8(k, 256), k.astype(np.uint8))
  np.testing.assert_array_equal(np.asarray(ev.levels_to_uint8(jnp.asarray(k), 256)), k)
  np.testing.assert_array_equal(ev.levels_to_uint8(np.arange(17), 17),
                                np.floor(np.arange(17) * 255 / 16 + 0.5).astype(np.uint8))


def _spy_inception(monkeypatch, seen: list):
  """Replaces the Inception forward by one whose 'pool3' is its preprocessed input (no resize:
  ``size`` is the image size), recording the dtype it was given."""
  def spy(variables, images, size=299):
    seen.append(images.dtype)
    x = ev.preprocess_for_inception(images, images.shape[1])
    return x.reshape(x.shape[0], -1), jnp.zeros((x.shape[0], 2), jnp.float32)

  monkeypatch.setattr(ev, "inception_apply", spy)


@pytest.mark.parametrize("config_name, rounding", [("cifar_vp_dsm", "score_sde"),
                                                   ("cifar_edm_dsm", "edm")])
def test_eval_fid_features_see_exactly_the_quantized_samples(tmp_path, monkeypatch, config_name,
                                                             rounding):
  """--mode=eval's FID path: the features' input is quantize_8bit(samples) / 255 exactly (uint8,
  at most 256 values, the model's paper's rounding), and samples that round alike give
  identical features."""
  import importlib
  import types
  import run_lib
  import sde_lib
  from modes import evaluate as evaluate_mode
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.eval.num_samples, config.eval.fid_stats = 5, ""
  cfg = run_lib.validate_config(config)
  model = types.SimpleNamespace(sde=sde_lib.get_sde(cfg.sde))
  rng = np.random.default_rng(1)
  levels = rng.integers(0, 256, size=(5, 32, 32, 3))
  # 255 u = k + f, f in [0.55, 0.95]: score_sde gives k, EDM k + 1 (255 at most)
  sets = [(2 * (levels + rng.uniform(0.55, 0.95, size=levels.shape)) / 255 - 1).astype(np.float32)
          for _ in range(2)]
  seen, calls = [], []
  _spy_inception(monkeypatch, seen)
  monkeypatch.setattr(ev, "load_inception_params",
                      lambda path: {"params": {"fc": {"kernel": np.zeros((32 * 32 * 3, 2))}}})
  features = ev.inception_features

  def recording(variables, images, *args, **kwargs):
    out = features(variables, images, *args, **kwargs)
    calls.append((np.asarray(images), out.pool3))
    return out

  monkeypatch.setattr(ev, "inception_features", recording)
  for samples in sets:
    monkeypatch.setattr(run_lib, "generate", lambda config, model, n, key, s=samples: (s, 1))
    out = evaluate_mode._samples_and_metrics(cfg, model, jax.random.PRNGKey(0), str(tmp_path),
                                             "weights.npz")
    assert out["fid_rounding"] == rounding and out["inception_score"] == pytest.approx(1.0)
  q = levels if rounding == "score_sde" else np.minimum(levels + 1, 255)
  np.testing.assert_array_equal(ev.quantize_8bit(sets[0], True, rounding), q)
  (images, pool3), (images_b, pool3_b) = calls
  assert images.dtype == np.uint8 and seen and all(d == jnp.uint8 for d in seen)
  np.testing.assert_array_equal(images, q)
  # what Inception is fed for level k: 2 (k / 255) - 1 (preprocess_for_inception; XLA's float32
  # arithmetic may differ from NumPy's by an ulp), one value per level
  fed = pool3.reshape(q.shape)
  np.testing.assert_allclose(fed, 2 * (q / 255.0) - 1, rtol=0, atol=3e-7)
  np.testing.assert_array_equal(np.rint((fed.astype(np.float64) + 1) / 2 * 255), q)
  assert len(np.unique(fed)) == len(np.unique(q)) <= 256
  np.testing.assert_array_equal(images_b, images)
  np.testing.assert_array_equal(pool3_b, pool3)


@pytest.mark.slow  # a real Inception compile, ~10 s; the spy test checks the 8-bit inputs
def test_inception_features_identical_for_samples_that_round_alike(random_variables):
  """With the real network (random weights, 75 x 75 input): two sample sets that round to the same
  8-bit images give identical pool3 (one call, so one compilation)."""
  rng = np.random.default_rng(0)
  levels = rng.integers(0, 256, size=(3, 20, 20, 1))
  a, b = ((2 * (levels + rng.uniform(0.05, 0.95, size=levels.shape)) / 255 - 1).astype(np.float32)
          for _ in range(2))
  qa, qb = ev.quantize_8bit(a, True, "score_sde"), ev.quantize_8bit(b, True, "score_sde")
  np.testing.assert_array_equal(qa, levels.astype(np.uint8))
  np.testing.assert_array_equal(qa, qb)
  pool3 = ev.inception_features(random_variables, np.concatenate([qa, qb]), batch_size=8,
                                size=75).pool3
  assert np.abs(a - b).min() > 0 and float(np.std(pool3)) > 0
  np.testing.assert_array_equal(pool3[:3], pool3[3:])  # different samples, the same features


def test_weight_converter_roundtrips_a_synthetic_torch_state_dict(tmp_path, random_variables,
                                                                 monkeypatch):
  conv = _converter()
  sd = conv.export_state_dict(random_variables)
  # torch layouts (OIHW convs, (out, in) fc) of pytorch-fid's FIDInceptionV3
  assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  assert sd["Mixed_7c.branch3x3_2b.conv.weight"].shape == (384, 384, 3, 1)
  assert sd["fc.weight"].shape == (1008, 2048)
  assert {"Mixed_5b.branch_pool.bn.running_var", "Mixed_7a.branch7x7x3_4.bn.weight"} <= set(sd)
  sd_extra = dict(sd, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)})
  flat = conv.convert_state_dict(sd_extra)
  ref = ev.flatten_variables(random_variables)
  assert set(flat) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(flat[k], ref[k])
  # CLI on a torch zip .pth, with torch unimportable -> loadable weights identical to the originals
  src, dst = str(tmp_path / "pt_inception.pth"), str(tmp_path / "converted.npz")
  _write_torch_pth(src, sd, legacy=False)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` would raise ImportError
  conv.main(["--input", src, "--output", dst])
  loaded = ev.flatten_variables(ev.load_inception_params(dst))
  for k in ref:
    np.testing.assert_array_equal(loaded[k], ref[k])
  with pytest.raises(KeyError, match="weird"):
    conv.convert_state_dict(dict(sd, **{"weird.thing": np.zeros(1)}))
  bad = dict(sd)
  bad["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
  with pytest.raises(ValueError, match="Mixed_5b/branch1x1/conv/kernel"):
    conv.convert_state_dict(bad, "bad.pth")


def test_fid_weights_fetched_checked_converted_once_into_the_cache(tmp_path, random_variables,
                                                                   monkeypatch):
  """First use with eval.inception_weights='' downloads the published file (here a file:// URL to
  a synthetic legacy-format torch .pth with the real shapes, read without torch), checks its
  sha256 prefix, converts it into the cache and deletes the download; later uses read the cache
  without the network. A wrong checksum keeps nothing; offline, the error names the URL, the
  cache path and the command."""
  import inception_weights as iw
  src = str(tmp_path / "pt_inception-2015-12-05-synthetic.pth")
  _write_torch_pth(src, iw.export_state_dict(random_variables), legacy=True)
  monkeypatch.setitem(sys.modules, "torch", None)
  url, cache = "file://" + src, str(tmp_path / "cache")
  with pytest.raises(ValueError, match="sha256"):
    iw.resolve_inception_weights("", cache, url=url, sha256_prefix="00000000")
  assert os.listdir(cache) == []
  path = iw.resolve_inception_weights("", cache, url=url, sha256_prefix=iw.sha256_of(src)[:8])
  assert path == os.path.join(cache, "inception_fid.npz") and os.listdir(cache) == ["inception_fid.npz"]
  loaded = ev.flatten_variables(ev.load_inception_params(path))
  for k, v in ev.flatten_variables(random_variables).items():
    np.testing.assert_array_equal(loaded[k], v)
  os.remove(src)  # "offline" from now on: the cache answers
  assert iw.resolve_inception_weights("", cache, url=url) == path
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))) as e:
    iw.resolve_inception_weights("", str(tmp_path / "empty"), url=url)
  assert "convert_inception_weights.py --download" in str(e.value) and src in str(e.value)
  with pytest.raises(FileNotFoundError, match="eval.inception_weights='nope.npz'"):
    iw.resolve_inception_weights("nope.npz", cache)


def test_fid_weights_follow_data_download(tmp_path, monkeypatch):
  """data.download=False: a missing cache fails at once naming the flag, with no network use (a
  filled cache is used). Offline (the probe gives up after its timeout), the error names the flag,
  the URL and the command, and no download starts."""
  import downloads
  import inception_weights as iw

  def no_network(*args, **kwargs):
    raise AssertionError("the network was used")

  monkeypatch.setattr(iw, "_download", no_network)
  monkeypatch.setattr(downloads, "unreachable", no_network)
  cache = str(tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="data.download=False") as e:
    iw.resolve_inception_weights("", cache, download=False)
  assert iw.FID_WEIGHTS_URL in str(e.value) and "convert_inception_weights.py" in str(e.value)
  monkeypatch.setattr(downloads, "unreachable", lambda url, timeout_s=None: "x: no answer in 0.5 s")
  with pytest.raises(FileNotFoundError, match="no network .x: no answer in 0.5 s") as e:
    iw.resolve_inception_weights("", cache)
  assert "data.download" in str(e.value) and not os.path.exists(cache)
  os.makedirs(cache)
  open(os.path.join(cache, iw.CONVERTED_NAME), "w").close()
  assert iw.resolve_inception_weights("", cache, download=False) == os.path.join(
      cache, iw.CONVERTED_NAME)


def test_eval_resolves_fid_inputs_before_any_work(tmp_path, monkeypatch):
  """--mode=eval with eval.fid on images checks eval.fid_stats and gets the Inception weights
  (here: data.download=False and an empty cache) before it loads a model: errors name the field."""
  from configs.cifar_vp_dsm import get_config
  from modes import evaluate as evaluate_mode
  monkeypatch.setenv("SCORELAB_CACHE", str(tmp_path / "cache"))
  config = get_config()
  config.eval.fid, config.data.download = True, False
  with pytest.raises(FileNotFoundError, match="data.download=False"):
    evaluate_mode.evaluate(config, str(tmp_path / "no_workdir"))
  config.eval.fid_stats = str(tmp_path / "missing_stats.npz")
  with pytest.raises(FileNotFoundError, match="config.eval.fid_stats"):
    evaluate_mode.evaluate(config, str(tmp_path / "no_workdir"))
  assert not os.path.exists(tmp_path / "no_workdir")
  config.eval.fid = False
  assert evaluate_mode._fid_weights(config) is None


# ----------------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits():
  x_tr, y_tr, x_te, y_te = ev.load_digits_split()
  clf = ev.train_digits_classifier(x_tr, y_tr, x_te, y_te, seed=0)
  return clf, x_tr, y_tr, x_te, y_te


def test_digits_classifier_accuracy_and_feature_distance(digits):
  clf, x_tr, y_tr, x_te, y_te = digits
  assert clf.test_accuracy > 0.9
  # our numpy forward pass agrees with sklearn's score on the test split
  acc = np.mean(np.argmax(ev.digits_probs(clf, x_te), 1) == y_te)
  assert acc == pytest.approx(clf.test_accuracy, abs=1e-12)
  noise = np.random.default_rng(0).uniform(size=x_te.shape)
  d_real = ev.digits_feature_distance(x_te, x_tr, clf)
  d_noise = ev.digits_feature_distance(noise, x_tr, clf)
  assert d_real < 0.1 * d_noise, (d_real, d_noise)
  m = ev.digits_metrics(clf, x_te, x_tr)
  assert m["feature_distance"] == pytest.approx(d_real)
  assert m["classifier_score"] > 8.0  # confident, balanced predictions on 10 classes
  assert m["mean_entropy"] < 0.3
  # deterministic given the seed
  clf2 = ev.train_digits_classifier(x_tr, y_tr, x_te, y_te, seed=0)
  np.testing.assert_array_equal(clf.weights[0], clf2.weights[0])


def test_eval_measures_digits_samples_as_images_in_the_unit_range(tmp_path, monkeypatch):
  """eval's digits metrics see the samples as they are viewed and as FID sees them: mapped to
  [0, 1] and clipped. A sampler that overshoots (a VP ODE near eps on a 300-step model: values to
  +-75) gave feature distances in the thousands when measured unclipped."""
  import run_lib
  from configs.digits_vp import get_config
  from modes import evaluate as evaluate_mode
  config = get_config()
  config.eval.num_samples = 40
  levels = ev.load_digits_split()[2][:40].reshape(40, 8, 8, 1)  # test images in [0, 1]
  overshoot = (2 * levels - 1) * 60.0  # centered data scaled far past [-1, 1]: (x + 1) / 2 = 60 k - 29.5
  monkeypatch.setattr(run_lib, "generate", lambda config, model, n, key: (overshoot, 1))
  out = evaluate_mode._samples_and_metrics(config, None, jax.random.PRNGKey(0), str(tmp_path), None)
  import datasets
  reference = datasets.load_levels(config, "test")[0].astype(np.float32) / 16
  expected = ev.digits_metrics(ev.train_digits_classifier(), np.clip(60 * levels - 29.5, 0, 1),
                               reference)
  assert out["digits_feature_distance"] == pytest.approx(expected["feature_distance"], rel=1e-6)
  assert out["digits_classifier_score"] == pytest.approx(expected["classifier_score"], rel=1e-6)


# -------------------------------------------------------------------------- toy divergences

def test_histogram_divergences_identical_samples_are_zero():
  x = np.random.default_rng(0).normal(size=(5000, 2))
  r = ev.histogram_divergences(x, x.copy())
  for key in ["kl", "js", "kl_marginal", "js_marginal", "wasserstein", "wasserstein_marginal"]:
    assert abs(r[key]) < 1e-12, (key, r[key])


def _binned_gaussian_probs(edges: np.ndarray, loc: float) -> np.ndarray:
  """Exact N(loc, 1) probabilities of the bins, renormalised to the histogram range."""
  p = np.diff(scipy.stats.norm.cdf(edges, loc=loc))
  return p / p.sum()


def test_wasserstein_1d_matches_scipy():
  rng = np.random.default_rng(0)
  a, b, c = rng.normal(size=1000), 2 * rng.normal(size=1000), rng.normal(size=777) + 1
  assert ev.wasserstein_1d(a, b) == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-12)
  assert ev.wasserstein_1d(a, c) == pytest.approx(scipy.stats.wasserstein_distance(a, c), rel=1e-12)


def test_histogram_divergences_shifted_gaussians_1d():
  """p = N(0, 1), q = N(delta, 1): KL = delta^2 / 2, W1 = delta; binned KL / JS computed exactly
  from the normal CDF; continuous JS by quadrature. 10^6 samples each: sampling std ~1e-3."""
  delta, n, rng = 0.5, 1_000_000, np.random.default_rng(1)
  xp, xq = rng.normal(size=n), rng.normal(size=n) + delta
  lo, hi = -3.5, 4.0  # tails beyond hold < 3e-4 of the mass; empty-bin eps effects stay small
  r = ev.histogram_divergences(xp, xq, bins=100, range=(lo, hi))
  edges = np.linspace(lo, hi, 101)
  bp, bq = _binned_gaussian_probs(edges, 0.0), _binned_gaussian_probs(edges, delta)
  bm = 0.5 * (bp + bq)
  kl_bins = np.sum(bp * np.log(bp / bq))
  js_bins = 0.5 * np.sum(bp * np.log(bp / bm)) + 0.5 * np.sum(bq * np.log(bq / bm))
  pdf_p = lambda x: scipy.stats.norm.pdf(x)
  pdf_q = lambda x: scipy.stats.norm.pdf(x, loc=delta)
  pdf_m = lambda x: 0.5 * (pdf_p(x) + pdf_q(x))
  js = scipy.integrate.quad(lambda x: 0.5 * scipy.special.rel_entr(pdf_p(x), pdf_m(x))
                            + 0.5 * scipy.special.rel_entr(pdf_q(x), pdf_m(x)), -12, 12)[0]
  assert r["kl"] == pytest.approx(kl_bins, abs=0.005)
  assert r["kl"] == pytest.approx(delta ** 2 / 2, abs=0.006)
  assert r["js"] == pytest.approx(js_bins, abs=0.001)
  assert r["js"] == pytest.approx(js, abs=0.002)
  assert r["wasserstein"] == pytest.approx(delta, abs=0.005)
  assert r["kl_marginal"] == r["kl"] and r["wasserstein_marginal"] == r["wasserstein"]


def test_histogram_divergences_shifted_gaussians_2d():
  """Shift (delta, 0) of N(0, I): joint histogram on a 20 x 20 grid vs the exact binned product
  distributions; per-axis mean = (KL_x + 0) / 2; W1 per axis (delta + 0) / 2; sliced W1 over evenly
  spaced angles = delta * mean |cos theta| (-> 2 delta / pi)."""
  delta, n, rng = 0.6, 100_000, np.random.default_rng(2)
  xp = rng.normal(size=(n, 2))
  xq = rng.normal(size=(n, 2)) + np.array([delta, 0.0])
  (xlo, xhi), (ylo, yhi) = (-3.0, 3.6), (-3.0, 3.0)
  r = ev.histogram_divergences(xp, xq, bins=20, range=[(xlo, xhi), (ylo, yhi)], n_projections=64)
  ex, ey = np.linspace(xlo, xhi, 21), np.linspace(ylo, yhi, 21)
  px, qx, py = (_binned_gaussian_probs(ex, 0.0), _binned_gaussian_probs(ex, delta),
                _binned_gaussian_probs(ey, 0.0))
  kl_x = np.sum(px * np.log(px / qx))
  joint_p, joint_q = np.outer(px, py), np.outer(qx, py)
  joint_m = 0.5 * (joint_p + joint_q)
  js_joint = 0.5 * np.sum(joint_p * np.log(joint_p / joint_m)) + 0.5 * np.sum(
      joint_q * np.log(joint_q / joint_m))
  # the plug-in KL on 400 bins with 1e5 samples is biased upwards by ~0.01-0.02 (sparse tail bins)
  assert r["kl"] == pytest.approx(kl_x, abs=0.03)
  assert r["js"] == pytest.approx(js_joint, abs=0.002)
  assert r["kl_marginal"] == pytest.approx(kl_x / 2, abs=0.01)
  assert r["wasserstein_marginal"] == pytest.approx(delta / 2, abs=0.01)
  ang = np.pi * np.arange(64) / 64
  assert r["wasserstein"] == pytest.approx(delta * np.mean(np.abs(np.cos(ang))), abs=0.01)


# ---------------------------------------------------------------------------------------- grids

def test_image_grid_layout():
  imgs = np.stack([np.full((3, 3, 1), i / 4.0) for i in range(5)])
  g = ev.image_grid(imgs, nrow=2, padding=2, pad_value=0.0)
  assert g.dtype == np.uint8 and g.shape == (3 * 5 + 2, 2 * 5 + 2)
  for i in range(5):
    r, c = divmod(i, 2)
    tile = g[2 + 5 * r:5 + 5 * r, 2 + 5 * c:5 + 5 * c]
    assert np.all(tile == round(255 * i / 4.0))
  assert g[0].max() == 0 and np.all(g[12:, 7:] == 0)  # padding and the empty sixth cell
  rgb = ev.image_grid(np.zeros((4, 2, 2, 3), np.uint8), nrow=4)
  assert rgb.shape == (2 + 4, 4 * 4 + 2, 3)
  with pytest.raises(ValueError, match="at least one image"):
    ev.image_grid(np.zeros((0, 2, 2, 1)), nrow=4)
