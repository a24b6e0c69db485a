"""Tests for ddpm_jax.models.unet (the DDPM U-Net).

Full-size models are only traced with ``jax.eval_shape`` (never compiled); all
numerical tests use tiny models.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from ddpm_jax.models import (
  UNet,
  count_params,
  get_timestep_embedding,
  unet_256,
  unet_cifar10,
  validate_unet_config,
  validate_unet_input,
)
from ddpm_jax.models.unet import AttnBlock, Downsample, ResnetBlock, Upsample, _TimestepMLP

ZERO_INIT_LAYERS = ('conv2', 'proj_out', 'conv_out')

# Tiny model: levels at 16x16 (no attn) and 8x8 (attn), 1 ResBlock per level.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8)


def _eval_shape_params(model, size):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, t, train=False), x, t)['params']


def _randomize(params, seed=0):
  """O(1)-output random values for a params tree (arrays or ShapeDtypeStructs).

  Used so that near-zero-initialised layers cannot hide bugs; numpy RNG keeps it
  free of XLA compilations.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for path, v in sorted(flatten_dict(params).items()):
    n = rng.standard_normal(v.shape).astype(np.float32)
    if path[-1] == 'kernel':
      out[path] = n / math.sqrt(int(np.prod(v.shape[:-1])))
    elif path[-1] == 'scale':
      out[path] = 1.0 + 0.1 * n
    else:
      out[path] = 0.1 * n
  return jax.tree_util.tree_map(jnp.asarray, unflatten_dict(out))


