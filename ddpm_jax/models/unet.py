"""DDPM U-Net (Ho, Jain & Abbeel 2020) in Flax Linen.

A parameter-for-parameter reimplementation of the TF original
(github.com/hojonathanho/diffusion, ``diffusion_tf/models/unet.py`` and
``diffusion_tf/nn.py``). Layout is NHWC throughout.

Architecture summary (each point as in the original ``unet.py`` / ``nn.py``):

* ``get_timestep_embedding``: sinusoidal embedding of the *integer* step index
  (0..T-1, unscaled), ``sin`` half first, frequency denominator ``half - 1``.
* ``temb``: Dense(ch -> 4ch) -> swish -> Dense(4ch -> 4ch).
* ResBlock: swish(GN) -> conv3x3 -> + Dense(swish(temb)) -> swish(GN) ->
  dropout -> conv3x3 (near-zero init) ; 1x1 "NIN" shortcut iff channels change.
* Single-head self-attention over all H*W positions at the resolutions in
  ``attn_resolutions`` (plus always once in the middle).
* Downsample: 3x3 stride-2 conv, TF 'SAME' padding (0 before / 1 after).
  Upsample: nearest-neighbour x2 then 3x3 conv.
* GroupNorm(32 groups, eps 1e-6); every kernel initialised with
  ``variance_scaling(scale, 'fan_avg', 'uniform')``, scale 0 replaced by 1e-10.

Layers (``UNet.layers``): by default (``'reference'``) the network is built from
plain Flax/JAX layers that XLA differentiates itself, in both modes (``jax.grad``,
``jax.jvp``, ``jax.jacfwd``): ``nn.GroupNorm`` with float32 statistics, ``nn.Dense``,
softmax attention with float32 logits, ``nn.Dropout``, pixel repetition then
``nn.Conv``. ``layers='cpu'`` swaps in the layers of
:mod:`ddpm_jax.models.cpu_layers`, which compute the same function faster on
XLA:CPU (hand-written gradients, reverse mode only; 16-bit dropout masks; the
upsampling conv as four 2x2 convs); the commands choose it when they compute on a
CPU (``ddpm_jax.cpu_tuning.model_layers``). `_layer_kit` is the one place that
picks the layer of each kind. Both choices have the same parameter tree (names,
shapes, dtypes, initialisation), so checkpoints and importers do not care.

Parameter tree (mirrors the TF variable scopes under ``model/``; a TF checkpoint
maps by renaming leaves only: ``W -> kernel``, ``b -> bias``,
``gamma -> scale``, ``beta -> bias``). ``i`` is the level index, ``j`` the block
index within a level. Conv kernels are ``[kh, kw, in, out]`` and Dense/NIN
kernels ``[in, out]`` (identical to the TF layouts; PyTorch/diffusers weights
need ``permute(2, 3, 1, 0)`` for convs and ``.T`` for linears)::

    path                                   module      kernel shape
    -------------------------------------  ----------  ----------------------
    temb/dense0/{kernel,bias}              Dense       [ch, 4ch]
    temb/dense1/{kernel,bias}              Dense       [4ch, 4ch]
    conv_in/{kernel,bias}                  Conv 3x3    [3, 3, C_in, ch]
    down_{i}/block_{j}/norm1/{scale,bias}  GroupNorm   [C_blockin]
    down_{i}/block_{j}/conv1/{kernel,bias} Conv 3x3    [3, 3, C_blockin, C_out]
    down_{i}/block_{j}/temb_proj/...       Dense       [4ch, C_out]
    down_{i}/block_{j}/norm2/{scale,bias}  GroupNorm   [C_out]
    down_{i}/block_{j}/conv2/...           Conv 3x3    [3, 3, C_out, C_out]  (init ~0)
    down_{i}/block_{j}/nin_shortcut/...    Dense(NIN)  [C_blockin, C_out]    (iff C_blockin != C_out)
    down_{i}/attn_{j}/norm/{scale,bias}    GroupNorm   [C]
    down_{i}/attn_{j}/{q,k,v}/...          Dense(NIN)  [C, C]
    down_{i}/attn_{j}/proj_out/...         Dense(NIN)  [C, C]                (init ~0)
    down_{i}/downsample/conv/...           Conv 3x3 s2 [3, 3, C, C]          (i < L-1, resamp_with_conv)
    mid/block_1/..., mid/attn_1/..., mid/block_2/...   (same children as above)
    up_{i}/block_{j}/...                   ResBlock    j = 0..num_res_blocks (one more than down)
    up_{i}/attn_{j}/...                    Attention
    up_{i}/upsample/conv/...               Conv 3x3    [3, 3, C, C]          (i > 0, resamp_with_conv)
    norm_out/{scale,bias}                  GroupNorm   [ch]
    conv_out/{kernel,bias}                 Conv 3x3    [3, 3, ch, out_ch]    (init ~0)

With ``L = len(ch_mult)`` the ``down_{i}`` levels run i = 0..L-1 and the
``up_{i}`` levels run i = L-1..0 (so ``up_{L-1}`` runs first), exactly as in TF.
When ``resamp_with_conv=False`` the ``downsample``/``upsample`` scopes hold no
parameters and therefore do not appear in the tree. For diffusers'
``UNet2DModel`` the TF ``up_{i}`` corresponds to ``up_blocks[L-1-i]``.

Validation: :func:`validate_unet_config` (field values) and
:func:`validate_unet_input` (input shapes) are pure Python functions that build
nothing; ``UNet.check_config()`` / ``UNet.check_input_shape(x_shape, t_shape)``
are convenience wrappers. ``UNet.__call__`` runs the same checks at trace time,
i.e. before XLA compiles anything.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ddpm_jax.models import cpu_layers

__all__ = [
  'UNet',
  'unet_cifar10',
  'unet_256',
  'get_timestep_embedding',
  'count_params',
  'validate_unet_config',
  'validate_unet_input',
  'LAYERS',
  'attention',
  'default_init',
  'ResnetBlock',
  'AttnBlock',
  'Downsample',
  'Upsample',
]

# TF nn.default_init replaces scale 0 by 1e-10 (variance_scaling rejects 0).
_ZERO_SCALE = 1e-10

# The implementations of the layers (`UNet.layers`): the paper's network in plain Flax, or the XLA:CPU layers.
LAYERS = ('reference', 'cpu')


def default_init(scale: float = 1.0):
  """Kernel initializer of the TF original (``nn.default_init``).

  ``variance_scaling(scale, 'fan_avg', 'uniform')``: U(-L, L) with
  ``L = sqrt(3 * scale / ((fan_in + fan_out) / 2))`` and, for convs,
  ``fan_in = kh*kw*C_in``, ``fan_out = kh*kw*C_out``. A scale of 0 is
  replaced by 1e-10 (near-zero, not exactly zero) as in TF.

  Args:
    scale: variance scale; 0 means "near-zero init".

  Returns:
    A JAX initializer ``(key, shape, dtype) -> array``.
  """
  scale = _ZERO_SCALE if scale == 0 else float(scale)
  return nn.initializers.variance_scaling(scale, mode='fan_avg', distribution='uniform')


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
  """Sinusoidal timestep embedding (TF ``nn.get_timestep_embedding``).

  ``freq_k = exp(-k * ln(10000) / (half - 1))`` for ``k = 0..half-1`` with
  ``half = embedding_dim // 2``; ``emb = concat([sin(t*freq), cos(t*freq)])``
  (sin first), zero-padded by one column if ``embedding_dim`` is odd.

  Args:
    timesteps: ``[B]`` integer step indices 0..T-1. They are used *unscaled*
      (not t/T), as in the original.
    embedding_dim: output width, >= 4 (``half - 1`` must be non-zero).

  Returns:
    float32 array ``[B, embedding_dim]``.

  Raises:
    ValueError: if ``timesteps`` is not 1-D or ``embedding_dim < 4``.
  """
  if timesteps.ndim != 1:
    raise ValueError(
      f'timesteps must be a 1-D array [B]; got shape {tuple(timesteps.shape)}. Pass one integer step index per example.'
    )
  if not isinstance(embedding_dim, (int, np.integer)) or embedding_dim < 4:
    raise ValueError(
      f'embedding_dim must be an int >= 4 (the frequency formula divides by dim//2 - 1); got {embedding_dim!r}.'
    )
  half = embedding_dim // 2
  # float32 throughout, as TF (tf.range(..., dtype=tf.float32)).
  log_step = math.log(10000.0) / (half - 1)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -log_step)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def count_params(params: Any) -> int:
  """Total number of scalar parameters in a pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------
