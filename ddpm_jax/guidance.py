"""The network as a ``denoise_fn``: unconditional, class-conditional, or with classifier-free guidance.

Every sampler, chain and bound of ddpm_jax takes the network as ``denoise_fn(x_t, t)`` (see
:mod:`ddpm_jax.diffusion`). This module is the one place that builds it from a U-Net and its parameters
(:func:`denoise_fn`) and the one place that checks class labels and guidance weights against a model
(:func:`check_conditioning`, :func:`check_guidance_scale`), so that every command refuses the same mistakes with
the same message before anything compiles.

Classifier-free guidance (Ho & Salimans 2022, :func:`classifier_free_guidance`): a class-conditional U-Net
(``num_classes = K > 0``) trained with label dropout also predicts unconditionally with the null class ``K``;
eps_hat = (1 + w) eps(x_t, c) - w eps(x_t, null) sharpens the class for w > 0.

Example::

  @jax.jit
  def sample(params, key):
    fn = guidance.denoise_fn(model, params, class_label=3, guidance_scale=2.0)
    return sampling.p_sample_loop(schedule, fn, (16, 32, 32, 3), key)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import DenoiseFn


def check_guidance_scale(guidance_scale: Any, *, name: str = 'guidance_scale') -> None:
  """Raises ValueError unless ``guidance_scale`` is a number >= 0 (traced values pass unchecked).

  Args:
    guidance_scale: the weight w.
    name: how the caller's user names it (``'--guidance_scale'``, ``'sample.guidance_scale'``).
  """
  if isinstance(guidance_scale, jax.core.Tracer):
    return
  if isinstance(guidance_scale, bool) or not np.ndim(guidance_scale) == 0:
    raise ValueError(f'{name} must be a number >= 0 (0 = no guidance), got {guidance_scale!r}.')
  if not float(guidance_scale) >= 0:  # also refuses NaN
    raise ValueError(f'{name} must be >= 0 (0 = no guidance), got {guidance_scale!r}.')


def check_conditioning(
  num_classes: int,
  class_label: Any,
  guidance_scale: Any = 0.0,
  *,
  label_name: str = 'class_label',
  scale_name: str = 'guidance_scale',
) -> None:
  """Raises ValueError (before anything compiles) for labels or guidance a model cannot use.

  Args:
    num_classes: the model's ``num_classes`` (0 = unconditional).
    class_label: None for an unconditional model; for a class-conditional one an int or an int array of labels in
      ``0..num_classes`` (``num_classes`` itself is the null class: unconditional samples). Traced labels pass
      unchecked (their values are not known before they run).
    guidance_scale: classifier-free guidance weight, >= 0; nonzero only for a class-conditional model.
    label_name, scale_name: how the caller's user names the two values (``'--class_label'``, ...), for the message.
  """
  check_guidance_scale(guidance_scale, name=scale_name)
  k = int(num_classes)
  if not k:
    if class_label is not None:
      raise ValueError(
        f'{label_name}={class_label!r} given, but this model is unconditional (num_classes=0): labels need a '
        f'class-conditional model; drop {label_name}.'
      )
    if not isinstance(guidance_scale, jax.core.Tracer) and guidance_scale:
      raise ValueError(
        f'{scale_name}={guidance_scale!r} needs a class-conditional model (num_classes > 0; this one has '
        f'num_classes=0): use {scale_name}=0.'
      )
    return
  if class_label is None:
    raise ValueError(
      f'This model is class-conditional (num_classes={k}): pass {label_name} in 0..{k - 1} '
      f'(or {k}, the null class, for unconditional samples).'
    )
  if isinstance(class_label, jax.core.Tracer):
    return
  labels = np.asarray(class_label)
  if labels.dtype.kind not in 'iu' or labels.size == 0 or labels.min() < 0 or labels.max() > k:
    raise ValueError(f'{label_name} must be ints in 0..{k - 1} (or {k}, the null class); got {class_label!r}.')


def classifier_free_guidance(
  model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
  labels: jax.Array,
  *,
  null_label: int,
  guidance_scale: float | jax.Array,
) -> DenoiseFn:
  """A ``denoise_fn`` with classifier-free guidance (Ho & Salimans 2022) for a class-conditional network.

  eps_hat = (1 + w) eps(x_t, c) - w eps(x_t, null). The conditional and unconditional predictions are computed in
  ONE network call on the batch doubled along axis 0. w = 0 is the plain conditional model (then only the
  conditional half is evaluated when ``guidance_scale`` is a Python number); w > 0 strengthens the class. Outputs
  with more channels than the image (a learned variance) are guided on the first C channels only; the variance
  channels are the conditional prediction's. For the x_0 parameterization the same linear combination is applied
  to the predicted x_0, which is equivalent (x_0 is affine in eps at fixed x_t and t).

  Args:
    model_fn: ``model_fn(x_t [B', H, W, C], t [B'], y [B']) -> output [B', H, W, C']``.
    labels: [B] int class labels in 0..K-1 (or ``null_label`` for unconditional samples).
    null_label: the label of the null class the network was trained with (label dropout).
    guidance_scale: w >= 0 (Python number or traced scalar).

  Returns:
    ``denoise_fn(x_t [B, H, W, C], t [B]) -> output [B, H, W, C']``.
  """
  check_guidance_scale(guidance_scale)
  labels = jnp.asarray(labels, jnp.int32)
  if labels.ndim != 1:
    raise ValueError(f'labels must be [B] ints, got shape {labels.shape}.')

  def guided(x_t, t):
    if x_t.shape[0] != labels.shape[0]:
      raise ValueError(f'labels has {labels.shape[0]} entries for a batch of {x_t.shape[0]}.')
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 0:
      return model_fn(x_t, t, labels)
    b, c = x_t.shape[0], x_t.shape[-1]
    out = model_fn(
      jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([labels, jnp.full_like(labels, null_label)])
    )
    cond, uncond = out[:b], out[b:]
    w = jnp.asarray(guidance_scale, out.dtype)
    mixed = (1 + w) * cond[..., :c] - w * uncond[..., :c]
    return jnp.concatenate([mixed, cond[..., c:]], axis=-1) if out.shape[-1] > c else mixed

  return guided


def denoise_fn(model: Any, params: Any, *, class_label: Any = None, guidance_scale: Any = 0.0) -> DenoiseFn:
  """``denoise_fn(x_t, t)`` of a U-Net with ``params`` (evaluation mode: no dropout), conditioned as asked.

  Pass ``params`` as an argument of the function you jit (not a closed-over constant), as in the module example.

  Args:
    model: the U-Net (``model.num_classes`` 0 = unconditional), called as
      ``model.apply({'params': params}, x, t[, y], train=False)``.
    params: its parameters.
    class_label: None for an unconditional model; for a class-conditional one an int, a [B] int array or a traced
      int scalar (broadcast over the batch) in ``0..K``, ``K`` (``model.null_label()``) for unconditional samples.
    guidance_scale: classifier-free guidance weight w >= 0 (class-conditional models only; 0 = none).

  Raises:
    ValueError: labels or guidance the model cannot use (`check_conditioning`).
  """
  num_classes = int(getattr(model, 'num_classes', 0))
  check_conditioning(num_classes, class_label, guidance_scale)
  if not num_classes:
    return lambda x_t, t: model.apply({'params': params}, x_t, t, train=False)
  model_fn = lambda x_t, t, y: model.apply({'params': params}, x_t, t, y, train=False)

  def conditioned(x_t, t):
    labels = jnp.broadcast_to(jnp.asarray(class_label, jnp.int32), (x_t.shape[0],))
    return classifier_free_guidance(model_fn, labels, null_label=num_classes, guidance_scale=guidance_scale)(x_t, t)

  return conditioned
