"""Tests for ddpm_jax.workdir, ddpm_jax.paths and their use in training: identity, resume checks, lock, paths."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import default, tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import paths  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from fake_workdir import make_workdir, snapshot  # pylint: disable=g-import-not-at-top,wrong-import-position


def _tiny(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def test_every_config_key_is_classified():
  """A new key in configs/default.py must be declared an identity key or safe on resume (docs/training.md)."""
  keys = set(workdir_lib.flatten(default.get_config()))
  identity, safe = set(workdir_lib.IDENTITY_KEYS), set(workdir_lib.RESUME_SAFE_KEYS)
  assert not identity & safe
  assert keys == identity | safe
  with open(os.path.join(ROOT, 'docs', 'training.md')) as f:
    doc = f.read()
  assert [k for k in sorted(keys) if f'`{k}`' not in doc] == []  # every key is listed in the docs


def test_diff_and_identity():
  old = workdir_lib.flatten(_tiny())
  new = workdir_lib.flatten(_tiny(**{'diffusion.num_timesteps': 10, 'optim.lr': 1e-4}))
  changes = workdir_lib.diff(old, new)
  assert changes == {'diffusion.num_timesteps': (20, 10), 'optim.lr': (1e-3, 1e-4)}
  assert workdir_lib.is_identity_key('diffusion.num_timesteps') and not workdir_lib.is_identity_key('optim.lr')
  assert workdir_lib.is_identity_key('model.some_future_key')  # unknown keys are treated conservatively
  # Tuples and the lists JSON gives back are the same value.
  assert workdir_lib.identity(_tiny())['model.ch_mult'] == [1, 2]
  # A config.json of an older version lacks keys added since: not a change (num_classes: its legacy default 0).
  for key in ('model.remat', 'model.num_classes', 'model.class_dropout', 'sample.guidance_scale'):
    del old[key]
  assert workdir_lib.diff(old, workdir_lib.flatten(_tiny())) == {}
  assert workdir_lib.diff(old, workdir_lib.flatten(_tiny(**{'model.num_classes': 10}))) == {
    'model.num_classes': (0, 10)
  }


def test_check_resume_refuses_identity_changes_with_a_table(tmp_path):
  wd = str(tmp_path / 'wd')
  os.makedirs(wd)
  workdir_lib.save_config(_tiny(), wd)
  assert workdir_lib.check_resume(_tiny(), str(tmp_path / 'new')) == {}
  assert workdir_lib.check_resume(_tiny(**{'train.num_steps': 99}), wd) == {'train.num_steps': (6, 99)}
  changed = _tiny(**{'diffusion.num_timesteps': 10, 'diffusion.beta_end': 0.02, 'train.num_steps': 99})
  with pytest.raises(errors.WorkdirMismatchError) as e:
    workdir_lib.check_resume(changed, wd)
  message = str(e.value)
  assert 'diffusion.num_timesteps  20' in message and 'diffusion.beta_end' in message and '0.2' in message
  assert '--allow_config_change' in message and 'train.num_steps' not in message  # safe changes are not refused
  assert isinstance(e.value, ValueError)  # the API's `except ValueError` users still catch it
  assert set(workdir_lib.check_resume(changed, wd, allow_change=True)) == {
    'diffusion.num_timesteps',
    'diffusion.beta_end',
    'train.num_steps',
  }


def test_older_config_json_is_not_a_change(tmp_path):
  """The older-workdir case of test_commands: a config.json without the keys added later resumes quietly."""
  wd = str(tmp_path / 'wd')
  os.makedirs(wd)
  cfg = _tiny().to_dict()
  for section, key in (('model', 'remat'), ('model', 'num_classes'), ('model', 'class_dropout')):
    del cfg[section][key]
  del cfg['sample']['guidance_scale']
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  assert workdir_lib.check_resume(_tiny(), wd) == {}


def test_checkpoint_identity_is_recorded_and_checked(tmp_path):
  wd = make_workdir(str(tmp_path / 'wd'))
  ckpt = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'))
  meta = ckpt.metadata(4)
  ckpt.close()
  assert meta == workdir_lib.checkpoint_metadata(_tiny())
  assert meta['identity']['diffusion.num_timesteps'] == 20
  workdir_lib.check_checkpoint_matches(_tiny(), meta, where='wd step 4')
  workdir_lib.check_checkpoint_matches(_tiny(), {}, where='an old checkpoint')  # saved before identities: passes
  with pytest.raises(errors.WorkdirMismatchError, match=r'(?s)wd step 4.*diffusion\.num_timesteps +20 +10'):
    workdir_lib.check_checkpoint_matches(_tiny(**{'diffusion.num_timesteps': 10}), meta, where='wd step 4')


def test_data_source_and_dataset_defaults(tmp_path):
  wd = str(tmp_path / 'wd')
  os.makedirs(wd)
  workdir_lib.save_config(_tiny(**{'data.dataset': 'folder', 'data.folder': '/data/faces'}), wd)
  assert workdir_lib.resolve_data_source(workdir=wd, pretrained=None, dataset=None) == {
    'dataset': 'folder',
    'folder': '/data/faces',
    'data_dir': '',
  }
  got = workdir_lib.resolve_data_source(workdir=wd, pretrained=None, dataset='digits', folder='', data_dir='')
  assert got['dataset'] == 'digits'
  assert workdir_lib.resolve_data_source(workdir=None, pretrained='google/ddpm-cifar10-32', dataset=None)[
    'dataset'
  ] == ('cifar10')
  with pytest.raises(errors.UserError, match='--dataset'):
    workdir_lib.resolve_data_source(workdir=None, pretrained='google/ddpm-church-256', dataset=None)
  with pytest.raises(errors.MissingFileError, match='config.json'):
    workdir_lib.resolve_data_source(workdir=str(tmp_path), pretrained=None, dataset=None)


def test_lock_refuses_a_second_run_and_is_released_when_the_holder_is_killed(tmp_path):
  wd = str(tmp_path / 'wd')
  os.makedirs(wd)
  with workdir_lib.WorkdirLock(wd):
    with pytest.raises(errors.WorkdirBusyError, match=f'pid {os.getpid()}'):
      workdir_lib.WorkdirLock(wd).__enter__()
  with workdir_lib.WorkdirLock(wd):  # released on exit
    pass
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time; from ddpm_jax import workdir; workdir.WorkdirLock(sys.argv[1]).__enter__(); '
      'print("locked", flush=True); time.sleep(120)',
      wd,
    ],
    env=dict(os.environ, PYTHONPATH=ROOT),
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(errors.WorkdirBusyError, match=f'pid {holder.pid}'):
      workdir_lib.WorkdirLock(wd).__enter__()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  with workdir_lib.WorkdirLock(wd):  # a killed run leaves nothing stuck
    pass
  assert os.listdir(wd) == []  # and locking wrote nothing into the workdir


def test_output_path_checks(tmp_path):
  (tmp_path / 'a_file').write_text('x')
  assert paths.check_output_dir(str(tmp_path / 'new' / 'deeper')) == str(tmp_path / 'new' / 'deeper')
  assert not (tmp_path / 'new').exists()  # checks create nothing
  with pytest.raises(errors.UserError, match='a_file.*existing file'):
    paths.check_output_dir(str(tmp_path / 'a_file'), '--workdir')
  with pytest.raises(errors.UserError, match='a_file.* is a file'):
    paths.check_output_dir(str(tmp_path / 'a_file' / 'sub'))
  with pytest.raises(errors.UserError, match='--out is required'):
    paths.check_output_dir('')
  assert paths.check_output_file(str(tmp_path / 'fig.png'), extensions=('.png',)).endswith('fig.png')
  with pytest.raises(errors.UserError, match='is a folder'):
    paths.check_output_file(str(tmp_path), extensions=('.png',))
  with pytest.raises(errors.UserError, match=r'must end in \.png'):
    paths.check_output_file(str(tmp_path / 'fig.jpg'), extensions=('.png',))


# ------------------------------------------------------------------------------------------------------------------
# train_and_evaluate on an existing workdir
# ------------------------------------------------------------------------------------------------------------------


def test_resume_with_changed_timesteps_is_refused_and_leaves_the_workdir_unchanged(tmp_path):
  wd = make_workdir(str(tmp_path / 'wd'))
  before = snapshot(wd)
  with pytest.raises(errors.WorkdirMismatchError, match='diffusion.num_timesteps'):
    train_lib.train_and_evaluate(_tiny(**{'diffusion.num_timesteps': 10}), wd)
  assert snapshot(wd) == before


def test_failed_restore_leaves_the_workdir_byte_for_byte(tmp_path):
  """Another architecture, allowed on purpose, cannot restore: config.json and the checkpoints stay as they were."""
  wd = make_workdir(str(tmp_path / 'wd'))
  before = snapshot(wd)
  with pytest.raises(checkpoint.CheckpointRestoreError, match='new --workdir') as e:
    train_lib.train_and_evaluate(_tiny(**{'model.ch': 32}), wd, allow_config_change=True)
  assert isinstance(e.value, errors.UserError)
  assert snapshot(wd) == before


@pytest.mark.slow
def test_resume_with_more_steps_trains_on_and_records_the_config(tmp_path):
  wd = make_workdir(str(tmp_path / 'wd'))
  config = _tiny(**{'train.num_steps': 5, 'train.num_samples': 0, 'train.log_every': 1})
  summary = train_lib.train_and_evaluate(config, wd)
  assert summary['start_step'] == 4 and summary['final_step'] == 5 and np.isfinite(summary['loss'])
  saved = workdir_lib.read_config(wd)
  assert saved.train.num_steps == 5
  kept = [f for f in os.listdir(wd) if f.startswith('config.') and f != 'config.json']
  assert len(kept) == 1  # the previous config.json, kept beside
  ckpt = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'))
  assert ckpt.all_steps() == [4, 5] and ckpt.metadata(5) == workdir_lib.checkpoint_metadata(config)
  ckpt.close()


def test_new_workdir_is_not_created_when_the_data_are_bad(tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n')
  wd = tmp_path / 'run'
  config = _tiny(**{'data.dataset': 'folder', 'data.folder': str(folder)})
  with pytest.raises(errors.BadImageFilesError, match='broken.png'):
    train_lib.train_and_evaluate(config, str(wd))
  assert not wd.exists()
  shutil.rmtree(folder)
