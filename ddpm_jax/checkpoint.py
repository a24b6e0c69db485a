"""Checkpoints of the train state with orbax-checkpoint (the only module that imports orbax).

A `Checkpointer` saves a pytree of host arrays every N steps (asynchronously), keeps the newest K, and restores
the newest *readable* one: orbax checks no checksums and still lists a damaged step, so a step whose restore
raises is reported with a warning naming it and the step used instead, moved aside into
``<directory>/../checkpoints_corrupt/<step>`` (never deleted), and the previous step is tried.

That warning is all a fallback prints. A failed restore makes noise of its own, which is held back on that path
only: orbax logs the parse error it then raises (we report it in the warning), and tensorstore keeps finishing
the reads of the failed restore after orbax has closed their asyncio event loop, each completion raising
``RuntimeError: Event loop is closed`` in a tensorstore thread, printed by Python's ``sys.unraisablehook``
(hundreds of tracebacks, some arriving after the restore has returned). Their tasks' errors, never retrieved, are also
logged by asyncio when the tasks are garbage-collected. After the first failed restore,
`_quiet_failed_restore_aftermath` drops exactly those two kinds of report for the rest of the process; every
other unraisable exception and asyncio log record passes.

Each step also stores a small JSON dict of metadata beside its state (orbax's per-step ``custom_metadata``):
training records what the parameters mean (`ddpm_jax.workdir.checkpoint_metadata`), read back by `metadata`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from ddpm_jax import errors

_log = logging.getLogger(__name__)


class _DropOrbaxInfo(logging.Filter):
  """Drops orbax's INFO chatter (dozens of lines per save) while keeping its warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def _quiet_orbax() -> None:
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
    handler.addFilter(_DropOrbaxInfo())


class CheckpointRestoreError(errors.UserError, RuntimeError):
  """Checkpoints exist but none of them can be restored into the requested structure (another model's
  workdir, or damaged files); the message says which and what to do."""


@contextlib.contextmanager
def _held_orbax_records():
  """Holds back what orbax logs at WARNING and above (``absl`` logger) inside the block; yields the list.

  The caller replays the records (`logging.Logger.handle`) if the restore worked, and drops them if it failed and
  its error is reported instead.
  """
  held = []
  logger = logging.getLogger('absl')

  def hold(record: logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' in record.pathname and record.levelno >= logging.WARNING:
      held.append(record)
      return False
    return True

  logger.addFilter(hold)
  try:
    yield held
  finally:
    logger.removeFilter(hold)


_aftermath_lock = threading.Lock()
_aftermath_filters_installed = False


def _is_closed_loop_callback(unraisable: Any) -> bool:
  """An unraisable ``RuntimeError('Event loop is closed')`` from asyncio's ``call_soon_threadsafe``."""
  exc = unraisable.exc_value
  if not (isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'):
    return False
  tb = unraisable.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == 'call_soon_threadsafe':
      return True
    tb = tb.tb_next
  return False


def _is_abandoned_tensorstore_read(record: logging.LogRecord) -> bool:
  """asyncio's 'Task exception was never retrieved' for a tensorstore read of an abandoned restore."""
  exc = record.exc_info[1] if record.exc_info else None
  return str(record.msg).startswith('Task exception was never retrieved') and 'tensorstore_spec=' in str(exc)


def _quiet_failed_restore_aftermath() -> None:
  """Installs (once) the filters for what a failed restore leaves behind (see the module docstring).

  An unraisable hook drops tensorstore's late callbacks into the closed event loop, and a filter on the
  ``asyncio`` logger drops its 'Task exception was never retrieved' reports of the abandoned tensorstore reads
  (logged whenever those tasks are garbage-collected). Everything else passes.
  """
  global _aftermath_filters_installed
  with _aftermath_lock:
    if _aftermath_filters_installed:
      return
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _is_closed_loop_callback(unraisable):
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger('asyncio').addFilter(lambda record: not _is_abandoned_tensorstore_read(record))
    _aftermath_filters_installed = True


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
    self._held = []  # what orbax logged while listing the steps (a damaged step's metadata), not yet shown
    _quiet_orbax()
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True)
    with _held_orbax_records() as held:
      manager = ocp.CheckpointManager(self.directory, options=options)
    self._held.extend(held)
    return manager

  def _drop_held(self, step: int) -> None:
    """Forgets what orbax logged about ``step`` while listing the steps: its restore failed and says why."""
    step_dir = os.path.join(self.directory, str(step)) + os.sep
    self._held = [r for r in self._held if step_dir not in r.getMessage()]

  def _release_held(self) -> None:
    """Shows what orbax logged while listing the steps (about steps not reported otherwise)."""
    held, self._held = self._held, []
    for record in held:
      logging.getLogger('absl').handle(record)

  def all_steps(self) -> list[int]:
    """Steps on disk (including ones that may turn out unreadable), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest step on disk, or None."""
    return self._manager.latest_step()

  def save(self, step: int, tree: Any, metadata: dict[str, Any] | None = None) -> None:
    """Starts an asynchronous save of ``tree`` (host arrays) as ``step``; a step already on disk is skipped.

    ``metadata`` (a JSON-serializable dict) is stored with the step and read back by `metadata`.
    """
    if step in self._manager.all_steps():
      return
    tree = jax.tree.map(np.asarray, tree)
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True, custom_metadata=metadata)

  def metadata(self, step: int) -> dict[str, Any]:
    """The metadata dict saved with ``step`` ({} for steps saved without, or whose metadata is unreadable)."""
    try:
      with _held_orbax_records():
        return dict(self._manager.metadata(step).custom_metadata or {})
    except Exception:  # pylint: disable=broad-except  # a damaged step: restoring it reports the damage
      return {}

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._release_held()
    self._manager.close()

  def restore(self, step: int, target: Any) -> Any:
    """Restores ``step`` into the structure/dtypes/shapes of ``target`` (arrays or ``jax.ShapeDtypeStruct``).

    A failed restore raises orbax's error and prints nothing else (see the module docstring).
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(_shape(x), _dtype(x)), target)
    try:
      with _held_orbax_records() as held:
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception:
      _quiet_failed_restore_aftermath()
      self._drop_held(step)  # the error raised here says what orbax said about this step
      raise
    for record in held:  # it worked: what orbax said on the way is worth seeing
      logging.getLogger('absl').handle(record)
    self._release_held()
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
      details = '; '.join(f'step {s}: {_describe(e)}' for s, e in corrupt)
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
        'Checkpoint step %d in %s is unreadable (%s); %s. It was moved to %s.',
        bad,
        self.directory,
        _describe(error),
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


def _describe(error: Exception, limit: int = 240) -> str:
  """``Type: message`` of a restore error in one short line (without tensorstore's spec dump)."""
  text = str(error).split(' [tensorstore_spec=', 1)[0].splitlines()[0] if str(error) else ''
  text = f'{type(error).__name__}: {text}'
  return text if len(text) <= limit else text[: limit - 3] + '...'


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
  """Writes ``obj`` as indented JSON atomically (write to a temporary file, then rename).

  A write that fails (e.g. a value JSON cannot encode, a full disk) leaves ``path`` as it was and no temporary file.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  try:
    with open(tmp, 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=str)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
