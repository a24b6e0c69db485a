"""Smoke test of benchmarks/bench.py on a tiny model: it runs, and the table and JSON carry every field.

No speed assertions: the speed targets live in BENCHMARKS.md, not in timed tests.
"""

import importlib.util
import json
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'bench.py')


def _load_bench():
  spec = importlib.util.spec_from_file_location('ddpm_bench', _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look the module up by name
  spec.loader.exec_module(module)
  return module


bench = _load_bench()

try:
  import diffusers  # noqa: F401
  import torch  # noqa: F401

  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False

FIELDS = (
  'train_img_s',
  'train_compile_s',
  'train_peak_mb',
  'sample_img_steps_s',
  'sample_256x1000_s',
  'sample_compile_s',
  'sample_peak_mb',
)


@pytest.mark.slow
def test_run_and_json(tmp_path, capsys):
  impls = 'jax,torch' if HAVE_TORCH else 'jax'
  out = tmp_path / 'r.json'
  # k=2 steps per compiled call exercises make_multi_step through the real train step.
  results = bench.main(
    [
      '--tiny',
      '--batch',
      '2',
      '--train_steps',
      '1',
      '--sample_steps',
      '2',
      '--sample_repeats',
      '1',
      '--steps_per_call',
      '2',
      '--impl',
      impls,
      '--in_process',
      '--cpu_tuning',
      'none',
      '--layers',
      'reference',
      '--json',
      str(out),
    ]
  )  # leaves this test process's XLA as it is
  assert [r.impl for r in results] == impls.split(',')
  nparams = results[0].params
  for r in results:
    assert r.params == nparams  # the peer is the same architecture
    for f in FIELDS:
      v = getattr(r, f)
      assert v is not None and v >= 0, (r.impl, f, v)
    assert r.train_img_s > 0 and r.sample_img_steps_s > 0
    # 256 images x 1000 steps at the measured rate.
    assert r.sample_256x1000_s == pytest.approx(256 * 1000 / r.sample_img_steps_s, rel=1e-6)
  # The FLOP rates (JAX only): XLA's count of the tiny model's programs times the measured throughput.
  jr = results[0]
  assert jr.train_tflop_s > 0 and jr.sample_tflop_s > 0
  assert jr.layers == 'reference' and 'layers=reference' in jr.notes  # forced with --layers
  assert all(r.layers is None for r in results[1:])
  assert all(r.train_tflop_s is None for r in results[1:])
  text = capsys.readouterr().out
  for word in (
    'train img/s',
    'sample img-step/s',
    's/256x1000',
    'compile s',
    'peak MiB',
    'extrapolated',
    'ddpm_jax achieved',
  ):
    assert word in text
  if HAVE_TORCH:
    assert 'jax/torch' in text
  data = json.loads(out.read_text())
  assert {'environment', 'argv', 'results', 'loadavg_start'} <= set(data)
  assert data['environment']['jax']
  assert [r['impl'] for r in data['results']] == impls.split(',')
  assert set(FIELDS) <= set(data['results'][0])
  assert data['results'][0]['layers'] == 'reference' and '--layers' in data['argv']
  assert "JAX U-Net layers: 'reference'" in text


@pytest.mark.skipif(not HAVE_TORCH, reason='needs the reference extra (torch)')
def test_peer_computes_in_the_requested_dtype():
  import jax

  model = bench.make_model(True)
  params = bench.train_lib.init_params(model, image_shape=bench.IMAGE_SHAPE, key=jax.random.key(0))
  for dtype, expected in (('float32', 'torch.float32'), ('bfloat16', 'torch.bfloat16')):
    for phase in (dict(train_steps=1, sample_steps=0), dict(train_steps=0, sample_steps=1)):
      out = bench.bench_torch(model, params, batch=2, dtype=dtype, **phase)
      assert out['compute_dtype'] == expected, (dtype, phase)
  with pytest.raises(ValueError, match="'float16'"):
    bench.bench_torch(model, params, batch=2, train_steps=0, sample_steps=1, dtype='float16')


def test_flop_counts_are_the_programs():
  """`xla_gflop` of a lowered program is XLA's count: exact for a matmul, and a scanned body is counted once."""
  import jax
  import jax.numpy as jnp

  a = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  assert bench.xla_gflop(jax.jit(jnp.matmul).lower(a, a)) == 2 * 64**3 / 1e9
  scan = lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=8)[0]
  assert bench.xla_gflop(jax.jit(scan).lower(a)) == pytest.approx(2 * 64**3 / 1e9, rel=1e-3)


