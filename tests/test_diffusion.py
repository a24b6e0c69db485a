"""The diffusion math against brute-force computations, scipy and closed forms."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from ddpm_jax import diffusion
from ddpm_jax import schedule as sched_lib

SCHED = sched_lib.get_schedule('linear')
TABLES = sched_lib.schedule_tables(sched_lib.get_beta_schedule('linear'))
SHAPE = (6, 4, 4, 3)


def _data(seed=0, shape=SHAPE):
  rng = np.random.default_rng(seed)
  x0 = rng.integers(0, 256, size=shape).astype(np.float32) / 127.5 - 1
  noise = rng.standard_normal(shape).astype(np.float32)
  t = np.array([0, 1, 17, 500, 998, 999][: shape[0]], dtype=np.int32)
  return jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)


def test_q_sample_and_q_mean_variance():
  x0, noise, t = _data()
  x_t = diffusion.q_sample(SCHED, x0, t, noise)
  abar = TABLES['alphas_cumprod'][np.asarray(t)].reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-5, atol=1e-6)
  mean, var, log_var = diffusion.q_mean_variance(SCHED, x0, t)
  np.testing.assert_allclose(mean, np.sqrt(abar) * x0, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(var, 1 - abar, rtol=1e-4)
  np.testing.assert_allclose(log_var, np.log(1 - abar), rtol=1e-5)


@pytest.mark.parametrize('i', [1, 2, 50, 700, 999])
def test_posterior_matches_brute_force_bayes(i):
  """q(x_{i-1} | x_i, x_0) ∝ q(x_i | x_{i-1}) q(x_{i-1} | x_0), integrated on a fine 1-D grid."""
  x0 = 0.3
  abar_prev = TABLES['alphas_cumprod'][i - 1]
  beta = TABLES['betas'][i]
  xi = math.sqrt(TABLES['alphas_cumprod'][i]) * x0 + 0.7 * math.sqrt(1 - TABLES['alphas_cumprod'][i])
  prior_mean, prior_std = math.sqrt(abar_prev) * x0, math.sqrt(1 - abar_prev)
  lik_std = math.sqrt(beta)

  def log_unnorm(x):
    return stats.norm.logpdf(x, prior_mean, prior_std) + stats.norm.logpdf(xi, math.sqrt(1 - beta) * x, lik_std)

  # Integrate over a grid wide enough to hold all the mass (the posterior std is below both stds).
  width = 12 * min(prior_std, lik_std)
  centre = xi / math.sqrt(1 - beta)
  grid = np.linspace(centre - 40 * width, centre + 40 * width, 400001)
  lw = log_unnorm(grid)
  w = np.exp(lw - lw.max())
  z = np.trapezoid(w, grid)
  bf_mean = np.trapezoid(grid * w, grid) / z
  bf_var = np.trapezoid((grid - bf_mean) ** 2 * w, grid) / z

  mean, var, log_var = diffusion.q_posterior_mean_variance(
    SCHED, jnp.full((1, 1), x0), jnp.full((1, 1), xi), jnp.array([i], jnp.int32)
  )
  np.testing.assert_allclose(mean[0, 0], bf_mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(var[0, 0], bf_var, rtol=1e-3)
  np.testing.assert_allclose(log_var[0, 0], np.log(bf_var), atol=1e-3)


def test_posterior_at_t0_is_x0_and_log_variance_clipped():
  x0, noise, _ = _data()
  t = jnp.zeros((SHAPE[0],), jnp.int32)
  x_t = diffusion.q_sample(SCHED, x0, t, noise)
  mean, var, log_var = diffusion.q_posterior_mean_variance(SCHED, x0, x_t, t)
  np.testing.assert_allclose(mean, x0, atol=1e-6)
  assert np.all(np.asarray(var) == 0)
  np.testing.assert_allclose(log_var, -9.8167, atol=1e-4)


@pytest.mark.parametrize('m1, lv1, m2, lv2', [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.5, 0.7, 0.1, -2.0)])
def test_normal_kl_against_scipy_integration(m1, lv1, m2, lv2):
  p = stats.norm(m1, math.exp(0.5 * lv1))
  q = stats.norm(m2, math.exp(0.5 * lv2))
  ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30, limit=200)
  np.testing.assert_allclose(diffusion.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-5, atol=1e-7)


def test_discretized_gaussian_log_likelihood_against_scipy():
  levels = np.arange(256, dtype=np.float64) / 127.5 - 1  # every pixel value in [-1, 1]
  for mean, log_scale in [
    (0.0, math.log(0.1)),
    (0.5, math.log(0.02)),
    (-0.98, math.log(0.05)),
    (0.2, math.log(0.0073846)),
  ]:
    logp = np.asarray(
      diffusion.discretized_gaussian_log_likelihood(
        jnp.asarray(levels, jnp.float32), means=jnp.float32(mean), log_scales=jnp.float32(log_scale)
      ),
      dtype=np.float64,
    )
    # Exact probability of each bin under the Gaussian (end bins open-ended), with scipy's exact CDF.
    std = math.exp(log_scale)
    upper = np.where(levels > 0.999, np.inf, levels + 1 / 255)
    lower = np.where(levels < -0.999, -np.inf, levels - 1 / 255)
    exact = stats.norm.cdf(upper, mean, std) - stats.norm.cdf(lower, mean, std)
    # The tanh CDF approximation is within ~2e-4 of the true CDF.
    np.testing.assert_allclose(np.exp(logp), exact, atol=5e-4)
    # The bins partition the real line, so probabilities sum to one (up to the 1e-12 floors).
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, atol=1e-5)
    # Where the mass is, log-probabilities agree with the exact ones.
    big = exact > 1e-2
    np.testing.assert_allclose(logp[big], np.log(exact[big]), atol=0.05)


def test_prior_bpd_is_tiny_for_the_paper_schedule():
  x0, _, _ = _data(shape=(64, 8, 8, 3))
  prior = diffusion.prior_bpd(SCHED, x0)
  assert prior.shape == (64,)
  # About 1e-5 bits/dim (paper, Sec. 4; 9.8e-6 averaged over uniform pixel values).
  np.testing.assert_allclose(float(jnp.mean(prior)), 9.8e-6, rtol=0.1)
  abar = TABLES['alphas_cumprod'][-1]
  ref = 0.5 * (-1 - np.log(1 - abar) + (1 - abar) + abar * np.asarray(x0, np.float64) ** 2)
  np.testing.assert_allclose(prior, ref.mean(axis=(1, 2, 3)) / math.log(2), rtol=1e-3)


def test_parameterization_round_trips():
  x0, noise, t = _data()
  x_t = diffusion.q_sample(SCHED, x0, t, noise)
  # eps -> x0 -> eps.
  x0_hat = diffusion.predict_xstart_from_eps(SCHED, x_t, t, noise)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3)  # 1/sqrt(abar) amplifies float32 error at t = T-1
  np.testing.assert_allclose(x0_hat[:4], x0[:4], atol=1e-5)
  eps_hat = diffusion.predict_eps_from_xstart(SCHED, x_t, t, x0)
  np.testing.assert_allclose(eps_hat[1:], noise[1:], atol=1e-4)
  np.testing.assert_allclose(eps_hat[0], noise[0], atol=1e-2)  # divides by sqrt(1/abar_0 - 1) = 0.01
  # x0 -> xprev (posterior mean) -> x0.
  xprev = diffusion.predict_xprev_from_xstart(SCHED, x_t, t, x0)
  back = diffusion.predict_xstart_from_xprev(SCHED, x_t, t, xprev)
  np.testing.assert_allclose(back, x0, atol=5e-3)
  # 1/coef1 is ~250 at t = 500: float32 rounding of xprev is amplified that much.
  np.testing.assert_allclose(back[:4], x0[:4], atol=5e-4)
  np.testing.assert_allclose(back[:3], x0[:3], atol=1e-5)


def _oracle(kind, x0, noise, t):
  """A denoise_fn that returns the exact target of its parameterization."""

  def fn(x_t, t_in):
    if kind == 'eps':
      return noise
    if kind == 'xstart':
      return x0
    return diffusion.predict_xprev_from_xstart(SCHED, x_t, t_in, x0)

  return fn


@pytest.mark.parametrize('mean_type', diffusion.MEAN_TYPES)
def test_p_mean_variance_with_exact_network_recovers_the_posterior(mean_type):
  x0, noise, t = _data()
  x_t = diffusion.q_sample(SCHED, x0, t, noise)
  out = diffusion.p_mean_variance(
    SCHED, _oracle(mean_type, x0, noise, t), x_t, t, mean_type=mean_type, var_type='fixedsmall', clip_denoised=False
  )
  true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(SCHED, x0, x_t, t)
  np.testing.assert_allclose(out.mean[:5], true_mean[:5], atol=1e-4)
  np.testing.assert_allclose(out.pred_xstart[1:4], x0[1:4], atol=5e-4)  # see the round-trip test
  np.testing.assert_allclose(out.log_variance, true_log_var)


def test_variance_tables_and_clipping():
  x0, noise, t = _data()
  x_t = diffusion.q_sample(SCHED, x0, t, noise)
  big = lambda x, tt: 50.0 * jnp.ones_like(x)  # drives x0_hat far outside [-1, 1]
  large = diffusion.p_mean_variance(SCHED, big, x_t, t, var_type='fixedlarge')
  small = diffusion.p_mean_variance(SCHED, big, x_t, t, var_type='fixedsmall')
  ti = np.asarray(t)
  np.testing.assert_allclose(
    large.log_variance[:, 0, 0, 0],
    np.log(np.where(ti == 0, TABLES['posterior_variance'][1], TABLES['betas'][ti])),
    rtol=1e-6,
  )
  np.testing.assert_allclose(small.log_variance[:, 0, 0, 0], TABLES['posterior_log_variance_clipped'][ti], rtol=1e-6)
  np.testing.assert_allclose(large.variance[:, 0, 0, 0], TABLES['betas'][ti], rtol=1e-6)
  assert float(jnp.max(jnp.abs(large.pred_xstart))) <= 1.0
  # The mean is formed from the clipped x0 estimate.
  ref_mean = diffusion.q_posterior_mean_variance(SCHED, large.pred_xstart, x_t, t)[0]
  np.testing.assert_allclose(large.mean, ref_mean, rtol=1e-6)
  unclipped = diffusion.p_mean_variance(SCHED, big, x_t, t, clip_denoised=False)
  assert float(jnp.max(jnp.abs(unclipped.pred_xstart))) > 1.0
  # xprev: the network's mean is used as is, only the derived x0 is clipped.
  xprev = diffusion.p_mean_variance(SCHED, big, x_t, t, mean_type='xprev')
  np.testing.assert_allclose(xprev.mean, 50.0)
  assert float(jnp.max(jnp.abs(xprev.pred_xstart))) <= 1.0


def test_learned_variance_uses_second_half_as_log_variance():
  x0, noise, t = _data()
  x_t = diffusion.q_sample(SCHED, x0, t, noise)
  fn = lambda x, tt: jnp.concatenate([noise, jnp.full_like(x, -3.0)], axis=-1)
  out = diffusion.p_mean_variance(SCHED, fn, x_t, t, var_type='learned', clip_denoised=False)
  np.testing.assert_allclose(out.log_variance, -3.0)
  np.testing.assert_allclose(out.variance, math.exp(-3.0), rtol=1e-6)


@pytest.mark.parametrize('mean_type', diffusion.MEAN_TYPES)
def test_mse_loss_zero_for_exact_network_and_known_for_zero_network(mean_type):
  x0, noise, t = _data()
  losses = diffusion.training_losses(SCHED, _oracle(mean_type, x0, noise, t), x0, t, noise, mean_type=mean_type)
  assert losses.shape == (SHAPE[0],)
  np.testing.assert_allclose(losses, 0.0, atol=1e-9)
  zero = diffusion.training_losses(SCHED, lambda x, tt: jnp.zeros_like(x), x0, t, noise, mean_type=mean_type)
  target = {
    'eps': noise,
    'xstart': x0,
    'xprev': diffusion.predict_xprev_from_xstart(SCHED, diffusion.q_sample(SCHED, x0, t, noise), t, x0),
  }[mean_type]
  np.testing.assert_allclose(zero, jnp.mean(jnp.square(target), axis=(1, 2, 3)), rtol=1e-6)


def test_kl_loss_closed_forms():
  x0, noise, t = _data()
  oracle = _oracle('xstart', x0, noise, t)
  # Exact x0 and the posterior's own variance: every KL term vanishes; t = 0 gives the decoder NLL.
  small = diffusion.training_losses(
    SCHED, oracle, x0, t, noise, mean_type='xstart', var_type='fixedsmall', loss_type='kl'
  )
  np.testing.assert_allclose(small[1:], 0.0, atol=1e-5)
  decoder = -np.mean(
    np.asarray(
      diffusion.discretized_gaussian_log_likelihood(
        x0[:1], means=x0[:1], log_scales=0.5 * TABLES['posterior_log_variance_clipped'][0]
      )
    )
  ) / math.log(2)
  np.testing.assert_allclose(small[0], decoder, rtol=1e-5)
  assert small[0] > 0
  # With sigma^2 = beta the means still agree and the KL is the variance mismatch alone.
  large = diffusion.training_losses(
    SCHED, oracle, x0, t, noise, mean_type='xstart', var_type='fixedlarge', loss_type='kl'
  )
  ti = np.asarray(t)[1:]
  lv_true = TABLES['posterior_log_variance_clipped'][ti]
  lv_model = np.log(TABLES['betas'][ti])
  ref = 0.5 * (-1 + lv_model - lv_true + np.exp(lv_true - lv_model)) / math.log(2)
  # Where the mismatch is large it must match; late terms (~1e-13) are below float32 resolution.
  np.testing.assert_allclose(large[1:], ref, rtol=1e-3, atol=1e-6)
  assert large[1] > 1e-2


def test_calc_bpd_loop_matches_a_python_loop_over_vb_terms():
  sched = sched_lib.get_schedule('linear', beta_start=1e-3, beta_end=0.2, num_timesteps=12)
  x0, _, _ = _data(shape=(3, 4, 4, 3))
  key = jax.random.key(7)
  # A deliberately imperfect eps network: shrunken true eps estimate.
  denoise_fn = lambda x_t, t: 0.5 * diffusion.predict_eps_from_xstart(sched, x_t, t, x0)
  result = jax.jit(functools.partial(diffusion.calc_bpd_loop, sched, denoise_fn))(x0, key)
  assert result.terms_bpd.shape == (3, 12) and result.mse.shape == (3, 12)
  keys = jax.random.split(key, 12)
  for i in range(12):
    t = jnp.full((3,), i, jnp.int32)
    x_t = diffusion.q_sample(sched, x0, t, jax.random.normal(keys[i], x0.shape))
    term, pred = diffusion.vb_terms_bpd(sched, denoise_fn, x0, x_t, t)
    np.testing.assert_allclose(result.terms_bpd[:, i], term, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.mse[:, i], jnp.mean((pred - x0) ** 2, axis=(1, 2, 3)), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(result.total_bpd, result.terms_bpd.sum(1) + result.prior_bpd, rtol=1e-6)
  np.testing.assert_allclose(result.prior_bpd, diffusion.prior_bpd(sched, x0), rtol=1e-6)
  assert np.all(np.asarray(result.terms_bpd) >= -1e-6)


def test_calc_bpd_loop_of_exact_network_is_decoder_only():
  sched = sched_lib.get_schedule('linear', beta_start=1e-3, beta_end=0.2, num_timesteps=10)
  x0, _, _ = _data(shape=(2, 4, 4, 3))
  result = diffusion.calc_bpd_loop(
    sched, lambda x_t, t: x0, x0, jax.random.key(0), mean_type='xstart', var_type='fixedsmall'
  )
  np.testing.assert_allclose(result.terms_bpd[:, 1:], 0.0, atol=1e-5)
  np.testing.assert_allclose(result.mse, 0.0, atol=1e-10)
  assert np.all(np.asarray(result.terms_bpd[:, 0]) > 0)


@pytest.mark.parametrize(
  'call, match',
  [
    (lambda x, n, t: diffusion.training_losses(SCHED, lambda a, b: a, x, t, n, mean_type='epsilon'), "'epsilon'"),
    (lambda x, n, t: diffusion.training_losses(SCHED, lambda a, b: a, x, t, n, var_type='large'), "'large'"),
    (lambda x, n, t: diffusion.training_losses(SCHED, lambda a, b: a, x, t, n, loss_type='l1'), "'l1'"),
    (lambda x, n, t: diffusion.training_losses(SCHED, lambda a, b: a, x, t, n, var_type='learned'), 'learned'),
    (lambda x, n, t: diffusion.q_sample(SCHED, x, t, n[:, :2]), r'\(6, 2, 4, 3\)'),
    (lambda x, n, t: diffusion.q_sample(SCHED, x, t[:3], n), r'\(3,\)'),
    (lambda x, n, t: diffusion.q_sample(SCHED, x, t.astype(jnp.float32), n), 'float32'),
    (lambda x, n, t: diffusion.training_losses(SCHED, lambda a, b: a[..., :1], x, t, n), r'\(6, 4, 4, 1\)'),
    (lambda x, n, t: diffusion.p_mean_variance(SCHED, lambda a, b: a, x, t, var_type='learned'), r'\(6, 4, 4, 6\)'),
  ],
)
def test_bad_input_raises_value_error_before_compiling(call, match):
  x0, noise, t = _data()
  with pytest.raises(ValueError, match=match):
    call(x0, noise, t)
  # Also under jit: the checks run at trace time, before XLA compiles anything.
  with pytest.raises(ValueError, match=match):
    jax.jit(call)(x0, noise, t)


def test_loss_gradient_under_pmap_matches_single_device():
  """Data-parallel gradients on 8 devices (pmean) equal the full-batch gradient on one device."""
  n_dev = jax.local_device_count()
  assert n_dev == 8, 'conftest should give 8 fake CPU devices'
  sched = sched_lib.get_schedule('linear', num_timesteps=100)
  params = {'w': jnp.array([0.3, -0.2, 0.5]), 'b': jnp.array([0.01, 0.0, -0.02])}

  def loss_fn(p, x0, key):
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_timesteps)
    noise = jax.random.normal(noise_key, x0.shape)
    denoise_fn = lambda x_t, tt: x_t * p['w'] + p['b'] * (tt[:, None, None, None] / 100.0)
    return jnp.mean(diffusion.training_losses(sched, denoise_fn, x0, t, noise))

  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 4, 4, 3)).astype(np.float32))
  keys = jax.random.split(jax.random.key(3), n_dev)

  def device_grad(p, x, k):
    return jax.lax.pmean(jax.grad(loss_fn)(p, x, k), 'batch')

  grads = jax.pmap(device_grad, axis_name='batch', in_axes=(None, 0, 0))(params, x0.reshape(n_dev, 2, 4, 4, 3), keys)
  # Reference: the same per-shard draws on one device, averaged.
  ref = jax.tree.map(
    lambda *g: sum(g) / n_dev, *[jax.grad(loss_fn)(params, x0[2 * i : 2 * i + 2], keys[i]) for i in range(n_dev)]
  )
  for name in params:
    np.testing.assert_allclose(grads[name][0], ref[name], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads[name][3], grads[name][0])
