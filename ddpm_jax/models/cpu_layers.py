"""The U-Net's CPU layers (``UNet(layers='cpu')``): GroupNorm, Dense (the TF original's ``nin``), attention,
dropout and the upsampling convolution, written for XLA:CPU.

`ddpm_jax.models.unet` uses these only when a model is built with ``layers='cpu'``, which the commands choose when
they compute on XLA:CPU (`ddpm_jax.cpu_tuning.model_layers`); every other model uses the plain Flax layers (the
``'reference'`` implementation). Both have the same parameter tree. Why each layer here is faster on the CPU, with
the measurements and their commands, is in BENCHMARKS.md.

GroupNorm, Dense and attention compute exactly what the plain formulas compute (Flax's
``GroupNorm(use_fast_variance=False)``, ``Dense``, softmax attention) and keep Flax's parameter names, so
parameter trees and checkpoints do not change. Their backward passes are written by hand (``jax.custom_vjp``),
because what ``jax.grad`` of the plain formulas hands to XLA runs slowly on XLA:CPU (the gradients are tested
against ``jax.grad`` of the plain formulas in ``tests/test_layers.py``). A consequence: these layers support
reverse-mode differentiation only; ``jax.jvp`` / ``jax.jacfwd`` through them raise ``TypeError`` (use the
reference layers for forward mode).

* **GroupNorm** (NHWC; per example and group of ``C / G`` channels ``y = (x - mean) / sqrt(var + eps) * scale
  + bias``, two-pass variance ``mean((x - mean)**2)`` like ``tf.nn.moments``, statistics in float32).
  Autodiff reduces over ``[B, H, W, G, C/G]`` views several times; here the reductions run over the spatial
  axes only, to per-channel sums ``[B, C]``, and group sums come from those small arrays. Forward: two
  reductions and one multiply-add ``y = x * a[b, c] + d[b, c]``; backward: one pass for the per-channel sums
  of ``dy`` and ``dy * x`` and one multiply-add ``dx = dy * p[b, c] + x * q[b, c] + r[b, c]``.
* **Dense** over the last axis. Autodiff's kernel gradient contracts ``x`` and ``dy`` over their leading axes
  in an operand order for which XLA:CPU first transposes the whole activation gradient; here it is computed
  as ``(dy^T x)^T``, which XLA runs without copying either operand.
* **Dropout** (not exact: a deviation written down in the README) draws 16 random bits per element instead of
  Flax's 32 (two elements per 32-bit threefry word), which halves the cost of generating the masks. The drop
  probability is therefore a multiple of 1/65536: 0.1 becomes 6554/65536 = 0.100006 (kept values are scaled by
  1 / (1 - that), so the expectation is exact).
* **Attention** ``softmax(q k^T / sqrt(C)) v`` over ``[B, N, C]`` (logits and softmax in float32): the
  backward pass is written as six batched matrix products (autodiff's made XLA:CPU copy-transpose
  activations first) and reuses the saved softmax. Undifferentiated calls (sampling) normalize the softmax after
  the second product instead, which saves a pass over the weights.
* **Upsampling convolution** (nearest x2, then 3x3): computed as four 2x2 convolutions of the half-resolution
  input, one per output phase, with the kernel taps that read the same input pixel summed: 2.25x fewer
  multiply-adds, no upsampled copy, and the same parameters as ``flax.linen.Conv``.

**Tree reductions.** With ``tree_reductions=True`` (GroupNorm, attention) the GroupNorm sums and the softmax's row
max and sum are computed as trees of halvings (`_tree_reduce`) instead of plain reductions: faster where XLA:CPU
runs reductions on its own kernels (without YNNPACK's reductions, sample.py's XLA:CPU setting), the same result
up to float32 rounding. It is an argument, set when the model is built (``UNet.cpu_tree_reductions``, from
`ddpm_jax.cpu_tuning.model_layers`), never read from the environment while tracing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

__all__ = [
  'GroupNorm',
  'group_norm',
  'Dense',
  'dense',
  'UpsampleConv',
  'upsample_conv3x3',
  'attention',
  'Dropout',
  'dropout',
]


def _group_sum(s: jax.Array, groups: int) -> jax.Array:
  """[B, C] -> [B, G]: sums over the channels of each group."""
  b, c = s.shape
  return s.reshape(b, groups, c // groups).sum(-1)


def _per_channel(g: jax.Array, c: int) -> jax.Array:
  """[B, G] -> [B, C]: each group's value repeated over its channels."""
  b, groups = g.shape
  return jnp.repeat(g, c // groups, axis=1)


def _tree_reduce(a: jax.Array, axis: int, op: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Reduces ``axis`` to size 1 as a pairwise tree of element-wise ``op``s of slices (log2 n halvings).

  XLA:CPU's own reduction kernels are slow for the reductions of this model (the GroupNorm statistics, the
  softmax's row max and sum); the same reduction as halvings, which XLA fuses into vectorized element-wise
  loops, is faster there (`_reduce`; BENCHMARKS.md). For ``add`` it is pairwise summation.
  """
  while a.shape[axis] > 1:
    n = a.shape[axis]
    h = n // 2
    r = op(jax.lax.slice_in_dim(a, 0, h, axis=axis), jax.lax.slice_in_dim(a, h, 2 * h, axis=axis))
    a = jnp.concatenate([r, jax.lax.slice_in_dim(a, 2 * h, n, axis=axis)], axis=axis) if n % 2 else r
  return a


# The plain reduction for each `_tree_reduce` op.
_PLAIN_REDUCTION = {jnp.add: jnp.sum, jnp.maximum: jnp.max}


def _reduce(a: jax.Array, axis: int, op: Callable[[jax.Array, jax.Array], jax.Array], tree: bool) -> jax.Array:
  """``a`` reduced over ``axis`` with ``op`` (``jnp.add`` or ``jnp.maximum``), the axis kept with size 1.

  As a tree of halvings (`_tree_reduce`) if ``tree`` (faster with XLA:CPU's own reduction kernels, BENCHMARKS.md),
  else a plain reduction. The same result up to float32 rounding.
  """
  if tree:
    return _tree_reduce(a, axis, op)
  return _PLAIN_REDUCTION[op](a, axis=axis, keepdims=True)


def _sum_hw(x: jax.Array, tree: bool) -> jax.Array:
  """[B, H, W, C] -> [B, C]: per-channel sums over the image (`_reduce`)."""
  b, h, w, c = x.shape
  return _reduce(x.reshape(b, h * w, c), 1, jnp.add, tree)[:, 0]


def _stats(x: jax.Array, groups: int, eps: float, tree: bool):
  """Mean and 1/sqrt(var + eps) per (example, group), each [B, G], with the two-pass variance."""
  b, h, w, c = x.shape
  n = h * w * (c // groups)
  mean = _group_sum(_sum_hw(x, tree), groups) / n
  centered = x - _per_channel(mean, c)[:, None, None, :]
  var = _group_sum(_sum_hw(jnp.square(centered), tree), groups) / n
  return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float, tree: bool) -> jax.Array:
  return _group_norm_fwd(x, scale, bias, groups, eps, tree)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, tree):
  c = x.shape[-1]
  mean, rstd = _stats(x, groups, eps, tree)
  a = _per_channel(rstd, c) * scale  # [B, C]
  d = bias - _per_channel(mean, c) * a
  y = x * a[:, None, None, :] + d[:, None, None, :]
  return y, (x, scale, mean, rstd)


def _group_norm_bwd(groups, eps, tree, res, dy):
  del eps
  x, scale, mean, rstd = res
  b, h, w, c = x.shape
  n = h * w * (c // groups)
  sum_dy = _sum_hw(dy, tree)  # [B, C]
  sum_dy_x = _sum_hw(dy * x, tree)  # [B, C]
  mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
  # sum over H, W of dy * xhat, with xhat = (x - mean) * rstd.
  sum_dy_xhat = rstd_c * (sum_dy_x - mean_c * sum_dy)  # [B, C]
  dscale = jnp.sum(sum_dy_xhat, axis=0)
  dbias = jnp.sum(sum_dy, axis=0)
  # With g = dy * scale (the gradient w.r.t. xhat) and group means over (H, W, C/G):
  #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
  mean_g = _per_channel(_group_sum(sum_dy * scale, groups), c) / n  # [B, C]
  mean_g_xhat = _per_channel(_group_sum(sum_dy_xhat * scale, groups), c) / n
  p = rstd_c * scale
  q = -rstd_c * rstd_c * mean_g_xhat
  r = rstd_c * (mean_c * rstd_c * mean_g_xhat - mean_g)
  dx = dy * p[:, None, None, :] + x * q[:, None, None, :] + r[:, None, None, :]
  return dx, dscale, dbias


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  *,
  num_groups: int,
  eps: float = 1e-6,
  tree_reductions: bool = False,
) -> jax.Array:
  """Functional GroupNorm of NHWC ``x`` (float32), ``scale`` and ``bias`` of shape ``[C]``; returns ``x``'s shape.

  ``tree_reductions``: sum over the image as trees of halvings (see the module docstring).

  Raises:
    ValueError: if ``x`` is not 4-D or its channels are not divisible by ``num_groups``.
  """
  if x.ndim != 4:
    raise ValueError(f'group_norm expects NHWC input, got shape {x.shape}.')
  if num_groups <= 0 or x.shape[-1] % num_groups:
    raise ValueError(f'group_norm: {x.shape[-1]} channels are not divisible by num_groups={num_groups}.')
  return _group_norm(x, scale, bias, num_groups, float(eps), bool(tree_reductions))


class GroupNorm(nn.Module):
  """Linen GroupNorm over the last axis of NHWC input, statistics and output in float32.

  Attributes:
    num_groups: number of channel groups (divides C).
    epsilon: added to the variance.
    param_dtype: dtype of ``scale`` (init 1) and ``bias`` (init 0).
    tree_reductions: sums over the image as trees of halvings (see the module docstring).
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  param_dtype: Any = jnp.float32
  tree_reductions: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    return group_norm(
      x.astype(jnp.float32),
      scale.astype(jnp.float32),
      bias.astype(jnp.float32),
      num_groups=self.num_groups,
      eps=self.epsilon,
      tree_reductions=self.tree_reductions,
    )


# ----------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """``x @ kernel + bias`` over the last axis of ``x`` (any leading shape); kernel ``[in, out]``."""
  return jnp.dot(x, kernel) + bias


def _dense_fwd(x, kernel, bias):
  return dense(x, kernel, bias), (x, kernel)


def _dense_bwd(res, dy):
  x, kernel = res
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  dkernel = jax.lax.dot_general(dy2, x2, (((0,), (0,)), ((), ()))).T  # (dy^T x)^T, [in, out]
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype), jnp.sum(dy2, axis=0).astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class _KernelBias(nn.Module):
  """A layer with Flax's ``kernel`` and ``bias`` parameters (names, shapes, initializers, dtype casts).

  Subclasses give the kernel shape for an input and the function of ``(x, kernel, bias)`` it computes; ``x`` and
  ``bias`` arrive in ``dtype``, the kernel in ``param_dtype`` (each subclass casts it where it should).

  Attributes:
    features: output size.
    kernel_init, bias_init: initializers.
    dtype: computation dtype (inputs and parameters are cast to it).
    param_dtype: parameter dtype.
  """

  features: int
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _kernel_shape(self, x: jax.Array) -> tuple[int, ...]:
    raise NotImplementedError

  def _fn(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, self._kernel_shape(x), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    return self._fn(x.astype(self.dtype), kernel, bias.astype(self.dtype))


class Dense(_KernelBias):
  """``flax.linen.Dense`` (same parameters ``kernel [in, out]`` and ``bias [out]``) built on `dense`.

  Attributes: those of `_KernelBias` (``features``, ``kernel_init``, ``bias_init``, ``dtype``, ``param_dtype``).
  """

  def _kernel_shape(self, x):
    return (x.shape[-1], self.features)

  def _fn(self, x, kernel, bias):
    return dense(x, kernel.astype(self.dtype), bias)


# ----------------------------------------------------------------------------
# Upsampling convolution
# ----------------------------------------------------------------------------


def _phase_taps(w: jax.Array, phase: int, axis: int) -> jax.Array:
  """Folds the 3 taps along ``axis`` into the 2 taps that one output phase of a x2 nearest upsample sees.

  Output row ``2i + phase`` of ``conv3x3(upsample(x))`` reads upsampled rows ``2i + phase - 1 .. 2i + phase + 1``,
  which are input rows ``i - 1, i, i`` (phase 0) or ``i, i, i + 1`` (phase 1).
  """
  t0, t1, t2 = (jax.lax.index_in_dim(w, i, axis, keepdims=False) for i in range(3))
  return jnp.stack((t0, t1 + t2) if phase == 0 else (t0 + t1, t2), axis=axis)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """``conv3x3(nearest_upsample_x2(x), kernel) + bias`` ('SAME' zero padding, NHWC, kernel HWIO ``[3, 3, I, O]``).

  Computed without upsampling: each of the four output phases ``(a, b)`` (output pixel ``(2i + a, 2j + b)``)
  is a 2x2 convolution of the zero-padded input with the kernel taps that land on the same input pixel summed
  (`_phase_taps`). That is 16 instead of 36 multiply-adds per input pixel and channel pair (2.25x fewer), and
  the upsampled input is never written. The sums of taps are formed in the kernel's dtype; results equal the
  direct computation up to float rounding (tested in ``tests/test_layers.py``).
  """
  b, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dn = ('NHWC', 'HWIO', 'NHWC')
  rows = []
  for a in range(2):
    kr = _phase_taps(kernel, a, 0)  # [2, 3, I, O]
    cols = []
    for c in range(2):
      k = _phase_taps(kr, c, 1).astype(x.dtype)  # [2, 2, I, O]
      cols.append(
        jax.lax.conv_general_dilated(xp[:, a : a + h + 1, c : c + w + 1], k, (1, 1), 'VALID', dimension_numbers=dn)
      )
    rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2, O]
  y = jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])  # [B, H, 2, W, 2, O] -> interleaved
  return y if bias is None else y + bias.astype(y.dtype)