def _fast_jit(fn, *args):
  """jit + compile at XLA CPU optimisation level 0: same numbers, far less compile time."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})


def _shapes(module, *args, **kwargs):
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))['params']


# ----------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------

# Independent float64 numpy formula: sin(t*10000**(-k/(half-1))) then cos(...).
EMB8 = np.array(
  [
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0.84147098, 0.046399223, 0.002154433, 0.0001, 0.54030231, 0.99892298, 0.99999768, 1],
    [-0.96139749, 0.70969846, 0.036617202, 0.0016999992, -0.27516334, 0.70450557, 0.99932937, 0.99999856],
    [-0.026460753, 0.68486423, 0.8356485, 0.099733916, 0.99964985, -0.7286707, -0.54926458, 0.99501414],
  ]
)
EMB7 = np.array(
  [
    [0, 0, 0, 1, 1, 1, 0],
    [0.84147098, 0.0099998333, 0.0001, 0.54030231, 0.99995, 1, 0],
    [-0.96139749, 0.16918235, 0.0016999992, -0.27516334, 0.98558477, 0.99999856, 0],
    [-0.026460753, -0.53560333, 0.099733916, 0.99964985, -0.8444697, 0.99501414, 0],
  ]
)


@pytest.mark.parametrize('dim,expected', [(8, EMB8), (7, EMB7)])
def test_timestep_embedding_reference(dim, expected):
  t = jnp.array([0, 1, 17, 999], jnp.int32)
  emb = get_timestep_embedding(t, dim)
  assert emb.shape == (4, dim) and emb.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(emb), expected, rtol=0, atol=1e-4)


def test_timestep_embedding_rejects_bad_input():
  with pytest.raises(ValueError, match='2'):
    get_timestep_embedding(jnp.array([1]), 2)
  with pytest.raises(ValueError, match=r'\(2, 1\)'):
    get_timestep_embedding(jnp.zeros((2, 1), jnp.int32), 8)


# ----------------------------------------------------------------------------
# Full-size architectures (eval_shape only)
# ----------------------------------------------------------------------------


def test_cifar10_param_count_and_tree():
  p = _eval_shape_params(unet_cifar10(), 32)
  assert count_params(p) == 35_746_307
  assert set(p) == {
    'temb',
    'conv_in',
    'down_0',
    'down_1',
    'down_2',
    'down_3',
    'mid',
    'up_0',
    'up_1',
    'up_2',
    'up_3',
    'norm_out',
    'conv_out',
  }
  flat = {'/'.join(k): v.shape for k, v in flatten_dict(p).items()}
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(p))
  # 2 down@16, 1 mid@4, 3 up@16.
  attn = sorted({k.rsplit('/', 2)[0] for k in flat if '/attn_' in k})
  assert attn == ['down_1/attn_0', 'down_1/attn_1', 'mid/attn_1', 'up_1/attn_0', 'up_1/attn_1', 'up_1/attn_2']
  assert set(p['down_0']) == {'block_0', 'block_1', 'downsample'}
  assert 'downsample' not in p['down_3']
  assert set(p['up_3']) == {'block_0', 'block_1', 'block_2', 'upsample'}
  assert set(p['up_0']) == {'block_0', 'block_1', 'block_2'}
  assert set(p['mid']) == {'block_1', 'attn_1', 'block_2'}
  assert set(p['up_1']['attn_0']) == {'norm', 'q', 'k', 'v', 'proj_out'}
  assert set(p['down_1']['block_0']) == {'norm1', 'conv1', 'temb_proj', 'norm2', 'conv2', 'nin_shortcut'}
  assert 'nin_shortcut' not in p['down_0']['block_0']
  expected = {
    'temb/dense0/kernel': (128, 512),
    'temb/dense1/kernel': (512, 512),
    'conv_in/kernel': (3, 3, 3, 128),
    'down_0/block_0/conv1/kernel': (3, 3, 128, 128),
    'down_0/block_0/temb_proj/kernel': (512, 128),
    'down_0/downsample/conv/kernel': (3, 3, 128, 128),
    'down_1/block_0/nin_shortcut/kernel': (128, 256),
    'down_1/attn_0/q/kernel': (256, 256),
    'down_1/attn_0/norm/scale': (256,),
    'up_3/block_0/conv1/kernel': (3, 3, 512, 256),
    # skip order: up_1's last block gets down_0's downsample (128 ch)
    'up_1/block_2/conv1/kernel': (3, 3, 384, 256),
    'up_0/block_0/conv1/kernel': (3, 3, 384, 128),
    'up_0/block_0/nin_shortcut/kernel': (384, 128),
    'up_0/block_2/conv1/kernel': (3, 3, 256, 128),
    'up_1/upsample/conv/kernel': (3, 3, 256, 256),
    'norm_out/scale': (128,),
    'conv_out/kernel': (3, 3, 128, 3),
    'conv_out/bias': (3,),
  }
  for k, shape in expected.items():
    assert flat[k] == shape, k


def test_256_param_count():
  p = _eval_shape_params(unet_256(), 256)
  assert count_params(p) == 113_673_219
  attn = sorted({'/'.join(k[:2]) for k in flatten_dict(p) if k[1].startswith('attn_')})
  assert attn == ['down_4/attn_0', 'down_4/attn_1', 'mid/attn_1', 'up_4/attn_0', 'up_4/attn_1', 'up_4/attn_2']


def test_constructors_and_bf16_params():
  m = unet_cifar10(out_ch=6, dtype=jnp.bfloat16)
  assert (m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout, m.out_ch) == (
    128,
    (1, 2, 2, 2),
    2,
    (16,),
    0.1,
    6,
  )
  assert unet_256().dropout == 0.0 and unet_256().ch_mult == (1, 1, 2, 2, 4, 4)
  p = _eval_shape_params(m, 32)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(p))
  assert p['conv_out']['kernel'].shape == (3, 3, 128, 6)


# ----------------------------------------------------------------------------
# Tiny model: init and forward
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny():
  """Tiny model, its real initial params, inputs and O0-compiled eval/train forwards."""
  model = UNet(dropout=0.1, **TINY)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  t = jnp.array([3, 999], jnp.int32)
  key = jax.random.PRNGKey(0)
  params = _fast_jit(lambda k: model.init(k, x, t, train=False), key)(key)['params']
  fwd_eval = _fast_jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False), params, x, t)
  fwd_train = _fast_jit(
    lambda p, x, t, r: model.apply({'params': p}, x, t, train=True, rngs={'dropout': r}), params, x, t, key
  )
  return dict(model=model, params=params, x=x, t=t, fwd_eval=fwd_eval, fwd_train=fwd_train)


def test_tiny_tree(tiny):
  params = tiny['params']
  flat = {'/'.join(k) for k in flatten_dict(params)}
  modules = {k.rsplit('/', 1)[0] for k in flat}
  assert {m for m in modules if 'attn' in m} == {
    'down_1/attn_0/norm',
    'down_1/attn_0/q',
    'down_1/attn_0/k',
    'down_1/attn_0/v',
    'down_1/attn_0/proj_out',
    'mid/attn_1/norm',
    'mid/attn_1/q',
    'mid/attn_1/k',
    'mid/attn_1/v',
    'mid/attn_1/proj_out',
    'up_1/attn_0/norm',
    'up_1/attn_0/q',
    'up_1/attn_0/k',
    'up_1/attn_0/v',
    'up_1/attn_0/proj_out',
    'up_1/attn_1/norm',
    'up_1/attn_1/q',
    'up_1/attn_1/k',
    'up_1/attn_1/v',
    'up_1/attn_1/proj_out',
  }
  assert 'up_1/upsample/conv' in modules and 'down_0/downsample/conv' in modules
  assert not any(m.startswith('up_0/upsample') or m.startswith('down_1/downsample') for m in modules)


def test_initialization(tiny):
  params = tiny['params']
  checked_big = 0
  for path, w in flatten_dict(params).items():
    w = np.asarray(w)
    name = '/'.join(path)
    if path[-1] == 'bias':
      assert np.all(w == 0), name
    elif path[-1] == 'scale':
      assert np.all(w == 1), name
    else:
      assert path[-1] == 'kernel', name
      receptive = int(np.prod(w.shape[:-2])) if w.ndim > 2 else 1
      fan_avg = receptive * (w.shape[-2] + w.shape[-1]) / 2
      zero = path[-2] in ZERO_INIT_LAYERS
      limit = math.sqrt(3 * (1e-10 if zero else 1.0) / fan_avg)
      assert np.abs(w).max() <= limit * (1 + 1e-6), name
      if zero:
        assert np.abs(w).max() <= 1e-4 and np.abs(w).max() > 0, name
      elif w.size >= 4096:
        # Uniform(-L, L): max close to L, variance L^2/3, mean |w| = L/2.
        assert np.abs(w).max() > 0.95 * limit, name
        np.testing.assert_allclose(w.var(), limit**2 / 3, rtol=0.05, err_msg=name)
        np.testing.assert_allclose(np.abs(w).mean(), limit / 2, rtol=0.03, err_msg=name)
        checked_big += 1
  assert checked_big >= 5
  big = np.asarray(params['up_1']['block_0']['conv1']['kernel'])  # 3x3x128x64 = 73,728 entries
  assert big.shape == (3, 3, 128, 64)
  np.testing.assert_allclose(big.var(), 1.0 / (9 * (128 + 64) / 2), rtol=0.03)
  # conv_out ~ 0 => a freshly initialised net predicts ~0.
  out = tiny['fwd_eval'](params, tiny['x'], tiny['t'])
  assert np.abs(np.asarray(out)).max() < 1e-3


def test_forward_and_dropout(tiny):
  x, t, fwd_eval, fwd_train = tiny['x'], tiny['t'], tiny['fwd_eval'], tiny['fwd_train']
  p = _randomize(tiny['params'])
  out = np.asarray(fwd_eval(p, x, t))
  assert out.shape == (2, 16, 16, 3) and out.dtype == np.float32
  assert np.all(np.isfinite(out)) and out.std() > 0.1
  np.testing.assert_array_equal(np.asarray(fwd_eval(p, x, t)), out)  # eval is deterministic
  a = np.asarray(fwd_train(p, x, t, jax.random.PRNGKey(0)))
  b = np.asarray(fwd_train(p, x, t, jax.random.PRNGKey(1)))
  np.testing.assert_array_equal(np.asarray(fwd_train(p, x, t, jax.random.PRNGKey(0))), a)
  assert np.abs(a - b).max() > 1e-3  # dropout key matters in train mode
  assert np.abs(a - out).max() > 1e-3  # and dropout is off in eval mode
  # The timestep matters.
  assert np.abs(np.asarray(fwd_eval(p, x, t[::-1])) - out).max() > 1e-3
  # train=True with dropout=0 needs no RNG and equals eval mode (dropout skipped entirely).
  nodrop = UNet(dropout=0.0, **TINY)
  f0 = _fast_jit(lambda p, x, t: nodrop.apply({'params': p}, x, t, train=True), p, x, t)
  np.testing.assert_allclose(np.asarray(f0(p, x, t)), out, rtol=1e-5, atol=1e-5)


def test_bf16_forward(tiny):
  x, t = tiny['x'], tiny['t']
  p = _randomize(tiny['params'])
  model16 = UNet(dtype='bfloat16', **TINY)  # dtype names (as in configs) are accepted
  p16 = _shapes(model16, x, t, train=False)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(p16))
  assert jax.tree_util.tree_structure(p16) == jax.tree_util.tree_structure(p)
  f16 = _fast_jit(lambda p, x, t: model16.apply({'params': p}, x, t, train=False), p, x, t)
  out16 = f16(p, x, t)
  out32 = np.asarray(tiny['fwd_eval'](p, x, t))
  assert out16.dtype == jnp.float32 and out16.shape == out32.shape
  rel = np.linalg.norm(np.asarray(out16) - out32) / np.linalg.norm(out32)
  assert rel < 0.05, rel


# ----------------------------------------------------------------------------
# Building blocks against independent references
# ----------------------------------------------------------------------------


def _np_group_norm(x, scale, bias, groups, eps=1e-6):
  B, H, W, C = x.shape
  g = x.reshape(B, H, W, groups, C // groups).astype(np.float64)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(B, H, W, C) * scale + bias


def _np_conv3x3_same(x, k, b):
  """Stride-1 3x3 conv with symmetric zero padding 1 (== SAME for stride 1)."""
  B, H, W, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((B, H, W, k.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += xp[:, dy : dy + H, dx : dx + W, :] @ k[dy, dx]
  return out + b


def _swish(x):
  return x / (1 + np.exp(-x))


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize('layers', ['reference', 'cpu'])
def test_attention_block_matches_numpy(layers):
  # Small-variance input (var ~1e-5) so that GroupNorm's epsilon (1e-6, not 1e-5) matters.
  x = 0.003 * jax.random.normal(jax.random.PRNGKey(3), (2, 4, 6, 16))
  block = AttnBlock(num_groups=4, layers=layers)
  p = _randomize(_shapes(block, x), seed=5)
  out = np.asarray(_fast_jit(lambda p, x: block.apply({'params': p}, x), p, x)(p, x))
  n = _np(p)
  xn = np.asarray(x, np.float64)
  h = _np_group_norm(xn, n['norm']['scale'], n['norm']['bias'], 4)
  q, k, v = (h @ n[m]['kernel'] + n[m]['bias'] for m in ('q', 'k', 'v'))
  B, H, W, C = xn.shape
  q, k, v = q.reshape(B, H * W, C), k.reshape(B, H * W, C), v.reshape(B, H * W, C)
  logits = np.einsum('bic,bjc->bij', q, k) / np.sqrt(C)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum('bij,bjc->bic', w, v).reshape(B, H, W, C)
  ref = xn + a @ n['proj_out']['kernel'] + n['proj_out']['bias']
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_timestep_mlp_matches_numpy():
  t = jnp.array([0, 5, 999], jnp.int32)
  mlp = _TimestepMLP(ch=8)
  p = _randomize(_shapes(mlp, t), seed=7)
  assert p['dense0']['kernel'].shape == (8, 32) and p['dense1']['kernel'].shape == (32, 32)
  out = np.asarray(_fast_jit(lambda p, t: mlp.apply({'params': p}, t), p, t)(p, t))
  n = _np(p)
  h = np.asarray(get_timestep_embedding(t, 8), np.float64)  # checked against EMB8 above
  h = _swish(h @ n['dense0']['kernel'] + n['dense0']['bias'])
  ref = h @ n['dense1']['kernel'] + n['dense1']['bias']  # no activation after dense1
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('layers', ['reference', 'cpu'])
@pytest.mark.parametrize('c_in,c_out', [(8, 8), (8, 16)])
def test_resnet_block_matches_numpy(c_in, c_out, layers):
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, c_in))
  temb = jax.random.normal(jax.random.PRNGKey(4), (2, 12))
  block = ResnetBlock(c_out, num_groups=4, layers=layers)
  p = _randomize(_shapes(block, x, temb, train=False), seed=6)
  assert ('nin_shortcut' in p) == (c_in != c_out)
  f = _fast_jit(lambda p, x, e: block.apply({'params': p}, x, e, train=False), p, x, temb)
  out = np.asarray(f(p, x, temb))
  n = _np(p)
  xn, tn = np.asarray(x, np.float64), np.asarray(temb, np.float64)
  h = _swish(_np_group_norm(xn, n['norm1']['scale'], n['norm1']['bias'], 4))
  h = _np_conv3x3_same(h, n['conv1']['kernel'], n['conv1']['bias'])
  h = h + (_swish(tn) @ n['temb_proj']['kernel'] + n['temb_proj']['bias'])[:, None, None, :]
  h = _swish(_np_group_norm(h, n['norm2']['scale'], n['norm2']['bias'], 4))
  h = _np_conv3x3_same(h, n['conv2']['kernel'], n['conv2']['bias'])
  if c_in != c_out:
    xn = xn @ n['nin_shortcut']['kernel'] + n['nin_shortcut']['bias']
  np.testing.assert_allclose(out, xn + h, rtol=1e-4, atol=1e-4)


def test_downsample_uses_tf_same_padding():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  ds = Downsample(with_conv=True)
  p = _randomize(_shapes(ds, x))
  out = np.asarray(_fast_jit(lambda p, x: ds.apply({'params': p}, x), p, x)(p, x))
  assert out.shape == (2, 4, 4, 4)

  def conv(pad):
    y = jax.lax.conv_general_dilated(x, p['conv']['kernel'], (2, 2), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return np.asarray(y + p['conv']['bias'])

  np.testing.assert_allclose(out, conv(((0, 1), (0, 1))), rtol=1e-5, atol=1e-5)
  assert np.abs(out - conv(((1, 1), (1, 1)))).max() > 1e-2
  # avg-pool variant: 2x2 mean, no parameters.
  pool = Downsample(with_conv=False)
  assert jax.eval_shape(lambda: pool.init(jax.random.PRNGKey(1), x)) == {}
  ref = np.asarray(x).reshape(2, 4, 2, 4, 2, 4).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(pool.apply({}, x)), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('layers', ['reference', 'cpu'])
def test_upsample_is_pixel_repetition(layers):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4))
  rep = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
  up = Upsample(with_conv=False, layers=layers)
  np.testing.assert_array_equal(np.asarray(up.apply({}, x)), rep)
  upc = Upsample(with_conv=True, layers=layers)
  p = _randomize(_shapes(upc, x))
  out = np.asarray(_fast_jit(lambda p, x: upc.apply({'params': p}, x), p, x)(p, x))
  ref = _np_conv3x3_same(rep.astype(np.float64), *(np.asarray(p['conv'][k], np.float64) for k in ('kernel', 'bias')))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Validation (all raised in Python, before compilation)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(ch_mult=()), r'ch_mult.*\(\)'),
    (dict(ch_mult=(1, 0)), r'ch_mult=\(1, 0\)'),
    (dict(num_res_blocks=0), r'num_res_blocks.*0'),
    (dict(dropout=1.0), r'dropout.*1\.0'),
    (dict(dropout=-0.1), r'dropout.*-0\.1'),
    (dict(ch=48), r'num_groups=32.*48'),
    (dict(ch=64, num_groups=0), r'num_groups.*0'),
    (dict(attn_resolutions=16), r'attn_resolutions.*16'),
    (dict(dtype=jnp.int32), r'dtype.*int32'),
    (dict(param_dtype='float33'), r'param_dtype.*float33'),
    (dict(ch=2, num_groups=1), r'ch must be >= 4.*2'),
    (dict(layers='gpu'), r"layers must be one of \('reference', 'cpu'\); got 'gpu'"),
    (dict(layers=None), r'layers must be one of.*None'),
    (dict(cpu_tree_reductions=True), r"cpu_tree_reductions=True.*layers='reference'"),
    (dict(layers='cpu', cpu_tree_reductions='yes'), r'cpu_tree_reductions must be a bool.*yes'),
  ],
)
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    UNet(**kwargs)
  with pytest.raises(ValueError, match=match):
    validate_unet_config(**kwargs)


def test_unknown_field():
  with pytest.raises(ValueError, match='chanels'):
    unet_cifar10(chanels=64)
  with pytest.raises(ValueError, match='bogus'):
    unet_256(bogus=1)


def test_layers_field():
  """The implementation choice: 'reference' by default everywhere, settable in the constructors and by clone, and
  kept apart from the architecture fields (two models that differ only there are the same network)."""
  assert UNet().layers == unet_cifar10().layers == unet_256().layers == 'reference'
  m = unet_cifar10(layers='cpu', cpu_tree_reductions=True)
  assert m.layer_fields() == {'layers': 'cpu', 'cpu_tree_reductions': True}
  assert m.config_fields() == unet_cifar10().config_fields()
  assert unet_cifar10().clone(**m.layer_fields()).layer_fields() == m.layer_fields()
  with pytest.raises(ValueError, match="'tpu'"):
    unet_cifar10().clone(layers='tpu')  # clone validates too


def test_input_validation():
  m = unet_cifar10()
  m.check_input_shape((4, 32, 32, 3), (4,))
  m.check_input_shape((4, 16, 24, 3))  # non-square is fine if both sides divide by 8
  with pytest.raises(ValueError, match=r'height 30.*8'):
    m.check_input_shape((4, 30, 32, 3))
  with pytest.raises(ValueError, match=r'width 20'):
    validate_unet_input((4, 32, 20, 3), ch_mult=(1, 2, 2, 2))
  with pytest.raises(ValueError, match=r'4-D.*\(32, 32, 3\)'):
    m.check_input_shape((32, 32, 3))
  with pytest.raises(ValueError, match=r'\(4,\).*\(3,\)'):
    m.check_input_shape((4, 32, 32, 3), (3,))
  with pytest.raises(ValueError, match=r'\(4, 1\)'):
    m.check_input_shape((4, 32, 32, 3), (4, 1))


def test_call_validates_at_trace_time():
  m = UNet(**TINY)
  key = jax.random.PRNGKey(0)
  bad_x = jax.ShapeDtypeStruct((2, 15, 16, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  with pytest.raises(ValueError, match='height 15'):
    jax.eval_shape(lambda x, t: m.init(key, x, t, train=False), bad_x, t)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  with pytest.raises(ValueError, match=r'\(5,\)'):
    jax.eval_shape(lambda x, t: m.init(key, x, t, train=False), x, jax.ShapeDtypeStruct((5,), jnp.int32))


def test_remat_keeps_tree_and_outputs(tiny):
  """remat=True: same parameter tree, same outputs, same gradients (only the backward's memory changes)."""
  x, t, key = tiny['x'], tiny['t'], jax.random.PRNGKey(0)
  p = _randomize(tiny['params'])
  remat = UNet(dropout=0.1, remat=True, **TINY)
  remat_shapes = _shapes(remat, x, t, train=False)
  sig = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)
  assert sig(remat_shapes) == sig(_shapes(tiny['model'], x, t, train=False))
  assert count_params(remat_shapes) == count_params(tiny['params'])
  assert (
    count_params(_shapes(unet_cifar10(remat=True), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32), train=False))
    == 35_746_307
  )
  # Same initial values from the same key.
  init = _fast_jit(lambda k: remat.init(k, x, t, train=False), key)(key)['params']
  jax.tree_util.tree_map(np.testing.assert_array_equal, init, tiny['params'])
  fwd = _fast_jit(lambda p, x, t: remat.apply({'params': p}, x, t, train=False), p, x, t)
  np.testing.assert_array_equal(np.asarray(fwd(p, x, t)), np.asarray(tiny['fwd_eval'](p, x, t)))

  def loss(model):
    return lambda p, r: jnp.mean(model.apply({'params': p}, x, t, train=True, rngs={'dropout': r}) ** 2)

  g_remat = _fast_jit(jax.value_and_grad(loss(remat)), p, key)(p, key)
  g_plain = _fast_jit(jax.value_and_grad(loss(tiny['model'])), p, key)(p, key)
  np.testing.assert_allclose(np.asarray(g_remat[0]), np.asarray(g_plain[0]), rtol=1e-6)  # same dropout masks
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_remat[1], g_plain[1])
  assert UNet(remat=True, **TINY).config_fields()['remat'] is True
  with pytest.raises(ValueError, match='remat'):
    UNet(remat='yes', **TINY)
