"""Trains a DDPM: `python train.py --config configs/cifar10.py --workdir runs/cifar10 [--config.optim.lr=...]`.

With no flags it trains the offline digits demo (configs/digits.py) into runs/digits. Rerunning with the same
workdir resumes; SIGTERM/SIGINT save a checkpoint and exit cleanly. See docs/training.md.
"""

import os

from absl import app
from absl import flags

from ddpm_jax import cli  # absl, ml_collections and the standard library only: loads nothing heavy
from ddpm_jax import cpu_tuning

_HERE = os.path.dirname(os.path.abspath(__file__))
cli.define_config_file(
  'config', os.path.join(_HERE, 'configs', 'digits.py'), 'Training config file (configs/*.py).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default: runs/<config file name>).')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Resume a workdir even if the config changes what its checkpoints mean (diffusion, architecture, data; '
  'see docs/training.md). Without it such a change is refused.',
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cpu_tuning.tune_cpu('train')  # faster XLA:CPU kernels for training; no effect on GPU/TPU
  from ddpm_jax import train_lib  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename))[0]
    workdir = os.path.join('runs', name)
  train_lib.train_and_evaluate(flags.FLAGS.config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)


if __name__ == '__main__':
  cli.run(main)  # user errors as one `error:` line, exit status 2 (ddpm_jax.cli)
