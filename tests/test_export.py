"""export.py: a training run as a diffusers folder (checked against diffusers itself) or a TF checkpoint.

The workdirs are written directly (format_fixtures.make_workdir: configs/tiny.py's model, random raw and EMA
parameters, one orbax checkpoint), which takes a second instead of a training run's compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax import export_lib, loading
from ddpm_jax.formats import diffusers as diffusers_format
from ddpm_jax.formats import tf_checkpoint as tf_format
from format_fixtures import assert_schedules_equal, assert_trees_equal, make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

EPS_TOL = 1e-4
STEP = 4


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  return workdir, make_workdir(workdir, tiny.get_config(), step=STEP)


@pytest.fixture(scope='module')
def cond_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('cond'))
  config = tiny.get_config()
  config.model.num_classes = 3
  return workdir, make_workdir(workdir, config, step=STEP, seed=5)


def _same_model(a: loading.LoadedModel, b: loading.LoadedModel):
  assert_trees_equal(a.params, b.params)
  assert_schedules_equal(a.schedule, b.schedule)
  assert (a.var_type, a.clip_denoised, a.mean_type, a.image_size, a.in_channels) == (
    b.var_type,
    b.clip_denoised,
    b.mean_type,
    b.image_size,
    b.in_channels,
  )
  arch = lambda m: {k: v for k, v in m.config_fields().items() if k not in ('dropout', 'dtype', 'param_dtype', 'remat')}
  assert arch(a.model) == arch(b.model)


def _torch_eps(unet, x, t, y=None):
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    kwargs = {} if y is None else {'class_labels': torch.from_numpy(y)}
    out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), **kwargs).sample
  return out.numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------ diffusers


def test_diffusers_export_loads_in_diffusers_with_the_same_eps_and_schedule(run, tmp_path):
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  workdir, _ = run
  out = str(tmp_path / 'exported')
  summary = export_lib.run(workdir=workdir, out_dir=out)
  assert summary['weights'] == 'EMA' and summary['step'] == STEP and summary['pretrained'] == out
  assert sorted(os.listdir(out)) == sorted(
    ['config.json', 'diffusion_pytorch_model.safetensors', 'scheduler_config.json', 'model_index.json']
  )
  assert [f for f in os.listdir(tmp_path) if f != 'exported'] == []  # no partial folder left beside it
  ours = loading.load_workdir(workdir)

  unet = diffusers.UNet2DModel.from_pretrained(out).eval()
  x = np.random.RandomState(0).randn(3, 8, 8, 1).astype(np.float32)
  t = np.array([0, 7, 19], np.int32)
  want = np.asarray(ours.model.apply({'params': ours.params}, x, t, train=False))
  got = _torch_eps(unet, x, t)
  assert np.abs(want).mean() > 0.1  # not a vacuous comparison
  assert np.abs(got - want).max() < EPS_TOL

  pipe = diffusers.DDPMPipeline.from_pretrained(out)
  sched = pipe.scheduler
  np.testing.assert_allclose(sched.betas.numpy(), ours.schedule.betas, rtol=1e-6)
  assert sched.config.num_train_timesteps == 20 and sched.config.variance_type == 'fixed_large'
  assert sched.config.clip_sample is True and sched.config.prediction_type == 'epsilon'
  images = pipe(batch_size=1, num_inference_steps=2, output_type='np').images  # the pipeline runs as it is
  assert images.shape == (1, 8, 8, 1) and np.all(np.isfinite(images))


def test_diffusers_export_round_trips_through_our_importer(run, tmp_path):
  workdir, state = run
  ours = loading.load_workdir(workdir)
  first = loading.load_pretrained(export_lib.run(workdir=workdir, out_dir=str(tmp_path / 'a'))['pretrained'])
  _same_model(first, ours)
  # import -> export -> import is the identity.
  diffusers_format.write_folder(str(tmp_path / 'b'), first)
  _same_model(loading.load_pretrained(str(tmp_path / 'b')), first)
  # --raw: the training weights instead of their EMA.
  raw = export_lib.run(workdir=workdir, out_dir=str(tmp_path / 'raw'), raw=True)
  assert raw['weights'] == 'raw'
  assert_trees_equal(loading.load_pretrained(raw['pretrained']).params, state.params)


def test_class_conditional_export_matches_diffusers_class_embedding(cond_run, tmp_path):
  workdir, _ = cond_run
  out = str(tmp_path / 'cond')
  export_lib.run(workdir=workdir, out_dir=out)
  ours = loading.load_workdir(workdir)
  back = loading.load_pretrained(out)
  assert back.model.num_classes == 3
  _same_model(back, ours)
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['num_class_embeds'] == 4  # 3 classes + the null class
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  unet = diffusers.UNet2DModel.from_pretrained(out).eval()
  x = np.random.RandomState(1).randn(4, 8, 8, 1).astype(np.float32)
  t = np.array([0, 5, 11, 19], np.int32)
  y = np.array([0, 1, 2, 3], np.int64)  # 3 = the null class
  want = np.asarray(ours.model.apply({'params': ours.params}, x, t, y.astype(np.int32), train=False))
  assert np.abs(_torch_eps(unet, x, t, y) - want).max() < EPS_TOL
  assert (
    np.abs(
      want[0] - np.asarray(ours.model.apply({'params': ours.params}, x, t, y[::-1].astype(np.int32), train=False))[0]
    ).max()
    > 1e-3
  )  # labels matter
  # The original TF layout has no class embedding: a clear error, and nothing written.
  with pytest.raises(ValueError, match='no class embedding'):
    export_lib.run(workdir=workdir, out_dir=str(tmp_path / 'cond_tf'), fmt='tf')
  assert not (tmp_path / 'cond_tf').exists()
  assert sorted(os.listdir(tmp_path)) == ['cond']  # and no partial folder


# ------------------------------------------------------------------------------------------------------- tf


def test_tf_export_reimports_identical_parameters(run, tmp_path):
  tf = pytest.importorskip('tensorflow')
  workdir, state = run
  out = str(tmp_path / 'tf')
  summary = export_lib.run(workdir=workdir, out_dir=out, fmt='tf')
  prefix = os.path.join(out, f'model.ckpt-{STEP}')
  assert summary['pretrained'] == prefix and summary['weights'] == 'raw and EMA'
  assert tf.train.latest_checkpoint(out) == prefix
  assert int(tf.train.load_checkpoint(prefix).get_tensor('global_step')) == STEP
  ours = loading.load_workdir(workdir)
  assert_trees_equal(tf_format.load_params(prefix, ours.model, image_size=8), state.ema_params)
  assert_trees_equal(tf_format.load_params(prefix, ours.model, ema=False, image_size=8), state.params)
  first = loading.load_pretrained(prefix)  # what --pretrained PREFIX loads: the run's settings as well
  _same_model(first, ours)
  # import -> export -> import is the identity.
  tf_format.write_checkpoint(os.path.join(str(tmp_path / 'again'), 'model.ckpt-1'), first)
  _same_model(loading.load_pretrained(os.path.join(str(tmp_path / 'again'), 'model.ckpt-1')), first)


# --------------------------------------------------------------------------------------------- bad inputs


def test_bad_requests_fail_before_anything_is_written(run, tmp_path):
  workdir, _ = run
  out = str(tmp_path / 'out')
  with pytest.raises(FileNotFoundError, match='must be a train.py workdir'):
    export_lib.run(workdir=str(tmp_path / 'missing'), out_dir=out)
  with pytest.raises(ValueError, match=r"Unknown --format 'onnx'"):
    export_lib.run(workdir=workdir, out_dir=out, fmt='onnx')
  with pytest.raises(ValueError, match='--raw applies to --format diffusers only'):
    export_lib.run(workdir=workdir, out_dir=out, fmt='tf', raw=True)
  with pytest.raises(FileNotFoundError, match='No checkpoint step 3'):
    export_lib.run(workdir=workdir, out_dir=out, step=3)
  with pytest.raises(ValueError, match='not a hub repo id'):
    export_lib.run(workdir=workdir, out_dir=out, push_to_hub_repo='no slash')
  assert not os.path.exists(out)
  # An --out that holds something is never touched.
  os.makedirs(out)
  with open(os.path.join(out, 'notes.txt'), 'w') as f:
    f.write('mine')
  with pytest.raises(ValueError, match='already holds 1 entries.*never overwrites'):
    export_lib.run(workdir=workdir, out_dir=out)
  assert os.listdir(out) == ['notes.txt']
  with pytest.raises(ValueError, match='is a file'):
    export_lib.run(workdir=workdir, out_dir=os.path.join(out, 'notes.txt'))
  # An empty --out is fine.
  os.makedirs(tmp_path / 'empty')
  export_lib.run(workdir=workdir, out_dir=str(tmp_path / 'empty'))
  assert 'config.json' in os.listdir(tmp_path / 'empty')


def test_a_failed_export_leaves_no_folder(run, tmp_path, monkeypatch):
  workdir, _ = run

  def disk_full(*args, **kwargs):
    raise OSError('No space left on device')

  monkeypatch.setattr(diffusers_format.safetensors_numpy, 'save_file', disk_full)
  with pytest.raises(OSError, match='No space left'):
    export_lib.run(workdir=workdir, out_dir=str(tmp_path / 'out'))
  assert os.listdir(tmp_path) == []  # neither --out nor the hidden partial folder


# ---------------------------------------------------------------------------------------------------- hub


class _FakeHfApi:
  calls: list = []
  fail = False

  def create_repo(self, repo_id, **kwargs):
    self.calls.append(('create_repo', repo_id, kwargs))

  def upload_folder(self, **kwargs):
    if self.fail:
      raise ConnectionError('no network')
    self.calls.append(('upload_folder', sorted(os.listdir(kwargs['folder_path'])), kwargs))
    return f'https://huggingface.co/{kwargs["repo_id"]}/commit/abc'


def test_push_to_hub_uploads_the_finished_folder(run, tmp_path, monkeypatch):
  hub = pytest.importorskip('huggingface_hub')
  workdir, _ = run
  monkeypatch.setattr(hub, 'HfApi', _FakeHfApi)
  monkeypatch.setattr(_FakeHfApi, 'calls', [])
  out = str(tmp_path / 'out')
  summary = export_lib.run(workdir=workdir, out_dir=out, push_to_hub_repo='me/ddpm-tiny')
  assert summary['hub_url'] == 'https://huggingface.co/me/ddpm-tiny/commit/abc'
  (create, name, create_kw), (upload, files, upload_kw) = _FakeHfApi.calls
  assert (create, name, create_kw['exist_ok']) == ('create_repo', 'me/ddpm-tiny', True)
  assert upload == 'upload_folder' and upload_kw['folder_path'] == out and upload_kw['repo_id'] == 'me/ddpm-tiny'
  assert 'diffusion_pytorch_model.safetensors' in files
  # No network: a clear error that says the export itself is complete.
  monkeypatch.setattr(_FakeHfApi, 'fail', True)
  with pytest.raises(OSError, match=r'Could not upload .*ConnectionError: no network.*is complete'):
    export_lib.run(workdir=workdir, out_dir=str(tmp_path / 'out2'), push_to_hub_repo='me/ddpm-tiny')
  assert os.path.isfile(os.path.join(tmp_path, 'out2', 'config.json'))


def test_push_to_hub_without_the_hub_extra(run, tmp_path, monkeypatch):
  workdir, _ = run
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)  # import huggingface_hub now raises ImportError
  with pytest.raises(ImportError, match=r'hub extra.*pip install -e "\.\[hub\]"'):
    export_lib.run(workdir=workdir, out_dir=str(tmp_path / 'out'), push_to_hub_repo='me/ddpm-tiny')
  assert not (tmp_path / 'out').exists()  # checked before anything is exported


# ------------------------------------------------------------------------------------------------ command


def test_export_command(run, tmp_path):
  workdir, _ = run
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT, DDPM_JAX_CPU_TUNING='0')
  env['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '').replace(
    '--xla_force_host_platform_device_count=8', ''
  )  # one device
  out = str(tmp_path / 'tf')
  result = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'export.py'), '--workdir', workdir, '--out', out, '--format', 'tf'],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'--pretrained {out}/model.ckpt-{STEP}' in result.stdout
  assert os.path.isfile(os.path.join(out, f'model.ckpt-{STEP}.index'))
