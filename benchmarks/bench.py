"""Throughput, compile time and peak memory of ddpm_jax against the PyTorch peer (diffusers), side by side.

For the paper's CIFAR-10 U-Net (35,746,307 parameters) this measures, in one process:

* training: images/s for one full update (forward + MSE to the noise + backward + clip + Adam + EMA) at
  ``--batch``. JAX runs the project's own step (`train_lib.make_p_train_step`, state donated) on one device;
  with ``--steps_per_call k`` it runs k such steps per compiled call (`make_multi_step`, a `lax.scan`).
  The peer is diffusers' `UNet2DModel` with the same architecture and weights (`formats.diffusers.unet_config` /
  `to_state_dict`), train mode (dropout 0.1), torch Adam(2e-4), global-norm clipping at 1 and an
  EMA lerp under `torch.no_grad`.
* sampling: image-steps/s of the ancestral sampler (fixedlarge variance, clipped x0) at ``--batch``.
  ``--sample_steps n`` reverse steps are timed and the seconds for 256 images x 1000 steps are extrapolated
  (256 / batch x 1000 / n). JAX runs `sampling.p_sample_loop` (one `lax.scan`, compiled once per shape);
  the peer runs `UNet2DModel` in eval/no_grad + `DDPMScheduler.step` (fixed_large, clip_sample).
* compile seconds (JAX: first call minus one steady call; torch: first (warm-up) call minus one steady call),
  and peak memory (GPU: the allocator's peak; CPU: the process peak RSS during the phase minus the RSS at its
  start, from /proc/self/status VmHWM after resetting it through /proc/self/clear_refs).

For JAX it also prints the FLOP rate its programs achieved (`Result.train_tflop_s` / `sample_tflop_s`): XLA's
count of the operations of one train step (forward, backward, clipping, Adam, EMA) and of one forward pass per
reverse step, from the lowered programs (taps in the zero padding not counted), times the measured throughput;
set it against the device's peak to see how close to the hardware a run comes.

``--layers``: the U-Net's layers on the JAX side (``UNet.layers``): 'auto' (the default) chooses as the commands
do (`cpu_tuning.model_layers`: the CPU layers on XLA:CPU, the reference layers elsewhere); 'reference' and 'cpu'
force one, to see what the CPU layers buy. The choice is printed and kept in the JSON (``Result.layers``).

``--dtype bfloat16``: both sides keep float32 parameters, optimizer state and EMA and compute the network in
bfloat16: JAX with the model's ``dtype``, the peer under ``torch.autocast(dtype=torch.bfloat16)`` (its result's
notes say what dtype the peer's network output really had). With ``float32`` on a GPU each library uses its own
default matmul/conv precision (JAX: ``--matmul_precision`` sets it; PyTorch: TF32 for cuDNN convolutions, not
for matmuls).

Every timing excludes warm-up, waits for the device (`block_until_ready` / `torch.cuda.synchronize`) and is the
median of the timed repeats. Example (the CPU numbers in BENCHMARKS.md)::

  python benchmarks/bench.py --batch 32 --train_steps 3 --sample_steps 4 --rounds 3 --json out.json

``--rounds n`` repeats the whole comparison n times, the implementations alternating (each in its own process),
and reports each round's jax/torch ratio with their median and range, and the medians of every measurement: on
a machine whose speed drifts (a shared cloud VM) one round's ratio can be off by 10 % or more.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Run as a script from a checkout: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import cpu_tuning as cpu_tuning_lib
from ddpm_jax import data_parallel
from ddpm_jax import sampling
from ddpm_jax import schedule as schedule_lib
from ddpm_jax import train_lib
from ddpm_jax.formats import diffusers as diffusers_format
from ddpm_jax.models import unet as unet_lib

IMAGE_SHAPE = (32, 32, 3)
LR = 2e-4
EMA_DECAY = 0.9999
GRAD_CLIP = 1.0
# A tiny architecture for smoke tests: one level, attention only in the middle block (the smallest program that
# still has every kind of layer, so the tests' compiles are short).
TINY = dict(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=8)


@dataclasses.dataclass
class Result:
  """One implementation's measurements (None where not measured)."""

  impl: str
  device: str
  batch: int
  dtype: str
  params: int
  train_img_s: float | None = None
  train_compile_s: float | None = None
  train_peak_mb: float | None = None
  sample_img_steps_s: float | None = None
  sample_256x1000_s: float | None = None  # extrapolated from sample_steps timed steps
  sample_compile_s: float | None = None
  sample_peak_mb: float | None = None
  # JAX only: the rate its programs achieved, with XLA's count of their floating-point operations.
  train_tflop_s: float | None = None
  sample_tflop_s: float | None = None
  peak_kind: str = ''
  notes: str = ''
  layers: str | None = None  # JAX only: the U-Net's layers (UNet.layers) it ran