# Validation (pure Python; builds nothing)
# ----------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def validate_unet_config(
  *,
  ch: int = 128,
  out_ch: int = 3,
  ch_mult: Sequence[int] = (1, 2, 2, 2),
  num_res_blocks: int = 2,
  attn_resolutions: Sequence[int] = (16,),
  dropout: float = 0.0,
  resamp_with_conv: bool = True,
  num_groups: int = 32,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
  num_classes: int = 0,
  layers: str = 'reference',
  cpu_tree_reductions: bool = False,
) -> None:
  """Checks U-Net field values; raises ``ValueError`` naming the bad value and the fix.

  Pure Python: call it from a training-config validator without building a model.
  Keyword names equal the :class:`UNet` fields (unknown names raise ``TypeError``
  from Python itself; use :func:`unet_cifar10`-style constructors for a
  ``ValueError``).
  """
  if not _is_int(ch) or ch < 1:
    raise ValueError(f'ch must be a positive int; got {ch!r}.')
  if not _is_int(out_ch) or out_ch < 1:
    raise ValueError(f'out_ch must be a positive int (3, or 6 for learned variance); got {out_ch!r}.')
  if isinstance(ch_mult, (str, bytes)) or not isinstance(ch_mult, Sequence) or len(ch_mult) == 0:
    raise ValueError(f'ch_mult must be a non-empty sequence of positive ints, e.g. (1, 2, 2, 2); got {ch_mult!r}.')
  if not all(_is_int(m) and m >= 1 for m in ch_mult):
    raise ValueError(f'ch_mult entries must be positive ints; got ch_mult={tuple(ch_mult)!r}.')
  if not _is_int(num_res_blocks) or num_res_blocks < 1:
    raise ValueError(f'num_res_blocks must be an int >= 1; got {num_res_blocks!r}.')
  if isinstance(attn_resolutions, (str, bytes)) or not isinstance(attn_resolutions, Sequence):
    raise ValueError(
      f'attn_resolutions must be a sequence of ints (may be empty), e.g. (16,); got {attn_resolutions!r}.'
    )
  if not all(_is_int(r) and r >= 1 for r in attn_resolutions):
    raise ValueError(
      f'attn_resolutions entries must be positive ints (feature-map heights); got {tuple(attn_resolutions)!r}.'
    )
  if (
    isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating)) or not (0.0 <= float(dropout) < 1.0)
  ):
    raise ValueError(f'dropout must be a float in [0, 1); got {dropout!r} (use 0.1 for CIFAR-10, 0.0 otherwise).')
  if not isinstance(resamp_with_conv, (bool, np.bool_)):
    raise ValueError(f'resamp_with_conv must be a bool; got {resamp_with_conv!r}.')
  if not isinstance(remat, (bool, np.bool_)):
    raise ValueError(f'remat must be a bool; got {remat!r}.')
  if not _is_int(num_classes) or num_classes < 0:
    raise ValueError(f"num_classes must be an int >= 0 (0 = unconditional, the paper's models); got {num_classes!r}.")
  if not _is_int(num_groups) or num_groups < 1:
    raise ValueError(f'num_groups must be a positive int (32 in the original); got {num_groups!r}.')
  if not isinstance(layers, str) or layers not in LAYERS:
    raise ValueError(
      f"layers must be one of {LAYERS}; got {layers!r}. 'reference' is the paper's network in plain Flax (any "
      "backend, forward- and reverse-mode AD); 'cpu' the layers written for XLA:CPU (reverse mode only)."
    )
  if not isinstance(cpu_tree_reductions, (bool, np.bool_)):
    raise ValueError(f'cpu_tree_reductions must be a bool; got {cpu_tree_reductions!r}.')
  if cpu_tree_reductions and layers != 'cpu':
    raise ValueError(
      f"cpu_tree_reductions=True applies to the CPU layers only; got layers={layers!r}. Set layers='cpu' or "
      'cpu_tree_reductions=False.'
    )
  if ch < 4:
    raise ValueError(f'ch must be >= 4 (it is also the timestep-embedding width); got ch={ch}.')
  for name, c in [('ch', ch)] + [(f'ch*ch_mult[{i}]', ch * m) for i, m in enumerate(ch_mult)]:
    if c % num_groups != 0:
      raise ValueError(
        f'GroupNorm needs channel counts divisible by num_groups={num_groups}, but {name} = {c}. '
        f'Choose ch (and ch_mult) so that every ch*m is a multiple of num_groups, or lower num_groups.'
      )
  for name, dt in (('dtype', dtype), ('param_dtype', param_dtype)):
    try:
      ok = jnp.issubdtype(jnp.dtype(dt), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f'{name} must be a floating dtype (float32 or bfloat16); got {dt!r}.')


