"""Tests of ddpm_jax.pretrained without torch: synthetic diffusers folders and TF checkpoints.

The folders are written from our own random parameters through the inverse name mapping
(``to_diffusers_state_dict`` + ``safetensors.numpy``), the TF checkpoints with ``tf.raw_ops.SaveV2``
under the original variable names. Parity with the real diffusers model is in test_parity.py.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import pretrained
from ddpm_jax.models import unet as unet_lib

safetensors_numpy = pytest.importorskip('safetensors.numpy')

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


@pytest.fixture(scope='module')
def tiny_params():
  # Random values everywhere (GroupNorm scales and biases too), so that any mix-up shows. Only the tree
  # structure comes from the model (eval_shape: nothing is run).
  abstract = pretrained.abstract_params(TINY, IMAGE_SIZE)
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


def _write_folder(
  folder, params, *, config=None, scheduler=DDPM_SCHEDULER, layout='root', legacy=False, state_dict=None
):
  unet_dir = folder if layout == 'root' else folder / 'unet'
  unet_dir.mkdir(parents=True, exist_ok=True)
  config = config or pretrained.diffusers_config(TINY, IMAGE_SIZE)
  (unet_dir / 'config.json').write_text(json.dumps(config))
  if state_dict is None:
    state_dict = pretrained.to_diffusers_state_dict(params, legacy_attention_names=legacy)
  safetensors_numpy.save_file(state_dict, str(unet_dir / pretrained.WEIGHTS_SAFETENSORS))
  if scheduler is not None:
    sched_dir = folder if layout == 'root' else folder / 'scheduler'
    sched_dir.mkdir(parents=True, exist_ok=True)
    (sched_dir / 'scheduler_config.json').write_text(json.dumps(scheduler))
  return str(folder)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------ happy paths


def test_roundtrip_repo_root_layout(tmp_path, tiny_params):
  pre = pretrained.load_diffusers(_write_folder(tmp_path, tiny_params))
  _assert_trees_equal(pre.params, tiny_params)
  assert pre.model.config_fields() == TINY.config_fields()
  assert (pre.var_type, pre.clip_denoised, pre.mean_type) == ('fixedlarge', True, 'eps')
  assert (pre.image_size, pre.in_channels) == (IMAGE_SIZE, 3)
  np.testing.assert_allclose(pre.schedule.betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  assert pretrained.WEIGHTS_SAFETENSORS in pre.source


def test_pipeline_layout_with_legacy_attention_names(tmp_path, tiny_params):
  sched = dict(DDPM_SCHEDULER, variance_type='fixed_small', clip_sample=False)
  folder = _write_folder(tmp_path, tiny_params, scheduler=sched, layout='pipeline', legacy=True)
  assert os.path.isfile(os.path.join(folder, 'unet', 'config.json'))
  pre = pretrained.load_diffusers(folder)
  _assert_trees_equal(pre.params, tiny_params)
  assert (pre.var_type, pre.clip_denoised) == ('fixedsmall', False)


def test_loaded_model_runs_the_sampler(tmp_path, tiny_params):
  pre = pretrained.load_pretrained(_write_folder(tmp_path, tiny_params))
  # A short respaced chain is enough to check the plumbing (Pretrained -> sampler).
  out = pretrained.sample(
    pre._replace(schedule=pretrained.sched_lib.respace(pre.schedule, [0, 500, 999])[0]), jax.random.key(0), 2
  )
  assert out.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.all(np.isfinite(out))


def test_overrides_and_missing_scheduler(tmp_path, tiny_params):
  folder = _write_folder(tmp_path, tiny_params, scheduler=None)
  with pytest.raises(ValueError, match='scheduler_config.json'):
    pretrained.load_diffusers(folder)
  pre = pretrained.load_diffusers(folder, var_type='fixedsmall', clip_denoised=True)
  assert (pre.var_type, pre.clip_denoised) == ('fixedsmall', True)


def test_release_registry():
  names = {'cifar10-32', 'celebahq-256', 'church-256', 'bedroom-256', 'cat-256'}
  assert {f'google/ddpm-{n}' for n in names} <= set(pretrained.RELEASES)
  cifar = pretrained.RELEASES['google/ddpm-cifar10-32']
  assert (cifar.image_size, cifar.var_type, cifar.clip_denoised, cifar.ch_mult) == (
    32,
    'fixedlarge',
    True,
    (1, 2, 2, 2),
  )
  for name, info in pretrained.RELEASES.items():
    if name != 'google/ddpm-cifar10-32':
      assert (info.image_size, info.var_type, info.ch_mult) == (256, 'fixedsmall', (1, 1, 2, 2, 4, 4))
      assert info.clip_denoised
    assert info.ema is (True if '-ema-' in name else None)


@pytest.mark.parametrize(
  'make, image_size, n_tensors', [(unet_lib.unet_cifar10, 32, 328), (unet_lib.unet_256, 256, None)]
)
def test_full_size_mapping_is_one_to_one(make, image_size, n_tensors):
  model = make()
  abstract = pretrained.abstract_params(model, image_size)
  flat = pretrained._flatten(abstract)  # pylint: disable=protected-access
  levels = len(model.ch_mult)
  names = [pretrained._diffusers_names(p, levels)[0] for p in flat]  # pylint: disable=protected-access
  tf_names = [pretrained._tf_name(p, 'model') for p in flat]  # pylint: disable=protected-access
  assert len(set(names)) == len(names) == len(set(tf_names)) == len(flat)
  if n_tensors is not None:
    assert len(names) == n_tensors  # diffusers' UNet2DModel state dict for the CIFAR-10 config
  # The config written for our model parses back to the same model.
  config = pretrained.diffusers_config(model, image_size)
  back, size, _ = pretrained.unet_from_diffusers_config(config)
  assert size == image_size
  assert back.config_fields() == dict(model.config_fields(), dropout=back.dropout)


# ----------------------------------------------------------------------------------------------- errors


def test_not_a_folder(tmp_path):
  with pytest.raises(ValueError, match='not a folder'):
    pretrained.load_diffusers(str(tmp_path / 'nope'))
  with pytest.raises(ValueError, match='downloads are disabled'):
    pretrained.load_diffusers('google/ddpm-cifar10-32-not-here', allow_download=False)
  with pytest.raises(ValueError, match='not a diffusers checkpoint folder'):
    pretrained.load_diffusers(str(tmp_path))


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
  config = dict(pretrained.diffusers_config(TINY, IMAGE_SIZE), **{key: value})
  folder = _write_folder(tmp_path, tiny_params, config=config)
  with pytest.raises(ValueError, match=match) as err:
    pretrained.load_diffusers(folder)
  assert 'config.json' in str(err.value)


def test_missing_defaults_are_diffusers_defaults(tmp_path, tiny_params):
  # norm_eps absent means diffusers' default 1e-5: a different model, so it must be rejected.
  config = pretrained.diffusers_config(TINY, IMAGE_SIZE)
  del config['norm_eps']
  with pytest.raises(ValueError, match='norm_eps'):
    pretrained.load_diffusers(_write_folder(tmp_path, tiny_params, config=config))


def test_missing_tensor_names_file_and_tensor(tmp_path, tiny_params):
  sd = pretrained.to_diffusers_state_dict(tiny_params)
  del sd['up_blocks.0.attentions.1.to_q.weight']
  folder = _write_folder(tmp_path, tiny_params, state_dict=sd)
  with pytest.raises(ValueError, match='missing') as err:
    pretrained.load_diffusers(folder)
  msg = str(err.value)
  assert pretrained.WEIGHTS_SAFETENSORS in msg and 'up_blocks.0.attentions.1.to_q.weight' in msg
  assert 'up_1/attn_1/q/kernel' in msg


def test_unexpected_tensor(tmp_path, tiny_params):
  sd = pretrained.to_diffusers_state_dict(tiny_params)
  sd['down_blocks.0.attentions.0.to_q.weight'] = np.zeros((32, 32), np.float32)
  with pytest.raises(ValueError, match=r'unexpected tensor.*down_blocks\.0\.attentions\.0\.to_q\.weight'):
    pretrained.load_diffusers(_write_folder(tmp_path, tiny_params, state_dict=sd))


def test_shape_mismatch(tmp_path, tiny_params):
  # Weights of the tiny model under a config with wider channels: every mismatch is listed.
  config = dict(pretrained.diffusers_config(TINY, IMAGE_SIZE), block_out_channels=[64, 128])
  with pytest.raises(ValueError, match=r'shape mismatch.*conv_in\.weight: file shape \(32, 3, 3, 3\)'):
    pretrained.load_diffusers(_write_folder(tmp_path, tiny_params, config=config))


def test_no_weights_and_corrupt_weights(tmp_path, tiny_params):
  folder = _write_folder(tmp_path, tiny_params)
  weights = os.path.join(folder, pretrained.WEIGHTS_SAFETENSORS)
  with open(weights, 'wb') as f:
    f.write(b'not a safetensors file')
  with pytest.raises(ValueError, match='cannot read safetensors') as err:
    pretrained.load_diffusers(folder)
  assert weights in str(err.value)
  os.remove(weights)
  with pytest.raises(ValueError, match='no weights found'):
    pretrained.load_diffusers(folder)


def test_bin_weights_load_without_torch(tmp_path, tiny_params, monkeypatch):
  torch = pytest.importorskip('torch')  # only to write the .bin, as diffusers' older releases did
  folder = _write_folder(tmp_path, tiny_params)
  want = pretrained.load_diffusers(folder).params
  sd = pretrained.to_diffusers_state_dict(tiny_params)
  torch.save(
    {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, os.path.join(folder, pretrained.WEIGHTS_BIN)
  )
  os.remove(os.path.join(folder, pretrained.WEIGHTS_SAFETENSORS))
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError: the reader must not need it
  pre = pretrained.load_diffusers(folder)
  assert pretrained.WEIGHTS_BIN in pre.source
  _assert_trees_equal(pre.params, want)
  with open(os.path.join(folder, pretrained.WEIGHTS_BIN), 'wb') as f:
    f.write(b'not a torch file')
  with pytest.raises(ValueError, match='cannot read PyTorch weights'):
    pretrained.load_diffusers(folder)


def test_sample_command_runs_a_released_model_folder(tmp_path, tiny_params):
  """sample.py --pretrained <diffusers folder>: the release's own settings, its weights, exact counts."""
  from ddpm_jax import sample_lib  # pylint: disable=g-import-not-at-top

  folder = _write_folder(
    tmp_path / 'release', tiny_params, scheduler=dict(DDPM_SCHEDULER, num_train_timesteps=10, beta_end=0.2)
  )
  out = str(tmp_path / 'samples')
  summary = sample_lib.run(
    workdir=None, pretrained=folder, out_dir=out, num_samples=3, batch_size=2, seed=1, progress=False
  )
  assert summary['num_samples'] == 3 and summary['num_shards'] == 2
  images = sample_lib.load_samples(out)
  assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
  with open(os.path.join(out, 'sampling.json')) as f:
    settings = json.load(f)
  assert settings['sampler']['var_type'] == 'fixedlarge' and settings['sampler']['clip_denoised'] is True
  pre = pretrained.load_diffusers(folder)
  assert pre.schedule.num_timesteps == 10
  direct = sample_lib.BatchSampler(
    pre.model, pre.params, pre.schedule, sample_lib.SamplerSpec(), (IMAGE_SIZE, IMAGE_SIZE, 3), seed=1
  )
  np.testing.assert_array_equal(images, direct(np.arange(3)))
  with pytest.raises(ValueError, match='exactly one'):
    sample_lib.run(workdir=str(tmp_path), pretrained=folder, out_dir=out, num_samples=1, progress=False)


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
  folder = _write_folder(tmp_path, tiny_params, scheduler=dict(DDPM_SCHEDULER, **{key: value}))
  with pytest.raises(ValueError, match=match) as err:
    pretrained.load_diffusers(folder)
  assert 'scheduler_config.json' in str(err.value)