# The measured fields of `Result` (None where not measured).
MEASUREMENTS = (
  'train_img_s',
  'train_compile_s',
  'train_peak_mb',
  'sample_img_steps_s',
  'sample_256x1000_s',
  'sample_compile_s',
  'sample_peak_mb',
  'train_tflop_s',
  'sample_tflop_s',
)


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------


def _rss_mb(field: str) -> float | None:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


class CpuPeak:
  """Peak RSS growth of this process over a phase (MiB). Linux: VmHWM, reset via clear_refs; else ru_maxrss."""

  kind = 'CPU process peak RSS delta'

  def __enter__(self):
    try:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS
    except OSError:
      pass
    self.start = _rss_mb('VmRSS') or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return self

  def __exit__(self, *exc):
    peak = _rss_mb('VmHWM') or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    self.mb = max(0.0, peak - self.start)


def _jax_peak_mb() -> float | None:
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20
  return None


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> float:
  t0 = time.perf_counter()
  sync(fn())
  return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------------------------


def make_model(tiny: bool, *, dtype: str = 'float32', remat: bool = False, dropout: float = 0.1, layers: str = 'auto'):
  """The CIFAR-10 U-Net (or `TINY`), its layers chosen by `cpu_tuning.model_layers` from ``layers``."""
  fields = cpu_tuning_lib.model_layers(layers)
  if tiny:
    return unet_lib.UNet(**TINY, dropout=dropout, dtype=dtype, remat=remat, **fields)
  return unet_lib.unet_cifar10(dropout=dropout, dtype=dtype, remat=remat, **fields)


def make_multi_step(step_fn: Callable, k: int, devices: Sequence[Any] | None = None) -> Callable:
  """k train steps per compiled call: a `lax.scan` over k batches, data-parallel like
  `train_lib.make_p_train_step` (jit of shard_map, state replicated and donated).

  Args:
    step_fn: an unmapped step ``(state, batch, key) -> (state, metrics)``, e.g.
      ``functools.partial(train_lib.train_step, settings=train_lib.StepSettings(...))``.
    k: steps per call.
    devices: devices (default all).

  Returns:
    ``multi_step(state, batches [D, k, b, H, W, C], key) -> (state, metrics [k])``.
  """

  def many(state, batches, key):
    return lax.scan(lambda s, b: step_fn(s, b, key), state, batches[0], length=k)

  rep = data_parallel.REPLICATED
  return jax.jit(
    jax.shard_map(
      many,
      mesh=data_parallel.make_mesh(devices),
      in_specs=(rep, data_parallel.SPLIT, rep),
      out_specs=(rep, rep),
      check_vma=False,
    ),
    donate_argnums=(0,),
  )


def xla_gflop(program) -> float | None:
  """XLA's count of a lowered or compiled program's floating-point operations, in GFLOP (None where XLA gives none).

  A lowered program needs no compilation. XLA counts a loop's body once, whatever its trip count, and does not
  count the taps of a convolution that fall in its zero padding.
  """
  cost = program.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  flops = cost.get('flops') if isinstance(cost, dict) else None
  return float(flops) / 1e9 if flops else None


