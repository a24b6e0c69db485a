"""The commands on a training run's workdir: sample.py, evaluate.py (fid, bpd, class_accuracy), figures.py, edit.py.

A tiny run is trained once per module (configs/tiny.py, T = 20, made lighter: one level, no attention); each
command then loads its EMA parameters the way a user's command would.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import batch_sampler  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import evaluate_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import evaluation  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import sample_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


# One level without attention: the commands load whatever architecture the workdir's config.json names, and
# this one compiles in a fraction of configs/tiny.py's time.
LIGHT = {'model.ch_mult': (1,), 'model.attn_resolutions': ()}


def _train(workdir, **overrides):
  config = tiny.get_config()
  for k, v in {**LIGHT, **overrides}.items():
    section, name = k.split('.')
    config[section][name] = v
  train_lib.train_and_evaluate(config, workdir)
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  config = _train(workdir, **{'train.num_steps': 4, 'train.checkpoint_every': 2, 'train.num_samples': 0})
  return workdir, config


def _ema_params(workdir, config, step):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state = ckpt.restore(step, train_lib.abstract_state(config))
  ckpt.close()
  return state.ema_params


def test_sample_from_workdir_uses_the_ema_parameters(run, tmp_path):
  workdir, config = run
  out = str(tmp_path / 's')
  summary = sample_lib.run(
    workdir=workdir, pretrained=None, out_dir=out, num_samples=5, batch_size=3, seed=7, progress=False
  )
  assert summary['num_samples'] == 5 and summary['num_shards'] == 2
  got = sample_lib.load_samples(out)
  model = train_lib.build_model(config)
  spec = batch_sampler.SamplerSpec(var_type=config.sample.var_type, clip_denoised=True)
  direct = batch_sampler.BatchSampler(
    model, _ema_params(workdir, config, 4), train_lib.build_schedule(config), spec, (8, 8, 1), seed=7
  )
  np.testing.assert_array_equal(got, direct(np.arange(5)))
  # An older step, chosen with --step, is another set of parameters.
  sample_lib.run(
    workdir=workdir,
    pretrained=None,
    out_dir=str(tmp_path / 'old'),
    num_samples=5,
    batch_size=5,
    seed=7,
    step=2,
    progress=False,
  )
  assert not np.array_equal(sample_lib.load_samples(str(tmp_path / 'old')), got)
  with pytest.raises(FileNotFoundError, match='No checkpoint step 3'):
    sample_lib.run(workdir=workdir, pretrained=None, out_dir=str(tmp_path / 'x'), num_samples=1, step=3, progress=False)
  with pytest.raises(FileNotFoundError, match='config.json'):
    sample_lib.run(workdir=str(tmp_path), pretrained=None, out_dir=str(tmp_path / 'x'), num_samples=1, progress=False)
  with pytest.raises(ValueError, match='unconditional'):
    sample_lib.run(
      workdir=workdir, pretrained=None, out_dir=str(tmp_path / 'x'), num_samples=1, class_label=1, progress=False
    )


def test_workdir_of_an_older_version_without_the_new_config_keys_samples_identically(run, tmp_path):
  """A run whose config.json predates remat / class conditioning still loads, and gives the same images."""
  workdir, _ = run
  old = str(tmp_path / 'old_run')
  os.makedirs(old)
  os.symlink(os.path.join(workdir, 'checkpoints'), os.path.join(old, 'checkpoints'))
  with open(os.path.join(workdir, 'config.json')) as f:
    cfg = json.load(f)
  for section, key in (
    ('model', 'remat'),
    ('model', 'num_classes'),
    ('model', 'class_dropout'),
    ('sample', 'guidance_scale'),
  ):
    del cfg[section][key]
  with open(os.path.join(old, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  kw = dict(pretrained=None, num_samples=3, batch_size=3, seed=1, progress=False)
  sample_lib.run(workdir=workdir, out_dir=str(tmp_path / 'new'), **kw)
  sample_lib.run(workdir=old, out_dir=str(tmp_path / 'old'), **kw)
  np.testing.assert_array_equal(
    sample_lib.load_samples(str(tmp_path / 'new')), sample_lib.load_samples(str(tmp_path / 'old'))
  )


def test_bpd_from_workdir_matches_bpd_over_dataset(run):
  workdir, config = run
  result = evaluate_lib.run_bpd(
    workdir=workdir,
    pretrained=None,
    dataset='digits',
    split='train',
    num_images=6,
    batch_size=4,
    seed=3,
    progress=False,
  )
  direct = evaluation.bpd_over_dataset(
    train_lib.build_model(config),
    _ema_params(workdir, config, 4),
    train_lib.build_schedule(config),
    input_pipeline.eval_images('digits', image_size=8, channels=1, batch_size=6, num_images=6),
    seed=3,
    var_type=config.sample.var_type,
    progress=False,
  )
  assert result['num_images'] == 6 and len(result['terms_bpd']) == 20
  assert result['bpd'] == pytest.approx(direct.total_bpd, rel=1e-6)
  assert result['decoder_bpd'] == pytest.approx(direct.terms_bpd[0], rel=1e-6)
  assert np.isfinite(result['bpd']) and result['bpd'] > 0


def test_fid_command_plumbing(tmp_path, monkeypatch):
  """run_fid: shards in, reference statistics from an image folder computed once and cached, FID of a set
  against itself 0. A tiny stand-in replaces Inception (its weights cannot be downloaded here)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  ref = tmp_path / 'ref'
  ref.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(ref / f'{i:02d}.png')
  samples = str(tmp_path / 'samples')
  sample_lib.sample_to_dir(
    lambda idx: images[idx], samples, num_samples=12, shard_size=5, image_shape=(8, 8, 3), grid_size=0, progress=False
  )
  proj = rng.normal(size=(8 * 8 * 3, 6))
  seen = []

  def feature_fn(batch):
    seen.append(len(batch))
    x = np.asarray(batch, np.float64).reshape(len(batch), -1) / 255.0
    return evaluation.Features(pool=x @ proj, logits=x @ proj[:, :4])

  weights = tmp_path / 'w.npz'
  weights.write_bytes(b'stand-in')
  monkeypatch.setattr(evaluation.inception_lib, 'load_inception_params', lambda path: {'path': path})
  monkeypatch.setattr(evaluation, 'make_feature_fn', lambda variables, batch_size: feature_fn)
  stats = str(tmp_path / 'stats.npz')
  result = evaluate_lib.run_fid(
    samples_dir=samples,
    inception_weights=str(weights),
    ref_stats=stats,
    ref_folder=str(ref),
    batch_size=5,
    num_splits=3,
    progress=False,
  )
  assert abs(result['fid']) < 1e-6 and result['num_samples'] == 12 and result['num_reference_images'] == 12
  assert os.path.exists(stats) and 'inception_score' in result
  seen.clear()
  again = evaluate_lib.run_fid(
    samples_dir=samples,
    inception_weights=str(weights),
    ref_stats=stats,
    ref_folder=str(ref),
    batch_size=5,
    num_splits=3,
    progress=False,
  )
  assert again['fid'] == pytest.approx(result['fid'], abs=1e-9)
  assert sum(seen) == 12  # the cached reference statistics were not recomputed
  with pytest.raises(FileNotFoundError, match='Inception weights'):
    evaluate_lib.run_fid(samples_dir=samples, inception_weights=str(tmp_path / 'missing.pth'), ref_stats=stats)


