"""A training workdir's identity and safety: what its checkpoints mean, who may write it, and when.

A workdir holds ``config.json`` (the resolved config of the run) and ``checkpoints/<step>``. The parameters of a
checkpoint only mean something together with part of that config: the diffusion schedule and T, the mean/variance
parameterization and loss, the U-Net's architecture, the image size and channels, the class count and the data
set (`IDENTITY_KEYS`). Their shapes do not reveal all of these (T or the beta range change no shape), so:

  * `check_resume` compares the config of a resumed run with ``config.json`` before anything is built: a change
    of an identity key is refused (`errors.WorkdirMismatchError`, with a table of the old and new values) unless
    the user passes ``--allow_config_change``; changes of the keys in `RESUME_SAFE_KEYS` (steps, intervals,
    learning rate, batch size, ...) are logged. A key in neither list is treated as an identity key.
  * Every checkpoint carries the identity it was trained with (`checkpoint_metadata`, stored by orbax beside the
    state), and `check_checkpoint_matches` compares it with a config on the reading side (``sample.py``,
    ``evaluate.py``, export) and on resume.
  * `save_config` writes ``config.json`` only once a run has validated and restored (train_lib calls it just before
    the first step), so a run that fails at start-up leaves the workdir byte-for-byte as it was.
  * `WorkdirLock` refuses a second concurrent ``train.py`` on one workdir (``fcntl.flock`` on the folder: the
    kernel drops the lock when the holder exits or is killed, so it never stays stuck, and no file is written).

A ``config.json`` written by an older version may lack keys added later (model.remat, model.num_classes, ...).
Such a key is not a change: an identity key is compared with the value the code assumed in its absence
(`LEGACY_DEFAULTS`), any other key is not compared.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import ml_collections

from ddpm_jax import errors, input_pipeline

_log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'

# Keys whose change changes what the parameters of a checkpoint mean: refused on resume without
# --allow_config_change, and compared with each checkpoint's own record on the reading side.
IDENTITY_KEYS = (
  'data.dataset',
  'data.image_size',
  'data.channels',
  'model.ch',
  'model.ch_mult',
  'model.num_res_blocks',
  'model.attn_resolutions',
  'model.resamp_with_conv',
  'model.num_groups',
  'model.num_classes',
  'diffusion.beta_schedule',
  'diffusion.beta_start',
  'diffusion.beta_end',
  'diffusion.num_timesteps',
  'diffusion.mean_type',
  'diffusion.var_type',
  'diffusion.loss_type',
)

# Keys that may change on resume (the change is logged): they change how training continues or how samples are
# drawn, not what the parameters are.
RESUME_SAFE_KEYS = (
  'seed',
  'multihost',
  'data.split',
  'data.folder',
  'data.data_dir',
  'data.random_flip',
  'data.in_memory',
  'data.shuffle_buffer',
  'data.prefetch',
  'model.dropout',
  'model.dtype',
  'model.remat',
  'model.layers',
  'model.class_dropout',
  'optim.batch_size',
  'optim.lr',
  'optim.beta1',
  'optim.beta2',
  'optim.eps',
  'optim.warmup_steps',
  'optim.grad_clip',
  'optim.clip_groups',
  'optim.ema_decay',
  'train.num_steps',
  'train.log_every',
  'train.checkpoint_every',
  'train.keep_checkpoints',
  'train.sample_every',
  'train.num_samples',
  'train.progress_bar',
  'sample.var_type',
  'sample.clip_denoised',
  'sample.guidance_scale',
)

# What the code assumes for the identity keys that configs written by older versions lack (train_lib's ``.get``
# defaults). Other keys such a config lacks are not compared at all.
LEGACY_DEFAULTS = {'model.num_classes': 0}

OVERRIDE_FLAG = '--allow_config_change'


# ------------------------------------------------------------------------------------------------------------------
# Configs as flat {dotted key: JSON value}
# ------------------------------------------------------------------------------------------------------------------


def flatten(config: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """``{'model.ch_mult': [1, 2], ...}``: a config's leaves by dotted key, as JSON would store them."""
  out = {}
  for k, v in config.items():
    if isinstance(v, (ml_collections.ConfigDict, Mapping)):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = json.loads(json.dumps(v, default=str))
  return out


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config saved in ``workdir/config.json``, or None if there is none.

  Raises:
    errors.UserError: the file exists but is not a JSON config.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise errors.UserError(
      f'{path} cannot be read as a config ({type(e).__name__}: {e}); restore it or use a new --workdir.'
    ) from None


