"""The parameter tree a U-Net expects, which the format readers match a file's tensors against.

Flat views of the tree are ``{('down_0', 'block_0', 'conv1', 'kernel'): leaf}`` dicts
(``flax.traverse_util.flatten_dict``); the formats map each such path to their own tensor names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddpm_jax.models.unet import UNet


def abstract_params(model: UNet, image_size: int, in_channels: int = 3) -> dict:
  """The parameter tree ``model`` expects, as ``jax.ShapeDtypeStruct`` leaves (builds nothing).

  Args:
    model: the U-Net (class-conditional ones included).
    image_size: square image side (where attention sits depends on it only through the model's fields).
    in_channels: image channels.
  """
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  y = (jax.ShapeDtypeStruct((1,), jnp.int32),) if model.num_classes else ()
  variables = jax.eval_shape(lambda x, t, *y: model.init(jax.random.key(0), x, t, *y, train=False), x, t, *y)
  return dict(variables['params'])


def format_list(items: list[str], limit: int = 12) -> str:
  """``'a, b, c'``, cut after ``limit`` items with a count of the rest (for error messages)."""
  shown = ', '.join(items[:limit])
  return shown + (f', ... ({len(items) - limit} more)' if len(items) > limit else '')
