"""Bad inputs of every command, table-driven: what a user sees when a command refuses to run.

Each case runs the real command entry (``ddpm_jax.cli.run``) and must end with exit status 2 and one
``error: <message>`` naming the bad value or path, with no traceback and no start-up noise (TensorFlow's oneDNN
notice, JAX's missing-TPU notice), before anything is compiled, and without changing anything on disk: the
checkpoints, config.json and sample shards the cases point at are compared byte for byte before and after.

The cases of one command run in one process (tests/cli_driver.py), so that the imports are paid once. The
workdir they use is made without training: configs/tiny.py's config.json and a step-4 checkpoint of zeros.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from ddpm_jax import sample_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from fake_workdir import make_workdir, snapshot  # pylint: disable=g-import-not-at-top,wrong-import-position

NOISE = ('Traceback', 'oneDNN', "Unable to initialize backend 'tpu'", 'cpu_feature_guard')


def _make_read_only(path):
  """Makes a folder unwritable even for root (chattr +i where mode bits do not bind); False if impossible."""
  os.chmod(path, 0o555)
  if os.access(path, os.W_OK) and shutil.which('chattr'):
    subprocess.run(['chattr', '+i', path], check=False, capture_output=True)
  return not os.access(path, os.W_OK)


def _undo_read_only(path):
  if shutil.which('chattr'):
    subprocess.run(['chattr', '-i', path], check=False, capture_output=True)
  os.chmod(path, 0o755)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """The files the cases point at: workdirs, a file, a read-only folder, bad images, finished samples."""
  root = tmp_path_factory.mktemp('world')
  w = {'root': str(root)}
  w['wd'] = make_workdir(str(root / 'wd'))
  w['busy'] = make_workdir(str(root / 'busy'))
  w['file'] = str(root / 'afile')
  (root / 'afile').write_text('not a folder')
  w['no_config'] = str(root / 'no_config')
  os.makedirs(w['no_config'])
  images = root / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / f'good_{i}.png')
  Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(images / 'truncated.png')
  data = (images / 'truncated.png').read_bytes()
  (images / 'truncated.png').write_bytes(data[: len(data) // 2])
  (images / 'fake.png').write_text('this is not a PNG')
  w['images'] = str(images)
  w['fake_png'] = str(images / 'fake.png')
  w['truncated_png'] = str(images / 'truncated.png')
  w['samples'] = str(root / 'samples')  # finished shards of other settings: sample.py must refuse to touch them
  sample_lib.sample_to_dir(
    lambda idx: np.zeros((len(idx), 8, 8, 1), np.uint8),
    w['samples'],
    num_samples=4,
    shard_size=2,
    image_shape=(8, 8, 1),
    settings={'source': 'elsewhere'},
    grid_size=0,
    progress=False,
  )
  w['mask_5x7'] = str(root / 'mask_5x7.png')  # 7 wide, 5 high: the mask that was stretched to 8x8
  Image.fromarray(np.full((5, 7), 255, np.uint8)).save(w['mask_5x7'])
  w['weights'] = str(root / 'weights.npz')
  (root / 'weights.npz').write_bytes(b'stand-in')
  w['empty'] = str(root / 'empty')
  os.makedirs(w['empty'])
  w['ro'] = str(root / 'read_only')
  os.makedirs(w['ro'])
  w['ro_ok'] = _make_read_only(w['ro'])
  w['tfds'] = str(root / 'no_tfds_data')  # never created: tfds must not write there either
  yield w
  _undo_read_only(w['ro'])


def _drive(script, cases, tmp_path):
  """Runs the cases of one command in one process; returns their results."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  for name in ('XLA_FLAGS', 'JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS', 'DDPM_JAX_TRACEBACK'):
    env.pop(name, None)  # as a user's shell has them: the commands quiet the start-up themselves
  cases_path, results_path = tmp_path / 'cases.json', tmp_path / 'results.json'
  cases_path.write_text(json.dumps([args for args, _ in cases]))
  res = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'tests', 'cli_driver.py'), script, str(cases_path), str(results_path)],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(results_path.read_text())