def _cli(script, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT)
  env['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '').replace(
    '--xla_force_host_platform_device_count=8', ''
  )  # one device
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, script), *args],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def test_sample_and_figures_commands(run, tmp_path):
  workdir, _ = run
  out = str(tmp_path / 'cli')
  res = _cli('sample.py', '--workdir', workdir, '--num_samples', '3', '--batch_size', '2', '--out', out)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'Wrote 3 samples' in res.stdout
  assert sample_lib.load_samples(out).shape == (3, 8, 8, 1) and os.path.exists(os.path.join(out, 'grid.png'))
  res = _cli('sample.py', '--workdir', workdir, '--out', out, '--sampler', 'ancestral', '--steps', '5')
  assert res.returncode != 0 and 'respaced' in res.stderr  # a clear error, before anything compiles
  png = str(tmp_path / 'forward.png')
  res = _cli(
    'figures.py', '--figure', 'forward', '--workdir', workdir, '--dataset', 'digits', '--num_images', '2', '--out', png
  )
  assert res.returncode == 0, res.stderr[-3000:]
  with Image.open(png) as im:
    assert im.size[0] > 0


def test_edit_command_inpaints_and_sdedits_a_workdir_model(run, tmp_path):
  workdir, _ = run
  out = str(tmp_path / 'inpaint')
  res = _cli(
    'edit.py',
    '--mode',
    'inpaint',
    '--workdir',
    workdir,
    '--dataset',
    'digits',
    '--num_images',
    '2',
    '--mask',
    'right',
    '--jump_length',
    '5',
    '--jump_n_sample',
    '2',
    '--num_samples',
    '2',
    '--out',
    out,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout[res.stdout.index('{') :])
  assert summary['known_pixels_max_abs_error'] == 0 and summary['network_calls_per_result'] == 20 + 5 * 3
  digits = input_pipeline.load_digits()[:2]
  with np.load(os.path.join(out, 'results.npz')) as f:
    np.testing.assert_array_equal(f['inputs'], digits)
    np.testing.assert_array_equal(f['results'][:, :, :, :4], np.broadcast_to(digits[:, None, :, :4], (2, 2, 8, 4, 1)))
  png = tmp_path / 'one.png'
  Image.fromarray(np.full((8, 8), 255, np.uint8)).save(png)
  out = str(tmp_path / 'sdedit')
  res = _cli('edit.py', '--mode', 'sdedit', '--workdir', workdir, '--image', str(png), '--t_start', '10', '--out', out)
  assert res.returncode == 0, res.stderr[-3000:]
  assert os.path.exists(os.path.join(out, 'grid.png')) and os.path.exists(os.path.join(out, 'result_000_03.png'))
  res = _cli('edit.py', '--mode', 'sdedit', '--workdir', workdir, '--image', str(png), '--out', str(tmp_path / 'x'))
  assert res.returncode != 0 and '--t_start' in res.stderr  # a clear error, before anything compiles


