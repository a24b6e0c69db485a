"""Tests for the U-Net's two layer implementations (``UNet.layers``).

ddpm_jax.models.cpu_layers (the 'cpu' layers): hand-written gradients against jax.grad of the plain formulas, tree
reductions, 16-bit dropout. The 'reference' layers against the 'cpu' ones on a tiny U-Net (same parameters,
outputs, gradients and training trajectory), forward-mode AD through the reference model against finite
differences, and the reference dropout. The choice of the commands is tested in test_cpu_tuning.py and
test_train.py.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import cpu_tuning
from ddpm_jax import data_parallel
from ddpm_jax import schedule as schedule_lib
from ddpm_jax import train_lib
from ddpm_jax.models import UNet, cpu_layers, unet_cifar10
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
def test_group_norm_value_and_gradient_match_flax(sums, shape, groups):
  # Both ways of summing over the image ('tree' is what XLA:CPU uses without YNN reductions); 30, 16 and 9
  # pixels take the tree through odd lengths too.
  rng = np.random.default_rng(0)
  # An offset mean and a large spread, so that the two-pass variance and a wrong mean term would both show.
  x = _rand(rng, *shape, scale=3.0, shift=5.0)
  c = shape[-1]
  scale, bias, dy = _rand(rng, c, shift=1.0), _rand(rng, c), _rand(rng, *shape)
  f = lambda x, s, b: cpu_layers.group_norm(x, s, b, num_groups=groups, tree_reductions=sums == 'tree')
  ref = lambda x, s, b: _ref_group_norm(x, s, b, groups)
  _assert_value_and_vjp_match(f, ref, (x, scale, bias), dy)


@pytest.mark.parametrize('n', [1, 2, 3, 5, 7, 8, 30, 1024])
@pytest.mark.parametrize('axis', [1, 2])
def test_tree_reduce_is_the_reduction(n, axis):
  shape = [2, 3, 4]
  shape[axis] = n
  a = np.random.default_rng(n).normal(size=shape).astype(np.float32)
  total = cpu_layers._tree_reduce(jnp.asarray(a), axis, jnp.add)
  assert total.shape == tuple(1 if i == axis else d for i, d in enumerate(shape))
  np.testing.assert_allclose(total, a.astype(np.float64).sum(axis, keepdims=True), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cpu_layers._tree_reduce(jnp.asarray(a), axis, jnp.maximum), a.max(axis, keepdims=True))


def test_cpu_group_norm_forward_mode_is_not_silently_wrong():
  # custom_vjp functions support reverse mode only; forward mode must fail loudly, not be wrong (the reference
  # layers are the ones for forward mode: test_reference_model_forward_mode_against_finite_differences).
  x = jnp.ones((1, 2, 2, 4))
  with pytest.raises(TypeError):
    jax.jvp(lambda x: cpu_layers.group_norm(x, jnp.ones(4), jnp.zeros(4), num_groups=2), (x,), (x,))


def test_group_norm_rejects_bad_input():
  with pytest.raises(ValueError, match='NHWC'):
    cpu_layers.group_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), num_groups=2)
  with pytest.raises(ValueError, match='num_groups=3'):
    cpu_layers.group_norm(jnp.ones((1, 2, 2, 4)), jnp.ones(4), jnp.zeros(4), num_groups=3)


def test_group_norm_module_keeps_flax_parameters():
  x = jnp.ones((1, 4, 4, 8))
  p = cpu_layers.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  ref = nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), p) == jax.tree.map(lambda a: (a.shape, a.dtype), ref)
  np.testing.assert_array_equal(p['params']['scale'], 1.0)
  np.testing.assert_array_equal(p['params']['bias'], 0.0)


@pytest.mark.parametrize('shape', [(6, 5), (2, 3, 4, 5)])
def test_dense_value_and_gradient(shape):
  rng = np.random.default_rng(1)
  x, w, b = _rand(rng, *shape), _rand(rng, shape[-1], 7), _rand(rng, 7)
  dy = _rand(rng, *shape[:-1], 7)
  y, vjp = jax.vjp(jax.jit(cpu_layers.dense), x, w, b)
  y_ref, vjp_ref = jax.vjp(lambda x, w, b: x @ w + b, x, w, b)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_module_matches_flax_dense():
  x = _rand(np.random.default_rng(2), 3, 4, 4, 6)
  mine, ref = cpu_layers.Dense(5), nn.Dense(5)
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
  _assert_value_and_vjp_match(cpu_layers.upsample_conv3x3, _upsample_then_conv, (x, kernel, bias), dy)


def test_upsample_conv_module_keeps_flax_conv_parameters():
  x = jnp.ones((1, 4, 4, 6))
  init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
  mine = cpu_layers.UpsampleConv(8, kernel_init=init).init(jax.random.key(3), x)
  flax_conv = nn.Conv(8, (3, 3), kernel_init=init).init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, flax_conv)
  for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(flax_conv)):
    np.testing.assert_array_equal(a, b)
  bf16 = cpu_layers.UpsampleConv(8, dtype=jnp.bfloat16).apply(mine, x)
  assert bf16.shape == (1, 8, 8, 8) and bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize('reductions', ['reduce', 'tree'])
def test_attention_value_and_gradient(reductions):
  # 'tree': the row max and sum as halvings (XLA:CPU without YNN reductions); 10 keys take it through odd lengths.
  attention = functools.partial(cpu_layers.attention, tree_reductions=reductions == 'tree')
  rng = np.random.default_rng(3)
  q, k, v, dout = (_rand(rng, 2, 10, 8, scale=2.0) for _ in range(4))
  y, vjp = jax.vjp(jax.jit(attention), q, k, v)
  y_ref, vjp_ref = jax.vjp(_ref_attention, q, k, v)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for got, want in zip(vjp(dout), vjp_ref(dout)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Undifferentiated calls take the primal path (softmax normalized after the second product).
  np.testing.assert_allclose(jax.jit(attention)(q, k, v), y_ref, rtol=1e-5, atol=1e-6)


def test_attention_bfloat16_keeps_dtypes():
  q = k = v = jnp.ones((1, 4, 8), jnp.bfloat16)
  y, vjp = jax.vjp(cpu_layers.attention, q, k, v)
  assert y.dtype == jnp.bfloat16 and cpu_layers.attention(q, k, v).dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in vjp(jnp.ones_like(y)))


def test_blocks_gradients_match_autodiff_of_plain_layers():
  """A ResBlock (with NIN shortcut) and an attention block: gradients of the 'cpu' blocks equal those of the
  'reference' blocks (Flax's GroupNorm/Dense and einsum attention), with the same parameters."""
  rng = np.random.default_rng(4)
  x, temb = _rand(rng, 2, 8, 8, 16, scale=2.0), _rand(rng, 2, 32)
  x24 = _rand(rng, 2, 8, 8, 24)
  cpu = dict(layers='cpu')  # the tree reductions: test_both_implementations_have_the_same_gradients
  p_res = ResnetBlock(24, num_groups=4).init(jax.random.key(0), x, temb, False)
  p_attn = AttnBlock(num_groups=4).init(jax.random.key(1), x24)
  # Non-zero everywhere (conv2 and proj_out start near zero, which would hide most of the gradient).
  p_res = jax.tree.map(lambda a: a + 0.1 * _rand(rng, *a.shape), p_res)
  p_attn = jax.tree.map(lambda a: a + 0.1 * _rand(rng, *a.shape), p_attn)

  def grads(p_res, p_attn, **fields):
    res, attn = ResnetBlock(24, num_groups=4, **fields), AttnBlock(num_groups=4, **fields)
    g_res = jax.grad(lambda p, x: jnp.sum(res.apply(p, x, temb, False) ** 2), argnums=(0, 1))(p_res, x)
    g_attn = jax.grad(lambda p, x: jnp.sum(attn.apply(p, x) ** 2), argnums=(0, 1))(p_attn, x24)
    return g_res, g_attn

  got = jax.jit(functools.partial(grads, **cpu))(p_res, p_attn)
  want = grads(p_res, p_attn, layers='reference')
  # Relative to each leaf, except that leaves whose true gradient is 0 (the key bias: softmax ignores a constant
  # added to every logit of a row) are compared against the tree's scale.
  scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale)


