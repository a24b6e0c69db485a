"""What ``sample.py`` runs: many images from a trained model into a folder, sharded, resumable, deterministic.

The images come from the one data-parallel sampler, `ddpm_jax.batch_sampler.BatchSampler`: image ``i`` of a run is
a function of ``(seed, i)`` alone, so the result does not depend on the batch size, the number of devices, or on
where an interrupted run was resumed.

Output folder layout: ``samples_00000.npz``, ``samples_00001.npz``, ... each with ``images`` (uint8
[n, H, W, C]) and ``indices`` (int64 [n]); ``grid.png`` with the first images; ``sampling.json`` with the
settings. A shard is written to a temporary file and renamed, so a finished shard is always complete;
rerunning the same command skips finished shards and never deletes any file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import tqdm

from ddpm_jax import batch_sampler, errors, guidance, image_grid, loading, paths, solvers
from ddpm_jax import progress as progress_lib


def shard_path(out_dir: str, shard: int) -> str:
  return os.path.join(out_dir, f'samples_{shard:05d}.npz')


def _shard_is_complete(path: str, expected: np.ndarray, image_shape: Sequence[int]) -> bool:
  try:
    with np.load(path) as f:
      return (
        np.array_equal(f['indices'], expected)
        and f['images'].shape == (len(expected),) + tuple(image_shape)
        and f['images'].dtype == np.uint8
      )
  except Exception:  # pylint: disable=broad-except  # a truncated or foreign file: not complete
    return False


def load_samples(out_dir: str, *, with_labels: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """All images of a sampling folder, in index order (uint8 [N, H, W, C]).

  With ``with_labels`` returns ``(images, labels [N] int32)``; the shards of a class-conditional model hold
  the class of each image (an unconditional model's shards have none: ValueError).
  """
  files = sorted(glob.glob(os.path.join(out_dir, 'samples_*.npz')))
  if not files:
    raise errors.MissingFileError(f'No samples_*.npz shards in {out_dir!r}; run sample.py first.')
  images, indices, labels = [], [], []
  for path in files:
    with np.load(path) as f:
      images.append(f['images'])
      indices.append(f['indices'])
      if with_labels:
        if 'labels' not in f:
          raise ValueError(f'{path!r} holds no class labels: it was sampled from an unconditional model.')
        labels.append(f['labels'])
  order = np.argsort(np.concatenate(indices), kind='stable')
  if with_labels:
    return np.concatenate(images)[order], np.concatenate(labels)[order]
  return np.concatenate(images)[order]


def check_resumable(out_dir: str, settings: dict) -> bool:
  """Whether ``out_dir`` holds samples of these ``settings`` (True) or none (False); raises for other settings.

  ``settings`` as `sample_to_dir` records them (with ``num_samples`` and ``shard_size``). Reads only.

  Raises:
    errors.UserError: ``out_dir/sampling.json`` records other settings (its samples are never overwritten).
  """
  meta_path = os.path.join(out_dir, 'sampling.json')
  if not os.path.exists(meta_path):
    return False
  with open(meta_path) as f:
    old = json.load(f)
  if old != json.loads(json.dumps(settings, default=str)):
    diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
    raise errors.UserError(
      f'{out_dir!r} holds samples made with other settings {diff} (old, new); choose another '
      '--out folder or repeat the original settings to resume.'
    )
  return True


@contextlib.contextmanager
def _progress_bar(sampler: Any, todo: list, num_samples: int, *, enabled: bool) -> Iterator[Callable[[int], None]]:
  """The bar of `sample_to_dir`; yields ``on_shard(num_images)``, to call after each shard is written.

  A sampler with a ``progress`` (`ddpm_jax.progress.Progress`) and ``network_calls`` (a BatchSampler made with
  ``progress=``) moves the bar from inside its compiled chain, in network calls over all shards to do, with the
  images written as its postfix; any other sampler gets a bar of images, moved after each shard.
  """
  done = num_samples - sum(len(i) for _, i in todo)
  if not enabled or not todo:
    yield lambda n: None
    return
  calls = getattr(sampler, 'network_calls', None)
  reporter = getattr(sampler, 'progress', None)
  if reporter is None or calls is None:
    with tqdm.tqdm(total=num_samples, initial=done, unit='img', dynamic_ncols=True, desc='sampling') as bar:
      yield bar.update
    return
  with reporter.job(calls * len(todo), 'sampling') as bar:
    written = [done]

    def on_shard(n: int) -> None:
      written[0] += n
      bar.set_postfix_str(f'{written[0]}/{num_samples} images')

    bar.set_postfix_str(f'{done}/{num_samples} images')
    yield on_shard


def sample_to_dir(
  sampler: Callable[[np.ndarray], np.ndarray],
  out_dir: str,
  *,
  num_samples: int,
  shard_size: int,
  image_shape: Sequence[int],
  settings: dict | None = None,
  grid_size: int = 64,
  progress: bool = True,
) -> dict:
  """Writes ``num_samples`` images in shards of ``shard_size``, skipping shards already finished.

  Args:
    sampler: ``sampler(indices) -> uint8 [n, H, W, C]`` (e.g. a `ddpm_jax.batch_sampler.BatchSampler`). If it
      has a ``labels(indices)`` method returning ints (a class-conditional BatchSampler), each shard also stores
      ``labels`` and ``grid.png`` shows one row per class.
    out_dir: output folder (created).
    num_samples: exactly how many images to produce.
    shard_size: images per shard (and per sampler call).
    image_shape: (H, W, C), to validate existing shards.
    settings: recorded in ``sampling.json``; a resumed run with different settings is refused.
    grid_size: images in ``grid.png`` (0 for none).
    progress: show a tqdm bar with ETA: in network calls, moved from inside the compiled chain, if ``sampler`` was
      made with a ``progress`` (see `_progress_bar`); else in images, moved after each shard.

  Returns:
    Summary: ``num_samples``, ``num_shards``, ``skipped_shards``, ``wall_s``, ``images_per_s``.
  """
  if num_samples < 1 or shard_size < 1:
    raise ValueError(f'num_samples and shard_size must be positive, got {num_samples} and {shard_size}.')
  os.makedirs(out_dir, exist_ok=True)
  settings = dict(settings or {}, num_samples=num_samples, shard_size=shard_size)
  meta_path = os.path.join(out_dir, 'sampling.json')
  if not check_resumable(out_dir, settings):
    with open(meta_path + '.tmp', 'w') as f:
      json.dump(settings, f, indent=2, sort_keys=True, default=str)
    os.replace(meta_path + '.tmp', meta_path)

  num_shards = math.ceil(num_samples / shard_size)
  todo, skipped = [], 0
  for shard in range(num_shards):
    indices = np.arange(shard * shard_size, min((shard + 1) * shard_size, num_samples), dtype=np.int64)
    if _shard_is_complete(shard_path(out_dir, shard), indices, image_shape):
      skipped += 1
    else:
      todo.append((shard, indices))
  if skipped:
    logging.info('Resuming: %d of %d shards already in %s.', skipped, num_shards, out_dir)

  t0, made = time.time(), 0
  with _progress_bar(sampler, todo, num_samples, enabled=progress) as on_shard:
    for shard, indices in todo:
      images = sampler(indices)
      path = shard_path(out_dir, shard)
      tmp = path + '.tmp.npz'
      labels = sampler.labels(indices) if hasattr(sampler, 'labels') else None
      np.savez(tmp, images=images, indices=indices, **({} if labels is None else {'labels': labels}))
      os.replace(tmp, path)
      made += len(indices)
      on_shard(len(indices))
  wall = time.time() - t0

  if grid_size:
    first, ncols = load_samples(out_dir)[:grid_size], None
    labels = sampler.labels(np.arange(len(first))) if hasattr(sampler, 'labels') else None
    if labels is not None and len(np.unique(labels)) > 1:  # one row per class
      first, ncols = image_grid.rows_by_class(first, labels)
    image_grid.save_png(os.path.join(out_dir, 'grid.png'), first, ncols=ncols, scale=max(1, 64 // first.shape[1]))
  return dict(
    num_samples=num_samples,
    num_shards=num_shards,
    skipped_shards=skipped,
    wall_s=wall,
    images_per_s=made / wall if made and wall > 0 else None,
  )


def run(
  *,
  workdir: str | None,
  pretrained: str | None,
  out_dir: str,
  num_samples: int,
  batch_size: int = 256,
  seed: int = 0,
  step: int | None = None,
  sampler: str = 'ancestral',
  steps: int | None = None,
  spacing: str | None = None,
  order: int | None = None,
  variant: str | None = None,
  eta: float | None = None,
  steps_offset: int = 0,
  var_type: str | None = None,
  clip_denoised: bool | None = None,
  grid_size: int = 64,
  class_label: int | None = None,
  guidance_scale: float = 0.0,
  layers: str | None = None,
  progress: bool = True,
) -> dict:
  """What ``sample.py`` does: load a model, validate the request, then :func:`sample_to_dir`.

  Every argument is checked before anything compiles. See ``sample.py`` for their meaning; ``clip_denoised`` None
  is the model's setting for the paper's samplers (ancestral, respaced, ddim) and the solver's default (off) for
  the others; ``layers`` chooses the U-Net's implementation (`ddpm_jax.loading.load_model`).
  """
  if (workdir is None) == (pretrained is None):
    raise errors.UserError('Pass exactly one of --workdir (a training run) and --pretrained (a released model).')
  paths.check_output_dir(out_dir, '--out')
  if num_samples < 1 or batch_size < 1:
    raise errors.UserError(f'--num_samples and --batch_size must be positive, got {num_samples} and {batch_size}.')
  if sampler not in solvers.SAMPLERS:
    raise errors.UserError(f'Unknown sampler {sampler!r}; choose one of {tuple(solvers.SAMPLERS)}.')
  loaded = loading.load_model(workdir=workdir, pretrained=pretrained, step=step, layers=layers)
  # The model's own settings unless overridden; validated before anything compiles.
  spec = batch_sampler.spec_for_model(
    loaded,
    sampler,
    var_type=var_type,
    clip_denoised=clip_denoised,
    steps=steps,
    spacing=spacing,
    order=order,
    variant=variant,
    eta=eta,
    steps_offset=steps_offset,
    class_label=class_label,
    guidance_scale=guidance_scale,
  )
  num_classes = getattr(loaded.model, 'num_classes', 0)
  try:  # the request's values against this model: a ValueError here is a bad flag, the user's to fix
    # A conditional model without --class_label cycles through the classes (image i gets class i mod K).
    guidance.check_conditioning(
      num_classes,
      class_label if class_label is not None or not num_classes else 0,
      guidance_scale,
      label_name='--class_label',
      scale_name='--guidance_scale',
    )
    spec.validate(loaded.schedule.num_timesteps, num_classes)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  image_shape = (loaded.image_size, loaded.image_size, loaded.in_channels)
  settings = dict(source=loaded.source, seed=seed, sampler=dataclasses.asdict(spec), image_shape=list(image_shape))
  check_resumable(out_dir, dict(settings, num_samples=num_samples, shard_size=batch_size))  # before compiling
  logging.info('Sampling %d images from %s with %s.', num_samples, loaded.source, spec)
  images = batch_sampler.BatchSampler(
    loaded.model,
    loaded.params,
    loaded.schedule,
    spec,
    image_shape,
    seed=seed,
    progress=progress_lib.Progress() if progress else None,
  )
  summary = sample_to_dir(
    images,
    out_dir,
    num_samples=num_samples,
    shard_size=batch_size,
    image_shape=image_shape,
    settings=settings,
    grid_size=grid_size,
    progress=progress,
  )
  return dict(summary, out_dir=out_dir)