def validate_unet_input(
  x_shape: Sequence[int],
  t_shape: Optional[Sequence[int]] = None,
  *,
  ch_mult: Sequence[int] = (1, 2, 2, 2),
) -> None:
  """Checks input shapes for a U-Net with ``len(ch_mult)`` levels.

  Pure Python (shapes only). Non-square images are allowed as long as both H
  and W are divisible by ``2**(len(ch_mult)-1)``; note that, as in TF, the
  attention test ``H in attn_resolutions`` looks at the height only.

  Args:
    x_shape: image batch shape ``(B, H, W, C)`` (NHWC).
    t_shape: timestep shape, must be ``(B,)``; skipped if None.
    ch_mult: the model's channel multipliers (only its length matters).

  Raises:
    ValueError: naming the offending shape and the fix.
  """
  x_shape = tuple(int(d) for d in x_shape)
  if len(x_shape) != 4:
    raise ValueError(
      f'x must be a 4-D NHWC batch [B, H, W, C]; got shape {x_shape}. Add a batch axis / put channels last.'
    )
  b, h, w, c = x_shape
  if b < 1 or c < 1:
    raise ValueError(f'x must have a non-empty batch and channel axis; got shape {x_shape}.')
  factor = 2 ** (len(ch_mult) - 1)
  for name, size in (('height', h), ('width', w)):
    if size < factor or size % factor != 0:
      raise ValueError(
        f'image {name} {size} (x shape {x_shape}) must be a positive multiple of '
        f'2**(len(ch_mult)-1) = {factor} for ch_mult={tuple(ch_mult)}; resize/crop the '
        f'images or use fewer levels.'
      )
  if t_shape is not None:
    t_shape = tuple(int(d) for d in t_shape)
    if t_shape != (b,):
      raise ValueError(
        f"t must have shape [B] = ({b},) matching x's batch; got t shape {t_shape}. "
        'Pass one integer timestep index per image.'
      )


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Single-head attention ``softmax(q k^T / sqrt(C)) v`` of ``[B, N, C]`` arrays, in plain JAX.

  Logits and softmax in float32 (a bfloat16 softmax over N keys is too coarse; float64 inputs stay float64); the
  weights are cast to ``v``'s dtype for the second product, which accumulates in that precision too. Returns
  ``[B, N, C]`` in ``v``'s dtype.
  """
  acc = jnp.promote_types(q.dtype, jnp.float32)
  scale = float(q.shape[-1]) ** -0.5
  logits = jnp.einsum('bnc,bmc->bnm', q, k, preferred_element_type=acc) * scale
  w = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bnm,bmc->bnc', w.astype(v.dtype), v, preferred_element_type=acc).astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class _LayerKit:
  """The layer of each kind that one implementation (`LAYERS`) builds the U-Net from.

  Attributes:
    group_norm: module class called as ``(num_groups=, epsilon=, param_dtype=, name=)``; statistics and output in
      the input's dtype (float32 or wider).
    dense: module class with ``nn.Dense``'s signature.
    attention: ``(q, k, v) -> out`` on ``[B, N, C]`` arrays.
    dropout: module class called as ``(rate=, deterministic=)``, drawing from the ``'dropout'`` RNG stream.
    upsample_conv: module class with ``nn.Conv``'s parameters that computes ``conv3x3(upsample_x2(x))`` from the
      half-resolution ``x``; None: upsample by pixel repetition, then ``nn.Conv``.
  """

  group_norm: Callable[..., nn.Module]
  dense: Callable[..., nn.Module]
  attention: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
  dropout: Callable[..., nn.Module]
  upsample_conv: Optional[Callable[..., nn.Module]]


_REFERENCE_KIT = _LayerKit(
  # Two-pass variance (like tf.nn.moments; E[x^2] - E[x]^2 loses precision).
  group_norm=functools.partial(nn.GroupNorm, use_fast_variance=False),
  dense=nn.Dense,
  attention=attention,
  dropout=nn.Dropout,
  upsample_conv=None,
)


def _layer_kit(layers: str, cpu_tree_reductions: bool) -> _LayerKit:
  """The layers of implementation ``layers`` (`LAYERS`): the one place where the U-Net picks them."""
  if layers == 'reference':
    return _REFERENCE_KIT
  if layers == 'cpu':
    return _LayerKit(
      group_norm=functools.partial(cpu_layers.GroupNorm, tree_reductions=cpu_tree_reductions),
      dense=cpu_layers.Dense,
      attention=functools.partial(cpu_layers.attention, tree_reductions=cpu_tree_reductions),
      dropout=cpu_layers.Dropout,  # 16-bit masks: rate 0.1 -> 0.100006 (README)
      upsample_conv=cpu_layers.UpsampleConv,
    )
  raise ValueError(f'layers must be one of {LAYERS}; got {layers!r}.')


def _group_norm(kit: _LayerKit, x, num_groups: int, param_dtype, name: str, out_dtype):
  """GroupNorm (TF contrib group_norm: eps 1e-6, gamma=1, beta=0) computed in float32 (or wider) whatever the
  compute dtype, with parameters cast to it; the result cast to ``out_dtype``."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  y = kit.group_norm(num_groups=num_groups, epsilon=1e-6, param_dtype=param_dtype, name=name)(x)
  return y.astype(out_dtype)


