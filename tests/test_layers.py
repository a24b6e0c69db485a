"""Tests for ddpm_jax.models.layers: hand-written gradients against jax.grad of the plain formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import cpu_tuning
from ddpm_jax.models import layers
from ddpm_jax.models.unet import AttnBlock, ResnetBlock


def _rand(rng, *shape, scale=1.0, shift=0.0):
  return jnp.asarray(rng.normal(size=shape).astype(np.float32) * scale + shift)


def _max_rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


def _assert_value_and_vjp_match(f, ref, args, dy):
  """``jit(f)`` and ``ref`` agree in value and in the VJP of ``dy`` (shapes equal, max relative error < 1e-5)."""
  y, vjp = jax.vjp(jax.jit(f), *args)
  y_ref, vjp_ref = jax.vjp(ref, *args)
  assert y.shape == y_ref.shape
  assert _max_rel(y_ref, y) < 1e-5
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.shape == want.shape
    assert _max_rel(want, got) < 1e-5


def _ref_group_norm(x, scale, bias, groups, eps=1e-6):
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False).apply(
    {'params': {'scale': scale, 'bias': bias}}, x
  )


@pytest.mark.parametrize('sums', ['reduce', 'tree'])
@pytest.mark.parametrize('shape,groups', [((2, 6, 5, 16), 4), ((3, 4, 4, 8), 8), ((1, 3, 3, 12), 1)])
def test_group_norm_value_and_gradient_match_flax(monkeypatch, sums, shape, groups):
  # Both ways of summing over the image ('tree' is what XLA:CPU uses without YNN reductions); 30, 16 and 9
  # pixels take the tree through odd lengths too.
  monkeypatch.setattr(cpu_tuning, 'ynn_reductions', lambda: sums == 'reduce')
  jax.clear_caches()  # the path is chosen while tracing: no trace of the other parametrization may be reused
  rng = np.random.default_rng(0)
  # An offset mean and a large spread, so that the two-pass variance and a wrong mean term would both show.
  x = _rand(rng, *shape, scale=3.0, shift=5.0)
  c = shape[-1]
  scale, bias, dy = _rand(rng, c, shift=1.0), _rand(rng, c), _rand(rng, *shape)
  f = lambda x, s, b: layers.group_norm(x, s, b, num_groups=groups)
  ref = lambda x, s, b: _ref_group_norm(x, s, b, groups)
  _assert_value_and_vjp_match(f, ref, (x, scale, bias), dy)


@pytest.mark.parametrize('n', [1, 2, 3, 5, 7, 8, 30, 1024])
@pytest.mark.parametrize('axis', [1, 2])
def test_tree_reduce_is_the_reduction(n, axis):
  shape = [2, 3, 4]
  shape[axis] = n
  a = np.random.default_rng(n).normal(size=shape).astype(np.float32)
  total = layers._tree_reduce(jnp.asarray(a), axis, jnp.add)
  assert total.shape == tuple(1 if i == axis else d for i, d in enumerate(shape))
  np.testing.assert_allclose(total, a.astype(np.float64).sum(axis, keepdims=True), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(layers._tree_reduce(jnp.asarray(a), axis, jnp.maximum), a.max(axis, keepdims=True))


def test_group_norm_second_order_is_not_silently_wrong():
  # custom_vjp functions support first-order reverse mode only; forward mode must fail loudly, not be wrong.
  x = jnp.ones((1, 2, 2, 4))
  with pytest.raises(TypeError):
    jax.jvp(lambda x: layers.group_norm(x, jnp.ones(4), jnp.zeros(4), num_groups=2), (x,), (x,))


def test_group_norm_rejects_bad_input():
  with pytest.raises(ValueError, match='NHWC'):
    layers.group_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), num_groups=2)
  with pytest.raises(ValueError, match='num_groups=3'):
    layers.group_norm(jnp.ones((1, 2, 2, 4)), jnp.ones(4), jnp.zeros(4), num_groups=3)


def test_group_norm_module_keeps_flax_parameters():
  x = jnp.ones((1, 4, 4, 8))
  p = layers.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  ref = nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), p) == jax.tree.map(lambda a: (a.shape, a.dtype), ref)
  np.testing.assert_array_equal(p['params']['scale'], 1.0)
  np.testing.assert_array_equal(p['params']['bias'], 0.0)


@pytest.mark.parametrize('shape', [(6, 5), (2, 3, 4, 5)])
def test_dense_value_and_gradient(shape):
  rng = np.random.default_rng(1)
  x, w, b = _rand(rng, *shape), _rand(rng, shape[-1], 7), _rand(rng, 7)
  dy = _rand(rng, *shape[:-1], 7)
  y, vjp = jax.vjp(jax.jit(layers.dense), x, w, b)
  y_ref, vjp_ref = jax.vjp(lambda x, w, b: x @ w + b, x, w, b)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_module_matches_flax_dense():
  x = _rand(np.random.default_rng(2), 3, 4, 4, 6)
  mine, ref = layers.Dense(5), nn.Dense(5)
  p = mine.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  np.testing.assert_allclose(mine.apply(p, x), ref.apply(p, x), rtol=1e-6, atol=1e-6)


def _ref_attention(q, k, v):
  w = jax.nn.softmax(jnp.einsum('bnc,bmc->bnm', q, k) * q.shape[-1] ** -0.5, axis=-1)
  return jnp.einsum('bnm,bmc->bnc', w, v)


def _upsample_then_conv(x, kernel, bias):
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return jax.lax.conv_general_dilated(up, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias


@pytest.mark.parametrize('shape', [(2, 4, 4, 3), (1, 3, 5, 2), (2, 1, 1, 4)])
def test_upsample_conv_equals_upsampling_then_conv(shape):
  # Odd and non-square sizes and a 1x1 input (every tap at a border) check the phase taps and the padding.
  rng = np.random.default_rng(0)
  x, kernel, bias = _rand(rng, *shape), _rand(rng, 3, 3, shape[-1], 5), _rand(rng, 5)
  dy = _rand(rng, shape[0], 2 * shape[1], 2 * shape[2], 5)
  _assert_value_and_vjp_match(layers.upsample_conv3x3, _upsample_then_conv, (x, kernel, bias), dy)


def test_upsample_conv_module_keeps_flax_conv_parameters():
  x = jnp.ones((1, 4, 4, 6))
  init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
  mine = layers.UpsampleConv(8, kernel_init=init).init(jax.random.key(3), x)
  flax_conv = nn.Conv(8, (3, 3), kernel_init=init).init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, flax_conv)
  for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(flax_conv)):
    np.testing.assert_array_equal(a, b)
  bf16 = layers.UpsampleConv(8, dtype=jnp.bfloat16).apply(mine, x)
  assert bf16.shape == (1, 8, 8, 8) and bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize('reductions', ['reduce', 'tree'])
def test_attention_value_and_gradient(monkeypatch, reductions):
  # 'tree': the row max and sum as halvings (XLA:CPU without YNN reductions); 10 keys take it through odd lengths.
  monkeypatch.setattr(cpu_tuning, 'ynn_reductions', lambda: reductions == 'reduce')
  jax.clear_caches()  # the path is chosen while tracing: no trace of the other parametrization may be reused
  rng = np.random.default_rng(3)
  q, k, v, dout = (_rand(rng, 2, 10, 8, scale=2.0) for _ in range(4))
  y, vjp = jax.vjp(jax.jit(layers.attention), q, k, v)
  y_ref, vjp_ref = jax.vjp(_ref_attention, q, k, v)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for got, want in zip(vjp(dout), vjp_ref(dout)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Undifferentiated calls take the primal path (softmax normalized after the second product).
  np.testing.assert_allclose(jax.jit(layers.attention)(q, k, v), y_ref, rtol=1e-5, atol=1e-6)


def test_attention_bfloat16_keeps_dtypes():
  q = k = v = jnp.ones((1, 4, 8), jnp.bfloat16)
  y, vjp = jax.vjp(layers.attention, q, k, v)
  assert y.dtype == jnp.bfloat16 and layers.attention(q, k, v).dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in vjp(jnp.ones_like(y)))


def test_blocks_gradients_match_autodiff_of_plain_layers(monkeypatch):
  """A ResBlock (with NIN shortcut) and an attention block: gradients equal those of the same blocks built
  from Flax's GroupNorm/Dense and einsum attention, with the same parameters."""
  rng = np.random.default_rng(4)
  x, temb = _rand(rng, 2, 8, 8, 16, scale=2.0), _rand(rng, 2, 32)
  res = ResnetBlock(24, num_groups=4)
  attn = AttnBlock(num_groups=4)
  x24 = _rand(rng, 2, 8, 8, 24)
  p_res = res.init(jax.random.key(0), x, temb, False)
  p_attn = attn.init(jax.random.key(1), x24)
  # Non-zero everywhere (conv2 and proj_out start near zero, which would hide most of the gradient).
  p_res = jax.tree.map(lambda a: a + 0.1 * _rand(rng, *a.shape), p_res)
  p_attn = jax.tree.map(lambda a: a + 0.1 * _rand(rng, *a.shape), p_attn)

  def grads(p_res, p_attn):
    g_res = jax.grad(lambda p, x: jnp.sum(res.apply(p, x, temb, False) ** 2), argnums=(0, 1))(p_res, x)
    g_attn = jax.grad(lambda p, x: jnp.sum(attn.apply(p, x) ** 2), argnums=(0, 1))(p_attn, x24)
    return g_res, g_attn

  got = jax.jit(grads)(p_res, p_attn)

  def plain_group_norm_module(**kw):
    return nn.GroupNorm(
      num_groups=kw['num_groups'],
      epsilon=kw['epsilon'],
      use_fast_variance=False,
      param_dtype=kw['param_dtype'],
      name=kw['name'],
    )

  def plain_dense_module(features, **kw):
    return nn.Dense(features, **kw)

  monkeypatch.setattr(layers, 'GroupNorm', plain_group_norm_module)
  monkeypatch.setattr(layers, 'Dense', plain_dense_module)
  monkeypatch.setattr(layers, 'attention', _ref_attention)
  want = grads(p_res, p_attn)  # not jitted: a jit of the same function would reuse the first trace
  # Relative to each leaf, except that leaves whose true gradient is 0 (the key bias: softmax ignores a constant
  # added to every logit of a row) are compared against the tree's scale.
  scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale)


