"""Schedule tables against an independent float64 computation and the paper's numbers."""

import math

import numpy as np
import pytest

from ddpm_jax import schedule as sched_lib


def _reference_tables(betas):
  """Independent float64 computation with explicit loops (no vectorised shortcuts shared with the code)."""
  n = len(betas)
  abar = np.empty(n)
  prod = 1.0
  for i, b in enumerate(betas):
    prod *= 1.0 - b
    abar[i] = prod
  abar_prev = np.array([1.0] + list(abar[:-1]))
  post_var = np.array([betas[i] * (1 - abar_prev[i]) / (1 - abar[i]) for i in range(n)])
  return dict(
    betas=np.asarray(betas),
    alphas_cumprod=abar,
    alphas_cumprod_prev=abar_prev,
    sqrt_alphas_cumprod=np.sqrt(abar),
    sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
    log_one_minus_alphas_cumprod=np.log(1 - abar),
    sqrt_recip_alphas_cumprod=1 / np.sqrt(abar),
    sqrt_recipm1_alphas_cumprod=np.sqrt((1 - abar) / abar),
    posterior_variance=post_var,
    posterior_log_variance_clipped=np.log([post_var[1]] + list(post_var[1:])),
    posterior_mean_coef1=np.array([betas[i] * math.sqrt(abar_prev[i]) / (1 - abar[i]) for i in range(n)]),
    posterior_mean_coef2=np.array([(1 - abar_prev[i]) * math.sqrt(1 - betas[i]) / (1 - abar[i]) for i in range(n)]),
    fixedlarge_variance=np.asarray(betas),
    fixedlarge_log_variance=np.log([post_var[1]] + list(betas[1:])),
  )


def test_linear_schedule_matches_paper_numbers():
  s = sched_lib.get_schedule('linear')
  assert s.num_timesteps == 1000
  assert s.betas[0] == np.float32(1e-4) and s.betas[-1] == np.float32(0.02)
  np.testing.assert_allclose(s.alphas_cumprod[-1], 4.0358e-5, rtol=1e-4)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], -9.8167, atol=1e-4)
  np.testing.assert_allclose(s.posterior_variance[1], 5.4532e-5, rtol=1e-4)
  # i = 0 edge cases of the posterior: variance 0, x_0 weight 1, x_t weight 0.
  assert s.posterior_variance[0] == 0.0
  np.testing.assert_allclose(s.posterior_mean_coef1[0], 1.0, rtol=1e-7)
  assert s.posterior_mean_coef2[0] == 0.0
  assert s.alphas_cumprod_prev[0] == 1.0
  # The decoder's sigma at i = 0 for both fixed variance types is sqrt(beta-tilde_1) = 0.0073846.
  np.testing.assert_allclose(np.exp(0.5 * s.fixedlarge_log_variance[0]), 0.0073846, rtol=1e-4)


@pytest.mark.parametrize('name', ['linear', 'quad', 'warmup10', 'cosine'])
def test_tables_match_independent_float64_reference(name):
  betas = sched_lib.get_beta_schedule(name)
  s = sched_lib.make_schedule(betas)
  ref = _reference_tables(list(betas))
  for field in sched_lib.Schedule._fields:
    value = getattr(s, field)
    assert value.dtype == np.float32, field
    assert value.shape == (1000,), field
    if field in ref:
      np.testing.assert_allclose(value, ref[field].astype(np.float32), rtol=2e-6, atol=0, err_msg=field)
  np.testing.assert_allclose(s.recip_posterior_mean_coef1, 1 / ref['posterior_mean_coef1'], rtol=2e-6)
  np.testing.assert_allclose(
    s.posterior_mean_coef2_over_coef1, ref['posterior_mean_coef2'] / ref['posterior_mean_coef1'], rtol=2e-6
  )