def bench_jax_train(model, *, batch: int, steps: int, k: int = 1) -> dict:
  """Times the project's train step (k per call) on the first local device."""
  devices = jax.local_devices()[:1]
  schedule = schedule_lib.get_schedule('linear')
  tx = train_lib.make_optimizer(lr=LR, warmup_steps=5000, grad_clip=GRAD_CLIP)
  settings = train_lib.StepSettings(
    model=model, schedule=schedule, tx=tx, lr_fn=train_lib.warmup_lr(LR, 5000), ema_decay=EMA_DECAY, grad_clip=GRAD_CLIP
  )
  state = train_lib.init_state(model, tx, image_shape=IMAGE_SHAPE, key=jax.random.key(0))
  nparams = unet_lib.count_params(state.params)
  state = data_parallel.replicate(state, devices)
  rng = np.random.default_rng(0)
  sharding = data_parallel.device_sharding(devices)
  if k == 1:
    step = train_lib.make_p_train_step(settings, devices=devices)
    shape = (1, batch) + IMAGE_SHAPE
  else:
    step = make_multi_step(functools.partial(train_lib.train_step, settings=settings), k, devices)
    shape = (1, k, batch) + IMAGE_SHAPE
  data = jax.device_put(rng.uniform(-1, 1, shape).astype(np.float32), sharding)
  key = jax.random.key(1)
  sync = lambda out: jax.block_until_ready(out)
  holder = {'state': state}

  def call():
    holder['state'], holder['metrics'] = step(holder['state'], data, key)
    return holder['metrics']

  with CpuPeak() as mem:
    first = _timed(call, sync)
    times = [_timed(call, sync) for _ in range(max(1, steps))]
  med = statistics.median(times)
  loss = float(np.asarray(holder['metrics']['loss']).ravel()[-1])
  if not np.isfinite(loss):
    raise FloatingPointError(f'non-finite loss {loss} in the JAX train step')
  # One step's operations (forward, backward, clipping, Adam, EMA), counted on the single-step program.
  one_batch = jax.ShapeDtypeStruct((1, batch) + IMAGE_SHAPE, jnp.float32, sharding=sharding)
  gflop = xla_gflop(train_lib.make_p_train_step(settings, devices=devices).lower(holder['state'], one_batch, key))
  img_s = batch * k / med
  return dict(
    img_s=img_s,
    compile_s=max(0.0, first - med),
    peak_mb=_jax_peak_mb() or mem.mb,
    params=nparams,
    times=times,
    tflop_s=gflop and gflop / batch * img_s / 1e3,
  )


def bench_jax_sample(model, params, *, batch: int, steps: int, repeats: int = 2) -> dict:
  """Times ``steps`` reverse steps of `p_sample_loop` (fixedlarge, clipped), compiled once for this shape."""
  schedule = schedule_lib.get_schedule('linear')
  shape = (batch,) + IMAGE_SHAPE

  @jax.jit
  def run(params, key):
    def denoise_fn(x_t, t):
      return model.apply({'params': params}, x_t, t, train=False)

    x_init = jax.random.normal(jax.random.fold_in(key, 1), shape)
    # start_t = steps - 1 runs exactly `steps` network evaluations; their cost does not depend on t.
    return sampling.p_sample_loop(
      schedule,
      denoise_fn,
      shape,
      key,
      mean_type='eps',
      var_type='fixedlarge',
      clip_denoised=True,
      x_init=x_init,
      start_t=steps - 1,
    )

  params = jax.device_put(params)
  key = jax.random.key(2)
  sync = jax.block_until_ready
  with CpuPeak() as mem:
    first = _timed(lambda: run(params, key), sync)
    times = [_timed(lambda: run(params, key), sync) for _ in range(max(1, repeats))]
  med = statistics.median(times) / steps
  # Each reverse step is one forward pass of the network plus a few element-wise operations on the images.
  x, t = jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32)
  gflop = xla_gflop(jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False)).lower(params, x, t))
  return dict(
    img_steps_s=batch / med,
    s_256x1000=med * 1000 * 256 / batch,
    compile_s=max(0.0, first - med * steps),
    peak_mb=_jax_peak_mb() or mem.mb,
    times=times,
    tflop_s=gflop and gflop / med / 1e3,
  )


