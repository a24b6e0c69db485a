"""Tests for ddpm_jax.checkpoint: round trip, retention, and fallback from corrupted checkpoints."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax import checkpoint


def _tree(v):
  return {
    'step': np.asarray(v, np.int32),
    'params': {'w': np.full((3, 2), v, np.float32), 'b': np.arange(4, dtype=np.float32) + v},
  }


def _corrupt(step_dir):
  """Overwrites every file of a saved step with garbage (what a torn write or bad disk leaves)."""
  n = 0
  for root, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'\x00garbage{')
      n += 1
  assert n > 0


def test_round_trip_and_retention(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2)
  assert ck.latest_step() is None
  tree, step = ck.restore_latest(_tree(0))
  assert tree is None and step is None
  for s in (1, 2, 3):
    ck.save(s, _tree(s))
  ck.wait()
  assert ck.all_steps() == [2, 3]
  tree, step = ck.restore_latest(_tree(0))
  assert step == 3
  np.testing.assert_array_equal(tree['params']['w'], _tree(3)['params']['w'])
  assert tree['step'].dtype == np.int32
  ck.save(3, _tree(99))  # An existing step is not overwritten.
  ck.close()
  ck2 = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2)
  tree, step = ck2.restore_latest(_tree(0))
  assert step == 3 and float(tree['params']['b'][0]) == 3.0
  ck2.close()


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ck = checkpoint.Checkpointer('rel/ckpt', max_to_keep=1)
  ck.save(1, _tree(1))
  ck.close()
  assert os.path.isdir(tmp_path / 'rel' / 'ckpt' / '1')


def test_corrupted_latest_falls_back_with_warning(tmp_path, caplog):
  directory = tmp_path / 'ckpt'
  ck = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  for s in (10, 20):
    ck.save(s, _tree(s))
  ck.close()
  _corrupt(directory / '20')
  ck = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  assert ck.all_steps() == [10, 20]  # orbax still lists the damaged step.
  with caplog.at_level(logging.WARNING):
    tree, step = ck.restore_latest(_tree(0))
  assert step == 10
  np.testing.assert_array_equal(tree['params']['w'], _tree(10)['params']['w'])
  warning = ' '.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert 'step 20' in warning and 'step 10' in warning
  # The damaged step is moved aside, not deleted, and a new save of step 20 works.
  moved = os.listdir(tmp_path / 'checkpoints_corrupt')
  assert len(moved) == 1 and moved[0].startswith('20.')
  assert ck.all_steps() == [10]
  ck.save(20, _tree(21))
  ck.close()
  ck = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  assert ck.restore_latest(_tree(0))[1] == 20
  ck.close()


def test_all_unreadable_raises_and_moves_nothing(tmp_path):
  directory = tmp_path / 'ckpt'
  ck = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  ck.save(5, _tree(5))
  ck.save(6, _tree(6))
  ck.close()
  _corrupt(directory / '6')
  ck = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  # A different model (other shapes): neither step fits; both stay where they are.
  other = {'step': np.int32(0), 'params': {'w': np.zeros((5, 5), np.float32), 'b': np.zeros(4, np.float32)}}
  with pytest.raises(checkpoint.CheckpointRestoreError, match='new --workdir'):
    ck.restore_latest(other)
  assert ck.all_steps() == [5, 6]
  assert not (tmp_path / 'checkpoints_corrupt').exists()
  ck.close()


def test_save_json_round_trip_atomic_write_and_failed_write(tmp_path, monkeypatch):
  path = tmp_path / 'a' / 'config.json'  # the folder is created
  checkpoint.save_json(str(path), {'x': (1, 2), 'y': 'z', 'p': tmp_path})
  # Round trip: tuples come back as lists, anything else JSON lacks as its str().
  assert json.loads(path.read_text()) == {'x': [1, 2], 'y': 'z', 'p': str(tmp_path)}
  # Atomic: the new text goes to a temporary file that replaces the old one in one rename.
  renames = []
  real_replace = os.replace
  monkeypatch.setattr(os, 'replace', lambda src, dst: (renames.append((src, dst)), real_replace(src, dst)))
  checkpoint.save_json(str(path), {'x': 3})
  assert renames == [(f'{path}.tmp', str(path))] and json.loads(path.read_text()) == {'x': 3}
  # A failed write (a circular value) leaves the old file as it was, and no temporary file.
  circular = {}
  circular['self'] = circular
  with pytest.raises(ValueError, match='Circular'):
    checkpoint.save_json(str(path), circular)
  assert json.loads(path.read_text()) == {'x': 3} and sorted(os.listdir(path.parent)) == ['config.json']


def test_metadata_is_saved_with_each_step(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path / 'ckpt'))
  ck.save(1, _tree(1), metadata={'identity': {'diffusion.num_timesteps': 20, 'model.ch_mult': [1, 2]}})
  ck.save(2, _tree(2))
  ck.wait()
  assert ck.metadata(1) == {'identity': {'diffusion.num_timesteps': 20, 'model.ch_mult': [1, 2]}}
  assert ck.metadata(2) == {} and ck.metadata(3) == {}
  ck.close()


_FALLBACK_SCRIPT = r"""
import os, sys, shutil, time
import numpy as np
from ddpm_jax import checkpoint