def _conv3x3(features: int, dtype, param_dtype, name: str, strides: int = 1, init_scale: float = 1.0):
  # Flax 'SAME' == TF 'SAME' (pad_lo = total // 2): for stride 2 on even sizes
  # that is 0 before / 1 after, exactly like the TF original.
  return nn.Conv(
    features,
    kernel_size=(3, 3),
    strides=(strides, strides),
    padding='SAME',
    kernel_init=default_init(init_scale),
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def _nin(kit: _LayerKit, features: int, dtype, param_dtype, name: str, init_scale: float = 1.0):
  # TF nn.nin is tensordot over the channel axis == Dense on the last axis.
  return kit.dense(
    features,
    kernel_init=default_init(init_scale),
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


class ResnetBlock(nn.Module):
  """ResBlock of the TF original (``unet.resnet_block``, conv_shortcut=False).

  Attributes:
    out_ch: output channels.
    dropout: dropout rate, applied after the second GN+swish (train only).
    num_groups, dtype, param_dtype, layers, cpu_tree_reductions: as in :class:`UNet`.
  """

  out_ch: int
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  layers: str = 'reference'
  cpu_tree_reductions: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    """Args: x ``[B,H,W,C_in]``, temb ``[B,E]``. Returns ``[B,H,W,out_ch]``.

    ``train`` may be passed by position: the rematerialized block marks it static.
    """
    kit = _layer_kit(self.layers, self.cpu_tree_reductions)
    h = nn.swish(_group_norm(kit, x, self.num_groups, self.param_dtype, 'norm1', self.dtype))
    h = _conv3x3(self.out_ch, self.dtype, self.param_dtype, 'conv1')(h)
    # Timestep conditioning is added after conv1 and before norm2 (TF order).
    h = h + _nin(kit, self.out_ch, self.dtype, self.param_dtype, 'temb_proj')(nn.swish(temb))[:, None, None, :]
    h = nn.swish(_group_norm(kit, h, self.num_groups, self.param_dtype, 'norm2', self.dtype))
    if train and self.dropout > 0.0:
      h = kit.dropout(rate=self.dropout, deterministic=False)(h)
    h = _conv3x3(self.out_ch, self.dtype, self.param_dtype, 'conv2', init_scale=0.0)(h)
    if x.shape[-1] != self.out_ch:
      x = _nin(kit, self.out_ch, self.dtype, self.param_dtype, 'nin_shortcut')(x)
    return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions (``unet.attn_block``).

  Attributes: ``num_groups``, ``dtype``, ``param_dtype``, ``layers``, ``cpu_tree_reductions`` as in :class:`UNet`.
  """

  num_groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  layers: str = 'reference'
  cpu_tree_reductions: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B,H,W,C]``. Returns ``x + proj_out(attn(GN(x)))``, same shape."""
    B, H, W, C = x.shape
    kit = _layer_kit(self.layers, self.cpu_tree_reductions)
    h = _group_norm(kit, x, self.num_groups, self.param_dtype, 'norm', self.dtype)
    q = _nin(kit, C, self.dtype, self.param_dtype, 'q')(h)
    k = _nin(kit, C, self.dtype, self.param_dtype, 'k')(h)
    v = _nin(kit, C, self.dtype, self.param_dtype, 'v')(h)
    flat = lambda a: a.reshape(B, H * W, C)
    h = kit.attention(flat(q), flat(k), flat(v)).reshape(B, H, W, C)  # logits and softmax in float32
    h = _nin(kit, C, self.dtype, self.param_dtype, 'proj_out', init_scale=0.0)(h)
    return x.astype(self.dtype) + h


class Downsample(nn.Module):
  """Halve H and W: 3x3 stride-2 conv (TF 'SAME') or 2x2 average pool."""

  with_conv: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B,H,W,C]`` with even H, W. Returns ``[B,H/2,W/2,C]``."""
    C = x.shape[-1]
    if self.with_conv:
      return _conv3x3(C, self.dtype, self.param_dtype, 'conv', strides=2)(x)
    return nn.avg_pool(x.astype(self.dtype), (2, 2), strides=(2, 2), padding='VALID')


class Upsample(nn.Module):
  """Double H and W by nearest-neighbour (pixel repetition), then optional 3x3 conv.

  TF uses ``tf.image.resize_nearest_neighbor(align_corners=True)``; for an exact
  x2 resize that picks source index ``round(y*(n-1)/(2n-1)) = y // 2``, i.e.
  pixel repetition. With ``layers='cpu'`` the conv of the repeated image is
  computed from the half-resolution input (`cpu_layers.UpsampleConv`, the same
  parameters and function).

  Attributes: ``with_conv``, and ``dtype``, ``param_dtype``, ``layers``, ``cpu_tree_reductions`` as in
  :class:`UNet`.
  """

  with_conv: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  layers: str = 'reference'
  cpu_tree_reductions: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B,H,W,C]``. Returns ``[B,2H,2W,C]``."""
    kit = _layer_kit(self.layers, self.cpu_tree_reductions)
    if self.with_conv and kit.upsample_conv is not None:
      return kit.upsample_conv(
        x.shape[-1],
        kernel_init=default_init(1.0),
        bias_init=nn.initializers.zeros,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='conv',
      )(x)
    h = jnp.repeat(jnp.repeat(x.astype(self.dtype), 2, axis=1), 2, axis=2)
    if self.with_conv:
      h = _conv3x3(x.shape[-1], self.dtype, self.param_dtype, 'conv')(h)
    return h


def _blocks(remat: bool):
  """(ResBlock class, attention class), wrapped in ``nn.remat`` when ``remat``.

  Remat keeps only each block's inputs for the backward pass and recomputes the
  rest, trading about one extra forward pass for activation memory. The wrapper
  adds no scope, so the parameter tree is unchanged.
  """
  if not remat:
    return ResnetBlock, AttnBlock
  # static_argnums counts self: (self, x, temb, train) -> train is 3.
  return nn.remat(ResnetBlock, static_argnums=(3,)), nn.remat(AttnBlock)


class _TimestepMLP(nn.Module):
  """``temb`` scope: Dense(ch->4ch) -> swish -> Dense(4ch->4ch)."""

  ch: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  layers: str = 'reference'
  cpu_tree_reductions: bool = False

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    kit = _layer_kit(self.layers, self.cpu_tree_reductions)
    emb = get_timestep_embedding(t, self.ch)
    emb = _nin(kit, 4 * self.ch, self.dtype, self.param_dtype, 'dense0')(emb)
    emb = _nin(kit, 4 * self.ch, self.dtype, self.param_dtype, 'dense1')(nn.swish(emb))
    return emb  # no activation after dense1 (each block applies swish itself)


class _DownLevel(nn.Module):
  """``down_{i}`` scope: num_res_blocks x (block_j [+ attn_j]) [+ downsample]."""

  out_ch: int
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  dropout: float
  resamp_with_conv: bool
  is_last: bool
  num_groups: int
  dtype: Any
  param_dtype: Any
  remat: bool = False
  layers: str = 'reference'
  cpu_tree_reductions: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, *, train: bool) -> list:
    """Returns the list of tensors this level appends to the skip stack ``hs``."""
    res_cls, attn_cls = _blocks(self.remat)
    block = _block_fields(self)
    outs = []
    for j in range(self.num_res_blocks):
      h = res_cls(self.out_ch, self.dropout, name=f'block_{j}', **block)(h, temb, train)
      if h.shape[1] in self.attn_resolutions:  # TF tests the height only
        h = attn_cls(name=f'attn_{j}', **block)(h)
      outs.append(h)
    if not self.is_last:
      outs.append(Downsample(self.resamp_with_conv, self.dtype, self.param_dtype, name='downsample')(h))
    return outs


