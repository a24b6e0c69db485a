"""diffusers folders (``UNet2DModel`` + ``DDPMScheduler``): read them into our U-Net, and write ours as one.

**Reading.** The paper's models are on the Hugging Face hub as diffusers folders (``google/ddpm-cifar10-32``,
``google/ddpm-{celebahq,church,bedroom,cat}-256`` and the EMA twins ``google/ddpm-ema-*-256``; see
:mod:`ddpm_jax.releases`): a ``UNet2DModel`` ``config.json`` plus ``diffusion_pytorch_model.safetensors`` (or
``.bin``), and a ``DDPMScheduler`` ``scheduler_config.json``, either all at the folder root (the google/ddpm-*
repos) or in ``unet/`` and ``scheduler/`` subfolders (what ``DDPMPipeline.save_pretrained`` writes). The pieces
here read them with numpy (``safetensors.numpy``, and :mod:`ddpm_jax.torch_files` for ``.bin`` files), check
that the configuration is one our :class:`~ddpm_jax.models.unet.UNet` represents exactly, map every tensor by
name and check every shape; :func:`ddpm_jax.loading.load_diffusers` puts them together. Nothing is loaded
half-way: any missing, unexpected or mis-shaped tensor raises a ``ValueError`` that names the file and the
tensors.

**Writing.** :func:`write_folder` writes a model in the google/ddpm-* layout: ``config.json``,
``diffusion_pytorch_model.safetensors``, ``scheduler_config.json`` and ``model_index.json``, all at the folder
root. ``UNet2DModel.from_pretrained(folder)`` reads the root files, and ``DDPMPipeline.from_pretrained(folder)``
reads ``model_index.json`` and, finding no ``unet/`` or ``scheduler/`` subfolder, loads each component from
the root (diffusers 0.42, ``pipeline_loading_utils.load_sub_model``), so one copy of the weights serves both.

Name mapping, ours -> diffusers (``L`` levels; TF ``up_{i}`` is diffusers ``up_blocks[L-1-i]``)::

  temb/dense0, temb/dense1          time_embedding.linear_1, time_embedding.linear_2
  label_emb (class-conditional)     class_embedding ([K + 1, 4ch], no transpose)
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

Class conditioning: diffusers' ``num_class_embeds`` (with ``class_embed_type: null``) adds
``nn.Embedding(num_class_embeds, 4ch)(class_labels)`` to the timestep MLP's output, which is exactly our
``label_emb``; a config with ``num_class_embeds = K + 1`` is read as ``num_classes = K`` with row K the null
class (the convention of our class-conditional models, which :func:`unet_config` writes).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from ddpm_jax import schedule as sched_lib
from ddpm_jax import torch_files
from ddpm_jax.formats.param_tree import abstract_params, format_list
from ddpm_jax.models.unet import UNet

if TYPE_CHECKING:  # the writer's argument type; loading imports this module, never the other way round
  from ddpm_jax.loading import LoadedModel

WEIGHTS_SAFETENSORS = 'diffusion_pytorch_model.safetensors'
WEIGHTS_BIN = 'diffusion_pytorch_model.bin'
WEIGHTS_INDEX = 'diffusion_pytorch_model.safetensors.index.json'
CONFIG = 'config.json'
SCHEDULER_CONFIG = 'scheduler_config.json'
MODEL_INDEX = 'model_index.json'

# ------------------------------------------------------------------------------------------ tensor names

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
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'embedding': 'weight'}


def _level(name: str, prefix: str) -> int:
  return int(name[len(prefix) :])


def _names(path: tuple[str, ...], num_levels: int) -> list[str]:
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
  elif top == 'label_emb':
    bases = ['class_embedding']
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


def _num_levels(flat: Mapping[tuple[str, ...], Any]) -> int:
  return len({p[0] for p in flat if p[0].startswith('down_')})


def _from_torch_layout(arr: np.ndarray, want: tuple[int, ...], leaf: str) -> np.ndarray:
  """PyTorch layout -> ours: conv (O,I,kh,kw)->(kh,kw,I,O); linear (O,I)->(I,O); 1x1 conv (O,I,1,1)->(I,O).

  Embedding tables are [rows, features] in both.
  """
  if leaf == 'embedding':
    return arr
  if len(want) == 4 and arr.ndim == 4:
    return np.transpose(arr, (2, 3, 1, 0))
  if len(want) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
    return arr[:, :, 0, 0].T
  if len(want) == 2 and arr.ndim == 2:
    return arr.T
  return arr


def to_state_dict(params: Mapping, *, legacy_attention_names: bool = False) -> dict[str, np.ndarray]:
  """Our parameter tree -> a diffusers ``UNet2DModel`` state dict of numpy arrays (the exporter's weights).

  Args:
    params: our U-Net parameters.
    legacy_attention_names: write attention weights under the pre-2023 names (query/key/value/proj_attn).

  Returns:
    dict name -> float32 array in PyTorch layout (``nin_shortcut`` as a 1x1 conv, as diffusers stores it).
  """
  flat = traverse_util.flatten_dict(dict(params))
  num_levels = _num_levels(flat)
  out = {}
  for path, v in flat.items():
    names = _names(path, num_levels)
    name = names[-1] if legacy_attention_names else names[0]
    arr = np.asarray(v, dtype=np.float32)
    if path[-1] == 'embedding':
      pass  # nn.Embedding.weight is [rows, features], as ours
    elif arr.ndim == 4:
      arr = np.transpose(arr, (3, 2, 0, 1))
    elif arr.ndim == 2:
      arr = arr.T
      if path[-2] == 'nin_shortcut':
        arr = arr[:, :, None, None]
    out[name] = np.ascontiguousarray(arr)
  return out


def params_from_state_dict(
  state_dict: Mapping[str, np.ndarray], expected: Mapping, *, source: str = 'state dict'
) -> dict:
  """Maps a diffusers state dict onto our parameter tree, checking names and shapes (the importer's weights).

  Args:
    state_dict: name -> array (PyTorch layouts).
    expected: our parameter tree (arrays or ``ShapeDtypeStruct``s; see
      :func:`ddpm_jax.formats.param_tree.abstract_params`).
    source: file name used in error messages.

  Returns:
    The parameter tree (float32 numpy arrays).

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor, with the file name.
  """
  flat = traverse_util.flatten_dict(dict(expected))
  num_levels = _num_levels(flat)
  used, missing, mismatched, out = set(), [], [], {}
  for path, leaf in flat.items():
    want = tuple(leaf.shape)
    names = _names(path, num_levels)
    name = next((n for n in names if n in state_dict), None)
    if name is None:
      missing.append(f'{names[0]} (-> {"/".join(path)})')
      continue
    used.add(name)
    arr = _from_torch_layout(np.asarray(state_dict[name]), want, path[-1])
    if tuple(arr.shape) != want:
      mismatched.append(f'{name}: file shape {tuple(np.shape(state_dict[name]))}, model needs {"/".join(path)} {want}')
      continue
    out[path] = np.ascontiguousarray(arr, dtype=np.float32)
  unexpected = sorted(set(state_dict) - used)
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing tensor(s): {format_list(missing)}')
  if unexpected:
    problems.append(
      f'{len(unexpected)} unexpected tensor(s) (not part of the configured architecture): {format_list(unexpected)}'
    )
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatch(es): {format_list(mismatched)}')
  if problems:
    raise ValueError(
      f'{source}: the weights do not match the architecture in config.json; ' + '; '.join(problems) + '.'
    )
  return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------------ UNet2DModel config

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


def unet_from_config(config: Mapping[str, Any], *, source: str = CONFIG) -> tuple[UNet, int, int]:
  """Builds the :class:`UNet` equivalent to a diffusers ``UNet2DModel`` configuration.

  Only configurations that our U-Net computes exactly are accepted: sinusoidal embedding with sin first
  and denominator half-1 (``flip_sin_to_cos=False``, ``freq_shift=1``), ``DownBlock2D``/``AttnDownBlock2D``
  and mirrored ``UpBlock2D``/``AttnUpBlock2D`` blocks, single-head attention, the mid block with
  attention, GroupNorm eps 1e-6, TF 'SAME' stride-2 padding (``downsample_padding=0``), conv resampling,
  silu, and either no class conditioning or ``num_class_embeds`` = K + 1 (read as K classes and the null
  class K).

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
  )
  for key, want in exact.items():
    if c[key] != want:
      bad(key, repr(want))
  n_class = c['num_class_embeds']
  if n_class is not None and (not isinstance(n_class, int) or isinstance(n_class, bool) or n_class < 2):
    bad('num_class_embeds', 'None, or K + 1 >= 2: K classes and the null class in the last row')
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
    num_classes=0 if n_class is None else n_class - 1,
  )
  try:
    model = UNet(**fields)
  except ValueError as e:
    raise ValueError(f'{source}: {e}') from e
  return model, int(size), int(c['in_channels'])