def test_dropout_rate_scale_and_determinism():
  x = jnp.ones((64, 32, 32, 7))  # odd last axis: the 16-bit halves do not line up with rows
  key = jax.random.key(0)
  y = jax.jit(lambda x, k: layers.dropout(x, 0.1, k))(x, key)
  dropped = float(jnp.mean(y == 0))
  # 458,752 draws: the standard deviation of the dropped fraction is 4.4e-4.
  assert abs(dropped - 6554 / 65536) < 2e-3
  keep_prob = 1 - 6554 / 65536
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / keep_prob], rtol=1e-6)
  np.testing.assert_array_equal(y, layers.dropout(x, 0.1, key))
  other = layers.dropout(x, 0.1, jax.random.key(1))
  assert float(jnp.mean((y == 0) != (other == 0))) > 0.1
  # Neighbouring elements (the two halves of one random word) are independent.
  a, b = (np.asarray(y).reshape(-1)[:-1:2] == 0), (np.asarray(y).reshape(-1)[1::2] == 0)
  assert abs(np.mean(a & b) - np.mean(a) * np.mean(b)) < 2e-3


def test_dropout_edges_and_module():
  x = jnp.arange(6.0).reshape(1, 6)
  np.testing.assert_array_equal(layers.dropout(x, 0.0, jax.random.key(0)), x)
  np.testing.assert_array_equal(layers.dropout(x, 1.0, jax.random.key(0)), 0.0)
  with pytest.raises(ValueError, match='1.5'):
    layers.dropout(x, 1.5, jax.random.key(0))
  module = layers.Dropout(rate=0.5)
  assert module.init({'dropout': jax.random.key(0)}, x) == {}
  np.testing.assert_array_equal(layers.Dropout(rate=0.5, deterministic=True).apply({}, x), x)
  y = np.asarray(module.apply({}, jnp.ones((1, 1000)), rngs={'dropout': jax.random.key(3)}))
  assert set(np.unique(y)) == {0.0, 2.0} and 400 < np.sum(y == 0) < 600
  np.testing.assert_array_equal(y, module.apply({}, jnp.ones((1, 1000)), rngs={'dropout': jax.random.key(3)}))
