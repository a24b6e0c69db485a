"""The one data-parallel sampler: images by global index, any sampler of `ddpm_jax.solvers`, over local devices.

``sample.py`` (`ddpm_jax.sample_lib`), the training-time sample grids (`ddpm_jax.train_lib`) and the class-accuracy
evaluation (`ddpm_jax.evaluate_lib`) sample through `BatchSampler`; figures.py and edit.py map their own per-image
chains with the same machinery (`ddpm_jax.data_parallel.IndexedMap`). Image ``i`` draws its noise from
``fold_in(key(seed), i)`` alone, so the images do not depend on the batch size, the number of devices or
processes, or on where an interrupted run was resumed.

  spec = SamplerSpec(name='dpmpp', steps=20)                      # which sampler, validated before compiling
  sampler = BatchSampler(model, params, schedule, spec, (32, 32, 3), seed=0)
  images = sampler(np.arange(64))                                 # uint8 [64, 32, 32, 3]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ddpm_jax import data_parallel, diffusion, guidance, solvers
from ddpm_jax import progress as progress_lib
from ddpm_jax import schedule as sched_lib
from ddpm_jax.input_pipeline import to_uint8


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """Which sampler and its settings (None: the sampler's default; see `ddpm_jax.solvers.SAMPLERS`).

  Attributes:
    name: a key of `ddpm_jax.solvers.SAMPLERS`: 'ancestral' (the paper's T-step sampler), 'respaced', 'ddim' or
      one of the fast solvers ('dpmpp', 'unipc', 'euler', ...).
    steps: number of steps (None: T for the paper's three samplers, 25 for the solvers).
    spacing: step spacing (`ddpm_jax.solvers.SPACINGS`) for the samplers that take one.
    order: solver order (dpmpp, dpmpp_sde, unipc).
    variant: 'midpoint'/'heun' (dpmpp, dpmpp_sde) or 'bh1'/'bh2' (unipc).
    eta: the share of fresh noise (ddim: 0 = deterministic; euler_ancestral: 1).
    steps_offset: the 'leading' spacing's offset.
    var_type: reverse variance of 'ancestral' and 'respaced' ('fixedlarge', 'fixedsmall' or 'learned').
    clip_denoised: clip the x_0 estimate at every step (None: the sampler's default: on for the paper's three
      samplers, off for the solvers, as in diffusers).
    mean_type: the network's parameterization.
    class_label: class-conditional models only: the class of every image, or None to cycle through the
      classes by index (image i gets class i mod K). The null class K gives unconditional samples.
    guidance_scale: classifier-free guidance weight w (class-conditional models only; 0 = none).
  """

  name: str = 'ancestral'
  steps: int | None = None
  spacing: str | None = None
  order: int | None = None
  variant: str | None = None
  eta: float | None = None
  steps_offset: int = 0
  var_type: str = 'fixedlarge'
  clip_denoised: bool | None = None
  mean_type: str = 'eps'
  class_label: int | None = None
  guidance_scale: float = 0.0

  def validate(self, num_timesteps: int, num_classes: int | None = None) -> None:
    """Raises ValueError for an unusable combination (before anything compiles).

    Args:
      num_timesteps: T of the model's schedule.
      num_classes: the model's ``num_classes``, to check ``class_label`` and ``guidance_scale`` against it (None:
        only that the weight is >= 0).
    """
    solvers.validate(
      self.name,
      num_timesteps,
      steps=self.steps,
      order=self.order,
      variant=self.variant,
      spacing=self.spacing,
      eta=self.eta,
      steps_offset=self.steps_offset,
      mean_type=self.mean_type,
    )
    diffusion.check_types(var_type=self.var_type)
    if num_classes is None:
      guidance.check_guidance_scale(self.guidance_scale)
    else:  # without a class_label, image i of a class-conditional model gets class i mod K
      label = self.class_label if self.class_label is not None or not num_classes else 0
      guidance.check_conditioning(num_classes, label, self.guidance_scale)


def spec_for_model(
  loaded: Any, name: str = 'ancestral', *, var_type: str | None = None, clip_denoised: bool | None = None, **options
) -> SamplerSpec:
  """A :class:`SamplerSpec` with a loaded model's own sampling settings unless given.

  Args:
    loaded: a `ddpm_jax.loading.LoadedModel` (its ``mean_type``, ``var_type`` and ``clip_denoised``).
    name: the sampler.
    var_type: the reverse variance (None: the model's).
    clip_denoised: None: the model's setting for the paper's samplers (ancestral, respaced, ddim: they clip as the
      model was meant to be sampled), the solver's default (off, as in diffusers) for the others.
    **options: the other fields of :class:`SamplerSpec`.
  """
  info = solvers.SAMPLERS.get(name)
  if clip_denoised is None and info is not None and info.default_clip:
    clip_denoised = loaded.clip_denoised
  return SamplerSpec(
    name=name,
    var_type=var_type or loaded.var_type,
    mean_type=loaded.mean_type,
    clip_denoised=clip_denoised,
    **options,
  )


def image_fn(
  model: Any, schedule: sched_lib.Schedule, spec: SamplerSpec, image_shape: Sequence[int]
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """``sample_one(params, key, label) -> [H, W, C]``: one image in [-1, 1] (unclipped) from its own key.

  ``label`` (an int32 scalar) is the class for a class-conditional model (with ``spec.guidance_scale``) and is
  ignored by an unconditional one. `ddpm_jax.solvers.sample` of ``spec`` on a batch of one.

  Raises:
    ValueError: ``spec`` does not fit the schedule or the model (`SamplerSpec.validate`).
  """
  num_classes = int(getattr(model, 'num_classes', 0))
  spec.validate(schedule.num_timesteps, num_classes)
  shape = (1,) + tuple(image_shape)

  def sample_one(params, key, label):
    denoise_fn = guidance.denoise_fn(
      model, params, class_label=label if num_classes else None, guidance_scale=spec.guidance_scale
    )
    x = solvers.sample(
      spec.name,
      schedule,
      denoise_fn,
      shape,
      key,
      steps=spec.steps,
      order=spec.order,
      variant=spec.variant,
      spacing=spec.spacing,
      eta=spec.eta,
      steps_offset=spec.steps_offset,
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
    params: parameters (host or device pytree), usually the EMA parameters; or None if every call passes its own.
    schedule: the training schedule.
    spec: the sampler.
    image_shape: (H, W, C).
    seed: the run's seed (or a PRNG key): image i's noise comes from ``fold_in(key(seed), i)``.
    devices: this process's devices to use (default all).
    all_processes: split each call's images over all processes and gather them on every process (the training
      grids of a multi-host run); see `ddpm_jax.data_parallel.IndexedMap`.
    progress: a `ddpm_jax.progress.Progress` that counts the network calls of each call (``network_calls`` per
      call, whatever the number of images); None compiles no callback.

  Attributes:
    network_calls: network calls per call (each on all of its images at once): the unit of ``progress``.

  Raises:
    ValueError: ``spec`` does not fit the schedule or the model (before anything compiles).
  """

  def __init__(
    self,
    model: Any,
    params: Any,
    schedule: sched_lib.Schedule,
    spec: SamplerSpec,
    image_shape: Sequence[int],
    *,
    seed: int | jax.Array,
    devices: Sequence[Any] | None = None,
    all_processes: bool = False,
    progress: progress_lib.Progress | None = None,
  ):
    self.image_shape = tuple(image_shape)
    self.num_classes = int(getattr(model, 'num_classes', 0))
    self.class_label = spec.class_label
    fn = image_fn(model, schedule, spec, image_shape)  # validates spec first
    self.network_calls = solvers.network_calls(spec.name, spec.steps, schedule.num_timesteps)
    self.progress = progress
    self._map = data_parallel.IndexedMap(
      fn, params, key=seed, devices=devices, all_processes=all_processes, progress=progress
    )
    self.devices = self._map.devices

  def labels(self, indices: np.ndarray) -> np.ndarray | None:
    """The class of each global index (None for an unconditional model): ``class_label`` or index mod K."""
    if not self.num_classes:
      return None
    indices = np.asarray(indices, np.int64)
    if self.class_label is None:
      return (indices % self.num_classes).astype(np.int32)
    return np.full(indices.shape, self.class_label, np.int32)

  def __call__(self, indices: np.ndarray, *, params: Any = None) -> np.ndarray:
    """uint8 images [len(indices), H, W, C] for the given global indices (with ``params`` if given)."""
    indices = np.asarray(indices, np.int64)
    labels = self.labels(indices)
    labels = np.zeros(indices.shape, np.int32) if labels is None else labels
    return to_uint8(self._map(indices, labels, shared=params))
