"""Tests for ddpm_jax.checkpoint: round trip, retention, and fallback from corrupted checkpoints."""

import logging
import os

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


def test_save_json(tmp_path):
  path = tmp_path / 'a' / 'config.json'
  checkpoint.save_json(str(path), {'x': (1, 2), 'y': 'z'})
  assert path.read_text().startswith('{')
