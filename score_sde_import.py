"""Import published score_sde checkpoints (Song et al. 2021, "Score-Based Generative Modeling
through SDEs"; Song et al. 2021b, "Maximum Likelihood Training of Score-Based Diffusion Models")
into the Flax params of models/ncsnpp.py (NCSN++, DDPM++; score_sde's DDPM is
``resblock_type='ddpm'``).

* ``import_pytorch_checkpoint(config, path)``: a score_sde_pytorch ``checkpoint_*.pth``, read
  without torch (``read_torch_checkpoint``: zip archive + a restricted unpickler).
* ``import_flax_checkpoint(config, path)``: a score_sde / score_flow (JAX) ``checkpoint_*`` file,
  the flax.serialization msgpack of their training ``State``.

Both return ``dict(params, ema_params, step, config_overrides, source)``. The mapping is structural:
score_sde_pytorch's ``all_modules.<i>`` are matched, in order, with the param-bearing submodules of
our network in the order it calls them (the same construction order as score_sde's), score_sde's
Flax modules by name. Every checkpoint tensor must land on exactly one of our params with the same
shape and every param must be covered, else ``ValueError`` naming the tensor, both shapes and the
config field that most likely differs. ``config_overrides`` are the score conventions the imported
workdir needs (``apply_overrides``): labels 999 t and s = -h / sigma_t for VP / sub-VP
(parameterization 'noise'), Fourier features of log sigma(t) and s = h / sigma(t) for VE
('scale_by_sigma', models/utils.py), x -> 2x - 1 inside the network when data are not centered.
Fields that leave no trace in the tensors must still match the published config: skip_rescale,
fir_kernel, and fir where no FIR conv exists (DDPM++'s BigGAN blocks resample without params).

This module only reads the checkpoint file it is given (run_lib writes the workdir).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import re
import zipfile
from typing import Any, Optional

import flax.linen as nn
import flax.serialization
import jax
import ml_collections
import numpy as np

from models import get_model
from models.utils import init_model

Tree = dict[str, Any]
# Config fields that decide the parameter tree, reported when a checkpoint does not fit.
_ARCH_FIELDS = ("model.nf", "model.ch_mult", "model.num_res_blocks", "model.attn_resolutions",
                "model.fir", "model.resamp_with_conv", "model.resblock_type", "model.progressive",
                "model.progressive_input", "model.progressive_combine", "model.embedding_type",
                "model.conditional", "data.num_channels")


# -- torch-free reader of torch.save zip archives --------------------------------------------------
class UnsafePickleError(pickle.UnpicklingError, ValueError):
  """A checkpoint pickle asked for a global outside the tensor / OrderedDict allow-list."""


def _bfloat16():
  import ml_dtypes  # a jax dependency
  return ml_dtypes.bfloat16


_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
             "BoolStorage": np.bool_}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: Any
  numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A tensor of the archive not read yet (``read_torch_checkpoint`` leaves those outside
  ``keys``): storage, element offset, shape and strides in elements."""
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride[, requires_grad, hooks,
  metadata]): the tensor is a strided view of its storage."""
  del unused
  return TensorRef(storage, int(offset), tuple(int(s) for s in size),
                   tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=True, hooks=None, *unused):
  """torch._utils._rebuild_parameter: an nn.Parameter pickles as its tensor."""
  del requires_grad, hooks, unused
  return data


_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}


class _TorchUnpickler(pickle.Unpickler):
  """Unpickler of a torch.save ``data.pkl`` that allows OrderedDict, tensor rebuilds and storage
  types only; storages are references into ``data/<key>`` (read later)."""

  def find_class(self, module: str, name: str):
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGES:
      return _StorageType(name)
    raise UnsafePickleError(
        f"refusing to unpickle global {module}.{name}: a score_sde checkpoint holds only tensors, "
        "storages and OrderedDicts (allowed: "
        f"{sorted('.'.join(k) for k in _GLOBALS)} and torch.<dtype>Storage)")

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.storages: dict[str, _Storage] = {}  # by key, as the pickle names them

  def persistent_load(self, pid):
    # zip format: ('storage', type, key, location, numel); legacy format: the same and
    # view_metadata, which only torch < 0.4 storage views set.
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and (len(pid) == 5 or pid[5] is None)):
      raise UnsafePickleError(f"unsupported persistent id {pid!r} (expected a torch storage)")
    stype, key, numel = pid[1], pid[2], pid[4]
    dtype = _STORAGES[stype.name] or _bfloat16()
    st = self.storages.setdefault(str(key), _Storage(str(key), np.dtype(dtype), int(numel)))
    if st.dtype != np.dtype(dtype):
      raise ValueError(f"storage {key} is pickled as both {st.dtype} and {np.dtype(dtype)}")
    return st


def strided_view(flat: np.ndarray, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...], what: str = "storage") -> np.ndarray:
  """A contiguous copy of the torch tensor view (element ``offset``, ``shape``, ``stride`` in
  elements) of the flat storage ``flat``; ValueError if the view leaves the storage."""
  if 0 in shape:
    return np.zeros(shape, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
  if offset < 0 or min(stride, default=0) < 0 or last >= flat.size:
    raise ValueError(f"tensor view (offset {offset}, shape {shape}, stride {stride}) exceeds "
                     f"{what} of {flat.size} elements")
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape, [s * flat.itemsize for s in stride])
  return np.array(view)  # contiguous copy


def _read_storage(zf: zipfile.ZipFile, prefix: str, st: _Storage, big_endian: bool,
                  cache: dict) -> np.ndarray:
  """The flat array of storage ``data/<key>`` of a zip archive (read once)."""
  if st.key not in cache:
    buf = zf.read(f"{prefix}data/{st.key}")
    dtype = st.dtype.newbyteorder(">") if big_endian else st.dtype
    flat = np.frombuffer(buf, dtype)
    if flat.size < st.numel:
      raise ValueError(f"storage data/{st.key} holds {flat.size} elements, pickle says {st.numel}")
    cache[st.key] = flat[:st.numel].astype(st.dtype, copy=False)
  return cache[st.key]


def _read_tensor(zf: zipfile.ZipFile, prefix: str, ref, big_endian: bool,
                 cache: dict) -> np.ndarray:
  """A ``TensorRef`` as an array, or a whole ``_Storage`` (a pickled storage) as its flat array."""
  if isinstance(ref, _Storage):
    return _read_storage(zf, prefix, ref, big_endian, cache)
  flat = _read_storage(zf, prefix, ref.storage, big_endian, cache)
  return strided_view(flat, ref.offset, ref.shape, ref.stride, f"storage data/{ref.storage.key}")


def _materialize(obj, read):
  if isinstance(obj, (TensorRef, _Storage)):
    return read(obj)
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, read)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, read) for v in obj)
  return obj


def read_torch_checkpoint(path: str, keys: Optional[tuple[str, ...]] = None) -> Any:
  """Loads a ``torch.save`` zip archive (torch >= 1.6) without torch: tensors become numpy arrays.

  Only OrderedDict, ``torch._utils._rebuild_tensor(_v2)`` / ``_rebuild_parameter`` and
  ``torch.<dtype>Storage`` globals are allowed (``UnsafePickleError`` otherwise), so loading never
  runs code from the file. With ``keys`` (the file holds a dict) only tensors under those top-level
  keys are read; the others stay ``TensorRef`` (e.g. skip the optimizer's moments)."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a torch zip archive (the legacy torch < 1.6 format is not "
                     "supported; re-save it with torch.save in a newer torch)")
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkls}")
    prefix = pkls[0][: -len("data.pkl")]
    names = set(zf.namelist())
    big_endian = (f"{prefix}byteorder" in names
                  and zf.read(f"{prefix}byteorder").strip() == b"big")
    with zf.open(pkls[0]) as f:
      obj = _TorchUnpickler(f).load()
    cache: dict = {}
    read = lambda ref: _read_tensor(zf, prefix, ref, big_endian, cache)  # noqa: E731
    if keys is None or not isinstance(obj, dict):
      return _materialize(obj, read)
    return type(obj)((k, _materialize(v, read) if k in keys else v) for k, v in obj.items())


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def read_torch_legacy(data: bytes) -> Any:
  """Loads a legacy (non-zip) ``torch.save`` stream without torch: five pickles (magic number,
  protocol 1001, system info, the object, the list of storage keys) and then, per key, its element
  count (int64) and raw data. This is how torch pickles a storage inside a plain pickle
  (``torch.storage._load_from_bytes``, e.g. EDM's network pickles). Storages become flat numpy
  arrays, tensors arrays; every pickle goes through the same allow-list as
  ``read_torch_checkpoint`` (``UnsafePickleError`` otherwise), so nothing in it runs."""
  f = io.BytesIO(data)
  if _TorchUnpickler(f).load() != _LEGACY_MAGIC:
    raise ValueError("not a legacy torch.save stream (bad magic number)")
  if _TorchUnpickler(f).load() != _LEGACY_PROTOCOL:
    raise ValueError("unsupported legacy torch.save protocol version")
  info = _TorchUnpickler(f).load()
  order = "<" if not isinstance(info, dict) or info.get("little_endian", True) else ">"
  unpickler = _TorchUnpickler(f)
  obj = unpickler.load()
  keys = _TorchUnpickler(f).load()
  if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.storages):
    raise ValueError(f"legacy torch.save stream: storage keys {keys!r} do not match the pickle's "
                     f"{sorted(unpickler.storages)}")
  flats = {}
  for key in map(str, keys):
    st = unpickler.storages[key]
    count = np.frombuffer(f.read(8), np.dtype(f"{order}i8"))
    if count.size != 1 or int(count[0]) != st.numel:
      raise ValueError(f"legacy torch.save stream: storage {key} holds "
                       f"{int(count[0]) if count.size else 'no'} elements, pickle says {st.numel}")
    buf = f.read(st.numel * st.dtype.itemsize)
    if len(buf) != st.numel * st.dtype.itemsize:
      raise ValueError(f"legacy torch.save stream: storage {key} is truncated")
    flats[key] = np.frombuffer(buf, st.dtype.newbyteorder(order)).astype(st.dtype)

  def read(ref):
    if isinstance(ref, _Storage):
      return flats[ref.key]
    return strided_view(flats[ref.storage.key], ref.offset, ref.shape, ref.stride,
                        f"storage {ref.storage.key}")

  return _materialize(obj, read)