def test_scheduler_variants():
  for diffusers_name, ours in (
    ('fixed_large', 'fixedlarge'),
    ('fixed_large_log', 'fixedlarge'),
    ('fixed_small', 'fixedsmall'),
    ('fixed_small_log', 'fixedsmall'),
  ):
    _, var_type, clip, mean_type = pretrained.settings_from_scheduler_config(
      dict(DDPM_SCHEDULER, variance_type=diffusers_name)
    )
    assert (var_type, clip, mean_type) == (ours, True, 'eps')
  # Missing keys take DDPMScheduler's defaults (fixed_small, clip on).
  sched, var_type, clip, _ = pretrained.settings_from_scheduler_config({'_class_name': 'DDPMScheduler'})
  assert (var_type, clip, sched.num_timesteps) == ('fixedsmall', True, 1000)


# ---------------------------------------------------------------------------------------- TF checkpoints


@pytest.fixture(scope='module')
def tf():
  tf_ = pytest.importorskip('tensorflow')
  tf_.config.set_visible_devices([], 'GPU')
  return tf_


def _write_tf_checkpoint(tf, prefix, variables):
  names = sorted(variables)
  tf.raw_ops.SaveV2(
    prefix=str(prefix),
    tensor_names=names,
    shape_and_slices=[''] * len(names),
    tensors=[tf.constant(variables[n]) for n in names],
  )
  return str(prefix)


