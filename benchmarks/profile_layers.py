"""Times single layers of the CIFAR-10 U-Net: where a training step's time goes (BENCHMARKS.md).

  python benchmarks/profile_layers.py --what layers --batch 16   # the CPU layers against the reference ones (ms)
  python benchmarks/profile_layers.py --what convs --batch 32    # every 3x3 conv of the model, XLA against PyTorch
  python benchmarks/profile_layers.py --what roofline --batch 32 # the forward pass against the machine's limits
  python benchmarks/profile_layers.py --what roofline --batch 128 --dtype bfloat16   # the same on a GPU or TPU

``layers``: forward and forward + gradient of GroupNorm + swish, a ResBlock with a Dense shortcut and an attention
block, built from the reference layers (``UNet(layers='reference')``: Flax GroupNorm/Dense, einsum attention) and
from the CPU layers (``layers='cpu'``, `ddpm_jax.models.cpu_layers`, with the tree reductions where the
``--cpu_tuning`` setting would get them).
``convs``: forward and input + weight gradient of each 3x3 convolution shape of the model, times how often it
occurs, for XLA and for PyTorch (oneDNN, ``torch.ops.aten.convolution_backward``); needs the ``reference`` extra.
The convs after an upsample run as the CPU layers run them (`cpu_layers.upsample_conv3x3`) on the XLA side.
``roofline``: the CIFAR-10 model's forward pass (what each sampling step runs) in FLOP/s, with XLA's count of
the floating-point operations of the compiled program (taps in the zero padding not counted), against what the
machine does at best: a large matrix product in XLA and in PyTorch, in the same ``--dtype`` (the PyTorch one
needs torch; on a GPU host it runs on the GPU), and an element-wise pass over a large array (memory bandwidth).
The comparison with the peer's whole model is bench.py's (a fresh PyTorch process runs the forward pass slower
than one that has trained first, as bench.py's does).
JAX runs with the XLA:CPU setting of `--cpu_tuning` (default: train.py's). Medians of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import cpu_tuning  # pylint: disable=wrong-import-position

# (resolution, in channels, out channels, kind, occurrences) of the CIFAR-10 U-Net's 3x3 convolutions. Kind 's1' and
# 's2': stride 1 or 2; 'up': the conv after a x2 nearest upsample (resolution = its output), which the model computes
# as four 2x2 convs at half the resolution (`cpu_layers.upsample_conv3x3`) and the peer as a conv of the upsampled
# input.
CONVS = [
  (32, 3, 128, 's1', 1),
  (32, 128, 128, 's1', 7),
  (32, 128, 128, 's2', 1),
  (16, 128, 256, 's1', 1),
  (16, 256, 256, 's1', 6),
  (16, 256, 256, 'up', 1),
  (16, 256, 256, 's2', 1),
  (8, 256, 256, 's1', 7),
  (8, 256, 256, 'up', 1),
  (8, 256, 256, 's2', 1),
  (4, 256, 256, 's1', 11),
  (4, 512, 256, 's1', 3),
  (8, 512, 256, 's1', 3),
  (16, 512, 256, 's1', 2),
  (16, 384, 256, 's1', 1),
  (32, 256, 256, 'up', 1),
  (32, 384, 128, 's1', 1),
  (32, 256, 128, 's1', 2),
  (32, 128, 3, 's1', 1),
]


def _median_ms(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def bench_layers(batch: int, repeats: int) -> list[tuple]:
  """Rows ``(name, reference fwd, reference fwd+grad, cpu fwd, cpu fwd+grad)`` in ms."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ddpm_jax.models import cpu_layers
  from ddpm_jax.models import unet

  # The CPU layers as the commands would build them here (`cpu_tuning.model_layers` on XLA:CPU).
  tree = jax.default_backend() == 'cpu' and not cpu_tuning.ynn_reductions()
  impls = (dict(layers='reference'), dict(layers='cpu', cpu_tree_reductions=tree))
  group_norms = (
    lambda: nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False),
    lambda: cpu_layers.GroupNorm(num_groups=32, tree_reductions=tree),
  )
  rng = np.random.default_rng(0)
  temb = jnp.asarray(rng.normal(size=(batch, 512)), jnp.float32)
  rows = []
  specs = [
    ('GroupNorm+swish 32x32x128', (batch, 32, 32, 128), 'gn'),
    ('GroupNorm+swish 32x32x384', (batch, 32, 32, 384), 'gn'),
    ('ResBlock 32x32 256->128 (Dense shortcut)', (batch, 32, 32, 256), 'res'),
    ('attention block 16x16x256', (batch, 16, 16, 256), 'attn'),
  ]
  for name, shape, kind in specs:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    result = [name]
    for impl, group_norm in zip(impls, group_norms):
      if kind == 'gn':
        module = group_norm()
        apply = lambda p, x, module=module: jax.nn.swish(module.apply(p, x))
        params = module.init(jax.random.key(0), x)
      elif kind == 'res':
        module = unet.ResnetBlock(128, **impl)
        apply = lambda p, x, module=module: module.apply(p, x, temb, False)
        params = module.init(jax.random.key(0), x, temb, False)
      else:
        module = unet.AttnBlock(**impl)
        apply = lambda p, x, module=module: module.apply(p, x)
        params = module.init(jax.random.key(0), x)
      fwd = jax.jit(apply)
      grad = jax.jit(jax.grad(lambda p, x, apply=apply: jnp.sum(apply(p, x) ** 2), argnums=(0, 1)))
      result.append(_median_ms(lambda: jax.block_until_ready(fwd(params, x)), repeats))
      result.append(_median_ms(lambda: jax.block_until_ready(grad(params, x)), repeats))
    rows.append(tuple(result))
  return rows


