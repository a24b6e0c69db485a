"""Training: config validation, train state, optimizer, the pure step, its data-parallel form, and the loop.

Which functions read a config (a configs/default.py tree): `validate_config`, the builders `build_schedule`,
`build_model`, `build_optimizer`, `abstract_state` and `step_settings`, and `train_and_evaluate` with its
private steps. Everything else takes explicit arguments: `train_step(state, batch, key, settings)` is pure, its
static settings one frozen `StepSettings`, with all randomness derived from ``fold_in(key, state.step)`` and each
example's global index, so that

  * a resumed run draws exactly the numbers an uninterrupted run draws, and
  * the same global batch gives the same loss and update on 1 device or on 8 (up to float summation order).

`train_and_evaluate` reads as its steps: check everything (config, hosts, workdir), open the data, lock the
workdir, restore or initialize, make the batches, loop (metrics, progress and ETA from clu's ``ReportProgress``,
checkpoints, sample grids from `ddpm_jax.batch_sampler`), log a summary.

Gradient clipping (REFERENCE §6): the original TF code clipped each TPU replica's 16-example gradient and then
averaged the 8 clipped gradients, which ties the result to the number of replicas. Here the default
(`optim.clip_groups = 0`) clips the device-averaged global gradient once, like score_sde: the result does not
depend on the hardware. `optim.clip_groups = G` reproduces the original on any hardware: the global batch is
cut into G fixed groups of consecutive examples (G = 8 for the paper's TPU v3-8), each group's mean gradient is
clipped, and the clipped gradients are averaged. See docs/training.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax import lax

from ddpm_jax import batch_sampler
from ddpm_jax import checkpoint as checkpoint_lib
from ddpm_jax import cpu_tuning
from ddpm_jax import data_parallel
from ddpm_jax import diffusion
from ddpm_jax import errors
from ddpm_jax import guidance
from ddpm_jax import image_grid
from ddpm_jax import input_pipeline
from ddpm_jax import paths
from ddpm_jax import progress as progress_lib
from ddpm_jax import schedule as schedule_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.data_parallel import AXIS, REPLICATED, SPLIT
from ddpm_jax.models import unet as unet_lib


class ConfigError(errors.UserError):
  """A config value that cannot work; the message names the value and the fix."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# ------------------------------------------------------------------------------------------------------------------
# Config validation (pure Python: runs before anything is built or compiled)
# ------------------------------------------------------------------------------------------------------------------