# ----------------------------------------------------------------------------------------------------------------
# PyTorch peer
# ----------------------------------------------------------------------------------------------------------------


def _torch_model(model, params):
  import torch
  from diffusers import UNet2DModel

  config = diffusers_format.unet_config(model, IMAGE_SHAPE[0])
  config = {k: v for k, v in config.items() if not k.startswith('_')}
  net = UNet2DModel(**config)
  state_dict = {k: torch.from_numpy(np.array(v)) for k, v in diffusers_format.to_state_dict(params).items()}
  net.load_state_dict(state_dict, strict=True)
  return net


def bench_torch(model, params, *, batch: int, train_steps: int, sample_steps: int, dtype: str = 'float32') -> dict:
  """The peer: diffusers UNet2DModel with our architecture and weights.

  With ``dtype='bfloat16'`` its forward passes run under ``torch.autocast(..., dtype=torch.bfloat16)``: float32
  parameters, optimizer and EMA, bfloat16 compute (PyTorch's mixed precision, as ddpm_jax's ``--dtype bfloat16``);
  the loss and the sampler's update stay float32. ``compute_dtype`` in the result is the dtype the network's
  output actually had.
  """
  import torch
  from diffusers import DDPMScheduler

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  cuda = torch.cuda.is_available()
  dev = torch.device('cuda' if cuda else 'cpu')
  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"bench_torch: dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
  amp = functools.partial(torch.autocast, dev.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
  net = _torch_model(model, params).to(dev)
  nparams = sum(p.numel() for p in net.parameters())
  sched = DDPMScheduler(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule='linear',
    variance_type='fixed_large',
    clip_sample=True,
  )
  out = dict(params=nparams)

  def peak(fn):
    if cuda:
      torch.cuda.reset_peak_memory_stats()
      r = fn()
      return r, torch.cuda.max_memory_allocated() / 2**20
    with CpuPeak() as mem:
      r = fn()
    return r, mem.mb

  if train_steps:
    ema = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    x0 = torch.rand((batch, 3) + IMAGE_SHAPE[:2], device=dev) * 2 - 1
    acp = sched.alphas_cumprod.to(dev)
    net.train()

    def step():
      t = torch.randint(0, 1000, (batch,), device=dev)
      noise = torch.randn_like(x0)
      a = acp[t].view(-1, 1, 1, 1)
      x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
      with amp():
        pred = net(x_t, t).sample
      out['compute_dtype'] = str(pred.dtype)
      loss = torch.nn.functional.mse_loss(pred.float(), noise)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
      opt.step()
      with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - EMA_DECAY)
      return loss

    def run():
      first = _timed(step, sync)
      return first, [_timed(step, sync) for _ in range(max(1, train_steps))]

    (first, times), mb = peak(run)
    med = statistics.median(times)
    out.update(train_img_s=batch / med, train_compile_s=max(0.0, first - med), train_peak_mb=mb, train_times=times)
    del opt, ema

  if sample_steps:
    net.eval()
    sched.set_timesteps(1000)
    gen = torch.Generator(device=dev).manual_seed(0)

    def run():
      x = torch.randn((batch, 3) + IMAGE_SHAPE[:2], generator=gen, device=dev)
      times = []
      with torch.inference_mode():
        for i, t in enumerate(sched.timesteps[: sample_steps + 1]):  # the first is warm-up
          t0 = time.perf_counter()
          with amp():
            eps = net(x, t.to(dev)).sample
          out['compute_dtype'] = str(eps.dtype)
          x = sched.step(eps.float(), t, x, generator=gen).prev_sample
          sync(x)
          times.append(time.perf_counter() - t0)
      return times

    times, mb = peak(run)
    med = statistics.median(times[1:])
    out.update(
      sample_img_steps_s=batch / med,
      sample_256x1000_s=med * 1000 * 256 / batch,
      sample_compile_s=max(0.0, times[0] - med),
      sample_peak_mb=mb,
      sample_times=times[1:],
    )
  return out


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def environment() -> dict:
  info = dict(
    python=platform.python_version(),
    jax=jax.__version__,
    backend=jax.default_backend(),
    device=str(jax.local_devices()[0].device_kind),
    cpu_count=os.cpu_count(),
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
    matmul_precision=str(jax.config.jax_default_matmul_precision),
  )
  try:
    import flax

    info['flax'] = flax.__version__
  except ImportError:
    pass
  try:
    import torch
    import diffusers

    info.update(torch=torch.__version__, diffusers=diffusers.__version__, torch_threads=torch.get_num_threads())
  except ImportError:
    pass
  return info


