"""Helpers for tests of commands and workdirs: a train.py workdir made without training, and file snapshots."""

import hashlib
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_workdir(path, config=None, step=4):
  """A train.py workdir without training: config.json and one checkpoint (zeros, state step ``step``).

  No XLA compilation: the state's shapes come from ``jax.eval_shape``. Its samples are meaningless; it is for
  tests of what commands do with a workdir before they compute anything, and of resuming.
  """
  config = config or tiny.get_config()
  os.makedirs(path)
  workdir_lib.save_config(config, path)
  tree = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), train_lib.abstract_state(config))
  tree = tree.replace(step=np.asarray(step, np.int32))
  ckpt = checkpoint.Checkpointer(os.path.join(path, 'checkpoints'))
  ckpt.save(step, tree, metadata=workdir_lib.checkpoint_metadata(config))
  ckpt.close()
  return path


def snapshot(root):
  """{relative path: sha256} of every file under ``root`` (folders as None): to check that nothing changed."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = None
    for name in files:
      p = os.path.join(d, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
  return out
