"""MLP score network for low-dimensional (toy) data.

Input ``x`` of shape (B, D) and the noise conditioning ``cond`` of shape (B,) (``sde.noise_conditioning(t)``:
t for VP/sub-VP, log sigma(t) for VE). The conditioning enters either as a time embedding added to
every hidden layer (Gaussian Fourier features, Tancik et al. 2020 / Song et al. 2021 Appendix H.1;
or DDPM sinusoidal features, Ho et al. 2020) or, as in the ODE-vs-SDE paper's Swiss-roll network
(Cao et al., Appendix H: widths 50, 50, ReLU), concatenated to the input (``embedding='concat'``).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import register_model
from models.layers import GaussianFourierProjection, sinusoidal_embedding

Array = jax.Array

_ACTIVATIONS = {
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "softplus": nn.softplus,
}
ACTIVATIONS = tuple(sorted(_ACTIVATIONS))  # model.activation
EMBEDDINGS = ("fourier", "sinusoidal", "concat")  # model.embedding


def get_activation(name: str):
  """Activation by name; ValueError naming ``model.activation`` otherwise."""
  if name.lower() not in _ACTIVATIONS:
    raise ValueError(f"model.activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
  return _ACTIVATIONS[name.lower()]


@register_model("mlp")
class MLPScore(nn.Module):
  """Fully connected score network: output has the input's shape (B, D).

  With a Fourier/sinusoidal embedding, each hidden layer is ``act(Dense(h) + Dense(temb))``; with
  ``embedding='concat'`` the raw conditioning is appended to x and the net is a plain MLP.
  """
  widths: Sequence[int] = (128, 128, 128)
  activation: str = "silu"
  embedding: str = "fourier"
  embedding_dim: int = 32
  fourier_scale: float = 16.0
  dropout: float = 0.0

  @classmethod
  def from_config(cls, config) -> "MLPScore":
    m = config.model
    get_activation(m.activation)  # fail early naming the field
    if m.embedding not in EMBEDDINGS:
      raise ValueError(f"model.embedding must be one of {EMBEDDINGS}, got {m.embedding!r}")
    widths = tuple(int(w) for w in m.widths)
    if not widths or min(widths) < 1:
      raise ValueError(f"model.widths must be non-empty positive ints, got {widths}")
    return cls(widths=widths, activation=m.activation, embedding=m.embedding,
               embedding_dim=int(m.embedding_dim), fourier_scale=float(m.fourier_scale),
               dropout=float(m.dropout))

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool = False) -> Array:
    act = get_activation(self.activation)
    d = x.shape[-1]
    cond = jnp.broadcast_to(jnp.asarray(cond, x.dtype), x.shape[:1])
    if self.embedding == "concat":
      h, temb = jnp.concatenate([x, cond[:, None]], axis=-1), None
    else:
      if self.embedding == "fourier":
        temb = GaussianFourierProjection(self.embedding_dim // 2, self.fourier_scale)(cond)
      elif self.embedding == "sinusoidal":
        temb = sinusoidal_embedding(cond, self.embedding_dim)
      else:
        raise ValueError(f"model.embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
      temb = act(nn.Dense(4 * self.embedding_dim)(temb.astype(x.dtype)))
      h = x
    for w in self.widths:
      h = nn.Dense(w)(h)
      if temb is not None:
        h = h + nn.Dense(w)(temb)
      h = act(h)
      if self.dropout > 0:
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(d)(h)
