"""FIR up/down-sampling of NHWC images (upfirdn2d), as used by NCSN++.

Song et al. 2021 ("Score-Based Generative Modeling through SDEs", Appendix H.1) resample with the
finite-impulse-response filter of StyleGAN2 (Karras et al. 2020, Appendix B): ``upfirdn2d`` =
zero-insertion by ``up``, zero padding, convolution with a separable kernel, decimation by ``down``.
With the 1-D kernel [1, 3, 3, 1] upsampling by 2 is bilinear interpolation (half-pixel centres) and
downsampling by 2 is the antialiased linear (tent) filter, both with zero padding at the border.
All functions are pure and jit/vmap/grad-safe; the kernel is a static Python sequence.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def make_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
  """2-D FIR kernel normalized to sum 1; a 1-D kernel k becomes the separable outer(k, k)."""
  k = np.asarray(k, dtype=np.float64)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
  return k / k.sum()


def upfirdn2d(x: Array, kernel: np.ndarray, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> Array:
  """Upsample (zero insertion), pad, FIR-filter (true convolution) and downsample, per channel.

  x: (B, H, W, C); kernel: 2-D array (kh, kw). Output height is
  (H * up + pad[0] + pad[1] - kh) // down + 1 (same for width).
  """
  b, h, w, c = x.shape
  if up > 1:
    x = x.reshape(b, h, 1, w, 1, c)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, up - 1), (0, 0), (0, up - 1), (0, 0)))
    x = x.reshape(b, h * up, w * up, c)
  p0, p1 = pad
  x = jnp.pad(x, ((0, 0), (p0, p1), (p0, p1), (0, 0)))
  # Flip: a true convolution, not a correlation.
  k = jnp.asarray(np.asarray(kernel)[::-1, ::-1], dtype=x.dtype)
  rhs = jnp.tile(k[:, :, None, None], (1, 1, 1, c))  # HWIO with one input feature per group
  return jax.lax.conv_general_dilated(
      x, rhs, window_strides=(down, down), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def upsample_2d(x: Array, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2,
                gain: float = 1.0) -> Array:
  """FIR upsampling by ``factor``: (B, H, W, C) -> (B, factor H, factor W, C).

  The kernel is scaled by gain * factor^2 so that a constant image stays constant away from the
  border (zero insertion keeps only 1/factor^2 of the samples)."""
  k = make_kernel(kernel) * (gain * factor**2)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2,
                  gain: float = 1.0) -> Array:
  """FIR downsampling by ``factor``: (B, H, W, C) -> (B, H // factor, W // factor, C)."""
  k = make_kernel(kernel) * gain
  p = k.shape[0] - factor
  return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling (each pixel repeated factor x factor times)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
  """Average pooling over non-overlapping factor x factor blocks."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  return jnp.mean(x, axis=(2, 4))