def unet_config(model: UNet, image_size: int, in_channels: int = 3) -> dict:
  """The diffusers ``UNet2DModel`` ``config.json`` equivalent to ``model`` (the inverse of
  :func:`unet_from_config`).

  Raises:
    ValueError: for a model ``UNet2DModel`` cannot compute exactly (average-pool resampling, or output
      channels other than the image's, i.e. a learned variance), naming the field.
  """
  if not model.resamp_with_conv:
    raise ValueError(
      'resamp_with_conv=False (average-pool / plain-repeat resampling) has no UNet2DModel equivalent: '
      "diffusers' DownBlock2D/UpBlock2D always resample with a convolution. Export with --format tf instead."
    )
  if model.out_ch != in_channels:
    raise ValueError(
      f'out_ch={model.out_ch} with {in_channels} image channels (a learned variance) cannot be written as a '
      'UNet2DModel that DDPMScheduler samples correctly (its "learned" variance reads the extra channels as a '
      'variance, "learned_range" as an interpolation weight; ours are a log-variance). Export with --format tf.'
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
    class_embed_type=None,
    num_class_embeds=model.num_classes + 1 if model.num_classes else None,
  )


# ----------------------------------------------------------------------------------- DDPMScheduler config

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
# diffusers beta_schedule -> ours.
_BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'quad', 'squaredcos_cap_v2': 'cosine'}
_VARIANCES = {
  'fixed_large': 'fixedlarge',
  'fixed_large_log': 'fixedlarge',
  'fixed_small': 'fixedsmall',
  'fixed_small_log': 'fixedsmall',
}
_PREDICTIONS = {'epsilon': 'eps', 'sample': 'xstart'}