def validate_config(
  config: ml_collections.ConfigDict, *, device_count: int | None = None, process_count: int = 1
) -> None:
  """Checks a training config; raises `ConfigError` naming the bad value and the fix.

  Args:
    config: the full training config (configs/default.py tree).
    device_count: the global device count, or None to skip device checks.
    process_count: the number of hosts.
  """

  def fail(msg):
    raise ConfigError(msg)

  d, m, o, tr, s = config.data, config.model, config.optim, config.train, config.sample
  if d.dataset not in input_pipeline.DATASETS:
    fail(
      f'Unknown data.dataset={d.dataset!r}; choose one of {input_pipeline.DATASETS} '
      "(or 'folder' with data.folder=/path/to/images)."
    )
  if d.dataset == 'folder':
    if not d.folder:
      fail("data.dataset='folder' needs data.folder: pass --config.data.folder=/path/to/images.")
    if not os.path.isdir(d.folder):
      fail(f'data.folder={d.folder!r} does not exist or is not a directory; pass an existing folder of images.')
    if not input_pipeline.list_image_files(d.folder):
      fail(
        f'data.folder={d.folder!r} holds no {"/".join(input_pipeline.IMAGE_EXTENSIONS)} files; '
        'point it at a folder of PNG/JPEG images.'
      )
  if d.channels not in (1, 3):
    fail(f'data.channels={d.channels!r} must be 1 (grey) or 3 (RGB).')
  if d.dataset == 'digits' and d.channels != 1:
    fail(f"data.dataset='digits' is greyscale: set data.channels=1 (got {d.channels}).")
  if not isinstance(d.image_size, int) or d.image_size < 1:
    fail(f'data.image_size={d.image_size!r} must be a positive int.')
  if d.prefetch < 0:
    fail(f'data.prefetch={d.prefetch!r} must be >= 0.')
  if not d.in_memory and d.dataset not in input_pipeline.TFDS_DATASETS:
    fail(
      f'data.in_memory=False streams tfds datasets only; {d.dataset!r} is always held in memory: '
      'set data.in_memory=True.'
    )

  try:
    unet_lib.validate_unet_config(
      ch=m.ch,
      out_ch=_out_channels(d.channels, config.diffusion.var_type),
      ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions),
      dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv,
      num_groups=m.num_groups,
      dtype=m.dtype,
      remat=m.get('remat', False),
      num_classes=m.get('num_classes', 0),
    )
    unet_lib.validate_unet_input((1, d.image_size, d.image_size, d.channels), ch_mult=tuple(m.ch_mult))
  except ValueError as e:
    fail(f'model/data: {e}')
  if m.get('layers', 'auto') not in cpu_tuning.LAYER_CHOICES:
    fail(
      f'Unknown model.layers={m.layers!r}; choose one of {cpu_tuning.LAYER_CHOICES} (auto: the CPU layers when '
      'training on XLA:CPU, the reference layers elsewhere).'
    )

  if m.get('num_classes', 0):
    k = m.num_classes
    if d.dataset not in input_pipeline.LABELED_DATASETS:
      fail(
        f'model.num_classes={k} needs a labelled dataset ({sorted(input_pipeline.LABELED_DATASETS)}, a folder '
        f'with one sub-folder per class); data.dataset={d.dataset!r} has no labels. Set model.num_classes=0.'
      )
    expected = input_pipeline.LABELED_DATASETS[d.dataset]
    if d.dataset == 'folder' and d.folder and os.path.isdir(d.folder):
      expected = len(input_pipeline.folder_classes(d.folder))
    if expected is not None and k != expected:
      fail(
        f'model.num_classes={k} but data.dataset={d.dataset!r} has {expected} classes; set '
        f'model.num_classes={expected}.'
      )
    if not d.in_memory:
      fail('Class-conditional training reads labels from the in-memory path: set data.in_memory=True.')
    if not 0 <= m.class_dropout < 1:
      fail(
        f'model.class_dropout={m.class_dropout!r} must lie in [0, 1) (e.g. 0.1; 0 = no unconditional '
        'training, so no classifier-free guidance).'
      )
  try:  # the training grids' guidance: image i of a class-conditional model has class i mod K
    k = m.get('num_classes', 0)
    guidance.check_conditioning(
      k, 0 if k else None, s.get('guidance_scale', 0.0), label_name='class', scale_name='sample.guidance_scale'
    )
  except ValueError as e:
    fail(str(e))

  df = config.diffusion
  if df.beta_schedule not in schedule_lib.BETA_SCHEDULES:
    fail(f'Unknown diffusion.beta_schedule={df.beta_schedule!r}; choose one of {schedule_lib.BETA_SCHEDULES}.')
  if not isinstance(df.num_timesteps, int) or df.num_timesteps < 1:
    fail(f'diffusion.num_timesteps={df.num_timesteps!r} must be a positive int (paper: 1000).')
  try:
    diffusion.check_types(mean_type=df.mean_type, var_type=df.var_type, loss_type=df.loss_type)
    diffusion.check_types(var_type=s.var_type)
  except ValueError as e:
    fail(f'diffusion/sample: {e}')
  if (s.var_type == 'learned') != (df.var_type == 'learned'):
    fail(
      f"sample.var_type={s.var_type!r} and diffusion.var_type={df.var_type!r}: a 'learned' variance must be "
      'used for both training and sampling, or for neither.'
    )

  if not o.lr > 0:
    fail(f'optim.lr={o.lr!r} must be positive (paper: 2e-4 for CIFAR-10, 2e-5 at 256x256).')
  if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
    fail(f'optim.beta1={o.beta1!r} and optim.beta2={o.beta2!r} must lie in [0, 1) (paper: 0.9, 0.999).')
  if not o.eps > 0:
    fail(f'optim.eps={o.eps!r} must be positive (paper: 1e-8).')
  if o.warmup_steps < 0:
    fail(f'optim.warmup_steps={o.warmup_steps!r} must be >= 0 (paper: 5000; 0 disables warmup).')
  if o.grad_clip < 0:
    fail(f'optim.grad_clip={o.grad_clip!r} must be >= 0 (paper: 1.0; 0 disables clipping).')
  if not 0 <= o.ema_decay < 1:
    fail(f'optim.ema_decay={o.ema_decay!r} must lie in [0, 1) (paper: 0.9999).')
  if o.batch_size < 1:
    fail(f'optim.batch_size={o.batch_size!r} must be positive.')
  if o.clip_groups < 0 or (o.clip_groups and o.batch_size % o.clip_groups):
    fail(
      f'optim.clip_groups={o.clip_groups!r} must be 0 or divide optim.batch_size={o.batch_size} '
      '(the paper on a TPU v3-8: 8 groups of 16).'
    )
  if o.clip_groups and o.grad_clip == 0:
    fail(
      f'optim.clip_groups={o.clip_groups} clips per group, but optim.grad_clip=0 disables clipping; '
      'set optim.grad_clip > 0 or optim.clip_groups=0.'
    )

  for name in ('num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if tr[name] < 1:
      fail(f'train.{name}={tr[name]!r} must be a positive int.')
  if tr.sample_every < 0 or tr.num_samples < 0:
    fail(f'train.sample_every={tr.sample_every!r} and train.num_samples={tr.num_samples!r} must be >= 0.')

  if device_count is not None:
    if o.batch_size % device_count:
      fail(
        f'optim.batch_size={o.batch_size} is not divisible by the {device_count} devices; use a multiple of '
        f'{device_count} (e.g. {device_count * max(1, o.batch_size // device_count)}).'
      )
    if o.batch_size % process_count:
      fail(f'optim.batch_size={o.batch_size} is not divisible by the {process_count} hosts.')
    if o.clip_groups and o.clip_groups % device_count:
      fail(
        f'optim.clip_groups={o.clip_groups} must be a multiple of the {device_count} devices so that groups do '
        f'not straddle devices; use {device_count * max(1, -(-o.clip_groups // device_count))} or 0.'
      )
    if tr.num_samples % device_count:
      fail(f'train.num_samples={tr.num_samples} must be divisible by the {device_count} devices.')


def _out_channels(channels: int, var_type: str) -> int:
  return 2 * channels if var_type == 'learned' else channels


# ------------------------------------------------------------------------------------------------------------------
# State, optimizer, step
# ------------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: a pytree of arrays.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied so far.
    params: model parameters.
    ema_params: exponential moving average of params (what sampling uses).
    opt_state: optax state.
  """

  step: Any
  params: Any
  ema_params: Any
  opt_state: Any


def warmup_lr(lr: float, warmup_steps: int) -> optax.Schedule:
  """The paper's schedule: lr * min(step / warmup_steps, 1), from step 0 (the first update uses lr 0)."""
  if warmup_steps == 0:
    return optax.constant_schedule(lr)
  return optax.linear_schedule(init_value=0.0, end_value=lr, transition_steps=warmup_steps)


def make_optimizer(
  *,
  lr: float,
  warmup_steps: int,
  beta1: float = 0.9,
  beta2: float = 0.999,
  eps: float = 1e-8,
  grad_clip: float = 1.0,
  clip_in_optimizer: bool = True,
) -> optax.GradientTransformation:
  """Clip by global norm (if ``clip_in_optimizer`` and grad_clip > 0), then Adam with the warmup schedule."""
  parts = []
  if clip_in_optimizer and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adam(warmup_lr(lr, warmup_steps), b1=beta1, b2=beta2, eps=eps))
  return optax.chain(*parts)