class UpsampleConv(_KernelBias):
  """Nearest-neighbour x2 upsampling then a 3x3 'SAME' convolution, via `upsample_conv3x3`.

  Parameters, their names, shapes and initialisation are those of ``flax.linen.Conv(features, (3, 3))``
  (``kernel [3, 3, in, features]``, ``bias [features]``), so checkpoints and importers are unchanged. Called on
  ``x [B, H, W, C]`` it returns ``[B, 2H, 2W, features]``.

  Attributes: those of `_KernelBias` (``features``, ``kernel_init``, ``bias_init``, ``dtype``, ``param_dtype``).
  """

  def _kernel_shape(self, x):
    return (3, 3, x.shape[-1], self.features)

  def _fn(self, x, kernel, bias):
    return upsample_conv3x3(x, kernel, bias)  # folds the taps in param_dtype, then casts to x's dtype


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------


def _bmm(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
  """Batched matrix product over axis 0, contracting ``a``'s axis ``contract_a`` with ``b``'s ``contract_b``."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def _softmax_weights(q, k):
  scale = float(q.shape[-1]) ** -0.5
  return jax.nn.softmax(_bmm(q, k, 2, 2) * scale, axis=-1)  # [B, N, N] float32


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, tree_reductions: bool = False) -> jax.Array:
  """Single-head attention ``softmax(q k^T / sqrt(C)) v`` of ``[B, N, C]`` arrays.

  Logits and softmax are float32 (bf16 softmax over N keys is too coarse); the weights are cast to ``v``'s
  dtype for the second product. Returns ``[B, N, C]`` in ``v``'s dtype.

  Without differentiation (sampling) the softmax is normalized after the second product, ``(e v) / s`` with
  ``e = exp(l - max l)`` and ``s`` its row sums, and ``q`` is scaled before the first: one pass less over the
  ``[B, N, N]`` weights. With ``tree_reductions`` the row max and sum there are trees of halvings (`_reduce`).
  Under differentiation the forward pass keeps the normalized weights, which the backward pass reuses.
  """
  return _attention(q, k, v, bool(tree_reductions))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, tree: bool) -> jax.Array:
  logits = _bmm(q * jnp.asarray(float(q.shape[-1]) ** -0.5, q.dtype), k, 2, 2)  # float32 [B, N, N]
  e = jnp.exp(logits - _reduce(logits, 2, jnp.maximum, tree))
  out = _bmm(e.astype(v.dtype), v, 2, 1) / _reduce(e, 2, jnp.add, tree)
  return out.astype(v.dtype)


def _attention_fwd(q, k, v, tree):
  del tree  # the saved weights come from jax.nn.softmax
  w = _softmax_weights(q, k)
  out = _bmm(w.astype(v.dtype), v, 2, 1).astype(v.dtype)
  return out, (q, k, v, w)


def _attention_bwd(tree, res, dout):
  del tree
  q, k, v, w = res
  scale = float(q.shape[-1]) ** -0.5
  dv = _bmm(w.astype(v.dtype), dout, 1, 1)  # w^T dout
  dw = _bmm(dout, v, 2, 2)  # dout v^T, float32
  ds = w * (dw - jnp.sum(dw * w, axis=-1, keepdims=True)) * scale  # softmax backward
  dq = _bmm(ds.astype(k.dtype), k, 2, 1)
  dk = _bmm(ds.astype(q.dtype), q, 1, 1)  # ds^T q
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------

_DROPOUT_LEVELS = 1 << 16


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout with 16-bit thresholds: drops each element with probability ``round(rate * 2**16) / 2**16``.

  Kept elements are scaled by ``1 / (1 - that probability)``. ``rate`` is a Python float in [0, 1].
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'dropout rate must be in [0, 1], got {rate}.')
  threshold = int(round(rate * _DROPOUT_LEVELS))
  if threshold == 0:
    return x
  if threshold == _DROPOUT_LEVELS:
    return jnp.zeros_like(x)
  n = x.size
  words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
  bits = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[:n].reshape(x.shape)
  keep_prob = 1.0 - threshold / _DROPOUT_LEVELS
  return jnp.where(bits >= threshold, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """Dropout with `dropout`'s 16-bit masks; draws from the ``'dropout'`` RNG stream like ``flax.linen.Dropout``.

  Attributes:
    rate: drop probability (rounded to a multiple of 1/65536).
    deterministic: if True, the identity.
  """

  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'))
