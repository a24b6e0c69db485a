"""FID InceptionV3: architecture against an independent layer table, pooling/resize/conv semantics against numpy,
weight (de)serialisation and the pytorch-fid converter. Random weights only: no download on this machine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import inception as inc


# ------------------------------------------------------------------------------------------------------------------
# Independent layer table of pytorch-fid's FIDInceptionV3: (module path, C_in, C_out, kh, kw) per BasicConv2d.


def _layer_table():
  t = []

  def conv(name, cin, cout, kh, kw=None):
    t.append((name, cin, cout, kh, kh if kw is None else kw))

  conv('Conv2d_1a_3x3', 3, 32, 3)
  conv('Conv2d_2a_3x3', 32, 32, 3)
  conv('Conv2d_2b_3x3', 32, 64, 3)
  conv('Conv2d_3b_1x1', 64, 80, 1)
  conv('Conv2d_4a_3x3', 80, 192, 3)
  for name, cin, pf in [('Mixed_5b', 192, 32), ('Mixed_5c', 256, 64), ('Mixed_5d', 288, 64)]:
    conv(f'{name}/branch1x1', cin, 64, 1)
    conv(f'{name}/branch5x5_1', cin, 48, 1)
    conv(f'{name}/branch5x5_2', 48, 64, 5)
    conv(f'{name}/branch3x3dbl_1', cin, 64, 1)
    conv(f'{name}/branch3x3dbl_2', 64, 96, 3)
    conv(f'{name}/branch3x3dbl_3', 96, 96, 3)
    conv(f'{name}/branch_pool', cin, pf, 1)
  conv('Mixed_6a/branch3x3', 288, 384, 3)
  conv('Mixed_6a/branch3x3dbl_1', 288, 64, 1)
  conv('Mixed_6a/branch3x3dbl_2', 64, 96, 3)
  conv('Mixed_6a/branch3x3dbl_3', 96, 96, 3)
  for name, c7 in [('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)]:
    conv(f'{name}/branch1x1', 768, 192, 1)
    conv(f'{name}/branch7x7_1', 768, c7, 1)
    conv(f'{name}/branch7x7_2', c7, c7, 1, 7)
    conv(f'{name}/branch7x7_3', c7, 192, 7, 1)
    conv(f'{name}/branch7x7dbl_1', 768, c7, 1)
    conv(f'{name}/branch7x7dbl_2', c7, c7, 7, 1)
    conv(f'{name}/branch7x7dbl_3', c7, c7, 1, 7)
    conv(f'{name}/branch7x7dbl_4', c7, c7, 7, 1)
    conv(f'{name}/branch7x7dbl_5', c7, 192, 1, 7)
    conv(f'{name}/branch_pool', 768, 192, 1)
  conv('Mixed_7a/branch3x3_1', 768, 192, 1)
  conv('Mixed_7a/branch3x3_2', 192, 320, 3)
  conv('Mixed_7a/branch7x7x3_1', 768, 192, 1)
  conv('Mixed_7a/branch7x7x3_2', 192, 192, 1, 7)
  conv('Mixed_7a/branch7x7x3_3', 192, 192, 7, 1)
  conv('Mixed_7a/branch7x7x3_4', 192, 192, 3)
  for name, cin in [('Mixed_7b', 1280), ('Mixed_7c', 2048)]:
    conv(f'{name}/branch1x1', cin, 320, 1)
    conv(f'{name}/branch3x3_1', cin, 384, 1)
    conv(f'{name}/branch3x3_2a', 384, 384, 1, 3)
    conv(f'{name}/branch3x3_2b', 384, 384, 3, 1)
    conv(f'{name}/branch3x3dbl_1', cin, 448, 1)
    conv(f'{name}/branch3x3dbl_2', 448, 384, 3)
    conv(f'{name}/branch3x3dbl_3a', 384, 384, 1, 3)
    conv(f'{name}/branch3x3dbl_3b', 384, 384, 3, 1)
    conv(f'{name}/branch_pool', cin, 192, 1)
  return t


@functools.lru_cache(maxsize=1)
def _shapes():
  return inc.variable_shapes()


def test_parameter_count_matches_fid_inception():
  table = _layer_table()
  assert len(table) == 94  # 94 BasicConv2d = 94 BatchNorms in torchvision's InceptionV3 without the aux head
  conv_bn = sum(kh * kw * cin * cout + 2 * cout for _, cin, cout, kh, kw in table)
  fc = 2048 * 1008 + 1008
  running_stats = sum(2 * cout for _, _, cout, _, _ in table)
  # pytorch-fid's FIDInceptionV3 state dict: 23,885,392 numbers = 23,850,960 trainable + 34,432 BN running stats.
  assert conv_bn + fc == 23_850_960
  assert conv_bn + fc + running_stats == 23_885_392

  shapes = _shapes()
  n_params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith('params/'))
  n_stats = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith('batch_stats/'))
  assert n_params == 23_850_960
  assert n_params + n_stats == 23_885_392
  # Every layer of the table, with its exact kernel/BN shapes, and nothing else.
  expected = {'params/fc/kernel': (2048, 1008), 'params/fc/bias': (1008,)}
  for name, cin, cout, kh, kw in table:
    expected[f'params/{name}/conv/kernel'] = (kh, kw, cin, cout)
    for leaf in (
      'params/{}/bn/scale',
      'params/{}/bn/bias',
      'batch_stats/{}/bn/mean',
      'batch_stats/{}/bn/var',
    ):
      expected[leaf.format(name)] = (cout,)
  assert shapes == expected


@pytest.mark.parametrize(
  'name, shape',
  [
    ('params/Conv2d_1a_3x3/conv/kernel', (3, 3, 3, 32)),
    ('params/Mixed_5b/branch5x5_2/conv/kernel', (5, 5, 48, 64)),
    ('params/Mixed_6b/branch7x7_2/conv/kernel', (1, 7, 128, 128)),
    ('params/Mixed_7c/branch3x3dbl_3b/conv/kernel', (3, 1, 384, 384)),
    ('batch_stats/Mixed_7c/branch_pool/bn/var', (192,)),
    ('params/fc/kernel', (2048, 1008)),
    ('params/fc/bias', (1008,)),
  ],
)
def test_exact_shapes(name, shape):
  assert _shapes()[name] == shape


def test_output_shapes_from_any_input_size():
  variables = jax.eval_shape(
    inc.InceptionV3().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  )
  out = jax.eval_shape(inc.InceptionV3().apply, variables, jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.uint8))
  assert out['pool'].shape == (3, 2048) and out['logits'].shape == (3, 1008)
  assert out['pool'].dtype == jnp.float32


# ------------------------------------------------------------------------------------------------------------------
# Semantics of the pieces, against numpy


def _np_resize_bilinear_half_pixel(img, out):
  """numpy PyTorch F.interpolate(bilinear, align_corners=False): src = (i+0.5)*in/out - 0.5, clamped at 0."""

  def weights(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = min(int(np.floor(src)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      lam = src - i0
      m[i, i0] += 1.0 - lam
      m[i, i1] += lam
    return m

  wh, ww = weights(img.shape[0], out), weights(img.shape[1], out)
  return np.einsum('ah,bw,hwc->abc', wh, ww, img.astype(np.float64), optimize=True)


@pytest.mark.parametrize('n_in, n_out', [(32, 299), (5, 13), (13, 5), (299, 299)])
def test_resize_matches_pytorch_align_corners_false(n_in, n_out):
  img = np.random.default_rng(n_in).uniform(0, 255, (n_in, n_in, 3))
  got = np.asarray(inc.resize_bilinear(img[None], n_out))[0]
  # atol: float32 rounding on a 0..255 scale; a wrong convention (align_corners, no clamping) is off by whole levels.
  np.testing.assert_allclose(got, _np_resize_bilinear_half_pixel(img, n_out), rtol=0, atol=1e-3)


def test_preprocess_scales_to_minus_one_one():
  x = np.array([0, 255, 51], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=-1)
  got = np.asarray(inc.preprocess(x, resize=False))[0, 0, :, 0]
  np.testing.assert_allclose(got, [-1.0, 1.0, 2 * 51 / 255 - 1], atol=1e-6)


def test_avg_pool_excludes_padding():
  x = np.random.default_rng(0).normal(size=(1, 4, 5, 2))
  ref = np.zeros_like(x)
  for i in range(4):
    for j in range(5):
      ref[0, i, j] = x[0, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean(axis=(0, 1))
  np.testing.assert_allclose(np.asarray(inc.avg_pool_3x3_exclude_pad(jnp.asarray(x))), ref, atol=1e-6)


def test_max_pool_padding_is_minus_infinity():
  x = -1.0 - np.random.default_rng(1).uniform(size=(1, 4, 4, 1))  # all negative: zero padding would win
  got = np.asarray(inc.max_pool_3x3(jnp.asarray(x), stride=1, pad=1))
  assert got[0, 0, 0, 0] == pytest.approx(x[0, :2, :2].max())
  assert (got < 0).all()


def test_basic_conv_matches_numpy_conv_bn_relu():
  """Asymmetric (1,7) kernel with padding (0,3), BatchNorm with eps 1e-3 from running statistics, ReLU."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 5, 9, 2)).astype(np.float32)
  block = inc.BasicConv2d(3, (1, 7), padding=((0, 0), (3, 3)))
  k = rng.normal(size=(1, 7, 2, 3)).astype(np.float32)
  scale, bias, mean = (rng.normal(size=3).astype(np.float32) for _ in range(3))
  var = rng.uniform(1e-3, 2e-3, size=3).astype(np.float32)  # small var: eps 1e-3 vs 1e-5 matters
  variables = {
    'params': {'conv': {'kernel': k}, 'bn': {'scale': scale, 'bias': bias}},
    'batch_stats': {'bn': {'mean': mean, 'var': var}},
  }
  got = np.asarray(block.apply(variables, x))
  xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (3, 3), (0, 0)))
  conv = np.zeros((1, 5, 9, 3))
  for j in range(9):
    conv[0, :, j] = np.einsum('hwc,wco->ho', xp[0, :, j : j + 7], k[0])  # k[0]: [kw, C_in, C_out]
  ref = np.maximum((conv - mean) / np.sqrt(var + 1e-3) * scale + bias, 0.0)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Whole network with random weights: one compiled forward pass on one 32x32 image.