def build_schedule(config: ml_collections.ConfigDict) -> schedule_lib.Schedule:
  """The forward process of a training config (``config.diffusion``)."""
  df = config.diffusion
  return schedule_lib.get_schedule(
    df.beta_schedule, beta_start=df.beta_start, beta_end=df.beta_end, num_timesteps=df.num_timesteps
  )


def build_model(
  config: ml_collections.ConfigDict, *, backend: str | None = None, layers: str | None = None
) -> unet_lib.UNet:
  """The U-Net of a training config (``config.model`` with the data's channels and the variance type).

  Its layers are ``layers`` if given (a command's ``--layers``), else ``config.model.layers`` ('auto' where the
  config has no such key, as older workdirs' configs), resolved for ``backend`` (default
  ``jax.default_backend()``) by `cpu_tuning.model_layers`, which logs the choice.

  Raises:
    ConfigError: for an unknown choice of layers, or 'cpu' on a backend other than the CPU.
  """
  requested, name = (config.model.get('layers', 'auto'), 'model.layers') if layers is None else (layers, '--layers')
  try:
    layer_fields = cpu_tuning.model_layers(requested, backend)
  except ValueError as e:
    raise ConfigError(f'{name}: {e}') from e
  return _unet(config, **layer_fields)


def _unet(config: ml_collections.ConfigDict, **layer_fields: Any) -> unet_lib.UNet:
  """The U-Net of ``config`` with the given implementation fields (the reference layers without any)."""
  m, d = config.model, config.data
  return unet_lib.UNet(
    ch=m.ch,
    out_ch=_out_channels(d.channels, config.diffusion.var_type),
    ch_mult=tuple(m.ch_mult),
    num_res_blocks=m.num_res_blocks,
    attn_resolutions=tuple(m.attn_resolutions),
    dropout=m.dropout,
    resamp_with_conv=m.resamp_with_conv,
    num_groups=m.num_groups,
    dtype=jnp.dtype(m.dtype),
    remat=bool(m.get('remat', False)),
    num_classes=int(m.get('num_classes', 0)),
    **layer_fields,
  )


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer of a training config (``config.optim``); clipping moves into the step with clip_groups."""
  o = config.optim
  return make_optimizer(
    lr=o.lr,
    warmup_steps=o.warmup_steps,
    beta1=o.beta1,
    beta2=o.beta2,
    eps=o.eps,
    grad_clip=o.grad_clip,
    clip_in_optimizer=o.clip_groups == 0,
  )


def abstract_state(config: ml_collections.ConfigDict, model: Any | None = None) -> TrainState:
  """Shapes and dtypes of a run's `TrainState` (``jax.ShapeDtypeStruct`` leaves), computed without any FLOPs.

  What a checkpoint of ``config``'s run is restored into (e.g. by ``sample.py``). ``model`` defaults to the
  config's U-Net with the reference layers: the parameters' shapes do not depend on the implementation.
  """
  model = _unet(config) if model is None else model
  tx = build_optimizer(config)
  d = config.data
  image_shape = (d.image_size, d.image_size, d.channels)

  def make():
    params = _init(model, image_shape, jax.random.key(0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))

  return jax.eval_shape(make)


def _init(model: Any, image_shape: tuple[int, int, int], key: jax.Array) -> Any:
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = (jnp.zeros((1,), jnp.int32),) if getattr(model, 'num_classes', 0) else ()
  return model.init({'params': key}, x, t, *y, train=False)['params']


# Compiled once per (model, image shape): a Linen module is a hashable dataclass of its fields.
_init_jit = jax.jit(_init, static_argnums=(0, 1))


def init_params(model: Any, *, image_shape: tuple[int, int, int], key: jax.Array) -> Any:
  """Initial model parameters on the host, from ``key``."""
  return jax.device_get(_init_jit(model, tuple(image_shape), key))


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """Step 0: the given params, EMA = params (TF's shadow starts at the initial values), fresh optimizer state."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))
  return jax.device_get(state)


def init_state(
  model: Any, tx: optax.GradientTransformation, *, image_shape: tuple[int, int, int], key: jax.Array
) -> TrainState:
  """Initial state on the host: `init_params` then `create_state`."""
  return create_state(init_params(model, image_shape=image_shape, key=key), tx)


@dataclasses.dataclass(frozen=True, eq=False)
class StepSettings:
  """What the train step does besides its inputs: the step's static settings, one frozen value.

  Attributes:
    model: a Linen module called as ``model.apply({'params': p}, x, t[, y], train=True, rngs={'dropout': k})``.
    schedule: the forward process.
    tx: the optimizer (includes global-norm clipping unless ``groups_per_device > 0``).
    lr_fn: the learning-rate schedule, for the metrics.
    ema_decay: EMA decay; the first update copies the params (TF: decay 1e-10 at step 0).
    mean_type, var_type, loss_type: passed to `diffusion.training_losses`.
    grad_clip: clip norm for per-group clipping (only used when ``groups_per_device > 0``).
    groups_per_device: 0 to clip in ``tx``; G/num_devices to clip each of G example groups separately.
    class_dropout: class-conditional models: each example's label is replaced by the null class with this
      probability (drawn from ``fold_in(fold_in(step_key, 3), global_example_index)``), so that one network
      learns conditional and unconditional predictions (classifier-free guidance).
  """

  model: Any
  schedule: schedule_lib.Schedule
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  ema_decay: float
  mean_type: str = 'eps'
  var_type: str = 'fixedlarge'
  loss_type: str = 'mse'
  grad_clip: float = 1.0
  groups_per_device: int = 0
  class_dropout: float = 0.0


def step_settings(
  config: ml_collections.ConfigDict,
  *,
  model: Any,
  schedule: schedule_lib.Schedule,
  tx: optax.GradientTransformation,
  device_count: int,
) -> StepSettings:
  """The step settings of a training config (``config.optim``, ``config.diffusion``, ``model.class_dropout``)."""
  o, df = config.optim, config.diffusion
  num_classes = int(config.model.get('num_classes', 0))
  return StepSettings(
    model=model,
    schedule=schedule,
    tx=tx,
    lr_fn=warmup_lr(o.lr, o.warmup_steps),
    ema_decay=o.ema_decay,
    mean_type=df.mean_type,
    var_type=df.var_type,
    loss_type=df.loss_type,
    grad_clip=o.grad_clip,
    groups_per_device=o.clip_groups // device_count if o.clip_groups else 0,
    class_dropout=float(config.model.get('class_dropout', 0.0)) if num_classes else 0.0,
  )


def train_step(
  state: TrainState, batch: Any, key: jax.Array, settings: StepSettings, *, axis_name: str = AXIS
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on this device's part of the global batch (run under `make_p_train_step`'s
  `jax.shard_map`, or `jax.pmap`, with ``axis_name``).

  Randomness: ``step_key = fold_in(key, state.step)`` is split into ``t_key``, ``noise_key``, ``dropout_key``;
  each example's t and noise come from ``fold_in(t_key / noise_key, global_example_index)``, so they do not
  depend on how the batch is spread over devices. Dropout masks use ``fold_in(dropout_key, device or group)``.

  Args:
    state: this device's replica of the state.
    batch: [b, H, W, C] float32 in [-1, 1], this device's examples (global examples d*b .. d*b+b-1); for a
      class-conditional model (``model.num_classes > 0``) a dict ``{'image': [b, H, W, C], 'label': [b] int}``.
    key: the run's training root key (the same on every device).
    settings: the model, schedule, optimizer and the rest (:class:`StepSettings`).
    axis_name: the mapped axis to average over.

  Returns:
    ``(new_state, metrics)``; metrics ``loss`` (global batch mean), ``grad_norm`` (global norm of the averaged
    gradient before clipping; with groups, the mean of the groups' norms), ``lr`` (of this update).
  """
  model, schedule = settings.model, settings.schedule
  num_classes = getattr(model, 'num_classes', 0)
  if isinstance(batch, dict):
    batch, labels = batch['image'], jnp.asarray(batch['label'], jnp.int32)
  else:
    labels = None
  if (labels is None) != (not num_classes):
    raise ValueError(
      f'model.num_classes={num_classes} needs batches of '
      + ("{'image', 'label'}" if num_classes else 'images without labels')
      + '.'
    )
  b = batch.shape[0]
  step_key = jax.random.fold_in(key, state.step)
  t_key, noise_key, dropout_key = jax.random.split(step_key, 3)
  device = lax.axis_index(axis_name)
  dropout_key = jax.random.fold_in(dropout_key, device)
  global_index = device * b + jnp.arange(b)
  num_t = schedule.num_timesteps
  t = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(t_key, i), (), 0, num_t))(global_index)
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), batch.shape[1:], batch.dtype))(
    global_index
  )
  if labels is not None:  # A separate key (not a 4-way split) keeps unconditional runs' numbers unchanged.
    label_key = jax.random.fold_in(step_key, 3)
    drop = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(label_key, i), settings.class_dropout))(
      global_index
    )
    labels = jnp.where(drop, num_classes, labels)
  else:
    labels = jnp.zeros((b,), jnp.int32)  # unused: keeps one code path for the group split below

  def loss_fn(params, x, tt, eps, rng, y):
    def denoise_fn(x_t, t_in):
      y_arg = (y,) if num_classes else ()
      return model.apply({'params': params}, x_t, t_in, *y_arg, train=True, rngs={'dropout': rng})

    losses = diffusion.training_losses(
      schedule,
      denoise_fn,
      x,
      tt,
      eps,
      mean_type=settings.mean_type,
      var_type=settings.var_type,
      loss_type=settings.loss_type,
    )
    return jnp.mean(losses)

  grad_fn = jax.value_and_grad(loss_fn)
  if settings.groups_per_device:
    g = settings.groups_per_device

    def group_grad(args):
      x, tt, eps, y, i = args
      loss, grads = grad_fn(state.params, x, tt, eps, jax.random.fold_in(dropout_key, i), y)
      norm = optax.tree.norm(grads)
      scale = jnp.minimum(1.0, settings.grad_clip / jnp.maximum(norm, 1e-30))
      return loss, jax.tree.map(lambda x: x * scale, grads), norm

    split = lambda a: a.reshape((g, b // g) + a.shape[1:])
    losses, grads, norms = lax.map(group_grad, (split(batch), split(t), split(noise), split(labels), jnp.arange(g)))
    loss = jnp.mean(losses)
    grads = jax.tree.map(lambda x: jnp.mean(x, axis=0), grads)
    grad_norm = lax.pmean(jnp.mean(norms), axis_name)
    grads = lax.pmean(grads, axis_name)
  else:
    loss, grads = grad_fn(state.params, batch, t, noise, dropout_key, labels)
    grads = lax.pmean(grads, axis_name)
    grad_norm = optax.tree.norm(grads)
  loss = lax.pmean(loss, axis_name)

  updates, opt_state = settings.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.where(state.step == 0, 0.0, settings.ema_decay).astype(jnp.float32)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': jnp.asarray(settings.lr_fn(state.step), jnp.float32)}
  return new_state, metrics


def make_p_train_step(settings: StepSettings, devices: Sequence[Any] | None = None) -> Callable:
  """The one place the step is made data-parallel: `jax.jit` of `jax.shard_map` over the devices' mesh.

  The mesh is `data_parallel.make_mesh(devices)`. The state is replicated (sharding ``P()``: every device holds
  the whole state, with no device axis; see `data_parallel.replicate`) and donated, so XLA updates the
  parameters, the Adam moments and the EMA in place (with `jax.pmap`'s leading device axis XLA copied each of
  them every step: BENCHMARKS.md). The batch is split over the devices along its leading axis; the key is the
  same on every device.

  Args:
    settings: the step's settings (:class:`StepSettings`).
    devices: the devices to run on (default: all, see `data_parallel.make_mesh`).

  Returns:
    ``p_train_step(state, batch [D, b, H, W, C], key) -> (state, metrics)`` with ``state`` as
    `data_parallel.replicate` places it and scalar metrics (the same on every device: loss and gradient are
    averaged over devices). ``batch`` is a global array placed with `data_parallel.device_sharding` (or a host
    array, for one process); a class-conditional model takes ``{'image': [D, b, H, W, C], 'label': [D, b]}``.
  """
  mesh = data_parallel.make_mesh(devices)

  def per_device(state, batch, key):
    # this device's [1, b, ...] block -> [b, ...]
    return train_step(state, jax.tree.map(lambda a: a[0], batch), key, settings)

  # check_vma=False, as jax.pmap has it: the step averages gradients with explicit pmeans (with the checks on,
  # autodiff would also sum the gradients of the replicated params). The state comes out identical on every
  # device (tests/test_train.py checks it).
  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(REPLICATED, SPLIT, REPLICATED),
      out_specs=(REPLICATED, REPLICATED),
      check_vma=False,
    ),
    donate_argnums=(0,),
  )


# ------------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------------


class _StopOnSignal:
  """Turns SIGTERM/SIGINT into a flag the loop polls (a preempted TPU VM gets SIGTERM); a second signal kills."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # Second signal: give up on the clean exit.
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.signum = signum
    logging.warning('Received %s: saving a checkpoint and stopping after this step.', signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return f'{d}d{h:02d}h{m:02d}m' if d else (f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s')


def _load_in_memory(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray | None]:
  """The training split of an in-memory config, uint8 [N, S, S, C], and its labels (class-conditional runs)."""
  d = config.data
  num_classes = int(config.model.get('num_classes', 0))
  loaded = input_pipeline.load_array(
    d.dataset,
    split=d.split,
    image_size=d.image_size,
    channels=d.channels,
    folder=d.folder,
    data_dir=d.data_dir,
    with_labels=bool(num_classes),
  )
  images, labels = loaded if num_classes else (loaded, None)
  if labels is not None and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(
      f'Labels of {d.dataset!r} span {labels.min()}..{labels.max()}, outside '
      f'0..{num_classes - 1}: set model.num_classes to the number of classes.'
    )
  logging.info(
    'Data: %d images of %s held in memory%s.',
    len(images),
    images.shape[1:],
    f', {num_classes} classes' if num_classes else '',
  )
  return images, labels


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains (or resumes) a DDPM as ``config`` says, writing everything under ``workdir``.

  Writes ``workdir/config.json`` (the resolved config), ``workdir/checkpoints/<step>`` (orbax), TensorBoard
  events in ``workdir``, and EMA sample grids ``workdir/samples/step_<step>.png``. Rerunning with the same
  workdir resumes from the newest readable checkpoint. SIGTERM/SIGINT save a checkpoint and return early.

  Everything that can be checked is checked before anything is built or written: the config, the workdir path,
  the config saved in the workdir (`ddpm_jax.workdir.check_resume`), the data (a tfds split that is not
  prepared, unreadable image files). The workdir is then locked against a second run, and ``config.json`` is
  written only after the model is built and the checkpoint restored, just before the first step: a run that
  fails at start-up leaves an existing workdir as it was.

  Args:
    config: a configs/default.py-style config.
    workdir: output folder.
    allow_config_change: resume even if the config changes what the workdir's checkpoints mean (diffusion,
      architecture, data: `ddpm_jax.workdir.IDENTITY_KEYS`); otherwise such a change is refused.

  Returns:
    A summary dict: ``start_step``, ``final_step``, ``stopped_by_signal``, ``loss`` (mean over the last log
    window), ``steps_per_sec`` (excluding compilation), ``wall_s``, ``checkpoint_dir``, ``last_checkpoint`` (its
    step, or None), ``last_samples`` (path or None).

  Raises:
    ConfigError: for an unusable config (before anything is built).
    errors.UserError: an unusable workdir, data that are missing or unreadable, a workdir of another config
      (`errors.WorkdirMismatchError`) or in use by another run (`errors.WorkdirBusyError`).
    NonFiniteLossError: when the loss becomes NaN/inf (the last good checkpoint is left intact).
  """
  t_wall = time.time()
  workdir = _check_before_anything(config, workdir, allow_config_change)
  images, labels = _open_data(config)
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.WorkdirLock(workdir) if is_chief else contextlib.nullcontext():
    run = _restore_or_init(config, workdir, allow_config_change)
    try:
      if run.start_step >= config.train.num_steps:
        logging.info(
          'Checkpoint step %d already reaches train.num_steps=%d; nothing to train.',
          run.start_step,
          config.train.num_steps,
        )
        return dict(_summary(run), wall_s=time.time() - t_wall)
      batches = _batches(config, images, labels, run)
      summary = _loop(config, workdir, run, batches, is_chief=is_chief)
    finally:
      run.ckpt.close()
  summary['wall_s'] = time.time() - t_wall
  if is_chief:
    _log_summary(config, workdir, summary)
  return summary


def _check_before_anything(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> str:
  """Set-up: the config (also against the devices and hosts), the workdir path and what the workdir holds."""
  validate_config(config)
  if config.multihost and not jax.distributed.is_initialized():
    jax.distributed.initialize()  # Cloud TPU pods and SLURM/Open MPI clusters are detected automatically.
  validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
  workdir = paths.check_output_dir(workdir, '--workdir')
  workdir_lib.check_resume(config, workdir, allow_change=allow_config_change)
  return workdir


def _open_data(config: ml_collections.ConfigDict) -> tuple[np.ndarray | None, np.ndarray | None]:
  """The data, before anything is built or written: a missing dataset or a bad image file ends the run here.

  Returns the in-memory images and labels (None for a streamed tfds split, which is only opened).
  """
  d = config.data
  if d.in_memory:
    return _load_in_memory(config)
  input_pipeline.open_tfds_split(d.dataset, d.split, d.data_dir)
  return None, None


@dataclasses.dataclass
class _Run:
  """What the loop starts from: the step's settings, the host state, its checkpoint manager and the keys."""

  settings: StepSettings
  state: TrainState
  start_step: int
  restored_step: int | None
  ckpt: checkpoint_lib.Checkpointer
  train_key: jax.Array
  sample_key: jax.Array
  data_seed: int


def _restore_or_init(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool) -> _Run:
  """Restore: the model and optimizer, and the newest readable checkpoint (or a fresh state at step 0).

  A checkpoint is restored into the state's shapes (no computation): a resumed run neither initializes nor
  compiles first. Unless ``allow_config_change``, the checkpoint must have been made with this config's identity.
  """
  d = config.data
  schedule, model, tx = build_schedule(config), build_model(config), build_optimizer(config)
  settings = step_settings(config, model=model, schedule=schedule, tx=tx, device_count=jax.device_count())
  root = jax.random.key(config.seed)
  init_key, train_key, sample_key = (jax.random.fold_in(root, i) for i in range(3))
  data_seed = int(jax.random.randint(jax.random.fold_in(root, 3), (), 0, 2**31 - 1))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=config.train.keep_checkpoints)
  try:
    latest = ckpt.latest_step()
    if latest is not None and not allow_config_change:  # what the newest checkpoint says it is
      workdir_lib.check_checkpoint_matches(config, ckpt.metadata(latest), where=f'{workdir} step {latest}')
    state, restored_step = ckpt.restore_latest(abstract_state(config, model))
    if restored_step not in (None, latest) and not allow_config_change:  # fell back to an older step
      workdir_lib.check_checkpoint_matches(
        config, ckpt.metadata(restored_step), where=f'{workdir} step {restored_step}'
      )
    if state is None:
      state = init_state(model, tx, image_shape=(d.image_size, d.image_size, d.channels), key=init_key)
    else:
      logging.info('Resuming from checkpoint step %d in %s.', restored_step, ckpt.directory)
  except BaseException:
    ckpt.close()
    raise
  logging.info('Model: %s parameters.', f'{unet_lib.count_params(state.params):,}')
  return _Run(settings, state, int(state.step), restored_step, ckpt, train_key, sample_key, data_seed)


def _batches(config: ml_collections.ConfigDict, images: Any, labels: Any, run: _Run) -> Any:
  """Data: this host's batches [local devices, b, ...] from the run's start step on, prefetched to the devices."""
  d, o = config.data, config.optim
  common = dict(
    global_batch=o.batch_size,
    seed=run.data_seed,
    start_step=run.start_step,
    random_flip=d.random_flip,
    num_local_devices=jax.local_device_count(),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  if d.in_memory:
    batches = input_pipeline.in_memory_batches(images, labels=labels, **common)
  else:
    batches = input_pipeline.tfds_stream_batches(
      d.dataset,
      split=d.split,
      image_size=d.image_size,
      channels=d.channels,
      shuffle_buffer=d.shuffle_buffer,
      data_dir=d.data_dir,
      **common,
    )
  return input_pipeline.prefetch_to_device(batches, d.prefetch, data_parallel.device_sharding())


class _LossWatch:
  """The metrics of the steps since the last check, fetched together (one host sync per log window).

  `check` raises `NonFiniteLossError` at the first step whose loss is NaN or infinite, before anything of that
  step is saved; `mean` averages the checked steps since the last log line.
  """

  def __init__(self, ckpt: checkpoint_lib.Checkpointer, checkpoint_every: int):
    self._ckpt, self._checkpoint_every = ckpt, checkpoint_every
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._window: list[dict[str, float]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def check(self, last_saved: int | None) -> None:
    host = jax.device_get([m for _, m in self._pending])
    for (step, _), m in zip(self._pending, host):
      loss = float(m['loss'])
      if not np.isfinite(loss):
        self._ckpt.wait()
        kept = (
          f'The last good checkpoint (step {last_saved}) in {self._ckpt.directory} is intact and was not overwritten'
          if last_saved is not None
          else f'No checkpoint had been written yet (the first was due at step {self._checkpoint_every})'
        )
        raise NonFiniteLossError(
          f'Loss is {loss} at step {step} (the update from state step {step} to {step + 1}); stopping. {kept}. '
          'Lower optim.lr, keep optim.grad_clip > 0, or check the data, then rerun to resume.'
        )
      self._window.append({k: float(v) for k, v in m.items()})
    self._pending.clear()

  def mean(self) -> dict[str, float] | None:
    """Mean loss and gradient norm of the checked steps since the last call, and the last learning rate."""
    if not self._window:
      return None
    scalars = {k: float(np.mean([w[k] for w in self._window])) for k in ('loss', 'grad_norm')}
    scalars['lr'] = self._window[-1]['lr']
    self._window.clear()
    return scalars


def _summary(run: _Run) -> dict[str, Any]:
  return dict(
    start_step=run.start_step,
    final_step=run.start_step,
    stopped_by_signal=None,
    loss=None,
    steps_per_sec=None,
    wall_s=None,
    checkpoint_dir=run.ckpt.directory,
    last_checkpoint=run.restored_step,
    last_samples=None,
  )


def _loop(config: ml_collections.ConfigDict, workdir: str, run: _Run, batches: Any, *, is_chief: bool) -> dict:
  """Loop: the steps, with metrics, checkpoints and sample grids on their schedules; returns the summary."""
  tr = config.train
  p_train_step = make_p_train_step(run.settings)
  # The chief shows the grids' progress from inside their compiled chains (the final grid takes a while).
  grid_bar = progress_lib.Progress(leave=False) if is_chief else None
  grid_sampler = _grid_sampler(config, run, grid_bar) if tr.num_samples else None
  input_pipeline.hide_accelerators_from_tf()  # clu imports TensorFlow (its TensorBoard writer and profiler)
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top  # TF: after hiding devices

  # TensorBoard on the chief only; the progress lines go to the log (or a tqdm bar with train.progress_bar).
  writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)) if is_chief else None
  progress = (
    periodic_actions.ReportProgress(num_train_steps=tr.num_steps, writer=writer, every_steps=tr.log_every)
    if is_chief
    else None
  )
  bar = tqdm.tqdm(total=tr.num_steps, initial=run.start_step, unit='step') if tr.progress_bar and is_chief else None
  if is_chief:  # validated, restored and about to train: now the workdir is this config's
    workdir_lib.save_config(config, workdir)
  ckpt_meta = workdir_lib.checkpoint_metadata(config)
  watch = _LossWatch(run.ckpt, tr.checkpoint_every)
  summary = _summary(run)
  rstate = data_parallel.replicate(run.state)
  run.state = None  # the devices hold the state now
  timed_from = None  # (time, step) after the first step: the speed excludes compilation
  try:
    with _StopOnSignal() as stop:
      for step in range(run.start_step, tr.num_steps):
        rstate, metrics = p_train_step(rstate, next(batches), run.train_key)
        watch.add(step, metrics)
        done = step + 1
        if timed_from is None:
          jax.block_until_ready(metrics)
          timed_from = (time.time(), done)
        if progress is not None:
          progress(done)  # steps/s and ETA in the log every train.log_every steps (clu)
        if bar is not None:
          bar.update(1)
        last = done == tr.num_steps or stop.signum is not None
        if done % tr.log_every == 0 or last:
          watch.check(summary['last_checkpoint'])
          scalars = watch.mean()
          if scalars is not None:
            summary['loss'] = scalars['loss']
            _report(done, tr.num_steps, scalars, writer, bar, is_chief)
        if done % tr.checkpoint_every == 0 or last:
          watch.check(summary['last_checkpoint'])  # never save the state of a step with a bad loss
          run.ckpt.save(done, data_parallel.unreplicate(rstate), metadata=ckpt_meta)
          summary['last_checkpoint'] = done
        if grid_sampler is not None and ((tr.sample_every and done % tr.sample_every == 0) or done == tr.num_steps):
          summary['last_samples'] = _write_grid(config, workdir, grid_sampler, done, rstate, writer, is_chief)
        if stop.signum is not None:
          summary['stopped_by_signal'] = signal.Signals(stop.signum).name
          break
      summary['final_step'] = done
  finally:
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.flush()
      writer.close()
  if done > timed_from[1]:
    summary['steps_per_sec'] = (done - timed_from[1]) / (time.time() - timed_from[0])
  return summary


def _report(step: int, num_steps: int, scalars: dict, writer: Any, bar: Any, is_chief: bool) -> None:
  """One log line (or the tqdm bar's text) and the TensorBoard scalars of a log window."""
  if writer is not None:
    writer.write_scalars(step, scalars)
  text = f'loss {scalars["loss"]:.4f} | grad_norm {scalars["grad_norm"]:.3f} | lr {scalars["lr"]:.2e}'
  if bar is not None:
    bar.set_postfix_str(text)
  elif is_chief:
    logging.info('step %d/%d | %s', step, num_steps, text)


def _grid_sampler(
  config: ml_collections.ConfigDict, run: _Run, progress: progress_lib.Progress | None
) -> batch_sampler.BatchSampler:
  """The EMA sample grids' sampler: the paper's, image i from (seed, i) alone (not the device or host count).

  ``progress``: the bar its chains report to (the chief's), or None (no callback compiled).
  """
  d = config.data
  spec = batch_sampler.SamplerSpec(
    name='ancestral',
    var_type=config.sample.var_type,
    clip_denoised=config.sample.clip_denoised,
    mean_type=config.diffusion.mean_type,
    guidance_scale=float(config.sample.get('guidance_scale', 0.0)),
  )
  image_shape = (d.image_size, d.image_size, d.channels)
  return batch_sampler.BatchSampler(
    run.settings.model,
    None,
    run.settings.schedule,
    spec,
    image_shape,
    seed=run.sample_key,
    all_processes=True,
    progress=progress,
  )


def _write_grid(config, workdir, grid_sampler, step, rstate, writer, is_chief) -> str | None:
  """Samples ``train.num_samples`` images with the EMA parameters (every host's, gathered) and saves the grid."""
  n = config.train.num_samples
  # This process's devices sample its share from the EMA parameters on the host; every host gets all images.
  params = data_parallel.unreplicate(rstate.ema_params)
  if grid_sampler.progress is None:
    samples = grid_sampler(np.arange(n), params=params)
  else:
    with grid_sampler.progress.job(grid_sampler.network_calls, f'sample grid at step {step}'):
      samples = grid_sampler(np.arange(n), params=params)
  if not is_chief:
    return None
  ncols, labels = None, grid_sampler.labels(np.arange(n))
  if labels is not None:  # image i has class i mod K: one row per class
    samples, ncols = image_grid.rows_by_class(samples, labels)
  path = image_grid.save_png(
    os.path.join(workdir, 'samples', f'step_{step:08d}.png'),
    samples,
    scale=max(1, 128 // config.data.image_size),
    ncols=ncols,
  )
  writer.write_images(step, {'ema_samples': image_grid.make_grid(samples, ncols=ncols)[None]})
  logging.info('Wrote EMA samples to %s', path)
  return path


def _log_summary(config: ml_collections.ConfigDict, workdir: str, summary: dict) -> None:
  """Summary: what the run did, where everything is, and how to resume or look at it."""
  rate, batch = summary['steps_per_sec'], config.optim.batch_size
  stopped = summary['stopped_by_signal']
  lines = [
    'Training summary',
    f'  steps        {summary["start_step"]} -> {summary["final_step"]} of {config.train.num_steps}'
    + (f' (stopped by {stopped}; rerun the same command to resume)' if stopped else ''),
    f'  last loss    {summary["loss"]:.4f}' if summary['loss'] is not None else '  last loss    n/a',
    f'  speed        {rate:.2f} steps/s, {rate * batch:.0f} images/s (excl. compilation)'
    if rate
    else '  speed        n/a',
    f'  wall time    {_fmt_duration(summary["wall_s"])}',
    f'  checkpoint   step {summary["last_checkpoint"]} in {summary["checkpoint_dir"]}',
    f'  samples      {summary["last_samples"]}',
    f'  tensorboard  tensorboard --logdir {workdir}',
  ]
  logging.info('\n%s', '\n'.join(lines))
