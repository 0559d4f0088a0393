"""``pytrees.dataclass``: ``flax.struct.dataclass`` whose tree structure names its class.

Why: in the JAX this project pins (0.10.2), two ``PyTreeDef`` of registered dataclasses compare
equal when their classes differ but their meta data and child counts match (for example
``VPSDE()`` and ``subVPSDE()``, ``VESDE()`` too: four leaves each; ``GaussianMixture`` and
``auxiliary.MixturePrior``). Their hashes differ, so a jit cache confuses them only when the two
keys share a hash bucket: at random, once in a few processes, a function jitted on a sub-VP SDE ran
the executable traced for a VP SDE (found as ``tests/test_toy_data.py::test_float32_small_t``
failing in ~1 of 5 runs with log p off by 2e-4..2e-3 nats: the VP noise level sqrt(1 - e^{-B})
instead of sub-VP's 1 - e^{-B}). A static ``pytree_class`` field (the class's qualified name)
makes every class's tree structure distinct; ``tests/test_pytrees.py`` checks it for every
dataclass the project passes through jit.
"""
from __future__ import annotations

from flax import struct


def dataclass(cls):
  """``flax.struct.dataclass(cls)`` plus a static, keyword-only field ``pytree_class`` holding
  ``module.QualifiedName`` (not a leaf: it lives in the tree structure, never in checkpoints)."""
  tag = f"{cls.__module__}.{cls.__qualname__}"
  cls.__annotations__ = {**cls.__dict__.get("__annotations__", {}), "pytree_class": "str"}
  cls.pytree_class = struct.field(pytree_node=False, default=tag, repr=False, kw_only=True)
  return struct.dataclass(cls)
