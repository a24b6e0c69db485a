"""The one data-parallel sampler (ddpm_jax.batch_sampler) and sharded, resumable sampling to a folder (sample_lib)."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import batch_sampler, data_parallel, sample_lib, sampling, solvers
from ddpm_jax import schedule as sched_lib
from ddpm_jax.input_pipeline import to_uint8
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
  return batch_sampler.BatchSampler(MODEL, params, SCHED, batch_sampler.SamplerSpec(), SHAPE, seed=3)


def test_exact_count_determinism_and_batch_independence(tmp_path, params, sampler8):
  summary = sample_lib.sample_to_dir(
    sampler8, str(tmp_path / 'a'), num_samples=7, shard_size=3, image_shape=SHAPE, progress=False
  )
  assert summary['num_shards'] == 3 and summary['skipped_shards'] == 0
  a = sample_lib.load_samples(str(tmp_path / 'a'))
  assert a.shape == (7,) + SHAPE and a.dtype == np.uint8
  assert os.path.exists(tmp_path / 'a' / 'grid.png')
  # Another shard size and a single device give the same images: image i depends on (seed, i) only.
  one_device = batch_sampler.BatchSampler(
    MODEL, params, SCHED, batch_sampler.SamplerSpec(), SHAPE, seed=3, devices=jax.local_devices()[:1]
  )
  sample_lib.sample_to_dir(
    one_device, str(tmp_path / 'b'), num_samples=7, shard_size=5, image_shape=SHAPE, progress=False
  )
  np.testing.assert_array_equal(sample_lib.load_samples(str(tmp_path / 'b')), a)
  assert len(np.unique(a.reshape(7, -1), axis=0)) == 7  # images differ from each other
  other_seed = batch_sampler.BatchSampler(MODEL, params, SCHED, batch_sampler.SamplerSpec(), SHAPE, seed=4)
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
    batch_sampler.SamplerSpec(name='ddim', steps=5, eta=0.0),
    batch_sampler.SamplerSpec(name='respaced', steps=5, var_type='fixedsmall'),
  ],
)
def test_fast_samplers_run(spec, params):
  s = batch_sampler.BatchSampler(MODEL, params, SCHED, spec, SHAPE, seed=0, devices=jax.local_devices()[:2])
  images = s(np.arange(3))
  assert images.shape == (3,) + SHAPE and images.dtype == np.uint8


@pytest.mark.parametrize(
  'spec, match',
  [
    (batch_sampler.SamplerSpec(name='plms2'), "Unknown sampler 'plms2'"),
    (batch_sampler.SamplerSpec(name='heun', eta=0.5), "'heun' takes no eta"),
    (batch_sampler.SamplerSpec(name='dpmpp', order=4), 'order=4'),
    (batch_sampler.SamplerSpec(name='ddim', spacing='karras'), "spacing 'karras' is not available"),
    (batch_sampler.SamplerSpec(guidance_scale=-1.0), 'guidance_scale must be >= 0'),
    (batch_sampler.SamplerSpec(name='ancestral', steps=5), 'respaced'),
    (batch_sampler.SamplerSpec(name='ddim', steps=11), 'steps'),
    (batch_sampler.SamplerSpec(name='respaced', steps=5, eta=0.5), 'eta'),
    (batch_sampler.SamplerSpec(var_type='large'), 'large'),
  ],
)
def test_bad_sampler_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    spec.validate(SCHED.num_timesteps)


@pytest.mark.parametrize(
  'spec',
  [
    batch_sampler.SamplerSpec(),
    batch_sampler.SamplerSpec(name='respaced', steps=4, var_type='fixedsmall'),
    batch_sampler.SamplerSpec(name='ddim', steps=4, eta=0.5),
    batch_sampler.SamplerSpec(name='ddim', steps=3, clip_denoised=False),
  ],
  ids=['ancestral', 'respaced', 'ddim', 'ddim_unclipped'],
)
def test_paper_samplers_are_the_sampling_loops_bit_for_bit(spec, params):
  """Image i of the paper's three samplers is `sampling`'s loop from the key fold_in(key(seed), i), as it was
  before the samplers went through `solvers.sample` (the formula below is the old sample_lib's, written out)."""
  shape = (1,) + SHAPE
  clip = True if spec.clip_denoised is None else spec.clip_denoised

  def old(p, key):
    denoise_fn = lambda x, t: MODEL.apply({'params': p}, x, t, train=False)
    if spec.name == 'ddim':
      x = sampling.ddim_sample_loop(
        SCHED, denoise_fn, shape, key, num_steps=spec.steps, eta=spec.eta or 0.0, clip_denoised=clip
      )
    elif spec.name == 'respaced':
      short, timestep_map = sched_lib.respace(SCHED, sched_lib.space_timesteps(SCHED.num_timesteps, spec.steps))
      denoise_fn = sampling.remap_timesteps(denoise_fn, timestep_map)
      x = sampling.p_sample_loop(short, denoise_fn, shape, key, var_type=spec.var_type, clip_denoised=clip)
    else:
      x = sampling.p_sample_loop(SCHED, denoise_fn, shape, key, var_type=spec.var_type, clip_denoised=clip)
    return x[0]

  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(3, dtype=jnp.uint32))
  want = jax.jit(jax.vmap(old, in_axes=(None, 0)))(params, keys)
  one = batch_sampler.image_fn(MODEL, SCHED, spec, SHAPE)
  got = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))(params, keys, jnp.zeros(3, jnp.int32))
  np.testing.assert_array_equal(got, want)
  images = batch_sampler.BatchSampler(MODEL, params, SCHED, spec, SHAPE, seed=3, devices=jax.local_devices()[:2])
  np.testing.assert_array_equal(images(np.arange(3)), to_uint8(np.asarray(want)))


