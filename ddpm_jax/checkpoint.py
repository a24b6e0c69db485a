"""Checkpoints of the train state with orbax-checkpoint (the only module that imports orbax).

A `Checkpointer` saves a pytree of host arrays every N steps (asynchronously), keeps the newest K, and restores
the newest *readable* one: orbax checks no checksums and still lists a damaged step, so a step whose restore
raises is reported with a warning naming it and the step used instead, moved aside into
``<directory>/../checkpoints_corrupt/<step>`` (never deleted), and the previous step is tried.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_log = logging.getLogger(__name__)


class _DropOrbaxInfo(logging.Filter):
  """Drops orbax's INFO chatter (dozens of lines per save) while keeping its warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def _quiet_orbax() -> None:
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
    handler.addFilter(_DropOrbaxInfo())


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist but none of them can be restored into the requested structure."""


class Checkpointer:
  """Saves and restores one pytree per step under ``directory`` (made absolute, as orbax requires).

  Args:
    directory: checkpoint folder (created if missing).
    max_to_keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.corrupt_directory = os.path.join(os.path.dirname(self.directory), 'checkpoints_corrupt')
    self._max_to_keep = max_to_keep
    _quiet_orbax()
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True)
    return ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps on disk (including ones that may turn out unreadable), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest step on disk, or None."""
    return self._manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    """Starts an asynchronous save of ``tree`` (host arrays) as ``step``; a step already on disk is skipped."""
    if step in self._manager.all_steps():
      return
    tree = jax.tree.map(np.asarray, tree)
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def restore(self, step: int, target: Any) -> Any:
    """Restores ``step`` into the structure/dtypes/shapes of ``target`` (arrays or ``jax.ShapeDtypeStruct``)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(_shape(x), _dtype(x)), target)
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return jax.tree.map(np.asarray, restored)

  def restore_latest(self, target: Any) -> tuple[Any, int | None]:
    """Restores the newest readable checkpoint.

    Steps newer than the one restored that cannot be read are moved aside with a warning naming them and the
    step used instead. If no step can be read at all (all damaged, or saved by a different model), nothing is
    moved and `CheckpointRestoreError` is raised: starting from scratch silently would hide the problem.

    Args:
      target: a pytree with the structure, shapes and dtypes to restore into.

    Returns:
      ``(tree, step)``, or ``(None, None)`` if the directory holds no checkpoint.

    Raises:
      CheckpointRestoreError: checkpoints exist but none matches ``target``.
    """
    steps = self.all_steps()
    corrupt = []
    for step in reversed(steps):
      try:
        tree = self.restore(step, target)
        _check_structure(tree, target)
      except Exception as e:  # pylint: disable=broad-except  # orbax raises bare Exception, JSON, Value errors.
        corrupt.append((step, e))
        continue
      if corrupt:
        self._report_corrupt(corrupt, step)
      return tree, step
    if corrupt:
      details = '; '.join(f'step {s}: {type(e).__name__}: {str(e)[:200]}' for s, e in corrupt)
      raise CheckpointRestoreError(
        f'None of the checkpoints {steps} in {self.directory} can be restored into this train state '
        f'({details}). If the model or optimizer config changed, use a new --workdir; if the files are '
        'damaged, move them out of the way. Nothing was moved or deleted.'
      )
    return None, None

  def _report_corrupt(self, corrupt: list[tuple[int, Exception]], fallback: int) -> None:
    for bad, error in corrupt:
      moved = self._move_aside(bad)
      _log.warning(
        'Checkpoint step %d in %s is unreadable (%s: %s); %s. It was moved to %s.',
        bad,
        self.directory,
        type(error).__name__,
        str(error)[:200],
        f'resuming from the previous checkpoint, step {fallback}',
        moved,
      )
    # Rebuild the manager so that its cached step list no longer holds the moved steps.
    self._manager.close()
    self._manager = self._new_manager()

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    os.makedirs(self.corrupt_directory, exist_ok=True)
    dst = os.path.join(self.corrupt_directory, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
    shutil.move(src, dst)
    return dst


def _check_structure(tree: Any, target: Any) -> None:
  """Raises ValueError if the restored tree's structure or shapes differ from the target's."""
  if jax.tree.structure(tree) != jax.tree.structure(target):
    raise ValueError('restored tree structure differs from the train state')
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(target)):
    if _shape(a) != _shape(b):
      raise ValueError(f'restored shape {_shape(a)} differs from the expected {_shape(b)}')


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def _dtype(x: Any) -> np.dtype:
  return x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype


def save_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON atomically (write to a temporary file, then rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
    f.write('\n')
  os.replace(tmp, path)
