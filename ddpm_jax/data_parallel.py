"""Data parallelism: the 1-D device mesh, placing arrays on it, and mapping a function over its devices.

Everything in ddpm_jax that runs on several devices is `jax.jit` of `jax.shard_map` over the mesh of `make_mesh`:
the train step and the in-training sampler (`ddpm_jax.train_lib`), ``sample.py``'s sampler
(`ddpm_jax.sample_lib.BatchSampler`) and the bits/dim evaluation (`ddpm_jax.evaluation.bpd_over_dataset`).
Shared values (parameters, the train state) are replicated whole on every device (`replicate`, sharding ``P()``:
no device axis, so a donated state is updated in place); batches carry a leading device axis ``[D, ...]`` and are
split over it (`device_sharding`, ``P(AXIS)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

AXIS = 'batch'
SPLIT = jax.sharding.PartitionSpec(AXIS)  # split over the devices along the leading axis (batches)
REPLICATED = jax.sharding.PartitionSpec()  # whole on every device (parameters, the train state)


def make_mesh(devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """The 1-D data-parallel mesh (axis `AXIS`).

  Args:
    devices: the devices, in mesh order. Default: every device of every process, each process's devices
      contiguous (the order `jax.pmap` uses), so that each host feeds the slice of the global batch that its
      own devices hold. Pass ``jax.local_devices()`` for work that each process does on its own (sampling,
      evaluation).
  """
  if devices is None:
    devices = [d for i in range(jax.process_count()) for d in jax.local_devices(process_index=i)]
  if not len(devices):
    raise ValueError('make_mesh needs at least one device; got an empty device list.')
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def device_sharding(devices: Sequence[Any] | None = None) -> jax.sharding.NamedSharding:
  """Batches ``[D, b, ...]`` split over the devices along the leading axis (what the train step expects)."""
  return jax.sharding.NamedSharding(make_mesh(devices), SPLIT)


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
  """Places a host pytree whole on every device (sharding ``P()``); leaves keep their shapes.

  With several processes and the default (global) devices every process must pass the same values (they do:
  all start from the same seed or restore the same checkpoint).
  """
  sharding = jax.sharding.NamedSharding(make_mesh(devices), REPLICATED)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def unreplicate(tree: Any) -> Any:
  """A replicated pytree (from `replicate` or the step) as host numpy arrays: this process's first copy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x), tree)


def map_over_devices(fn: Callable[..., Any], devices: Sequence[Any]) -> Callable[..., Any]:
  """Runs ``fn`` on every device at once, each on its own block of the inputs.

  Args:
    fn: ``fn(shared, *blocks) -> pytree of arrays [n, ...]``, pure. ``shared`` is the same on every device;
      ``blocks`` are this device's slices of the split inputs, without the device axis.
    devices: the devices (usually ``jax.local_devices()``: the work of this process alone).

  Returns:
    ``run(shared, *arrays) -> pytree of arrays [D, n, ...]``: ``shared`` as `replicate` places it (or a host
    pytree, copied to the devices on each call), every other argument ``[D, n, ...]`` (host arrays are fine)
    and split over the D devices along the leading axis; device ``d`` computes output block ``d``. Compiled
    once per input shape (`jax.jit` of `jax.shard_map`).
  """
  mesh = make_mesh(devices)
  num_devices = mesh.devices.size

  def per_device(shared, blocks):
    out = fn(shared, *jax.tree.map(lambda a: a[0], blocks))  # this device's [1, n, ...] block -> [n, ...]
    return jax.tree.map(lambda a: a[None], out)

  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(REPLICATED, SPLIT), out_specs=SPLIT))

  def run(shared, *arrays):
    for i, a in enumerate(arrays):
      if np.shape(a)[:1] != (num_devices,):
        raise ValueError(
          f'map_over_devices: argument {i + 1} has shape {np.shape(a)}; its leading axis must be '
          f'the {num_devices} devices (reshape it to [{num_devices}, n, ...]).'
        )
    return mapped(shared, arrays)

  return run