def _check(results, cases):
  failures = []
  for result, (args, expected) in zip(results, cases):
    err = result['stderr']
    problems = []
    if result['rc'] != 2:
      problems.append(f'exit status {result["rc"]}')
    if err.count('error: ') != 1:
      problems.append(f'{err.count("error: ")} error lines')
    problems += [f'{n!r} in stderr' for n in NOISE if n in err]
    problems += [f'message lacks {e!r}' for e in expected if e not in err]
    if result['compiles']:
      problems.append(f'{result["compiles"]} XLA compilations')
    if problems:
      failures.append(f'{" ".join(args)}\n  -> {"; ".join(problems)}\n  stderr: {err[-1500:]}')
  assert not failures, '\n\n'.join(failures)


def _run_table(script, cases, world, tmp_path):
  before = snapshot(world['root'])
  results = _drive(script, cases, tmp_path)
  assert snapshot(world['root']) == before, 'a refused command changed files on disk'
  _check(results, cases)
  return results


def _train_cases(w):
  tiny_cfg = ['--config', os.path.join(ROOT, 'configs', 'tiny.py')]
  wd = ['--workdir', w['wd']]
  cases = [
    (tiny_cfg + wd + ['--config.optim.lrr=1'], ["optim has no key 'lrr'", 'optim.lr?']),
    (tiny_cfg + wd + ['--config.optimm.lr=1'], ["no key 'optimm'", 'did you mean optim?']),
    (tiny_cfg + wd + ['--config.optim.lr=abc'], ['--config.optim.lr=abc']),
    (tiny_cfg + wd + ['--unknown_flag=1'], ['unknown_flag']),
    (['--config', 'configs/nope.py'] + wd, ['configs/nope.py']),
    (tiny_cfg + wd + ['extra_argument'], ['extra_argument']),
    (tiny_cfg + wd + ['--config.optim.batch_size=0'], ['optim.batch_size=0']),
    (tiny_cfg + wd + ['--config.optim.batch_size=-16'], ['optim.batch_size=-16']),
    (tiny_cfg + wd + ['--config.optim.lr=-1e-4'], ['optim.lr=-0.0001']),
    (tiny_cfg + wd + ['--config.data.dataset=imagenet'], ["data.dataset='imagenet'"]),
    (tiny_cfg + wd + ['--config.data.image_size=9'], ['height 9']),
    (tiny_cfg + wd + ['--config.data.dataset=folder', '--config.data.folder=/no/such/dir'], ['/no/such/dir']),
    # a workdir of another config: what the checkpoints mean would change
    (
      tiny_cfg + wd + ['--config.diffusion.num_timesteps=10'],
      ['diffusion.num_timesteps', '20', '10', '--allow_config'],
    ),
    (tiny_cfg + wd + ['--config.model.ch=32'], ['model.ch', '16', '32', '--allow_config_change']),
    # output paths
    (tiny_cfg + ['--workdir', w['file']], [w['file'], 'existing file']),
    (tiny_cfg + ['--workdir', os.path.join(w['file'], 'run')], [w['file'], 'is a file']),
    # data
    (
      tiny_cfg
      + ['--workdir', os.path.join(w['root'], 'new_run'), '--config.data.dataset=folder']
      + [f'--config.data.folder={w["images"]}'],
      [w['truncated_png'], w['fake_png'], '2 of the 5 image files'],
    ),
    (
      tiny_cfg
      + ['--workdir', os.path.join(w['root'], 'new_run'), '--config.data.dataset=cifar10', '--config.data.channels=3']
      + [f'--config.data.data_dir={w["tfds"]}'],
      ['CIFAR-10 is not prepared in', w['tfds'], 'tfds build cifar10', '--config.data.data_dir'],
    ),
    # another run holds the workdir (the test process holds its lock)
    (tiny_cfg + ['--workdir', w['busy']], [f'pid {os.getpid()}', w['busy']]),
  ]
  if w['ro_ok']:
    cases.append((tiny_cfg + ['--workdir', w['ro']], [w['ro'], 'not writable']))
    cases.append((tiny_cfg + ['--workdir', os.path.join(w['ro'], 'run')], [w['ro'], 'not writable']))
  return cases


