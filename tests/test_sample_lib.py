"""Sharded, resumable, deterministic sampling to a folder."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sample_lib
from ddpm_jax import schedule as sched_lib
from ddpm_jax.models import UNet

SHAPE = (4, 4, 1)
SCHED = sched_lib.get_schedule('linear', beta_end=0.2, num_timesteps=10)
MODEL = UNet(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, out_ch=1)


@pytest.fixture(scope='module')
def params():
  p = MODEL.init(jax.random.key(0), jnp.zeros((1,) + SHAPE), jnp.zeros((1,), jnp.int32), train=False)['params']
  # Perturb the near-zero output conv so the network's output depends on its input.
  p['conv_out']['kernel'] = 0.05 * jax.random.normal(jax.random.key(1), p['conv_out']['kernel'].shape)
  return p


@pytest.fixture(scope='module')
def sampler8(params):
  return sample_lib.BatchSampler(MODEL, params, SCHED, sample_lib.SamplerSpec(), SHAPE, seed=3)


def test_exact_count_determinism_and_batch_independence(tmp_path, params, sampler8):
  summary = sample_lib.sample_to_dir(
    sampler8, str(tmp_path / 'a'), num_samples=7, shard_size=3, image_shape=SHAPE, progress=False
  )
  assert summary['num_shards'] == 3 and summary['skipped_shards'] == 0
  a = sample_lib.load_samples(str(tmp_path / 'a'))
  assert a.shape == (7,) + SHAPE and a.dtype == np.uint8
  assert os.path.exists(tmp_path / 'a' / 'grid.png')
  # Another shard size and a single device give the same images: image i depends on (seed, i) only.
  one_device = sample_lib.BatchSampler(
    MODEL, params, SCHED, sample_lib.SamplerSpec(), SHAPE, seed=3, devices=jax.local_devices()[:1]
  )
  sample_lib.sample_to_dir(
    one_device, str(tmp_path / 'b'), num_samples=7, shard_size=5, image_shape=SHAPE, progress=False
  )
  np.testing.assert_array_equal(sample_lib.load_samples(str(tmp_path / 'b')), a)
  assert len(np.unique(a.reshape(7, -1), axis=0)) == 7  # images differ from each other
  other_seed = sample_lib.BatchSampler(MODEL, params, SCHED, sample_lib.SamplerSpec(), SHAPE, seed=4)
  assert not np.array_equal(other_seed(np.arange(7)), a)


def test_resume_skips_finished_shards_and_refuses_other_settings(tmp_path, sampler8):
  out = str(tmp_path / 's')
  calls = []

  def flaky(indices):
    calls.append(tuple(indices))
    if len(calls) == 2:
      raise KeyboardInterrupt  # interrupted while making the second shard
    return sampler8(indices)

  with pytest.raises(KeyboardInterrupt):
    sample_lib.sample_to_dir(flaky, out, num_samples=6, shard_size=2, image_shape=SHAPE, progress=False)
  assert sorted(os.listdir(out)) == ['samples_00000.npz', 'sampling.json']
  first = np.load(os.path.join(out, 'samples_00000.npz'))['images']
  calls.clear()
  summary = sample_lib.sample_to_dir(sampler8, out, num_samples=6, shard_size=2, image_shape=SHAPE, progress=False)
  assert summary['skipped_shards'] == 1
  full = sample_lib.load_samples(out)
  np.testing.assert_array_equal(full[:2], first)
  np.testing.assert_array_equal(full, sampler8(np.arange(6)))
  # A truncated shard is redone, not trusted.
  with open(os.path.join(out, 'samples_00002.npz'), 'wb') as f:
    f.write(b'garbage')
  assert (
    sample_lib.sample_to_dir(sampler8, out, num_samples=6, shard_size=2, image_shape=SHAPE, progress=False)[
      'skipped_shards'
    ]
    == 2
  )
  np.testing.assert_array_equal(sample_lib.load_samples(out), full)
  with pytest.raises(ValueError, match='num_samples'):
    sample_lib.sample_to_dir(sampler8, out, num_samples=8, shard_size=2, image_shape=SHAPE, progress=False)
  assert json.load(open(os.path.join(out, 'sampling.json')))['num_samples'] == 6


@pytest.mark.parametrize(
  'spec',
  [
    sample_lib.SamplerSpec(name='ddim', steps=5, eta=0.0),
    sample_lib.SamplerSpec(name='respaced', steps=5, var_type='fixedsmall'),
  ],
)
def test_fast_samplers_run(spec, params):
  s = sample_lib.BatchSampler(MODEL, params, SCHED, spec, SHAPE, seed=0, devices=jax.local_devices()[:2])
  images = s(np.arange(3))
  assert images.shape == (3,) + SHAPE and images.dtype == np.uint8


@pytest.mark.parametrize(
  'spec, match',
  [
    (sample_lib.SamplerSpec(name='plms'), 'plms'),
    (sample_lib.SamplerSpec(name='ancestral', steps=5), 'respaced'),
    (sample_lib.SamplerSpec(name='ddim', steps=11), 'steps'),
    (sample_lib.SamplerSpec(name='respaced', steps=5, eta=0.5), 'eta'),
    (sample_lib.SamplerSpec(var_type='large'), 'large'),
  ],
)
def test_bad_sampler_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    spec.validate(SCHED.num_timesteps)
