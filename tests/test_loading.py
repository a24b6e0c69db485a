"""Tests of ddpm_jax.loading: the one loaded-model type, its loaders (workdirs, released models) and the
--pretrained dispatch; the release registry (ddpm_jax.releases)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import batch_sampler, loading, releases, sample_lib, sampling
from ddpm_jax import schedule as sched_lib
from ddpm_jax.formats import tf_checkpoint as tf_format
from ddpm_jax.models import unet as unet_lib
from format_fixtures import DDPM_SCHEDULER, IMAGE_SIZE, TINY, assert_trees_equal, make_workdir, random_params
from format_fixtures import tf_variables, write_diffusers_folder, write_tf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def tiny_params():
  return random_params()


@pytest.fixture(scope='module')
def tf():
  tf_ = pytest.importorskip('tensorflow')
  tf_.config.set_visible_devices([], 'GPU')
  return tf_


# ----------------------------------------------------------------------------------------- released models


def test_loaded_model_runs_the_sampler(tmp_path, tiny_params):
  loaded = loading.load_pretrained(write_diffusers_folder(tmp_path, tiny_params))
  # A short respaced chain is enough to check the plumbing (LoadedModel -> the functional sampler under jit).
  short = dataclasses.replace(loaded, schedule=sched_lib.respace(loaded.schedule, [0, 500, 999])[0])

  @jax.jit
  def sample(params, key):
    shape = (2, short.image_size, short.image_size, short.in_channels)
    return sampling.p_sample_loop(short.schedule, short.denoise_fn(params), shape, key, **short.sample_kwargs())

  out = sample(short.params, jax.random.key(0))
  assert out.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.all(np.isfinite(out))


def test_release_registry():
  names = {'cifar10-32', 'celebahq-256', 'church-256', 'bedroom-256', 'cat-256'}
  assert {f'google/ddpm-{n}' for n in names} <= set(releases.RELEASES)
  cifar = releases.RELEASES['google/ddpm-cifar10-32']
  assert (cifar.image_size, cifar.var_type, cifar.clip_denoised, cifar.ch_mult) == (
    32,
    'fixedlarge',
    True,
    (1, 2, 2, 2),
  )
  for name, info in releases.RELEASES.items():
    if name != 'google/ddpm-cifar10-32':
      assert (info.image_size, info.var_type, info.ch_mult) == (256, 'fixedsmall', (1, 1, 2, 2, 4, 4))
      assert info.clip_denoised
    assert info.ema is (True if '-ema-' in name else None)


def test_sample_command_runs_a_released_model_folder(tmp_path, tiny_params):
  """sample.py --pretrained <diffusers folder>: the release's own settings, its weights, exact counts."""
  folder = write_diffusers_folder(
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
  pre = loading.load_diffusers(folder)
  assert pre.schedule.num_timesteps == 10
  direct = batch_sampler.BatchSampler(
    pre.model, pre.params, pre.schedule, batch_sampler.SamplerSpec(), (IMAGE_SIZE, IMAGE_SIZE, 3), seed=1
  )
  np.testing.assert_array_equal(images, direct(np.arange(3)))
  with pytest.raises(ValueError, match='exactly one'):
    sample_lib.run(workdir=str(tmp_path), pretrained=folder, out_dir=out, num_samples=1, progress=False)


def test_load_pretrained_dispatches_tf_prefixes(tf, tmp_path, tiny_params):
  # A TF prefix goes to the TF reader, which reads the architecture off the checkpoint: a 2-level model has no
  # default resolution, and the error names the checkpoint.
  prefix = write_tf_checkpoint(tf, tmp_path / 'model.ckpt-1', tf_variables(tiny_params))
  with pytest.raises(ValueError, match=r'model\.ckpt-1: 2 levels; pass image_size'):
    loading.load_pretrained(prefix)
  # A named release gives its resolution and settings; the architecture still comes from the checkpoint.
  pre = loading.load_pretrained(prefix, release='google/ddpm-cifar10-32')
  assert pre.image_size == 32 and pre.var_type == 'fixedlarge' and pre.model.ch_mult == TINY.ch_mult
  # Loading into a given architecture that the checkpoint does not fit lists the variables.
  with pytest.raises(ValueError, match=r'model\.ckpt-1: checkpoint does not match.*model/conv_in/W'):
    tf_format.load_params(prefix, unet_lib.unet_cifar10())


# ---------------------------------------------------------------------------------------------- workdirs


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('run'))
  return path, make_workdir(path, tiny.get_config(), step=4)


