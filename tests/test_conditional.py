"""Class conditioning and classifier-free guidance: the U-Net's label embedding, the guided eps, label dropout in
the train step, labelled input, conditional sampling to a folder, and the config checks."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import digits_cond  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import data_parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import guidance  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import image_grid  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import loading  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import batch_sampler  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import sample_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import schedule as schedule_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.formats import diffusers as diffusers_format  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.models import UNet, count_params, unet_cifar10  # pylint: disable=g-import-not-at-top

ARCH = dict(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, out_ch=1)
SHAPE = (4, 4, 1)
SCHED = schedule_lib.get_schedule('linear', beta_end=0.2, num_timesteps=10)
K = 3


def _init(model, key=0):
  y = (jnp.zeros((1,), jnp.int32),) if model.num_classes else ()
  return model.init(jax.random.key(key), jnp.zeros((1,) + SHAPE), jnp.zeros((1,), jnp.int32), *y, train=False)['params']


@pytest.fixture(scope='module')
def cond():
  model = UNet(num_classes=K, **ARCH)
  params = _init(model)
  # Make the output depend on its inputs and labels: the output conv and each block's last conv are
  # initialized near zero, so perturb every leaf.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return model, params


# ------------------------------------------------------------------------------------------------------------------
# The U-Net


def test_unconditional_tree_unchanged_and_label_embedding_added(cond):
  model, params = cond
  plain = _init(UNet(**ARCH))
  assert 'label_emb' not in plain
  assert set(params) == set(plain) | {'label_emb'}
  assert params['label_emb']['embedding'].shape == (K + 1, 4 * ARCH['ch'])  # K classes + the null class
  assert count_params(params) == count_params(plain) + (K + 1) * 4 * ARCH['ch']
  # The paper's model keeps its exact parameter count; a 10-class CIFAR model adds 11 x 512 embeddings.
  shapes = lambda m: jax.eval_shape(lambda: _init_full(m))
  assert count_params(shapes(unet_cifar10())) == 35_746_307
  assert count_params(shapes(unet_cifar10(num_classes=10))) == 35_746_307 + 11 * 512


def _init_full(model):
  y = (jnp.zeros((1,), jnp.int32),) if model.num_classes else ()
  return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32), *y, train=False)['params']


def test_labels_change_the_output_and_bad_labels_raise(cond):
  model, params = cond
  x = jax.random.normal(jax.random.key(2), (3,) + SHAPE)
  t = jnp.array([1, 5, 9])
  outs = [model.apply({'params': params}, x, t, jnp.full((3,), k), train=False) for k in range(K + 1)]
  for a in range(K + 1):
    for b in range(a + 1, K + 1):
      assert not np.allclose(outs[a], outs[b])
  with pytest.raises(ValueError, match='class-conditional'):
    model.apply({'params': params}, x, t, train=False)
  with pytest.raises(ValueError, match='unconditional'):
    UNet(**ARCH).apply({'params': _init(UNet(**ARCH))}, x, t, jnp.zeros((3,), jnp.int32), train=False)
  with pytest.raises(ValueError, match=r'y must have shape'):
    model.apply({'params': params}, x, t, jnp.zeros((2,), jnp.int32), train=False)
  with pytest.raises(ValueError, match='num_classes'):
    UNet(num_classes=-1, **ARCH)
  assert model.null_label() == K


# ------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_guided_eps_equals_the_formula_in_one_batched_call():
  calls = []

  def model_fn(x, t, y):
    calls.append(x.shape[0])
    # Any function of (x, t, y) whose output depends on y; two extra channels stand for a learned variance.
    eps = jnp.sin(x * (1.0 + y[:, None, None, None])) + 0.01 * t[:, None, None, None]
    return jnp.concatenate([eps, jnp.cos(x + y[:, None, None, None])[..., :1].repeat(2, -1)], -1)

  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 2))
  t = jnp.array([0, 3, 5, 9])
  y = jnp.array([0, 1, 2, 1])
  w = 2.5
  out = guidance.classifier_free_guidance(model_fn, y, null_label=K, guidance_scale=w)(x, t)
  assert calls == [8]  # conditional and unconditional halves in ONE network call
  cond, uncond = model_fn(x, t, y), model_fn(x, t, jnp.full_like(y, K))
  np.testing.assert_allclose(out[..., :2], (1 + w) * cond[..., :2] - w * uncond[..., :2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[..., 2:], cond[..., 2:])  # the variance channels are the conditional ones
  calls.clear()
  np.testing.assert_allclose(
    guidance.classifier_free_guidance(model_fn, y, null_label=K, guidance_scale=0.0)(x, t), cond
  )
  assert calls == [4]  # w = 0: the conditional half only
  with pytest.raises(ValueError, match='guidance_scale'):
    guidance.classifier_free_guidance(model_fn, y, null_label=K, guidance_scale=-1.0)


def test_loaded_model_denoise_fn_checks_conditioning(cond):
  model, params = cond
  loaded = loading.LoadedModel(
    model=model,
    params=params,
    schedule=SCHED,
    var_type='fixedlarge',
    clip_denoised=True,
    mean_type='eps',
    image_size=4,
    in_channels=1,
    source='test',
  )
  x = jax.random.normal(jax.random.key(3), (2,) + SHAPE)
  t = jnp.array([2, 7])
  got = loaded.denoise_fn(class_label=1, guidance_scale=1.5)(x, t)
  apply = lambda y: model.apply({'params': params}, x, t, jnp.full((2,), y), train=False)
  np.testing.assert_allclose(got, 2.5 * apply(1) - 1.5 * apply(K), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='class-conditional'):
    loaded.denoise_fn()
  with pytest.raises(ValueError, match='class_label'):
    loaded.denoise_fn(class_label=K + 1)
  plain = dataclasses.replace(loaded, model=UNet(**ARCH), params=_init(UNet(**ARCH)))
  with pytest.raises(ValueError, match='unconditional'):
    plain.denoise_fn(class_label=0)
  with pytest.raises(ValueError, match='guidance_scale'):
    plain.denoise_fn(guidance_scale=1.0)
  # diffusers' UNet2DModel has the same class embedding (num_class_embeds rows added after the timestep MLP).
  config = diffusers_format.unet_config(model, 4, in_channels=1)
  assert config['num_class_embeds'] == K + 1 and diffusers_format.unet_from_config(config)[0].num_classes == K


# ------------------------------------------------------------------------------------------------------------------
# Training: labelled batches and label dropout


def test_labelled_digits_folder_and_batches(tmp_path):
  images, labels = input_pipeline.load_array('digits', image_size=8, channels=1, with_labels=True)
  assert images.shape == (1797, 8, 8, 1) and labels.shape == (1797,) and set(labels) == set(range(10))
  np.testing.assert_array_equal(images, input_pipeline.load_digits(8))
  it = input_pipeline.in_memory_batches(
    images, labels=labels, global_batch=8, seed=0, num_local_devices=2, random_flip=False
  )
  batch = next(it)
  assert batch['image'].shape == (2, 4, 8, 8, 1) and batch['label'].shape == (2, 4)
  idx = input_pipeline.global_batch_indices(len(images), 8, 0, 0)
  np.testing.assert_array_equal(batch['label'].reshape(-1), labels[idx])  # each label stays with its image
  np.testing.assert_array_equal(input_pipeline.to_uint8(batch['image'].reshape(8, 8, 8, 1)), images[idx])

  rng = np.random.default_rng(0)
  for name, n in (('cat', 2), ('dog', 3)):
    (tmp_path / name).mkdir()
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / name / f'{i}.png')
  images, labels = input_pipeline.load_array('folder', folder=str(tmp_path), image_size=4, channels=3, with_labels=True)
  assert images.shape == (5, 4, 4, 3) and list(labels) == [0, 0, 1, 1, 1]
  Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / 'stray.png')
  with pytest.raises(ValueError, match='outside the class sub-folders'):
    input_pipeline.load_array('folder', folder=str(tmp_path), image_size=4, channels=3, with_labels=True)
  with pytest.raises(ValueError, match='no class labels'):
    input_pipeline.load_array('lsun/cat', image_size=4, channels=3, with_labels=True)


def _step_once(model, batch, class_dropout, seed=0):
  tx = train_lib.make_optimizer(lr=1e-3, warmup_steps=0)
  state = train_lib.create_state(train_lib.init_params(model, image_shape=SHAPE, key=jax.random.key(seed)), tx)
  devices = jax.local_devices()[:1]
  settings = train_lib.StepSettings(
    model=model, schedule=SCHED, tx=tx, lr_fn=train_lib.warmup_lr(1e-3, 0), ema_decay=0.9, class_dropout=class_dropout
  )
  step = train_lib.make_p_train_step(settings, devices=devices)
  batch = jax.tree.map(lambda a: a[None], batch)
  new_state, metrics = step(data_parallel.replicate(state, devices), batch, jax.random.key(1))
  return data_parallel.unreplicate(new_state), {k: float(v) for k, v in metrics.items()}


def test_train_step_with_labels_and_label_dropout():
  model = UNet(num_classes=K, **ARCH)
  x = jax.random.uniform(jax.random.key(0), (24,) + SHAPE, minval=-1, maxval=1)
  labels = jnp.arange(24) % K
  state, metrics = _step_once(model, {'image': x, 'label': labels}, class_dropout=0.0)
  assert np.isfinite(metrics['loss'])
  emb_grad_rows = lambda s: np.flatnonzero(np.any(s.params['label_emb']['embedding'] != _init_emb(model), axis=1))
  # Adam moves exactly the embedding rows that were used: without dropout the null row is untouched ...
  assert list(emb_grad_rows(state)) == list(range(K))
  # ... with dropout 1/2 some labels become the null class, and the null row is trained too.
  state, _ = _step_once(model, {'image': x, 'label': labels}, class_dropout=0.5)
  assert list(emb_grad_rows(state)) == list(range(K + 1))
  with pytest.raises(ValueError, match='needs batches'):
    _step_once(model, x, class_dropout=0.0)
  with pytest.raises(ValueError, match='needs batches'):
    _step_once(UNet(**ARCH), {'image': x, 'label': labels}, class_dropout=0.0)


def _init_emb(model):
  return np.asarray(train_lib.init_params(model, image_shape=SHAPE, key=jax.random.key(0))['label_emb']['embedding'])


def test_label_dropout_rate():
  """The fraction of labels replaced by the null class is class_dropout (binomial bounds)."""
  seen = []

  class Spy(UNet):
    def __call__(self, x, t, y=None, *, train):  # pylint: disable=arguments-differ
      jax.debug.callback(lambda v: seen.append(np.asarray(v)), y)
      return super().__call__(x, t, y, train=train)

  model = Spy(num_classes=K, **ARCH)
  n = 512
  x = jnp.zeros((n,) + SHAPE)
  _step_once(model, {'image': x, 'label': jnp.zeros((n,), jnp.int32)}, class_dropout=0.25)
  y = np.concatenate(seen)
  frac = np.mean(y == K)
  assert abs(frac - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n), frac
  assert set(np.unique(y)) <= {0, K}


# ------------------------------------------------------------------------------------------------------------------
# Sampling to a folder


def test_conditional_batch_sampler_labels_guidance_and_shards(tmp_path, cond):
  model, params = cond
  spec = batch_sampler.SamplerSpec(guidance_scale=2.0)
  sampler = batch_sampler.BatchSampler(model, params, SCHED, spec, SHAPE, seed=0)
  np.testing.assert_array_equal(sampler.labels(np.arange(7)), np.arange(7) % K)  # class i mod K
  out = str(tmp_path / 'cycle')
  sample_lib.sample_to_dir(sampler, out, num_samples=7, shard_size=4, image_shape=SHAPE, progress=False)
  images, labels = sample_lib.load_samples(out, with_labels=True)
  np.testing.assert_array_equal(labels, np.arange(7) % K)
  with Image.open(os.path.join(out, 'grid.png')) as im:  # one row per class (classes 0, 1, 2 of images 0..6)
    grid = np.asarray(im)
  rows, ncols = image_grid.rows_by_class(images, labels)
  assert ncols == 3
  np.testing.assert_array_equal(grid, np.repeat(np.repeat(image_grid.make_grid(rows, ncols=3)[..., 0], 16, 0), 16, 1))
  np.testing.assert_array_equal(rows[3:5], images[[1, 4]])  # second row: class 1
  # Image i of class k is the same whichever way the labels were chosen; another class gives another image.
  fixed = batch_sampler.BatchSampler(
    model, params, SCHED, batch_sampler.SamplerSpec(class_label=1, guidance_scale=2.0), SHAPE, seed=0
  )
  np.testing.assert_array_equal(fixed(np.array([1, 4])), images[[1, 4]])
  assert not np.array_equal(fixed(np.array([0])), images[[0]])
  # Guidance changes the samples; w = 0 is the plain conditional model.
  plain = batch_sampler.BatchSampler(model, params, SCHED, batch_sampler.SamplerSpec(class_label=1), SHAPE, seed=0)
  assert not np.array_equal(plain(np.array([1, 4])), images[[1, 4]])
  # Every sampler takes labels and guidance.
  for name in ('respaced', 'ddim'):
    s = batch_sampler.BatchSampler(
      model,
      params,
      SCHED,
      batch_sampler.SamplerSpec(name=name, steps=5, class_label=2, guidance_scale=1.0),
      SHAPE,
      seed=0,
    )
    assert s(np.arange(2)).shape == (2,) + SHAPE
  with pytest.raises(ValueError, match='class-conditional'):
    batch_sampler.BatchSampler(
      UNet(**ARCH), _init(UNet(**ARCH)), SCHED, batch_sampler.SamplerSpec(class_label=0), SHAPE, seed=0
    )
  uncond = batch_sampler.BatchSampler(
    UNet(**ARCH), _init(UNet(**ARCH)), SCHED, batch_sampler.SamplerSpec(), SHAPE, seed=0
  )
  assert uncond.labels(np.arange(3)) is None
  sample_lib.sample_to_dir(
    uncond, str(tmp_path / 'uncond'), num_samples=2, shard_size=2, image_shape=SHAPE, grid_size=0, progress=False
  )
  with pytest.raises(ValueError, match='unconditional'):
    sample_lib.load_samples(str(tmp_path / 'uncond'), with_labels=True)


# ------------------------------------------------------------------------------------------------------------------
# Configs


def _set(config, **kw):
  for k, v in kw.items():
    node = config
    *path, last = k.split('__')
    for p in path:
      node = node[p]
    node[last] = v
  return config


def test_digits_cond_config_is_valid():
  config = digits_cond.get_config()
  train_lib.validate_config(config, device_count=1)
  assert config.model.num_classes == 10 and config.model.class_dropout == 0.1
  assert train_lib.build_model(config).num_classes == 10


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(model__num_classes=10, data__dataset='lsun/cat', data__channels=3, data__image_size=8), 'labelled dataset'),
    (dict(model__num_classes=7), 'has 10 classes'),
    (dict(model__num_classes=10, model__class_dropout=1.0), 'class_dropout'),
    (dict(sample__guidance_scale=1.0), 'class-conditional'),
    (dict(model__num_classes=10, sample__guidance_scale=-1.0), 'guidance_scale'),
  ],
)
def test_conditional_config_errors(overrides, match):
  with pytest.raises(train_lib.ConfigError, match=match):
    train_lib.validate_config(_set(tiny.get_config(), **overrides), device_count=1)
