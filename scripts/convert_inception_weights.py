"""Converts pytorch-fid's FID Inception weights into scorelab's .npz layout (see docs/fid.md).

Input: ``pt_inception-2015-12-05-6726825d.pth`` (a torch state dict; needs ``torch``), or an .npz of
the same state dict exported on a machine with torch:

    import numpy as np, torch
    sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
    np.savez("pt_inception_state_dict.npz", **{k: v.numpy() for k, v in sd.items()})

Output: an .npz keyed by flax path (``params/Mixed_5b/branch1x1/conv/kernel``, ...) that
``evaluation.load_inception_params`` reads. Renaming: ``X.conv.weight`` -> ``params/X/conv/kernel``
(OIHW -> HWIO), ``X.bn.{weight,bias}`` -> ``params/X/bn/{scale,bias}``,
``X.bn.running_{mean,var}`` -> ``batch_stats/X/bn/{mean,var}``, ``fc.weight`` -> ``params/fc/kernel``
(transposed), ``fc.bias`` -> ``params/fc/bias``; dots in ``X`` become slashes. ``num_batches_tracked``
and torchvision's ``AuxLogits.*`` (absent from the FID file) are dropped.

Usage: python scripts/convert_inception_weights.py --input pt_inception-....pth --output inception_fid.npz
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluation  # noqa: E402  (repository root on the path when run as a script)

_BN_TORCH_TO_FLAX = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                     "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BN_FLAX_TO_TORCH = {v: k for k, v in _BN_TORCH_TO_FLAX.items()}


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
  """Reads a torch ``.pth`` (needs torch) or an ``.npz`` export of the state dict."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"input weights {path!r} not found (see docs/fid.md)")
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs torch; or export the state dict to .npz with the "
                      "snippet in this script's docstring / docs/fid.md") from e
  sd = torch.load(path, map_location="cpu")
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="pytorch-fid .pth or its .npz export")
  parser.add_argument("--output", required=True, help="converted .npz for config.eval.inception_weights")
  args = parser.parse_args(argv)
  flat = convert_state_dict(read_state_dict(args.input), args.input)
  with open(args.output, "wb") as f:
    np.savez(f, **flat)
  n = sum(v.size for k, v in flat.items() if k.startswith("params/"))
  print(f"wrote {args.output}: {len(flat)} arrays, {n:,} parameters")


if __name__ == "__main__":
  main()
