"""The one entry point of every command (train.py, sample.py, evaluate.py, edit.py, figures.py): `run`.

    if __name__ == '__main__':
      cli.run(main)

`run` does what each command needs before and around its ``main``:

  * Restarts the process with the malloc tuning of `ddpm_jax.cpu_tuning` (CPU hosts), then silences start-up
    notices nobody asked for (`quiet_startup`): TensorFlow's oneDNN and CPU-feature notices and JAX's
    ``Unable to initialize backend 'tpu'`` on a machine without libtpu. Real warnings still show.
  * Parses the flags (absl). A bad flag or value prints one ``error:`` line; a typo in a config override such as
    ``--config.optim.lrr=1`` names the key and the closest valid keys.
  * Runs ``main``. An error the user can fix (`ddpm_jax.errors.is_user_error`: bad flags and config values,
    bad or missing files, unusable output paths, mismatched or busy workdirs; also absl's ``app.UsageError``)
    prints ``error: <message>`` on stderr and exits with status 2 (`EXIT_USER_ERROR`), without a traceback.
    Any other exception keeps its traceback: that is a bug, or something the user could not have known.

Tracebacks for user errors too: ``--verbosity=1``, or the environment variable ``DDPM_JAX_TRACEBACK=1`` (which
also covers errors in the flags themselves, before ``--verbosity`` is read).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import cpu_tuning, errors

EXIT_USER_ERROR = 2
TRACEBACK_ENV = 'DDPM_JAX_TRACEBACK'


def quiet_startup() -> None:
  """Silences start-up notices the user did not ask for; call it before TensorFlow or JAX's backends start.

  * ``TF_CPP_MIN_LOG_LEVEL=1`` (unless set): TensorFlow's C++ INFO lines (the CPU-feature notice) go; its
    warnings and errors stay.
  * ``TF_ENABLE_ONEDNN_OPTS=0`` (unless set): TensorFlow only reads and preprocesses data here, and its oneDNN
    notice is printed whatever the log level; without oneDNN its kernels are the standard ones (the notice is
    about oneDNN changing float round-off), and no model runs in TensorFlow.
  * JAX's INFO record ``Unable to initialize backend 'tpu'`` when libtpu is not installed: nobody asked for a TPU.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  bridge = logging.getLogger('jax._src.xla_bridge')
  if not any(isinstance(f, _DropMissingTpuNotice) for f in bridge.filters):
    bridge.addFilter(_DropMissingTpuNotice())


class _DropMissingTpuNotice(logging.Filter):
  """Drops JAX's INFO ``Unable to initialize backend 'tpu'`` where no libtpu is installed."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno > logging.INFO or not str(record.msg).startswith("Unable to initialize backend 'tpu'"):
      return True
    return importlib.util.find_spec('libtpu') is not None


def show_tracebacks() -> bool:
  """Whether user errors are shown with their traceback (``--verbosity >= 1`` or ``DDPM_JAX_TRACEBACK=1``)."""
  if os.environ.get(TRACEBACK_ENV, '').lower() in ('1', 'true', 'yes'):
    return True
  return flags.FLAGS.is_parsed() and flags.FLAGS['verbosity'].value >= 1


def _exit_user_error(message: str, error: BaseException | None = None) -> NoReturn:
  """Prints ``error: <message>`` (after the traceback, if asked for) and exits with `EXIT_USER_ERROR`."""
  if error is not None and show_tracebacks():
    traceback.print_exception(error, file=sys.stderr)
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing with its errors as one ``error:`` line (status 2) instead of a usage dump or traceback."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    _exit_user_error(f'{e} (--helpshort lists the flags)', e)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config does not have
    message = config_override_error(argv)
    if message is None:
      raise
    _exit_user_error(message, e)
  for name, flag in _config_flags():  # ml_collections reports a missing config file only when it is first read
    path = flag.config_filename.split(':', 1)[0]
    if not os.path.isfile(path):
      _exit_user_error(f'--{name}={path!r} is not a file; pass a config file such as configs/cifar10.py.')
  return remaining


def _config_flags() -> list[tuple[str, Any]]:
  """``(name, flag)`` of the flags defined with ml_collections' ``DEFINE_config_file``."""
  found = []
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if name == flag.name and flag.parser.flag_type() == 'config object':
      found.append((name, flag))
  return found


