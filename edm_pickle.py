"""Read EDM-format network pickles (NVlabs/edm ``network-snapshot-*.pkl``, the checkpoints of
Karras et al. 2022, "Elucidating the design space of diffusion-based generative models", and of
the Stable Target Field authors' fork) as data, never running their code, and map EDMPrecond +
SongUNet onto models/songunet.py.

The format (../shared/fixtures/edm/README.md): a plain pickle of ``dict(ema=EDMPrecond,
loss_fn, augment_pipe, dataset_kwargs)``. Each module is pickled by ``torch_utils.persistence``
as ``_reconstruct_persistent_obj(meta)`` with the *full Python source* of its module in
``meta['module_src']``, which EDM's loader executes; tensors are ``torch._utils._rebuild_tensor_v2``
over storages written by ``torch.storage._load_from_bytes`` (a nested legacy ``torch.save``
stream, read by ``score_sde_import.read_torch_legacy``).

``read_edm_pickle(path)`` unpickles with ``find_class`` limited to ``GLOBALS`` (by name; anything
else raises ``score_sde_import.UnsafePickleError`` before it is looked up): a persistent object
becomes a ``PersistentObject`` (class name, state dict, init kwargs, sha256 of its source, which is
never compiled nor executed), torch containers ``TorchModule`` records, tensors numpy arrays.
``import_edm_pickle(config, path)`` returns what ``--mode=import`` writes: the params of the
``ema`` network for the config that ``edm_config_overrides`` derives from the recorded
constructor arguments (model.*, sde.sigma_data, data.image_size / num_channels, ...).

The Stable Target Field fork (github.com/Newbeeer/stf, training/networks.py) differs from NVlabs'
networks.py only where these two architectures do not go: unused ``quan_dequan`` methods on
Linear and Conv2d (int8 fake quantization, never called; the call in Linear.forward is commented
out), commented-out alternative padding in Conv2d's fused *up* path (SongUNet fuses only the
NCSN++ *down* path), a ``print`` in VEPrecond.__init__, extra ignored arguments ``D`` and
``sigma_old`` of EDMPrecond.forward and an extra attribute ``EDMPrecond.N`` (= img_channels x
img_resolution^2, never read), and the unused imports ``torch.nn.functional as F`` and
``scipy.special``. UNetBlock, PositionalEmbedding, FourierEmbedding, SongUNet and the EDM
preconditioning formulas are the same, so its DDPM++ / NCSN++ pickles map the same way (the extra
``N`` in the state is ignored). Its loss module (``loss_fn``: the STF loss) is kept as data only.

Only this module's reader opens the checkpoint file (run_lib / modes write the workdir).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import pickle
import re
from typing import Any, Optional

import jax
import numpy as np

import score_sde_import as ssi
from models import get_model
from models.songunet import FROZEN
from models.utils import init_model

UnsafePickleError = ssi.UnsafePickleError
Tree = dict[str, Any]


# -- restricted unpickler ------------------------------------------------------------------------
@dataclasses.dataclass
class PersistentObject:
  """A ``torch_utils.persistence`` object as data: its class name, its pickled state (the module's
  ``__dict__``: _parameters, _buffers, _modules, attributes, _init_args / _init_kwargs) and the
  sha256 of the source it carried (kept for provenance; never compiled or executed)."""
  class_name: str
  state: dict
  module_src_sha256: str
  version: int

  @property
  def init_kwargs(self) -> dict:
    """The constructor's keyword arguments as persistence recorded them ({} if not recorded)."""
    return dict(self.state.get("_init_kwargs") or {})


class TorchModule:
  """A plain torch container (ModuleDict / ModuleList / Sequential) as data: NEWOBJ creates it
  with no arguments and BUILD hands it its ``__dict__`` (kept in ``state``)."""

  def __new__(cls, *args):
    del args
    obj = object.__new__(cls)
    obj.state = {}
    return obj

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise UnsafePickleError(f"{self.class_name}: expected a dict state, got {type(state)}")
    self.state = state