@pytest.mark.slow
def test_class_conditional_run_end_to_end(tmp_path):
  """Train a tiny class-conditional digits model, sample one class with guidance, score the classes."""
  workdir = str(tmp_path / 'cond')
  _train(
    workdir,
    **{
      'model.num_classes': 10,
      'model.class_dropout': 0.2,
      'sample.guidance_scale': 1.0,
      'train.num_steps': 3,
      'train.checkpoint_every': 3,
      'train.num_samples': 40,
    },
  )
  with Image.open(os.path.join(workdir, 'samples', 'step_00000003.png')) as im:
    w, h = im.size
  assert h > w  # 10 rows (one per class) of 4 images
  out = str(tmp_path / 'threes')
  sample_lib.run(
    workdir=workdir,
    pretrained=None,
    out_dir=out,
    num_samples=4,
    batch_size=4,
    class_label=3,
    guidance_scale=2.0,
    progress=False,
  )
  _, labels = sample_lib.load_samples(out, with_labels=True)
  assert list(labels) == [3, 3, 3, 3]
  result = evaluate_lib.run_class_accuracy(
    workdir=workdir, guidance_scales=[0, 2], num_samples=20, batch_size=10, progress=False
  )
  assert result['classifier_accuracy_on_real_digits'] > 0.95
  assert [r['guidance_scale'] for r in result['results']] == [0.0, 2.0]
  for r in result['results']:
    assert 0.0 <= r['accuracy'] <= 1.0 and len(r['per_class']) == 10
  with pytest.raises(ValueError, match=r'class_label must be ints in 0\.\.9'):
    sample_lib.run(
      workdir=workdir, pretrained=None, out_dir=str(tmp_path / 'x'), num_samples=1, class_label=11, progress=False
    )


def test_class_accuracy_of_real_digits_is_high_and_of_wrong_labels_low():
  clf, held_out = evaluation.digits_classifier()
  images, labels = input_pipeline.load_array('digits', image_size=8, channels=1, with_labels=True)
  acc, per_class = evaluation.class_accuracy(images[:300], labels[:300], clf)
  assert acc > 0.95 and held_out > 0.95 and per_class.shape == (10,)
  wrong, _ = evaluation.class_accuracy(images[:300], (labels[:300] + 1) % 10, clf)
  assert wrong < 0.05
  with pytest.raises(ValueError, match='8x8'):
    evaluation.class_accuracy(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, int), clf)
