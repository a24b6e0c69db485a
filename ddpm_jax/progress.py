"""Progress from inside compiled chains: an opt-in host callback in the scans, and the tqdm bar it moves.

A sampler or an editing chain runs as one ``lax.scan`` inside one compiled call, so the host sees nothing until the
call returns. Every scan that calls the network (`ddpm_jax.sampling.reverse_scan`, the solvers' plans in
`ddpm_jax.solvers`, `ddpm_jax.editing.inpaint`, `ddpm_jax.diffusion.calc_bpd_loop`) is :func:`scan`. Outside a
:func:`reporting` context (every library call) it is ``jax.lax.scan``: the program is exactly the one compiled
without progress. Inside one, it runs the steps in about ``updates`` chunks and after each chunk a host callback
(``jax.debug.callback``) reports the network calls done; the steps themselves are unchanged (a callback under a
conditional inside every step measured slower on XLA:CPU; BENCHMARKS.md, "Progress"). The commands turn it on
through `ddpm_jax.data_parallel.IndexedMap`'s ``progress`` (which traces its program inside :func:`reporting`, with
only the first device of the mesh reporting) and show the counts in a :class:`Progress` bar::

  bar = progress.Progress()
  sampler = batch_sampler.BatchSampler(model, params, schedule, spec, (32, 32, 3), seed=0, progress=bar)
  with bar.job(total=sampler.network_calls * num_batches, desc='sampling'):
    for indices in batches:
      images = sampler(indices)

The unit is the network call (one evaluation of the denoiser on the whole batch), so a bar counts Heun's two
calls per step, the multistep solvers' one and RePaint's down steps (its jumps back up cost none) alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

UPDATES = 100  # reports per scan: the overhead is ~UPDATES host callbacks per chain, whatever its length


@dataclasses.dataclass(frozen=True)
class _Context:
  sink: Callable[[Any], None]
  reporter: Any  # bool, or a traced bool scalar (this device reports)
  updates: int


_LOCAL = threading.local()


def _stack() -> list[_Context]:
  if not hasattr(_LOCAL, 'stack'):
    _LOCAL.stack = []
  return _LOCAL.stack


@contextlib.contextmanager
def reporting(sink: Callable[[Any], None], *, reporter: Any = True, updates: int = UPDATES) -> Iterator[None]:
  """While active at trace time, the scans built here report their network calls to ``sink``.

  The context is read when a function is traced, never when it runs: enter it inside the function that ``jax.jit``
  traces (as `ddpm_jax.data_parallel.IndexedMap` does), so that its compiled program, and only that one, holds the
  callbacks. A jitted function traced outside it keeps its callback-free program in the jit cache.

  Args:
    sink: ``sink(calls)`` runs on the host with an int32 scalar array: network calls done since the last report.
    reporter: whether this device reports (under ``shard_map``, e.g. ``lax.axis_index(axis) == 0``, so that D
      devices running the same chain count it once).
    updates: reports per scan (at most; fewer for short scans).
  """
  if not isinstance(updates, int) or updates < 1:
    raise ValueError(f'updates must be a positive integer, got {updates!r}.')
  stack = _stack()
  stack.append(_Context(sink, reporter, updates))
  try:
    yield
  finally:
    stack.pop()


def is_reporting() -> bool:
  """Whether :func:`count` adds callbacks now (a :func:`reporting` context is active)."""
  return bool(_stack())


def scan(
  f: Callable[[Any, Any], tuple[Any, Any]],
  init: Any,
  xs: Any = None,
  length: int | None = None,
  *,
  units: Sequence[int] | np.ndarray | None = None,
  reverse: bool = False,
) -> tuple[Any, Any]:
  """``jax.lax.scan(f, init, xs, length, reverse=reverse)`` that reports its network calls when asked.

  Outside a :func:`reporting` context this is exactly ``jax.lax.scan``. Inside one, the iterations run in chunks
  (an outer scan over chunks of about ``n / updates`` iterations, each an inner scan of the same ``f``, then the
  remainder), and after each chunk a host callback reports the chunk's calls: ``f`` itself stays free of
  callbacks and conditionals, so the per-step program is the one without progress.

  Args:
    f, init, xs, length, reverse: as for ``jax.lax.scan``.
    units: network calls of each iteration, [n] ints (default one each; RePaint's jumps up cost none, an outer scan
      over groups of k steps k each).

  Returns:
    ``(carry, ys)`` as ``jax.lax.scan`` returns them.
  """
  stack = _stack()
  if not stack:
    return jax.lax.scan(f, init, xs, length=length, reverse=reverse)
  ctx = stack[-1]
  leaves = jax.tree.leaves(xs)
  n = int(leaves[0].shape[0]) if leaves else int(length)
  units = np.ones(n, np.int64) if units is None else np.asarray(units, np.int64)
  if units.shape != (n,):
    raise ValueError(f'units has shape {units.shape}, expected ({n},).')
  if reverse:  # run forward over the flipped inputs, flip the outputs back
    xs, units = jax.tree.map(lambda a: jnp.flip(a, 0), xs), units[::-1]

  def report(calls):
    jax.lax.cond(
      jnp.logical_and(calls > 0, ctx.reporter), lambda c: jax.debug.callback(ctx.sink, c), lambda c: None, calls
    )

  every = max(1, -(-n // ctx.updates))
  chunks, rest = divmod(n, every)
  carry, parts = init, []
  if chunks:
    head = jax.tree.map(lambda a: a[: chunks * every].reshape((chunks, every) + a.shape[1:]), xs)
    calls = jnp.asarray(units[: chunks * every].reshape(chunks, every).sum(axis=1), jnp.int32)

    def outer(c, inputs):
      c, ys = jax.lax.scan(f, c, inputs[0], length=every)
      report(inputs[1])
      return c, ys

    carry, ys = jax.lax.scan(outer, carry, (head, calls))
    parts.append(jax.tree.map(lambda a: a.reshape((chunks * every,) + a.shape[2:]), ys))
  if rest:
    carry, ys = jax.lax.scan(f, carry, jax.tree.map(lambda a: a[chunks * every :], xs), length=rest)
    report(jnp.asarray(units[chunks * every :].sum(), jnp.int32))
    parts.append(ys)
  ys = jax.tree.map(lambda *p: jnp.concatenate(p) if len(p) > 1 else p[0], *parts)
  if reverse:
    ys = jax.tree.map(lambda a: jnp.flip(a, 0), ys)
  return carry, ys


class Progress:
  """The host side: a tqdm bar per job, moved by the network calls that compiled chains report.

  Pass it as ``progress=`` to `ddpm_jax.data_parallel.IndexedMap` (or `ddpm_jax.batch_sampler.BatchSampler`):
  its programs then call this object. Open a bar with :meth:`job` around the calls; reports outside a job are
  dropped. Before a call that compiles, the map calls :meth:`compiling`: the bar says "compiling..." until the
  first report, and the wait is left out of the rate and ETA.

  Args:
    disable: show nothing (the programs still report; e.g. non-chief processes pass no Progress at all instead).
    leave: keep the finished bar on the terminal.
  """

  def __init__(self, *, disable: bool = False, leave: bool = True):
    self.disable = disable
    self.leave = leave
    self._bar: tqdm.tqdm | None = None
    self._desc = ''
    self._compiling = False
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def job(self, total: int, desc: str, *, unit: str = 'call', initial: int = 0) -> Iterator[tqdm.tqdm]:
    """A bar of ``total`` network calls (``initial`` already done) while the block runs."""
    self._desc = desc
    self._compiling = False
    bar = tqdm.tqdm(
      total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=self.disable, leave=self.leave
    )
    self._bar = bar
    try:
      yield bar
    finally:
      self._bar = None
      bar.close()

  def compiling(self) -> None:
    """The next call compiles first: say so until its first report arrives."""
    with self._lock:
      if self._bar is not None:
        self._compiling = True
        self._bar.set_description(f'{self._desc} (compiling...)')

  @property
  def count(self) -> int:
    """Calls counted in the open job (0 outside one)."""
    return 0 if self._bar is None else int(self._bar.n)

  def __call__(self, calls: Any) -> None:
    """The callback: ``calls`` network calls were done (runs on a host thread while the program runs)."""
    with self._lock:
      bar = self._bar
      if bar is None:
        return
      calls = int(np.asarray(calls))
      if self._compiling:  # the first report after compiling: restart the clock, so the ETA leaves compilation out
        self._compiling = False
        bar.set_description(self._desc, refresh=False)
        bar.unpause()
        bar.n += calls
        bar.initial += calls  # their time is unknown (it ran with the compilation): not in the rate either
        bar.last_print_n = bar.n
        bar.refresh()
        return
      bar.update(calls)
