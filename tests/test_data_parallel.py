"""The data-parallel helpers (`ddpm_jax.data_parallel`) on the 8 fake CPU devices of conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import data_parallel


def test_mesh_takes_every_device_in_order_and_refuses_none():
  mesh = data_parallel.make_mesh()
  assert mesh.axis_names == (data_parallel.AXIS,)
  assert list(mesh.devices) == jax.devices()
  with pytest.raises(ValueError, match='at least one device'):
    data_parallel.make_mesh([])


def test_replicate_places_the_whole_tree_on_every_device_and_unreplicate_returns_it():
  tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.float32(2.5)}
  rep = data_parallel.replicate(tree)
  assert rep['w'].shape == (2, 3)  # no device axis
  assert len(rep['w'].addressable_shards) == len(jax.devices())
  for shard in rep['w'].addressable_shards:
    np.testing.assert_array_equal(shard.data, tree['w'])
  back = data_parallel.unreplicate(rep)
  assert isinstance(back['w'], np.ndarray)
  np.testing.assert_array_equal(back['w'], tree['w'])
  assert back['b'] == 2.5


def test_map_over_devices_gives_each_device_its_block():
  devices = jax.devices()
  d = len(devices)
  assert d == 8, 'conftest should give 8 fake CPU devices'

  def fn(shared, x, y):
    # The device index shows that block i really ran on device i of the mesh.
    device = jax.lax.axis_index(data_parallel.AXIS)
    return {'sum': x * shared['scale'] + y[:, None], 'device': jnp.full(x.shape[:1], device)}

  run = data_parallel.map_over_devices(fn, devices)
  x = np.arange(d * 3 * 2, dtype=np.float32).reshape(d, 3, 2)
  y = np.arange(d * 3, dtype=np.float32).reshape(d, 3)
  shared = data_parallel.replicate({'scale': np.float32(2.0)}, devices)
  out = run(shared, x, y)
  np.testing.assert_allclose(np.asarray(out['sum']), x * 2.0 + y[..., None])
  np.testing.assert_array_equal(np.asarray(out['device']), np.repeat(np.arange(d)[:, None], 3, axis=1))
  # A host pytree works as the shared argument too, and a subset of the devices.
  two = data_parallel.map_over_devices(fn, devices[:2])
  out2 = two({'scale': np.float32(3.0)}, x[:2], y[:2])
  np.testing.assert_allclose(np.asarray(out2['sum']), x[:2] * 3.0 + y[:2, :, None])


def test_map_over_devices_names_a_wrong_leading_axis():
  run = data_parallel.map_over_devices(lambda shared, x: x, jax.devices()[:4])
  with pytest.raises(ValueError, match=r'argument 1 has shape \(3, 2\).*\[4, n, \.\.\.\]'):
    run({}, np.zeros((3, 2), np.float32))


def test_indexed_map_keys_each_index_alone_on_any_device_count():
  """Index i's result depends on (key, i, its inputs) only: the same on 1, 3 or 8 devices, in any batch."""

  def fn(shared, key, x, y):
    return {'value': x * shared + jax.random.normal(key, ()), 'y': y}

  x = np.arange(5, dtype=np.float32)
  y = np.arange(10, dtype=np.int32).reshape(5, 2)
  outs = [
    data_parallel.IndexedMap(fn, np.float32(2.0), key=7, devices=jax.devices()[:n])(np.arange(5), x, y)
    for n in (1, 3, 8)
  ]
  for out in outs[1:]:
    np.testing.assert_array_equal(out['value'], outs[0]['value'])
  np.testing.assert_array_equal(outs[0]['y'], y)  # padding rows are dropped
  expected = x * 2.0 + np.array([jax.random.normal(jax.random.fold_in(jax.random.key(7), i), ()) for i in range(5)])
  np.testing.assert_allclose(outs[0]['value'], expected, rtol=1e-6)
  run = data_parallel.IndexedMap(fn, None, key=jax.random.key(7))  # a key instead of a seed; shared per call
  np.testing.assert_array_equal(run([3, 4], x[3:], y[3:], shared=np.float32(2.0))['value'], outs[0]['value'][3:])
  with pytest.raises(ValueError, match='input 1 has shape'):
    run(np.arange(5), x[:4], y, shared=np.float32(1.0))
  with pytest.raises(ValueError, match='pass shared='):
    run(np.arange(5), x, y)
  with pytest.raises(ValueError, match='non-empty'):
    run(np.array([], np.int64), x[:0], y[:0], shared=np.float32(1.0))
