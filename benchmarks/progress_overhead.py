"""What the in-chain progress costs: a 1000-step sample of a small model with and without ``progress=``.

Both samplers are `ddpm_jax.batch_sampler.BatchSampler` (as sample.py) with the paper's ancestral sampler, T = 1000,
on the digits demo's U-Net (configs/digits.py, random weights: the time does not depend on them); one of them reports
its network calls to a `ddpm_jax.progress.Progress` bar (about 100 host callbacks per chain). Each round times one
call of each (compiled beforehand), alternating which goes first; the JSON line holds every time. Example (the
numbers in BENCHMARKS.md)::

  python benchmarks/progress_overhead.py --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import digits  # pylint: disable=wrong-import-position
from ddpm_jax import batch_sampler, progress, schedule, train_lib  # pylint: disable=wrong-import-position


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--batch', type=int, default=32, help='images per call')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps', type=int, default=1000, help='T of the schedule (= network calls per chain)')
  a = p.parse_args(argv)

  config = digits.get_config()
  model = train_lib.build_model(config)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  params = train_lib.init_params(model, image_shape=shape, key=jax.random.key(0))
  sched = schedule.get_schedule(num_timesteps=a.steps)
  spec = batch_sampler.SamplerSpec(name='ancestral')
  bar = progress.Progress(leave=False)
  samplers = {
    'without': batch_sampler.BatchSampler(model, params, sched, spec, shape, seed=0),
    'with': batch_sampler.BatchSampler(model, params, sched, spec, shape, seed=0, progress=bar),
  }
  indices = np.arange(a.batch)

  def timed(name: str) -> float:
    t0 = time.perf_counter()
    if name == 'with':
      with bar.job(samplers[name].network_calls, 'with progress'):
        samplers[name](indices)
    else:
      samplers[name](indices)
    return time.perf_counter() - t0

  for name in samplers:  # compile both
    timed(name)
  times: dict[str, list[float]] = {'without': [], 'with': []}
  for r in range(a.rounds):
    for name in ('without', 'with') if r % 2 == 0 else ('with', 'without'):
      times[name].append(timed(name))
  med = {k: float(np.median(v)) for k, v in times.items()}
  result = dict(
    backend=jax.default_backend(),
    device=str(jax.devices()[0].device_kind),
    batch=a.batch,
    network_calls=samplers['with'].network_calls,
    seconds=times,
    median_s=med,
    overhead=med['with'] / med['without'] - 1.0,
  )
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
