"""Tests for ddpm_jax.train_lib and train.py: the step on 1 vs 8 devices, end-to-end runs, guards, kill/resume."""

import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import data_parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import schedule as schedule_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.models import UNet  # pylint: disable=g-import-not-at-top,wrong-import-position

# Lighter than configs/tiny.py (one level, no attention): the steps, runs and checkpoints tested here do not depend
# on the architecture, and this one compiles in a fraction of the time. Every tiny config in this file uses it.
LIGHT = {'model.ch_mult': (1,), 'model.attn_resolutions': ()}
MODEL = UNet(ch=16, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=8)
SCHEDULE = schedule_lib.get_schedule('linear', beta_end=0.2, num_timesteps=20)


_PARAMS = {}
_RUNS = {}


def _params():
  if 'p' not in _PARAMS:
    _PARAMS['p'] = train_lib.init_params(MODEL, image_shape=(8, 8, 1), key=jax.random.key(0))
  return _PARAMS['p']


def _run_steps(devices, steps=3, *, clip_groups=0, grad_clip=1.0, lr=1e-3, warmup=2, ema=0.9, batch=16):
  """Trains MODEL for ``steps`` on digits over ``devices``; returns host states [0..steps] and metrics (cached)."""
  cache_key = (len(devices), steps, clip_groups, grad_clip, lr, warmup, ema, batch)
  if cache_key in _RUNS:
    return _RUNS[cache_key]
  tx = train_lib.make_optimizer(lr=lr, warmup_steps=warmup, grad_clip=grad_clip, clip_in_optimizer=not clip_groups)
  state = train_lib.create_state(_params(), tx)
  settings = train_lib.StepSettings(
    model=MODEL,
    schedule=SCHEDULE,
    tx=tx,
    lr_fn=train_lib.warmup_lr(lr, warmup),
    ema_decay=ema,
    grad_clip=grad_clip,
    groups_per_device=clip_groups // len(devices) if clip_groups else 0,
  )
  p_step = train_lib.make_p_train_step(settings, devices=devices)
  rstate = data_parallel.replicate(state, devices)
  batches = input_pipeline.in_memory_batches(
    input_pipeline.load_digits(8), global_batch=batch, seed=0, num_local_devices=len(devices)
  )
  metrics, states = [], [state]
  for _ in range(steps):
    rstate, m = p_step(rstate, next(batches), jax.random.key(1))
    metrics.append({k: np.asarray(v) for k, v in m.items()})
    states.append(data_parallel.unreplicate(rstate))
  _RUNS[cache_key] = states, metrics
  return states, metrics


def _assert_same(a, b, *, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize('clip_groups', [0, 8], ids=['global_clip', 'per_group_clip'])
def test_one_vs_eight_devices(clip_groups):
  assert jax.local_device_count() == 8, 'tests/conftest.py should give 8 fake CPU devices'
  s1, m1 = _run_steps(jax.local_devices()[:1], clip_groups=clip_groups)
  s8, m8 = _run_steps(jax.local_devices(), clip_groups=clip_groups)
  for a, b in zip(m1, m8):
    assert a['loss'].shape == b['loss'].shape == ()  # Scalars: averaged over the devices.
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
    np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=1e-4)
  assert m1[0]['grad_norm'] > 1.0  # Clipping at 1.0 is active, so it is part of what is compared.
  _assert_same(s1[-1].params, s8[-1].params, rtol=1e-4, atol=2e-6)
  _assert_same(s1[-1].ema_params, s8[-1].ema_params, rtol=1e-4, atol=2e-6)
  if clip_groups:
    _, m_global = _run_steps(jax.local_devices()[:1])
    # Same examples, t and noise; the mean of the groups' norms exceeds the norm of their mean.
    np.testing.assert_allclose(m1[0]['loss'], m_global[0]['loss'], rtol=1e-5)
    assert m1[0]['grad_norm'] > m_global[0]['grad_norm']


