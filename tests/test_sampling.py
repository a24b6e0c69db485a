"""The ancestral sampler, checked without any training via denoisers that are optimal in closed form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling
from ddpm_jax import schedule as sched_lib

SCHED = sched_lib.get_schedule('linear')
TABLES = sched_lib.schedule_tables(sched_lib.get_beta_schedule('linear'))
MU, S = 0.2, 0.3  # data distribution N(MU, S^2) per pixel


def gaussian_eps(x_t, t):
  """E[eps | x_t] when x_0 ~ N(MU, S^2): the optimal eps-network for Gaussian data."""
  abar = diffusion.extract(SCHED.alphas_cumprod, t, x_t.ndim)
  return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)


def two_point_eps(x_t, t):
  """E[eps | x_t] when x_0 is -0.5 or +0.5 with equal probability."""
  abar = diffusion.extract(SCHED.alphas_cumprod, t, x_t.ndim)
  x0_mean = 0.5 * jnp.tanh(0.5 * jnp.sqrt(abar) * x_t / (1 - abar))
  return diffusion.predict_eps_from_xstart(SCHED, x_t, t, x0_mean)


def exact_sampler_moments(var_type, tb=TABLES):
  """Mean and variance of the sampler's output for Gaussian data, by a float64 linear recursion.

  With the Gaussian-optimal network and no clipping each reverse step is x <- a x + b + sigma z, so the
  output is Gaussian with moments that follow m <- a m + b, v <- a^2 v + sigma^2 from (0, 1).
  """
  m, v = 0.0, 1.0
  for i in range(len(tb['betas']) - 1, -1, -1):
    abar = tb['alphas_cumprod'][i]
    k = np.sqrt(1 - abar) / (abar * S**2 + 1 - abar)  # eps = k (x - sqrt(abar) MU)
    # x0_hat = r x - rm1 eps ; mean = c1 x0_hat + c2 x
    r, rm1 = tb['sqrt_recip_alphas_cumprod'][i], tb['sqrt_recipm1_alphas_cumprod'][i]
    x0_a, x0_b = r - rm1 * k, rm1 * k * np.sqrt(abar) * MU
    a = tb['posterior_mean_coef1'][i] * x0_a + tb['posterior_mean_coef2'][i]
    b = tb['posterior_mean_coef1'][i] * x0_b
    log_var = (tb['fixedlarge_log_variance'] if var_type == 'fixedlarge' else tb['posterior_log_variance_clipped'])[i]
    sigma2 = np.exp(log_var) if i > 0 else 0.0
    m, v = a * m + b, a * a * v + sigma2
  return m, v


@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall'])
def test_sampler_matches_exact_output_distribution_for_gaussian_data(var_type):
  shape = (256, 8, 8, 1)  # 16,384 independent pixels
  run = jax.jit(
    functools.partial(sampling.p_sample_loop, SCHED, gaussian_eps, shape, var_type=var_type, clip_denoised=False)
  )
  x = np.asarray(run(jax.random.key(0)), np.float64)
  m, v = exact_sampler_moments(var_type)
  n = x.size
  # The recursion is the sampler's exact law: agree within Monte Carlo error (5 standard errors).
  assert abs(x.mean() - m) < 5 * np.sqrt(v / n)
  assert abs(x.var() - v) < 5 * v * np.sqrt(2 / n)
  # And the sampler reproduces the data distribution (T = 1000 makes the fixed variances accurate).
  np.testing.assert_allclose(m, MU, atol=2e-3)
  np.testing.assert_allclose(np.sqrt(v), S, rtol=0.03)


def test_sampler_recovers_a_two_point_distribution_with_clipping():
  shape = (512, 4, 4, 1)
  x = np.asarray(jax.jit(functools.partial(sampling.p_sample_loop, SCHED, two_point_eps, shape))(jax.random.key(1)))
  assert np.all(np.abs(x) <= 1.0 + 1e-6)  # clipped x0 and no noise at the last step
  near_plus = np.abs(x - 0.5) < 0.05
  near_minus = np.abs(x + 0.5) < 0.05
  assert near_plus.mean() + near_minus.mean() > 0.99  # mass sits on the two atoms
  assert abs(near_plus.mean() - 0.5) < 0.03  # with equal weights (8,192 pixels: se 0.0055)


def test_final_step_adds_no_noise():
  """With a network that always predicts x0 = 0.25 the last step returns exactly c1_0 * 0.25 = 0.25."""
  sched = sched_lib.get_schedule('linear', num_timesteps=20)
  const_x0 = lambda x_t, t: jnp.full_like(x_t, 0.25)
  x = sampling.p_sample_loop(sched, const_x0, (4, 2, 2, 3), jax.random.key(0), mean_type='xstart')
  np.testing.assert_allclose(x, 0.25, atol=1e-6)


def test_trace_snapshots_and_determinism():
  sched = sched_lib.get_schedule('linear', beta_end=0.2, num_timesteps=20)
  denoise = lambda x_t, t: 0.1 * x_t
  shape = (3, 4, 4, 2)
  key = jax.random.key(5)
  plain = sampling.p_sample_loop(sched, denoise, shape, key)
  final, trace = sampling.p_sample_loop(sched, denoise, shape, key, trace_every=5)
  np.testing.assert_array_equal(final, plain)  # same keys, same chain
  np.testing.assert_array_equal(trace.t, [15, 10, 5, 0])
  assert trace.x.shape == (4,) + shape and trace.pred_xstart.shape == (4,) + shape
  np.testing.assert_array_equal(trace.x[-1], final)
  # Replaying the chain step by step with the documented key layout reproduces the snapshots.
  noise_key, loop_key = jax.random.split(key)
  x = jax.random.normal(noise_key, shape)
  keys = jax.random.split(loop_key, 20)
  for j, i in enumerate(range(19, -1, -1)):
    x, pred = sampling.p_sample(sched, denoise, x, jnp.full((3,), i, jnp.int32), keys[j])
    if i % 5 == 0:
      np.testing.assert_allclose(trace.x[3 - i // 5], x, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(trace.pred_xstart[3 - i // 5], pred, rtol=1e-5, atol=1e-6)
  other = sampling.p_sample_loop(sched, denoise, shape, jax.random.key(6))
  assert not np.allclose(other, plain)


def test_sampler_under_pmap_with_per_device_keys():
  n_dev = jax.local_device_count()
  assert n_dev == 8
  sched = sched_lib.get_schedule('linear', num_timesteps=50)

  def sample(scale, key):
    return sampling.p_sample_loop(sched, lambda x, t: scale * x, (2, 4, 4, 1), key)

  keys = jax.random.split(jax.random.key(0), n_dev)
  out = jax.pmap(sample, in_axes=(None, 0))(jnp.float32(0.1), keys)
  assert out.shape == (n_dev, 2, 4, 4, 1)
  single = jax.jit(sample)(jnp.float32(0.1), keys[3])
  np.testing.assert_allclose(out[3], single, rtol=1e-5, atol=1e-6)
  assert not np.allclose(out[0], out[1])  # each device draws its own samples


def test_sampler_bad_input():
  sched = sched_lib.get_schedule('linear', num_timesteps=10)
  fn = lambda x, t: x
  with pytest.raises(ValueError, match='trace_every'):
    sampling.p_sample_loop(sched, fn, (2, 4, 4, 1), jax.random.key(0), trace_every=3)
  with pytest.raises(ValueError, match="'fixed'"):
    sampling.p_sample_loop(sched, fn, (2, 4, 4, 1), jax.random.key(0), var_type='fixed')
  with pytest.raises(ValueError, match='x_init'):
    sampling.p_sample_loop(sched, fn, (2, 4, 4, 1), jax.random.key(0), x_init=jnp.zeros((2, 4, 4, 3)))
  with pytest.raises(ValueError, match=r'\(2, 4, 4, 2\)'):
    sampling.p_sample_loop(sched, lambda x, t: jnp.concatenate([x, x], -1), (2, 4, 4, 1), jax.random.key(0))


def test_ddim_eta1_all_steps_matches_ancestral_fixedsmall_statistics():
  shape = (256, 8, 8, 1)
  x = np.asarray(
    jax.jit(functools.partial(sampling.ddim_sample_loop, SCHED, gaussian_eps, shape, eta=1.0, clip_denoised=False))(
      jax.random.key(2)
    ),
    np.float64,
  )
  m, v = exact_sampler_moments('fixedsmall')
  assert abs(x.mean() - m) < 5 * np.sqrt(v / x.size)
  assert abs(x.var() - v) < 5 * v * np.sqrt(2 / x.size)


def test_ddim_eta1_step_equals_ancestral_fixedsmall_step():
  """Algebraically the same Gaussian: with the same noise the two samplers give the same chain."""
  sched = sched_lib.get_schedule('linear', beta_end=0.2, num_timesteps=16)
  denoise = lambda x_t, t: 0.3 * x_t
  key = jax.random.key(4)
  ddim = sampling.ddim_sample_loop(sched, denoise, (2, 4, 4, 3), key, eta=1.0)
  ancestral = sampling.p_sample_loop(sched, denoise, (2, 4, 4, 3), key, var_type='fixedsmall')
  np.testing.assert_allclose(ddim, ancestral, rtol=1e-4, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_reaches_the_data():
  shape = (64, 4, 4, 1)
  x_init = jax.random.normal(jax.random.key(0), shape)
  run = lambda key: sampling.ddim_sample_loop(SCHED, two_point_eps, shape, key, num_steps=50, eta=0.0, x_init=x_init)
  a, b = run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(a, b)  # no randomness beyond x_init
  a = np.asarray(a)
  assert np.mean(np.abs(np.abs(a) - 0.5) < 0.05) > 0.95  # lands on the atoms in 50 steps
  # The deterministic map sends the sign of the starting noise to the sign of the sample.
  assert np.mean(np.sign(a) == np.sign(np.asarray(x_init))) > 0.9


def test_respaced_ancestral_sampling_follows_the_respaced_chain():
  betas64 = np.asarray(SCHED.betas, np.float64)
  keep = sched_lib.space_timesteps(1000, 100)
  short, tmap = sched_lib.respace(SCHED, keep)
  assert short.num_timesteps == 100
  np.testing.assert_allclose(short.alphas_cumprod, SCHED.alphas_cumprod[keep], rtol=1e-5)
  # The wrapped network sees the original timesteps.
  probe = sampling.remap_timesteps(lambda x, t: t, tmap)(None, jnp.array([0, 1, 99]))
  np.testing.assert_array_equal(probe, keep[[0, 1, 99]])
  shape = (256, 8, 8, 1)
  for var_type in ('fixedsmall', 'fixedlarge'):
    x = np.asarray(
      sampling.p_sample_loop(
        short,
        sampling.remap_timesteps(gaussian_eps, tmap),
        shape,
        jax.random.key(3),
        var_type=var_type,
        clip_denoised=False,
      ),
      np.float64,
    )
    m, v = exact_sampler_moments(var_type, sched_lib.schedule_tables(sched_lib.respace_betas(betas64, keep)[0]))
    assert abs(x.mean() - m) < 5 * np.sqrt(v / x.size)
    assert abs(x.var() - v) < 5 * v * np.sqrt(2 / x.size)
    # With 100 steps the fixed variances bracket the data variance (too small / too large).
    assert (v < S**2) if var_type == 'fixedsmall' else (v > S**2)


def test_start_t_runs_the_tail_of_the_chain():
  """From x_{start_t} the sampler runs exactly the steps start_t .. 0 (here replayed by hand)."""
  sched = sched_lib.get_schedule('linear', beta_end=0.2, num_timesteps=20)
  denoise = lambda x_t, t: 0.2 * x_t
  x_start = jnp.ones((2, 4, 4, 1)) * 0.3
  key = jax.random.key(9)
  out = sampling.p_sample_loop(sched, denoise, x_start.shape, key, x_init=x_start, start_t=6)
  keys = jax.random.split(jax.random.split(key)[1], 7)
  x = x_start
  for j, i in enumerate(range(6, -1, -1)):
    x, _ = sampling.p_sample(sched, denoise, x, jnp.full((2,), i, jnp.int32), keys[j])
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='start_t'):
    sampling.p_sample_loop(sched, denoise, x_start.shape, key, start_t=20)