def test_train_bad_inputs(world, tmp_path):
  cases = _train_cases(world)
  tiny_cfg = ['--config', os.path.join(ROOT, 'configs', 'tiny.py')]
  # The same workdir with a change that is safe on resume proceeds (here: nothing left to train).
  proceeds = tiny_cfg + ['--workdir', world['wd'], '--config.train.num_steps=4']
  # --verbosity=1 shows a user error's traceback too (still one `error:` line and status 2).
  verbose = tiny_cfg + ['--workdir', world['file'], '--verbosity=1']
  with workdir_lib.WorkdirLock(world['busy']):
    before = snapshot(world['root'])
    results = _drive('train.py', cases + [(proceeds, []), (verbose, [])], tmp_path)
    assert snapshot(world['root']) == before, 'a refused command changed files on disk'
  _check(results[: len(cases)], cases)
  ok, tb = results[len(cases) :]
  assert ok['rc'] == 0, ok['stderr'][-3000:]
  assert 'train.num_steps' in ok['stderr'] and 'nothing to train' in ok['stderr'], ok['stderr'][-3000:]
  assert not any(n in ok['stderr'] for n in NOISE), ok['stderr'][-3000:]
  assert tb['rc'] == 2 and 'Traceback' in tb['stderr'] and tb['stderr'].count('error: ') == 1
  assert max(r['seconds'] for r in results[: len(cases)]) < 60  # refused before compiling: seconds, not minutes


def test_sample_bad_inputs(world, tmp_path):
  wd = ['--workdir', world['wd']]
  out = ['--out', os.path.join(world['root'], 'new_samples')]
  cases = [
    (wd + ['--out', world['file']], [world['file'], 'existing file']),
    (wd + ['--out', os.path.join(world['file'], 'x')], [world['file'], 'is a file']),
    (wd + ['--pretrained', 'google/ddpm-cifar10-32'] + out, ['exactly one of --workdir']),
    (wd + out + ['--num_samples', '0'], ['--num_samples']),
    (wd + out + ['--batch_size', '-1'], ['--batch_size', '-1']),
    (wd + out + ['--sampler', 'ancestral', '--steps', '5'], ['respaced']),
    (wd + out + ['--sampler', 'ddim', '--steps', '50'], ['steps must be in [1, 20]', '50']),
    (wd + out + ['--eta', '0.5'], ['eta=0.5']),
    (wd + out + ['--class_label', '1'], ['class_label=1', 'unconditional']),
    (wd + out + ['--sampler', 'heun', '--eta', '0.3'], ["'heun' takes no eta", 'euler_ancestral']),
    (wd + out + ['--sampler', 'plms2'], ['--sampler', 'plms2', 'dpmpp']),
    (wd + out + ['--sampler', 'ddim', '--spacing', 'karras'], ["spacing 'karras'", 'linspace']),
    (wd + out + ['--spacing', 'cubic'], ['--spacing', 'cubic']),
    (wd + out + ['--sampler', 'dpmpp', '--steps', '0'], ['steps must be in [1, 20]', '0']),
    (wd + out + ['--sampler', 'dpmpp', '--order', '4'], ['order=4', "'dpmpp'", '(1, 2, 3)']),
    (wd + out + ['--sampler', 'euler', '--order', '2'], ["'euler' has no order"]),
    (wd + out + ['--sampler', 'unipc', '--variant', 'bh3'], ["variant='bh3'", "('bh1', 'bh2')"]),
    (wd + out + ['--sampler', 'pndm', '--steps', '3'], ['steps must be in [4, 20]']),
    (wd + out + ['--guidance_scale', '2'], ['--guidance_scale=2.0', 'class-conditional']),
    (wd + out + ['--layers', 'gpu'], ['--layers=gpu', '<auto|reference|cpu>']),
    (wd + ['--out', world['samples']], [world['samples'], 'other settings']),
  ]
  if world['ro_ok']:
    cases.append((wd + ['--out', os.path.join(world['ro'], 'x')], [world['ro'], 'not writable']))
  _run_table('sample.py', cases, world, tmp_path)