class _MidLevel(nn.Module):
  """``mid`` scope: block_1 -> attn_1 -> block_2 (attention regardless of attn_resolutions)."""

  dropout: float
  num_groups: int
  dtype: Any
  param_dtype: Any
  remat: bool = False
  layers: str = 'reference'
  cpu_tree_reductions: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
    C = h.shape[-1]
    res_cls, attn_cls = _blocks(self.remat)
    block = _block_fields(self)
    h = res_cls(C, self.dropout, name='block_1', **block)(h, temb, train)
    h = attn_cls(name='attn_1', **block)(h)
    h = res_cls(C, self.dropout, name='block_2', **block)(h, temb, train)
    return h


class _UpLevel(nn.Module):
  """``up_{i}`` scope: (num_res_blocks+1) x (block_j on concat skip [+ attn_j]) [+ upsample]."""

  out_ch: int
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  dropout: float
  resamp_with_conv: bool
  is_first: bool  # level 0: no upsample
  num_groups: int
  dtype: Any
  param_dtype: Any
  remat: bool = False
  layers: str = 'reference'
  cpu_tree_reductions: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, skips: list, temb: jax.Array, *, train: bool) -> jax.Array:
    """``skips`` are given in pop order (the most recent skip first)."""
    assert len(skips) == self.num_res_blocks + 1
    res_cls, attn_cls = _blocks(self.remat)
    block = _block_fields(self)
    for j, skip in enumerate(skips):
      h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
      h = res_cls(self.out_ch, self.dropout, name=f'block_{j}', **block)(h, temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn_cls(name=f'attn_{j}', **block)(h)
    if not self.is_first:
      h = Upsample(
        self.resamp_with_conv,
        self.dtype,
        self.param_dtype,
        layers=self.layers,
        cpu_tree_reductions=self.cpu_tree_reductions,
        name='upsample',
      )(h)
    return h


def _block_fields(level: nn.Module) -> dict:
  """The fields a level passes on to its ResBlocks and attention blocks."""
  names = ('num_groups', 'dtype', 'param_dtype', 'layers', 'cpu_tree_reductions')
  return {name: getattr(level, name) for name in names}


# ----------------------------------------------------------------------------
# The U-Net
# ----------------------------------------------------------------------------


class UNet(nn.Module):
  """DDPM U-Net (TF ``unet.model``), NHWC; unconditional unless ``num_classes > 0``.

  Field values are validated at construction (``__post_init__``) and input
  shapes at trace time in ``__call__``; both raise ``ValueError`` before any
  XLA compilation. See the module docstring for the parameter-tree naming.

  Attributes:
    ch: base channel count (also the timestep-embedding width).
    out_ch: output channels (3 for eps prediction, 6 with learned variance).
    ch_mult: per-level channel multipliers; ``len(ch_mult)`` levels.
    num_res_blocks: ResBlocks per down level (up levels get one more).
    attn_resolutions: feature-map heights at which attention follows each ResBlock.
    dropout: ResBlock dropout rate (used only with ``train=True``).
    resamp_with_conv: conv (True) or avg-pool/plain-repeat (False) resampling.
    num_groups: GroupNorm groups.
    dtype: computation dtype (float32 or bfloat16; a dtype or its name, e.g.
      ``'bfloat16'``); GN statistics and the attention softmax stay float32,
      the output is always float32.
    param_dtype: parameter dtype (dtype or name).
    remat: rematerialize each ResBlock and attention block in the backward
      pass (less activation memory, about one extra forward pass); the
      parameter tree and outputs are unchanged.
    num_classes: 0 for the paper's unconditional models. ``K > 0`` adds a
      class embedding ``label_emb`` (``nn.Embed(K + 1, 4ch)``, row ``K`` is the
      null class used for classifier-free guidance) to the timestep embedding
      after its MLP, as in Improved DDPM / Ho & Salimans 2022; ``y`` is then
      required. The original TF code had no class conditioning.
    layers: how the layers are computed, one of `LAYERS` (not what: both give
      the same parameter tree and, up to float rounding, the same function).
      ``'reference'`` (default): plain Flax/JAX, the paper's formulation on any
      backend, differentiable in forward and reverse mode. ``'cpu'``: the layers
      of :mod:`ddpm_jax.models.cpu_layers`, faster on XLA:CPU; reverse-mode
      differentiation only, and dropout drops a multiple of 1/65536 (0.100006
      for 0.1). The commands choose with ``ddpm_jax.cpu_tuning.model_layers``.
    cpu_tree_reductions: with ``layers='cpu'`` only: compute the GroupNorm sums
      and the softmax's row max and sum as trees of halvings (faster where XLA:CPU
      runs reductions on its own kernels). Set when the model is built
      (``cpu_tuning.model_layers`` reads it from the XLA flags then), never read
      from the environment while tracing.
  """

  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  resamp_with_conv: bool = True
  num_groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  num_classes: int = 0
  layers: str = 'reference'
  cpu_tree_reductions: bool = False

  def __post_init__(self):
    self.check_config()
    super().__post_init__()

  @nn.nowrap
  def config_fields(self) -> dict:
    """The architecture fields as a plain dict (what the network computes; :func:`validate_unet_config` takes them).

    Leaves out how it is computed (`layer_fields`): two models that differ only there are the same network.
    """
    return {name: getattr(self, name) for name in _UNET_FIELDS}

  @nn.nowrap
  def layer_fields(self) -> dict:
    """The implementation fields (``layers``, ``cpu_tree_reductions``), e.g. for ``other.clone(**m.layer_fields())``."""
    return {name: getattr(self, name) for name in _LAYER_FIELDS}

  @nn.nowrap
  def check_config(self) -> None:
    """Validates field values; raises ``ValueError``. Builds nothing."""
    validate_unet_config(**self.config_fields(), **self.layer_fields())

  @nn.nowrap
  def check_input_shape(self, x_shape: Sequence[int], t_shape: Optional[Sequence[int]] = None) -> None:
    """Validates ``x``/``t`` shapes for this model; raises ``ValueError``. Builds nothing."""
    validate_unet_input(x_shape, t_shape, ch_mult=self.ch_mult)

  @nn.nowrap
  def null_label(self) -> int:
    """The label of the null class (``num_classes``), for classifier-free guidance."""
    if not self.num_classes:
      raise ValueError('An unconditional UNet (num_classes=0) has no class labels.')
    return int(self.num_classes)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None, *, train: bool) -> jax.Array:
    """Predicts the model output (eps, or eps + variance logits if out_ch=6).

    Args:
      x: ``[B, H, W, C]`` float images (NHWC); H, W divisible by 2**(len(ch_mult)-1).
      t: ``[B]`` integer timestep indices 0..T-1.
      y: ``[B]`` integer class labels in ``0..num_classes`` (``num_classes`` = the
        null class) for a class-conditional model; must be None otherwise.
      train: enables dropout (needs the ``'dropout'`` RNG when dropout > 0).

    Returns:
      float32 ``[B, H, W, out_ch]``.
    """
    x = jnp.asarray(x)
    t = jnp.asarray(t)
    self.check_input_shape(x.shape, t.shape)  # Python-level, at trace time
    if self.num_classes and y is None:
      raise ValueError(
        f'This UNet is class-conditional (num_classes={self.num_classes}): pass labels y [B] '
        f'(use {self.num_classes}, the null class, for an unconditional prediction).'
      )
    if not self.num_classes and y is not None:
      raise ValueError('This UNet is unconditional (num_classes=0): y must be None.')
    if y is not None and tuple(jnp.shape(y)) != (x.shape[0],):
      raise ValueError(f'y must have shape [B] = ({x.shape[0]},); got {tuple(jnp.shape(y))}.')
    attn_res = tuple(self.attn_resolutions)
    num_levels = len(self.ch_mult)
    # Accept dtype names from configs ('bfloat16') as well as dtype objects.
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    impl = self.layer_fields()
    common = dict(num_groups=self.num_groups, dtype=dtype, param_dtype=param_dtype, remat=bool(self.remat), **impl)

    temb = _TimestepMLP(self.ch, dtype, param_dtype, name='temb', **impl)(t)
    if self.num_classes:
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dtype, param_dtype=param_dtype, name='label_emb')(
        jnp.asarray(y, jnp.int32)
      )

    hs = [_conv3x3(self.ch, dtype, param_dtype, 'conv_in')(x)]
    for i in range(num_levels):
      hs += _DownLevel(
        out_ch=self.ch * self.ch_mult[i],
        num_res_blocks=self.num_res_blocks,
        attn_resolutions=attn_res,
        dropout=self.dropout,
        resamp_with_conv=self.resamp_with_conv,
        is_last=(i == num_levels - 1),
        name=f'down_{i}',
        **common,
      )(hs[-1], temb, train=train)

    h = _MidLevel(dropout=self.dropout, name='mid', **common)(hs[-1], temb, train=train)

    for i in reversed(range(num_levels)):
      skips = [hs.pop() for _ in range(self.num_res_blocks + 1)]
      h = _UpLevel(
        out_ch=self.ch * self.ch_mult[i],
        num_res_blocks=self.num_res_blocks,
        attn_resolutions=attn_res,
        dropout=self.dropout,
        resamp_with_conv=self.resamp_with_conv,
        is_first=(i == 0),
        name=f'up_{i}',
        **common,
      )(h, skips, temb, train=train)
    assert not hs, f'{len(hs)} skip tensors left unused'

    kit = _layer_kit(self.layers, self.cpu_tree_reductions)
    h = nn.swish(_group_norm(kit, h, self.num_groups, param_dtype, 'norm_out', dtype))
    h = _conv3x3(self.out_ch, dtype, param_dtype, 'conv_out', init_scale=0.0)(h)
    return h.astype(jnp.float32)