def test_dropout_rate_scale_and_determinism():
  x = jnp.ones((64, 32, 32, 7))  # odd last axis: the 16-bit halves do not line up with rows
  key = jax.random.key(0)
  y = jax.jit(lambda x, k: cpu_layers.dropout(x, 0.1, k))(x, key)
  dropped = float(jnp.mean(y == 0))
  # 458,752 draws: the standard deviation of the dropped fraction is 4.4e-4.
  assert abs(dropped - 6554 / 65536) < 2e-3
  keep_prob = 1 - 6554 / 65536
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / keep_prob], rtol=1e-6)
  np.testing.assert_array_equal(y, cpu_layers.dropout(x, 0.1, key))
  other = cpu_layers.dropout(x, 0.1, jax.random.key(1))
  assert float(jnp.mean((y == 0) != (other == 0))) > 0.1
  # Neighbouring elements (the two halves of one random word) are independent.
  a, b = (np.asarray(y).reshape(-1)[:-1:2] == 0), (np.asarray(y).reshape(-1)[1::2] == 0)
  assert abs(np.mean(a & b) - np.mean(a) * np.mean(b)) < 2e-3


def test_dropout_edges_and_module():
  x = jnp.arange(6.0).reshape(1, 6)
  np.testing.assert_array_equal(cpu_layers.dropout(x, 0.0, jax.random.key(0)), x)
  np.testing.assert_array_equal(cpu_layers.dropout(x, 1.0, jax.random.key(0)), 0.0)
  with pytest.raises(ValueError, match='1.5'):
    cpu_layers.dropout(x, 1.5, jax.random.key(0))
  module = cpu_layers.Dropout(rate=0.5)
  assert module.init({'dropout': jax.random.key(0)}, x) == {}
  np.testing.assert_array_equal(cpu_layers.Dropout(rate=0.5, deterministic=True).apply({}, x), x)
  y = np.asarray(module.apply({}, jnp.ones((1, 1000)), rngs={'dropout': jax.random.key(3)}))
  assert set(np.unique(y)) == {0.0, 2.0} and 400 < np.sum(y == 0) < 600
  np.testing.assert_array_equal(y, module.apply({}, jnp.ones((1, 1000)), rngs={'dropout': jax.random.key(3)}))


