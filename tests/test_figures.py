"""The figure computations, with closed-form denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, figures, figures_lib
from ddpm_jax import schedule as sched_lib

SCHED = sched_lib.get_schedule('linear', beta_end=0.2, num_timesteps=20)


def _images(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (n, 4, 4, 3)) / 127.5 - 1, jnp.float32)


def test_forward_noising_uses_q_sample_with_shared_noise():
  x0 = _images()
  out = figures.forward_noising(SCHED, x0, jax.random.key(0), timesteps=(0, 10, 19))
  assert out.shape == (3,) + x0.shape
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  for k, t in enumerate((0, 10, 19)):
    np.testing.assert_allclose(out[k], diffusion.q_sample(SCHED, x0, jnp.full((3,), t), noise), rtol=1e-6)
  with pytest.raises(ValueError, match='20'):
    figures.forward_noising(SCHED, x0, jax.random.key(0), timesteps=(0, 20))


def test_reconstruct_with_an_exact_x0_network_is_lossless():
  x0 = _images()
  rec = figures.reconstruct(SCHED, lambda x_t, t: x0, x0, 12, jax.random.key(1), mean_type='xstart')
  np.testing.assert_allclose(rec.x_rec, x0, atol=1e-5)
  np.testing.assert_allclose(rec.l2, 0.0, atol=1e-4)
  assert not np.allclose(rec.x_t, x0)
  # A network that always says 0 reconstructs 0: distance is the images' own norm.
  zero = figures.reconstruct(SCHED, lambda x_t, t: jnp.zeros_like(x_t), x0, 12, jax.random.key(1), mean_type='xstart')
  np.testing.assert_allclose(zero.l2, jnp.sqrt(jnp.sum(x0**2, axis=(1, 2, 3))), rtol=1e-4)
  np.testing.assert_allclose(zero.rmse_255, jnp.sqrt(jnp.mean(x0**2, axis=(1, 2, 3))) * 127.5, rtol=1e-4)


def test_progressive_generation_and_interpolation_shapes():
  trace = figures.progressive_generation(SCHED, lambda x, t: 0.1 * x, (2, 4, 4, 1), jax.random.key(0), num_snapshots=4)
  np.testing.assert_array_equal(trace.t, [15, 10, 5, 0])
  with pytest.raises(ValueError, match='num_snapshots'):
    figures.progressive_generation(SCHED, lambda x, t: x, (2, 4, 4, 1), jax.random.key(0), num_snapshots=3)
  a, b = _images(2, 0), _images(2, 1)
  exact = lambda x_t, t: jnp.zeros_like(x_t) + 0.5  # x0 estimate 0.5 everywhere
  out = figures.interpolate(SCHED, exact, a, b, 10, jax.random.key(2), lambdas=(0.0, 0.5, 1.0), mean_type='xstart')
  assert out.shape == (3, 2, 4, 4, 3)
  np.testing.assert_allclose(out, 0.5, atol=1e-5)  # every chain ends at the network's x0


def test_rate_distortion_curves():
  terms = np.array([[3.0, 0.5, 0.25, 0.125]] * 2)
  mse = np.array([[0.0, 0.01, 0.04, 0.09]] * 2)
  res = diffusion.BpdResult(total_bpd=terms.sum(1) + 0.01, terms_bpd=terms, prior_bpd=np.full(2, 0.01), mse=mse)
  rd = figures.rate_distortion(res)
  np.testing.assert_allclose(rd.rate_bpd, [0.01 + 0.875, 0.01 + 0.375, 0.01 + 0.125, 0.01])
  np.testing.assert_allclose(rd.distortion_rmse, np.sqrt([0.0, 0.01, 0.04, 0.09]) * 127.5)


@pytest.mark.parametrize('name', figures_lib.FIGURES)
def test_each_figure_command_writes_its_png(tmp_path, name):
  from PIL import Image

  from ddpm_jax.models import UNet

  model = UNet(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, out_ch=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32), train=False)['params']
  images = np.random.default_rng(0).integers(0, 256, (4, 4, 4, 1)).astype(np.uint8)
  out = str(tmp_path / f'{name}.png')
  info = figures_lib.make_figure(
    name,
    model=model,
    params=params,
    schedule=SCHED,
    images=images,
    out=out,
    key=jax.random.key(1),
    sample_kwargs={},
    num_images=4,
  )
  assert info['path'] == out
  with Image.open(out) as im:
    assert im.size[0] > 32 and im.size[1] > 32
  if name == 'reconstruct':
    assert set(info['distances']) == {'t=6', 't=10', 't=20'}
  if name == 'rate_distortion':
    assert info['total_bpd'] > 0
