"""Runs many command lines of one command in one process, as a user would run them one by one (for test_cli.py).

    python tests/cli_driver.py train.py cases.json results.json

``cases.json`` holds a list of argument lists. Each runs through the command's real entry
(``ddpm_jax.cli.run(main, argv)``) with absl's flags reset in between, its stderr captured at the file
descriptor (so that TensorFlow's and XLA's C++ notices are seen too). ``results.json`` gets, per case: the exit
status (``rc``), ``stderr``, the number of XLA compilations it started (``compiles``) and its ``seconds``.
One process pays the ~5 s of imports once for all the cases of a command.
"""

import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def _reset_flags(flags):
  """Back to the defaults, without the per-key flags ml_collections defined for the last case's overrides."""
  flags.FLAGS.unparse_flags()
  for name in list(flags.FLAGS):
    if '.' in name:
      delattr(flags.FLAGS, name)


def _as_first_run(flags, main):
  """``main`` with absl's verbosity as in a fresh process (app.run sets INFO only the first time it parses)."""

  def run(argv):
    if flags.FLAGS['verbosity'].using_default_value:
      flags.FLAGS.verbosity = 0
    return main(argv)

  return run


def _run_case(cli, main, script, args):
  """(exit status, captured stderr) of one command line."""
  with tempfile.TemporaryFile() as captured:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
      rc = 0
      try:
        cli.run(main, argv=[script, *args])
      except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # pylint: disable=broad-except  # recorded: the test shows it
        traceback.print_exc()
        rc = 'exception'
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
    captured.seek(0)
    return rc, captured.read().decode(errors='replace')


def main(script, cases_path, results_path):
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ddpm_jax import cli  # pylint: disable=g-import-not-at-top

  compiles = [0]

  def count(event, duration, **kwargs):
    del duration, kwargs
    compiles[0] += event == COMPILE_EVENT

  jax.monitoring.register_event_duration_secs_listener(count)
  spec = importlib.util.spec_from_file_location('command_under_test', os.path.join(ROOT, script))
  command = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(command)
  with open(cases_path) as f:
    cases = json.load(f)
  results = []
  for args in cases:
    _reset_flags(flags)
    before, t0 = compiles[0], time.time()
    rc, stderr = _run_case(cli, _as_first_run(flags, command.main), script, args)
    results.append(dict(args=args, rc=rc, stderr=stderr, compiles=compiles[0] - before, seconds=time.time() - t0))
  with open(results_path, 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main(*sys.argv[1:])