def bench_convs(batch: int, repeats: int) -> list[tuple]:
  import jax
  import numpy as np
  import torch
  from ddpm_jax.models import cpu_layers

  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  rows = []
  for h, cin, cout, kind, count in CONVS:
    stride = 2 if kind == 's2' else 1
    pad = ((1, 1), (1, 1)) if stride == 1 else ((0, 1), (0, 1))  # TF 'SAME'

    def conv(x, w, stride=stride, pad=pad):
      return jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    x = rng.normal(size=(batch, h, h, cin)).astype(np.float32)
    w = (0.05 * rng.normal(size=(3, 3, cin, cout))).astype(np.float32)
    dy = rng.normal(size=(batch, h // stride, h // stride, cout)).astype(np.float32)
    jx, jw, jdy = map(jax.device_put, (x, w, dy))
    if kind == 'up':  # what the model runs: the half-resolution input, no upsampled copy
      conv, jx = cpu_layers.upsample_conv3x3, jax.device_put(x[:, ::2, ::2])
    fwd = jax.jit(conv)
    bwd = jax.jit(lambda x, w, dy, conv=conv: jax.vjp(conv, x, w)[1](dy))
    j_f = _median_ms(lambda: jax.block_until_ready(fwd(jx, jw)), repeats)
    j_b = _median_ms(lambda: jax.block_until_ready(bwd(jx, jw, jdy)), repeats)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    tdy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())
    tpad = 1 if stride == 1 else 0
    txp = torch.nn.functional.pad(tx, (0, 1, 0, 1)) if stride == 2 else tx
    with torch.no_grad():
      t_f = _median_ms(lambda: torch.nn.functional.conv2d(txp, tw, None, stride, tpad), repeats)
      t_b = _median_ms(
        lambda: torch.ops.aten.convolution_backward(
          tdy, txp, tw, [cout], [stride, stride], [tpad, tpad], [1, 1], False, [0, 0], 1, [True, True, False]
        ),
        repeats,
      )
    rows.append((f'{h}x{h} {cin}->{cout} {kind}', count, j_f, j_b, t_f, t_b))
  return rows


def bench_roofline(
  batch: int, repeats: int, *, model=None, dtype: str = 'float32', matmul_n: int = 4096, copy_mib: int = 256
) -> list[tuple]:
  """Rows ``(name, amount, unit, ms, rate)``: GFLOP and GFLOP/s for computations, GB and GB/s for the copy.

  ``model``: a Linen module called as ``model.apply({'params': p}, x [B, 32, 32, 3], t [B], train=False)``
  (default: the paper's CIFAR-10 U-Net computing in ``dtype``, with the layers the commands choose here). The
  matrix products run in ``dtype`` too ('bfloat16': the rate that matters on GPUs and TPUs). The PyTorch row needs
  torch and is left out without it.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import bench
  from ddpm_jax.models import unet

  model = model or unet.unet_cifar10(dtype=jnp.dtype(dtype), **cpu_tuning.model_layers('auto'))
  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  t = jnp.full((batch,), 500, jnp.int32)
  params = jax.jit(lambda k: model.init(k, x, t, train=False)['params'])(jax.random.key(1))
  forward = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False)).lower(params, x, t).compile()
  gflop = bench.xla_gflop(forward)
  a = jax.random.normal(jax.random.key(2), (matmul_n, matmul_n), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  big = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
  scale = jax.jit(lambda v: v * 1.5 + 1.0)
  mm_gflop = 2 * matmul_n**3 / 1e9
  gb = 2 * big.nbytes / 1e9  # read and write
  rows = [
    ('U-Net forward, XLA', gflop, 'GFLOP', _median_ms(lambda: jax.block_until_ready(forward(params, x, t)), repeats)),
    (
      f'matmul {matmul_n}x{matmul_n} {dtype}, XLA',
      mm_gflop,
      'GFLOP',
      _median_ms(lambda: jax.block_until_ready(matmul(a, a)), repeats),
    ),
    (f'v * 1.5 + 1 over {copy_mib} MiB, XLA', gb, 'GB', _median_ms(lambda: jax.block_until_ready(scale(big)), repeats)),
  ]
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None:
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    torch.set_num_threads(os.cpu_count() or 1)
    ta = torch.from_numpy(np.array(a, np.float32)).to(dev, getattr(torch, dtype))

    def peer_matmul():
      torch.matmul(ta, ta)
      sync()

    rows.insert(
      2, (f'matmul {matmul_n}x{matmul_n} {dtype}, PyTorch', mm_gflop, 'GFLOP', _median_ms(peer_matmul, repeats))
    )
  return [(name, amount, unit, ms, amount / ms * 1e3) for name, amount, unit, ms in rows]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--what', choices=['layers', 'convs', 'roofline'], default='layers')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--cpu_tuning', choices=['train', 'inference', 'none'], default='train')
  parser.add_argument(
    '--dtype',
    choices=['float32', 'bfloat16'],
    default='float32',
    help='roofline only: compute dtype of the model and the matrix products',
  )
  args = parser.parse_args(argv)
  if args.batch < 1 or args.repeats < 1:
    parser.error(f'--batch and --repeats must be >= 1, got {args.batch} and {args.repeats}.')
  if args.cpu_tuning != 'none':
    cpu_tuning.tune_cpu(args.cpu_tuning)
  import jax

  print(
    f'jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch}, '
    f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}'
  )
  if args.what == 'layers':
    print('ms                                        | reference fwd | reference fwd+grad | cpu fwd | cpu fwd+grad')
    for name, pf, pg, mf, mg in bench_layers(args.batch, args.repeats):
      print(f'{name:42s}| {pf:13.1f} | {pg:18.1f} | {mf:7.1f} | {mg:12.1f}')
  elif args.what == 'roofline':
    print(f'{"":36s}| amount        |      ms | rate')
    for name, amount, unit, ms, rate in bench_roofline(args.batch, args.repeats, dtype=args.dtype):
      print(f'{name:36s}| {amount:7.2f} {unit:5s} | {ms:7.1f} | {rate:7.1f} {unit}/s')
  else:
    print('ms (x count)            | count | XLA fwd | XLA dx+dw | torch fwd | torch dx+dw')
    total = [0.0, 0.0, 0.0, 0.0]
    for name, count, *ms in bench_convs(args.batch, args.repeats):
      print(f'{name:24s}| {count:5d} | {ms[0]:7.1f} | {ms[1]:9.1f} | {ms[2]:9.1f} | {ms[3]:11.1f}')
      total = [t + count * m for t, m in zip(total, ms)]
    print(f'{"total per step":24s}|       | {total[0]:7.0f} | {total[1]:9.0f} | {total[2]:9.0f} | {total[3]:11.0f}')
    print(f'XLA / torch, forward + gradients: {(total[0] + total[1]) / (total[2] + total[3]):.2f}')


if __name__ == '__main__':
  main()