def data_source(workdir: str) -> dict[str, str]:
  """The data a workdir was trained on: ``{'dataset', 'folder', 'data_dir'}`` from its config.json.

  What ``evaluate.py``/``figures.py`` use when no ``--dataset`` is given.

  Raises:
    errors.MissingFileError: ``workdir`` has no config.json.
  """
  config = read_config(workdir)
  if config is None:
    raise errors.MissingFileError(
      f'{os.path.join(workdir, CONFIG_FILE)!r} not found: --workdir must be a train.py workdir.'
    )
  d = config.get('data', {})
  return {'dataset': d.get('dataset', ''), 'folder': d.get('folder', ''), 'data_dir': d.get('data_dir', '')}


def resolve_data_source(
  *, workdir: str | None, pretrained: str | None, dataset: str | None, folder: str = '', data_dir: str = ''
) -> dict[str, str]:
  """The real images a command compares a model with: ``{'dataset', 'folder', 'data_dir'}``.

  An explicit ``dataset`` wins. Otherwise a workdir's own data (its config.json, with its folder and data_dir
  unless given), and CIFAR-10 for a released CIFAR-10 model (a ``pretrained`` name containing 'cifar10').

  Raises:
    errors.UserError: an unknown dataset, or none given and none can be inferred (another released model).
  """
  if dataset:
    if dataset not in input_pipeline.DATASETS:
      raise errors.UserError(f'Unknown --dataset={dataset!r}; choose one of {input_pipeline.DATASETS}.')
    if dataset == 'folder' and not folder:
      raise errors.UserError('--dataset=folder needs --folder=/path/to/images.')
    return {'dataset': dataset, 'folder': folder, 'data_dir': data_dir}
  if workdir:
    own = data_source(workdir)
    return {'dataset': own['dataset'], 'folder': folder or own['folder'], 'data_dir': data_dir or own['data_dir']}
  if pretrained and 'cifar10' in pretrained.lower():
    return {'dataset': 'cifar10', 'folder': folder, 'data_dir': data_dir}
  raise errors.UserError(
    f'--pretrained={pretrained!r} is not a CIFAR-10 model: pass --dataset (celeb_a_hq/256, lsun/church_outdoor, '
    'lsun/bedroom, lsun/cat, folder with --folder, ...) for its real images.'
  )


