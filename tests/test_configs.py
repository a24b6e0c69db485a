"""Tests for configs/*.py and train_lib.validate_config: recipes, locking, and every validation error."""

import glob
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import cifar10, default, tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py')) if not p.endswith('__init__.py'))


def _load(path):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_all_expected_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
  assert {
    'default',
    'cifar10',
    'celebahq256',
    'lsun_church256',
    'lsun_bedroom256',
    'lsun_cat256',
    'digits',
    'tiny',
  } <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_config_is_valid_and_documented(path):
  module = _load(path)
  config = module.get_config()
  train_lib.validate_config(config, device_count=8 if config.optim.batch_size % 8 == 0 else 1)
  doc = module.__doc__
  assert 'python train.py' in doc or os.path.basename(path) == 'default.py', doc
  if os.path.basename(path) != 'default.py':
    assert 'Hardware' in doc and 'Expected' in doc


def test_default_comments_every_knob():
  lines = open(os.path.join(ROOT, 'configs', 'default.py')).read().splitlines()
  knobs = [
    l
    for l in lines
    if l.strip().startswith(('config.', 'data.', 'model.', 'diffusion.', 'optim.', 'train.', 'sample.'))
    and ' = ' in l
    and 'ConfigDict()' not in l
  ]
  assert len(knobs) > 30
  for l in knobs:
    assert '  # ' in l, f'knob without a comment: {l}'


def test_cifar10_is_the_paper_recipe():
  c = cifar10.get_config()
  assert (c.data.dataset, c.data.split, c.data.image_size, c.data.random_flip) == ('cifar10', 'train', 32, True)
  assert (c.optim.batch_size, c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.eps) == (128, 2e-4, 0.9, 0.999, 1e-8)
  assert (c.optim.warmup_steps, c.optim.grad_clip, c.optim.ema_decay) == (5000, 1.0, 0.9999)
  assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks, tuple(c.model.attn_resolutions)) == (
    128,
    (1, 2, 2, 2),
    2,
    (16,),
  )
  assert c.model.dropout == 0.1 and c.train.num_steps == 800_000
  assert (c.diffusion.mean_type, c.diffusion.var_type, c.diffusion.loss_type) == ('eps', 'fixedlarge', 'mse')
  assert (c.diffusion.beta_start, c.diffusion.beta_end, c.diffusion.num_timesteps) == (1e-4, 0.02, 1000)


@pytest.mark.parametrize(
  'name,dataset,steps,flip',
  [
    ('celebahq256', 'celeb_a_hq/256', 500_000, True),
    ('lsun_church256', 'lsun/church_outdoor', 1_200_000, True),
    ('lsun_bedroom256', 'lsun/bedroom', 2_400_000, False),
    ('lsun_cat256', 'lsun/cat', 1_800_000, True),
  ],
)
def test_256_configs(name, dataset, steps, flip):
  c = _load(os.path.join(ROOT, 'configs', f'{name}.py')).get_config()
  assert (c.data.dataset, c.data.image_size, c.data.random_flip, c.train.num_steps) == (dataset, 256, flip, steps)
  assert (c.optim.batch_size, c.optim.lr, c.model.dropout, tuple(c.model.ch_mult)) == (
    64,
    2e-5,
    0.0,
    (1, 1, 2, 2, 4, 4),
  )
  assert c.sample.var_type == 'fixedsmall'


def test_config_flags_typo_fails_before_training():
  # train.py parses flags before importing JAX, so this is fast. Without --config, ml_collections applies the
  # overrides to the default config while train.py defines the flag: the same one-line error there.
  import subprocess  # pylint: disable=g-import-not-at-top

  for config_args in (['--config', os.path.join(ROOT, 'configs', 'tiny.py')], []):
    res = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), *config_args, '--config.optim.lrr=1e-4'],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert 'Traceback' not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --config.optim.lrr: optim has no key 'lrr'; did")
    assert 'optim.lr?' in res.stderr


def _set(**kv):
  def fn(c):
    for k, v in kv.items():
      node = c
      *path, last = k.split('__')
      for p in path:
        node = node[p]
      node[last] = v

  return fn


# (override, device_count, substring the error must contain)
BAD = [
  (_set(data__dataset='imagenet'), 1, "data.dataset='imagenet'"),
  (_set(data__dataset='folder', data__folder=''), 1, 'data.folder'),
  (_set(data__dataset='folder', data__folder='/no/such/dir'), 1, '/no/such/dir'),
  (_set(data__channels=2), 1, 'data.channels=2'),
  (_set(data__channels=3), 1, "'digits' is greyscale"),
  (_set(data__image_size=9), 1, 'height 9'),
  (_set(data__in_memory=False), 1, 'data.in_memory=False'),
  (_set(model__ch=20), 1, 'num_groups=8'),
  (_set(model__dropout=1.5), 1, 'dropout'),
  (_set(model__layers='gpu'), 1, "model.layers='gpu'"),
  (_set(diffusion__beta_schedule='cubic'), 1, "'cubic'"),
  (_set(diffusion__mean_type='v'), 1, "'v'"),
  (_set(diffusion__var_type='learned'), 1, 'learned'),
  (_set(diffusion__num_timesteps=0), 1, 'num_timesteps=0'),
  (_set(sample__var_type='huge'), 1, "'huge'"),
  (_set(optim__lr=0.0), 1, 'optim.lr=0.0'),
  (_set(optim__lr=-1e-4), 1, 'optim.lr=-0.0001'),
  (_set(optim__eps=0.0), 1, 'optim.eps=0.0'),
  (_set(optim__beta2=1.0), 1, 'optim.beta2=1.0'),
  (_set(optim__warmup_steps=-1), 1, 'optim.warmup_steps=-1'),
  (_set(optim__grad_clip=-1.0), 1, 'optim.grad_clip=-1.0'),
  (_set(optim__ema_decay=1.0), 1, 'optim.ema_decay=1.0'),
  (_set(optim__clip_groups=3), 1, 'optim.clip_groups=3'),
  (_set(optim__clip_groups=4, optim__grad_clip=0.0), 1, 'optim.grad_clip=0'),
  (_set(optim__clip_groups=4), 8, 'multiple of the 8 devices'),
  (_set(optim__batch_size=12), 8, 'optim.batch_size=12 is not divisible by the 8 devices'),
  (_set(train__num_steps=0), 1, 'train.num_steps=0'),
  (_set(train__checkpoint_every=0), 1, 'train.checkpoint_every=0'),
  (_set(train__num_samples=4), 8, 'train.num_samples=4'),
]


@pytest.mark.parametrize('override,devices,message', BAD, ids=[b[2][:40] for b in BAD])
def test_validation_errors(override, devices, message):
  config = tiny.get_config()
  override(config)
  with pytest.raises(train_lib.ConfigError) as e:
    train_lib.validate_config(config, device_count=devices)
  assert message in str(e.value)


def test_folder_without_images(tmp_path):
  config = tiny.get_config()
  config.data.dataset = 'folder'
  config.data.folder = str(tmp_path)
  (tmp_path / 'notes.txt').write_text('no images')
  with pytest.raises(train_lib.ConfigError, match='holds no'):
    train_lib.validate_config(config)


def test_train_and_evaluate_validates_before_building(tmp_path):
  config = tiny.get_config()
  config.optim.lr = 0.0
  with pytest.raises(train_lib.ConfigError, match='optim.lr'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_default_matches_cifar10():
  assert default.get_config().to_dict() == cifar10.get_config().to_dict()