def _container(name: str) -> type:
  return type(name, (TorchModule,), {"class_name": name})


class EasyDict(dict):
  """dnnlib.EasyDict as a plain dict (EDM records some kwargs this way)."""


class _DType:
  """numpy.dtype(spec, align, copy) + BUILD: the dtype of a pickled numpy scalar."""

  def __init__(self, spec, align=False, copy=True):
    del align, copy
    if not isinstance(spec, str):
      raise UnsafePickleError(f"numpy.dtype({spec!r}): expected a type code string")
    self.dtype = np.dtype(spec)
    if self.dtype.kind not in "biufc":
      raise UnsafePickleError(f"numpy.dtype({spec!r}): only numeric dtypes are allowed")

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(state[1])


def _np_scalar(dtype: _DType, data: bytes):
  """numpy.core.multiarray.scalar(dtype, bytes) for numeric dtypes."""
  if not isinstance(dtype, _DType) or not isinstance(data, bytes):
    raise UnsafePickleError("numpy scalar: expected (numeric dtype, bytes)")
  return np.frombuffer(data, dtype.dtype, count=1)[0].astype(dtype.dtype.newbyteorder("="))


def _persistent(meta) -> PersistentObject:
  """torch_utils.persistence._reconstruct_persistent_obj(meta) as data: ``module_src`` is hashed,
  never executed; the state stays a dict."""
  if not isinstance(meta, dict) or meta.get("type") != "class":
    raise UnsafePickleError(f"persistent object: expected meta of type 'class', got "
                            f"{meta.get('type') if isinstance(meta, dict) else type(meta)!r}")
  name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src")
  if not isinstance(name, str) or not isinstance(src, str):
    raise UnsafePickleError("persistent object: class_name and module_src must be strings")
  if state is None:
    state = {}
  if not isinstance(state, dict):
    raise UnsafePickleError(f"persistent object {name}: expected a dict state, got {type(state)}")
  return PersistentObject(name, state, hashlib.sha256(src.encode()).hexdigest(),
                          int(meta.get("version", 0)))


