"""Tests of ddpm_jax.formats.diffusers without torch: synthetic diffusers folders, read and written.

The folders are written from our own random parameters through the exporter's name mapping
(``to_state_dict`` + ``safetensors.numpy``, see format_fixtures.py). Parity with the real diffusers model is in
test_parity.py (import) and test_export.py (export).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax import loading
from ddpm_jax import schedule as sched_lib
from ddpm_jax.formats import diffusers as diffusers_format
from ddpm_jax.formats import param_tree
from ddpm_jax.formats import tf_checkpoint as tf_format
from ddpm_jax.models import unet as unet_lib
from format_fixtures import DDPM_SCHEDULER, IMAGE_SIZE, TINY, assert_schedules_equal, assert_trees_equal
from format_fixtures import random_params, write_diffusers_folder


@pytest.fixture(scope='module')
def tiny_params():
  return random_params()


# ------------------------------------------------------------------------------------------ happy paths


def test_roundtrip_repo_root_layout(tmp_path, tiny_params):
  pre = loading.load_diffusers(write_diffusers_folder(tmp_path, tiny_params))
  assert_trees_equal(pre.params, tiny_params)
  assert pre.model.config_fields() == TINY.config_fields()
  assert (pre.var_type, pre.clip_denoised, pre.mean_type) == ('fixedlarge', True, 'eps')
  assert (pre.image_size, pre.in_channels) == (IMAGE_SIZE, 3)
  np.testing.assert_allclose(pre.schedule.betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  assert diffusers_format.WEIGHTS_SAFETENSORS in pre.source


def test_pipeline_layout_with_legacy_attention_names(tmp_path, tiny_params):
  sched = dict(DDPM_SCHEDULER, variance_type='fixed_small', clip_sample=False)
  folder = write_diffusers_folder(tmp_path, tiny_params, scheduler=sched, layout='pipeline', legacy=True)
  assert os.path.isfile(os.path.join(folder, 'unet', 'config.json'))
  pre = loading.load_diffusers(folder)
  assert_trees_equal(pre.params, tiny_params)
  assert (pre.var_type, pre.clip_denoised) == ('fixedsmall', False)


def test_overrides_and_missing_scheduler(tmp_path, tiny_params):
  folder = write_diffusers_folder(tmp_path, tiny_params, scheduler=None)
  with pytest.raises(ValueError, match='scheduler_config.json'):
    loading.load_diffusers(folder)
  pre = loading.load_diffusers(folder, var_type='fixedsmall', clip_denoised=True)
  assert (pre.var_type, pre.clip_denoised) == ('fixedsmall', True)


@pytest.mark.parametrize(
  'make, image_size, n_tensors', [(unet_lib.unet_cifar10, 32, 328), (unet_lib.unet_256, 256, None)]
)
def test_full_size_mapping_is_one_to_one(make, image_size, n_tensors):
  model = make()
  abstract = param_tree.abstract_params(model, image_size)
  flat = traverse_util.flatten_dict(abstract)
  levels = len(model.ch_mult)
  names = [diffusers_format._names(p, levels)[0] for p in flat]  # pylint: disable=protected-access
  tf_names = [tf_format._tf_name(p, 'model') for p in flat]  # pylint: disable=protected-access
  assert len(set(names)) == len(names) == len(set(tf_names)) == len(flat)
  if n_tensors is not None:
    assert len(names) == n_tensors  # diffusers' UNet2DModel state dict for the CIFAR-10 config
  # The config written for our model parses back to the same model.
  config = diffusers_format.unet_config(model, image_size)
  back, size, _ = diffusers_format.unet_from_config(config)
  assert size == image_size
  assert back.config_fields() == dict(model.config_fields(), dropout=back.dropout)


# ----------------------------------------------------------------------------------------------- errors


def test_not_a_folder(tmp_path):
  with pytest.raises(ValueError, match='not a folder'):
    loading.load_diffusers(str(tmp_path / 'nope'))
  with pytest.raises(ValueError, match='downloads are disabled'):
    loading.load_diffusers('google/ddpm-cifar10-32-not-here', allow_download=False)
  with pytest.raises(ValueError, match='not a diffusers checkpoint folder'):
    loading.load_diffusers(str(tmp_path))


@pytest.mark.parametrize(
  'key, value, match',
  [
    ('_class_name', 'UNetModel', '_class_name'),
    ('flip_sin_to_cos', True, 'flip_sin_to_cos'),
    ('freq_shift', 0, 'freq_shift'),
    ('downsample_padding', 1, 'downsample_padding'),
    ('norm_eps', 1e-5, 'norm_eps'),
    ('attention_head_dim', 8, 'attention_head_dim'),
    ('down_block_types', ['DownBlock2D', 'DownBlock2D'], 'attention in down levels'),
    ('down_block_types', ['ResnetDownsampleBlock2D', 'AttnDownBlock2D'], 'down_block_types'),
    ('class_embed_type', 'timestep', 'class_embed_type'),
    ('time_embedding_type', 'fourier', 'time_embedding_type'),
    ('block_out_channels', [32, 48], 'multiples'),
    ('sample_size', 15, 'sample_size'),
    ('out_channels', 6, 'out_channels'),
  ],
)
def test_unsupported_config(tmp_path, tiny_params, key, value, match):
  config = dict(diffusers_format.unet_config(TINY, IMAGE_SIZE), **{key: value})
  folder = write_diffusers_folder(tmp_path, tiny_params, config=config)
  with pytest.raises(ValueError, match=match) as err:
    loading.load_diffusers(folder)
  assert 'config.json' in str(err.value)


def test_missing_defaults_are_diffusers_defaults(tmp_path, tiny_params):
  # norm_eps absent means diffusers' default 1e-5: a different model, so it must be rejected.
  config = diffusers_format.unet_config(TINY, IMAGE_SIZE)
  del config['norm_eps']
  with pytest.raises(ValueError, match='norm_eps'):
    loading.load_diffusers(write_diffusers_folder(tmp_path, tiny_params, config=config))


def test_missing_tensor_names_file_and_tensor(tmp_path, tiny_params):
  sd = diffusers_format.to_state_dict(tiny_params)
  del sd['up_blocks.0.attentions.1.to_q.weight']
  folder = write_diffusers_folder(tmp_path, tiny_params, state_dict=sd)
  with pytest.raises(ValueError, match='missing') as err:
    loading.load_diffusers(folder)
  msg = str(err.value)
  assert diffusers_format.WEIGHTS_SAFETENSORS in msg and 'up_blocks.0.attentions.1.to_q.weight' in msg
  assert 'up_1/attn_1/q/kernel' in msg


def test_unexpected_tensor(tmp_path, tiny_params):
  sd = diffusers_format.to_state_dict(tiny_params)
  sd['down_blocks.0.attentions.0.to_q.weight'] = np.zeros((32, 32), np.float32)
  with pytest.raises(ValueError, match=r'unexpected tensor.*down_blocks\.0\.attentions\.0\.to_q\.weight'):
    loading.load_diffusers(write_diffusers_folder(tmp_path, tiny_params, state_dict=sd))


def test_shape_mismatch(tmp_path, tiny_params):
  # Weights of the tiny model under a config with wider channels: every mismatch is listed.
  config = dict(diffusers_format.unet_config(TINY, IMAGE_SIZE), block_out_channels=[64, 128])
  with pytest.raises(ValueError, match=r'shape mismatch.*conv_in\.weight: file shape \(32, 3, 3, 3\)'):
    loading.load_diffusers(write_diffusers_folder(tmp_path, tiny_params, config=config))


def test_no_weights_and_corrupt_weights(tmp_path, tiny_params):
  folder = write_diffusers_folder(tmp_path, tiny_params)
  weights = os.path.join(folder, diffusers_format.WEIGHTS_SAFETENSORS)
  with open(weights, 'wb') as f:
    f.write(b'not a safetensors file')
  with pytest.raises(ValueError, match='cannot read safetensors') as err:
    loading.load_diffusers(folder)
  assert weights in str(err.value)
  os.remove(weights)
  with pytest.raises(ValueError, match='no weights found'):
    loading.load_diffusers(folder)


def test_bin_weights_load_without_torch(tmp_path, tiny_params, monkeypatch):
  torch = pytest.importorskip('torch')  # only to write the .bin, as diffusers' older releases did
  folder = write_diffusers_folder(tmp_path, tiny_params)
  want = loading.load_diffusers(folder).params
  sd = diffusers_format.to_state_dict(tiny_params)
  torch.save(
    {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
    os.path.join(folder, diffusers_format.WEIGHTS_BIN),
  )
  os.remove(os.path.join(folder, diffusers_format.WEIGHTS_SAFETENSORS))
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError: the reader must not need it
  pre = loading.load_diffusers(folder)
  assert diffusers_format.WEIGHTS_BIN in pre.source
  assert_trees_equal(pre.params, want)
  with open(os.path.join(folder, diffusers_format.WEIGHTS_BIN), 'wb') as f:
    f.write(b'not a torch file')
  with pytest.raises(ValueError, match='cannot read PyTorch weights'):
    loading.load_diffusers(folder)


@pytest.mark.parametrize(
  'key, value, match',
  [
    ('variance_type', 'learned_range', 'variance_type'),
    ('prediction_type', 'v_prediction', 'prediction_type'),
    ('beta_schedule', 'sigmoid', 'beta_schedule'),
    ('thresholding', True, 'thresholding'),
    ('_class_name', 'DDIMScheduler', 'var_type='),
  ],
)
def test_unsupported_scheduler(tmp_path, tiny_params, key, value, match):
  folder = write_diffusers_folder(tmp_path, tiny_params, scheduler=dict(DDPM_SCHEDULER, **{key: value}))
  with pytest.raises(ValueError, match=match) as err:
    loading.load_diffusers(folder)
  assert 'scheduler_config.json' in str(err.value)


def test_scheduler_variants():
  for diffusers_name, ours in (
    ('fixed_large', 'fixedlarge'),
    ('fixed_large_log', 'fixedlarge'),
    ('fixed_small', 'fixedsmall'),
    ('fixed_small_log', 'fixedsmall'),
  ):
    _, var_type, clip, mean_type = diffusers_format.settings_from_scheduler_config(
      dict(DDPM_SCHEDULER, variance_type=diffusers_name)
    )
    assert (var_type, clip, mean_type) == (ours, True, 'eps')
  # Missing keys take DDPMScheduler's defaults (fixed_small, clip on).
  sched, var_type, clip, _ = diffusers_format.settings_from_scheduler_config({'_class_name': 'DDPMScheduler'})
  assert (var_type, clip, sched.num_timesteps) == ('fixedsmall', True, 1000)


# ------------------------------------------------------------------------------------------ the exporters


def test_class_conditional_config_round_trips_and_maps_the_label_embedding(tmp_path):
  model = unet_lib.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_classes=3)
  config = diffusers_format.unet_config(model, IMAGE_SIZE)
  assert config['num_class_embeds'] == 4 and config['class_embed_type'] is None  # 3 classes + the null class
  back, _, _ = diffusers_format.unet_from_config(config)
  assert back.num_classes == 3
  params = random_params(model, seed=3)
  state_dict = diffusers_format.to_state_dict(params)
  np.testing.assert_array_equal(state_dict['class_embedding.weight'], params['label_emb']['embedding'])  # [K+1, 4ch]
  folder = write_diffusers_folder(tmp_path, params, config=config)
  assert_trees_equal(loading.load_diffusers(folder).params, params)
  for bad in (1, 2.5, True):
    with pytest.raises(ValueError, match='num_class_embeds'):
      diffusers_format.unet_from_config(dict(config, num_class_embeds=bad))


def test_unet_config_refuses_what_unet2dmodel_cannot_compute():
  with pytest.raises(ValueError, match='resamp_with_conv=False'):
    diffusers_format.unet_config(unet_lib.UNet(ch=32, ch_mult=(1, 2), resamp_with_conv=False), IMAGE_SIZE)
  with pytest.raises(ValueError, match='out_ch=6.*learned variance'):
    diffusers_format.unet_config(unet_lib.UNet(ch=32, ch_mult=(1, 2), out_ch=6), IMAGE_SIZE)


@pytest.mark.parametrize(
  'name, kwargs, diffusers_name',
  [
    ('linear', dict(beta_end=0.2, num_timesteps=20), 'linear'),
    ('linear', {}, 'linear'),
    ('quad', dict(beta_start=1e-4, beta_end=0.02, num_timesteps=50), 'scaled_linear'),
    ('cosine', dict(num_timesteps=100), 'squaredcos_cap_v2'),
    ('jsd', dict(num_timesteps=30), None),
    ('warmup10', dict(num_timesteps=40), None),
  ],
)
def test_scheduler_config_round_trips(name, kwargs, diffusers_name):
  schedule = sched_lib.get_schedule(name, **kwargs)
  for var_type, clip, mean_type in (('fixedlarge', True, 'eps'), ('fixedsmall', False, 'xstart')):
    config = diffusers_format.scheduler_config(schedule, var_type=var_type, clip_denoised=clip, mean_type=mean_type)
    json.dumps(config)  # writable as it is
    back, v, c, m = diffusers_format.settings_from_scheduler_config(config)
    assert (v, c, m) == (var_type, clip, mean_type)
    if diffusers_name is not None:  # by name: the very same float64-computed tables
      assert config['beta_schedule'] == diffusers_name and config['trained_betas'] is None
      assert_schedules_equal(back, schedule)
    else:  # explicit betas: the same float32 betas; tables recomputed from them, equal to float32 rounding
      assert len(config['trained_betas']) == schedule.num_timesteps
      np.testing.assert_array_equal(back.betas, schedule.betas)
      np.testing.assert_allclose(back.alphas_cumprod, schedule.alphas_cumprod, rtol=1e-6)
  assert sched_lib.find_beta_schedule(schedule)['name'] == name  # every one of our names is found exactly


def test_find_beta_schedule_of_respaced_schedule_is_none():
  short, _ = sched_lib.respace(sched_lib.get_schedule('linear'), [0, 500, 999])
  assert sched_lib.find_beta_schedule(short) is None


@pytest.mark.parametrize(
  'var_type, mean_type, match',
  [('learned', 'eps', "var_type='learned'.*log-variance"), ('fixedlarge', 'xprev', "mean_type='xprev'")],
)
def test_scheduler_config_refuses_what_ddpmscheduler_cannot_express(var_type, mean_type, match):
  with pytest.raises(ValueError, match=match):
    diffusers_format.scheduler_config(
      sched_lib.get_schedule('linear'), var_type=var_type, clip_denoised=True, mean_type=mean_type
    )


def test_write_folder_round_trips_through_the_importer(tmp_path, tiny_params):
  schedule = sched_lib.get_schedule('linear', beta_end=0.2, num_timesteps=20)
  loaded = loading.LoadedModel(
    model=TINY,
    params=tiny_params,
    schedule=schedule,
    var_type='fixedsmall',
    clip_denoised=False,
    mean_type='eps',
    image_size=IMAGE_SIZE,
    in_channels=3,
    source='test',
  )
  files = diffusers_format.write_folder(str(tmp_path / 'out'), loaded)
  assert sorted(os.path.basename(f) for f in files) == sorted(
    ['config.json', 'scheduler_config.json', 'model_index.json', diffusers_format.WEIGHTS_SAFETENSORS]
  )
  back = loading.load_diffusers(str(tmp_path / 'out'))
  assert_trees_equal(back.params, tiny_params)
  assert_schedules_equal(back.schedule, schedule)
  assert (back.var_type, back.clip_denoised, back.mean_type, back.image_size) == ('fixedsmall', False, 'eps', 16)
  assert back.model.config_fields() == TINY.config_fields()
  # A parameter tree that is not the model's is refused before anything is written.
  wrong = dict(tiny_params, conv_in={'kernel': np.zeros((3, 3, 3, 8), np.float32), 'bias': np.zeros(8, np.float32)})
  with pytest.raises(ValueError, match='conv_in'):
    diffusers_format.write_folder(str(tmp_path / 'bad'), dataclasses.replace(loaded, params=wrong))
  assert not (tmp_path / 'bad').exists()
