"""The FID Inception-v3 weights: pytorch-fid's published state dict (the TF ``inception-2015-12-05``
graph ported to torch) fetched once into a cache folder, checked against its published checksum
and converted to ``evaluation``'s ``.npz`` layout (docs/fid.md).

``resolve_inception_weights(path, cache_dir)`` is what eval and fid_stats call: an explicit
``eval.inception_weights`` file is used as it is; with ``''`` the converted file in the cache is used,
and made on first use (download, sha256 check, conversion) when the machine has network and
``data.download`` is True (process 0 downloads, the others wait). The ``.pth`` is read without
torch, by ``score_sde_import``'s restricted unpickler (``read_torch_checkpoint`` for a zip archive,
``read_torch_legacy`` for the legacy stream): it runs nothing from the file. Offline, the error
names the file, the cache path and the one command that prepares it on another machine.

Key mapping (torch -> flax path): ``X.conv.weight`` -> ``params/X/conv/kernel`` (OIHW -> HWIO),
``X.bn.{weight,bias}`` -> ``params/X/bn/{scale,bias}``, ``X.bn.running_{mean,var}`` ->
``batch_stats/X/bn/{mean,var}``, ``fc.weight`` -> ``params/fc/kernel`` (transposed), ``fc.bias`` ->
``params/fc/bias``; dots in ``X`` become slashes; ``num_batches_tracked`` and ``AuxLogits.*`` dropped.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Mapping, Optional

import numpy as np

import downloads
import evaluation
from progress import Progress

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# torch.hub convention: the 8 hex digits in the file name are the start of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
CONVERTED_NAME = "inception_fid.npz"
PREPARE_COMMAND = ("python scripts/convert_inception_weights.py --download "
                   f"--output {CONVERTED_NAME}")

_BN_TORCH_TO_FLAX = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                     "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BN_FLAX_TO_TORCH = {v: k for k, v in _BN_TORCH_TO_FLAX.items()}


# -- conversion -------------------------------------------------------------------------------------
def torch_key_to_flax(key: str) -> tuple[str, tuple[int, ...] | None] | None:
  """Maps one torch state-dict key to ``(flax path, transpose axes or None)``; None = drop it."""
  parts = key.split(".")
  if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
    return None
  if len(parts) < 2:
    raise KeyError(f"unexpected state-dict key {key!r}")
  prefix, parent, leaf = parts[:-2], parts[-2], parts[-1]
  if parent == "conv" and leaf == "weight":
    return "/".join(["params", *prefix, "conv", "kernel"]), (2, 3, 1, 0)
  if parent == "bn" and leaf in _BN_TORCH_TO_FLAX:
    collection, name = _BN_TORCH_TO_FLAX[leaf]
    return "/".join([collection, *prefix, "bn", name]), None
  if parts == ["fc", "weight"]:
    return "params/fc/kernel", (1, 0)
  if parts == ["fc", "bias"]:
    return "params/fc/bias", None
  raise KeyError(f"unexpected state-dict key {key!r}")


def flax_key_to_torch(path: str) -> tuple[str, tuple[int, ...] | None]:
  """Inverse of :func:`torch_key_to_flax`: ``(torch key, transpose axes or None)``."""
  parts = path.split("/")
  collection, prefix, leaf = parts[0], parts[1:-1], parts[-1]
  if prefix == ["fc"]:
    return ("fc.weight", (1, 0)) if leaf == "kernel" else ("fc.bias", None)
  if prefix[-1] == "conv" and leaf == "kernel":
    return ".".join([*prefix, "weight"]), (3, 2, 0, 1)
  if prefix[-1] == "bn":
    return ".".join([*prefix, _BN_FLAX_TO_TORCH[(collection, leaf)]]), None
  raise KeyError(f"unexpected flax path {path!r}")


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       source: str = "<state dict>") -> dict[str, np.ndarray]:
  """torch-layout FID Inception state dict -> flat flax-path dict (float32), checked against the model."""
  flat = {}
  for key, value in state_dict.items():
    mapped = torch_key_to_flax(key)
    if mapped is None:
      continue
    path, axes = mapped
    arr = np.asarray(value, np.float32)
    flat[path] = np.ascontiguousarray(arr.transpose(axes) if axes is not None else arr)
  evaluation.check_inception_variables(flat, source)
  return flat


def export_state_dict(variables: evaluation.Variables) -> dict[str, np.ndarray]:
  """Flax variables -> torch-layout state dict (numpy): the exact inverse of the conversion."""
  out = {}
  for path, value in evaluation.flatten_variables(variables).items():
    key, axes = flax_key_to_torch(path)
    out[key] = np.ascontiguousarray(value.transpose(axes) if axes is not None else value)
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch ``.pth`` state dict without torch: a ``torch.save`` zip archive (torch >= 1.6)
  or a legacy stream, through ``score_sde_import``'s allow-listed unpickler (tensors, storages,
  OrderedDict; anything else is refused by name, nothing in the file runs). An ``.npz`` of the
  same arrays is read as it is."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"input weights {path!r} not found (see docs/fid.md)")
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  import score_sde_import
  if zipfile.is_zipfile(path):
    sd = score_sde_import.read_torch_checkpoint(path)
  else:
    with open(path, "rb") as f:
      sd = score_sde_import.read_torch_legacy(f.read())
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                     f"{type(sd).__name__}")
  return {str(k): np.asarray(v) for k, v in sd.items()}


def save_converted(flat: Mapping[str, np.ndarray], path: str) -> None:
  """Writes the converted arrays atomically (a temporary file renamed into place)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npz.part", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# -- fetching ---------------------------------------------------------------------------------------