def test_table_ratio_row():
  mk = lambda impl, tr, sm: bench.Result(
    impl, 'cpu', 32, 'float32', 10, train_img_s=tr, sample_img_steps_s=sm, sample_256x1000_s=256000 / sm
  )
  text = bench.table([mk('jax', 6.0, 20.0), mk('torch', 3.0, 10.0)])
  ratio_row = [line for line in text.splitlines() if line.startswith('jax/torch')][0]
  assert '2.00x' in ratio_row
  assert '-' in bench.table([bench.Result('jax', 'cpu', 1, 'float32', 1)])  # unmeasured fields print '-'


def test_bad_impl_is_rejected():
  with pytest.raises(SystemExit):
    bench.main(['--impl', 'tensorflow'])
  with pytest.raises(SystemExit):
    bench.main(['--layers', 'fast'])


def test_strip_options():
  assert bench._strip(['--batch', '4', '--impl', 'jax,torch', '--json=x', '--tiny'], ('--impl', '--json')) == [
    '--batch',
    '4',
    '--tiny',
  ]


@pytest.mark.slow
def test_auto_cpu_tuning_measures_each_phase_in_its_own_process(tmp_path):
  """The default run: JAX's training and sampling in separate processes, each with the commands' XLA:CPU flag."""
  out = tmp_path / 'r.json'
  results = bench.main(
    [
      '--tiny',
      '--batch',
      '2',
      '--train_steps',
      '1',
      '--sample_steps',
      '2',
      '--sample_repeats',
      '1',
      '--impl',
      'jax',
      '--json',
      str(out),
    ]
  )
  assert len(results) == 1 and results[0].impl == 'jax'
  for f in FIELDS:
    assert getattr(results[0], f) is not None, f
  assert 'ynn_fusion_type=reduce' in results[0].notes and 'ynn_fusion_type=individual_dot' in results[0].notes
  # --layers auto: the CPU layers, as the commands choose them here; the tree reductions where the sampling
  # process's XLA:CPU setting runs reductions on XLA's own kernels, not in the training process.
  assert results[0].layers == 'cpu'
  notes = results[0].notes.split('; ')
  assert 'cpu_tree_reductions=False' in notes[0] and 'ynn_fusion_type=reduce' in notes[0]
  assert 'cpu_tree_reductions=True' in notes[1] and 'ynn_fusion_type=individual_dot' in notes[1]


def test_merge_fills_missing_fields():
  a = bench.Result('jax', 'cpu', 2, 'float32', 10, train_img_s=1.0, notes='a')
  b = bench.Result('jax', 'cpu', 2, 'float32', 10, sample_img_steps_s=5.0, train_img_s=9.0, notes='b')
  m = bench._merge(a, b)
  assert m.train_img_s == 1.0 and m.sample_img_steps_s == 5.0 and m.notes == 'a; b'


def test_rounds_give_medians_and_the_ratio_of_each_round():
  mk = lambda impl, tr, sm: bench.Result(impl, 'cpu', 32, 'float32', 10, train_img_s=tr, sample_img_steps_s=sm)
  rounds = [
    [mk('jax', 6.0, 20.0), mk('torch', 3.0, 10.0)],
    [mk('jax', 4.0, 30.0), mk('torch', 4.0, 10.0)],
    [mk('jax', 5.0, None), mk('torch', 5.0, 10.0)],
  ]
  med = bench.median_over_rounds(rounds)
  assert [r.impl for r in med] == ['jax', 'torch']
  assert med[0].train_img_s == 5.0 and med[0].sample_img_steps_s == 25.0  # None (not measured) is left out
  assert med[1].train_img_s == 4.0 and med[0].train_compile_s is None
  assert 'median of 3 rounds' in med[0].notes
  ratios = bench.ratios_over_rounds(rounds)
  assert ratios == {'train': [2.0, 1.0, 1.0], 'sample': [2.0, 3.0]}
  text = bench.rounds_summary(rounds)
  assert 'train: 2.00x 1.00x 1.00x' in text and 'median 1.00x' in text and 'median 2.50x' in text