def settings_from_scheduler_config(
  config: Mapping[str, Any], *, source: str = SCHEDULER_CONFIG
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
    if c['beta_schedule'] not in _BETA_SCHEDULES:
      raise ValueError(
        f'{source}: beta_schedule = {c["beta_schedule"]!r} is not supported; choose one of {sorted(_BETA_SCHEDULES)}.'
      )
    schedule = sched_lib.get_schedule(
      _BETA_SCHEDULES[c['beta_schedule']],
      beta_start=float(c['beta_start']),
      beta_end=float(c['beta_end']),
      num_timesteps=n,
    )
  if c['variance_type'] not in _VARIANCES:
    raise ValueError(
      f'{source}: variance_type = {c["variance_type"]!r} is not supported; choose one of {sorted(_VARIANCES)}.'
    )
  if c['prediction_type'] not in _PREDICTIONS:
    raise ValueError(
      f'{source}: prediction_type = {c["prediction_type"]!r} is not supported; choose one of {sorted(_PREDICTIONS)}.'
    )
  if c['thresholding']:
    raise ValueError(f'{source}: thresholding = true (dynamic thresholding) is not supported.')
  if c['rescale_betas_zero_snr']:
    raise ValueError(f'{source}: rescale_betas_zero_snr = true is not supported.')
  clip = bool(c['clip_sample'])
  if clip and float(c['clip_sample_range']) != 1.0:
    raise ValueError(f'{source}: clip_sample_range = {c["clip_sample_range"]!r}; only 1.0 is supported.')
  return schedule, _VARIANCES[c['variance_type']], clip, _PREDICTIONS[c['prediction_type']]


def scheduler_config(schedule: sched_lib.Schedule, *, var_type: str, clip_denoised: bool, mean_type: str) -> dict:
  """The ``DDPMScheduler`` ``scheduler_config.json`` for our settings (the inverse of
  :func:`settings_from_scheduler_config`).

  The betas are written as a named schedule (our 'linear', 'quad' and 'cosine' are diffusers' ``linear``,
  ``scaled_linear`` and ``squaredcos_cap_v2``, with ``beta_start``/``beta_end``/``num_train_timesteps``) when
  that name gives exactly our tables (:func:`ddpm_jax.schedule.find_beta_schedule`), and as the explicit
  ``trained_betas`` list otherwise (e.g. our 'jsd' or 'warmup10' schedules; read back, their tables then come
  from the float32 betas, within ~1e-7 relative of ours).

  Raises:
    ValueError: for settings ``DDPMScheduler`` cannot express: ``var_type='learned'`` (ours is a predicted
      log-variance) or ``mean_type='xprev'``.
  """
  to_variance = {'fixedlarge': 'fixed_large', 'fixedsmall': 'fixed_small'}
  to_prediction = {ours: theirs for theirs, ours in _PREDICTIONS.items()}
  if var_type not in to_variance:
    raise ValueError(
      f'var_type={var_type!r} has no DDPMScheduler equivalent (variance_type "learned" reads the extra '
      'channels as a variance, "learned_range" as an interpolation weight; ours are a log-variance); only '
      "'fixedlarge' and 'fixedsmall' export to diffusers. Export with --format tf instead."
    )
  if mean_type not in to_prediction:
    raise ValueError(
      f"mean_type={mean_type!r} has no DDPMScheduler prediction_type (it knows 'epsilon', 'sample' and "
      "'v_prediction'); only 'eps' and 'xstart' export to diffusers. Export with --format tf instead."
    )
  base = dict(
    _class_name='DDPMScheduler',
    num_train_timesteps=int(schedule.num_timesteps),
    variance_type=to_variance[var_type],
    clip_sample=bool(clip_denoised),
    clip_sample_range=1.0,
    prediction_type=to_prediction[mean_type],
    thresholding=False,
  )
  named = sched_lib.find_beta_schedule(schedule)
  to_diffusers = {ours: theirs for theirs, ours in _BETA_SCHEDULES.items()}
  if named is not None and named['name'] in to_diffusers:
    return dict(
      base,
      beta_schedule=to_diffusers[named['name']],
      beta_start=named['beta_start'],
      beta_end=named['beta_end'],
      trained_betas=None,
    )
  betas = [float(b) for b in np.asarray(schedule.betas, np.float64)]
  return dict(base, beta_schedule='linear', trained_betas=betas)


# --------------------------------------------------------------------------------------------- folders


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e}).') from e
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object.')
  return data