# -- our parameter tree ----------------------------------------------------------------------------
def target_params(config: ml_collections.ConfigDict) -> tuple[Tree, list[str]]:
  """Shapes of ``init_model(get_model(config), key, (1, H, W, C))`` (evaluated abstractly) and the
  names of its top-level submodules in the order the network calls them (param-bearing only)."""
  model = get_model(config)
  shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
  calls: list[str] = []

  def record(next_fun, args, kwargs, context):
    path = context.module.path
    if context.method_name == "__call__" and len(path) == 1 and path[0] not in calls:
      calls.append(path[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    tree = jax.eval_shape(lambda k: init_model(model, k, shape), jax.random.PRNGKey(0))
  tree = jax.tree_util.tree_map(lambda s: tuple(s.shape), _plain(tree))
  return tree, [c for c in calls if c in tree]


def _plain(tree):
  return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _leaves(tree: Tree, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
  out = []
  for k, v in tree.items():
    out += _leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)]
  return out


def _set(tree: Tree, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


_RES, _ATTN, _FOURIER = "a residual block", "an attention block", "the Fourier embedding"
_N_RES = "model.num_res_blocks (or model.ch_mult)"
_N_ATTN = "model.attn_resolutions (or data.image_size)"


def _kind(name: str, subs: set) -> str:
  """What a top-level module is, from its name and the names of its params / submodules."""
  if any(s.startswith("GroupNorm_1") for s in subs):
    return _RES
  if any(s.startswith(("NIN_", "Dense_")) for s in subs) and "GroupNorm_0" in {
      s.split("/")[0] for s in subs}:
    return _ATTN
  if subs == {"W"} or name.startswith("GaussianFourierProjection"):
    return _FOURIER
  return "another module"


def _summary(children: list[tuple[str, set]], nf: Optional[int], channels: Optional[int],
             fir: Optional[bool]) -> dict:
  """Architecture facts of a list of (module name, param sub-names) used to guess which config
  field differs: nf, input channels, embedding, numbers of residual / attention blocks, FIR
  resampling convs (None: not visible), and the kind of every module."""
  kinds = [_kind(n, s) for n, s in children]
  return {"model.nf": nf, "data.num_channels": channels,
          "model.embedding_type": "fourier" if _FOURIER in kinds else "positional",
          _N_RES: kinds.count(_RES), _N_ATTN: kinds.count(_ATTN), "model.fir": fir, "_kinds": kinds}


def _hint(ckpt: dict, ours: dict) -> str:
  for field in ckpt:
    if not field.startswith("_") and ckpt[field] is not None and ckpt[field] != ours[field]:
      what = {"model.embedding_type": " (score_sde: 'fourier' for VE / NCSN++ cont., 'positional'"
              " for VP and sub-VP / DDPM++ cont.; check sde.name and model.name)",
              _N_RES: " residual blocks", _N_ATTN: " attention blocks"}.get(field, "")
      return (f"likely config field: {field} (checkpoint {ckpt[field]}, config {ours[field]}"
              f"{what})")
  i = next((i for i, (a, b) in enumerate(zip(ckpt["_kinds"], ours["_kinds"])) if a != b), None)
  if i is not None and _ATTN in (ckpt["_kinds"][i], ours["_kinds"][i]):
    return (f"likely config field: {_N_ATTN}: param-bearing module {i} is {ckpt['_kinds'][i]} in "
            f"the checkpoint, {ours['_kinds'][i]} in the config's model")
  return ("likely config field: one of model.fir, model.resamp_with_conv, model.resblock_type, "
          "model.progressive, model.progressive_input, model.progressive_combine (checkpoint has "
          f"{len(ckpt['_kinds'])} param-bearing modules, config {len(ours['_kinds'])})")


class _Assigner:
  """Fills our parameter tree from checkpoint tensors, one error per first mismatch."""

  def __init__(self, config, target: Tree, order: list[str], ckpt_summary: dict, source: str):
    self.target, self.order, self.source = target, order, source
    self.fir = bool(config.model.fir)
    resampling = any(c.startswith(("Downsample_", "Upsample_")) for c in order)
    self.ours = _summary([(c, {"/".join(p) for p, _ in _leaves(target[c])}) for c in order],
                         int(config.model.nf), int(config.data.num_channels),
                         self.fir if resampling else None)
    self.hint = _hint(ckpt_summary, self.ours)
    self.out: Tree = {}
    self.filled: set = set()

  def fail(self, msg: str):
    raise ValueError(f"{self.source}: {msg}; {self.hint}. Fields that shape the parameters: "
                     f"{', '.join(_ARCH_FIELDS)}")

  def put(self, name: str, raw_shape: tuple, path: tuple, value: np.ndarray) -> None:
    want = self._get(path)
    if want is None:
      has = (f" ({path[0]} has {sorted('/'.join(p) for p, _ in _leaves(self.target[path[0]]))})"
             if path[0] in self.target else "")
      self.fail(f"tensor {name} {raw_shape} has no counterpart: the model of this config has no "
                f"param {'/'.join(path)}{has}")
    if tuple(value.shape) != tuple(want):
      self.fail(f"tensor {name} {raw_shape} (as our layout {tuple(value.shape)}) does not fit "
                f"{'/'.join(path)} {tuple(want)}")
    if path in self.filled:
      self.fail(f"tensor {name} maps onto {'/'.join(path)}, which another tensor already filled")
    self.filled.add(path)
    _set(self.out, path, np.asarray(value, np.float32))

  def check_kind(self, child: str, ckpt_module: str, subs: set, first: str, shape: tuple) -> None:
    """A checkpoint module and our module it maps onto must be of the same kind."""
    ours = _kind(child, {"/".join(p) for p, _ in _leaves(self.target[child])})
    theirs = _kind(ckpt_module, subs)
    if ours != theirs:
      self.fail(f"tensor {first} {shape} belongs to {ckpt_module}, {theirs}, but the model of this "
                f"config has {ours} there ({child})")

  def _get(self, path):
    node = self.target
    for k in path:
      if not isinstance(node, dict) or k not in node:
        return None
      node = node[k]
    return None if isinstance(node, dict) else node

  def check_child(self, child: str, ckpt_names: list[str]) -> None:
    for path, shape in _leaves(self.target[child], (child,)):
      if path not in self.filled:
        self.fail(f"param {'/'.join(path)} {shape} has no tensor in the checkpoint (the matching "
                  f"checkpoint module holds {ckpt_names})")

  def finish(self) -> Tree:
    for path, shape in _leaves(self.target):
      if path not in self.filled:
        self.fail(f"param {'/'.join(path)} {shape} has no tensor in the checkpoint")
    return self.out


def _rename(child: Tree, name: str, module: str, fir: bool) -> tuple[str, bool]:
  """score_sde sub-module name -> ours: NIN_j -> Dense_j (attention) or Conv_2 (the 1x1 shortcut of
  a DDPM-style residual block); Conv2d_j (StyleGAN2 fused FIR resampling conv) -> Conv_j /
  ConvTranspose_j of our Down/Upsample_i when ``fir`` (a non-FIR conv there is Conv_j in both and
  needs ``fir`` False). Returns (name, is_nin_shortcut); unmatched names stay (and then fail)."""
  if name.startswith(("Downsample_", "Upsample_")) and (
      module.startswith("Conv2d_") != fir):
    return module, False
  m = re.fullmatch(r"NIN_(\d+)", module)
  if m and "GroupNorm_1" in child:  # a residual block: NIN_0 is its shortcut
    return ("Conv_2", True) if m.group(1) == "0" else (module, False)
  if m:
    return f"Dense_{m.group(1)}", False
  m = re.fullmatch(r"Conv2d_(\d+)", module)
  if m:
    for cand in (f"Conv_{m.group(1)}", f"ConvTranspose_{m.group(1)}"):
      if cand in child:
        return cand, False
  return module, False


def _leaf(child: Tree, name: str, fir: bool, rel: tuple[str, ...], value: np.ndarray,
          torch_layout: bool):
  """(our relative path, value in our layout) of one checkpoint leaf under our top-level module
  ``name`` (subtree ``child``)."""
  mods, leaf = list(rel[:-1]), rel[-1]
  shortcut = False
  if mods:
    mods[0], shortcut = _rename(child, name, mods[0], fir)
  if leaf == "W" and not mods:  # Gaussian Fourier frequencies
    return ("W",), value
  if leaf == "W":  # NIN W (in, out): y = x @ W in both frameworks; a shortcut is a 1x1 conv
    return tuple(mods) + ("kernel",), value[None, None] if shortcut else value
  if leaf in ("b", "bias"):
    return tuple(mods) + ("bias",), value
  if leaf == "weight" and not torch_layout:  # Flax FIR Conv2d weight, already HWIO
    return tuple(mods) + ("kernel",), value
  if leaf == "weight":  # torch layouts
    if value.ndim == 4:
      return tuple(mods) + ("kernel",), value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.ndim == 2:
      return tuple(mods) + ("kernel",), value.T  # Linear (out, in) -> Dense (in, out)
    return tuple(mods) + ("scale",), value  # GroupNorm
  return tuple(mods) + (leaf,), value


def _conventions(config, fourier: bool, conditional: bool = True) -> dict[str, Any]:
  """Config overrides that make our score_fn equal score_sde's get_score_fn(continuous=True)."""
  sde = str(config.sde.name).lower()
  if conditional and fourier and sde != "vesde":
    raise ValueError(f"sde.name={sde!r}: score_sde's Fourier-embedding networks are conditioned on "
                     "log sigma(t) of a VE SDE (NCSN++ cont.); import them with sde.name='vesde'")
  if conditional and not fourier and sde == "vesde":
    raise ValueError("sde.name='vesde' with a positional-embedding checkpoint: score_sde's "
                     "continuous VE models use Fourier features (its discrete SMLD models, "
                     "labelled by noise index, are not supported); import VP / sub-VP checkpoints "
                     "with sde.name='vpsde' / 'subvpsde'")
  ve = sde == "vesde"
  return {"model.parameterization": "scale_by_sigma" if ve else "noise",
          "model.time_embedding_scale": 1.0 if ve else 999.0,
          "model.input_scaling": False,
          "model.center_input": not bool(config.data.centered)}


def _check_sigmas(config, sigmas: Optional[np.ndarray], name: str, source: str) -> None:
  """score_sde_pytorch's ``sigmas`` buffer is exp(linspace(log sigma_max, log sigma_min, N)): for
  VE it pins the SDE's noise range."""
  if sigmas is None or str(config.sde.name).lower() != "vesde" or sigmas.size < 2:
    return
  for field, val in (("sde.sigma_max", sigmas[0]), ("sde.sigma_min", sigmas[-1])):
    if not math.isclose(float(val), float(config.sde[field.split(".")[1]]), rel_tol=1e-5):
      raise ValueError(f"{source}: buffer {name} says {field}={float(val):g}, config has "
                       f"{float(config.sde[field.split('.')[1]]):g}; set --config.{field}="
                       f"{float(val):g}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]):
  """A copy of ``config`` with dotted-field overrides (e.g. the importers' ``config_overrides``)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


# -- score_sde_pytorch ---------------------------------------------------------------------------
_TORCH_BUFFERS = ("sigmas",)  # register_buffer of score_sde_pytorch's ncsnpp / ddpm models
_FROZEN = re.compile(r"all_modules\.\d+\.W$")  # GaussianFourierProjection.W: requires_grad=False


def _strip(key: str) -> str:
  """state_dict key without torch.nn.DataParallel's 'module.' prefix."""
  return key[len("module."):] if key.startswith("module.") else key


def _torch_groups(sd: dict, source: str) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
  """'all_modules.<i>.<rest>' tensors grouped by i, in state_dict order (buffers dropped)."""
  groups: dict[str, list] = {}
  for key, value in sd.items():
    name = _strip(key)
    if name in _TORCH_BUFFERS:
      continue
    m = re.fullmatch(r"(all_modules\.\d+)\.(.+)", name)
    if m is None:
      raise ValueError(f"{source}: tensor {key} {tuple(value.shape)} is not under all_modules "
                       "(not a score_sde ncsnpp / ddpm network)")
    groups.setdefault(m.group(1), []).append((m.group(2), key, value))
  return [(g, items) for g, items in groups.items()]


def _torch_summary(groups) -> dict:
  """_summary of the checkpoint; nf and the input channels from the first top-level conv."""
  children = [(g, {r.split(".")[0] for r, _, _ in items}) for g, items in groups]
  convs = [v for _, items in groups for r, _, v in items if r == "weight" and v.ndim == 4]
  nf, ch = (int(convs[0].shape[0]), int(convs[0].shape[1])) if convs else (None, None)
  fir = True if any(s.startswith("Conv2d_") for _, subs in children for s in subs) else None
  return _summary(children, nf, ch, fir)


def _map_torch_state(config, sd: dict, target, order, summary, source) -> Tree:
  groups = _torch_groups(sd, source)
  asg = _Assigner(config, target, order, summary, source)
  for i, (gname, items) in enumerate(groups):
    if i >= len(order):
      r, key, v = items[0]
      asg.fail(f"tensor {key} {tuple(v.shape)} has no counterpart: the model of this config has "
               f"only {len(order)} param-bearing modules, the checkpoint more ({len(groups)})")
    child = order[i]
    asg.check_kind(child, gname, {r.split(".")[0] for r, _, _ in items}, items[0][1],
                   tuple(items[0][2].shape))
    for rel, key, value in items:
      path, val = _leaf(target[child], child, asg.fir, tuple(rel.split(".")), value,
                        torch_layout=True)
      asg.put(key, tuple(value.shape), (child,) + path, val)
    asg.check_child(child, [k for _, k, _ in items])
  return asg.finish()


def import_pytorch_checkpoint(config: ml_collections.ConfigDict, path: str) -> dict[str, Any]:
  """Params of a score_sde_pytorch checkpoint (``torch.save`` of a dict with 'model', 'ema',
  'optimizer', 'step') for the network of ``config``.

  Returns dict(params, ema_params (from ``ema.shadow_params``, in ``model.parameters()`` order of
  the trainable tensors; frozen ones such as the Fourier ``W`` come from ``model``), step,
  config_overrides (dotted config fields the imported workdir must use: parameterization,
  time_embedding_scale, input_scaling, center_input, ema_rate), source)."""
  source = os.path.basename(str(path))
  state = read_torch_checkpoint(path, keys=("model", "ema", "step"))
  for key in ("model", "ema", "step"):
    if key not in state:
      raise ValueError(f"{source}: not a score_sde_pytorch training checkpoint (no {key!r} entry; "
                       f"has {sorted(state)})")
  sd = state["model"]
  target, order = target_params(config)
  summary = _torch_summary(_torch_groups(sd, source))
  params = _map_torch_state(config, sd, target, order, summary, source)

  # EMA: shadow_params follow model.parameters() = the state_dict minus buffers, trainable only.
  names = [k for k in sd if _strip(k) not in _TORCH_BUFFERS and not _FROZEN.search(k)]
  shadow = list(state["ema"].get("shadow_params", []))
  if len(shadow) != len(names):
    raise ValueError(f"{source}: ema.shadow_params has {len(shadow)} tensors, the model "
                     f"{len(names)} trainable parameters")
  ema_sd = collections.OrderedDict(sd)
  for k, v in zip(names, shadow):
    if tuple(v.shape) != tuple(sd[k].shape):
      raise ValueError(f"{source}: ema.shadow_params entry for {k} has shape {tuple(v.shape)}, "
                       f"the parameter {tuple(sd[k].shape)}")
    ema_sd[k] = v
  ema_params = _map_torch_state(config, ema_sd, target, order, summary, source + " (ema)")

  sigmas = next((v for k, v in sd.items() if _strip(k) == "sigmas"), None)
  _check_sigmas(config, sigmas, "module.sigmas", source)
  overrides = _conventions(config, summary["model.embedding_type"] == "fourier",
                           bool(config.model.conditional))
  if "decay" in state["ema"]:
    overrides["model.ema_rate"] = float(state["ema"]["decay"])
  return dict(params=params, ema_params=ema_params, step=int(np.asarray(state["step"])),
              config_overrides=overrides, source=f"score_sde_pytorch:{path}")


# -- score_sde / score_flow (Flax) -----------------------------------------------------------------
# Their top-level module classes -> ours (Flax numbers each class's instances in call order).
_FLAX_CLASSES = {"ResnetBlockBigGANpp": "ResnetBlock", "ResnetBlockDDPMpp": "ResnetBlock",
                 "ResnetBlockDDPM": "ResnetBlock", "AttnBlockpp": "AttnBlock"}


def _flax_child(name: str) -> str:
  cls, _, idx = name.rpartition("_")
  return f"{_FLAX_CLASSES.get(cls, cls)}_{idx}"


def _flax_summary(tree: Tree) -> dict:
  children = [(n, {"/".join(p) for p, _ in _leaves(v)} if isinstance(v, dict) else {n})
              for n, v in tree.items()]
  conv = tree.get("Conv_0", {}).get("kernel")
  nf, ch = (int(conv.shape[-1]), int(conv.shape[-2])) if conv is not None else (None, None)
  fir = True if any("Conv2d_" in s for _, subs in children for s in subs) else None
  return _summary(children, nf, ch, fir)


def _map_flax_params(config, tree: Tree, target, order, source) -> Tree:
  asg = _Assigner(config, target, order, _flax_summary(tree), source)
  rank = {c: i for i, c in enumerate(order)}
  children = sorted(tree, key=lambda n: (rank.get(_flax_child(n), len(rank)), n))
  for name in children:
    child = _flax_child(name)
    sub = tree[name]
    if child not in target:
      leaves = _leaves(sub, (name,)) if isinstance(sub, dict) else [((name,), sub)]
      p, v = leaves[0]
      asg.fail(f"tensor {'/'.join(p)} {tuple(np.shape(v))} has no counterpart: the model of this "
               f"config has no module {child}")
    leaves = _leaves(sub)
    asg.check_kind(child, name, {"/".join(r) for r, _ in leaves}, "/".join((name,) + leaves[0][0]),
                   tuple(np.shape(leaves[0][1])))
    for rel, value in leaves:
      value = np.asarray(value)
      path, val = _leaf(target[child], child, asg.fir, rel, value, torch_layout=False)
      asg.put("/".join((name,) + rel), tuple(value.shape), (child,) + path, val)
    asg.check_child(child, ["/".join((name,) + r) for r, _ in _leaves(sub)])
  return asg.finish()


def read_flax_checkpoint(path: str) -> Tree:
  """The state dict of a flax.training.checkpoints file (msgpack; no pickle). A directory means its
  newest ``checkpoint_<n>``."""
  if os.path.isdir(path):
    steps = [(int(m.group(1)), f) for f in os.listdir(path)
             if (m := re.fullmatch(r"checkpoint_(\d+)", f))]
    if not steps:
      raise ValueError(f"{path}: no checkpoint_<n> file")
    path = os.path.join(path, max(steps)[1])
  with open(path, "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def import_flax_checkpoint(config: ml_collections.ConfigDict, path: str) -> dict[str, Any]:
  """Params of a score_sde / score_flow Flax checkpoint (their ``State``: ``optimizer.target`` or
  ``params``, ``params_ema``, ``step``, ``ema_rate``) for the network of ``config``; same return
  dict as ``import_pytorch_checkpoint``. Names: ResnetBlock{BigGANpp,DDPMpp,DDPM}_i ->
  ResnetBlock_i, AttnBlockpp_i -> AttnBlock_i, NIN_j {W, b} -> Dense_j {kernel, bias} (or the
  residual shortcut Conv_2 with a 1x1 kernel), Conv2d_0 {weight, bias} -> Conv_0 /
  ConvTranspose_0 {kernel, bias}; all layouts are already HWIO / (in, out)."""
  source = os.path.basename(str(path))
  state = read_flax_checkpoint(path)
  if "optimizer" in state and "target" in state["optimizer"]:
    params = state["optimizer"]["target"]
  elif "params" in state:
    params = state["params"]
  else:
    raise ValueError(f"{source}: no optimizer.target or params entry (has {sorted(state)})")
  if "step" not in state:
    raise ValueError(f"{source}: no step entry")
  ema = state.get("params_ema") or params
  if set(params) == {"params"}:  # a variables dict rather than the 'params' collection
    params, ema = params["params"], ema.get("params", ema)
  target, order = target_params(config)
  out = _map_flax_params(config, params, target, order, source)
  out_ema = _map_flax_params(config, ema, target, order, source + " (params_ema)")
  overrides = _conventions(config, any(k.startswith("GaussianFourierProjection") for k in params),
                           bool(config.model.conditional))
  if "ema_rate" in state:
    overrides["model.ema_rate"] = float(np.asarray(state["ema_rate"]))
  return dict(params=out, ema_params=out_ema, step=int(np.asarray(state["step"])),
              config_overrides=overrides, source=f"score_sde_flax:{path}")


def to_score_sde_flax(config: ml_collections.ConfigDict, params: Tree) -> Tree:
  """Inverse of the Flax mapping: our params in score_sde's Flax NCSN++ naming (for
  ``model.resblock_type`` 'biggan' -> ResnetBlockBigGANpp, 'ddpm' -> ResnetBlockDDPMpp)."""
  res_cls = ("ResnetBlockBigGANpp" if str(config.model.resblock_type).lower() == "biggan"
             else "ResnetBlockDDPMpp")
  fir = bool(config.model.fir)
  out: Tree = {}
  for name, sub in params.items():
    cls, _, idx = name.rpartition("_")
    if cls == "ResnetBlock":
      sub = dict(sub)
      if res_cls == "ResnetBlockDDPMpp" and "Conv_2" in sub:
        conv = sub.pop("Conv_2")
        sub["NIN_0"] = {"W": np.asarray(conv["kernel"])[0, 0], "b": conv["bias"]}
      out[f"{res_cls}_{idx}"] = sub
    elif cls == "AttnBlock":
      out[f"AttnBlockpp_{idx}"] = {
          (f"NIN_{k.split('_')[1]}" if k.startswith("Dense_") else k):
          ({"W": v["kernel"], "b": v["bias"]} if k.startswith("Dense_") else v)
          for k, v in sub.items()}
    elif cls in ("Upsample", "Downsample") and fir:  # the fused FIR conv (sole submodule)
      (conv,) = sub.values()
      out[name] = {"Conv2d_0": {"weight": conv["kernel"], "bias": conv["bias"]}}
    else:
      out[name] = sub
  return out