def default_cache_dir() -> str:
  """scorelab's cache folder (``downloads.cache_dir``)."""
  return downloads.cache_dir()


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _offline_message(target: str, url: str, reason: str) -> str:
  return (f"FID Inception weights: {target} does not exist and {url} was not downloaded: "
          f"{reason}. With network, leave data.download=True (the default) to fetch it on first "
          f"use. Offline, run `{PREPARE_COMMAND}` on a machine with network and copy the file to "
          f"{target} (or set --config.eval.inception_weights=FILE).")


def _download(url: str, path: str, timeout_s: float) -> None:
  """Streams ``url`` to ``path``; every blocking read waits at most ``timeout_s`` seconds."""
  with urllib.request.urlopen(url, timeout=timeout_s) as response, open(path, "wb") as f:
    shutil.copyfileobj(response, f, 1 << 20)


def fetch_inception_weights(cache_dir: str, url: str = FID_WEIGHTS_URL,
                            sha256_prefix: str = FID_WEIGHTS_SHA256_PREFIX,
                            timeout_s: float | None = None) -> str:
  """Downloads ``url`` into ``cache_dir``, checks that its sha256 starts with ``sha256_prefix``,
  converts it and writes ``cache_dir/inception_fid.npz`` (the download is deleted afterwards).
  Returns the converted path. Offline (a network probe, then the download, each bounded by
  ``timeout_s`` seconds): FileNotFoundError naming the URL, the cache path, ``data.download`` and
  ``PREPARE_COMMAND``; a checksum mismatch: ValueError, nothing kept."""
  target = os.path.join(cache_dir, CONVERTED_NAME)
  timeout_s = downloads.PROBE_TIMEOUT_S if timeout_s is None else float(timeout_s)
  reason = downloads.unreachable(url, timeout_s)
  if reason is not None:
    raise FileNotFoundError(_offline_message(target, url, f"no network ({reason})"))
  os.makedirs(cache_dir, exist_ok=True)
  name = os.path.basename(url.split("?")[0])
  download = os.path.join(cache_dir, name + ".part")
  try:
    with Progress(f"download FID Inception weights ({url})", 1, "files") as progress:
      try:
        _download(url, download, timeout_s)
      except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(_offline_message(target, url, f"the download failed ({e})")) from e
      progress.update(1)
    digest = sha256_of(download)
    if not digest.startswith(sha256_prefix):
      raise ValueError(f"FID Inception weights downloaded from {url}: sha256 {digest} does not "
                       f"start with the published {sha256_prefix}; the file was discarded")
    local = download[:-len(".part")]
    os.replace(download, local)
    try:
      save_converted(convert_state_dict(read_state_dict(local), url), target)
    finally:
      os.remove(local)
  finally:
    if os.path.exists(download):
      os.remove(download)
  return target


def resolve_inception_weights(path: str, cache_dir: Optional[str] = None, download: bool = True,
                              **fetch_kwargs) -> str:
  """The converted weights file eval / fid_stats load: ``path`` (``eval.inception_weights``) when
  set (it must exist), else ``<cache>/inception_fid.npz``, fetched and converted on first use when
  ``download`` (``data.download``; by process 0, the others wait: every process calls this)."""
  if path:
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"eval.inception_weights={path!r} not found; leave it '' to fetch the standard FID "
          f"weights into the cache, or run `{PREPARE_COMMAND}` (docs/fid.md)")
    return path
  cache_dir = cache_dir or default_cache_dir()
  target = os.path.join(cache_dir, CONVERTED_NAME)
  if not download:
    if os.path.exists(target):
      return target
    raise FileNotFoundError(_offline_message(
        target, fetch_kwargs.get("url", FID_WEIGHTS_URL), "data.download=False"))
  downloads.once_per_run(
      lambda: None if os.path.exists(target) else fetch_inception_weights(cache_dir, **fetch_kwargs),
      "FID Inception weights")
  if not os.path.exists(target):  # a process that does not see process 0's cache folder
    raise FileNotFoundError(_offline_message(
        target, fetch_kwargs.get("url", FID_WEIGHTS_URL), "process 0 fetched it into a cache "
        "this process does not see; set $SCORELAB_CACHE to a folder every host shares"))
  return target