def _load_storage(data: bytes) -> np.ndarray:
  """torch.storage._load_from_bytes: a nested legacy torch.save of one storage -> flat array."""
  if not isinstance(data, bytes):
    raise UnsafePickleError("torch.storage._load_from_bytes: expected bytes")
  flat = ssi.read_torch_legacy(data)
  if not isinstance(flat, np.ndarray) or flat.ndim != 1:
    raise UnsafePickleError("torch.storage._load_from_bytes: the nested stream is not a storage")
  return flat


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2) over a storage already read: a strided view of it."""
  del unused
  if not isinstance(storage, np.ndarray):
    raise UnsafePickleError("tensor rebuild: the storage is not one read by _load_from_bytes")
  return ssi.strided_view(storage, int(offset), tuple(int(s) for s in size),
                          tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=True, hooks=None, *unused):
  """torch._utils._rebuild_parameter: an nn.Parameter as its tensor."""
  del requires_grad, hooks, unused
  return data


# The allow-list: (module, name) -> what it becomes. Nothing else is ever looked up.
GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): _container("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _container("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _container("Sequential"),
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
}


class _EDMUnpickler(pickle.Unpickler):
  """Unpickler of EDM network pickles that resolves only ``GLOBALS``."""

  def find_class(self, module: str, name: str):
    if (module, name) in GLOBALS:
      return GLOBALS[(module, name)]
    raise UnsafePickleError(
        f"refusing to unpickle global {module}.{name}: an EDM network pickle is read as data and "
        f"may only name {sorted('.'.join(k) for k in GLOBALS)}")

  def persistent_load(self, pid):
    raise UnsafePickleError(f"unsupported persistent id {pid!r} in an EDM network pickle")


def read_edm_pickle(path: str) -> Any:
  """The pickle at ``path`` as data (see the module docstring); UnsafePickleError names any
  global outside ``GLOBALS``; nothing from the file is executed."""
  with open(path, "rb") as f:
    return _EDMUnpickler(f).load()


# -- the network ---------------------------------------------------------------------------------
def state_dict(obj, prefix: str = "") -> dict[str, np.ndarray]:
  """torch's ``state_dict()`` of a reconstructed module tree: dotted name -> array, parameters
  and persistent buffers, in registration order (None entries skipped)."""
  st = obj.state
  out: dict[str, np.ndarray] = {}
  skip = set(st.get("_non_persistent_buffers_set") or ())
  for key in ("_parameters", "_buffers"):
    for name, value in (st.get(key) or {}).items():
      if value is not None and not (key == "_buffers" and name in skip):
        out[prefix + name] = np.asarray(value)
  for name, child in (st.get("_modules") or {}).items():
    if child is not None:
      out.update(state_dict(child, f"{prefix}{name}."))
  return out


def _parameter_names(obj, prefix: str = "") -> list[str]:
  st = obj.state
  names = [prefix + n for n, v in (st.get("_parameters") or {}).items() if v is not None]
  for name, child in (st.get("_modules") or {}).items():
    if child is not None:
      names += _parameter_names(child, f"{prefix}{name}.")
  return names


def edm_network(data: Any, source: str = "pickle") -> PersistentObject:
  """The ``ema`` EDMPrecond of a snapshot dict (or an EDMPrecond itself); ValueError naming what
  is there otherwise (VP / VE / iDDPM preconditioning, ADM networks, class-conditional models are
  not supported)."""
  net = data.get("ema") if isinstance(data, dict) else data
  if not isinstance(net, PersistentObject):
    what = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise ValueError(f"{source}: no EDM network (expected a dict with 'ema' = EDMPrecond, got "
                     f"{what})")
  if net.class_name != "EDMPrecond":
    raise ValueError(f"{source}: the network is {net.class_name}; only EDMPrecond (Karras et al. "
                     "2022, Table 1 preconditioning) maps onto scorelab's sde 'edm'")
  model = (net.state.get("_modules") or {}).get("model")
  if not isinstance(model, PersistentObject) or model.class_name != "SongUNet":
    name = model.class_name if isinstance(model, PersistentObject) else type(model).__name__
    raise ValueError(f"{source}: EDMPrecond wraps {name}; only SongUNet (DDPM++ / NCSN++) is "
                     "supported (models/songunet.py)")
  return net


# SongUNet arguments -> config fields; each maps one recorded constructor argument.
_SIMPLE = {"model_channels": "model.nf", "num_blocks": "model.num_res_blocks",
           "dropout": "model.dropout", "channel_mult_noise": "model.channel_mult_noise",
           "augment_dim": "model.augment_dim", "embedding_type": "model.embedding_type"}
_ENCODER = {"standard": "none", "skip": "input_skip", "residual": "residual"}
_DECODER = {"standard": "none", "skip": "output_skip"}


def edm_config_overrides(net: PersistentObject, loss: Optional[PersistentObject] = None,
                         source: str = "pickle") -> dict[str, Any]:
  """Dotted config fields that reproduce the pickled EDMPrecond(SongUNet) with scorelab's sde
  'edm' and models/songunet.py, from the constructor arguments the pickle records (EDM's
  defaults where one was not passed) and ``loss`` (EDMLoss: P_mean, P_std)."""
  model = net.state["_modules"]["model"]
  args = dict(songunet_defaults())
  args.update(model.init_kwargs)
  pre = dict(net.init_kwargs)
  for key in ("label_dim",):
    if int(args.get(key) or 0) or int(pre.get(key) or 0):
      raise ValueError(f"{source}: {key}={args.get(key) or pre.get(key)}: class-conditional EDM "
                       "networks are not supported (scorelab's SongUNet is unconditional)")
  if int(args.get("channel_mult_emb", 4)) != 4:
    raise ValueError(f"{source}: channel_mult_emb={args['channel_mult_emb']}: models/songunet.py "
                     "has the embedding width 4 * nf of every EDM config")
  if args.get("encoder_type") not in _ENCODER or args.get("decoder_type") not in _DECODER:
    raise ValueError(f"{source}: encoder_type={args.get('encoder_type')!r} / decoder_type="
                     f"{args.get('decoder_type')!r} are not SongUNet's")
  filt = tuple(float(v) for v in args["resample_filter"])
  ov: dict[str, Any] = {"model.name": "songunet", "model.parameterization": "edm",
                        "model.input_scaling": False, "model.center_input": False,
                        "model.time_embedding_scale": 1.0, "model.init_scale": 0.0,
                        "model.fourier_scale": 16.0, "model.dtype": "float32",
                        "model.skip_rescale": True, "model.resblock_type": "biggan",
                        "model.progressive_combine": "sum", "model.conditional": True}
  for arg, field in _SIMPLE.items():
    ov[field] = args[arg]
  ov["model.ch_mult"] = tuple(int(m) for m in args["channel_mult"])
  ov["model.attn_resolutions"] = tuple(int(r) for r in args["attn_resolutions"])
  ov["model.progressive_input"] = _ENCODER[args["encoder_type"]]
  ov["model.progressive"] = _DECODER[args["decoder_type"]]
  ov["model.fir"] = filt != (1.0, 1.0)
  ov["model.fir_kernel"] = filt
  ov["data.image_size"] = int(pre.get("img_resolution", net.state.get("img_resolution")))
  ov["data.num_channels"] = int(pre.get("img_channels", net.state.get("img_channels")))
  ov["data.centered"] = True  # EDM's images are in [-1, 1] (sigma_data 0.5)
  ov["sde.name"] = "edm"
  ov["sde.sigma_data"] = float(net.state.get("sigma_data", pre.get("sigma_data", 0.5)))
  for field in ("P_mean", "P_std"):
    if loss is not None and field in loss.state:
      ov[f"sde.{field}"] = float(loss.state[field])
  return ov


def songunet_defaults() -> dict[str, Any]:
  """SongUNet's constructor defaults (EDM networks.py), for arguments a pickle did not record."""
  return dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2),
              channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
              embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
              decoder_type="standard", resample_filter=(1, 1))


