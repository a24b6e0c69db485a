"""FID / IS math against closed forms and independent numpy code; quantization; the reference-stats cache;
the batching extractor (on a tiny stand-in network: the real InceptionV3 is covered in test_inception.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import evaluation as ev


# ------------------------------------------------------------------------------------------------------------------
# to_uint8


def test_to_uint8_edges_and_rounding():
  x = np.array([-1.0, 1.0, -3.0, 7.0, 0.0, -np.inf, np.inf])
  np.testing.assert_array_equal(ev.to_uint8(x), [0, 255, 0, 255, 128, 0, 255])  # 0 -> 127.5 -> 128 (half up)
  # Just below / at a half level.
  np.testing.assert_array_equal(ev.to_uint8(np.array([10.49, 10.5, 254.49]) / 127.5 - 1), [10, 11, 254])
  out = ev.to_uint8(jnp.zeros((2, 4, 4, 3), jnp.float32))
  assert out.dtype == np.uint8 and out.shape == (2, 4, 4, 3)
  with pytest.raises(ValueError, match='NaN'):
    ev.to_uint8(np.array([0.0, np.nan]))


def test_to_uint8_inverts_data_scaling_in_float32():
  u = np.arange(256)
  x = (u.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)  # input_pipeline scaling
  np.testing.assert_array_equal(ev.to_uint8(x), u)
  # Truncation (score_sde's astype) would not: 63 of the 256 float32 levels land just below their integer.
  assert (((x.astype(np.float64) + 1) * 127.5).astype(np.uint8) != u).sum() > 0


# ------------------------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance


def test_compute_statistics_unbiased_float64():
  f = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = ev.compute_statistics(f)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  f64 = f.astype(np.float64)
  ref_mu = f64.sum(0) / 50
  ref_sigma = sum(np.outer(r - ref_mu, r - ref_mu) for r in f64) / 49  # 1/(n-1)
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10, atol=1e-12)


def test_stats_accumulator_matches_batch_statistics():
  f = np.random.default_rng(1).normal(loc=100.0, size=(103, 5))  # offset mean: the naive E[xx]-E[x]^2 loses digits
  acc = ev.StatsAccumulator()
  for lo, hi in [(0, 1), (1, 40), (40, 40), (40, 103)]:
    acc.update(f[lo:hi])
  mu, sigma = acc.result()
  ref_mu, ref_sigma = ev.compute_statistics(f)
  assert acc.count == 103
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-13)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-12)


def _random_cov(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(2000, 32)) @ rng.normal(size=(32, 32))
  mu, sigma = ev.compute_statistics(f)
  assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6 * np.trace(sigma)
  # Fewer samples than dimensions (singular covariance): still ~0.
  mu, sigma = ev.compute_statistics(f[:10])
  assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6 * np.trace(sigma)


def test_fid_closed_form_for_commuting_covariances():
  """Σ1 = Q D1 Qᵀ, Σ2 = Q D2 Qᵀ ⇒ Tr((Σ1Σ2)^½) = Σ_i sqrt(d1_i d2_i); with Q = I it is the diagonal case."""
  rng = np.random.default_rng(3)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  d1, d2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  closed = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
  assert ev.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(closed, rel=1e-10)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
  assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-8)


def test_fid_from_sampled_gaussians_approaches_closed_form():
  rng = np.random.default_rng(4)
  d, n = 3, 200_000
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
  sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
  a = mu1 + sd1 * rng.normal(size=(n, d))
  b = mu2 + sd2 * rng.normal(size=(n, d))
  closed = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)
  assert ev.frechet_distance(*ev.compute_statistics(a), *ev.compute_statistics(b)) == pytest.approx(closed, abs=0.03)


def test_fid_symmetric_and_positive():
  rng = np.random.default_rng(5)
  d = 12
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)  # non-commuting
  f12, f21 = ev.frechet_distance(mu1, s1, mu2, s2), ev.frechet_distance(mu2, s2, mu1, s1)
  assert f12 > 0
  assert f12 == pytest.approx(f21, rel=1e-9)
  # Against an independent formula: Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½), via symmetric eigendecompositions.
  w, v = np.linalg.eigh(s1)
  r = v @ np.diag(np.sqrt(w)) @ v.T
  tr_sqrt = np.sum(np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)))
  ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  assert f12 == pytest.approx(ref, rel=1e-9)


def test_fid_rejects_mismatched_shapes():
  with pytest.raises(ValueError):
    ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------------------------
# Inception Score


def _onehot_logits(labels, k=1008, scale=1e3):
  logits = np.zeros((len(labels), k))
  logits[np.arange(len(labels)), labels] = scale
  return logits


def test_inception_score_uniform_is_one():
  mean, std = ev.inception_score(np.zeros((1000, 1008)), num_splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('k', [1, 5, 10, 1008])
def test_inception_score_of_confident_even_predictions_is_k(k):
  labels = np.tile(np.arange(k), 10)  # every split (a contiguous block of k rows) holds each class once
  mean, std = ev.inception_score(_onehot_logits(labels), num_splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_split_std_is_population_std():
  labels = np.concatenate([np.tile(np.arange(2), 50), np.tile(np.arange(4), 25)])  # split scores 2 and 4
  mean, std = ev.inception_score(_onehot_logits(labels), num_splits=2)
  assert mean == pytest.approx(3.0, rel=1e-9)
  assert std == pytest.approx(1.0, rel=1e-9)  # np.std (ddof=0) as in the OpenAI code; ddof=1 would give sqrt(2)


def test_inception_score_matches_openai_formula():
  logits = np.random.default_rng(6).normal(scale=3.0, size=(103, 20))
  preds = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for i in range(10):  # the OpenAI loop, literally
    part = preds[(i * preds.shape[0] // 10) : ((i + 1) * preds.shape[0] // 10), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  mean, std = ev.inception_score(logits, num_splits=10)
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)


# ------------------------------------------------------------------------------------------------------------------
# Reference statistics cache and the convenience path, with fake feature functions


class _CountingFeatures:
  """Deterministic fake feature_fn: pool = first 8 pixel values as floats; logits from the same numbers."""

  def __init__(self):
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    assert images.dtype == np.uint8
    flat = images.reshape(images.shape[0], -1)[:, :8].astype(np.float32)
    return ev.Features(pool=flat, logits=flat[:, :4] / 50.0)


def _uint8_batches(n_batches=5, b=7, seed=7):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (b, 4, 4, 3), dtype=np.uint8) for _ in range(n_batches)]


def test_reference_stats_cache_round_trip(tmp_path):
  batches = _uint8_batches()
  fn = _CountingFeatures()
  cache = tmp_path / 'stats' / 'cifar10_train.npz'
  meta = {'source': 'synthetic:test'}
  stats = ev.reference_stats_from_images(batches, fn, cache_path=cache, meta=meta, progress=False)
  assert fn.calls == 5 and cache.exists()
  all_pool = np.concatenate([b.reshape(7, -1)[:, :8] for b in batches]).astype(np.float64)
  ref_mu, ref_sigma = ev.compute_statistics(all_pool)
  np.testing.assert_allclose(stats.mu, ref_mu, rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, ref_sigma, rtol=1e-10)
  assert stats.num_images == 35

  def must_not_run(_):
    raise AssertionError('feature_fn called although the cache exists')

  cached = ev.reference_stats_from_images(iter(()), must_not_run, cache_path=cache, progress=False)
  np.testing.assert_array_equal(cached.mu, stats.mu)
  np.testing.assert_array_equal(cached.sigma, stats.sigma)
  assert cached.num_images == 35 and cached.meta['source'] == 'synthetic:test'
  assert fn.calls == 5


def test_load_reference_stats_accepts_ttur_style_files(tmp_path):
  np.savez(tmp_path / 'fid_stats.npz', mu=np.zeros(3, np.float32), sigma=np.eye(3, dtype=np.float32))
  stats = ev.load_reference_stats(tmp_path / 'fid_stats.npz')
  assert stats.mu.dtype == np.float64 and stats.num_images == -1 and stats.meta == {}


def test_reference_stats_reject_float_images():
  with pytest.raises(ValueError, match='uint8'):
    ev.reference_stats_from_images([np.zeros((2, 4, 4, 3), np.float32)], _CountingFeatures(), progress=False)


def test_fid_from_samples_of_the_reference_images_is_zero(tmp_path):
  batches = _uint8_batches(seed=8)
  fn = _CountingFeatures()
  ev.reference_stats_from_images(batches, fn, cache_path=tmp_path / 'ref.npz', progress=False)
  images = np.concatenate(batches)
  samples = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # model range [-1, 1]
  result = ev.fid_from_samples(samples, fn, tmp_path / 'ref.npz', num_splits=5, chunk_size=10, progress=False)
  assert result['num_samples'] == 35
  assert abs(result['fid']) < 1e-8
  logits = images.reshape(35, -1)[:, :4].astype(np.float32) / 50.0
  assert result['inception_score'] == pytest.approx(ev.inception_score(logits, 5)[0], rel=1e-6)
  # Pool-only feature functions give FID without IS.
  result = ev.fid_from_samples([samples[:20], samples[20:]], lambda x: fn(x).pool, tmp_path / 'ref.npz', progress=False)
  assert 'inception_score' not in result and abs(result['fid']) < 1e-8


# ------------------------------------------------------------------------------------------------------------------
# InceptionExtractor batching, on a tiny stand-in with the same interface (pool + an 'fc' Dense)


class _TinyNet(nn.Module):
  traces = [0]

  @nn.compact
  def __call__(self, images):
    _TinyNet.traces[0] += 1  # Python side effect: runs once per trace
    x = images.astype(jnp.float32) / 255.0
    pool = jnp.mean(nn.Dense(6, name='proj')(x), axis=(1, 2))
    return {'pool': pool, 'logits': nn.Dense(5, name='fc')(pool)}


def test_extractor_batches_pads_and_compiles_once():
  model = _TinyNet()
  images = np.random.default_rng(9).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
  variables = model.init(jax.random.key(0), images[:1])
  variables = jax.tree.map(lambda a: a + 0.3, variables)  # nonzero fc bias
  _TinyNet.traces[0] = 0
  extractor = ev.make_feature_fn(variables, batch_size=3, model=model)
  feats = extractor(images)  # chunks 3 + 3 + 1 (padded)
  assert _TinyNet.traces[0] == 1
  ref = model.apply(variables, images)
  np.testing.assert_allclose(feats.pool, np.asarray(ref['pool']), rtol=1e-5, atol=1e-6)
  kernel = np.asarray(variables['params']['fc']['kernel'])
  np.testing.assert_allclose(feats.logits, feats.pool @ kernel, rtol=1e-5, atol=1e-6)  # OpenAI: no bias
  with_bias = ev.make_feature_fn(variables, batch_size=3, model=model, include_fc_bias=True)(images)
  np.testing.assert_allclose(with_bias.logits, np.asarray(ref['logits']), rtol=1e-5, atol=1e-6)
  assert feats.pool.shape == (7, 6) and feats.logits.shape == (7, 5)


def test_bpd_over_dataset_matches_calc_bpd_loop_and_ignores_batching():
  """Dataset bits/dim equal the per-image bound, whatever the batch size and device count."""
  from ddpm_jax import diffusion, input_pipeline
  from ddpm_jax import schedule as sched_lib

  sched = sched_lib.get_schedule('linear', beta_start=1e-3, beta_end=0.2, num_timesteps=8)

  class ShrinkModel:  # a stand-in network with one parameter: eps_hat = w * x_t
    def apply(self, variables, x, t, train):
      del t, train
      return variables['params']['w'] * x

  model, params = ShrinkModel(), {'w': jnp.float32(0.3)}
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
  a = ev.bpd_over_dataset(model, params, sched, [images[:2], images[2:]], seed=1, progress=False)
  b = ev.bpd_over_dataset(model, params, sched, [images], seed=1, progress=False, devices=jax.local_devices()[:1])
  np.testing.assert_allclose(a.total_bpd, b.total_bpd, rtol=1e-6)
  np.testing.assert_allclose(a.terms_bpd, b.terms_bpd, rtol=1e-5)
  assert a.num_images == 5 and a.terms_bpd.shape == (8,)
  x0 = input_pipeline.to_model_range(images)
  ref = [
    diffusion.calc_bpd_loop(
      sched, lambda x, t: 0.3 * x, jnp.asarray(x0[i : i + 1]), jax.random.fold_in(jax.random.key(1), i)
    ).total_bpd[0]
    for i in range(5)
  ]
  np.testing.assert_allclose(a.total_bpd, np.mean(ref), rtol=1e-5)
  np.testing.assert_allclose(a.total_bpd, a.terms_bpd.sum() + a.prior_bpd, rtol=1e-6)