def resolve_folder(folder: str) -> tuple[str, str | None]:
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


def read_unet_config(unet_dir: str) -> tuple[UNet, int, int]:
  """``(model, image_size, in_channels)`` from ``unet_dir/config.json`` (see :func:`unet_from_config`)."""
  path = os.path.join(unet_dir, CONFIG)
  return unet_from_config(_read_json(path), source=path)


def read_scheduler_config(path: str, *, ignore_variance: bool = False) -> tuple[sched_lib.Schedule, str, bool, str]:
  """``(schedule, var_type, clip_denoised, mean_type)`` from a ``scheduler_config.json``.

  Args:
    path: the file.
    ignore_variance: the caller overrides the variance type, so the file's variance type (or scheduler
      class) does not matter; its betas still do.
  """
  config = _read_json(path)
  if ignore_variance:
    config.update(_class_name='DDPMScheduler', variance_type='fixed_small')
  return settings_from_scheduler_config(config, source=path)


def read_state_dict(unet_dir: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads the weights of a diffusers model folder: ``({name: array}, {name: file it came from})``.

  Reads ``diffusion_pytorch_model.safetensors`` (or its sharded index), else ``diffusion_pytorch_model.bin``
  with :mod:`ddpm_jax.torch_files` (numpy only: no torch at run time).
  """
  st_path = os.path.join(unet_dir, WEIGHTS_SAFETENSORS)
  index_path = os.path.join(unet_dir, WEIGHTS_INDEX)
  bin_path = os.path.join(unet_dir, WEIGHTS_BIN)
  if os.path.isfile(st_path) or os.path.isfile(index_path):
    if os.path.isfile(st_path):
      files = [st_path]
    else:
      files = sorted({os.path.join(unet_dir, f) for f in _read_json(index_path).get('weight_map', {}).values()})
    tensors, origin = {}, {}
    for f in files:
      try:
        part = safetensors_numpy.load_file(f)
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f'{f}: cannot read safetensors file ({type(e).__name__}: {e}).') from e
      tensors.update(part)
      origin.update({k: f for k in part})
    return tensors, origin
  if os.path.isfile(bin_path):
    try:
      sd = torch_files.load_state_dict(bin_path)
    except Exception as e:
      raise ValueError(f'{bin_path}: cannot read PyTorch weights ({type(e).__name__}: {e}).') from e
    tensors = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    return tensors, {k: bin_path for k in tensors}
  raise ValueError(
    f'{unet_dir}: no weights found (looked for {WEIGHTS_SAFETENSORS}, {WEIGHTS_INDEX} and {WEIGHTS_BIN}).'
  )


def read_params(unet_dir: str, model: UNet, image_size: int, in_channels: int) -> tuple[dict, list[str]]:
  """The weights of ``unet_dir`` as ``model``'s parameter tree, and the files they came from.

  Raises:
    ValueError: unreadable files, or tensors that do not match ``model`` (all listed, with the file name).
  """
  state_dict, origin = read_state_dict(unet_dir)
  files = sorted(set(origin.values()))
  source = files[0] if len(files) == 1 else f'{unet_dir} ({len(files)} weight files)'
  expected = abstract_params(model, image_size, in_channels)
  return params_from_state_dict(state_dict, expected, source=source), files


# ------------------------------------------------------------------------------------------------- hub


def looks_like_repo_id(s: str) -> bool:
  """True for ``owner/name`` strings (a hub repo id rather than a local path)."""
  return bool(re.fullmatch(r'[A-Za-z0-9][\w.-]*/[\w.-]+', s)) and not s.startswith(('.', '/'))


def local_folder(path_or_repo_id: str, *, cache_dir: str | None = None, allow_download: bool = True) -> str:
  """The local folder of a diffusers model: the path itself, or a hub repo id downloaded by :func:`fetch_hub`.

  Raises:
    ValueError: neither a folder nor (with ``allow_download``) a repo id.
  """
  if os.path.isdir(path_or_repo_id):
    return path_or_repo_id
  if looks_like_repo_id(path_or_repo_id) and allow_download:
    return fetch_hub(path_or_repo_id, cache_dir)
  raise ValueError(
    f'{path_or_repo_id}: not a folder'
    + (' (and downloads are disabled)' if looks_like_repo_id(path_or_repo_id) else '')
    + '.'
  )


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
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top  # the optional hub extra
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


# ---------------------------------------------------------------------------------------------- writer


def write_folder(folder: str, loaded: LoadedModel) -> list[str]:
  """Writes ``loaded`` as a diffusers folder in the google/ddpm-* layout (see the module docstring).

  Every file's content is computed and checked before the first one is written, so a model diffusers cannot
  represent raises before ``folder`` is touched.

  Args:
    folder: the output folder (created if missing; existing files of the same names are replaced).
    loaded: the model, its parameters and sampling settings.

  Returns:
    The paths written.

  Raises:
    ValueError: for a model or settings diffusers cannot represent (see :func:`unet_config` and
      :func:`scheduler_config`).
  """
  unet = unet_config(loaded.model, loaded.image_size, loaded.in_channels)
  scheduler = scheduler_config(
    loaded.schedule, var_type=loaded.var_type, clip_denoised=loaded.clip_denoised, mean_type=loaded.mean_type
  )
  state_dict = to_state_dict(loaded.params)
  # The parameters must be the configured model's: reading them back through the importer checks every name
  # and shape against the config just written.
  params_from_state_dict(
    state_dict, abstract_params(loaded.model, loaded.image_size, loaded.in_channels), source=loaded.source
  )
  model_index = dict(
    _class_name='DDPMPipeline', scheduler=['diffusers', 'DDPMScheduler'], unet=['diffusers', 'UNet2DModel']
  )
  os.makedirs(folder, exist_ok=True)
  paths = []
  for name, content in ((CONFIG, unet), (SCHEDULER_CONFIG, scheduler), (MODEL_INDEX, model_index)):
    paths.append(os.path.join(folder, name))
    with open(paths[-1], 'w') as f:
      json.dump(content, f, indent=2)
      f.write('\n')
  paths.append(os.path.join(folder, WEIGHTS_SAFETENSORS))
  safetensors_numpy.save_file(state_dict, paths[-1], metadata={'format': 'pt'})
  return paths
