"""benchmarks/sampler_quality.py: the sweep end to end on tiny models, its cache, budgets, scores and errors.

The models are tiny U-Nets (T = 20) with random parameters written straight into a workdir (no training), so
the samples mean nothing: the tests check what the benchmark does with them. The digits features of
`evaluation.digits_feature_fn` are checked on real digits.
"""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import checkpoint, errors, evaluation, input_pipeline, solvers, train_lib
from ddpm_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_workdir  # pylint: disable=wrong-import-position
from configs import tiny  # pylint: disable=wrong-import-position


def _load_benchmark():
  spec = importlib.util.spec_from_file_location(
    'ddpm_sampler_quality', os.path.join(ROOT, 'benchmarks', 'sampler_quality.py')
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


sq = _load_benchmark()


def _config(num_classes=0, channels=1):
  """The tiny config, smaller still (one level, no attention): a few seconds to compile a sampler."""
  config = tiny.get_config()
  config.model.ch = 8
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.model.num_groups = 4
  config.model.num_classes = num_classes
  config.data.channels = channels
  if num_classes:
    config.sample.guidance_scale = 1.5
  return config


def _random_workdir(path, config, seed=0):
  """A train.py workdir whose parameters (and EMA parameters) are random: samples that depend on the network."""
  os.makedirs(path)
  workdir_lib.save_config(config, path)
  rng = np.random.default_rng(seed)
  state = train_lib.abstract_state(config)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), state.params)
  tree = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)
  tree = tree.replace(step=np.asarray(1, np.int32), params=params, ema_params=params)
  ckpt = checkpoint.Checkpointer(os.path.join(path, 'checkpoints'))
  ckpt.save(1, tree, metadata=workdir_lib.checkpoint_metadata(config))
  ckpt.close()
  return str(path)


@pytest.fixture(scope='module')
def digits_workdir(tmp_path_factory):
  return _random_workdir(tmp_path_factory.mktemp('q') / 'digits', _config())


# ------------------------------------------------------------------------------------------- the digits features


@pytest.fixture(scope='module')
def features():
  return evaluation.digits_feature_fn()


@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')  # a unit silent on a set: singular covariance
def test_digits_features_separate_real_digits_from_noise(features):
  feats, held_out, accuracy = features
  images = input_pipeline.load_digits(8)
  train = np.setdiff1d(np.arange(len(images)), held_out)
  assert len(held_out) == 359 and accuracy > 0.95  # the MLP is a good digits classifier
  ref = evaluation.compute_statistics(feats(images[train]))
  fd = lambda x: evaluation.frechet_distance(*evaluation.compute_statistics(feats(x)), *ref)
  rng = np.random.default_rng(0)
  real = fd(images[held_out])  # digits the MLP never saw
  noise = fd(rng.integers(0, 256, (359, 8, 8, 1), dtype=np.uint8))
  blurred = images[held_out].astype(np.float64)
  blurred = ((blurred + np.roll(blurred, 1, 1) + np.roll(blurred, 1, 2)) / 3).astype(np.uint8)
  half = fd(images[held_out][input_pipeline.load_digits_labels()[held_out] < 5])  # five digits of ten
  assert real < 1.0 and noise > 10.0
  assert 5 * real < fd(blurred) < noise and 5 * real < half < noise  # it sees worse images and missing classes
  d = feats(images[:5]).shape[1]
  assert feats(images[:5]).shape == (5, d) and 32 <= d <= 64


