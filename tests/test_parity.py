"""Numerical parity with the PyTorch reference (diffusers ``UNet2DModel`` + ``DDPMScheduler``).

Needs the ``reference`` extra (torch, diffusers, safetensors); skipped without it. Every model here is
randomly initialised by diffusers, saved with ``save_pretrained``, imported with
:func:`ddpm_jax.loading.load_diffusers` and run on the same inputs.

Parity is only meaningful if the outputs are not ~0 and every parameter matters: we therefore perturb
the GroupNorm scales/offsets and all biases away from their (1, 0) / 0 initial values, so that a swapped
or dropped GroupNorm or bias mapping changes the output, and we check that the output is O(0.1-1).

Tolerances (float32, max abs difference; measured values on a 2-core Xeon in brackets): network outputs
1e-4 [CIFAR-10 model 3.0e-6 .. 3.4e-6 at t = 0, 10, 500, 999 with the reference layers, 3.1e-6 .. 3.6e-6 with
the CPU layers; 256 layout 3.7e-6]; one reverse step 1e-4 [2.4e-7 at t = 999, 5.5e-5 at t = 1]; a full 1000-step
sampling run 5e-4 on the final image [3.9e-5]. The importer builds the layers `cpu_tuning.model_layers` chooses
(the CPU layers on this XLA:CPU machine); the CIFAR-10 fixture asks for the reference layers, and
test_cifar10_outputs_match checks both.
The step difference at small t is diffusers' error, not ours: it computes beta_t as
1 - abar_t / abar_{t-1} in float32, which is off by ~1.5e-4 relative at t <= 10 (our tables are float64).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
pytest.importorskip('safetensors')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from ddpm_jax import diffusion  # pylint: disable=wrong-import-position
from ddpm_jax import loading  # pylint: disable=wrong-import-position
from ddpm_jax import sampling  # pylint: disable=wrong-import-position
from ddpm_jax.formats import diffusers as diffusers_format  # pylint: disable=wrong-import-position

OUTPUT_TOL = 1e-4
STEP_TOL = 1e-4
SAMPLE_TOL = 5e-4

# The configuration of google/ddpm-cifar10-32 (REFERENCE section 10).
CIFAR10_CONFIG = dict(
  sample_size=32,
  in_channels=3,
  out_channels=3,
  block_out_channels=(128, 256, 256, 256),
  layers_per_block=2,
  down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
  downsample_padding=0,
  flip_sin_to_cos=False,
  freq_shift=1,
  norm_num_groups=32,
  norm_eps=1e-6,
  act_fn='silu',
  attention_head_dim=None,
  mid_block_scale_factor=1,
  center_input_sample=False,
  dropout=0.1,
)

# The layout of the 256x256 releases (6 levels, attention at level 4 = 16x16 for 256 inputs), with
# fewer channels and a 64x64 input so that it runs in seconds (attention then sits at 4x4).
SMALL_256_LAYOUT = dict(
  CIFAR10_CONFIG,
  sample_size=64,
  block_out_channels=(32, 32, 64, 64, 128, 128),
  dropout=0.0,
  down_block_types=('DownBlock2D',) * 4 + ('AttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'AttnUpBlock2D') + ('UpBlock2D',) * 4,
)

# A tiny model for the sampler tests (1000 network calls on each side).
TINY = dict(
  CIFAR10_CONFIG,
  sample_size=16,
  block_out_channels=(32, 64),
  layers_per_block=1,
  dropout=0.0,
  down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
  up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
)


@pytest.fixture(scope='module', autouse=True)
def _few_threads():
  # Tests run two workers on two shared cores.
  old = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(old)


def _random_unet(config: dict, seed: int):
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:  # GroupNorm: scale 1 -> 1 + noise, offset 0 -> noise
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.1 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.05 * torch.randn_like(p))
  return model


def _scheduler(variance_type: str):
  return diffusers.DDPMScheduler(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule='linear',
    variance_type=variance_type,
    clip_sample=True,
  )


def _torch_apply(model, x_nhwc: np.ndarray, t: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), torch.from_numpy(t).long()).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _jax_apply(pre, **layer_fields):
  model = pre.model.clone(**layer_fields)  # the loader's layers unless told otherwise
  return jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False))


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
  """The CIFAR-10 model: torch reference, repo-root folder layout, imported and jitted once."""
  torch_model = _random_unet(CIFAR10_CONFIG, seed=0)
  folder = tmp_path_factory.mktemp('ddpm-cifar10-32')
  torch_model.save_pretrained(folder)
  _scheduler('fixed_large').save_pretrained(folder)  # scheduler_config.json beside config.json
  pre = loading.load_diffusers(str(folder), layers='reference')
  return torch_model, pre, _jax_apply(pre)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  torch_model = _random_unet(TINY, seed=1)
  folder = tmp_path_factory.mktemp('tiny')
  torch_model.save_pretrained(folder)
  _scheduler('fixed_large').save_pretrained(folder)
  return torch_model, loading.load_diffusers(str(folder))


def test_cifar10_state_dict_names_are_exactly_ours(cifar):
  torch_model, pre, _ = cifar
  ours = diffusers_format.to_state_dict(pre.params)
  theirs = torch_model.state_dict()
  assert set(ours) == set(theirs)
  assert len(ours) == 328
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value.numpy(), err_msg=name)


def test_cifar10_import_settings(cifar):
  _, pre, _ = cifar
  assert pre.model.ch == 128 and pre.model.ch_mult == (1, 2, 2, 2) and pre.model.num_res_blocks == 2
  assert pre.model.attn_resolutions == (16,)
  assert (pre.var_type, pre.clip_denoised, pre.mean_type, pre.image_size) == ('fixedlarge', True, 'eps', 32)
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(pre.params)) == 35_746_307


# The reference layers, and the CPU layers with the tree reductions (what sample.py computes with on XLA:CPU).
@pytest.mark.parametrize('layers', ['reference', 'cpu'])
def test_cifar10_outputs_match(cifar, layers):
  torch_model, pre, apply = cifar
  assert pre.model.layers == 'reference'  # what load_diffusers builds when told (auto: 'cpu' on this machine)
  if layers == 'cpu':
    apply = _jax_apply(pre, layers='cpu', cpu_tree_reductions=True)
  x = np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)
  t = np.array([0, 10, 500, 999], np.int32)  # one timestep per example
  ref = _torch_apply(torch_model, x, t)
  out = np.asarray(apply(pre.params, x, t))
  assert ref.std(axis=(1, 2, 3)).min() > 0.1  # not a vacuous comparison
  err = np.abs(out - ref).max(axis=(1, 2, 3))
  print(f'CIFAR-10 ({layers} layers) max abs diff per t', dict(zip(t.tolist(), err.tolist())))
  assert err.max() < OUTPUT_TOL, err


def test_256_layout_outputs_match(tmp_path):
  """Six levels, attention only at level 4, pipeline (unet/ + scheduler/) layout, fixed_small."""
  torch_model = _random_unet(SMALL_256_LAYOUT, seed=2)
  diffusers.DDPMPipeline(unet=torch_model, scheduler=_scheduler('fixed_small')).save_pretrained(tmp_path)
  pre = loading.load_diffusers(str(tmp_path))
  assert pre.model.ch_mult == (1, 1, 2, 2, 4, 4) and pre.model.attn_resolutions == (4,)
  assert (pre.var_type, pre.clip_denoised) == ('fixedsmall', True)
  assert 'up_1' in pre.params and 'attn_0' in pre.params['up_4'] and 'attn_0' not in pre.params['up_1']
  x = np.random.RandomState(1).randn(3, 64, 64, 3).astype(np.float32)
  t = np.array([0, 321, 999], np.int32)
  ref = _torch_apply(torch_model, x, t)
  out = np.asarray(_jax_apply(pre)(pre.params, x, t))
  assert ref.std(axis=(1, 2, 3)).min() > 0.1
  err = np.abs(out - ref).max()
  print('256-layout max abs diff', err)
  assert err < OUTPUT_TOL


@pytest.mark.parametrize('variance_type, var_type', [('fixed_large', 'fixedlarge'), ('fixed_small', 'fixedsmall')])
def test_one_reverse_step_matches_ddpm_scheduler(tiny, variance_type, var_type):
  torch_model, pre = tiny
  scheduler = _scheduler(variance_type)
  rng = np.random.RandomState(3)
  for t_int in (999, 500, 10, 1, 0):
    x = rng.randn(2, 16, 16, 3).astype(np.float32)
    t = np.full((2,), t_int, np.int32)
    eps_ref = torch.from_numpy(_torch_apply(torch_model, x, t).transpose(0, 3, 1, 2))
    noise = torch.randn(eps_ref.shape, generator=torch.Generator().manual_seed(t_int))
    step = scheduler.step(
      eps_ref, t_int, torch.from_numpy(x.transpose(0, 3, 1, 2)), generator=torch.Generator().manual_seed(t_int)
    )  # draws the same noise
    out = diffusion.p_mean_variance(
      pre.schedule,
      pre.denoise_fn(),
      jnp.asarray(x),
      jnp.asarray(t),
      mean_type='eps',
      var_type=var_type,
      clip_denoised=True,
    )
    # The update of sampling.p_sample, with the noise given instead of drawn from a key.
    nonzero = float(t_int != 0)
    ours = out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise.numpy().transpose(0, 2, 3, 1)
    ref = step.prev_sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
      np.asarray(out.pred_xstart), step.pred_original_sample.numpy().transpose(0, 2, 3, 1), atol=STEP_TOL
    )
    err = np.abs(np.asarray(ours) - ref).max()
    print(f'{variance_type} t={t_int} max abs diff {err:.2e}')
    assert err < STEP_TOL, (t_int, err)


def test_full_sampling_run_matches(tiny, monkeypatch):
  """Our jitted p_sample_loop vs a DDPMScheduler loop over all 1000 steps, fed the same noise.

  The noise is the one p_sample_loop derives from its key (documented there: the key is split into the
  initial-noise key and the loop key, and ``split(loop_key, T)[j]`` drives step j). diffusers draws its
  step noise with ``randn_tensor``, which we replace by a function returning that sequence.
  """
  torch_model, pre = tiny
  shape = (2, 16, 16, 3)
  key = jax.random.key(42)
  noise_key, loop_key = jax.random.split(key)
  x_init = np.asarray(jax.random.normal(noise_key, shape, jnp.float32))
  step_noise = np.asarray(
    jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(jax.random.split(loop_key, 1000))
  )

  ours = np.asarray(
    jax.jit(lambda p, k: sampling.p_sample_loop(pre.schedule, pre.denoise_fn(p), shape, k, **pre.sample_kwargs()))(
      pre.params, key
    )
  )

  calls = []

  def fake_randn(shape_, generator=None, device=None, dtype=None, **kwargs):
    del generator, device, kwargs
    j = len(calls)
    calls.append(j)
    noise = torch.from_numpy(step_noise[j].transpose(0, 3, 1, 2).copy())
    assert tuple(noise.shape) == tuple(shape_)
    return noise.to(dtype)

  monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, 'randn_tensor', fake_randn)
  scheduler = _scheduler('fixed_large')
  x = torch.from_numpy(x_init.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    for t in scheduler.timesteps:  # 999 ... 0
      eps = torch_model(x, t).sample
      x = scheduler.step(eps, t, x).prev_sample
  ref = x.numpy().transpose(0, 2, 3, 1)
  assert len(calls) == 999  # noise at t = 999 ... 1, none at t = 0
  assert ref.std() > 0.1
  err = np.abs(ours - ref).max()
  print(f'full 1000-step sampling max abs diff {err:.2e} (mean {np.abs(ours - ref).mean():.2e})')
  assert err < SAMPLE_TOL


def test_bin_weights_load_with_torch(tiny, tmp_path):
  """A folder with only diffusion_pytorch_model.bin (older releases) reads the same weights via torch."""
  torch_model, pre = tiny
  torch_model.save_pretrained(tmp_path, safe_serialization=False)
  _scheduler('fixed_large').save_pretrained(tmp_path)
  assert (tmp_path / diffusers_format.WEIGHTS_BIN).exists()
  assert not (tmp_path / diffusers_format.WEIGHTS_SAFETENSORS).exists()
  from_bin = loading.load_diffusers(str(tmp_path))
  assert diffusers_format.WEIGHTS_BIN in from_bin.source
  for a, b in zip(jax.tree.leaves(from_bin.params), jax.tree.leaves(pre.params)):
    np.testing.assert_array_equal(a, b)