def test_step_keeps_replicas_identical_and_donates_the_state():
  devices = jax.local_devices()
  tx = train_lib.make_optimizer(lr=1e-3, warmup_steps=2, grad_clip=1.0)
  settings = train_lib.StepSettings(
    model=MODEL, schedule=SCHEDULE, tx=tx, lr_fn=train_lib.warmup_lr(1e-3, 2), ema_decay=0.9
  )
  p_step = train_lib.make_p_train_step(settings, devices=devices)
  rstate = data_parallel.replicate(train_lib.create_state(_params(), tx), devices)
  leaf = jax.tree.leaves(rstate.params)[0]
  assert leaf.shape == jax.tree.leaves(_params())[0].shape and leaf.sharding.is_fully_replicated
  batches = input_pipeline.in_memory_batches(
    input_pipeline.load_digits(8), global_batch=16, seed=0, num_local_devices=len(devices)
  )
  batch = jax.device_put(next(batches), data_parallel.device_sharding(devices))
  for _ in range(2):  # lr is 0 at step 0, so the second step is the one that changes the params.
    new_state, _ = p_step(rstate, batch, jax.random.key(1))
    assert leaf.is_deleted()  # Donated: XLA wrote the new state into the old buffers.
    rstate, leaf = new_state, jax.tree.leaves(new_state.params)[0]
  for x in jax.tree.leaves(rstate):
    copies = [np.asarray(s.data) for s in x.addressable_shards]
    assert len(copies) == len(devices)
    for c in copies[1:]:
      np.testing.assert_array_equal(c, copies[0])  # The devices agree exactly after pmean.
  np.testing.assert_array_equal(data_parallel.unreplicate(rstate).step, 2)


def test_warmup_ema_and_step_counter():
  states, metrics = _run_steps(jax.local_devices()[:1])  # warmup 2, EMA 0.9.
  assert [float(m['lr']) for m in metrics] == pytest.approx([0.0, 5e-4, 1e-3])
  assert [int(s.step) for s in states] == [0, 1, 2, 3]
  _assert_same(states[1].params, states[0].params, rtol=0, atol=0)  # The first update uses lr 0.
  _assert_same(states[1].ema_params, states[1].params, rtol=0, atol=0)  # EMA copies at step 0.
  expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, states[2].ema_params, states[3].params)
  _assert_same(states[3].ema_params, expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(states[3].params)[0], jax.tree.leaves(states[0].params)[0])


def test_build_model_chooses_the_layers_for_the_backend():
  """train.py's model: the CPU layers on this machine (XLA:CPU), the reference layers on any other backend; a
  config can force either, an older workdir's config without the key means 'auto', and a bad choice fails."""
  config = tiny.get_config()
  assert config.model.layers == 'auto'
  model = train_lib.build_model(config)
  assert jax.default_backend() == 'cpu' and model.layers == 'cpu'
  assert train_lib.build_model(config, backend='gpu').layer_fields() == {
    'layers': 'reference',
    'cpu_tree_reductions': False,
  }
  assert train_lib.build_model(config, backend='tpu').layers == 'reference'
  # The same network: only the implementation differs.
  assert train_lib.build_model(config, backend='gpu').config_fields() == model.config_fields()
  older = tiny.get_config()
  del older.model['layers']  # a config.json written before the key existed
  train_lib.validate_config(older)
  assert train_lib.build_model(older).layers == 'cpu'
  config.model.layers = 'reference'
  assert train_lib.build_model(config).layers == 'reference'
  config.model.layers = 'cpu'
  with pytest.raises(train_lib.ConfigError, match="model.layers: .*'cpu'.*'gpu'"):
    train_lib.build_model(config, backend='gpu')
  config.model.layers = 'fast'
  with pytest.raises(train_lib.ConfigError, match="model.layers: .*'fast'"):
    train_lib.build_model(config)


def _tiny(**overrides):
  config = tiny.get_config()
  for k, v in {**LIGHT, **overrides}.items():
    node = config
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return config


def _check_workdir(workdir, steps_on_disk, sample_steps):
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()) == steps_on_disk
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  for s in sample_steps:
    with Image.open(os.path.join(workdir, 'samples', f'step_{s:08d}.png')) as im:
      assert im.size[0] > 0