def run(
  *,
  batch: int = 32,
  train_steps: int = 3,
  sample_steps: int = 4,
  sample_repeats: int = 2,
  dtype: str = 'float32',
  impls: Sequence[str] = ('jax', 'torch'),
  remat: bool = False,
  steps_per_call: int = 1,
  tiny: bool = False,
  layers: str = 'auto',
) -> list[Result]:
  """Runs the benchmark; returns one `Result` per implementation (JAX first)."""
  results = []
  model = make_model(tiny, dtype=dtype, remat=remat, layers=layers)
  params = train_lib.init_params(model, image_shape=IMAGE_SHAPE, key=jax.random.key(0))
  nparams = unet_lib.count_params(params)
  on_gpu = jax.default_backend() != 'cpu'
  if 'jax' in impls:
    print(f'JAX U-Net layers: {model.layers!r} (--layers {layers}; cpu_tree_reductions={model.cpu_tree_reductions})')
    r = Result(
      'jax',
      jax.local_devices()[0].device_kind,
      batch,
      dtype,
      nparams,
      peak_kind='device peak_bytes_in_use' if on_gpu else CpuPeak.kind,
      notes=(
        f'remat={remat} steps_per_call={steps_per_call} layers={model.layers} '
        f'cpu_tree_reductions={model.cpu_tree_reductions} XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}'
      ),
      layers=model.layers,
    )
    if train_steps:
      tr = bench_jax_train(model, batch=batch, steps=train_steps, k=steps_per_call)
      r.train_img_s, r.train_compile_s, r.train_peak_mb = tr['img_s'], tr['compile_s'], tr['peak_mb']
      r.train_tflop_s = tr['tflop_s']
    if sample_steps:
      sm = bench_jax_sample(model, params, batch=batch, steps=sample_steps, repeats=sample_repeats)
      r.sample_img_steps_s, r.sample_256x1000_s = sm['img_steps_s'], sm['s_256x1000']
      r.sample_compile_s, r.sample_peak_mb = sm['compile_s'], sm['peak_mb']
      r.sample_tflop_s = sm['tflop_s']
    results.append(r)
  if 'torch' in impls:
    import torch

    th = bench_torch(model, params, batch=batch, train_steps=train_steps, sample_steps=sample_steps, dtype=dtype)
    if th['params'] != nparams:
      raise AssertionError(f'torch peer has {th["params"]} parameters, ddpm_jax {nparams}: not the same model')
    cuda = torch.cuda.is_available()
    r = Result(
      'torch',
      torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu',
      batch,
      dtype,
      th['params'],
      peak_kind='torch.cuda.max_memory_allocated' if cuda else CpuPeak.kind,
      notes=f'threads={torch.get_num_threads()} compute={th.get("compute_dtype")}',
    )
    for f in MEASUREMENTS:
      setattr(r, f, th.get(f))
    results.append(r)
  return results


def _fmt(v, spec):
  return '-' if v is None else format(v, spec)