# ----------------------------------------------------------------------------------------------------------------
# The two implementations of the U-Net (UNet.layers) against each other
# ----------------------------------------------------------------------------------------------------------------

# Two levels (8x8, 4x4), attention at 4x4, an upsampling conv: every layer kind of the model.
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=8)
CPU = {'cpu': dict(layers='cpu'), 'cpu_tree': dict(layers='cpu', cpu_tree_reductions=True)}
X = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
T = np.array([3, 999], np.int32)


def _fast_jit(fn, *args):
  """jit + compile at XLA:CPU optimisation level 0: the same numbers, far less compile time."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})


def _sig(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _init(model):
  key = jax.random.key(0)
  return _fast_jit(lambda k: model.init(k, X, T, train=False)['params'], key)(key)


@pytest.fixture(scope='module')
def tiny_params():
  """Initial parameters of the tiny U-Net, moved away from their initial values: conv2, proj_out and conv_out start
  near zero and the GroupNorms at (1, 0), which would hide most of the network from the comparisons."""
  rng = np.random.default_rng(7)
  return jax.tree.map(
    lambda a: a + 0.2 * _rand(rng, *a.shape) / np.sqrt(max(1, np.prod(a.shape[:-1]))), _init(UNet(**TINY))
  )


def test_both_implementations_have_the_same_parameter_tree_and_init():
  ref, got = _init(UNet(**TINY)), _init(UNet(**TINY, layers='cpu'))  # (the tree reductions create no parameters)
  assert jax.tree.structure(got) == jax.tree.structure(ref) and _sig(got) == _sig(ref)
  jax.tree.map(np.testing.assert_array_equal, got, ref)  # the same values from the same key
  shapes = lambda model, x, t: _sig(jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False)))
  bf16 = dict(TINY, param_dtype='bfloat16')
  assert shapes(UNet(**bf16, layers='cpu'), X, T) == shapes(UNet(**bf16), X, T)
  x32, t32 = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
  assert shapes(unet_cifar10(layers='cpu'), x32, t32) == shapes(unet_cifar10(), x32, t32)
  assert unet_cifar10().layers == UNet().layers == 'reference'  # the library's default


def test_both_implementations_compute_the_same_outputs(tiny_params):
  def apply(**fields):
    model = UNet(**TINY, **fields)
    fn = lambda p: model.apply({'params': p}, X, T, train=False)
    return np.asarray(_fast_jit(fn, tiny_params)(tiny_params))

  ref, ref16 = apply(), apply(dtype='bfloat16')
  assert ref.std() > 0.1  # the whole network contributes
  err = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  for name, fields in CPU.items():
    # float32 rounding: the layers sum in different orders (measured: 3e-7 of the output's scale).
    np.testing.assert_allclose(apply(**fields), ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=name)
  # bfloat16 compute: the implementations differ by bfloat16 rounding (measured: 0.5 %), as either differs from
  # float32.
  got16 = apply(dtype='bfloat16', layers='cpu')
  assert err(got16, ref16) < 2e-2 and err(ref16, ref) < 2e-2 and err(got16, ref) < 2e-2


def test_both_implementations_have_the_same_gradients(tiny_params):
  target = np.random.default_rng(3).normal(size=X.shape).astype(np.float32)

  def grads(**fields):
    model = UNet(**TINY, **fields)
    loss = lambda p, x: jnp.mean((model.apply({'params': p}, x, T, train=True) - target) ** 2)
    return _fast_jit(jax.grad(loss, argnums=(0, 1)), tiny_params, X)(tiny_params, X)

  want = grads()
  # Relative to each leaf, except leaves whose true gradient is 0 (the key biases: softmax ignores a constant
  # added to every logit of a row), which are compared against the tree's scale.
  scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
  for name, fields in CPU.items():
    got = grads(**fields)
    assert jax.tree.structure(got) == jax.tree.structure(want), name
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale, err_msg=name)


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): v for path, v in jax.tree.leaves_with_path(tree)}


def test_both_implementations_train_alike(tiny_params):
  """The project's train step (no dropout) from the same state: the same losses and parameters over 4 steps."""
  schedule = schedule_lib.get_schedule('linear', beta_end=0.2, num_timesteps=20)
  tx = train_lib.make_optimizer(lr=1e-3, warmup_steps=0, grad_clip=1.0)
  devices = jax.local_devices()[:1]
  batch = np.random.default_rng(4).uniform(-1, 1, (1, 4, 8, 8, 3)).astype(np.float32)
  key = jax.random.key(5)

  def run(model):
    settings = train_lib.StepSettings(
      model=model, schedule=schedule, tx=tx, lr_fn=train_lib.warmup_lr(1e-3, 0), ema_decay=0.9
    )
    step = train_lib.make_p_train_step(settings, devices=devices)
    state = data_parallel.replicate(train_lib.create_state(tiny_params, tx), devices)
    step = step.lower(state, batch, key).compile({'xla_backend_optimization_level': 0})
    losses = []
    for _ in range(4):
      state, metrics = step(state, batch, key)
      losses.append(float(metrics['loss']))
    return losses, data_parallel.unreplicate(state).params

  ref_losses, ref_params = run(UNet(**TINY))
  losses, params = run(UNet(**TINY, layers='cpu'))
  assert len(set(ref_losses)) == 4  # the steps change the loss: the parameters moved
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Adam moves each parameter by about lr per step whatever the size of its gradient, so single parameters with
  # near-zero gradients move by float32 noise (the key biases, whose true gradient is 0 as above, by noise alone,
  # without changing the function). Over all parameters the two updates agree to 1e-3 (measured: 2e-5); a
  # wrong gradient in any layer would change them by percents.
  p0, p_ref, p_cpu = _flat(tiny_params), _flat(ref_params), _flat(params)
  names = [n for n in p0 if not n.endswith('/k/bias')]
  d_ref = np.concatenate([np.ravel(p_ref[n] - p0[n]) for n in names])
  d_cpu = np.concatenate([np.ravel(p_cpu[n] - p0[n]) for n in names])
  assert np.linalg.norm(d_cpu - d_ref) < 1e-3 * np.linalg.norm(d_ref)