@pytest.mark.parametrize('name', [n for n in solvers.SAMPLERS if n not in ('ancestral', 'respaced', 'ddim')])
def test_every_solver_samples_through_the_batch_sampler(name, params):
  """Each solver of the registry, with its defaults and 5 steps, over 3 devices: image i is the solver's own
  sample from fold_in(key(seed), i), whatever the device count."""
  spec = batch_sampler.SamplerSpec(name=name, steps=5)
  images = batch_sampler.BatchSampler(MODEL, params, SCHED, spec, SHAPE, seed=2, devices=jax.local_devices()[:3])(
    np.arange(4)
  )
  denoise_fn = lambda x, t: MODEL.apply({'params': params}, x, t, train=False)
  direct = solvers.sample(name, SCHED, denoise_fn, (1,) + SHAPE, jax.random.fold_in(jax.random.key(2), 3), steps=5)
  assert images.shape == (4,) + SHAPE and len(np.unique(images.reshape(4, -1), axis=0)) == 4
  np.testing.assert_allclose(images[3].astype(int), to_uint8(np.asarray(direct))[0].astype(int), atol=1)


def test_sampler_compiles_once_for_many_shards(params, monkeypatch):
  """The sampler is traced once per batch shape: shards of one size reuse the compiled program (chex counts the
  traces of the per-image function), and only a new size traces again."""
  traced = chex.assert_max_traces(batch_sampler.image_fn(MODEL, SCHED, batch_sampler.SamplerSpec(), SHAPE), n=2)
  monkeypatch.setattr(batch_sampler, 'image_fn', lambda *args: traced)
  images = batch_sampler.BatchSampler(MODEL, params, SCHED, batch_sampler.SamplerSpec(), SHAPE, seed=0)
  for start in range(0, 48, 16):  # three shards of 16 images, two per device
    images(np.arange(start, start + 16))
  images(np.arange(3))  # a last, smaller shard (one image per device): one more trace
  with pytest.raises(AssertionError, match='traced > 2 times'):
    images(np.arange(20))  # a third shape would be a third trace
  # The generic map behind it: the same for any per-index function.
  count = chex.assert_max_traces(lambda shared, key, x: x * shared + jax.random.uniform(key), n=1)
  run = data_parallel.IndexedMap(count, np.float32(2.0), key=0)
  first = run(np.arange(16), np.ones(16, np.float32))
  np.testing.assert_array_equal(run(np.arange(16), np.ones(16, np.float32)), first)
