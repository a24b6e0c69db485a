"""Data parallelism: the 1-D device mesh, placing arrays on it, and mapping a function over its devices.

Everything in ddpm_jax that runs on several devices is `jax.jit` of `jax.shard_map` over the mesh of `make_mesh`:
the train step (`ddpm_jax.train_lib`), every sampler and image chain (`IndexedMap`, through
`ddpm_jax.batch_sampler.BatchSampler` for sample.py, the training grids and the evaluations, and directly for
figures.py and edit.py) and the bits/dim evaluation (`ddpm_jax.evaluation.bpd_over_dataset`). Shared values
(parameters, the train state) are replicated whole on every device (`replicate`, sharding ``P()``: no device axis,
so a donated state is updated in place); batches carry a leading device axis ``[D, ...]`` and are split over it
(`device_sharding`, ``P(AXIS)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import progress as progress_lib

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

  # check_vma=False: each device computes its block alone (no collectives), so there is nothing for JAX's
  # varying-axis checks to protect, and they would refuse ordinary scans whose carry starts from constants (the
  # fast solvers' history of predictions).
  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(REPLICATED, SPLIT), out_specs=SPLIT, check_vma=False))

  def run(shared, *arrays):
    for i, a in enumerate(arrays):
      if np.shape(a)[:1] != (num_devices,):
        raise ValueError(
          f'map_over_devices: argument {i + 1} has shape {np.shape(a)}; its leading axis must be '
          f'the {num_devices} devices (reshape it to [{num_devices}, n, ...]).'
        )
    return mapped(shared, arrays)

  return run


class IndexedMap:
  """Computes ``fn(shared, key_i, *inputs_i)`` for global indices ``i`` over the local devices.

  The one data-parallel map behind every sampler of ddpm_jax: index ``i`` draws its randomness from
  ``key_i = fold_in(key, i)`` and sees only its own inputs, so its result depends on ``(key, i, inputs_i)`` alone:
  not on the batch, the number of devices, or which other indices are computed with it. A call's indices are padded
  to a multiple of the device count (with copies of the last one, dropped afterwards) and split over the devices;
  each device vmaps ``fn`` over its share. One program is compiled per number of indices per device.

  Args:
    fn: ``fn(shared, key, *inputs) -> pytree of arrays`` for ONE index (no batch axis), pure.
    shared: what every index reads (e.g. parameters), placed on the devices once (`replicate`); or None if every
      call passes its own ``shared``.
    key: the root PRNG key, or an int seed for ``jax.random.key(seed)``.
    devices: this process's devices to use (default ``jax.local_devices()``).
    all_processes: with several processes, split each call's indices over all of them (every process must make the
      same call) and gather the results on every process (`multihost_utils.process_allgather`). Otherwise each
      process computes all the indices it is given on its own devices.
    progress: a `ddpm_jax.progress.Progress` to report the network calls of ``fn``'s chains to, from the first
      device (all devices run the same chain in step); None (default) compiles no callback at all.
  """

  def __init__(
    self,
    fn: Callable[..., Any],
    shared: Any = None,
    *,
    key: jax.Array | int,
    devices: Sequence[Any] | None = None,
    all_processes: bool = False,
    progress: progress_lib.Progress | None = None,
  ):
    self.devices = list(devices or jax.local_devices())
    self.all_processes = all_processes
    self.progress = progress
    self._compiled_sizes: set[int] = set()  # indices per device of the programs compiled so far
    root = jax.random.key(key) if isinstance(key, (int, np.integer)) else key

    def per_device(shared, indices, *inputs):
      mapped = lambda: jax.vmap(lambda i, *xs: fn(shared, jax.random.fold_in(root, i), *xs))(indices, *inputs)
      if progress is None:
        return mapped()
      # Traced inside the context: this program, and only this one, reports (from the mesh's first device).
      with progress_lib.reporting(progress, reporter=jax.lax.axis_index(AXIS) == 0):
        return mapped()

    self._run = map_over_devices(per_device, self.devices)
    self._shared = None if shared is None else replicate(shared, self.devices)

  def __call__(self, indices: Any, *inputs: Any, shared: Any = None) -> Any:
    """``fn``'s results for ``indices`` [n] (ints >= 0), as host numpy arrays [n, ...].

    Args:
      indices: global indices.
      *inputs: per-index inputs, arrays [n, ...] (row j goes with ``indices[j]``).
      shared: replaces the constructor's ``shared`` for this call (a host pytree, copied to the devices).
    """
    indices = np.asarray(indices, np.int64)
    inputs = tuple(np.asarray(x) for x in inputs)
    n = len(indices)
    if indices.ndim != 1 or n == 0 or indices.min() < 0:
      raise ValueError(f'indices must be a non-empty 1-D array of ints >= 0, got shape {indices.shape}.')
    for j, x in enumerate(inputs):
      if x.shape[:1] != (n,):
        raise ValueError(f'input {j + 1} has shape {x.shape}; its leading axis must be the {n} indices.')
    shared = self._shared if shared is None else shared
    if shared is None:
      raise ValueError('IndexedMap was made without shared values: pass shared= to the call.')
    gather = self.all_processes and jax.process_count() > 1
    if gather:  # this process's equal share of the indices, padded to a multiple of the process count
      per_process = -(-n // jax.process_count())
      mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
      indices, *inputs = (_pad(a, per_process * jax.process_count())[mine] for a in (indices, *inputs))
    n_dev = len(self.devices)
    per = -(-len(indices) // n_dev)
    blocks = [_pad(a, per * n_dev).reshape((n_dev, per) + a.shape[1:]) for a in (indices, *inputs)]
    if self.progress is not None and per not in self._compiled_sizes:
      self.progress.compiling()
    self._compiled_sizes.add(per)
    out = self._run(shared, blocks[0].astype(np.uint32), *blocks[1:])
    out = jax.tree.map(lambda a: np.asarray(a).reshape((n_dev * per,) + a.shape[2:])[: len(indices)], out)
    if self.progress is not None:
      jax.effects_barrier()  # every report of this call has reached the bar before the caller closes it
    if gather:
      out = jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))
    return jax.tree.map(lambda a: a[:n], out)


def _pad(a: np.ndarray, length: int) -> np.ndarray:
  """``a`` [m, ...] padded to ``length`` rows with copies of its last row."""
  return np.concatenate([a, np.repeat(a[-1:], length - len(a), axis=0)]) if length > len(a) else a