def _tf_variables(params, *, ema=True, optimizer=True):
  raw = pretrained.to_tf_variables(params)
  out = dict(raw)
  if ema:
    out.update({f'{k}/ExponentialMovingAverage': v + 1.0 for k, v in raw.items()})
  if optimizer:
    out.update({f'{k}/Adam': np.zeros_like(v) for k, v in raw.items()})
    out.update({'global_step': np.array(790000, np.int64), 'beta1_power': np.array(0.5, np.float32)})
  return out


def test_tf_checkpoint_ema_and_raw(tf, tmp_path, tiny_params):
  prefix = _write_tf_checkpoint(tf, tmp_path / 'model.ckpt-790000', _tf_variables(tiny_params))
  ema = pretrained.load_tf_checkpoint(prefix, TINY, image_size=IMAGE_SIZE)
  _assert_trees_equal(ema, jax.tree.map(lambda a: a + 1.0, tiny_params))
  raw = pretrained.load_tf_checkpoint(prefix, TINY, ema=False, image_size=IMAGE_SIZE)
  _assert_trees_equal(raw, tiny_params)
  # The architecture can also be read off the checkpoint.
  model, size = pretrained.infer_tf_model(
    {k: v.shape for k, v in _tf_variables(tiny_params).items()}, image_size=IMAGE_SIZE
  )
  assert model.config_fields() == TINY.config_fields() and size == IMAGE_SIZE
  _assert_trees_equal(pretrained.load_tf_checkpoint(prefix, image_size=IMAGE_SIZE), ema)


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
    lambda a: rng.standard_normal(a.shape).astype(np.float32), pretrained.abstract_params(model, image_size)
  )
  prefix = _write_tf_checkpoint(tf, tmp_path / 'model.ckpt-1', _tf_variables(params))
  pre = pretrained.load_pretrained(prefix)  # what sample.py --pretrained <prefix> calls
  assert pre.model.config_fields() == model.config_fields() and pre.image_size == image_size
  assert pre.var_type == var_type and pre.clip_denoised and pre.in_channels == 3
  assert ('settings of google/' in pre.source) == matched
  _assert_trees_equal(pre.params, jax.tree.map(lambda a: a + 1.0, params))  # the EMA shadow
  forced = pretrained.load_tf_pretrained(prefix, 'google/ddpm-cifar10-32', ema=False) if matched else None
  if forced is not None:
    _assert_trees_equal(forced.params, params)
  with pytest.raises(ValueError, match='Unknown release'):
    pretrained.load_tf_pretrained(prefix, 'google/ddpm-cifar100')