def table(results: Sequence[Result]) -> str:
  """One text table; a last row 'jax/torch' gives the throughput ratios when both ran."""
  head = (
    'impl',
    'train img/s',
    'sample img-step/s',
    's/256x1000 (extrap.)',
    'compile s (train/sample)',
    'peak MiB (train/sample)',
  )
  rows = []
  for r in results:
    rows.append(
      (
        r.impl,
        _fmt(r.train_img_s, '.3f'),
        _fmt(r.sample_img_steps_s, '.2f'),
        _fmt(r.sample_256x1000_s, '.0f'),
        f'{_fmt(r.train_compile_s, ".1f")}/{_fmt(r.sample_compile_s, ".1f")}',
        f'{_fmt(r.train_peak_mb, ".0f")}/{_fmt(r.sample_peak_mb, ".0f")}',
      )
    )
  by = {r.impl: r for r in results}
  if 'jax' in by and 'torch' in by:
    j, t = by['jax'], by['torch']
    ratio = lambda a, b: None if a is None or b is None or b == 0 else a / b
    times = lambda v: '-' if v is None else format(v, '.2f') + 'x'
    rows.append(
      (
        'jax/torch',
        times(ratio(j.train_img_s, t.train_img_s)),
        times(ratio(j.sample_img_steps_s, t.sample_img_steps_s)),
        times(ratio(j.sample_256x1000_s, t.sample_256x1000_s)) + ' (time)',
        '',
        '',
      )
    )
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  line = lambda cells: ' | '.join(str(c).ljust(w) for c, w in zip(cells, widths))
  out = [line(head), '-+-'.join('-' * w for w in widths)] + [line(r) for r in rows]
  kinds = sorted({r.peak_kind for r in results})
  out.append(f'peak memory: {"; ".join(kinds)}. s/256x1000 is extrapolated from the timed reverse steps.')
  if 'jax' in by and (by['jax'].train_tflop_s or by['jax'].sample_tflop_s):
    j = by['jax']
    out.append(
      f"ddpm_jax achieved (XLA's count of its programs' FLOPs): training {_fmt(j.train_tflop_s, '.3f')} "
      f'TFLOP/s, sampling {_fmt(j.sample_tflop_s, ".3f")} TFLOP/s.'
    )
  return '\n'.join(out)


def _merge(a: Result, b: Result) -> Result:
  """``a`` with the measurements it lacks taken from ``b`` (the same implementation, another phase)."""
  fields = {
    f.name: getattr(a, f.name) if getattr(a, f.name) is not None else getattr(b, f.name)
    for f in dataclasses.fields(Result)
  }
  fields['notes'] = '; '.join(n for n in (a.notes, b.notes) if n)
  return Result(**fields)


def run_isolated(argv: Sequence[str], impls: Sequence[str], *, cpu_tuning: str = 'auto') -> list[Result]:
  """Runs each implementation in its own Python process and collects the results.

  In one process the second framework is measured next to the first one's idle thread pool (XLA's CPU
  workers spin after each call): measured here, the torch peer ran 18x slower after a JAX run in the same
  process. A fresh process per implementation also gives each its own peak-RSS baseline. With
  ``cpu_tuning='auto'`` JAX's training and sampling run in separate processes too, each with the XLA:CPU
  setting the commands use for it (``ddpm_jax.cpu_tuning``: train.py 'train', sample.py 'inference'). Unless
  ``cpu_tuning='none'`` the JAX processes start with glibc's malloc set as the commands set it
  (`cpu_tuning.malloc_tuning_env`: transparent huge pages on CPU hosts); the peer with this process's.
  """
  import subprocess
  import tempfile

  jobs = []  # (impl, extra argv)
  for impl in impls:
    if impl == 'jax' and cpu_tuning == 'auto':
      jobs += [
        ('jax', ['--sample_steps', '0', '--cpu_tuning', 'train']),
        ('jax', ['--train_steps', '0', '--cpu_tuning', 'inference']),
      ]
    else:
      jobs.append((impl, ['--cpu_tuning', cpu_tuning] if impl == 'jax' else []))
  results: dict[str, Result] = {}
  for impl, extra in jobs:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'r.json')
      cmd = [sys.executable, os.path.abspath(__file__), *argv, *extra, '--impl', impl, '--json', out, '--in_process']
      # The child chooses its own XLA:CPU setting: it starts from the user's XLA_FLAGS, not this process's.
      env = dict(os.environ, XLA_FLAGS=cpu_tuning_lib.user_xla_flags())
      if impl == 'jax' and cpu_tuning != 'none':  # and malloc as the commands start it (huge pages on CPU hosts)
        env = cpu_tuning_lib.malloc_tuning_env(env) or env
      subprocess.run(cmd, check=True, env=env)
      with open(out) as f:
        for r in json.load(f)['results']:
          r = Result(**r)
          results[impl] = _merge(results[impl], r) if impl in results else r
  return list(results.values())


