"""The modes of ``main.py --mode=NAME``: each registers itself from its own file.

A mode is ``fn(config, workdir) -> report`` decorated with ``@register_mode('name')``; adding one
is one new file here plus its name in ``_MODULES``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

Mode = Callable[[Any, str], Any]
_MODES: dict[str, Mode] = {}
_MODULES = ("train", "evaluate", "sample", "fid_stats", "import_checkpoint", "fit_prior",
            "fit_dequantizer", "train_classifier")


def register_mode(name: str) -> Callable[[Mode], Mode]:
  def wrap(fn: Mode) -> Mode:
    if name in _MODES:
      raise ValueError(f"mode {name!r} registered twice")
    _MODES[name] = fn
    return fn
  return wrap


def _load_all() -> None:
  for m in _MODULES:
    importlib.import_module(f"modes.{m}")


def registered_modes() -> tuple[str, ...]:
  _load_all()
  return tuple(sorted(_MODES))


def get_mode(name: str) -> Mode:
  _load_all()
  if name not in _MODES:
    raise ValueError(f"--mode={name!r}: unknown mode (one of {sorted(_MODES)})")
  return _MODES[name]