# ----------------------------------------------------------------------------------------------------------------
# The reference layers: forward-mode AD, dropout
# ----------------------------------------------------------------------------------------------------------------


def test_reference_model_forward_mode_against_finite_differences(tiny_params):
  """jax.jvp and jax.jacfwd through the reference U-Net, in the input and in the parameters, against central
  differences and against reverse mode.

  Tolerance of the float32 central differences: with step h = 1e-2 along unit-scale directions the truncation
  error is h**2 / 6 times the third derivative and the rounding error about 1e-7 * |f| / h = 1e-5 relative;
  measured, the differences agree with the JVP to about 1e-4 (relative L2). A JVP missing any term would be off by
  percents.
  """
  model = UNet(**TINY)
  p = tiny_params
  f = _fast_jit(lambda p, x: model.apply({'params': p}, x, T, train=False), p, X)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  h = 1e-2
  rng = np.random.default_rng(8)
  v, u = (rng.normal(size=X.shape).astype(np.float32) for _ in range(2))
  # In the input, and the same linear map as reverse mode: <u, J v> = <J^T u, v>.
  fx = lambda x: model.apply({'params': p}, x, T, train=False)
  y, jv = _fast_jit(lambda x, v: jax.jvp(fx, (x,), (v,)), X, v)(X, v)
  np.testing.assert_allclose(y, f(p, X), rtol=1e-6, atol=1e-6)
  assert rel(jv, (f(p, X + h * v) - f(p, X - h * v)) / (2 * h)) < 2e-3
  jtu = _fast_jit(lambda x, u: jax.vjp(fx, x)[1](u)[0], X, u)(X, u)
  np.testing.assert_allclose(jnp.vdot(u, jv), jnp.vdot(jtu, v), rtol=1e-4)
  # In the parameters (sensitivity analysis, consistency-model training).
  dp = jax.tree.map(lambda a: _rand(rng, *a.shape) * float(jnp.std(a) + 1e-3), p)
  fp = lambda p: model.apply({'params': p}, X, T, train=False)
  _, jp = _fast_jit(lambda p, dp: jax.jvp(fp, (p,), (dp,)), p, dp)(p, dp)
  shifted = lambda s: f(jax.tree.map(lambda a, d: a + s * d, p, dp), X)
  assert rel(jp, (shifted(h) - shifted(-h)) / (2 * h)) < 2e-3
  # jax.jacfwd over a 3-dimensional slice of the input, against finite differences.
  basis = rng.normal(size=(3,) + X.shape).astype(np.float32)
  g = lambda z: fx(X + jnp.tensordot(z, basis, 1))
  z = np.zeros(3, np.float32)
  jac = _fast_jit(jax.jacfwd(g), z)(z)
  assert jac.shape == y.shape + (3,)
  for i in range(3):
    assert rel(jac[..., i], (f(p, X + h * basis[i]) - f(p, X - h * basis[i])) / (2 * h)) < 2e-3


