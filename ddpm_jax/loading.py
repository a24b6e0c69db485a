"""A model to sample from, whatever it came from: a training run's workdir or a released model.

Every command that uses a trained network (``sample.py``, ``evaluate.py --metric bpd``, ``figures.py``,
``edit.py``, ``export.py``) gets it as one :class:`LoadedModel`: the U-Net, its parameters, the schedule it
was trained with and its sampling settings. Where it comes from::

  load_model(workdir=, pretrained=, step=, layers=)   the commands' --workdir / --pretrained / --step / --layers
  |- load_workdir(workdir, step)                      a train.py workdir: config.json + orbax checkpoint
  '- load_pretrained(spec)                            --pretrained:
     |- load_tf_pretrained(prefix)                      a TF checkpoint prefix (formats.tf_checkpoint)
     '- load_diffusers(path_or_repo_id)                 a diffusers folder or hub id (formats.diffusers)

The file formats themselves (names, layouts, configs) live in :mod:`ddpm_jax.formats`; the released models'
expected settings in :mod:`ddpm_jax.releases`. The U-Net comes with the layers `ddpm_jax.cpu_tuning.model_layers`
chooses for the backend (the CPU layers on XLA:CPU), a workdir's ``model.layers``, or what ``layers=`` forces: the
same parameters and network either way.

Example (the functional API on a loaded model)::

  loaded = loading.load_model(pretrained='google/ddpm-cifar10-32')  # or workdir='runs/cifar10'

  @jax.jit
  def sample(params, key):
    shape = (16, loaded.image_size, loaded.image_size, loaded.in_channels)
    return sampling.p_sample_loop(loaded.schedule, loaded.denoise_fn(params), shape, key, **loaded.sample_kwargs())

  images = sample(loaded.params, jax.random.key(0))  # [16, 32, 32, 3] in [-1, 1], unclipped
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import ml_collections

from ddpm_jax import checkpoint as checkpoint_lib
from ddpm_jax import cpu_tuning, errors, guidance, releases, train_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax import schedule as sched_lib
from ddpm_jax.formats import diffusers as diffusers_format
from ddpm_jax.formats import tf_checkpoint as tf_format
from ddpm_jax.models.unet import UNet

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """A trained network with everything needed to sample from it (a plain value, not a pytree).

  Attributes:
    model: the :class:`UNet` (architecture fields from the run's config or the checkpoint's configuration).
    params: its parameter tree (numpy arrays), ``model.apply({'params': params}, x, t, train=False)``.
    schedule: the forward process it was trained with.
    var_type: reverse variance, 'fixedlarge' (sigma^2 = beta, CIFAR-10), 'fixedsmall' (beta-tilde, 256^2) or
      'learned' (the network's extra channels).
    clip_denoised: clip the x_0 estimate to [-1, 1] at every step (True for all releases).
    mean_type: network parameterization ('eps' for all releases).
    image_size: the square image side the model was trained on (attention placement depends on it).
    in_channels: image channels.
    source: human-readable origin, e.g. "runs/x step 5000 (EMA parameters)".
    config: the training config, for a model loaded from a workdir (None for released models).
  """

  model: UNet
  params: Any
  schedule: sched_lib.Schedule
  var_type: str
  clip_denoised: bool
  mean_type: str
  image_size: int
  in_channels: int
  source: str
  config: ml_collections.ConfigDict | None = None

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, params: Any, *, source: str, layers: str | None = None
  ) -> LoadedModel:
    """The model of a training config (``train_lib.build_model`` with ``layers``), ``params`` and its settings."""
    d, df = config.data, config.diffusion
    return cls(
      model=train_lib.build_model(config, layers=layers),
      params=params,
      schedule=train_lib.build_schedule(config),
      # A learned variance is part of the network; otherwise sampling uses the config's sample.var_type.
      var_type='learned' if df.var_type == 'learned' else config.sample.var_type,
      clip_denoised=config.sample.clip_denoised,
      mean_type=df.mean_type,
      image_size=d.image_size,
      in_channels=d.channels,
      source=source,
      config=config,
    )

  def denoise_fn(self, params: Any = None, *, class_label: Any = None, guidance_scale: float = 0.0):
    """``denoise_fn(x_t, t)`` for :mod:`ddpm_jax.sampling` (pass ``params`` when jitting over them).

    `ddpm_jax.guidance.denoise_fn` of this model.

    Args:
      params: parameters (default ``self.params``).
      class_label: for a class-conditional model, an int or [B] ints in 0..K-1 (the model's ``null_label()``
        for unconditional samples); must be None for an unconditional model.
      guidance_scale: classifier-free guidance weight w (conditional models only; 0 = none).
    """
    params = self.params if params is None else params
    return guidance.denoise_fn(self.model, params, class_label=class_label, guidance_scale=guidance_scale)

  def sample_kwargs(self) -> dict:
    """Keyword arguments of :func:`ddpm_jax.sampling.p_sample_loop` for this model."""
    return dict(mean_type=self.mean_type, var_type=self.var_type, clip_denoised=self.clip_denoised)


# ------------------------------------------------------------------------------------------------ workdirs


def restore_workdir(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any, int]:
  """A training run's config and one of its checkpoints.

  Args:
    workdir: a ``train.py`` workdir (holds ``config.json`` and ``checkpoints/``).
    step: checkpoint step (default: the newest readable one).

  Returns:
    ``(config, state, step)``: ``state`` is the run's ``train_lib.TrainState`` (numpy leaves; ``params`` the
    raw weights, ``ema_params`` their EMA).

  Raises:
    FileNotFoundError: no ``config.json``, no readable checkpoint, or no checkpoint ``step``.
  """
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise errors.MissingFileError(f'{config_path!r} not found: --workdir must be a train.py workdir.')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  target = train_lib.abstract_state(config)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=None)
  try:
    if step is not None and step not in ckpt.all_steps():
      raise errors.MissingFileError(
        f'No checkpoint step {step} in {ckpt.directory!r}; there are {ckpt.all_steps()}. Pass one of them to --step.'
      )
    if step is None:
      state, step = ckpt.restore_latest(target)
      if state is None:
        raise errors.MissingFileError(f'No readable checkpoint in {ckpt.directory!r}.')
    else:
      state = ckpt.restore(step, target)
    # The checkpoint's parameters must mean what config.json says (e.g. not a schedule changed afterwards).
    workdir_lib.check_checkpoint_matches(config, ckpt.metadata(step), where=f'{workdir} step {step}')
  finally:
    ckpt.close()
  return config, state, step


def load_workdir(workdir: str, step: int | None = None, *, ema: bool = True, layers: str | None = None) -> LoadedModel:
  """The EMA (or raw) parameters and settings of a training run.

  Args:
    workdir: a ``train.py`` workdir (holds ``config.json`` and ``checkpoints/``).
    step: checkpoint step (default: the newest readable one).
    ema: the EMA parameters (what the paper samples with) or, with False, the raw training weights.
    layers: the U-Net's implementation, 'auto', 'reference' or 'cpu' (`ddpm_jax.cpu_tuning.model_layers`); None:
      the run's ``config.model.layers`` ('auto' where its config has none).

  Returns:
    A :class:`LoadedModel` whose ``config`` is the run's.
  """
  config, state, step = restore_workdir(workdir, step)
  which = 'EMA' if ema else 'raw'
  return LoadedModel.from_config(
    config,
    state.ema_params if ema else state.params,
    source=f'{workdir} step {step} ({which} parameters)',
    layers=layers,
  )


def load_model(
  *, workdir: str | None = None, pretrained: str | None = None, step: int | None = None, layers: str | None = None
) -> LoadedModel:
  """A model to sample from or evaluate: a training run's EMA weights or a released model.

  Args:
    workdir: a ``train.py`` workdir (exclusive with ``pretrained``).
    pretrained: a diffusers folder or hub id, or a TF checkpoint prefix (see :func:`load_pretrained`).
    step: checkpoint step of ``workdir`` (default: the newest readable one).
    layers: the U-Net's implementation (a command's ``--layers``): 'auto' (the CPU layers on XLA:CPU, the
      reference layers elsewhere), 'reference' or 'cpu', resolved by `ddpm_jax.cpu_tuning.model_layers` (which logs
      the choice). None: the run's ``config.model.layers`` for a workdir, 'auto' for a released model.

  Raises:
    errors.UserError: not exactly one of ``workdir`` and ``pretrained``, ``step`` without a workdir, or layers this
      backend cannot run (e.g. 'cpu' on a GPU).
  """
  if (workdir is None) == (pretrained is None):
    raise errors.UserError('Pass exactly one of --workdir (a training run) and --pretrained (a released model).')
  if workdir is not None:
    return load_workdir(workdir, step, layers=layers)
  if step is not None:
    raise errors.UserError('--step applies to --workdir checkpoints only.')
  return load_pretrained(pretrained, layers='auto' if layers is None else layers)


def _with_layers(model: UNet, layers: str) -> UNet:
  """``model`` with the implementation ``layers`` resolves to on this backend (the same parameters)."""
  try:
    return model.clone(**cpu_tuning.model_layers(layers))
  except ValueError as e:
    raise errors.UserError(f'--layers: {e}') from None


# ------------------------------------------------------------------------------------------ released models


def load_pretrained(spec: str, **kwargs) -> LoadedModel:
  """What ``--pretrained SPEC`` loads: a diffusers folder or repo id, or a TF checkpoint prefix.

  A TF checkpoint (``SPEC.index`` exists) is read with :func:`load_tf_pretrained` (the settings of the release
  with its architecture unless ``release=`` names one of ``releases.RELEASES``); anything else goes to
  :func:`load_diffusers`.
  """
  if os.path.isfile(spec + '.index'):
    return load_tf_pretrained(spec, **kwargs)
  return load_diffusers(spec, **kwargs)


def load_diffusers(
  path_or_repo_id: str,
  *,
  var_type: str | None = None,
  clip_denoised: bool | None = None,
  cache_dir: str | None = None,
  allow_download: bool = True,
  layers: str = 'auto',
) -> LoadedModel:
  """Loads a diffusers-format DDPM (``UNet2DModel`` + ``DDPMScheduler``) into our U-Net and samplers.

  The scheduler config gives the schedule and sampling settings; without one, a known release's settings
  (``releases.RELEASES``) or the overrides are used.

  Args:
    path_or_repo_id: a local folder (repo-root or ``unet/`` + ``scheduler/`` layout), or a Hugging Face
      repo id such as ``google/ddpm-cifar10-32`` (downloaded with ``diffusers_format.fetch_hub`` if it is
      not a folder).
    var_type: override the variance type ('fixedlarge'/'fixedsmall'); needed when there is no
      scheduler config and the model is not a known release.
    clip_denoised: override x_0 clipping likewise.
    cache_dir: where downloads go (default: huggingface_hub's cache).
    allow_download: if False, a repo id that is not a local folder is an error.
    layers: the U-Net's implementation ('auto', 'reference' or 'cpu'; see :func:`load_model`).

  Raises:
    ValueError: unsupported folder/config, or weights that do not match (names file and tensors).
    ImportError: a download without huggingface_hub.
  """
  folder = diffusers_format.local_folder(path_or_repo_id, cache_dir=cache_dir, allow_download=allow_download)
  unet_dir, sched_path = diffusers_format.resolve_folder(folder)
  model, image_size, in_channels = diffusers_format.read_unet_config(unet_dir)

  release = releases.match_release(path_or_repo_id)
  if sched_path is not None:
    schedule, sched_var, sched_clip, mean_type = diffusers_format.read_scheduler_config(
      sched_path, ignore_variance=var_type is not None
    )
  elif release is not None or var_type is not None:
    schedule, mean_type = sched_lib.get_schedule('linear'), 'eps'
    sched_var = release.var_type if release else None
    sched_clip = release.clip_denoised if release else True
  else:
    raise ValueError(
      f'{folder}: no {diffusers_format.SCHEDULER_CONFIG} (looked in the folder and in scheduler/); pass '
      "var_type= ('fixedlarge' or 'fixedsmall') and clip_denoised= explicitly."
    )
  var_type = sched_var if var_type is None else var_type
  clip_denoised = sched_clip if clip_denoised is None else bool(clip_denoised)
  if var_type not in ('fixedlarge', 'fixedsmall'):
    raise ValueError(f"var_type must be 'fixedlarge' or 'fixedsmall'; got {var_type!r}.")
  if release is not None and (var_type, clip_denoised) != (release.var_type, release.clip_denoised):
    _log.warning(
      '%s: sampling with var_type=%s clip_denoised=%s, which differs from the release '
      'settings var_type=%s clip_denoised=%s.',
      path_or_repo_id,
      var_type,
      clip_denoised,
      release.var_type,
      release.clip_denoised,
    )

  params, files = diffusers_format.read_params(unet_dir, model, image_size, in_channels)
  source = f'diffusers {path_or_repo_id} ({", ".join(os.path.basename(f) for f in files)})'
  _log.info(
    'Loaded %s: ch=%d ch_mult=%s attn=%s, var_type=%s, clip_denoised=%s.',
    source,
    model.ch,
    model.ch_mult,
    model.attn_resolutions,
    var_type,
    clip_denoised,
  )
  return LoadedModel(
    model=_with_layers(model, layers),
    params=params,
    schedule=schedule,
    var_type=var_type,
    clip_denoised=clip_denoised,
    mean_type=mean_type,
    image_size=image_size,
    in_channels=in_channels,
    source=source,
  )


def load_tf_pretrained(
  ckpt_prefix: str, release: str | None = None, *, ema: bool = True, layers: str = 'auto'
) -> LoadedModel:
  """A TF checkpoint (the original code's, or one ``export.py --format tf`` wrote) as a :class:`LoadedModel`.

  The architecture is read off the checkpoint (``tf_format.infer_model``). The sampling settings are, in
  order: those of ``release`` (one of ``releases.RELEASES``) if given; those of the settings file that
  ``export.py`` writes beside its checkpoints (image size, GroupNorm groups, schedule, variance, clipping,
  parameterization); or those of the release with the same architecture: the CIFAR-10 settings
  (sigma^2 = beta) for ``model.ckpt-790000``, the LSUN/CelebA-HQ ones (sigma^2 = beta-tilde) for the 256x256
  checkpoints, as in the original code. A checkpoint that matches none of these samples with sigma^2 = beta
  at 32x32 and beta-tilde otherwise, with a warning.

  Args:
    ckpt_prefix: checkpoint prefix (``<prefix>.index`` exists).
    release: a repo id of ``releases.RELEASES`` whose settings to use.
    ema: load the EMA shadows (default, what the paper sampled with) or the raw weights.
    layers: the U-Net's implementation ('auto', 'reference' or 'cpu'; see :func:`load_model`).
  """
  if release is not None and release not in releases.RELEASES:
    raise ValueError(f'Unknown release {release!r}; choose one of {sorted(releases.RELEASES)}.')
  info = releases.RELEASES[release] if release is not None else None
  reader, var_shapes = tf_format.open_checkpoint(ckpt_prefix)
  settings = None if info is not None else tf_format.read_settings(ckpt_prefix)
  schedule, mean_type = sched_lib.get_schedule('linear'), 'eps'
  if settings is not None:
    model, image_size = tf_format.infer_model(
      var_shapes, image_size=settings['image_size'], num_groups=settings['num_groups'], source=ckpt_prefix
    )
    schedule, mean_type = settings['schedule'], settings['mean_type']
    var_type, clip, what = settings['var_type'], settings['clip_denoised'], f'settings of {settings["path"]}'
  else:
    image_size = info.image_size if info else None
    model, image_size = tf_format.infer_model(var_shapes, image_size=image_size, source=ckpt_prefix)
    if info is None:
      info = releases.release_for_architecture(image_size, model.ch_mult)
    if info is not None:
      var_type, clip, what = info.var_type, info.clip_denoised, f'settings of {info.repo_id}'
    else:
      var_type, clip, what = ('fixedlarge' if image_size == 32 else 'fixedsmall'), True, 'default settings'
      _log.warning(
        '%s matches no released architecture; sampling with var_type=%s and clipping.', ckpt_prefix, var_type
      )
  params = tf_format.read_params(reader, var_shapes, ckpt_prefix, model, ema=ema, image_size=image_size)
  return LoadedModel(
    model=_with_layers(model, layers),
    params=params,
    schedule=schedule,
    var_type=var_type,
    clip_denoised=clip,
    mean_type=mean_type,
    image_size=image_size,
    in_channels=var_shapes[f'{tf_format.SCOPE}/conv_in/W'][2],
    source=f'TF checkpoint {ckpt_prefix} ({"EMA" if ema else "raw"} weights, {what})',
  )
