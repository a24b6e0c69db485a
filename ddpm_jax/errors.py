"""The errors a user can fix: bad flags and config values, bad input files, unusable output paths, workdirs.

Every command runs through `ddpm_jax.cli.run`, which prints an error of this family as one ``error: <message>``
line on stderr and exits with status 2; any other exception keeps its traceback (a bug, or something the user
could not have known). So a message raised with these types must say which value or path is wrong and how to
fix it, in a sentence or two.

`UserError` derives from ValueError, so code that catches ValueError (and tests written with
``pytest.raises(ValueError)``) keeps working; `MissingFileError` derives from FileNotFoundError for the same
reason. Both carry the `UserFacing` marker that `is_user_error` tests.
"""

from __future__ import annotations


class UserFacing:
  """Marker of the exceptions whose message is meant for the user of a command (see `is_user_error`)."""


class UserError(UserFacing, ValueError):
  """A value, flag, file or workdir the user gave cannot work; the message names it and the fix."""


class MissingFileError(UserFacing, FileNotFoundError):
  """A file or folder the user named does not exist (or holds nothing usable); the message names it."""


class BadImageFilesError(UserError):
  """Image files that cannot be read (truncated, not an image, unsupported mode), listed by path."""


class DatasetNotPreparedError(UserError):
  """A tfds dataset is not prepared in its data_dir (tfds cannot download here, or was not asked to)."""


class WorkdirMismatchError(UserError):
  """A workdir's checkpoints were made with a config that differs in what the parameters mean."""


class WorkdirBusyError(UserError):
  """Another run holds the workdir's lock."""


def is_user_error(error: BaseException) -> bool:
  """Whether ``error`` is one the user can fix from its message alone (printed without a traceback)."""
  return isinstance(error, UserFacing)