@pytest.mark.slow
def test_rounds_run_end_to_end(tmp_path, capsys):
  out = tmp_path / 'r.json'
  results = bench.main(
    [
      '--tiny',
      '--batch',
      '2',
      '--train_steps',
      '0',
      '--sample_steps',
      '1',
      '--sample_repeats',
      '1',
      '--impl',
      'jax',
      '--cpu_tuning',
      'none',  # one process per round (auto would run JAX's two phases in two)
      '--rounds',
      '2',
      '--json',
      str(out),
    ]
  )
  assert len(results) == 1 and results[0].sample_img_steps_s > 0 and 'median of 2 rounds' in results[0].notes
  assert 'round 2 of 2' in capsys.readouterr().out
  data = json.loads(out.read_text())
  assert len(data['rounds']) == 2 and data['ratios_per_round'] == {'train': [], 'sample': []}
  per_round = sorted(r[0]['sample_img_steps_s'] for r in data['rounds'])
  assert data['results'][0]['sample_img_steps_s'] == pytest.approx(sum(per_round) / 2)  # median of two


def test_bad_rounds_are_rejected():
  with pytest.raises(SystemExit):
    bench.main(['--rounds', '0'])
  with pytest.raises(SystemExit):
    bench.main(['--rounds', '2', '--in_process'])


def _load_profile_layers():
  spec = importlib.util.spec_from_file_location(
    'ddpm_profile_layers', os.path.join(os.path.dirname(_PATH), 'profile_layers.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_profile_layers_times_both_implementations():
  profile = _load_profile_layers()
  rows = profile.bench_layers(batch=1, repeats=1)
  assert [r[0].split()[0] for r in rows] == ['GroupNorm+swish', 'GroupNorm+swish', 'ResBlock', 'attention']
  assert all(len(r) == 5 and all(t > 0 for t in r[1:]) for r in rows)


@pytest.mark.skipif(not HAVE_TORCH, reason='needs the reference extra (torch)')
def test_profile_convs_covers_the_model(monkeypatch):
  profile = _load_profile_layers()
  import jax
  import jax.numpy as jnp
  from ddpm_jax.models import unet_cifar10

  params = jax.eval_shape(
    lambda: unet_cifar10().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32), train=False)
  )
  kernels = sorted((p.shape[2], p.shape[3]) for p in jax.tree.leaves(params) if p.ndim == 4)
  assert sorted((c[1], c[2]) for c in profile.CONVS for _ in range(c[-1])) == kernels
  assert sum(c[-1] for c in profile.CONVS if c[3] == 'up') == 3  # one per upsampling level
  monkeypatch.setattr(profile, 'CONVS', [(8, 4, 8, 's1', 2), (8, 8, 8, 's2', 1), (8, 4, 4, 'up', 1)])
  rows = profile.bench_convs(batch=1, repeats=1)
  assert [r[:2] for r in rows] == [('8x8 4->8 s1', 2), ('8x8 8->8 s2', 1), ('8x8 4->4 up', 1)]
  assert all(t > 0 for r in rows for t in r[2:])


def test_profile_roofline_counts_the_forward_pass():
  profile = _load_profile_layers()
  import flax.linen as nn

  class OneConv(nn.Module):  # a "model" whose FLOPs are known
    @nn.compact
    def __call__(self, x, t, train):
      return nn.Conv(8, (3, 3))(x)

  rows = {r[0]: r[1:] for r in profile.bench_roofline(2, 1, model=OneConv(), matmul_n=64, copy_mib=1)}
  # 2 images, 3 -> 8 channels, a multiply and an add per tap that falls inside the 32x32 image (XLA does not
  # count the zero padding: 94 = 32 * 3 - 2 valid taps along each axis), plus the bias.
  flops = 2 * (2 * 94**2 * 3 * 8) + 2 * 32 * 32 * 8
  assert rows['U-Net forward, XLA'][:2] == (flops / 1e9, 'GFLOP')
  assert rows['matmul 64x64 float32, XLA'][:2] == (2 * 64**3 / 1e9, 'GFLOP')
  assert rows['v * 1.5 + 1 over 1 MiB, XLA'][:2] == (2 * 2**20 / 1e9, 'GB')
  for amount, _, ms, rate in rows.values():
    assert ms > 0 and rate == pytest.approx(amount / ms * 1e3)
  if HAVE_TORCH:
    assert rows['matmul 64x64 float32, PyTorch'][:2] == (2 * 64**3 / 1e9, 'GFLOP')
  assert len(rows) == 4 if HAVE_TORCH else 3
  rows = {r[0]: r[1:] for r in profile.bench_roofline(1, 1, model=OneConv(), dtype='bfloat16', matmul_n=64, copy_mib=1)}
  assert 'matmul 64x64 bfloat16, XLA' in rows and ('matmul 64x64 bfloat16, PyTorch' in rows) == HAVE_TORCH


def test_profile_layers_rejects_bad_arguments():
  with pytest.raises(SystemExit):
    _load_profile_layers().main(['--batch', '0'])