def test_reference_dropout_is_flax_dropout_at_the_exact_rate(tiny_params):
  """In train mode the reference U-Net drops with `nn.Dropout` at exactly the configured rate (kept values scaled
  by 1 / 0.9 to float32 rounding); the CPU layers with their 16-bit rate 6554/65536 (README deviation)."""
  x = np.random.default_rng(12).normal(size=(64, 8, 8, 3)).astype(np.float32)
  t = np.arange(64, dtype=np.int32)
  key = jax.random.key(13)

  def dropout_calls(model):
    """[(module class, its rate)] and the dropout layers' inputs and outputs, from one jitted train-mode call."""
    modules = []

    def fn(p, key):
      arrays = []

      def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == '__call__' and isinstance(context.module, (nn.Dropout, cpu_layers.Dropout)):
          modules.append((type(context.module), context.module.rate))
          arrays.append((args[0], out))
        return out

      with nn.intercept_methods(record):
        model.apply({'params': p}, x, t, train=True, rngs={'dropout': key})
      return arrays

    return modules, _fast_jit(fn, tiny_params, key)(tiny_params, key)

  for layers, cls, rate in (('reference', nn.Dropout, 0.1), ('cpu', cpu_layers.Dropout, 6554 / 65536)):
    modules, arrays = dropout_calls(UNet(**TINY, dropout=0.1, layers=layers))
    assert modules == [(cls, 0.1)] * 8  # one per ResBlock, at the configured rate
    dropped = total = 0
    for inp, out in arrays:
      inp, out = np.asarray(inp, np.float64), np.asarray(out, np.float64)
      kept = out != 0
      # 1 / 0.9 and 1 / (1 - 6554/65536) differ by 1.1e-5 relative: float32 rounding (6e-8) tells them apart.
      np.testing.assert_allclose(out[kept] / inp[kept], 1 / (1 - rate), rtol=1e-6)
      dropped, total = dropped + np.sum(~kept), total + kept.size
    # 360,448 draws: the dropped fraction's standard deviation is 5e-4.
    assert total == 64 * (3 * 8 * 8 * 16 + 5 * 4 * 4 * 32) and abs(dropped / total - 0.1) < 2.5e-3, layers