def median_over_rounds(rounds: Sequence[Sequence[Result]]) -> list[Result]:
  """One `Result` per implementation whose measurements are the medians over ``rounds`` (each a `run` result)."""
  out = []
  for impl in [r.impl for r in rounds[0]]:
    mine = [r for rnd in rounds for r in rnd if r.impl == impl]
    fields = {
      f: statistics.median(v) if (v := [getattr(r, f) for r in mine if getattr(r, f) is not None]) else None
      for f in MEASUREMENTS
    }
    out.append(dataclasses.replace(mine[0], **fields, notes=f'median of {len(mine)} rounds; {mine[0].notes}'))
  return out


def ratios_over_rounds(rounds: Sequence[Sequence[Result]]) -> dict[str, list[float]]:
  """The jax/torch throughput ratio of each round (train and sample), where both were measured."""
  out = {'train': [], 'sample': []}
  for rnd in rounds:
    by = {r.impl: r for r in rnd}
    if 'jax' not in by or 'torch' not in by:
      continue
    for name, f in (('train', 'train_img_s'), ('sample', 'sample_img_steps_s')):
      j, t = getattr(by['jax'], f), getattr(by['torch'], f)
      if j is not None and t:
        out[name].append(j / t)
  return out


def rounds_summary(rounds: Sequence[Sequence[Result]]) -> str:
  """Each round's jax/torch ratios and their median and range: the figure to quote on a noisy machine."""
  lines = [f'{len(rounds)} rounds (jax and torch alternating, each in its own process); jax/torch per round:']
  for name, rs in ratios_over_rounds(rounds).items():
    if rs:
      lines.append(
        f'  {name}: '
        + ' '.join(f'{r:.2f}x' for r in rs)
        + f'  -> median {statistics.median(rs):.2f}x, range {min(rs):.2f}-{max(rs):.2f}x'
      )
  return '\n'.join(lines)


