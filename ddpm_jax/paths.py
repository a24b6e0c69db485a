"""Checks that an output path a user named can be written, before a command does any work.

`check_output_dir` (a folder: ``train.py --workdir``, ``sample.py/edit.py --out``) and `check_output_file` (a file:
``figures.py --out``, ``evaluate.py --out``) raise `errors.UserError` naming the path and what is wrong with it: an
existing file where a folder is wanted (or the reverse), a file in the way of a folder that would have to be
made, or a folder that this process may not write into. They create and change nothing, so a refused command
leaves the disk as it was.
"""

from __future__ import annotations

import os

from ddpm_jax import errors


def _nearest_existing(path: str) -> str:
  """``path`` or its nearest ancestor that exists (what ``os.makedirs(path)`` would create under)."""
  while not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def _check_creatable(path: str, flag: str) -> None:
  """A path that does not exist yet can be made: its nearest existing ancestor is a writable folder."""
  base = _nearest_existing(os.path.dirname(path))
  if not os.path.isdir(base):
    raise errors.UserError(f'{flag}={path!r} cannot be created: {base!r} is a file, not a folder; choose another path.')
  if not os.access(base, os.W_OK | os.X_OK):
    raise errors.UserError(
      f'{flag}={path!r} cannot be created: the folder {base!r} is not writable; choose a path you can write to.'
    )


def check_output_dir(path: str | None, flag: str = '--out') -> str:
  """Refuses an output folder that cannot be used; returns it as an absolute path.

  Args:
    path: the folder (it may exist, or be created later with ``os.makedirs``).
    flag: how the user named it, for the message (``--out``, ``--workdir``).

  Raises:
    errors.UserError: the path is empty, is an existing file, lies under a file, or is (or would be created
      in) a folder this process cannot write.
  """
  if not path:
    raise errors.UserError(f'{flag} is required: the folder to write into.')
  path = os.path.abspath(path)
  if os.path.lexists(path):
    if not os.path.isdir(path):
      raise errors.UserError(f'{flag}={path!r} is an existing file, not a folder; choose a folder path.')
    if not os.access(path, os.W_OK | os.X_OK):
      raise errors.UserError(f'{flag}={path!r} is not writable; choose a folder you can write to.')
    return path
  _check_creatable(path, flag)
  return path


def check_output_file(path: str | None, flag: str = '--out', *, extensions: tuple[str, ...] = ()) -> str:
  """Refuses an output file path that cannot be written; returns it as an absolute path.

  Args:
    path: the file (it may exist: it will be replaced).
    flag: how the user named it, for the message.
    extensions: allowed endings such as ``('.png',)`` (case-insensitive); empty allows any.

  Raises:
    errors.UserError: the path is empty, is an existing folder, has another extension, or cannot be written.
  """
  if not path:
    raise errors.UserError(f'{flag} is required: the file to write.')
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise errors.UserError(f'{flag}={path!r} is a folder; give a file path such as {os.path.join(path, "out.png")!r}.')
  if extensions and not path.lower().endswith(tuple(e.lower() for e in extensions)):
    raise errors.UserError(f'{flag}={path!r} must end in {" or ".join(extensions)}.')
  if os.path.lexists(path):
    if not os.access(path, os.W_OK) or not os.access(os.path.dirname(path), os.W_OK | os.X_OK):
      raise errors.UserError(f'{flag}={path!r} is not writable; choose a path you can write to.')
    return path
  _check_creatable(path, flag)
  return path
