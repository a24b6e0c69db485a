"""The paper's released models: import diffusers-format and original TensorFlow checkpoints.

Two sources of the same weights:

* **diffusers folders** (the Hugging Face releases ``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256``,
  ``google/ddpm-church-256``, ``google/ddpm-bedroom-256``, ``google/ddpm-cat-256`` and the EMA twins
  ``google/ddpm-ema-{celebahq,church,bedroom,cat}-256``; see :data:`RELEASES`): a ``UNet2DModel``
  ``config.json`` plus ``diffusion_pytorch_model.safetensors`` (or ``.bin``), and a ``DDPMScheduler``
  ``scheduler_config.json``, either all at the folder root (the google/ddpm-* repos) or in ``unet/`` and
  ``scheduler/`` subfolders (what ``DDPMPipeline.save_pretrained`` writes). :func:`load_diffusers` reads
  them with numpy (``safetensors.numpy``, and ``ddpm_jax.torch_files`` for ``.bin`` files), checks that the
  configuration is one our :class:`~ddpm_jax.models.unet.UNet` represents exactly, maps every tensor by name and checks
  every shape. Nothing is loaded half-way: any missing, unexpected or mis-shaped tensor raises a
  ``ValueError`` that names the file and the tensors.
* **the original TF checkpoints** (github.com/hojonathanho/diffusion, e.g. ``model.ckpt-790000`` for
  CIFAR-10): :func:`load_tf_checkpoint` reads them with TensorFlow 2's checkpoint reader. Our parameter
  tree mirrors the TF scopes (``model/down_1/attn_0/q/W`` -> ``down_1/attn_0/q/kernel``), so no transposes
  are needed; the EMA shadow variables (``.../ExponentialMovingAverage``) are loaded by default, as the
  paper's samples and scores use them.

Name mapping, ours -> diffusers (``L`` levels; TF ``up_{i}`` is diffusers ``up_blocks[L-1-i]``)::

  temb/dense0, temb/dense1          time_embedding.linear_1, time_embedding.linear_2
  conv_in, norm_out, conv_out       conv_in, conv_norm_out, conv_out
  down_{i}/block_{j}/X              down_blocks.{i}.resnets.{j}.X  (temb_proj -> time_emb_proj,
                                                                     nin_shortcut -> conv_shortcut [1x1 conv])
  down_{i}/attn_{j}/{norm,q,k,v,proj_out}
                                    down_blocks.{i}.attentions.{j}.{group_norm,to_q,to_k,to_v,to_out.0}
                                    (older files: query, key, value, proj_attn; both are read)
  down_{i}/downsample/conv          down_blocks.{i}.downsamplers.0.conv
  mid/block_1, mid/attn_1, mid/block_2
                                    mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
  up_{i}/block_{j}, up_{i}/attn_{j} up_blocks.{L-1-i}.resnets.{j}, up_blocks.{L-1-i}.attentions.{j}
  up_{i}/upsample/conv              up_blocks.{L-1-i}.upsamplers.0.conv
  leaves kernel / scale / bias      weight / weight / bias; conv weights (O, I, kh, kw) -> (kh, kw, I, O),
                                    linear weights (O, I) -> (I, O)

Example (sampling with the official CIFAR-10 weights, in a folder or fetched from the hub)::

  pre = pretrained.load_pretrained('google/ddpm-cifar10-32')
  images = pretrained.sample(pre, jax.random.key(0), batch_size=16)   # [16, 32, 32, 3] in [-1, 1]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import sampling
from ddpm_jax import schedule as sched_lib
from ddpm_jax.models.unet import UNet

__all__ = [
  'Pretrained',
  'ReleaseInfo',
  'RELEASES',
  'load_pretrained',
  'load_diffusers',
  'load_tf_checkpoint',
  'fetch_hub',
  'unet_from_diffusers_config',
  'settings_from_scheduler_config',
  'to_diffusers_state_dict',
  'diffusers_config',
  'convert_diffusers_state_dict',
  'load_tf_pretrained',
  'release_for_architecture',
  'infer_tf_model',
  'to_tf_variables',
  'abstract_params',
  'make_sample_fn',
  'sample',
]

_log = logging.getLogger(__name__)

WEIGHTS_SAFETENSORS = 'diffusion_pytorch_model.safetensors'
WEIGHTS_BIN = 'diffusion_pytorch_model.bin'
WEIGHTS_INDEX = 'diffusion_pytorch_model.safetensors.index.json'
CONFIG = 'config.json'
SCHEDULER_CONFIG = 'scheduler_config.json'
EMA_SUFFIX = 'ExponentialMovingAverage'


def check_conditioning(model: UNet, class_label: Any, guidance_scale: float) -> None:
  """Raises ValueError (before anything compiles) for labels or guidance the model cannot use.

  Args:
    model: the U-Net (``model.num_classes`` 0 = unconditional).
    class_label: None, an int or an int array of labels in ``0..num_classes`` (``num_classes`` = null class).
    guidance_scale: classifier-free guidance weight, >= 0.
  """
  k = getattr(model, 'num_classes', 0)
  if not k:
    if class_label is not None:
      raise ValueError(
        f'class_label={class_label!r} given, but this model is unconditional (num_classes=0); drop --class_label.'
      )
    if guidance_scale:
      raise ValueError(
        f'guidance_scale={guidance_scale!r} needs a class-conditional model (this one has '
        'num_classes=0); use --guidance_scale 0.'
      )
    return
  if not guidance_scale >= 0:
    raise ValueError(f'guidance_scale must be >= 0 (0 = no guidance), got {guidance_scale!r}.')
  if class_label is None:
    raise ValueError(
      f'This model is class-conditional (num_classes={k}): pass a class label in 0..{k - 1} '
      f'(or {k}, the null class, for unconditional samples).'
    )
  labels = np.asarray(class_label)
  if labels.dtype.kind not in 'iu' or labels.size == 0 or labels.min() < 0 or labels.max() > k:
    raise ValueError(f'class_label must be ints in 0..{k - 1} (or {k}, the null class); got {class_label!r}.')


class Pretrained(NamedTuple):
  """A released model, ready for the samplers.

  Attributes:
    model: the :class:`UNet` (architecture fields from the checkpoint's configuration).
    params: its parameter tree (float32 numpy arrays), ``model.apply({'params': params}, x, t, train=False)``.
    schedule: the forward process it was trained with.
    var_type: reverse variance, 'fixedlarge' (sigma^2 = beta, CIFAR-10) or 'fixedsmall' (beta-tilde, 256^2).
    clip_denoised: clip the x_0 estimate to [-1, 1] at every step (True for all releases).
    mean_type: network parameterization ('eps' for all releases).
    image_size: the square image side the model was trained on (attention placement depends on it).
    in_channels: image channels.
    source: human-readable origin, e.g. "diffusers folder /x (diffusion_pytorch_model.safetensors)".
  """

  model: UNet
  params: Any
  schedule: sched_lib.Schedule
  var_type: str
  clip_denoised: bool
  mean_type: str
  image_size: int
  in_channels: int
  source: str

  def denoise_fn(self, params: Any = None, *, class_label: Any = None, guidance_scale: float = 0.0):
    """``denoise_fn(x_t, t)`` for :mod:`ddpm_jax.sampling` (pass ``params`` when jitting over them).

    Args:
      params: parameters (default ``self.params``).
      class_label: for a class-conditional model, an int or [B] ints in 0..K-1 (the model's ``null_label()``
        for unconditional samples); must be None for an unconditional model.
      guidance_scale: classifier-free guidance weight w (conditional models only; 0 = none).
    """
    params = self.params if params is None else params
    check_conditioning(self.model, class_label, guidance_scale)
    if class_label is None:
      return lambda x, t: self.model.apply({'params': params}, x, t, train=False)
    model_fn = lambda x, t, y: self.model.apply({'params': params}, x, t, y, train=False)

    def denoise_fn(x, t):
      labels = jnp.broadcast_to(jnp.asarray(class_label, jnp.int32), (x.shape[0],))
      return sampling.classifier_free_guidance(
        model_fn, labels, null_label=self.model.null_label(), guidance_scale=guidance_scale
      )(x, t)

    return denoise_fn

  def sample_kwargs(self) -> dict:
    """Keyword arguments of :func:`ddpm_jax.sampling.p_sample_loop` for this release."""
    return dict(mean_type=self.mean_type, var_type=self.var_type, clip_denoised=self.clip_denoised)


@dataclasses.dataclass(frozen=True)
class ReleaseInfo:
  """What we expect of one of the paper's released models (used to validate and as fallbacks).

  Attributes:
    repo_id: Hugging Face repository.
    image_size: image side.
    var_type: sampling variance (the TF code: fixedlarge for CIFAR-10, the posterior variance for the
      LSUN/CelebA-HQ code path; the hub scheduler configs say fixed_large / fixed_small accordingly).
    clip_denoised: x_0 clipping (TF default True; hub ``clip_sample: true``).
    ch_mult: architecture levels (ch = 128, 2 blocks per level, attention at 16x16).
    tf_checkpoint: name of the released TF checkpoint (pesser/pytorch_diffusion scripts/convert.py), if any.
    paper_fid: FID reported in the paper (CIFAR-10: vs the training set).
    ema: True for the repos that hold the EMA weights; None where the model card does not say (the
      google/ddpm-*-256 repos have "ema" twins, so they presumably hold the raw weights; for CIFAR-10
      there is no twin and whether google/ddpm-cifar10-32 is EMA is not documented).
  """

  repo_id: str
  image_size: int
  var_type: str
  clip_denoised: bool
  ch_mult: tuple[int, ...]
  tf_checkpoint: str | None
  paper_fid: float | None
  ema: bool | None = None


def _lsun_like(repo_id: str, tf_checkpoint: str | None, paper_fid: float | None, ema: bool | None):
  return ReleaseInfo(repo_id, 256, 'fixedsmall', True, (1, 1, 2, 2, 4, 4), tf_checkpoint, paper_fid, ema)


RELEASES: dict[str, ReleaseInfo] = {
  r.repo_id: r
  for r in (
    ReleaseInfo('google/ddpm-cifar10-32', 32, 'fixedlarge', True, (1, 2, 2, 2), 'model.ckpt-790000', 3.17, None),
    _lsun_like('google/ddpm-celebahq-256', None, None, None),
    _lsun_like('google/ddpm-church-256', 'model.ckpt-4432000', 7.89, None),
    _lsun_like('google/ddpm-bedroom-256', 'model.ckpt-2388000', 6.36, None),
    _lsun_like('google/ddpm-cat-256', 'model.ckpt-1761000', 19.75, None),
    # Separate repos named "ema" hold the EMA weights of the 256x256 models (what the paper sampled).
    _lsun_like('google/ddpm-ema-celebahq-256', None, None, True),
    _lsun_like('google/ddpm-ema-church-256', 'model.ckpt-4432000', 7.89, True),
    _lsun_like('google/ddpm-ema-bedroom-256', 'model.ckpt-2388000', 6.36, True),
    _lsun_like('google/ddpm-ema-cat-256', 'model.ckpt-1761000', 19.75, True),
  )
}


# ---------------------------------------------------------------------------------------------- helpers


def abstract_params(model: UNet, image_size: int, in_channels: int = 3) -> dict:
  """The parameter tree ``model`` expects, as ``ShapeDtypeStruct`` leaves (builds nothing)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
  return dict(variables['params'])


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _level(name: str, prefix: str) -> int:
  return int(name[len(prefix) :])


# Module names inside a ResBlock / attention block, ours -> diffusers.
_RESNET_CHILD = {
  'norm1': 'norm1',
  'conv1': 'conv1',
  'temb_proj': 'time_emb_proj',
  'norm2': 'norm2',
  'conv2': 'conv2',
  'nin_shortcut': 'conv_shortcut',
}
_ATTN_CHILD = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out.0'}
_ATTN_CHILD_LEGACY = {'norm': 'group_norm', 'q': 'query', 'k': 'key', 'v': 'value', 'proj_out': 'proj_attn'}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def _diffusers_names(path: tuple[str, ...], num_levels: int) -> list[str]:
  """Diffusers state-dict name(s) of one of our parameters: [current] or [current, legacy]."""
  *mods, leaf = path
  if leaf not in _LEAF:
    raise ValueError(f'unexpected parameter leaf {"/".join(path)!r}')
  suffix = _LEAF[leaf]

  def block(parts: list[str]) -> list[str]:
    """Maps [block_j|attn_j|downsample|upsample, child] to diffusers (one or two alternatives)."""
    head, child = parts[0], parts[1]
    if head.startswith('block_'):
      return [f'resnets.{_level(head, "block_")}.{_RESNET_CHILD[child]}']
    if head.startswith('attn_'):
      j = _level(head, 'attn_')
      names = [f'attentions.{j}.{_ATTN_CHILD[child]}']
      if _ATTN_CHILD_LEGACY[child] != _ATTN_CHILD[child]:
        names.append(f'attentions.{j}.{_ATTN_CHILD_LEGACY[child]}')
      return names
    if head == 'downsample':
      return ['downsamplers.0.conv']
    if head == 'upsample':
      return ['upsamplers.0.conv']
    raise ValueError(f'unexpected module {"/".join(path)!r}')

  top = mods[0]
  if top == 'temb':
    bases = [{'dense0': 'time_embedding.linear_1', 'dense1': 'time_embedding.linear_2'}[mods[1]]]
  elif top in ('conv_in', 'conv_out'):
    bases = [top]
  elif top == 'norm_out':
    bases = ['conv_norm_out']
  elif top.startswith('down_'):
    bases = [f'down_blocks.{_level(top, "down_")}.{b}' for b in block(mods[1:])]
  elif top.startswith('up_'):
    bases = [f'up_blocks.{num_levels - 1 - _level(top, "up_")}.{b}' for b in block(mods[1:])]
  elif top == 'mid':
    head = mods[1]
    renamed = {'block_1': 'block_0', 'block_2': 'block_1', 'attn_1': 'attn_0'}[head]
    bases = [f'mid_block.{b}' for b in block([renamed] + mods[2:])]
  else:
    raise ValueError(f'unexpected module {"/".join(path)!r}')
  return [f'{b}.{suffix}' for b in bases]


def _from_torch_layout(arr: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
  """PyTorch layout -> ours: conv (O,I,kh,kw)->(kh,kw,I,O); linear (O,I)->(I,O); 1x1 conv (O,I,1,1)->(I,O)."""
  if len(want) == 4 and arr.ndim == 4:
    return np.transpose(arr, (2, 3, 1, 0))
  if len(want) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
    return arr[:, :, 0, 0].T
  if len(want) == 2 and arr.ndim == 2:
    return arr.T
  return arr


def to_diffusers_state_dict(params: Mapping, *, legacy_attention_names: bool = False) -> dict[str, np.ndarray]:
  """Our parameter tree -> a diffusers ``UNet2DModel`` state dict of numpy arrays (the inverse mapping).

  Args:
    params: our U-Net parameters.
    legacy_attention_names: write attention weights under the pre-2023 names (query/key/value/proj_attn).

  Returns:
    dict name -> float32 array in PyTorch layout (``nin_shortcut`` as a 1x1 conv, as diffusers stores it).
  """
  flat = _flatten(params)
  num_levels = len({p[0] for p in flat if p[0].startswith('down_')})
  out = {}
  for path, v in flat.items():
    names = _diffusers_names(path, num_levels)
    name = names[-1] if legacy_attention_names else names[0]
    arr = np.asarray(v, dtype=np.float32)
    if arr.ndim == 4:
      arr = np.transpose(arr, (3, 2, 0, 1))
    elif arr.ndim == 2:
      arr = arr.T
      if path[-2] == 'nin_shortcut':
        arr = arr[:, :, None, None]
    out[name] = np.ascontiguousarray(arr)
  return out


def diffusers_config(model: UNet, image_size: int, in_channels: int = 3) -> dict:
  """The diffusers ``UNet2DModel`` ``config.json`` equivalent to ``model`` (the inverse of
  :func:`unet_from_diffusers_config`)."""
  if getattr(model, 'num_classes', 0):
    raise ValueError(
      f'Only unconditional models map to the DDPM UNet2DModel layout; this one has num_classes={model.num_classes}.'
    )
  levels = len(model.ch_mult)
  attn = [image_size // 2**i in model.attn_resolutions for i in range(levels)]
  return dict(
    _class_name='UNet2DModel',
    sample_size=image_size,
    in_channels=in_channels,
    out_channels=model.out_ch,
    center_input_sample=False,
    time_embedding_type='positional',
    flip_sin_to_cos=False,
    freq_shift=1,
    down_block_types=['AttnDownBlock2D' if a else 'DownBlock2D' for a in attn],
    up_block_types=['AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn)],
    block_out_channels=[model.ch * m for m in model.ch_mult],
    layers_per_block=model.num_res_blocks,
    mid_block_scale_factor=1,
    downsample_padding=0,
    dropout=model.dropout,
    act_fn='silu',
    attention_head_dim=None,
    norm_num_groups=model.num_groups,
    norm_eps=1e-6,
    resnet_time_scale_shift='default',
    add_attention=True,
  )


def to_tf_variables(params: Mapping, *, scope: str = 'model') -> dict[str, np.ndarray]:
  """Our parameter tree -> TF variable names of the original code (``model/down_0/block_0/conv1/W``)."""
  rename = {'kernel': 'W', 'bias': 'b'}
  out = {}
  for path, v in _flatten(params).items():
    *mods, leaf = path
    if leaf == 'scale':
      tf_leaf = 'gamma'
    elif leaf == 'bias' and _is_norm(mods[-1]):
      tf_leaf = 'beta'
    else:
      tf_leaf = rename[leaf]
    out['/'.join([scope, *mods, tf_leaf])] = np.asarray(v, dtype=np.float32)
  return out


def _is_norm(module: str) -> bool:
  return module in ('norm1', 'norm2', 'norm', 'norm_out')


def _format_list(items: list[str], limit: int = 12) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f', ... ({len(items) - limit} more)' if len(items) > limit else '')


# ----------------------------------------------------------------------------------------- diffusers

# UNet2DModel's constructor defaults (diffusers 0.42): a key missing from config.json means this value.
_UNET2D_DEFAULTS: dict[str, Any] = dict(
  sample_size=None,
  in_channels=3,
  out_channels=3,
  center_input_sample=False,
  time_embedding_type='positional',
  time_embedding_dim=None,
  freq_shift=0,
  flip_sin_to_cos=True,
  down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
  mid_block_type='UNetMidBlock2D',
  up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
  block_out_channels=(224, 448, 672, 896),
  layers_per_block=2,
  mid_block_scale_factor=1,
  downsample_padding=1,
  downsample_type='conv',
  upsample_type='conv',
  dropout=0.0,
  act_fn='silu',
  attention_head_dim=8,
  norm_num_groups=32,
  attn_norm_num_groups=None,
  norm_eps=1e-5,
  resnet_time_scale_shift='default',
  add_attention=True,
  class_embed_type=None,
  num_class_embeds=None,
  num_train_timesteps=None,
)

# DDPMScheduler's constructor defaults (diffusers 0.42).
_DDPM_SCHEDULER_DEFAULTS: dict[str, Any] = dict(
  num_train_timesteps=1000,
  beta_start=0.0001,
  beta_end=0.02,
  beta_schedule='linear',
  trained_betas=None,
  variance_type='fixed_small',
  clip_sample=True,
  prediction_type='epsilon',
  thresholding=False,
  clip_sample_range=1.0,
  rescale_betas_zero_snr=False,
)


def unet_from_diffusers_config(config: Mapping[str, Any], *, source: str = 'config.json') -> tuple[UNet, int, int]:
  """Builds the :class:`UNet` equivalent to a diffusers ``UNet2DModel`` configuration.

  Only configurations that our U-Net computes exactly are accepted: sinusoidal embedding with sin first
  and denominator half-1 (``flip_sin_to_cos=False``, ``freq_shift=1``), ``DownBlock2D``/``AttnDownBlock2D``
  and mirrored ``UpBlock2D``/``AttnUpBlock2D`` blocks, single-head attention, the mid block with
  attention, GroupNorm eps 1e-6, TF 'SAME' stride-2 padding (``downsample_padding=0``), conv resampling,
  silu, no class conditioning.

  Args:
    config: the parsed ``config.json``.
    source: file name used in error messages.

  Returns:
    ``(model, image_size, in_channels)``.

  Raises:
    ValueError: naming the file, the offending key and value, and what is supported.
  """
  cls = config.get('_class_name', 'UNet2DModel' if 'block_out_channels' in config else None)
  if cls != 'UNet2DModel':
    raise ValueError(
      f'{source}: _class_name is {cls!r}; only diffusers UNet2DModel configs are supported '
      '(re-save older "UNetModel" checkpoints with a current diffusers first).'
    )
  c = {**_UNET2D_DEFAULTS, **config}

  def bad(key: str, want: str):
    raise ValueError(f'{source}: {key} = {c[key]!r} cannot be represented by the DDPM U-Net (needs {want}).')

  exact = dict(
    time_embedding_type='positional',
    flip_sin_to_cos=False,
    center_input_sample=False,
    mid_block_type='UNetMidBlock2D',
    downsample_type='conv',
    upsample_type='conv',
    resnet_time_scale_shift='default',
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=None,
  )
  for key, want in exact.items():
    if c[key] != want:
      bad(key, repr(want))
  if c['freq_shift'] != 1:
    bad('freq_shift', '1 (frequency denominator half - 1, as in the TF code)')
  if c['downsample_padding'] != 0:
    bad('downsample_padding', "0 (TF 'SAME' stride-2 padding: 0 before, 1 after)")
  if c['act_fn'] not in ('silu', 'swish'):
    bad('act_fn', "'silu'")
  if c['mid_block_scale_factor'] != 1:
    bad('mid_block_scale_factor', '1')
  if not isinstance(c['norm_eps'], (int, float)) or not math.isclose(c['norm_eps'], 1e-6, rel_tol=1e-6):
    bad('norm_eps', '1e-6 (the GroupNorm epsilon of the original)')
  groups = c['norm_num_groups']
  if c['attn_norm_num_groups'] not in (None, groups):
    bad('attn_norm_num_groups', f'None or norm_num_groups={groups}')

  boc = [int(b) for b in c['block_out_channels']]
  down, up = list(c['down_block_types']), list(c['up_block_types'])
  num_levels = len(boc)
  if len(down) != num_levels or len(up) != num_levels:
    raise ValueError(
      f'{source}: block_out_channels {boc}, down_block_types {down} and up_block_types {up} must have the same length.'
    )
  for key, types, allowed in (
    ('down_block_types', down, ('DownBlock2D', 'AttnDownBlock2D')),
    ('up_block_types', up, ('UpBlock2D', 'AttnUpBlock2D')),
  ):
    unknown = [b for b in types if b not in allowed]
    if unknown:
      raise ValueError(f'{source}: {key} contains {unknown}; only {allowed} are supported.')
  attn_down = [i for i, b in enumerate(down) if b == 'AttnDownBlock2D']
  attn_up = sorted(num_levels - 1 - k for k, b in enumerate(up) if b == 'AttnUpBlock2D')
  if attn_down != attn_up:
    raise ValueError(
      f'{source}: attention in down levels {attn_down} but in up levels {attn_up} (up_block_types '
      f'listed deepest first); the DDPM U-Net attends at the same resolutions on both paths.'
    )
  ch = boc[0]
  if any(b % ch for b in boc):
    raise ValueError(f'{source}: block_out_channels {boc} must all be multiples of the first entry {ch}.')
  if c['time_embedding_dim'] not in (None, 4 * ch):
    bad('time_embedding_dim', f'None or 4 * block_out_channels[0] = {4 * ch}')
  head_dim = c['attention_head_dim']
  attn_channels = sorted({boc[i] for i in attn_down} | {boc[-1]})
  if head_dim is not None and any(head_dim != a for a in attn_channels):
    bad('attention_head_dim', f'None (single-head attention; attention blocks here have {attn_channels} channels)')
  size = c['sample_size']
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      bad('sample_size', 'a square image size')
    size = size[0]
  if not isinstance(size, int) or size < 1:
    bad('sample_size', 'a positive int (the image side)')
  factor = 2 ** (num_levels - 1)
  if size % factor:
    bad('sample_size', f'a multiple of 2**(levels-1) = {factor}')
  if c['out_channels'] != c['in_channels']:
    bad('out_channels', f'in_channels = {c["in_channels"]} (eps prediction; learned variances are not supported)')
  fields = dict(
    ch=ch,
    out_ch=int(c['out_channels']),
    ch_mult=tuple(b // ch for b in boc),
    num_res_blocks=int(c['layers_per_block']),
    attn_resolutions=tuple(size // 2**i for i in attn_down),
    dropout=float(c['dropout']),
    resamp_with_conv=True,
    num_groups=int(groups),
  )
  try:
    model = UNet(**fields)
  except ValueError as e:
    raise ValueError(f'{source}: {e}') from e
  return model, int(size), int(c['in_channels'])


def settings_from_scheduler_config(
  config: Mapping[str, Any], *, source: str = 'scheduler_config.json'
) -> tuple[sched_lib.Schedule, str, bool, str]:
  """Maps a diffusers ``DDPMScheduler`` configuration to ``(schedule, var_type, clip_denoised, mean_type)``.

  ``fixed_large``/``fixed_large_log`` -> 'fixedlarge' (sigma^2 = beta_t), ``fixed_small``/``fixed_small_log``
  -> 'fixedsmall' (beta-tilde_t); ``clip_sample`` -> ``clip_denoised`` (range must be 1);
  ``prediction_type`` 'epsilon' -> 'eps', 'sample' -> 'xstart'. Beta schedules: linear, scaled_linear (our
  'quad'), squaredcos_cap_v2 (our 'cosine'), or explicit ``trained_betas``. Our tables are computed in
  float64 (diffusers uses float32; the difference is ~1e-7 relative).

  Raises:
    ValueError: for a scheduler we cannot reproduce, naming the key.
  """
  cls = config.get('_class_name', 'DDPMScheduler')
  if cls != 'DDPMScheduler':
    raise ValueError(
      f'{source}: _class_name is {cls!r}; only DDPMScheduler configs carry the variance '
      'type. Pass var_type= and clip_denoised= explicitly to load this model.'
    )
  c = {**_DDPM_SCHEDULER_DEFAULTS, **config}
  n = int(c['num_train_timesteps'])
  if c['trained_betas'] is not None:
    schedule = sched_lib.make_schedule(np.asarray(c['trained_betas'], dtype=np.float64))
  else:
    names = {'linear': 'linear', 'scaled_linear': 'quad', 'squaredcos_cap_v2': 'cosine'}
    if c['beta_schedule'] not in names:
      raise ValueError(
        f'{source}: beta_schedule = {c["beta_schedule"]!r} is not supported; choose one of {sorted(names)}.'
      )
    schedule = sched_lib.get_schedule(
      names[c['beta_schedule']], beta_start=float(c['beta_start']), beta_end=float(c['beta_end']), num_timesteps=n
    )
  variances = {
    'fixed_large': 'fixedlarge',
    'fixed_large_log': 'fixedlarge',
    'fixed_small': 'fixedsmall',
    'fixed_small_log': 'fixedsmall',
  }
  if c['variance_type'] not in variances:
    raise ValueError(
      f'{source}: variance_type = {c["variance_type"]!r} is not supported; choose one of {sorted(variances)}.'
    )
  predictions = {'epsilon': 'eps', 'sample': 'xstart'}
  if c['prediction_type'] not in predictions:
    raise ValueError(
      f'{source}: prediction_type = {c["prediction_type"]!r} is not supported; choose one of {sorted(predictions)}.'
    )
  if c['thresholding']:
    raise ValueError(f'{source}: thresholding = true (dynamic thresholding) is not supported.')
  if c['rescale_betas_zero_snr']:
    raise ValueError(f'{source}: rescale_betas_zero_snr = true is not supported.')
  clip = bool(c['clip_sample'])
  if clip and float(c['clip_sample_range']) != 1.0:
    raise ValueError(f'{source}: clip_sample_range = {c["clip_sample_range"]!r}; only 1.0 is supported.')
  return schedule, variances[c['variance_type']], clip, predictions[c['prediction_type']]


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e}).') from e
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object.')
  return data


def _load_state_dict(unet_dir: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads the weights of a diffusers model folder: ({name: array}, {name: file it came from})."""
  st_path = os.path.join(unet_dir, WEIGHTS_SAFETENSORS)
  index_path = os.path.join(unet_dir, WEIGHTS_INDEX)
  bin_path = os.path.join(unet_dir, WEIGHTS_BIN)
  if os.path.isfile(st_path) or os.path.isfile(index_path):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    if os.path.isfile(st_path):
      files = [st_path]
    else:
      files = sorted({os.path.join(unet_dir, f) for f in _read_json(index_path).get('weight_map', {}).values()})
    tensors, origin = {}, {}
    for f in files:
      try:
        part = load_file(f)
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f'{f}: cannot read safetensors file ({type(e).__name__}: {e}).') from e
      tensors.update(part)
      origin.update({k: f for k in part})
    return tensors, origin
  if os.path.isfile(bin_path):
    from ddpm_jax import torch_files  # pylint: disable=g-import-not-at-top

    try:
      sd = torch_files.load_state_dict(bin_path)  # numpy only: no torch at run time
    except Exception as e:
      raise ValueError(f'{bin_path}: cannot read PyTorch weights ({type(e).__name__}: {e}).') from e
    tensors = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    return tensors, {k: bin_path for k in tensors}
  raise ValueError(
    f'{unet_dir}: no weights found (looked for {WEIGHTS_SAFETENSORS}, {WEIGHTS_INDEX} and {WEIGHTS_BIN}).'
  )


def convert_diffusers_state_dict(
  state_dict: Mapping[str, np.ndarray], expected: Mapping, *, source: str = 'state dict'
) -> dict:
  """Maps a diffusers state dict onto our parameter tree, checking names and shapes.

  Args:
    state_dict: name -> array (PyTorch layouts).
    expected: our parameter tree (arrays or ``ShapeDtypeStruct``s; see :func:`abstract_params`).
    source: file name used in error messages.

  Returns:
    The parameter tree (float32 numpy arrays).

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor, with the file name.
  """
  flat = _flatten(expected)
  num_levels = len({p[0] for p in flat if p[0].startswith('down_')})
  used, missing, mismatched, out = set(), [], [], {}
  for path, leaf in flat.items():
    want = tuple(leaf.shape)
    names = _diffusers_names(path, num_levels)
    name = next((n for n in names if n in state_dict), None)
    if name is None:
      missing.append(f'{names[0]} (-> {"/".join(path)})')
      continue
    used.add(name)
    arr = _from_torch_layout(np.asarray(state_dict[name]), want)
    if tuple(arr.shape) != want:
      mismatched.append(f'{name}: file shape {tuple(np.shape(state_dict[name]))}, model needs {"/".join(path)} {want}')
      continue
    out[path] = np.ascontiguousarray(arr, dtype=np.float32)
  unexpected = sorted(set(state_dict) - used)
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing tensor(s): {_format_list(missing)}')
  if unexpected:
    problems.append(
      f'{len(unexpected)} unexpected tensor(s) (not part of the configured architecture): {_format_list(unexpected)}'
    )
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatch(es): {_format_list(mismatched)}')
  if problems:
    raise ValueError(
      f'{source}: the weights do not match the architecture in config.json; ' + '; '.join(problems) + '.'
    )
  return _unflatten(out)


def _resolve_folder(folder: str) -> tuple[str, str | None]:
  """(folder with the UNet config + weights, scheduler config path or None), for both layouts."""
  if not os.path.isdir(folder):
    raise ValueError(f'{folder}: not a folder.')
  if os.path.isfile(os.path.join(folder, CONFIG)):
    unet_dir = folder
  elif os.path.isfile(os.path.join(folder, 'unet', CONFIG)):
    unet_dir = os.path.join(folder, 'unet')
  else:
    raise ValueError(
      f'{folder}: not a diffusers checkpoint folder: expected {CONFIG} and {WEIGHTS_SAFETENSORS} (or '
      f'{WEIGHTS_BIN}) either in the folder itself (google/ddpm-* layout) or in its unet/ subfolder.'
    )
  sched = None
  for p in (os.path.join(folder, SCHEDULER_CONFIG), os.path.join(folder, 'scheduler', SCHEDULER_CONFIG)):
    if os.path.isfile(p):
      sched = p
      break
  return unet_dir, sched


def load_diffusers(
  path_or_repo_id: str,
  *,
  var_type: str | None = None,
  clip_denoised: bool | None = None,
  cache_dir: str | None = None,
  allow_download: bool = True,
) -> Pretrained:
  """Loads a diffusers-format DDPM (``UNet2DModel`` + ``DDPMScheduler``) into our U-Net and samplers.

  Args:
    path_or_repo_id: a local folder (repo-root or ``unet/`` + ``scheduler/`` layout), or a Hugging Face
      repo id such as ``google/ddpm-cifar10-32`` (downloaded with :func:`fetch_hub` if it is not a folder).
    var_type: override the variance type ('fixedlarge'/'fixedsmall'); needed when there is no
      scheduler config and the model is not one of :data:`RELEASES`.
    clip_denoised: override x_0 clipping likewise.
    cache_dir: where :func:`fetch_hub` puts downloads (default: huggingface_hub's cache).
    allow_download: if False, a repo id that is not a local folder is an error.

  Returns:
    A :class:`Pretrained`.

  Raises:
    ValueError: unsupported folder/config, or weights that do not match (names file and tensors).
    ImportError: a download without huggingface_hub.
  """
  folder = path_or_repo_id
  if not os.path.isdir(folder):
    if _looks_like_repo_id(folder) and allow_download:
      folder = fetch_hub(folder, cache_dir)
    else:
      raise ValueError(
        f'{path_or_repo_id}: not a folder'
        + (' (and downloads are disabled)' if _looks_like_repo_id(folder) else '')
        + '.'
      )
  unet_dir, sched_path = _resolve_folder(folder)
  config_path = os.path.join(unet_dir, CONFIG)
  model, image_size, in_channels = unet_from_diffusers_config(_read_json(config_path), source=config_path)

  release = _match_release(path_or_repo_id)
  if sched_path is not None:
    sched_cfg = _read_json(sched_path)
    if var_type is not None:  # overridden: the file's variance type (or scheduler class) does not matter
      sched_cfg.update(_class_name='DDPMScheduler', variance_type='fixed_small')
    schedule, sched_var, sched_clip, mean_type = settings_from_scheduler_config(sched_cfg, source=sched_path)
  elif release is not None or var_type is not None:
    schedule, mean_type = sched_lib.get_schedule('linear'), 'eps'
    sched_var = release.var_type if release else None
    sched_clip = release.clip_denoised if release else True
  else:
    raise ValueError(
      f'{folder}: no {SCHEDULER_CONFIG} (looked in the folder and in scheduler/); pass '
      "var_type= ('fixedlarge' or 'fixedsmall') and clip_denoised= explicitly."
    )
  var_type = sched_var if var_type is None else var_type
  clip_denoised = sched_clip if clip_denoised is None else bool(clip_denoised)
  if var_type not in ('fixedlarge', 'fixedsmall'):
    raise ValueError(f"var_type must be 'fixedlarge' or 'fixedsmall'; got {var_type!r}.")
  if release is not None and (var_type, clip_denoised) != (release.var_type, release.clip_denoised):
    _log.warning(
      '%s: sampling with var_type=%s clip_denoised=%s, which differs from the release '
      'settings var_type=%s clip_denoised=%s.',
      path_or_repo_id,
      var_type,
      clip_denoised,
      release.var_type,
      release.clip_denoised,
    )

  state_dict, origin = _load_state_dict(unet_dir)
  files = sorted(set(origin.values()))
  source_name = files[0] if len(files) == 1 else f'{unet_dir} ({len(files)} weight files)'
  expected = abstract_params(model, image_size, in_channels)
  params = convert_diffusers_state_dict(state_dict, expected, source=source_name)
  source = f'diffusers {path_or_repo_id} ({", ".join(os.path.basename(f) for f in files)})'
  _log.info(
    'Loaded %s: ch=%d ch_mult=%s attn=%s, var_type=%s, clip_denoised=%s.',
    source,
    model.ch,
    model.ch_mult,
    model.attn_resolutions,
    var_type,
    clip_denoised,
  )
  return Pretrained(
    model=model,
    params=params,
    schedule=schedule,
    var_type=var_type,
    clip_denoised=clip_denoised,
    mean_type=mean_type,
    image_size=image_size,
    in_channels=in_channels,
    source=source,
  )


def _looks_like_repo_id(s: str) -> bool:
  return bool(re.fullmatch(r'[A-Za-z0-9][\w.-]*/[\w.-]+', s)) and not s.startswith(('.', '/'))


def _match_release(path_or_repo_id: str) -> ReleaseInfo | None:
  key = path_or_repo_id.rstrip('/')
  if key in RELEASES:
    return RELEASES[key]
  base = os.path.basename(key)
  matches = [r for r in RELEASES.values() if r.repo_id.split('/')[1] == base]
  return matches[0] if len(matches) == 1 else None


def fetch_hub(repo_id: str, dest: str | None = None) -> str:
  """Downloads a diffusers repo's config and weights with ``huggingface_hub`` (never used by tests).

  Args:
    repo_id: e.g. ``google/ddpm-cifar10-32``.
    dest: local folder to download into (default: huggingface_hub's cache).

  Returns:
    The local folder.

  Raises:
    ImportError: huggingface_hub is not installed.
    OSError: the download failed (e.g. no network); the message says how to pass a local folder instead.
  """
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f'{repo_id} is not a local folder and huggingface_hub is not installed; '
      'pip install huggingface_hub, or download the repo and pass its folder.'
    ) from e
  patterns = [
    '*.json',
    WEIGHTS_SAFETENSORS,
    f'*/{WEIGHTS_SAFETENSORS}',
    'diffusion_pytorch_model*.safetensors',
    f'*/{CONFIG}',
    f'*/{SCHEDULER_CONFIG}',
  ]
  try:
    folder = snapshot_download(repo_id, local_dir=dest, allow_patterns=patterns)
    if not _has_weights(folder):  # some repos ship .bin only
      folder = snapshot_download(repo_id, local_dir=dest, allow_patterns=patterns + [WEIGHTS_BIN, f'*/{WEIGHTS_BIN}'])
  except Exception as e:  # network errors come in many types
    raise OSError(
      f'{repo_id} is not a local folder and could not be downloaded ({type(e).__name__}: {e}). '
      'Without network, download the repo elsewhere and pass its local folder instead.'
    ) from e
  return folder


def _has_weights(folder: str) -> bool:
  return any(
    os.path.isfile(os.path.join(folder, sub, w)) for sub in ('', 'unet') for w in (WEIGHTS_SAFETENSORS, WEIGHTS_INDEX)
  )


# ---------------------------------------------------------------------------------------------- TF


def _tf_name(path: tuple[str, ...], scope: str) -> str:
  *mods, leaf = path
  if leaf == 'scale':
    tf_leaf = 'gamma'
  elif leaf == 'bias':
    tf_leaf = 'beta' if _is_norm(mods[-1]) else 'b'
  else:
    tf_leaf = 'W'
  return '/'.join([scope, *mods, tf_leaf])


_TF_IGNORED = re.compile(r'(/Adam(_1)?$|^global_step$|_power$|^beta[12]_power)')


def infer_tf_model(
  var_shapes: Mapping[str, tuple[int, ...]],
  *,
  image_size: int | None = None,
  scope: str = 'model',
  source: str = 'checkpoint',
) -> tuple[UNet, int]:
  """Reconstructs the U-Net fields from the variable names and shapes of a TF checkpoint.

  The attention resolutions need the image size: 32 for a 4-level (CIFAR-10) and 256 for a 6-level
  (LSUN/CelebA-HQ) model unless ``image_size`` says otherwise.
  """

  def shape(name):
    if name not in var_shapes:
      raise ValueError(f'{source}: no variable {name!r}; not a DDPM U-Net checkpoint under scope {scope!r}.')
    return var_shapes[name]

  ch = shape(f'{scope}/conv_in/W')[3]
  out_ch = shape(f'{scope}/conv_out/W')[3]
  levels = sorted({int(m.group(1)) for n in var_shapes if (m := re.match(rf'{re.escape(scope)}/down_(\d+)/', n))})
  if not levels or levels != list(range(len(levels))):
    raise ValueError(f'{source}: cannot find levels {scope}/down_0 ... in the checkpoint.')
  num_levels = len(levels)
  nrb = len({n.split('/')[2] for n in var_shapes if n.startswith(f'{scope}/down_0/block_')})
  ch_mult = tuple(shape(f'{scope}/down_{i}/block_0/conv1/W')[3] // ch for i in levels)
  if image_size is None:
    image_size = {4: 32, 6: 256}.get(num_levels)
    if image_size is None:
      raise ValueError(f'{source}: {num_levels} levels; pass image_size= (or model=) to place attention.')
  attn_levels = [i for i in levels if f'{scope}/down_{i}/attn_0/q/W' in var_shapes]
  model = UNet(
    ch=ch,
    out_ch=out_ch,
    ch_mult=ch_mult,
    num_res_blocks=nrb,
    attn_resolutions=tuple(image_size // 2**i for i in attn_levels),
    dropout=0.0,
  )
  return model, image_size


def _tf_reader(ckpt_prefix: str):
  """(TF checkpoint reader, {variable name: shape}) of a checkpoint prefix, with clear errors."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('reading TF checkpoints needs tensorflow (tensorflow-cpu).') from e
  try:
    reader = tf.train.load_checkpoint(ckpt_prefix)
  except Exception as e:  # NotFoundError / DataLossError / ValueError depending on the damage
    raise ValueError(f'{ckpt_prefix}: not a readable TF checkpoint ({type(e).__name__}: {e}).') from e
  return reader, {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}


def load_tf_checkpoint(
  ckpt_prefix: str, model: UNet | None = None, *, ema: bool = True, image_size: int | None = None, scope: str = 'model'
) -> dict:
  """Reads an original TF DDPM checkpoint (hojonathanho/diffusion) into our parameter tree.

  Variables are matched by name: ``{scope}/<our path>/{W,b}`` for convs and dense layers,
  ``{scope}/<our path>/{gamma,beta}`` for GroupNorm (see REFERENCE section 3). With ``ema=True`` (default)
  the ``.../ExponentialMovingAverage`` shadow of every variable is loaded, which is what the paper sampled
  and evaluated with; ``ema=False`` loads the raw training weights. Adam slots and counters are ignored.

  Args:
    ckpt_prefix: checkpoint prefix, e.g. ``.../diffusion_cifar10_model/model.ckpt-790000`` (the files
      ``.index`` and ``.data-*`` next to it).
    model: the U-Net to load into; None infers it from the variable shapes (see :func:`infer_tf_model`).
    ema: load the EMA weights (True) or the raw ones (False).
    image_size: image side for the inferred model (default 32 for 4 levels, 256 for 6).
    scope: the top-level variable scope.

  Returns:
    The parameter tree (float32 numpy arrays). Which weights were loaded is logged at INFO level.

  Raises:
    ValueError: unreadable checkpoint, or missing / mis-shaped / unexpected variables (all listed, with the
      checkpoint name). ImportError: TensorFlow is not installed.
  """
  reader, var_shapes = _tf_reader(ckpt_prefix)
  return _params_from_tf(reader, var_shapes, ckpt_prefix, model, ema=ema, image_size=image_size, scope=scope)


def _params_from_tf(
  reader,
  var_shapes: Mapping[str, tuple[int, ...]],
  ckpt_prefix: str,
  model: UNet | None,
  *,
  ema: bool,
  image_size: int | None,
  scope: str,
) -> dict:
  """:func:`load_tf_checkpoint` on an opened checkpoint (``_tf_reader``'s reader and variable shapes)."""
  if model is None:
    model, image_size = infer_tf_model(var_shapes, image_size=image_size, scope=scope, source=ckpt_prefix)
  elif image_size is None:
    image_size = 32 if len(model.ch_mult) == 4 else 256
  in_ch = var_shapes.get(f'{scope}/conv_in/W', (0, 0, 3))[2]
  expected = _flatten(abstract_params(model, image_size, in_ch))

  used, missing, mismatched, no_ema, out = set(), [], [], [], {}
  for path, leaf in expected.items():
    base = _tf_name(path, scope)
    name = f'{base}/{EMA_SUFFIX}' if ema else base
    if name not in var_shapes:
      (no_ema if ema and base in var_shapes else missing).append(name)
      continue
    used.update({name, base, f'{base}/{EMA_SUFFIX}'})
    if var_shapes[name] != tuple(leaf.shape):
      mismatched.append(f'{name}: checkpoint {var_shapes[name]}, model needs {"/".join(path)} {tuple(leaf.shape)}')
      continue
    out[path] = np.asarray(reader.get_tensor(name), dtype=np.float32)
  unexpected = sorted(
    n for n in var_shapes if n.startswith(f'{scope}/') and n not in used and not _TF_IGNORED.search(n)
  )
  problems = []
  if no_ema:
    problems.append(
      f'{len(no_ema)} variable(s) have no EMA shadow ({_format_list(no_ema)}); pass ema=False '
      'to load the raw training weights'
    )
  if missing:
    problems.append(f'{len(missing)} missing variable(s): {_format_list(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected variable(s): {_format_list(unexpected)}')
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatch(es): {_format_list(mismatched)}')
  if problems:
    raise ValueError(
      f'{ckpt_prefix}: checkpoint does not match the U-Net ({model.ch_mult=}); ' + '; '.join(problems) + '.'
    )
  _log.info('Loaded %s weights from TF checkpoint %s.', 'EMA' if ema else 'raw (non-EMA)', ckpt_prefix)
  return _unflatten(out)


def release_for_architecture(image_size: int, ch_mult: tuple[int, ...]) -> ReleaseInfo | None:
  """The first of :data:`RELEASES` with this resolution and channel multipliers (None if no release has them)."""
  for info in RELEASES.values():
    if info.image_size == image_size and tuple(info.ch_mult) == tuple(ch_mult):
      return info
  return None


def load_tf_pretrained(ckpt_prefix: str, release: str | None = None, *, ema: bool = True) -> Pretrained:
  """A released TF checkpoint as a :class:`Pretrained`.

  The architecture is read off the checkpoint (:func:`infer_tf_model`); the sampling settings are those of
  ``release`` (one of :data:`RELEASES`) or, by default, of the release with the same architecture: the
  CIFAR-10 settings (sigma^2 = beta) for ``model.ckpt-790000``, the LSUN/CelebA-HQ ones (sigma^2 = beta-tilde)
  for the 256x256 checkpoints, as in the original code. A checkpoint that matches no release samples with
  sigma^2 = beta at 32x32 and beta-tilde otherwise, with a warning.
  """
  if release is not None and release not in RELEASES:
    raise ValueError(f'Unknown release {release!r}; choose one of {sorted(RELEASES)}.')
  info = RELEASES[release] if release is not None else None
  reader, var_shapes = _tf_reader(ckpt_prefix)
  model, image_size = infer_tf_model(var_shapes, image_size=info.image_size if info else None, source=ckpt_prefix)
  if info is None:
    info = release_for_architecture(image_size, model.ch_mult)
  if info is not None:
    var_type, clip, what = info.var_type, info.clip_denoised, f'settings of {info.repo_id}'
  else:
    var_type, clip, what = ('fixedlarge' if image_size == 32 else 'fixedsmall'), True, 'default settings'
    _log.warning('%s matches no released architecture; sampling with var_type=%s and clipping.', ckpt_prefix, var_type)
  params = _params_from_tf(reader, var_shapes, ckpt_prefix, model, ema=ema, image_size=image_size, scope='model')
  return Pretrained(
    model=model,
    params=params,
    schedule=sched_lib.get_schedule('linear'),
    var_type=var_type,
    clip_denoised=clip,
    mean_type='eps',
    image_size=image_size,
    in_channels=var_shapes['model/conv_in/W'][2],
    source=f'TF checkpoint {ckpt_prefix} ({"EMA" if ema else "raw"} weights, {what})',
  )


# --------------------------------------------------------------------------------------- entry point


def load_pretrained(spec: str, **kwargs) -> Pretrained:
  """What ``sample.py --pretrained SPEC`` calls: a diffusers folder or repo id, or a TF checkpoint prefix.

  A TF checkpoint (``SPEC.index`` exists) is read with :func:`load_tf_pretrained` (the settings of the release
  with its architecture unless ``release=`` names one of :data:`RELEASES`); anything else goes to
  :func:`load_diffusers`.
  """
  if os.path.isfile(spec + '.index'):
    return load_tf_pretrained(spec, **kwargs)
  return load_diffusers(spec, **kwargs)


def make_sample_fn(pre: Pretrained, batch_size: int):
  """A jitted ``fn(params, key) -> [batch_size, S, S, C]`` running the paper's ancestral sampler.

  Compile once, call per batch with a fresh key (e.g. ``jax.random.fold_in(root, batch_index)``). The
  samples are not clipped or quantized: save them with ``clip(x, -1, 1)`` then ``(x + 1) * 127.5``.
  """
  shape = (batch_size, pre.image_size, pre.image_size, pre.in_channels)
  schedule, kwargs, model = pre.schedule, pre.sample_kwargs(), pre.model

  @jax.jit
  def fn(params, key):
    denoise_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
    return sampling.p_sample_loop(schedule, denoise_fn, shape, key, **kwargs)

  return fn


def sample(pre: Pretrained, key: jax.Array, batch_size: int) -> jax.Array:
  """One batch from :func:`make_sample_fn` (compiles on every call; loop with ``make_sample_fn`` instead)."""
  return make_sample_fn(pre, batch_size)(pre.params, key)