def test_load_workdir_ema_and_raw(workdir):
  path, state = workdir
  ema = loading.load_workdir(path)
  assert_trees_equal(ema.params, state.ema_params)
  assert ema.source == f'{path} step 4 (EMA parameters)'
  raw = loading.load_workdir(path, 4, ema=False)
  assert_trees_equal(raw.params, state.params)
  assert raw.source == f'{path} step 4 (raw parameters)'
  config = tiny.get_config()
  assert ema.config.to_dict()['diffusion'] == config.diffusion.to_dict()  # the run's own config comes along
  assert (ema.image_size, ema.in_channels, ema.var_type, ema.mean_type) == (8, 1, 'fixedlarge', 'eps')
  assert ema.schedule.num_timesteps == 20 and ema.model.num_groups == 8
  assert loading.load_model(workdir=path).source == ema.source


def test_workdir_errors(workdir, tmp_path):
  path, _ = workdir
  with pytest.raises(FileNotFoundError, match='must be a train.py workdir'):
    loading.load_workdir(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'No checkpoint step 3 .*\[4\]'):
    loading.restore_workdir(path, 3)
  with pytest.raises(ValueError, match='exactly one'):
    loading.load_model()
  with pytest.raises(ValueError, match='--step applies'):
    loading.load_model(pretrained=str(tmp_path), step=3)


def test_layers_are_chosen_for_this_machine_and_forced_by_the_flag(workdir, tmp_path, tiny_params, tf, caplog):
  """Released models and workdirs get the U-Net layers of `cpu_tuning.model_layers`: 'cpu' on this XLA:CPU
  machine unless --layers (or a run's model.layers) says otherwise; the parameters and outputs are the same."""
  assert jax.default_backend() == 'cpu'
  folder = write_diffusers_folder(tmp_path / 'release', tiny_params)
  with caplog.at_level('INFO', logger='ddpm_jax.cpu_tuning'):
    auto = loading.load_model(pretrained=folder)
  assert auto.model.layers == 'cpu'
  assert [r.getMessage() for r in caplog.records].count("U-Net layers: 'cpu' (chosen on the 'cpu' backend).") == 1
  forced = loading.load_model(pretrained=folder, layers='reference')
  assert forced.model.layers == 'reference' and forced.model.config_fields() == auto.model.config_fields()
  assert_trees_equal(forced.params, auto.params)
  x = np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  t = np.array([1, 7], np.int32)
  np.testing.assert_allclose(auto.denoise_fn()(x, t), forced.denoise_fn()(x, t), atol=1e-4)
  # A TF checkpoint prefix, the other kind of release.
  prefix = write_tf_checkpoint(tf, tmp_path / 'model.ckpt-1', tf_variables(tiny_params))
  release = 'google/ddpm-cifar10-32'  # the tiny checkpoint needs a release's settings (image size)
  assert loading.load_pretrained(prefix, release=release).model.layers == 'cpu'
  assert loading.load_pretrained(prefix, release=release, layers='reference').model.layers == 'reference'
  # A workdir: its config's model.layers ('auto' in configs/tiny.py), unless forced.
  path, _ = workdir
  assert loading.load_model(workdir=path).model.layers == 'cpu'
  assert loading.load_model(workdir=path, layers='reference').model.layers == 'reference'
  with pytest.raises(ValueError, match="--layers: Unknown U-Net layers 'fast'"):
    loading.load_model(pretrained=folder, layers='fast')