_UNET_FIELDS = (
  'ch',
  'out_ch',
  'ch_mult',
  'num_res_blocks',
  'attn_resolutions',
  'dropout',
  'resamp_with_conv',
  'num_groups',
  'dtype',
  'param_dtype',
  'remat',
  'num_classes',
)
_LAYER_FIELDS = ('layers', 'cpu_tree_reductions')


def _make(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> UNet:
  valid = _UNET_FIELDS + _LAYER_FIELDS
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    raise ValueError(f'unknown UNet field(s) {unknown}; valid fields are {list(valid)}.')
  fields = {**defaults, **overrides}
  for key in ('ch_mult', 'attn_resolutions'):  # hashable, comparable tuples
    if isinstance(fields[key], list):
      fields[key] = tuple(fields[key])
  return UNet(**fields)


def unet_cifar10(dropout: float = 0.1, dtype: Any = jnp.float32, **overrides) -> UNet:
  """CIFAR-10 model of the paper (TF ``unet2d16b2``): 35,746,307 parameters.

  ch=128, ch_mult=(1,2,2,2), num_res_blocks=2, attn_resolutions=(16,),
  dropout=0.1. ``overrides`` may set any other :class:`UNet` field
  (e.g. ``out_ch=6`` for learned variances, ``layers='cpu'``); unknown names
  raise ``ValueError``. The layers are the reference ones unless ``layers`` says otherwise.
  """
  defaults = dict(
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=dropout,
    resamp_with_conv=True,
    num_groups=32,
    dtype=dtype,
  )
  return _make(defaults, overrides)


def unet_256(dropout: float = 0.0, dtype: Any = jnp.float32, **overrides) -> UNet:
  """256x256 model (LSUN / CelebA-HQ, TF ``unet2d16b2c112244``): 113,673,219 parameters.

  ch=128, ch_mult=(1,1,2,2,4,4), num_res_blocks=2, attn_resolutions=(16,),
  dropout=0.0. Space-to-depth (``block_size`` > 1) of the TF code is not supported.
  ``overrides`` as in :func:`unet_cifar10`.
  """
  defaults = dict(
    ch=128,
    out_ch=3,
    ch_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=dropout,
    resamp_with_conv=True,
    num_groups=32,
    dtype=dtype,
  )
  return _make(defaults, overrides)
