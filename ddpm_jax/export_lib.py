"""What ``export.py`` runs: a training run's weights as a diffusers folder or an original-layout TF checkpoint.

The formats themselves are :func:`ddpm_jax.formats.diffusers.write_folder` and
:func:`ddpm_jax.formats.tf_checkpoint.write_checkpoint`; this module checks the request, restores the run,
writes into a hidden sibling folder and renames it to ``--out`` only when every file is written, so an
interrupted or failed export leaves no folder that looks complete. ``--push_to_hub`` then uploads the folder
with ``huggingface_hub`` (the ``hub`` extra).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from ddpm_jax import errors, loading
from ddpm_jax.formats import diffusers as diffusers_format
from ddpm_jax.formats import tf_checkpoint as tf_format

FORMATS = ('diffusers', 'tf')


def _check_out_dir(out_dir: str) -> None:
  if not out_dir:
    raise errors.UserError('--out is required: the folder to write the exported model into.')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise errors.UserError(f'--out {out_dir!r} is a file; pass a new or empty folder.')
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise errors.UserError(
      f'--out {out_dir!r} already holds {len(os.listdir(out_dir))} entries; export.py never overwrites. '
      'Pass a new or empty folder (or delete this one).'
    )


def _check_hub(repo_id: str) -> Any:
  """The ``huggingface_hub`` module, checked before anything is exported."""
  if not diffusers_format.looks_like_repo_id(repo_id):
    raise errors.UserError(f'--push_to_hub {repo_id!r} is not a hub repo id; pass one like "your-name/ddpm-digits".')
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top  # the optional hub extra
  except ImportError as e:
    raise ImportError(
      '--push_to_hub needs huggingface_hub (the hub extra): pip install -e ".[hub]". Or export without it and '
      'upload the folder later.'
    ) from e
  return huggingface_hub


def push_to_hub(folder: str, repo_id: str) -> str:
  """Uploads an exported folder to a Hugging Face model repo (created if missing); returns the commit URL.

  Needs the ``hub`` extra, network access and a token (``huggingface-cli login`` or ``HF_TOKEN``).

  Raises:
    ValueError: ``repo_id`` is not ``owner/name``. ImportError: huggingface_hub is not installed.
    OSError: the upload failed (no network, no token, no permission); the folder itself is untouched.
  """
  hub = _check_hub(repo_id)
  api = hub.HfApi()
  try:
    api.create_repo(repo_id, repo_type='model', exist_ok=True)
    commit = api.upload_folder(
      folder_path=folder, repo_id=repo_id, repo_type='model', commit_message='Upload a ddpm-jax export'
    )
  except Exception as e:  # network, auth and HTTP errors come in many types
    raise OSError(
      f'Could not upload {folder!r} to the hub repo {repo_id!r} ({type(e).__name__}: {e}). The export in '
      f'{folder!r} is complete; with network and a token (huggingface-cli login or HF_TOKEN), upload it with '
      f'huggingface_hub.HfApi().upload_folder(folder_path={folder!r}, repo_id={repo_id!r}).'
    ) from e
  return str(getattr(commit, 'commit_url', commit))


def run(
  *,
  workdir: str,
  out_dir: str,
  fmt: str = 'diffusers',
  step: int | None = None,
  raw: bool = False,
  push_to_hub_repo: str | None = None,
) -> dict[str, Any]:
  """What ``export.py`` does; every argument is checked before the run is restored or anything written.

  Args:
    workdir: a ``train.py`` workdir.
    out_dir: a new or empty folder.
    fmt: 'diffusers' (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json,
      model_index.json) or 'tf' (``model.ckpt-<step>`` with raw weights and EMA shadows, plus its settings file).
    step: checkpoint step (default: the newest readable one).
    raw: diffusers only: export the raw training weights instead of their EMA.
    push_to_hub_repo: upload the folder to this Hugging Face repo afterwards.

  Returns:
    ``{'out_dir', 'format', 'files', 'step', 'weights', 'pretrained' (what to pass to --pretrained),
    'source', 'hub_url'}``.
  """
  if not workdir:
    raise errors.UserError('--workdir is required: the train.py workdir to export.')
  if fmt not in FORMATS:
    raise errors.UserError(f'Unknown --format {fmt!r}; choose one of {FORMATS}.')
  if raw and fmt == 'tf':
    raise errors.UserError(
      '--raw applies to --format diffusers only: the TF checkpoint always holds both, the raw weights under '
      'model/... and their EMA under .../ExponentialMovingAverage, as the original code saved them.'
    )
  _check_out_dir(out_dir)
  out_dir = os.path.normpath(out_dir)  # 'exported/x/' -> 'exported/x', the name the finished folder is renamed to
  if push_to_hub_repo is not None:
    _check_hub(push_to_hub_repo)

  config, state, step = loading.restore_workdir(workdir, step)
  weights = 'raw' if raw else 'EMA'
  loaded = loading.LoadedModel.from_config(
    config, state.params if raw else state.ema_params, source=f'{workdir} step {step} ({weights} parameters)'
  )
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out_dir))}.partial-', dir=parent)
  try:
    if fmt == 'diffusers':
      files = diffusers_format.write_folder(tmp, loaded)
      pretrained = out_dir
    else:
      files = tf_format.write_checkpoint(
        os.path.join(tmp, f'model.ckpt-{step}'), loaded, raw_params=state.params, step=step
      )
      pretrained = os.path.join(out_dir, f'model.ckpt-{step}')
      weights = 'raw and EMA'
    if os.path.isdir(out_dir):  # empty (checked above)
      os.rmdir(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  files = [os.path.join(out_dir, os.path.relpath(f, tmp)) for f in files]
  logging.info('Exported %s (%s weights) to %s as %s.', loaded.source, weights, out_dir, fmt)
  hub_url = push_to_hub(out_dir, push_to_hub_repo) if push_to_hub_repo is not None else None
  return dict(
    out_dir=out_dir,
    format=fmt,
    files=files,
    step=int(step),
    weights=weights,
    pretrained=pretrained,
    source=loaded.source,
    hub_url=hub_url,
  )