@pytest.mark.slow
def test_end_to_end_tfds_mock(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  workdir = str(tmp_path / 'run')
  config = _tiny(
    **{
      'data.dataset': 'cifar10',
      'data.channels': 3,
      'data.image_size': 8,
      'train.num_steps': 4,
      'train.checkpoint_every': 2,
      'train.sample_every': 2,
    }
  )
  with tfds.testing.mock_data(num_examples=20):
    summary = train_lib.train_and_evaluate(config, workdir)
    assert summary['start_step'] == 0 and summary['final_step'] == 4 and np.isfinite(summary['loss'])
  _check_workdir(workdir, [2, 4], [2, 4])


def test_end_to_end_image_folder(tmp_path, monkeypatch):
  # The loop compiles its step once: steps, a checkpoint and a sample grid in between never retrace it (the state
  # comes back with the sharding and types it went in with).
  monkeypatch.setattr(train_lib, 'train_step', chex.assert_max_traces(train_lib.train_step, n=1))
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  workdir = str(tmp_path / 'run')
  config = _tiny(
    **{
      'data.dataset': 'folder',
      'data.folder': str(folder),
      'data.channels': 3,
      'train.num_steps': 3,
      'train.checkpoint_every': 2,
    }
  )
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary['final_step'] == 3
  _check_workdir(workdir, [2, 3], [3])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  real = input_pipeline.in_memory_batches

  def poisoned(images, *, start_step=0, **kw):
    for step, batch in enumerate(real(images, start_step=start_step, **kw), start=start_step):
      yield batch * np.nan if step == 3 else batch

  monkeypatch.setattr(input_pipeline, 'in_memory_batches', poisoned)
  workdir = str(tmp_path / 'run')
  config = _tiny(**{'train.num_steps': 6, 'train.checkpoint_every': 2, 'train.log_every': 2, 'train.num_samples': 0})
  with pytest.raises(train_lib.NonFiniteLossError, match=r'at step 3 .*step 2\)'):
    train_lib.train_and_evaluate(config, workdir)
  step, tree = _final_params(workdir)
  assert step == 2 and _steps(workdir) == [2]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))
  # Before any checkpoint: the message says so (not "step None").
  config.train.checkpoint_every = 5
  with pytest.raises(train_lib.NonFiniteLossError, match='No checkpoint had been written yet') as e:
    train_lib.train_and_evaluate(config, str(tmp_path / 'fresh'))
  assert 'None' not in str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# Kill and resume, through train.py in subprocesses (one CPU device each).
# ------------------------------------------------------------------------------------------------------------------

KILL_STEPS = 150
KILL_ARGS = [
  f'--config.train.num_steps={KILL_STEPS}',
  '--config.train.checkpoint_every=10',
  '--config.train.log_every=10',
  '--config.train.num_samples=0',
  '--config.train.keep_checkpoints=3',
  '--config.model.ch_mult=(1,)',
  '--config.model.attn_resolutions=()',
]


_CACHE = {}


def _env():
  """One CPU device; a compilation cache shared by this test's four runs (they compile the same programs)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '').replace(
    '--xla_force_host_platform_device_count=8', ''
  )  # one device
  env.update(
    JAX_PLATFORMS='cpu',
    TF_CPP_MIN_LOG_LEVEL='2',
    PYTHONPATH=ROOT,
    JAX_COMPILATION_CACHE_DIR=_CACHE['dir'],
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )
  return env


def _cmd(workdir):
  return [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--config',
    os.path.join(ROOT, 'configs', 'tiny.py'),
    '--workdir',
    workdir,
  ] + KILL_ARGS


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _start_and_stop(workdir, sig, after_step, timeout=240):
  """Starts a run, waits until it wrote a checkpoint beyond ``after_step``, and sends ``sig``."""
  proc = subprocess.Popen(_cmd(workdir), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + timeout
  while not any(s > after_step for s in _steps(workdir)):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline, 'no checkpoint in time'
    time.sleep(0.05)
  proc.send_signal(sig)
  out = proc.communicate(timeout=timeout)[0].decode()
  return proc.returncode, out


def _final_params(workdir):
  """(latest step, its saved state) read back through the project's Checkpointer."""
  config = _tiny()
  tx = train_lib.make_optimizer(lr=config.optim.lr, warmup_steps=config.optim.warmup_steps)
  target = train_lib.create_state(_params(), tx)
  ck = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  tree, step = ck.restore_latest(target)
  ck.close()
  return step, tree


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_match_uninterrupted_run(tmp_path):
  _CACHE['dir'] = str(tmp_path / 'compilation_cache')
  reference = str(tmp_path / 'reference')
  res = subprocess.run(_cmd(reference), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-3000:]

  workdir = str(tmp_path / 'interrupted')
  rc, out = _start_and_stop(workdir, signal.SIGTERM, after_step=0)
  assert rc == 0, out[-3000:]
  assert 'SIGTERM' in out and 'stopped by SIGTERM' in out
  stopped_at = max(_steps(workdir))
  assert 0 < stopped_at < KILL_STEPS, 'the run finished before SIGTERM; raise KILL_STEPS'

  rc, out = _start_and_stop(workdir, signal.SIGKILL, after_step=stopped_at)
  assert rc == -signal.SIGKILL
  killed_at = max(_steps(workdir))
  assert killed_at < KILL_STEPS, 'the run finished before it could be killed; raise KILL_STEPS'
  assert f'Resuming from checkpoint step {stopped_at}' in out

  res = subprocess.run(_cmd(workdir), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'Resuming from checkpoint step' in res.stderr

  step_a, a = _final_params(reference)
  step_b, b = _final_params(workdir)
  assert step_a == step_b == KILL_STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # Bit-equal: data, noise and t depend only on (seed, step).