def test_tables_are_computed_in_float64_then_cast():
  betas = sched_lib.get_beta_schedule('linear')
  s = sched_lib.make_schedule(betas)
  exact = sched_lib.schedule_tables(betas)
  for field in sched_lib.Schedule._fields:
    np.testing.assert_array_equal(getattr(s, field), exact[field].astype(np.float32), err_msg=field)
  # A float32 computation loses accuracy where 1 - alpha_bar cancels (small t): the stored table must not.
  b32 = betas.astype(np.float32)
  abar32 = np.cumprod(np.float32(1) - b32, dtype=np.float32)
  recipm1_32 = np.sqrt(np.float32(1) / abar32 - np.float32(1))
  assert abs(recipm1_32[0] / exact['sqrt_recipm1_alphas_cumprod'][0] - 1) > 1e-5
  assert abs(s.sqrt_recipm1_alphas_cumprod[0] / exact['sqrt_recipm1_alphas_cumprod'][0] - 1) < 1e-6


def test_named_beta_schedules():
  t = 1000
  np.testing.assert_allclose(
    sched_lib.get_beta_schedule('quad'), np.linspace(1e-2, math.sqrt(0.02), t) ** 2, rtol=1e-12
  )
  np.testing.assert_array_equal(sched_lib.get_beta_schedule('const', beta_end=0.01), np.full(t, 0.01))
  jsd = sched_lib.get_beta_schedule('jsd', num_timesteps=4)
  np.testing.assert_allclose(jsd, [1 / 4, 1 / 3, 1 / 2, 1.0])
  w10 = sched_lib.get_beta_schedule('warmup10')
  np.testing.assert_allclose(w10[:100], np.linspace(1e-4, 0.02, 100))
  np.testing.assert_array_equal(w10[100:], 0.02)
  w50 = sched_lib.get_beta_schedule('warmup50')
  np.testing.assert_allclose(w50[:500], np.linspace(1e-4, 0.02, 500))
  np.testing.assert_array_equal(w50[500:], 0.02)


def test_cosine_schedule_follows_its_alpha_bar():
  betas = sched_lib.get_beta_schedule('cosine', num_timesteps=1000)
  s = 0.008
  f = lambda u: math.cos((u / 1000 + s) / (1 + s) * math.pi / 2) ** 2
  abar = np.cumprod(1 - betas)
  # Away from the end (where betas are capped at 0.999) alpha_bar is exactly f(t)/f(0).
  for i in (0, 10, 500, 900):
    np.testing.assert_allclose(abar[i], f(i + 1) / f(0), rtol=1e-9)
  assert betas.max() <= 0.999 and betas.min() > 0


def test_respace_keeps_alpha_bar_at_kept_steps():
  betas = sched_lib.get_beta_schedule('linear')
  keep = sched_lib.space_timesteps(1000, 50)
  assert keep[0] == 0 and keep[-1] == 999 and len(keep) == 50
  new_betas, tmap = sched_lib.respace_betas(betas, keep)
  np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas)[keep], rtol=1e-12)
  np.testing.assert_array_equal(tmap, keep)
  full, _ = sched_lib.respace_betas(betas, np.arange(1000))
  np.testing.assert_allclose(full, betas, rtol=1e-9)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(name='linaer'), 'linaer'),
    (dict(name='linear', num_timesteps=0), 'num_timesteps'),
    (dict(name='linear', beta_start=0.1, beta_end=0.01), 'beta_start=0.1'),
    (dict(name='linear', beta_end=1.5), 'beta_end=1.5'),
  ],
)
def test_bad_schedule_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sched_lib.get_beta_schedule(**kwargs)


def test_bad_betas_and_timesteps():
  with pytest.raises(ValueError, match='must lie in'):
    sched_lib.make_schedule([0.1, 0.0, 0.2])
  with pytest.raises(ValueError, match='1-D'):
    sched_lib.make_schedule(np.ones((2, 2)) * 0.1)
  with pytest.raises(ValueError, match='strictly increasing'):
    sched_lib.respace_betas(np.full(10, 0.1), [3, 2])
  with pytest.raises(ValueError, match='num_steps'):
    sched_lib.space_timesteps(10, 11)
