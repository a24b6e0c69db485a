"""Helpers shared by the tests of the formats, the loaders and export (not a test module itself).

Synthetic diffusers folders are written from our own parameters through the exporter's name mapping
(``diffusers_format.to_state_dict`` + ``safetensors.numpy``), TF checkpoints with ``tf.raw_ops.SaveV2`` under
the original variable names, and training workdirs (``config.json`` + an orbax checkpoint of a ``TrainState``)
directly, without training, in a second or two.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from ddpm_jax import checkpoint as checkpoint_lib
from ddpm_jax import train_lib
from ddpm_jax.formats import diffusers as diffusers_format
from ddpm_jax.formats import param_tree
from ddpm_jax.formats import tf_checkpoint as tf_format
from ddpm_jax.models import unet as unet_lib

IMAGE_SIZE = 16
TINY = unet_lib.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)

DDPM_SCHEDULER = dict(
  _class_name='DDPMScheduler',
  num_train_timesteps=1000,
  beta_start=0.0001,
  beta_end=0.02,
  beta_schedule='linear',
  variance_type='fixed_large',
  clip_sample=True,
)


def random_params(model=TINY, image_size=IMAGE_SIZE, seed=0, in_channels=3):
  """Random values everywhere (GroupNorm scales and biases too), so that any mix-up shows. Only the tree
  structure comes from the model (eval_shape: nothing is run)."""
  abstract = param_tree.abstract_params(model, image_size, in_channels)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


def write_diffusers_folder(
  folder, params, *, config=None, scheduler=DDPM_SCHEDULER, layout='root', legacy=False, state_dict=None
):
  unet_dir = folder if layout == 'root' else folder / 'unet'
  unet_dir.mkdir(parents=True, exist_ok=True)
  config = config or diffusers_format.unet_config(TINY, IMAGE_SIZE)
  (unet_dir / 'config.json').write_text(json.dumps(config))
  if state_dict is None:
    state_dict = diffusers_format.to_state_dict(params, legacy_attention_names=legacy)
  safetensors_numpy.save_file(state_dict, str(unet_dir / diffusers_format.WEIGHTS_SAFETENSORS))
  if scheduler is not None:
    sched_dir = folder if layout == 'root' else folder / 'scheduler'
    sched_dir.mkdir(parents=True, exist_ok=True)
    (sched_dir / 'scheduler_config.json').write_text(json.dumps(scheduler))
  return str(folder)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_schedules_equal(a, b):
  for name, x, y in zip(a._fields, a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def write_tf_checkpoint(tf, prefix, variables):
  names = sorted(variables)
  tf.raw_ops.SaveV2(
    prefix=str(prefix),
    tensor_names=names,
    shape_and_slices=[''] * len(names),
    tensors=[tf.constant(variables[n]) for n in names],
  )
  return str(prefix)


def tf_variables(params, *, ema=True, optimizer=True):
  """The variables the original training saved: raw weights, EMA shadows (raw + 1 here), Adam slots, counters."""
  raw = tf_format.to_variables(params)
  out = dict(raw)
  if ema:
    out.update({f'{k}/ExponentialMovingAverage': v + 1.0 for k, v in raw.items()})
  if optimizer:
    out.update({f'{k}/Adam': np.zeros_like(v) for k, v in raw.items()})
    out.update({'global_step': np.array(790000, np.int64), 'beta1_power': np.array(0.5, np.float32)})
  return out


def scaled_params(model, image_size, in_channels, seed):
  """Random parameters at the scale of an initialization (kernels ~ N(0, 1/fan_in), GroupNorm scales ~ 1, biases
  ~ 0.1): every layer matters and the output is O(1), without compiling ``model.init``."""
  rng = np.random.RandomState(seed)

  def leaf(path, a):
    x = rng.standard_normal(a.shape).astype(np.float32)
    if path[-1] == 'scale':
      return 1.0 + 0.1 * x
    if path[-1] == 'bias':
      return 0.1 * x
    return (x / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)

  abstract = param_tree.abstract_params(model, image_size, in_channels)
  return jax.tree_util.tree_map_with_path(lambda p, a: leaf(tuple(k.key for k in p), a), abstract)


def make_workdir(workdir, config, *, step=4, seed=0):
  """A train.py workdir without training: ``config.json`` and one orbax checkpoint at ``step``.

  The raw and the EMA parameters are different random trees (:func:`scaled_params`). Returns the saved
  ``TrainState``.
  """
  model = train_lib.build_model(config)
  d = config.data
  params = scaled_params(model, d.image_size, d.channels, seed)
  state = train_lib.create_state(params, train_lib.build_optimizer(config))
  state = state.replace(step=np.int32(step), ema_params=scaled_params(model, d.image_size, d.channels, seed + 1))
  os.makedirs(workdir, exist_ok=True)
  checkpoint_lib.save_json(os.path.join(workdir, 'config.json'), config.to_dict())
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(step, state)
  ckpt.close()
  return state