def test_digits_features_reject_other_images(features):
  feats = features[0]
  with pytest.raises(ValueError, match=r'uint8 images \[N, 8, 8, 1\]'):
    feats(np.zeros((2, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match=r'\[N, 8, 8, 1\]'):
    feats(np.zeros((2, 8, 8, 3), np.uint8))


def test_class_entropy():
  assert sq.class_entropy(np.arange(100) % 10, 10) == pytest.approx(1.0)
  assert sq.class_entropy(np.zeros(50, int), 10) == 0.0
  assert sq.class_entropy(np.arange(100) % 5, 10) == pytest.approx(np.log(5) / np.log(10))


# ---------------------------------------------------------------------------------------- budgets to steps


def test_steps_for_budget():
  T = 1000
  assert sq.steps_for_budget('dpmpp', 25, T) == (25, 25)
  assert sq.steps_for_budget('heun', 20, T) == (10, 19)  # 2N - 1 calls
  assert sq.steps_for_budget('heun', 5, T) == (3, 5)
  assert sq.steps_for_budget('plms', 5, T) == (4, 5)  # N + 1 calls
  assert sq.steps_for_budget('plms', 1, T) == (1, 1)
  assert sq.steps_for_budget('pndm', 15, T) == (6, 15)  # N + 9 calls
  assert 'at least 13 calls' in sq.steps_for_budget('pndm', 10, T)
  assert 'runs all T = 1000 steps' in sq.steps_for_budget('ancestral', 100, T)
  assert sq.steps_for_budget('ancestral', 1000, T) == (1000, 1000)
  assert sq.steps_for_budget('ancestral', 5000, T) == (1000, 1000)
  assert sq.steps_for_budget('ddim', 5000, T) == (1000, 1000)  # never more than T steps
  assert sq.steps_for_budget('heun', 20, 8) == (8, 15)  # a short schedule caps the steps


def test_budgets_map_to_the_most_steps_within_them():
  for name in solvers.SAMPLERS:
    for budget in (1, 2, 5, 7, 10, 15, 20, 25, 50, 100, 999, 1000):
      found = sq.steps_for_budget(name, budget, 1000)
      if isinstance(found, str):
        assert name in ('ancestral', 'pndm'), (name, budget, found)
        continue
      steps, calls = found
      assert calls == solvers.network_calls(name, steps, 1000) <= budget, (name, budget)
      if solvers.SAMPLERS[name].spacings and steps < 1000:  # one step more would not fit
        assert solvers.network_calls(name, steps + 1, 1000) > budget, (name, budget)


def test_plan_runs_each_combination_once_and_lists_skips():
  runs, skipped = sq.plan_runs(['heun', 'ancestral'], [5, 6, 20, 1000], 1000)
  assert [(r.sampler, r.steps, r.calls, r.budgets) for r in runs] == [
    ('heun', 3, 5, (5, 6)),
    ('heun', 10, 19, (20,)),
    ('heun', 500, 999, (1000,)),
    ('ancestral', 1000, 1000, (1000,)),
  ]
  assert [(s['sampler'], s['budget']) for s in skipped] == [('ancestral', 5), ('ancestral', 6), ('ancestral', 20)]


def test_calls_to_reach_counts_only_lasting_quality():
  row = lambda name, calls, fd: dict(sampler=name, steps=calls, network_calls=calls, scores=dict(fd_digits=fd))
  rows = [
    row('ddim', 5, 3.0),
    row('ddim', 10, 1.02),  # within 5 % of 1.0, but 20 calls is not: does not count
    row('ddim', 20, 1.2),
    row('ddim', 50, 1.04),
    row('ddim', 100, 0.9),
    row('dpmpp', 5, 1.5),
    row('dpmpp', 10, 0.98),
    row('dpmpp', 20, 1.0),
    row('euler', 10, 2.0),
    row('ddim', 1000, 1.0),  # the reference itself is left out
  ]
  assert sq.calls_to_reach(rows, 'fd_digits', 1.0, 0.05, 1000) == {'ddim': 50, 'dpmpp': 10, 'euler': None}
  rows.append(dict(sampler='ancestral', steps=1000, network_calls=1000, scores=dict(fd_digits=0.5)))
  lines = sq.reach_summary(rows, 1000, 0.05)
  assert lines[0].startswith('ancestral-1000 fd_digits 0.5000 (within 5%) reached at: ddim not within')
  assert (
    lines[1] == 'DDIM-1000 fd_digits 1.0000 (within 5%) reached at: ddim 50, dpmpp 10, euler not within the budgets'
  )


# ------------------------------------------------------------------------------------------------- sampling


def test_same_initial_noise_for_every_sampler(tmp_path):
  """With a network that predicts eps = 0 every deterministic sampler returns x_T / sqrt(abar) at its first node
  (T - 1 for all of these), which uint8 clips to the same image: equal images mean equal initial noise."""
  loaded = sq.loading.load_model(workdir=fake_workdir.make_workdir(str(tmp_path / 'zeros'), _config()))
  images = {name: sq.sample_images(loaded, name, 5, [3, 0, 7], seed=1, batch_size=2) for name in ('ddim', 'euler')}
  for name, x in images.items():
    assert x.shape == (3, 8, 8, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, images['ddim'], err_msg=name)
  assert len({x.tobytes() for x in images['ddim']}) == 3  # different images get different noise


def test_image_i_depends_only_on_seed_and_i(digits_workdir):
  loaded = sq.loading.load_model(workdir=digits_workdir)
  a = sq.sample_images(loaded, 'dpmpp_sde', 4, [0, 1, 2, 3, 4], seed=0, batch_size=2)  # stochastic, 3 batches
  b = sq.sample_images(loaded, 'dpmpp_sde', 4, [4, 2], seed=0, batch_size=5)
  np.testing.assert_array_equal(b, a[[4, 2]])
  assert len({x.tobytes() for x in a}) == 5


# --------------------------------------------------------------------------------------------- the whole sweep


def test_sweep_end_to_end_and_cache(digits_workdir, tmp_path, monkeypatch, capsys):
  out = tmp_path / 'out'
  argv = ['--workdir', digits_workdir, '--num_images', '12', '--batch_size', '8', '--out', str(out)]
  rows = sq.main(argv + ['--samplers', 'ddim,heun,ancestral', '--calls', '4,20'])  # T = 20
  text = capsys.readouterr().out
  assert sorted((r['sampler'], r['steps'], r['network_calls']) for r in rows) == [
    ('ancestral', 20, 20),
    ('ddim', 4, 4),
    ('ddim', 20, 20),
    ('heun', 2, 3),
    ('heun', 10, 19),
  ]
  assert 'skipped: ancestral within 4 calls: runs all T = 20 steps (20 calls)' in text
  for r in rows:
    assert set(r['scores']) == {'fd_digits', 'class_entropy'}  # an unconditional model
    assert r['scores']['fd_digits'] > 0 and 0 <= r['scores']['class_entropy'] <= 1
    assert r['seconds'] >= r['sample_seconds'] >= r['first_batch_seconds'] > 0
    assert r['options']['spacing'] == solvers.SAMPLERS[r['sampler']].default_spacing
    # x0 clipping: the model's setting for the paper's samplers, none for the solvers (their default)
    assert r['options']['clip_denoised'] == (r['sampler'] != 'heun')
  data = json.loads((out / 'results.json').read_text())
  assert data['rows'] == rows and data['skipped'] == [
    {'sampler': 'ancestral', 'budget': 4, 'reason': 'runs all T = 20 steps (20 calls)'}
  ]
  assert data['digits_reference']['fd_real_held_out'] < 1.0
  assert (out / 'quality_vs_calls.png').stat().st_size > 1000
  table = text[text.index('sampler ') :]
  assert 'fd_digits' in table and 'class_entropy' in table
  assert [line.split()[:3] for line in table.splitlines()[2:7]] == [
    ['ancestral', '20', '20'],
    ['ddim', '4', '4'],
    ['ddim', '20', '20'],
    ['heun', '2', '3'],
    ['heun', '10', '19'],
  ]
  assert 'ancestral-20 fd_digits' in text and 'DDIM-20 fd_digits' in text  # the summary against the references

  # Rerun: nothing is sampled again.
  sampled = []
  real = sq.sample_images
  monkeypatch.setattr(
    sq, 'sample_images', lambda *a, **k: sampled.append((a[1], a[2], k['clip_denoised'])) or real(*a, **k)
  )
  assert sq.main(argv + ['--samplers', 'ddim,heun,ancestral', '--calls', '4,20']) == rows and sampled == []
  # Clipping everywhere: DDIM clipped already and is reused; Heun samples again, clipped; rows accumulate.
  clipped = sq.main(argv + ['--samplers', 'ddim,heun', '--calls', '4', '--clip_denoised', 'on'])
  assert sampled == [('heun', 2, True)]
  assert [(r['sampler'], r['steps'], r['options']['clip_denoised']) for r in sq._order(clipped)] == [
    ('ancestral', 20, True),
    ('ddim', 4, True),
    ('ddim', 20, True),
    ('heun', 2, True),
  ]
  assert (out / 'quality_vs_calls_clip_on.png').exists()
  assert len(json.loads((out / 'results.json').read_text())['rows']) == 6
  # Other settings are other rows.
  settings = dict(rows[0]['settings'], num_images=6)
  assert sq.find_row(rows, rows[0]['settings'], 'ddim', 4, True) is not None
  assert sq.find_row(rows, settings, 'ddim', 4, True) is None


def test_class_conditional_sweep_scores_class_accuracy(tmp_path):
  workdir = _random_workdir(tmp_path / 'cond', _config(num_classes=10))
  rows = sq.main(
    ['--workdir', workdir, '--samplers', 'dpmpp', '--calls', '3', '--num_images', '10', '--out', str(tmp_path / 'o')]
  )
  (row,) = rows
  assert set(row['scores']) == {'fd_digits', 'class_accuracy'} and 0 <= row['scores']['class_accuracy'] <= 1
  assert row['settings']['guidance_scale'] == 1.5  # the config's sample.guidance_scale


@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')  # saturated samples: singular covariance
def test_fid_path_with_a_stand_in_extractor(tmp_path, monkeypatch):
  """An RGB model is scored by FID; the Inception network is replaced by a fake feature function, as in
  tests/test_evaluation.py (the real InceptionV3 is tested in tests/test_inception.py)."""
  workdir = _random_workdir(tmp_path / 'rgb', _config(channels=3))
  fake = lambda images: evaluation.Features(pool=images.reshape(len(images), -1)[:, :6].astype(np.float32), logits=None)
  rng = np.random.default_rng(0)
  real = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
  stats = evaluation.reference_stats_from_images([real], fake, tmp_path / 'ref.npz', progress=False)
  assert sq.fid_score(real, fake, stats)['fid'] == pytest.approx(0.0, abs=1e-8)  # the reference images themselves
  (tmp_path / 'inception.npz').write_bytes(b'stand-in')
  monkeypatch.setattr(sq.inception_lib, 'load_inception_params', lambda path: {'path': path})
  monkeypatch.setattr(sq.evaluation, 'make_feature_fn', lambda variables, *a, **k: fake)
  common = ['--workdir', workdir, '--samplers', 'ddim', '--calls', '4', '--num_images', '8']
  fid = ['--inception_weights', str(tmp_path / 'inception.npz'), '--ref_stats', str(tmp_path / 'ref.npz')]
  (row,) = sq.main(common + fid + ['--out', str(tmp_path / 'o')])
  assert set(row['scores']) == {'fid'} and row['scores']['fid'] > 0
  assert row['settings']['fid_ref_stats_sha256']
  with pytest.raises(errors.UserError, match='Nothing to score'):
    sq.main(common + ['--out', str(tmp_path / 'o2')])


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
  'args, match',
  [
    (['--samplers', 'dpmpp,fast'], r"Unknown sampler 'fast'; choose one of \('ancestral'"),
    (['--samplers', 'ddim,ddim'], 'names a sampler twice'),
    (['--calls', '5,ten'], r"'ten' is not an integer"),
    (['--calls', '0,5'], 'must be positive'),
    (['--calls', '5,5'], 'lists a budget twice'),
    (['--num_images', '1'], 'at least 2 images'),
    (['--batch_size', '0'], 'must be positive'),
    (['--tolerance', '1.5'], r'must lie in \[0, 1\)'),
    (['--pretrained', 'google/ddpm-cifar10-32'], 'exactly one of --workdir'),
    (['--workdir', '/nonexistent/run'], r"--workdir '/nonexistent/run' does not exist"),
    (['--inception_weights', 'w.npz'], 'both --inception_weights and --ref_stats'),
    (['--inception_weights', '/no/w.npz', '--ref_stats', '/no/r.npz'], "--inception_weights '/no/w.npz' not found"),
  ],
)
def test_argument_errors_come_before_the_model_loads(args, match, tmp_path, monkeypatch):
  monkeypatch.setattr(sq.loading, 'load_model', lambda **k: pytest.fail('loaded a model despite a bad argument'))
  argv = ['--workdir', str(tmp_path), '--out', str(tmp_path / 'o')] + args
  with pytest.raises((errors.UserError, errors.MissingFileError), match=match):
    sq.main(argv)


def test_errors_after_loading_come_before_sampling(digits_workdir, tmp_path, monkeypatch):
  monkeypatch.setattr(sq, 'sample_images', lambda *a, **k: pytest.fail('sampled despite a bad argument'))
  base = ['--workdir', digits_workdir, '--calls', '5', '--out', str(tmp_path / 'o')]
  with pytest.raises(ValueError, match='guidance_scale=2.0 needs a class-conditional model'):
    sq.main(base + ['--guidance_scale', '2'])
  (tmp_path / 'w').write_bytes(b'x')
  np.savez(tmp_path / 'r.npz', mu=np.zeros(2), sigma=np.eye(2))
  with pytest.raises(errors.UserError, match=r'FID needs an RGB model; this one makes \(8, 8, 1\)'):
    sq.main(base + ['--inception_weights', str(tmp_path / 'w'), '--ref_stats', str(tmp_path / 'r.npz')])


def test_samplers_all_and_no_model(tmp_path, monkeypatch):
  assert sq.parse_samplers('all') == list(solvers.SAMPLERS)
  monkeypatch.setattr(sq.loading, 'load_model', lambda **k: pytest.fail('loaded a model'))
  with pytest.raises(errors.UserError, match='exactly one of --workdir'):
    sq.main(['--out', str(tmp_path)])


def test_a_foreign_results_file_is_an_error_and_kept(tmp_path, monkeypatch):
  monkeypatch.setattr(sq.loading, 'load_model', lambda **k: pytest.fail('loaded a model'))
  (tmp_path / 'results.json').write_text('{"rows": 3}')
  with pytest.raises(errors.UserError, match='not a results file of this benchmark'):
    sq.main(['--workdir', str(tmp_path), '--out', str(tmp_path)])
  assert (tmp_path / 'results.json').read_text() == '{"rows": 3}'