def tree(v):  # many arrays, as a train state has: many concurrent reads when a restore fails
  return {f'layer_{i:03d}': {'w': np.full((8, 8), v, np.float32), 'b': np.full((8,), v, np.float32)}
          for i in range(150)}

root = sys.argv[1]
for name in ('manifest', 'garbage'):
  ck = checkpoint.Checkpointer(os.path.join(root, name, 'checkpoints'))
  for s in (10, 20):
    ck.save(s, tree(s))
  ck.close()
  for d, _, files in os.walk(os.path.join(root, name, 'checkpoints', '20')):
    for f in files:
      if name == 'garbage':  # every file overwritten: orbax logs its own JSON error on the way
        with open(os.path.join(d, f), 'wb') as fh:
          fh.write(b'\x00garbage{')
      elif f == 'manifest.ocdbt':  # the array index torn: hundreds of reads fail at once
        os.truncate(os.path.join(d, f), 5)
print('--- restoring', file=sys.stderr, flush=True)
for name in ('manifest', 'garbage'):
  # A few failed restores of the damaged step first (sample.py --step): late tensorstore callbacks pile up.
  shutil.copytree(os.path.join(root, name, 'checkpoints'), os.path.join(root, name + '_copy'))
  ck = checkpoint.Checkpointer(os.path.join(root, name + '_copy'))
  for _ in range(3):
    try:
      ck.restore(20, tree(0))
    except Exception:
      pass
  ck.close()
  ck = checkpoint.Checkpointer(os.path.join(root, name, 'checkpoints'))
  restored, step = ck.restore_latest(tree(0))
  assert step == 10 and float(restored['layer_000']['w'][0, 0]) == 10.0
  ck.close()
time.sleep(1)  # stray callbacks of the failed reads arrive late
"""


def test_fallback_prints_one_warning_and_nothing_else(tmp_path):
  """A real fallback in a fresh process: stderr holds one warning per skipped step and nothing else (no
  tensorstore 'Event loop is closed' tracebacks, no asyncio or orbax error records)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL='1')
  res = subprocess.run(
    [sys.executable, '-c', _FALLBACK_SCRIPT, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  after = res.stderr.split('--- restoring\n', 1)[1]
  lines = [line for line in after.splitlines() if line.strip()]
  assert len(lines) == 2, after[-3000:]
  for line, name in zip(lines, ('manifest', 'garbage')):
    assert 'Checkpoint step 20' in line and 'step 10' in line and os.path.join(name, 'checkpoints') in line
