"""Sampling many images from a trained model: sharded, resumable, deterministic, across devices.

What ``sample.py`` runs. Image ``i`` of a run is a function of ``(seed, i)`` alone: each image draws its
noise from ``fold_in(key(seed), i)`` and the sampler is vmapped over images, so the result does not depend
on the batch size, the number of devices, or on where an interrupted run was resumed.

Output folder layout: ``samples_00000.npz``, ``samples_00001.npz``, ... each with ``images`` (uint8
[n, H, W, C]) and ``indices`` (int64 [n]); ``grid.png`` with the first images; ``sampling.json`` with the
settings. A shard is written to a temporary file and renamed, so a finished shard is always complete;
rerunning the same command skips finished shards and never deletes any file.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ddpm_jax import data_parallel, diffusion, errors, loading, paths, sampling
from ddpm_jax import schedule as sched_lib
from ddpm_jax.input_pipeline import to_uint8

SAMPLERS = ('ancestral', 'respaced', 'ddim')


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """Which sampler and its settings.

  Attributes:
    name: 'ancestral' (the paper's T-step sampler), 'respaced' (ancestral on ``steps`` evenly spaced
      timesteps) or 'ddim' (``steps`` DDIM steps with ``eta``).
    steps: number of steps for 'respaced' and 'ddim' (default: T).
    eta: DDIM's eta (0 = deterministic).
    var_type: reverse variance for the ancestral samplers ('fixedlarge' or 'fixedsmall').
    clip_denoised: clip the x_0 estimate at every step.
    mean_type: the network's parameterization.
    class_label: class-conditional models only: the class of every image, or None to cycle through the
      classes by index (image i gets class i mod K). The null class K gives unconditional samples.
    guidance_scale: classifier-free guidance weight w (class-conditional models only; 0 = none).
  """

  name: str = 'ancestral'
  steps: int | None = None
  eta: float = 0.0
  var_type: str = 'fixedlarge'
  clip_denoised: bool = True
  mean_type: str = 'eps'
  class_label: int | None = None
  guidance_scale: float = 0.0

  def validate(self, num_timesteps: int) -> None:
    """Raises ValueError for an unusable combination (before anything compiles)."""
    if self.name not in SAMPLERS:
      raise ValueError(f'Unknown sampler {self.name!r}; choose one of {SAMPLERS}.')
    diffusion.check_types(mean_type=self.mean_type, var_type=self.var_type)
    if self.steps is not None and not 1 <= self.steps <= num_timesteps:
      raise ValueError(f'steps must be in [1, {num_timesteps}], got {self.steps}.')
    if self.name == 'ancestral' and self.steps not in (None, num_timesteps):
      raise ValueError(
        f'The ancestral sampler runs all T = {num_timesteps} steps; for steps={self.steps} use '
        '--sampler respaced or --sampler ddim.'
      )
    if not 0.0 <= self.eta <= 1.0:
      raise ValueError(f'eta must lie in [0, 1], got {self.eta}.')
    if self.eta and self.name != 'ddim':
      raise ValueError(f'eta={self.eta} only applies to --sampler ddim.')
    if not self.guidance_scale >= 0:
      raise ValueError(f'guidance_scale must be >= 0 (0 = no guidance), got {self.guidance_scale}.')


def make_image_sampler(
  model: Any, schedule: sched_lib.Schedule, spec: SamplerSpec, image_shape: Sequence[int]
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """``sample_one(params, key, label) -> [H, W, C]``: one image in [-1, 1] (unclipped) from its own key.

  ``label`` (an int32 scalar) is the class for a class-conditional model (with ``spec.guidance_scale``) and is
  ignored by an unconditional one. Vmapping over keys gives a batch whose images do not depend on each other.
  """
  spec.validate(schedule.num_timesteps)
  conditional = bool(getattr(model, 'num_classes', 0))
  if not conditional and (spec.class_label is not None or spec.guidance_scale):
    raise ValueError('class_label / guidance_scale need a class-conditional model; this one has num_classes=0.')
  shape = (1,) + tuple(image_shape)
  if spec.name == 'respaced':
    use = sched_lib.space_timesteps(schedule.num_timesteps, spec.steps or schedule.num_timesteps)
    run_schedule, timestep_map = sched_lib.respace(schedule, use)
  else:
    run_schedule, timestep_map = schedule, None

  def sample_one(params, key, label):
    def denoise_fn(x, t):
      return model.apply({'params': params}, x, t, train=False)

    if conditional:
      denoise_fn = sampling.classifier_free_guidance(
        lambda x, t, y: model.apply({'params': params}, x, t, y, train=False),
        label[None],
        null_label=model.null_label(),
        guidance_scale=spec.guidance_scale,
      )

    if spec.name == 'ddim':
      x = sampling.ddim_sample_loop(
        schedule,
        denoise_fn,
        shape,
        key,
        num_steps=spec.steps,
        eta=spec.eta,
        mean_type=spec.mean_type,
        clip_denoised=spec.clip_denoised,
      )
    else:
      if timestep_map is not None:
        denoise_fn = sampling.remap_timesteps(denoise_fn, timestep_map)
      x = sampling.p_sample_loop(
        run_schedule,
        denoise_fn,
        shape,
        key,
        mean_type=spec.mean_type,
        var_type=spec.var_type,
        clip_denoised=spec.clip_denoised,
      )
    return x[0]

  return sample_one


class BatchSampler:
  """Samples images by global index with one compiled program per batch size, over local devices.

  Args:
    model: the Linen module.
    params: parameters (host or device pytree), usually the EMA parameters.
    schedule: the training schedule.
    spec: the sampler.
    image_shape: (H, W, C).
    seed: the run's seed.
    devices: local devices (default all).
  """

  def __init__(
    self,
    model: Any,
    params: Any,
    schedule: sched_lib.Schedule,
    spec: SamplerSpec,
    image_shape: Sequence[int],
    *,
    seed: int,
    devices: Sequence[Any] | None = None,
  ):
    self.devices = list(devices or jax.local_devices())
    self.image_shape = tuple(image_shape)
    self._root = jax.random.key(seed)
    self.num_classes = int(getattr(model, 'num_classes', 0))
    self.class_label = spec.class_label
    sample_one = make_image_sampler(model, schedule, spec, image_shape)

    def per_device(params, indices, labels):
      keys = jax.vmap(lambda i: jax.random.fold_in(self._root, i))(indices)
      return jax.vmap(sample_one, in_axes=(None, 0, 0))(params, keys, labels)

    self._fn = data_parallel.map_over_devices(per_device, self.devices)
    self._params = data_parallel.replicate(params, self.devices)

  def labels(self, indices: np.ndarray) -> np.ndarray | None:
    """The class of each global index (None for an unconditional model): ``class_label`` or index mod K."""
    if not self.num_classes:
      return None
    indices = np.asarray(indices, np.int64)
    if self.class_label is None:
      return (indices % self.num_classes).astype(np.int32)
    return np.full(indices.shape, self.class_label, np.int32)

  def __call__(self, indices: np.ndarray) -> np.ndarray:
    """uint8 images [len(indices), H, W, C] for the given global indices."""
    indices = np.asarray(indices, np.int64)
    n_dev = len(self.devices)
    per = math.ceil(len(indices) / n_dev)
    padded = np.concatenate([indices, np.full(per * n_dev - len(indices), indices[-1])])
    labels = self.labels(padded)
    labels = np.zeros(padded.shape, np.int32) if labels is None else labels
    out = self._fn(self._params, padded.reshape(n_dev, per).astype(np.uint32), labels.reshape(n_dev, per))
    out = np.asarray(out).reshape((-1,) + self.image_shape)[: len(indices)]
    return to_uint8(out)


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
    sampler: ``sampler(indices) -> uint8 [n, H, W, C]`` (e.g. a :class:`BatchSampler`). If it has a
      ``labels(indices)`` method returning ints (a class-conditional :class:`BatchSampler`), each shard also
      stores ``labels`` and ``grid.png`` shows one row per class.
    out_dir: output folder (created).
    num_samples: exactly how many images to produce.
    shard_size: images per shard (and per sampler call).
    image_shape: (H, W, C), to validate existing shards.
    settings: recorded in ``sampling.json``; a resumed run with different settings is refused.
    grid_size: images in ``grid.png`` (0 for none).
    progress: show a tqdm bar with ETA.

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

  bar = None
  if progress and todo:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(
      total=num_samples,
      initial=num_samples - sum(len(i) for _, i in todo),
      unit='img',
      dynamic_ncols=True,
      desc='sampling',
    )
  t0, made = time.time(), 0
  for shard, indices in todo:
    images = sampler(indices)
    path = shard_path(out_dir, shard)
    tmp = path + '.tmp.npz'
    labels = sampler.labels(indices) if hasattr(sampler, 'labels') else None
    np.savez(tmp, images=images, indices=indices, **({} if labels is None else {'labels': labels}))
    os.replace(tmp, path)
    made += len(indices)
    if bar is not None:
      bar.update(len(indices))
  if bar is not None:
    bar.close()
  wall = time.time() - t0

  if grid_size:
    from ddpm_jax import image_grid  # pylint: disable=g-import-not-at-top

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
  eta: float = 0.0,
  var_type: str | None = None,
  clip_denoised: bool | None = None,
  grid_size: int = 64,
  class_label: int | None = None,
  guidance_scale: float = 0.0,
  progress: bool = True,
) -> dict:
  """What ``sample.py`` does: load a model, validate the request, then :func:`sample_to_dir`.

  Every argument is checked before anything compiles. See ``sample.py`` for their meaning.
  """
  if (workdir is None) == (pretrained is None):
    raise errors.UserError('Pass exactly one of --workdir (a training run) and --pretrained (a released model).')
  paths.check_output_dir(out_dir, '--out')
  if num_samples < 1 or batch_size < 1:
    raise errors.UserError(f'--num_samples and --batch_size must be positive, got {num_samples} and {batch_size}.')
  if sampler not in SAMPLERS:
    raise errors.UserError(f'Unknown sampler {sampler!r}; choose one of {SAMPLERS}.')
  loaded = loading.load_model(workdir=workdir, pretrained=pretrained, step=step)
  k = getattr(loaded.model, 'num_classes', 0)
  try:  # the request's values against this model: a ValueError here is a bad flag, the user's to fix
    # A conditional model without --class_label cycles through the classes (image i gets class i mod K).
    loading.check_conditioning(loaded.model, class_label if class_label is not None or not k else 0, guidance_scale)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  # The model's own settings unless overridden; validated before anything compiles.
  spec = SamplerSpec(
    name=sampler,
    steps=steps,
    eta=eta,
    var_type=var_type or loaded.var_type,
    mean_type=loaded.mean_type,
    clip_denoised=loaded.clip_denoised if clip_denoised is None else clip_denoised,
    class_label=class_label,
    guidance_scale=guidance_scale,
  )
  try:
    spec.validate(loaded.schedule.num_timesteps)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  image_shape = (loaded.image_size, loaded.image_size, loaded.in_channels)
  settings = dict(source=loaded.source, seed=seed, sampler=dataclasses.asdict(spec), image_shape=list(image_shape))
  check_resumable(out_dir, dict(settings, num_samples=num_samples, shard_size=batch_size))  # before compiling
  logging.info('Sampling %d images from %s with %s.', num_samples, loaded.source, spec)
  batch_sampler = BatchSampler(loaded.model, loaded.params, loaded.schedule, spec, image_shape, seed=seed)
  summary = sample_to_dir(
    batch_sampler,
    out_dir,
    num_samples=num_samples,
    shard_size=batch_size,
    image_shape=image_shape,
    settings=settings,
    grid_size=grid_size,
    progress=progress,
  )
  return dict(summary, out_dir=out_dir)