def identity(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """The identity keys of a config and their values (legacy defaults for keys an old config lacks)."""
  flat = flatten(config)
  return {k: flat.get(k, LEGACY_DEFAULTS.get(k)) for k in IDENTITY_KEYS if k in flat or k in LEGACY_DEFAULTS}


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{key: (old, new)}`` for the keys whose values differ between two flat configs.

  A key that ``old`` lacks (an older config.json) is compared with its legacy default if it is an identity key, and
  ignored otherwise; a key that ``new`` lacks is ignored (removed since).
  """
  changed = {}
  for k, v in new.items():
    if k in old:
      if old[k] != v:
        changed[k] = (old[k], v)
    elif k in LEGACY_DEFAULTS:
      if LEGACY_DEFAULTS[k] != v:
        changed[k] = (LEGACY_DEFAULTS[k], v)
    elif is_identity_key(k):
      changed[k] = ('(absent)', v)
  return changed


def is_identity_key(key: str) -> bool:
  """Whether a change of ``key`` changes what the parameters mean (unknown keys count as such)."""
  return key not in RESUME_SAFE_KEYS


def format_table(changes: Mapping[str, tuple[Any, Any]], old_name: str = 'workdir', new_name: str = 'now') -> str:
  """A small aligned table: one row per key with its old and new value."""
  rows = [('key', old_name, new_name)] + [(k, json.dumps(a), json.dumps(b)) for k, (a, b) in sorted(changes.items())]
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  return '\n'.join('  ' + '  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ------------------------------------------------------------------------------------------------------------------
# Resume and read checks
# ------------------------------------------------------------------------------------------------------------------


def check_resume(config: ml_collections.ConfigDict, workdir: str, *, allow_change: bool = False) -> dict:
  """Compares a run's config with the one saved in ``workdir``; refuses identity changes, logs the others.

  Call it before anything is built. Returns ``{key: (old, new)}`` of every change (empty for a new workdir).

  Raises:
    errors.WorkdirMismatchError: an identity key changed and ``allow_change`` is False; the message holds the
      table of old and new values and the ways out.
  """
  old = read_config(workdir)
  if old is None:
    return {}
  changes = diff(flatten(old), flatten(config))
  refused = {k: v for k, v in changes.items() if is_identity_key(k)}
  path = os.path.join(workdir, CONFIG_FILE)
  if refused and not allow_change:
    raise errors.WorkdirMismatchError(
      f'{workdir} was trained with another config ({path}); these changes alter what its checkpoints mean:\n'
      f'{format_table(refused)}\n'
      f'Use a new --workdir for the new config, or rerun with the values of {path}; to continue from these '
      f'checkpoints anyway (fine-tuning on purpose), pass {OVERRIDE_FLAG}.'
    )
  if refused:
    _log.warning(
      'Continuing %s with a config that changes what its checkpoints mean (%s):\n%s',
      workdir,
      OVERRIDE_FLAG,
      format_table(refused),
    )
  safe = {k: v for k, v in changes.items() if not is_identity_key(k)}
  if safe:
    _log.info('Resuming %s with changed settings (safe on resume):\n%s', workdir, format_table(safe))
  return changes


def checkpoint_metadata(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """What each checkpoint records beside its state: ``{'identity': identity(config)}``."""
  return {'identity': identity(config)}


def check_checkpoint_matches(
  config: Mapping[str, Any] | ml_collections.ConfigDict, checkpoint_meta: Mapping[str, Any] | None, *, where: str = ''
) -> None:
  """Refuses a checkpoint whose recorded identity differs from ``config`` (usually the workdir's config.json).

  Checkpoints saved before identities were recorded (no ``'identity'`` in ``checkpoint_meta``) pass.

  Args:
    config: the config the parameters are about to be used with.
    checkpoint_meta: the checkpoint's metadata (``Checkpointer.metadata(step)``), or None.
    where: the checkpoint, for the message (e.g. ``'runs/cifar10 step 5000'``).

  Raises:
    errors.WorkdirMismatchError: with a table of the checkpoint's and the config's values.
  """
  recorded = (checkpoint_meta or {}).get('identity')
  if not recorded:
    return
  now = identity(config)
  changes = {k: (recorded[k], now[k]) for k in recorded.keys() & now.keys() if recorded[k] != now[k]}
  if changes:
    raise errors.WorkdirMismatchError(
      f'The checkpoint {where} was trained with a config that differs from the one it is being used with:\n'
      f'{format_table(changes, "checkpoint", "config")}\n'
      'Use a checkpoint (--step) trained with this config, or the config.json it was trained with.'
    )


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``workdir/config.json`` atomically; a different existing one is kept as ``config.<time>.json``."""
  path = os.path.join(workdir, CONFIG_FILE)
  new = config.to_dict()
  if os.path.exists(path):
    old = read_config(workdir)
    if old is not None and flatten(old) == flatten(new):
      return
    os.replace(path, os.path.join(workdir, f'config.{time.strftime("%Y%m%d-%H%M%S")}.json'))
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(new, f, indent=2, sort_keys=True, default=str)
    f.write('\n')
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------------
# One run at a time
# ------------------------------------------------------------------------------------------------------------------


class WorkdirLock:
  """An exclusive lock on a workdir for one training run (``with WorkdirLock(workdir): ...``).

  ``fcntl.flock`` on the workdir folder itself, so that locking writes nothing into it. The kernel releases the
  lock when the process exits, however it ends, so a killed run never leaves the workdir locked. The message of a
  refused run names the holder's pid (read from ``/proc/locks`` on Linux). Where the file system cannot lock a
  folder (some network file systems), a warning says so and the run goes on unlocked.

  Raises (on enter):
    errors.WorkdirBusyError: another process holds the lock.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    fd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _flock_holder(fd) if e.errno in (errno.EAGAIN, errno.EACCES) else None
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        _log.warning('Cannot lock %s (%s); make sure no other run uses it.', self.workdir, e)
        return self
      pid = holder or 'unknown'
      raise errors.WorkdirBusyError(
        f'Another training run (pid {pid}) is using {self.workdir}; wait for it to finish or stop it '
        f'(kill {pid}), or use another --workdir.'
      ) from None
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the last descriptor releases the lock
      self._fd = None


def _flock_holder(fd: int) -> str | None:
  """The pid holding a flock on ``fd``'s file, from /proc/locks (Linux), or None."""
  st = os.fstat(fd)
  key = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
  try:
    with open('/proc/locks') as f:
      for line in f:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == 'FLOCK' and fields[5] == key:
          return fields[4]
  except OSError:
    pass
  return None