def _random_flat(seed=0):
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in _shapes().items():
    if name.endswith('kernel'):
      fan_in = int(np.prod(shape[:-1]))
      flat[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif name.endswith('scale') or name.endswith('var'):
      flat[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      flat[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return flat


_CAPTURE = ('Mixed_5d', 'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c')


@functools.lru_cache(maxsize=1)
def _forward():
  def f(variables, images):
    def keep(mdl, _):
      return mdl.name in _CAPTURE or mdl.name == 'branch_pool'

    return inc.InceptionV3().apply(variables, images, capture_intermediates=keep, mutable=['intermediates'])

  return jax.jit(f)


def test_save_load_round_trip_and_graph_semantics(tmp_path):
  flat = _random_flat()
  variables = inc.unflatten_variables(flat)
  path = tmp_path / 'inception_random.npz'
  inc.save_inception_params(path, variables)
  loaded = inc.load_inception_params(path)
  image = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)

  out, state = _forward()(variables, image)
  out2, _ = _forward()(loaded, image)
  np.testing.assert_array_equal(np.asarray(out['pool']), np.asarray(out2['pool']))
  np.testing.assert_array_equal(np.asarray(out['logits']), np.asarray(out2['logits']))
  assert np.isfinite(np.asarray(out['logits'])).all()

  inter = state['intermediates']
  spatial = {name: inter[name]['__call__'][0].shape for name in _CAPTURE}
  assert spatial == {
    'Mixed_5d': (1, 35, 35, 288),
    'Mixed_6e': (1, 17, 17, 768),
    'Mixed_7a': (1, 8, 8, 1280),
    'Mixed_7b': (1, 8, 8, 2048),
    'Mixed_7c': (1, 8, 8, 2048),
  }
  x7a, x7b, x7c = (np.asarray(inter[n]['__call__'][0]) for n in ('Mixed_7a', 'Mixed_7b', 'Mixed_7c'))
  # pool = global mean of Mixed_7c; logits = fc(pool) with bias.
  np.testing.assert_allclose(np.asarray(out['pool']), x7c.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(out['logits']),
    np.asarray(out['pool']) @ flat['params/fc/kernel'] + flat['params/fc/bias'],
    rtol=1e-4,
    atol=1e-4,
  )

  # Pool branches: Mixed_7b (FIDInceptionE_1) avg-pools without padding, Mixed_7c (FIDInceptionE_2) max-pools.
  def branch(block, pooled):
    v = {
      'params': variables['params'][block]['branch_pool'],
      'batch_stats': variables['batch_stats'][block]['branch_pool'],
    }
    return np.asarray(inc.BasicConv2d(192).apply(v, pooled))

  got_7b = np.asarray(inter['Mixed_7b']['branch_pool']['__call__'][0])
  got_7c = np.asarray(inter['Mixed_7c']['branch_pool']['__call__'][0])
  np.testing.assert_allclose(got_7b, branch('Mixed_7b', inc.avg_pool_3x3_exclude_pad(x7a)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got_7c, branch('Mixed_7c', inc.max_pool_3x3(x7b, 1, 1)), rtol=1e-4, atol=1e-4)
  assert not np.allclose(got_7c, branch('Mixed_7c', inc.avg_pool_3x3_exclude_pad(x7b)), atol=1e-3)
  # The concatenation order puts branch_pool last (channels 1856..2047), as in torch.cat([...], 1).
  np.testing.assert_array_equal(x7c[..., -192:], got_7c)


def test_load_rejects_incomplete_or_misshapen_files(tmp_path):
  flat = _random_flat()
  del flat['params/fc/bias']
  np.savez(tmp_path / 'missing.npz', **flat)
  with pytest.raises(ValueError, match='missing'):
    inc.load_inception_params(tmp_path / 'missing.npz')
  flat = _random_flat()
  flat['params/fc/kernel'] = flat['params/fc/kernel'].T
  np.savez(tmp_path / 'transposed.npz', **flat)
  with pytest.raises(ValueError, match='shape'):
    inc.load_inception_params(tmp_path / 'transposed.npz')


# ------------------------------------------------------------------------------------------------------------------
# pytorch-fid conversion


def _fake_pytorch_state_dict(seed=0):
  """Random arrays under pytorch-fid's state-dict names, in PyTorch layouts (He-scaled so activations stay O(1))."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, cin, cout, kh, kw in _layer_table():
    prefix = name.replace('/', '.')
    he = np.float32(np.sqrt(2.0 / (cin * kh * kw)))
    sd[f'{prefix}.conv.weight'] = rng.standard_normal((cout, cin, kh, kw), dtype=np.float32) * he
    sd[f'{prefix}.bn.weight'] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    sd[f'{prefix}.bn.bias'] = rng.standard_normal(cout).astype(np.float32)
    sd[f'{prefix}.bn.running_mean'] = rng.standard_normal(cout).astype(np.float32)
    sd[f'{prefix}.bn.running_var'] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    sd[f'{prefix}.bn.num_batches_tracked'] = np.array(0, np.int64)
  sd['fc.weight'] = rng.standard_normal((1008, 2048), dtype=np.float32)
  sd['fc.bias'] = rng.standard_normal(1008).astype(np.float32)
  return sd


def _check_converted(sd, variables):
  p, s = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(
    np.asarray(p['Mixed_6b']['branch7x7_2']['conv']['kernel']),
    sd['Mixed_6b.branch7x7_2.conv.weight'].transpose(2, 3, 1, 0),
  )
  assert p['Mixed_6b']['branch7x7_2']['conv']['kernel'].shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(
    np.asarray(p['Conv2d_1a_3x3']['conv']['kernel'])[1, 2, 0, 5], sd['Conv2d_1a_3x3.conv.weight'][5, 0, 1, 2]
  )
  np.testing.assert_array_equal(np.asarray(p['fc']['kernel']), sd['fc.weight'].T)
  np.testing.assert_array_equal(np.asarray(p['fc']['bias']), sd['fc.bias'])
  np.testing.assert_array_equal(
    np.asarray(p['Mixed_7c']['branch_pool']['bn']['scale']), sd['Mixed_7c.branch_pool.bn.weight']
  )
  np.testing.assert_array_equal(
    np.asarray(s['Mixed_7c']['branch_pool']['bn']['mean']), sd['Mixed_7c.branch_pool.bn.running_mean']
  )
  np.testing.assert_array_equal(
    np.asarray(s['Mixed_5b']['branch1x1']['bn']['var']), sd['Mixed_5b.branch1x1.bn.running_var']
  )


def test_convert_state_dict_by_name(tmp_path):
  sd = _fake_pytorch_state_dict()
  flat = inc.convert_pytorch_state_dict(sd)
  assert set(flat) == set(_shapes())
  path = tmp_path / 'converted.npz'
  inc.save_inception_params(path, inc.unflatten_variables(flat))
  _check_converted(sd, inc.load_inception_params(path))
  with pytest.raises(ValueError, match='AuxLogits'):
    inc.convert_pytorch_state_dict({**sd, 'AuxLogits.fc.weight': np.zeros((1008, 768))})


def _torch_fid_inception(torch, sd, images):
  """Independent PyTorch (NCHW, torch.nn.functional) forward of pytorch-fid's FIDInceptionV3 from a state dict."""
  f = torch.nn.functional
  w = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}

  def conv(x, name, stride=1, pad=(0, 0)):
    x = f.conv2d(x, w[f'{name}.conv.weight'], stride=stride, padding=pad)
    x = f.batch_norm(
      x,
      w[f'{name}.bn.running_mean'],
      w[f'{name}.bn.running_var'],
      w[f'{name}.bn.weight'],
      w[f'{name}.bn.bias'],
      training=False,
      eps=1e-3,
    )
    return f.relu(x)

  def avg(x):
    return f.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  cat = functools.partial(torch.cat, dim=1)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = 2 * f.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
  x = conv(conv(conv(x, 'Conv2d_1a_3x3', 2), 'Conv2d_2a_3x3'), 'Conv2d_2b_3x3', pad=(1, 1))
  x = conv(conv(f.max_pool2d(x, 3, 2), 'Conv2d_3b_1x1'), 'Conv2d_4a_3x3')
  x = f.max_pool2d(x, 3, 2)
  for m in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
    b5 = conv(conv(x, f'{m}.branch5x5_1'), f'{m}.branch5x5_2', pad=(2, 2))
    bd = conv(conv(x, f'{m}.branch3x3dbl_1'), f'{m}.branch3x3dbl_2', pad=(1, 1))
    bd = conv(bd, f'{m}.branch3x3dbl_3', pad=(1, 1))
    x = cat([conv(x, f'{m}.branch1x1'), b5, bd, conv(avg(x), f'{m}.branch_pool')])
  bd = conv(conv(x, 'Mixed_6a.branch3x3dbl_1'), 'Mixed_6a.branch3x3dbl_2', pad=(1, 1))
  x = cat([conv(x, 'Mixed_6a.branch3x3', 2), conv(bd, 'Mixed_6a.branch3x3dbl_3', 2), f.max_pool2d(x, 3, 2)])
  for m in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
    b7 = conv(x, f'{m}.branch7x7_1')
    b7 = conv(conv(b7, f'{m}.branch7x7_2', pad=(0, 3)), f'{m}.branch7x7_3', pad=(3, 0))
    bd = conv(x, f'{m}.branch7x7dbl_1')
    for i, pad in zip((2, 3, 4, 5), ((3, 0), (0, 3), (3, 0), (0, 3))):
      bd = conv(bd, f'{m}.branch7x7dbl_{i}', pad=pad)
    x = cat([conv(x, f'{m}.branch1x1'), b7, bd, conv(avg(x), f'{m}.branch_pool')])
  b3 = conv(conv(x, 'Mixed_7a.branch3x3_1'), 'Mixed_7a.branch3x3_2', 2)
  b7 = conv(conv(x, 'Mixed_7a.branch7x7x3_1'), 'Mixed_7a.branch7x7x3_2', pad=(0, 3))
  b7 = conv(conv(b7, 'Mixed_7a.branch7x7x3_3', pad=(3, 0)), 'Mixed_7a.branch7x7x3_4', 2)
  x = cat([b3, b7, f.max_pool2d(x, 3, 2)])
  for m, pool in (('Mixed_7b', avg), ('Mixed_7c', lambda t: f.max_pool2d(t, 3, stride=1, padding=1))):
    b3 = conv(x, f'{m}.branch3x3_1')
    b3 = cat([conv(b3, f'{m}.branch3x3_2a', pad=(0, 1)), conv(b3, f'{m}.branch3x3_2b', pad=(1, 0))])
    bd = conv(conv(x, f'{m}.branch3x3dbl_1'), f'{m}.branch3x3dbl_2', pad=(1, 1))
    bd = cat([conv(bd, f'{m}.branch3x3dbl_3a', pad=(0, 1)), conv(bd, f'{m}.branch3x3dbl_3b', pad=(1, 0))])
    x = cat([conv(x, f'{m}.branch1x1'), b3, bd, conv(pool(x), f'{m}.branch_pool')])
  pool = x.mean(dim=(2, 3))
  return pool.numpy(), (pool @ w['fc.weight'].T + w['fc.bias']).numpy()


def test_convert_pytorch_fid_pth_file_and_match_pytorch_forward(tmp_path):
  torch = pytest.importorskip('torch')
  sd = _fake_pytorch_state_dict(1)
  pth = tmp_path / 'pt_inception-fake.pth'
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  npz = inc.convert_pytorch_fid_weights(pth, tmp_path / 'fid_inception.npz')
  variables = inc.load_inception_params(npz)
  _check_converted(sd, variables)
  direct = inc.load_inception_params(pth)  # .pth read and converted in memory
  np.testing.assert_array_equal(np.asarray(direct['params']['fc']['kernel']), sd['fc.weight'].T)

  # The whole network against an independent PyTorch forward with the same weights and pytorch-fid's input path.
  image = np.random.default_rng(4).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  with torch.no_grad():
    ref_pool, ref_logits = _torch_fid_inception(torch, sd, image)
  out, _ = _forward()(variables, image)
  scale = np.abs(ref_pool).max()
  np.testing.assert_allclose(np.asarray(out['pool']), ref_pool, rtol=0, atol=1e-4 * scale)
  np.testing.assert_allclose(np.asarray(out['logits']), ref_logits, rtol=0, atol=1e-4 * np.abs(ref_logits).max())


def test_fetch_inception_weights_checks_the_hash_and_fails_clearly_offline(tmp_path, monkeypatch):
  """The download path, with file:// URLs (no network here): a wrong file is refused and leaves nothing behind."""
  fake = tmp_path / 'fake.pth'
  fake.write_bytes(b'not the inception weights')
  dest = tmp_path / 'cache'
  with pytest.raises(RuntimeError, match='sha256'):
    inc.fetch_inception_weights(dest, url=fake.as_uri())
  assert not dest.exists() or not any(dest.iterdir())
  with pytest.raises(RuntimeError, match='Could not download'):
    inc.fetch_inception_weights(dest, url=(tmp_path / 'missing.pth').as_uri())
  # An already present file is used as is (no download); the cache folder comes from DDPM_JAX_CACHE.
  monkeypatch.setenv('DDPM_JAX_CACHE', str(dest))
  dest.mkdir(exist_ok=True)
  (dest / inc.PYTORCH_FID_WEIGHTS_FILENAME).write_bytes(b'x')
  assert inc.fetch_inception_weights(url='file:///nowhere') == str(dest / inc.PYTORCH_FID_WEIGHTS_FILENAME)
