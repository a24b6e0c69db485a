"""What ``evaluate.py`` runs: FID and IS of a sample folder, bits/dim of a data split, class accuracy.

The metrics are `ddpm_jax.evaluation` (statistics, distances, the bound over a dataset, the digits judge); this
module reads the inputs the command names (sample shards, Inception weights, reference statistics, a model),
checks them before anything compiles, and returns the results as plain dicts for the command to print and write.
Class accuracy samples through the one data-parallel sampler (`ddpm_jax.batch_sampler`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ddpm_jax import batch_sampler, errors, evaluation, guidance, input_pipeline, loading, sample_lib
from ddpm_jax import inception as inception_lib


def run_fid(
  *,
  samples_dir: str,
  inception_weights: str | None,
  ref_stats: str,
  ref_dataset: str = 'cifar10',
  ref_split: str = 'train',
  ref_folder: str = '',
  data_dir: str = '',
  batch_size: int = 200,
  num_splits: int = 10,
  progress: bool = True,
) -> dict[str, float]:
  """FID and IS of a ``sample.py`` folder against cached (or freshly computed) reference statistics.

  The paper's protocol: 50,000 EMA samples against all 50,000 CIFAR-10 training images, IS over 10 splits.

  Args:
    samples_dir: folder of ``samples_*.npz`` shards.
    inception_weights: the FID Inception weights (``.npz`` of ours, or pytorch-fid's ``.pth``); None downloads
      pytorch-fid's file into ``inception.default_weights_dir()`` once (checked by its sha256 prefix).
    ref_stats: ``.npz`` of reference statistics; computed from ``ref_dataset``/``ref_split`` (or
      ``ref_folder``) and written there if missing.
    ref_dataset, ref_split, ref_folder, data_dir: where the reference images come from.
    batch_size: Inception batch size.
    num_splits: IS splits.
    progress: show progress bars.

  Returns:
    {'fid', 'inception_score', 'inception_score_std', 'num_samples', 'num_reference_images'}.
  """
  if inception_weights is None:  # the standard file, downloaded once into the cache (needs the network)
    inception_weights = inception_lib.fetch_inception_weights()
  if not os.path.isfile(inception_weights):
    raise errors.MissingFileError(
      f"Inception weights {inception_weights!r} not found. Download pytorch-fid's "
      f'pt_inception-2015-12-05-6726825d.pth (see ddpm_jax.inception.fetch_inception_weights) and pass its path.'
    )
  samples = sample_lib.load_samples(samples_dir)
  if samples.shape[-1] != 3:
    raise errors.UserError(f'FID needs RGB samples; {samples_dir!r} holds images of shape {samples.shape[1:]}.')
  feature_fn = evaluation.make_feature_fn(inception_lib.load_inception_params(inception_weights), batch_size)
  if not os.path.exists(ref_stats):
    dataset = 'folder' if ref_folder else ref_dataset
    batches = input_pipeline.eval_images(
      dataset,
      split=ref_split,
      image_size=samples.shape[1],
      channels=3,
      batch_size=batch_size,
      folder=ref_folder,
      data_dir=data_dir,
    )
    source = f'folder:{ref_folder}' if ref_folder else f'tfds:{ref_dataset}/{ref_split}'
    reference = evaluation.reference_stats_from_images(
      batches, feature_fn, ref_stats, meta={'source': source}, progress=progress
    )
  else:
    reference = evaluation.load_reference_stats(ref_stats)
  result = evaluation.fid_from_samples(samples, feature_fn, reference, num_splits=num_splits, progress=progress)
  result['num_reference_images'] = float(reference.num_images)
  return result


def run_bpd(
  *,
  workdir: str | None,
  pretrained: str | None,
  dataset: str,
  split: str = 'test',
  step: int | None = None,
  layers: str | None = None,
  folder: str = '',
  data_dir: str = '',
  batch_size: int = 200,
  num_images: int | None = None,
  seed: int = 0,
  progress: bool = True,
) -> dict[str, Any]:
  """Bits/dim of a data split under a run's EMA weights (or a released model): the paper's NLL.

  ``layers`` chooses the U-Net's implementation (`ddpm_jax.loading.load_model`).

  Returns:
    {'bpd', 'num_images', 'prior_bpd', 'decoder_bpd', 'terms_bpd' (list of T), 'mse' (list of T), 'source'}.
  """
  if num_images is not None and num_images < 1:
    raise errors.UserError(f'--num_images={num_images} must be positive (or left out for the whole split).')
  if batch_size < 1:
    raise errors.UserError(f'--batch_size={batch_size} must be positive.')
  loaded = loading.load_model(workdir=workdir, pretrained=pretrained, step=step, layers=layers)
  batches = input_pipeline.eval_images(
    dataset,
    split=split,
    image_size=loaded.image_size,
    channels=loaded.in_channels,
    batch_size=batch_size,
    folder=folder,
    data_dir=data_dir,
    num_images=num_images,
  )
  summary = evaluation.bpd_over_dataset(
    loaded.model,
    loaded.params,
    loaded.schedule,
    batches,
    seed=seed,
    mean_type=loaded.mean_type,
    var_type=loaded.var_type,
    clip_denoised=True,
    num_images=num_images,
    progress=progress,
  )
  return dict(
    bpd=summary.total_bpd,
    num_images=summary.num_images,
    prior_bpd=summary.prior_bpd,
    decoder_bpd=float(summary.terms_bpd[0]),
    terms_bpd=summary.terms_bpd.tolist(),
    mse=summary.mse.tolist(),
    source=loaded.source,
  )


def run_class_accuracy(
  *,
  workdir: str,
  guidance_scales: Iterable[float],
  num_samples: int = 500,
  batch_size: int = 250,
  sampler: str = 'ancestral',
  steps: int | None = None,
  seed: int = 0,
  step: int | None = None,
  layers: str | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Samples a class-conditional digits run at several guidance scales and scores the classes with an SVM.

  Image i asks for class i mod 10 (the same images' noise for every scale, so scales are compared on equal
  footing). ``sampler`` and ``steps`` as for ``sample.py``; ``layers`` as for `ddpm_jax.loading.load_model`.

  Returns:
    ``{'classifier_accuracy_on_real_digits', 'num_samples', 'results': [{'guidance_scale', 'accuracy',
    'per_class'}...], 'source'}``.
  """
  scales = [float(w) for w in guidance_scales]
  if not scales:
    raise errors.UserError('--guidance_scales must be a non-empty list of numbers >= 0, got none.')
  for w in scales:
    try:
      guidance.check_guidance_scale(w, name='each of --guidance_scales')
    except ValueError as e:
      raise errors.UserError(str(e)) from None
  if num_samples < 1 or batch_size < 1:
    raise errors.UserError(f'num_samples and batch_size must be positive, got {num_samples} and {batch_size}.')
  loaded = loading.load_model(workdir=workdir, step=step, layers=layers)
  if not getattr(loaded.model, 'num_classes', 0):
    raise errors.UserError(
      f'{workdir!r} holds an unconditional model (model.num_classes=0); class accuracy needs a '
      'class-conditional run such as configs/digits_cond.py.'
    )
  if (loaded.image_size, loaded.in_channels) != (8, 1):
    raise errors.UserError(
      f'The digits classifier scores 8x8 grey images; {workdir!r} makes '
      f'{loaded.image_size}x{loaded.image_size}x{loaded.in_channels}.'
    )
  specs = [batch_sampler.spec_for_model(loaded, sampler, steps=steps, guidance_scale=w) for w in scales]
  try:  # --sampler / --steps against this model, before anything compiles
    for spec in specs:
      spec.validate(loaded.schedule.num_timesteps, loaded.model.num_classes)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  clf, real_acc = evaluation.digits_classifier()
  results = []
  for w, spec in zip(scales, specs):
    images_of = batch_sampler.BatchSampler(loaded.model, loaded.params, loaded.schedule, spec, (8, 8, 1), seed=seed)
    images, labels = [], []
    for start in tqdm(range(0, num_samples, batch_size), desc=f'w={w:g}', disable=not progress):
      idx = np.arange(start, min(start + batch_size, num_samples))
      images.append(images_of(idx))
      labels.append(images_of.labels(idx))
    acc, per_class = evaluation.class_accuracy(np.concatenate(images), np.concatenate(labels), clf)
    results.append(dict(guidance_scale=w, accuracy=acc, per_class=per_class.tolist()))
  return dict(
    classifier_accuracy_on_real_digits=real_acc,
    num_samples=num_samples,
    sampler=sampler,
    results=results,
    source=loaded.source,
  )
