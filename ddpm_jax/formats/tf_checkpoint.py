"""The original TensorFlow checkpoints (hojonathanho/diffusion): read them into our U-Net, and write ours as one.

**Reading.** The released checkpoints (e.g. ``model.ckpt-790000`` for CIFAR-10) are read with TensorFlow 2's
checkpoint reader. Our parameter tree mirrors the TF scopes (``model/down_1/attn_0/q/W`` ->
``down_1/attn_0/q/kernel``), so no transposes are needed: ``{scope}/<our path>/{W,b}`` for convs and dense
layers, ``{scope}/<our path>/{gamma,beta}`` for GroupNorm (REFERENCE section 3). The EMA shadow variables
(``.../ExponentialMovingAverage``) are loaded by default, as the paper's samples and scores use them; Adam
slots and counters are ignored. The architecture is read off the variable shapes (:func:`infer_model`).

**Writing.** :func:`write_checkpoint` writes what the original training saved: the raw weights under the
variable names above, their EMA under ``.../ExponentialMovingAverage`` and ``global_step`` (int64), as a
``<prefix>.index`` / ``<prefix>.data-00000-of-00001`` pair with a TF ``checkpoint`` state file beside it (so
``tf.train.latest_checkpoint(folder)`` finds it). No Adam slots: the export is for sampling, not for resuming
the original code's training. Beside it goes ``<prefix>.settings.json`` (ours; the original has no such file):
the image size, GroupNorm groups and sampling settings, which variable shapes cannot tell. The reader uses it
when it is there (see :func:`ddpm_jax.loading.load_tf_pretrained`), so an exported run samples as it did.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import traverse_util

from ddpm_jax import schedule as sched_lib
from ddpm_jax.formats.param_tree import abstract_params, format_list
from ddpm_jax.models.unet import UNet

if TYPE_CHECKING:  # the writer's argument type; loading imports this module, never the other way round
  from ddpm_jax.loading import LoadedModel

_log = logging.getLogger(__name__)

SCOPE = 'model'
EMA_SUFFIX = 'ExponentialMovingAverage'
SETTINGS_SUFFIX = '.settings.json'
# Variables of the original training that are not model weights.
_TF_IGNORED = re.compile(r'(/Adam(_1)?$|^global_step$|_power$|^beta[12]_power)')


def _is_norm(module: str) -> bool:
  return module in ('norm1', 'norm2', 'norm', 'norm_out')


def _tf_name(path: tuple[str, ...], scope: str) -> str:
  """The TF variable name of one of our parameters: ``down_0/block_0/conv1/kernel`` -> ``model/.../conv1/W``."""
  *mods, leaf = path
  if leaf == 'scale':
    tf_leaf = 'gamma'
  elif leaf == 'bias':
    tf_leaf = 'beta' if _is_norm(mods[-1]) else 'b'
  elif leaf == 'kernel':
    tf_leaf = 'W'
  else:
    raise ValueError(f'{"/".join(path)!r} has no variable in the original TF layout.')
  return '/'.join([scope, *mods, tf_leaf])


def to_variables(params: Mapping, *, scope: str = SCOPE) -> dict[str, np.ndarray]:
  """Our parameter tree -> TF variable names of the original code (``model/down_0/block_0/conv1/W``)."""
  return {
    _tf_name(path, scope): np.asarray(v, dtype=np.float32)
    for path, v in traverse_util.flatten_dict(dict(params)).items()
  }


def infer_model(
  var_shapes: Mapping[str, tuple[int, ...]],
  *,
  image_size: int | None = None,
  num_groups: int = 32,
  scope: str = SCOPE,
  source: str = 'checkpoint',
) -> tuple[UNet, int]:
  """Reconstructs the U-Net fields from the variable names and shapes of a TF checkpoint.

  The attention resolutions need the image size: 32 for a 4-level (CIFAR-10) and 256 for a 6-level
  (LSUN/CelebA-HQ) model unless ``image_size`` says otherwise. GroupNorm's group count does not show in the
  shapes (32 in all the paper's models; an exported run's settings file gives it).

  Returns:
    ``(model, image_size)``.
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
  # Without conv resampling the down/upsample layers have no variables (a 1-level model has neither).
  resamp_with_conv = num_levels == 1 or any(n.startswith(f'{scope}/down_0/downsample/') for n in var_shapes)
  model = UNet(
    ch=ch,
    out_ch=out_ch,
    ch_mult=ch_mult,
    num_res_blocks=nrb,
    attn_resolutions=tuple(image_size // 2**i for i in attn_levels),
    dropout=0.0,
    resamp_with_conv=resamp_with_conv,
    num_groups=num_groups,
  )
  return model, image_size


def open_checkpoint(ckpt_prefix: str) -> tuple[Any, dict[str, tuple[int, ...]]]:
  """(TF checkpoint reader, {variable name: shape}) of a checkpoint prefix, with clear errors.

  Raises:
    ImportError: TensorFlow is not installed. ValueError: not a readable checkpoint.
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy: only when a TF checkpoint is read
  except ImportError as e:
    raise ImportError('reading TF checkpoints needs tensorflow (tensorflow-cpu).') from e
  try:
    reader = tf.train.load_checkpoint(ckpt_prefix)
  except Exception as e:  # NotFoundError / DataLossError / ValueError depending on the damage
    raise ValueError(f'{ckpt_prefix}: not a readable TF checkpoint ({type(e).__name__}: {e}).') from e
  return reader, {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}


def read_params(
  reader: Any,
  var_shapes: Mapping[str, tuple[int, ...]],
  ckpt_prefix: str,
  model: UNet | None,
  *,
  ema: bool = True,
  image_size: int | None = None,
  scope: str = SCOPE,
) -> dict:
  """:func:`load_params` on an opened checkpoint (:func:`open_checkpoint`'s reader and variable shapes)."""
  if model is None:
    model, image_size = infer_model(var_shapes, image_size=image_size, scope=scope, source=ckpt_prefix)
  elif image_size is None:
    image_size = 32 if len(model.ch_mult) == 4 else 256
  in_ch = var_shapes.get(f'{scope}/conv_in/W', (0, 0, 3))[2]
  expected = traverse_util.flatten_dict(abstract_params(model, image_size, in_ch))

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
      f'{len(no_ema)} variable(s) have no EMA shadow ({format_list(no_ema)}); pass ema=False '
      'to load the raw training weights'
    )
  if missing:
    problems.append(f'{len(missing)} missing variable(s): {format_list(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected variable(s): {format_list(unexpected)}')
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatch(es): {format_list(mismatched)}')
  if problems:
    raise ValueError(
      f'{ckpt_prefix}: checkpoint does not match the U-Net ({model.ch_mult=}); ' + '; '.join(problems) + '.'
    )
  _log.info('Loaded %s weights from TF checkpoint %s.', 'EMA' if ema else 'raw (non-EMA)', ckpt_prefix)
  return traverse_util.unflatten_dict(out)


def load_params(
  ckpt_prefix: str, model: UNet | None = None, *, ema: bool = True, image_size: int | None = None, scope: str = SCOPE
) -> dict:
  """Reads an original TF DDPM checkpoint (hojonathanho/diffusion) into our parameter tree.

  With ``ema=True`` (default) the ``.../ExponentialMovingAverage`` shadow of every variable is loaded, which is
  what the paper sampled and evaluated with; ``ema=False`` loads the raw training weights. Adam slots and
  counters are ignored.

  Args:
    ckpt_prefix: checkpoint prefix, e.g. ``.../diffusion_cifar10_model/model.ckpt-790000`` (the files
      ``.index`` and ``.data-*`` next to it).
    model: the U-Net to load into; None infers it from the variable shapes (see :func:`infer_model`).
    ema: load the EMA weights (True) or the raw ones (False).
    image_size: image side for the inferred model (default 32 for 4 levels, 256 for 6).
    scope: the top-level variable scope.

  Returns:
    The parameter tree (float32 numpy arrays). Which weights were loaded is logged at INFO level.

  Raises:
    ValueError: unreadable checkpoint, or missing / mis-shaped / unexpected variables (all listed, with the
      checkpoint name). ImportError: TensorFlow is not installed.
  """
  reader, var_shapes = open_checkpoint(ckpt_prefix)
  return read_params(reader, var_shapes, ckpt_prefix, model, ema=ema, image_size=image_size, scope=scope)


# ------------------------------------------------------------------------------------------ settings file


def read_settings(ckpt_prefix: str) -> dict | None:
  """The settings :func:`write_checkpoint` put beside ``ckpt_prefix``, or None (the original checkpoints).

  Returns:
    ``{'image_size', 'num_groups', 'schedule' (a Schedule), 'var_type', 'clip_denoised', 'mean_type', 'path'}``.

  Raises:
    ValueError: a settings file that is not what :func:`write_checkpoint` writes, naming the file and key.
  """
  path = ckpt_prefix + SETTINGS_SUFFIX
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      data = json.load(f)
    out = dict(
      image_size=int(data['image_size']),
      num_groups=int(data['num_groups']),
      var_type=str(data['var_type']),
      clip_denoised=bool(data['clip_denoised']),
      mean_type=str(data['mean_type']),
      path=path,
    )
    s = data['schedule']
    if 'betas' in s:
      out['schedule'] = sched_lib.make_schedule(np.asarray(s['betas'], np.float64))
    else:
      out['schedule'] = sched_lib.get_schedule(
        s['name'], beta_start=s['beta_start'], beta_end=s['beta_end'], num_timesteps=s['num_timesteps']
      )
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: not a settings file written by export.py ({type(e).__name__}: {e}).') from e
  return out


def _settings(loaded: LoadedModel) -> dict:
  named = sched_lib.find_beta_schedule(loaded.schedule)
  return dict(
    image_size=int(loaded.image_size),
    num_groups=int(loaded.model.num_groups),
    var_type=loaded.var_type,
    clip_denoised=bool(loaded.clip_denoised),
    mean_type=loaded.mean_type,
    # By name when a named schedule gives exactly these tables; float32 betas would lose the float64 tables.
    schedule=named if named is not None else dict(betas=[float(b) for b in np.asarray(loaded.schedule.betas)]),
    source=loaded.source,
  )


# ---------------------------------------------------------------------------------------------- writer


def write_checkpoint(
  ckpt_prefix: str, loaded: LoadedModel, *, raw_params: Mapping | None = None, step: int = 0
) -> list[str]:
  """Writes ``loaded`` as an original-layout TF checkpoint (see the module docstring) plus its settings file.

  ``loaded.params`` (what the model samples with: a run's EMA weights) go to the ``.../ExponentialMovingAverage``
  shadows and ``raw_params`` to the plain variable names, as the original training saved them. Without
  ``raw_params`` (a model that has one set of weights, e.g. an imported release) both names hold
  ``loaded.params``, so ``ema=True`` and ``ema=False`` read the same weights. Everything is checked before
  the first file is written.

  Args:
    ckpt_prefix: e.g. ``exported/run/model.ckpt-5000``; its folder is created if missing.
    loaded: the model, its (EMA) parameters and its sampling settings.
    raw_params: the raw training weights (same tree as ``loaded.params``), or None.
    step: written as ``global_step``.

  Returns:
    The paths written.

  Raises:
    ValueError: a class-conditional model (the original layout has no class embedding), or a model whose
      variables do not determine it (checked by reading the architecture back off them).
    ImportError: TensorFlow is not installed.
  """
  if loaded.model.num_classes:
    raise ValueError(
      f"num_classes={loaded.model.num_classes}: the original TF layout has no class embedding (the paper's "
      'models are unconditional). Export class-conditional models with --format diffusers.'
    )
  ema = to_variables(loaded.params)
  raw = ema if raw_params is None else to_variables(raw_params)
  if set(raw) != set(ema) or any(raw[k].shape != ema[k].shape for k in ema):
    raise ValueError('raw_params and the EMA parameters must have the same variables and shapes.')
  settings = _settings(loaded)
  shapes = {k: v.shape for k, v in ema.items()}
  abstract = traverse_util.flatten_dict(abstract_params(loaded.model, loaded.image_size, loaded.in_channels))
  wrong = sorted(set(shapes) ^ {_tf_name(p, SCOPE) for p in abstract})
  wrong += [_tf_name(p, SCOPE) for p, a in abstract.items() if shapes.get(_tf_name(p, SCOPE), a.shape) != a.shape]
  if wrong:
    raise ValueError(f'{loaded.source}: the parameters do not match the model: {format_list(wrong)}.')

  back, _ = infer_model(
    shapes, image_size=loaded.image_size, num_groups=loaded.model.num_groups, source='the exported variables'
  )
  reread = traverse_util.flatten_dict(abstract_params(back, loaded.image_size, loaded.in_channels))
  if {_tf_name(p, SCOPE): tuple(a.shape) for p, a in reread.items()} != {k: tuple(v) for k, v in shapes.items()}:
    raise ValueError(
      f'The TF variables would be read back as a different U-Net ({back.config_fields()} instead of '
      f'{loaded.model.config_fields()}); this architecture cannot be written in the original layout.'
    )

  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy: only when a TF checkpoint is written

  variables = dict(raw)
  variables.update({f'{k}/{EMA_SUFFIX}': v for k, v in ema.items()})
  variables['global_step'] = np.asarray(step, np.int64)
  names = sorted(variables)
  folder = os.path.dirname(os.path.abspath(ckpt_prefix))
  os.makedirs(folder, exist_ok=True)
  with tf.device('/cpu:0'):
    tf.raw_ops.SaveV2(
      prefix=ckpt_prefix,
      tensor_names=names,
      shape_and_slices=[''] * len(names),
      tensors=[tf.constant(variables[n]) for n in names],
    )
  base = os.path.basename(ckpt_prefix)
  state_path = os.path.join(folder, 'checkpoint')
  with open(state_path, 'w') as f:  # what tf.train.latest_checkpoint reads
    f.write(f'model_checkpoint_path: "{base}"\nall_model_checkpoint_paths: "{base}"\n')
  with open(ckpt_prefix + SETTINGS_SUFFIX, 'w') as f:
    json.dump(settings, f, indent=2)
    f.write('\n')
  data = sorted(p for p in os.listdir(folder) if p.startswith(base + '.data-'))
  return [ckpt_prefix + '.index', *(os.path.join(folder, p) for p in data), state_path, ckpt_prefix + SETTINGS_SUFFIX]