def test_tf_checkpoint_errors(tf, tmp_path, tiny_params):
  with pytest.raises(ValueError, match='not a readable TF checkpoint'):
    pretrained.load_tf_checkpoint(str(tmp_path / 'missing.ckpt'), TINY)

  no_ema = _write_tf_checkpoint(tf, tmp_path / 'noema', _tf_variables(tiny_params, ema=False))
  with pytest.raises(ValueError, match='no EMA shadow.*ema=False'):
    pretrained.load_tf_checkpoint(no_ema, TINY, image_size=IMAGE_SIZE)

  variables = _tf_variables(tiny_params, ema=False)
  del variables['model/mid/attn_1/k/W']
  missing = _write_tf_checkpoint(tf, tmp_path / 'missing_var', variables)
  with pytest.raises(ValueError, match=r'missing variable.*model/mid/attn_1/k/W') as err:
    pretrained.load_tf_checkpoint(missing, TINY, ema=False, image_size=IMAGE_SIZE)
  assert 'missing_var' in str(err.value)

  variables = _tf_variables(tiny_params, ema=False)
  variables['model/conv_out/W'] = np.zeros((3, 3, 32, 6), np.float32)
  bad_shape = _write_tf_checkpoint(tf, tmp_path / 'bad_shape', variables)
  with pytest.raises(ValueError, match=r'shape mismatch.*model/conv_out/W: checkpoint \(3, 3, 32, 6\)'):
    pretrained.load_tf_checkpoint(bad_shape, TINY, ema=False, image_size=IMAGE_SIZE)

  variables = _tf_variables(tiny_params, ema=False)
  variables['model/down_0/attn_0/q/W'] = np.zeros((32, 32), np.float32)
  extra = _write_tf_checkpoint(tf, tmp_path / 'extra', variables)
  with pytest.raises(ValueError, match=r'unexpected variable.*model/down_0/attn_0/q/W'):
    pretrained.load_tf_checkpoint(extra, TINY, ema=False, image_size=IMAGE_SIZE)


def test_load_pretrained_dispatches_tf_prefixes(tf, tmp_path, tiny_params):
  # A TF prefix goes to the TF reader, which reads the architecture off the checkpoint: a 2-level model has no
  # default resolution, and the error names the checkpoint.
  prefix = _write_tf_checkpoint(tf, tmp_path / 'model.ckpt-1', _tf_variables(tiny_params))
  with pytest.raises(ValueError, match=r'model\.ckpt-1: 2 levels; pass image_size'):
    pretrained.load_pretrained(prefix)
  # A named release gives its resolution and settings; the architecture still comes from the checkpoint.
  pre = pretrained.load_pretrained(prefix, release='google/ddpm-cifar10-32')
  assert pre.image_size == 32 and pre.var_type == 'fixedlarge' and pre.model.ch_mult == TINY.ch_mult
  # Loading into a given architecture that the checkpoint does not fit lists the variables.
  with pytest.raises(ValueError, match=r'model\.ckpt-1: checkpoint does not match.*model/conv_in/W'):
    pretrained.load_tf_checkpoint(prefix, unet_lib.unet_cifar10())