def test_evaluate_bad_inputs(world, tmp_path):
  wd = ['--workdir', world['wd']]
  cases = [
    (['--metric', 'fid'], ['--metric fid needs --samples, --ref_stats']),
    (
      ['--metric', 'fid', '--samples', world['empty'], '--ref_stats', os.path.join(world['root'], 's.npz')]
      + ['--inception_weights', os.path.join(world['root'], 'missing.pth')],
      ['missing.pth'],
    ),
    (
      ['--metric', 'fid', '--samples', world['empty'], '--ref_stats', os.path.join(world['root'], 's.npz')]
      + ['--inception_weights', world['weights']],
      [world['empty'], 'samples_*.npz'],
    ),
    (['--metric', 'bpd'] + wd + ['--num_images', '0'], ['--num_images=0']),
    (['--metric', 'bpd'] + wd + ['--out', world['empty']], [world['empty'], 'is a folder']),
    (['--metric', 'bpd'] + wd + ['--dataset', 'imagenet'], ["'imagenet'"]),
    (['--metric', 'bpd', '--workdir', world['no_config']], [world['no_config'], 'config.json']),
    (['--metric', 'bpd', '--pretrained', 'google/ddpm-church-256'], ['google/ddpm-church-256', '--dataset']),
    (['--metric', 'class_accuracy'], ['needs --workdir']),
    (['--metric', 'class_accuracy'] + wd, ['unconditional']),
    (['--metric', 'class_accuracy', '--guidance_scales', 'a,b'] + wd, ['--guidance_scales']),
    (['--metric', 'nll'], ['nll']),
  ]
  _run_table('evaluate.py', cases, world, tmp_path)


def test_edit_bad_inputs(world, tmp_path):
  wd = ['--workdir', world['wd']]
  out = ['--out', os.path.join(world['root'], 'new_edits')]
  digits = ['--dataset', 'digits', '--num_images', '2']
  cases = [
    (['--mode', 'inpaint', '--mask', 'right'] + wd + digits + ['--out', world['file']], [world['file']]),
    (['--mode', 'inpaint'] + wd + digits + out, ['--mode inpaint needs --mask']),
    (['--mode', 'inpaint', '--mask', 'nothing'] + wd + digits + out, ["--mask 'nothing'"]),
    (['--mode', 'inpaint', '--mask', 'right', '--jump_length', '0'] + wd + digits + out, ['jump_length', '0']),
    (['--mode', 'inpaint', '--mask', world['mask_5x7']] + wd + digits + out, [world['mask_5x7'], '7x5', '8x8']),
    (['--mode', 'inpaint', '--mask', world['fake_png']] + wd + digits + out, [world['fake_png'], 'not an image']),
    (['--mode', 'sdedit', '--t_start', '99'] + wd + digits + out, ['--t_start=99', '[0, 19]']),
    (['--mode', 'sdedit'] + wd + digits + out, ['--t_start']),
    (['--mode', 'sdedit', '--t_start', '5', '--image', world['fake_png']] + wd + out, [world['fake_png']]),
    (['--mode', 'sdedit', '--t_start', '5', '--image', world['truncated_png']] + wd + out, [world['truncated_png']]),
    (['--mode', 'sdedit', '--t_start', '5', '--image', world['fake_png']] + wd + digits + out, ['exactly one']),
    (
      ['--mode', 'sdedit', '--t_start', '5'] + wd + out + ['--dataset', 'digits', '--num_images', '0'],
      ['--num_images'],
    ),
    (['--mode', 'paint'] + wd + digits + out, ['paint']),
    (['--mode', 'sdedit', '--t_start', '5'] + wd + digits, ['--out']),
  ]
  _run_table('edit.py', cases, world, tmp_path)


def test_figures_bad_inputs(world, tmp_path):
  wd = ['--workdir', world['wd']]
  png = ['--out', os.path.join(world['root'], 'figure.png')]
  cases = [
    (['--figure', 'forward'] + wd + ['--out', world['empty']], [world['empty'], 'is a folder']),
    (['--figure', 'forward'] + wd + ['--out', os.path.join(world['root'], 'figure.jpg')], ['figure.jpg', '.png']),
    (['--figure', 'forward'] + wd + png + ['--num_images', '0'], ['--num_images=0']),
    (['--figure', 'interpolate'] + wd + png + ['--num_images', '1'], ['--num_images must be >= 2']),
    (['--figure', 'forward', '--pretrained', 'google/ddpm-church-256'] + png, ['ddpm-church-256', '--dataset']),
    (['--figure', 'forward', '--workdir', world['no_config']] + png, [world['no_config'], 'config.json']),
    (['--figure', 'forward'] + wd + png + ['--dataset', 'folder', '--folder', world['images']], [world['fake_png']]),
    (['--figure', 'backward'] + wd + png, ['backward']),
  ]
  _run_table('figures.py', cases, world, tmp_path)
