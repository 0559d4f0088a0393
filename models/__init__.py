"""Score-network registry.

A model module registers itself with ``@register_model("name")`` on a class (or factory) that
has a ``from_config(config) -> nn.Module`` classmethod, or is itself callable as
``builder(config) -> nn.Module``. ``get_model(config)`` builds ``config.model.name``.
To add a model: decorate it in its module and add one import line at the bottom of this file.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

import parallel  # noqa: F401  (process-wide XLA options and compilation cache: parallel.py)

_MODELS: dict[str, Any] = {}


def register_model(name: str) -> Callable[[Any], Any]:
  """Decorator registering a model class (with ``from_config``) or factory under ``name``."""
  key = name.lower()

  def decorator(obj):
    if key in _MODELS and _MODELS[key] is not obj:
      raise ValueError(f"model name {name!r} registered twice")
    _MODELS[key] = obj
    return obj

  return decorator


def registered_models() -> list[str]:
  """Sorted names accepted by ``config.model.name``."""
  return sorted(_MODELS)


def get_model(config) -> nn.Module:
  """Builds the score network named by ``config.model.name``; ValueError names unknown models."""
  name = str(config.model.name).lower()
  if name not in _MODELS:
    raise ValueError(f"model.name must be one of {registered_models()}, got {config.model.name!r}")
  obj = _MODELS[name]
  builder = getattr(obj, "from_config", obj)
  return builder(config)


# Model modules (each registers itself on import). One line per model family.
from models import mlp  # noqa: E402,F401
from models import ncsnpp, ddpmpp, unet  # noqa: E402,F401  (image networks)
from models import songunet  # noqa: E402,F401  (EDM's DDPM++ / NCSN++, edm_pickle.py)