def config_override_error(argv: Sequence[str]) -> str | None:
  """The message for the first ``--<config flag>.<key>`` of ``argv`` that names no key of its config, or None.

  It names the key and the closest valid keys at the level where the path goes wrong.
  """
  for name, flag in _config_flags():
    message = _override_message(name, _flag_argument(argv, name, flag.default_as_str.strip("'")), argv)
    if message:
      return message
  return None


def _override_message(name: str, path: str, argv: Sequence[str]) -> str | None:
  """The message for the first override of ``--name``'s config (file ``path``) that names no key, or None."""
  try:
    config = config_flags.config_flags.ConfigFileFlagParser(name).parse(path)
  except Exception:  # pylint: disable=broad-except  # the config file itself is broken: absl's error stands
    return None
  for override in _overrides(argv, name):
    message = _missing_key(config, override)
    if message:
      return f'--{name}.{override}: {message}'
  return None


def define_config_file(name: str, default: str, help_string: str, **kwargs: Any) -> Any:
  """``ml_collections.config_flags.DEFINE_config_file`` with override typos reported like `run` does.

  Without ``--<name>`` on the command line ml_collections applies the overrides to the default config while the
  flag is defined (at import of the command), before `run` parses anything: a typo there is reported here, as
  one ``error:`` line with status 2. Returns the flag holder.
  """
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except (AttributeError, KeyError) as e:
    message = _override_message(name, default, sys.argv)
    if message is None:
      raise
    _exit_user_error(message, e)


def define_layers_flag(prefix: str = '') -> Any:
  """``--layers auto|reference|cpu`` of every command that loads a model (see `ddpm_jax.loading.load_model`).

  Unset (None), it means the run's ``model.layers`` for ``--workdir`` and 'auto' for ``--pretrained``. Returns the
  flag holder; ``prefix`` starts its help (e.g. ``'[bpd] '``).
  """
  return flags.DEFINE_enum(
    'layers',
    None,
    list(cpu_tuning.LAYER_CHOICES),
    prefix + "The U-Net's implementation (the same parameters and network): auto = the CPU layers on XLA:CPU, the "
    'reference layers (plain Flax) elsewhere; reference or cpu to force one. Default: auto, or the model.layers '
    'of a --workdir run.',
  )


def _flag_argument(argv: Sequence[str], name: str, default: Any) -> Any:
  """The value given to ``--name`` in ``argv`` (``--name=v`` or ``--name v``), else ``default``."""
  value = default
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """The dotted keys overridden in ``argv``: ``--name.a.b=v``, ``--name.a.b v``, ``--noname.a.b``."""
  keys = []
  for arg in argv:
    for prefix in (f'--{name}.', f'--no{name}.'):
      if arg.startswith(prefix):
        keys.append(arg[len(prefix) :].split('=', 1)[0])
  return keys


def _missing_key(config: Any, dotted: str) -> str | None:
  """Why ``dotted`` names no key of ``config`` (the closest keys where it goes wrong), or None if it does."""
  node, walked = config, []
  for part in dotted.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      where = '.'.join(walked) or 'the config'
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      prefix = '.'.join(walked + [''])
      hint = f'did you mean {" or ".join(prefix + c for c in close)}? ' if close else ''
      valid = ', '.join(sorted(keys)) if keys else 'none: it is a value, not a section'
      return f'{where} has no key {part!r}; {hint}(keys of {where}: {valid})'
    node = node[part]
    walked.append(part)
  return None


def _guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  def run_main(argv: list[str]) -> Any:
    try:
      return main(argv)
    except app.UsageError as e:
      _exit_user_error(str(e), e)
    except Exception as e:  # pylint: disable=broad-except  # re-raised unless the user can fix it
      if errors.is_user_error(e):
        _exit_user_error(str(e), e)
      raise

  return run_main


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """Runs a command's ``main(argv)`` under absl with this module's start-up and error handling.

  Args:
    main: the command's main function (takes the positional arguments left after the flags).
    argv: the command line (default ``sys.argv``). With an explicit ``argv`` (tests running commands
      in-process) the process is not restarted for the malloc tuning.
  """
  if argv is None:
    cpu_tuning.restart_with_malloc_tuning()  # glibc malloc with huge pages on CPU hosts (ddpm_jax.cpu_tuning)
    argv = sys.argv
  quiet_startup()
  saved, sys.argv = sys.argv, list(argv)  # ml_collections reads config overrides from sys.argv
  try:
    app.run(_guarded(main), argv=list(argv), flags_parser=_parse_flags)
  finally:
    sys.argv = saved