def _flax_path(name: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """Our parameter path and layout of EDM state-dict entry ``model.<...>``: enc.<k> / dec.<k> ->
  enc_<k> / dec_<k>; Conv2d weight OIHW -> kernel HWIO, Linear weight (out, in) -> kernel
  (in, out), GroupNorm weight -> scale, bias -> bias, FourierEmbedding freqs -> W."""
  parts = name.split(".")
  if parts[0] != "model":
    raise ValueError(f"tensor {name} is not under EDMPrecond.model")
  parts = parts[1:]
  if parts[0] in ("enc", "dec"):
    parts = [f"{parts[0]}_{parts[1]}"] + parts[2:]
  mods, leaf = parts[:-1], parts[-1]
  if leaf == "freqs":
    return tuple(mods) + ("W",), value
  if leaf == "bias":
    return tuple(mods) + ("bias",), value
  if leaf == "weight" and value.ndim == 4:
    return tuple(mods) + ("kernel",), value.transpose(2, 3, 1, 0)
  if leaf == "weight" and value.ndim == 2:
    return tuple(mods) + ("kernel",), value.T
  if leaf == "weight" and value.ndim == 1:
    return tuple(mods) + ("scale",), value
  return tuple(mods) + (leaf,), value


def _resample_buffer(filt: tuple[float, ...]) -> np.ndarray:
  f = np.asarray(filt, np.float32)
  return (np.outer(f, f) / f.sum() ** 2)[None, None]


def map_state_dict(config, sd: dict[str, np.ndarray], source: str = "pickle") -> Tree:
  """Our params for the network of ``config`` from an EDMPrecond state dict: every tensor lands
  on exactly one param of the same shape and every param is covered, else ValueError naming the
  tensor; the resampling-filter buffers must equal the config's filter."""
  model = get_model(config)
  shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
  target = jax.eval_shape(lambda k: init_model(model, k, shape), jax.random.PRNGKey(0))
  target = {p: tuple(v.shape) for p, v in ssi._leaves(_plain(target))}
  filt = _resample_buffer(tuple(model.resample_filter))
  out: Tree = {}
  done: set = set()
  for name, value in sd.items():
    if name.endswith(".resample_filter"):
      if value.shape != filt.shape or not np.allclose(value, filt, rtol=1e-6, atol=0):
        raise ValueError(f"{source}: buffer {name} {value.tolist()} is not the resampling filter "
                         f"of model.fir / model.fir_kernel ({filt.tolist()})")
      continue
    path, val = _flax_path(name, value)
    if path not in target:
      raise ValueError(f"{source}: tensor {name} {tuple(value.shape)} has no counterpart "
                       f"{'/'.join(path)} in model.name='songunet' of this config")
    if tuple(val.shape) != target[path]:
      raise ValueError(f"{source}: tensor {name} has shape {tuple(value.shape)} -> "
                       f"{tuple(val.shape)}, our {'/'.join(path)} {target[path]}")
    ssi._set(out, path, np.ascontiguousarray(val, np.float32))
    done.add(path)
  missing = sorted("/".join(p) for p in set(target) - done)
  if missing:
    raise ValueError(f"{source}: no tensor for our params {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}")
  return out


def _plain(tree):
  return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _step(path: str) -> int:
  """EDM names snapshots by thousands of training images (network-snapshot-<kimg>.pkl): that
  number, else 1 (a workdir's checkpoint step must be positive)."""
  m = re.fullmatch(r"network-snapshot-(\d+)\.pkl", os.path.basename(path))
  return max(int(m.group(1)), 1) if m else 1


def import_edm_pickle(config, path: str) -> dict[str, Any]:
  """What ``--mode=import --checkpoint=FILE.pkl`` needs from an EDM network pickle: dict(params,
  ema_params (both the pickle's ``ema`` network: EDM snapshots hold no other), step, config,
  config_overrides (dotted fields set from the pickle: ``score_sde_import.apply_overrides`` makes
  the config of the params), source, edm (class names, recorded constructor arguments, sha256 of
  the never-executed module sources, parameter count)). ``config`` is the user's ConfigDict."""
  source = os.path.basename(str(path))
  data = read_edm_pickle(path)
  net = edm_network(data, source)
  loss = data.get("loss_fn") if isinstance(data, dict) else None
  loss = loss if isinstance(loss, PersistentObject) else None
  overrides = edm_config_overrides(net, loss, source)
  if str(config.sde.name).lower() != "edm":  # an EDM noise range for a non-EDM base config
    overrides.update({"sde.sigma_min": 0.002, "sde.eps": 0.002, "sde.sigma_max": 80.0,
                      "sde.T": 80.0, "sde.rho": 7.0})
  new_config = ssi.apply_overrides(config, overrides)
  sd = state_dict(net)
  params = map_state_dict(new_config, sd, source)
  n_params = sum(int(np.prod(sd[n].shape)) for n in _parameter_names(net))
  ours = sum(int(np.prod(v.shape)) for p, v in ssi._leaves(params) if p not in FROZEN)
  assert ours == n_params, (ours, n_params)
  model = net.state["_modules"]["model"]
  info = {"precond": net.class_name, "model": model.class_name,
          "precond_kwargs": _jsonable(net.init_kwargs),
          "model_kwargs": _jsonable(model.init_kwargs),
          "loss": loss.class_name if loss else None, "n_params": n_params,
          "module_src_sha256": sorted({net.module_src_sha256, model.module_src_sha256}),
          "dataset_kwargs": _jsonable(data.get("dataset_kwargs")) if isinstance(data, dict)
          else None}
  return dict(params=params, ema_params=params, step=_step(path), config_overrides=overrides,
              source=f"edm_pickle:{path}", edm=info)


def _jsonable(v):
  if isinstance(v, dict):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)