def _strip(argv: Sequence[str], names: Sequence[str]) -> list[str]:
  """argv without the given options (and their values)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    name = a.split('=', 1)[0]
    if name in names:
      skip = '=' not in a
      continue
    out.append(a)
  return out


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--train_steps', type=int, default=3, help='timed train calls (after one warm-up); 0 skips')
  p.add_argument(
    '--sample_steps', type=int, default=4, help='reverse steps per timed sampling call, extrapolated to 1000; 0 skips'
  )
  p.add_argument('--sample_repeats', type=int, default=2, help='timed JAX sampling calls (after one warm-up)')
  p.add_argument(
    '--dtype',
    default='float32',
    choices=('float32', 'bfloat16'),
    help='compute dtype, parameters float32: JAX computes in it, the peer under torch.autocast',
  )
  p.add_argument('--impl', default='jax,torch')
  p.add_argument('--remat', action='store_true')
  p.add_argument('--steps_per_call', type=int, default=1)
  p.add_argument('--tiny', action='store_true', help='tiny model (smoke test)')
  p.add_argument('--matmul_precision', default=None, help="jax_default_matmul_precision, e.g. 'bfloat16'")
  p.add_argument(
    '--layers',
    default='auto',
    choices=cpu_tuning_lib.LAYER_CHOICES,
    help="the U-Net's layers on the JAX side: 'auto' = as the commands choose (cpu on XLA:CPU, reference "
    'elsewhere); reference or cpu to force one',
  )
  p.add_argument(
    '--cpu_tuning',
    default='auto',
    choices=('auto', 'train', 'inference', 'none'),
    help="XLA:CPU setting (ddpm_jax.cpu_tuning): 'auto' = what train.py / sample.py use for each phase",
  )
  p.add_argument(
    '--in_process',
    action='store_true',
    help='measure every impl in this process (default: a subprocess per impl, and per JAX phase with '
    '--cpu_tuning auto, started with the CPU settings of the commands; in-process with '
    '--cpu_tuning none and one impl)',
  )
  p.add_argument(
    '--rounds',
    type=int,
    default=1,
    help='repeat the whole comparison this many times, the implementations alternating, and report '
    'medians and the ratio of each round (for machines whose speed drifts)',
  )
  p.add_argument('--json', default=None, help='write results + environment here')
  a = p.parse_args(argv)
  if a.rounds < 1:
    p.error(f'--rounds must be at least 1, got {a.rounds}')
  if a.rounds > 1 and a.in_process:
    p.error('--rounds runs each implementation in its own process; drop --in_process')
  impls = [s.strip() for s in a.impl.split(',') if s.strip()]
  bad = set(impls) - {'jax', 'torch'}
  if bad:
    p.error(f'unknown --impl {sorted(bad)}; use jax, torch or jax,torch')
  # A JAX run with the commands' CPU settings needs a fresh process: glibc reads its malloc tunables at start-up.
  isolated = not a.in_process and (len(impls) > 1 or a.cpu_tuning != 'none')
  if not isolated and a.cpu_tuning != 'none':  # before anything starts JAX's backends
    phase = a.cpu_tuning if a.cpu_tuning != 'auto' else ('train' if a.train_steps else 'inference')
    cpu_tuning_lib.tune_cpu(phase)
  if a.matmul_precision:
    jax.config.update('jax_default_matmul_precision', a.matmul_precision)
  env = environment()
  if a.layers == 'cpu' and env['backend'] != 'cpu':  # before any child process starts or anything compiles
    p.error(
      f'--layers cpu: the CPU layers are for XLA:CPU, and JAX runs on {env["backend"]!r} here; use auto or reference'
    )
  print('environment:', json.dumps(env), flush=True)
  print('command:', ' '.join(['python', sys.argv[0]] + argv), f'| load average {os.getloadavg()}', flush=True)
  t0 = time.time()
  load0 = os.getloadavg()
  rounds = []
  if isolated or a.rounds > 1:
    child_argv = _strip(argv, ('--impl', '--json', '--in_process', '--cpu_tuning', '--rounds'))
    for i in range(a.rounds):
      rounds.append(run_isolated(child_argv, impls, cpu_tuning=a.cpu_tuning))
      if a.rounds > 1:
        print(f'round {i + 1} of {a.rounds}:', table(rounds[-1]), sep='\n', flush=True)
    results = median_over_rounds(rounds) if a.rounds > 1 else rounds[0]
    if a.rounds > 1:
      print(rounds_summary(rounds), 'medians over the rounds:', sep='\n')
  else:
    results = run(
      batch=a.batch,
      train_steps=a.train_steps,
      sample_steps=a.sample_steps,
      sample_repeats=a.sample_repeats,
      dtype=a.dtype,
      impls=impls,
      remat=a.remat,
      steps_per_call=a.steps_per_call,
      tiny=a.tiny,
      layers=a.layers,
    )
  print(table(results), flush=True)
  print(f'total wall time {time.time() - t0:.0f} s; load average at start {load0}, at end {os.getloadavg()}')
  if a.json:
    with open(a.json, 'w') as f:
      extra = {}
      if a.rounds > 1:
        extra = dict(
          rounds=[[dataclasses.asdict(r) for r in rnd] for rnd in rounds], ratios_per_round=ratios_over_rounds(rounds)
        )
      json.dump(
        dict(
          environment=env,
          argv=argv,
          loadavg_start=load0,
          loadavg_end=os.getloadavg(),
          results=[dataclasses.asdict(r) for r in results],
          **extra,
        ),
        f,
        indent=1,
      )
  return results


if __name__ == '__main__':
  main()
