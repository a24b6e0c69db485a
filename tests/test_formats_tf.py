"""Tests of ddpm_jax.formats.tf_checkpoint: original-layout TF checkpoints, read and written.

Checkpoints of the original training are synthesized with ``tf.raw_ops.SaveV2`` under the original variable
names (format_fixtures.py); the writer's output is read back by the reader and by TensorFlow itself.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from ddpm_jax import loading
from ddpm_jax import schedule as sched_lib
from ddpm_jax.formats import param_tree
from ddpm_jax.formats import tf_checkpoint as tf_format
from ddpm_jax.models import unet as unet_lib
from format_fixtures import IMAGE_SIZE, TINY, assert_schedules_equal, assert_trees_equal, random_params
from format_fixtures import tf_variables, write_tf_checkpoint


@pytest.fixture(scope='module')
def tiny_params():
  return random_params()


@pytest.fixture(scope='module')
def tf():
  tf_ = pytest.importorskip('tensorflow')
  tf_.config.set_visible_devices([], 'GPU')
  return tf_


def test_tf_checkpoint_ema_and_raw(tf, tmp_path, tiny_params):
  prefix = write_tf_checkpoint(tf, tmp_path / 'model.ckpt-790000', tf_variables(tiny_params))
  ema = tf_format.load_params(prefix, TINY, image_size=IMAGE_SIZE)
  assert_trees_equal(ema, jax.tree.map(lambda a: a + 1.0, tiny_params))
  raw = tf_format.load_params(prefix, TINY, ema=False, image_size=IMAGE_SIZE)
  assert_trees_equal(raw, tiny_params)
  # The architecture can also be read off the checkpoint.
  model, size = tf_format.infer_model({k: v.shape for k, v in tf_variables(tiny_params).items()}, image_size=IMAGE_SIZE)
  assert model.config_fields() == TINY.config_fields() and size == IMAGE_SIZE
  assert_trees_equal(tf_format.load_params(prefix, image_size=IMAGE_SIZE), ema)


@pytest.mark.parametrize(
  'ch_mult, image_size, var_type, matched',
  [
    ((1, 2, 2, 2), 32, 'fixedlarge', True),  # the CIFAR-10 layout: its release's settings
    ((1, 1, 1, 1, 1, 1), 256, 'fixedsmall', False),  # 256x256, matching no release: the LSUN/CelebA code path
  ],
)
def test_tf_checkpoint_through_load_pretrained_reads_architecture_and_settings(
  tf, tmp_path, ch_mult, image_size, var_type, matched
):
  model = unet_lib.UNet(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)
  rng = np.random.RandomState(1)
  params = jax.tree.map(
    lambda a: rng.standard_normal(a.shape).astype(np.float32), param_tree.abstract_params(model, image_size)
  )
  prefix = write_tf_checkpoint(tf, tmp_path / 'model.ckpt-1', tf_variables(params))
  pre = loading.load_pretrained(prefix)  # what sample.py --pretrained <prefix> calls
  assert pre.model.config_fields() == model.config_fields() and pre.image_size == image_size
  assert pre.var_type == var_type and pre.clip_denoised and pre.in_channels == 3
  assert ('settings of google/' in pre.source) == matched
  assert_trees_equal(pre.params, jax.tree.map(lambda a: a + 1.0, params))  # the EMA shadow
  forced = loading.load_tf_pretrained(prefix, 'google/ddpm-cifar10-32', ema=False) if matched else None
  if forced is not None:
    assert_trees_equal(forced.params, params)
  with pytest.raises(ValueError, match='Unknown release'):
    loading.load_tf_pretrained(prefix, 'google/ddpm-cifar100')


def test_tf_checkpoint_errors(tf, tmp_path, tiny_params):
  with pytest.raises(ValueError, match='not a readable TF checkpoint'):
    tf_format.load_params(str(tmp_path / 'missing.ckpt'), TINY)

  no_ema = write_tf_checkpoint(tf, tmp_path / 'noema', tf_variables(tiny_params, ema=False))
  with pytest.raises(ValueError, match='no EMA shadow.*ema=False'):
    tf_format.load_params(no_ema, TINY, image_size=IMAGE_SIZE)

  variables = tf_variables(tiny_params, ema=False)
  del variables['model/mid/attn_1/k/W']
  missing = write_tf_checkpoint(tf, tmp_path / 'missing_var', variables)
  with pytest.raises(ValueError, match=r'missing variable.*model/mid/attn_1/k/W') as err:
    tf_format.load_params(missing, TINY, ema=False, image_size=IMAGE_SIZE)
  assert 'missing_var' in str(err.value)

  variables = tf_variables(tiny_params, ema=False)
  variables['model/conv_out/W'] = np.zeros((3, 3, 32, 6), np.float32)
  bad_shape = write_tf_checkpoint(tf, tmp_path / 'bad_shape', variables)
  with pytest.raises(ValueError, match=r'shape mismatch.*model/conv_out/W: checkpoint \(3, 3, 32, 6\)'):
    tf_format.load_params(bad_shape, TINY, ema=False, image_size=IMAGE_SIZE)

  variables = tf_variables(tiny_params, ema=False)
  variables['model/down_0/attn_0/q/W'] = np.zeros((32, 32), np.float32)
  extra = write_tf_checkpoint(tf, tmp_path / 'extra', variables)
  with pytest.raises(ValueError, match=r'unexpected variable.*model/down_0/attn_0/q/W'):
    tf_format.load_params(extra, TINY, ema=False, image_size=IMAGE_SIZE)


# ---------------------------------------------------------------------------------------------- the writer


def _loaded(model=TINY, params=None, **kw):
  fields = dict(
    model=model,
    params=params,
    schedule=sched_lib.get_schedule('linear', beta_end=0.2, num_timesteps=20),
    var_type='fixedsmall',
    clip_denoised=False,
    mean_type='eps',
    image_size=IMAGE_SIZE,
    in_channels=3,
    source='test',
  )
  fields.update(kw)
  return loading.LoadedModel(**fields)


def test_write_checkpoint_is_what_the_original_saved_and_reads_back(tf, tmp_path, tiny_params):
  ema = jax.tree.map(lambda a: a + 1.0, tiny_params)
  prefix = str(tmp_path / 'out' / 'model.ckpt-7')
  files = tf_format.write_checkpoint(prefix, _loaded(params=ema), raw_params=tiny_params, step=7)
  assert prefix + '.index' in files and prefix + tf_format.SETTINGS_SUFFIX in files
  assert tf.train.latest_checkpoint(str(tmp_path / 'out')) == prefix
  reader = tf.train.load_checkpoint(prefix)
  names = set(reader.get_variable_to_shape_map())
  assert names == set(tf_variables(tiny_params, optimizer=False)) | {'global_step'}  # raw + shadows + step
  assert int(reader.get_tensor('global_step')) == 7
  np.testing.assert_array_equal(reader.get_tensor('model/conv_in/W'), tiny_params['conv_in']['kernel'])
  assert_trees_equal(tf_format.load_params(prefix, TINY, image_size=IMAGE_SIZE), ema)
  assert_trees_equal(tf_format.load_params(prefix, TINY, ema=False, image_size=IMAGE_SIZE), tiny_params)
  # --pretrained PREFIX: the architecture off the variables, size, groups and settings off the settings file.
  back = loading.load_pretrained(prefix)
  assert back.model.config_fields() == TINY.config_fields()
  assert (back.image_size, back.in_channels, back.var_type, back.clip_denoised) == (IMAGE_SIZE, 3, 'fixedsmall', False)
  assert_schedules_equal(back.schedule, _loaded().schedule)
  assert 'settings of' in back.source and tf_format.SETTINGS_SUFFIX in back.source
  assert_trees_equal(back.params, ema)
  # A named release still wins over the settings file.
  assert loading.load_tf_pretrained(prefix, 'google/ddpm-cifar10-32').var_type == 'fixedlarge'


def test_write_checkpoint_round_trip_is_identity_and_keeps_what_diffusers_cannot(tf, tmp_path):
  # A learned variance (out_ch = 2C), eps parameterization, 8 GroupNorm groups, no conv resampling, the jsd
  # schedule: none of it shows in the original checkpoints' names, all of it survives the settings file.
  model = unet_lib.UNet(
    ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), out_ch=2, num_groups=8, resamp_with_conv=False
  )
  params = random_params(model, image_size=8, seed=2, in_channels=1)
  schedule = sched_lib.get_schedule('jsd', num_timesteps=30)
  first = _loaded(model, params, image_size=8, in_channels=1, var_type='learned', schedule=schedule)
  tf_format.write_checkpoint(str(tmp_path / 'a' / 'model.ckpt-1'), first)
  a = loading.load_pretrained(str(tmp_path / 'a' / 'model.ckpt-1'))
  tf_format.write_checkpoint(str(tmp_path / 'b' / 'model.ckpt-1'), a)
  b = loading.load_pretrained(str(tmp_path / 'b' / 'model.ckpt-1'))
  for back in (a, b):
    assert_trees_equal(back.params, params)
    assert_schedules_equal(back.schedule, schedule)
    assert back.model.config_fields() == dict(model.config_fields(), dropout=0.0)
    assert (back.var_type, back.mean_type, back.image_size, back.in_channels) == ('learned', 'eps', 8, 1)
  with open(str(tmp_path / 'a' / 'model.ckpt-1') + tf_format.SETTINGS_SUFFIX) as f:
    settings = json.load(f)
  assert settings['schedule']['name'] == 'jsd' and settings['num_groups'] == 8  # by name: exact tables
  # Without raw weights both names hold the one set: ema=False reads the same.
  assert_trees_equal(
    tf_format.load_params(str(tmp_path / 'a' / 'model.ckpt-1'), back.model, ema=False, image_size=8), params
  )


def test_write_checkpoint_refuses_what_the_original_layout_cannot_hold(tf, tmp_path, tiny_params):
  cond = unet_lib.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_classes=3)
  with pytest.raises(ValueError, match='num_classes=3.*no class embedding.*--format diffusers'):
    tf_format.write_checkpoint(str(tmp_path / 'c' / 'model.ckpt-1'), _loaded(cond, random_params(cond)))
  wide = unet_lib.UNet(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
  with pytest.raises(ValueError, match='do not match the model'):
    tf_format.write_checkpoint(str(tmp_path / 'w' / 'model.ckpt-1'), _loaded(wide, tiny_params))
  with pytest.raises(ValueError, match='same variables'):
    tf_format.write_checkpoint(
      str(tmp_path / 'r' / 'model.ckpt-1'), _loaded(params=tiny_params), raw_params={'conv_in': tiny_params['conv_in']}
    )
  assert not any((tmp_path / d).exists() for d in 'cwr')  # nothing written


def test_settings_file_errors(tf, tmp_path, tiny_params):
  prefix = str(tmp_path / 'model.ckpt-1')
  tf_format.write_checkpoint(prefix, _loaded(params=tiny_params))
  with open(prefix + tf_format.SETTINGS_SUFFIX, 'w') as f:
    json.dump({'image_size': 16}, f)
  with pytest.raises(ValueError, match=r'settings\.json: not a settings file.*num_groups'):
    loading.load_pretrained(prefix)