# ----------------------------------------------------------------------------------------------------------------
# The choice is made when the model is built, never while tracing
# ----------------------------------------------------------------------------------------------------------------

_FLAG = '--xla_cpu_experimental_ynn_fusion_type'


class _NoEnviron(dict):
  """An ``os.environ`` stand-in that fails on every read."""

  def _fail(self, *args, **kwargs):
    raise AssertionError(f'os.environ read while tracing: {args}')

  __getitem__ = get = __contains__ = __iter__ = keys = items = copy = _fail


def test_cpu_layers_read_no_environment_while_tracing(tiny_params, monkeypatch):
  """The tree reductions follow XLA_FLAGS when the model is built (`cpu_tuning.model_layers`); changing XLA_FLAGS
  afterwards does not change the traced program, and tracing reads no environment variable at all."""

  def build(value):
    monkeypatch.setenv('XLA_FLAGS', f'{_FLAG}={value}')
    return UNet(**TINY, **cpu_tuning.model_layers('auto', backend='cpu'))

  plain, tree = build('reduce'), build('individual_dot')
  assert plain.layers == tree.layers == 'cpu'
  assert not plain.cpu_tree_reductions and tree.cpu_tree_reductions

  def program(model, flags):
    monkeypatch.setenv('XLA_FLAGS', flags)
    return jax.jit(lambda p: model.apply({'params': p}, X, T, train=False)).lower(tiny_params).as_text()

  for model in (plain, tree):
    assert program(model, f'{_FLAG}=reduce') == program(model, f'{_FLAG}=individual_dot')
  assert program(plain, '') != program(tree, '')  # the field does change the program: the comparison can fail
  environ = os.environ
  os.environ = _NoEnviron()
  try:
    jax.jit(lambda p: tree.apply({'params': p}, X, T, train=False)).lower(tiny_params)
    jax.eval_shape(lambda p: jax.grad(lambda p: jnp.sum(plain.apply({'params': p}, X, T, train=True)))(p), tiny_params)
  finally:
    os.environ = environ
