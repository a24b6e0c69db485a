"""Tests for ddpm_jax.input_pipeline: pixel ranges, deterministic batches, host slices, folders and tfds."""

import time

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import errors
from ddpm_jax import input_pipeline as ip


def test_pixel_range_is_the_papers():
  x = np.arange(256, dtype=np.uint8)
  y = ip.to_model_range(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, x.astype(np.float64) / 127.5 - 1, rtol=0, atol=1e-7)
  assert y[0] == -1.0 and y[-1] == 1.0
  np.testing.assert_array_equal(ip.to_uint8(y), x)
  np.testing.assert_array_equal(ip.to_uint8(np.array([-3.0, 3.0])), [0, 255])
  with pytest.raises(ValueError, match='uint8'):
    ip.to_model_range(np.zeros(3, np.float32))


def test_batch_indices_are_epochs_of_permutations():
  n, b = 10, 4
  idx = np.concatenate([ip.global_batch_indices(n, b, seed=3, step=s) for s in range(5)])  # 20 = 2 epochs.
  assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
  assert not np.array_equal(idx[:10], idx[10:])
  np.testing.assert_array_equal(ip.global_batch_indices(n, b, 3, 2), idx[8:12])
  assert not np.array_equal(ip.global_batch_indices(n, b, 4, 0), idx[:4])


def test_in_memory_batches_resume_hosts_and_shards():
  images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
  it = ip.in_memory_batches(images, global_batch=8, seed=1, num_local_devices=2)
  full = [next(it) for _ in range(6)]
  assert full[0].shape == (2, 4, 4, 4, 1) and full[0].dtype == np.float32
  assert full[0].min() >= -1 and full[0].max() <= 1
  resumed = ip.in_memory_batches(images, global_batch=8, seed=1, start_step=4, num_local_devices=2)
  np.testing.assert_array_equal(next(resumed), full[4])
  # Two hosts with one device each see the two halves of the same global batch.
  h0 = next(ip.in_memory_batches(images, global_batch=8, seed=1, num_local_devices=1, process_index=0, process_count=2))
  h1 = next(ip.in_memory_batches(images, global_batch=8, seed=1, num_local_devices=1, process_index=1, process_count=2))
  np.testing.assert_array_equal(np.concatenate([h0[0], h1[0]]), full[0].reshape(8, 4, 4, 1))


def test_flips_are_per_example_and_horizontal():
  images = np.zeros((64, 2, 3, 1), np.uint8)
  images[:, :, 0] = 255  # Left column white.
  batch = next(ip.in_memory_batches(images, global_batch=64, seed=0, random_flip=True))[0]
  left_white = batch[:, 0, 0, 0] == 1.0
  right_white = batch[:, 0, 2, 0] == 1.0
  assert np.all(left_white ^ right_white)
  assert 16 < left_white.sum() < 48
  unflipped = next(ip.in_memory_batches(images, global_batch=64, seed=0, random_flip=False))[0]
  assert np.all(unflipped[:, 0, 0, 0] == 1.0)


def test_digits():
  d = ip.load_digits(8)
  assert d.shape == (1797, 8, 8, 1) and d.dtype == np.uint8 and d.max() == 255 and d.min() == 0
  assert ip.load_digits(16).shape == (1797, 16, 16, 1)


def test_folder(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / 'a.png')
  (tmp_path / 'sub').mkdir()
  Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / 'sub' / 'b.JPG')
  (tmp_path / 'readme.txt').write_text('x')
  assert [p.split('/')[-1] for p in ip.list_image_files(str(tmp_path))] == ['a.png', 'b.JPG']
  imgs = ip.load_folder(str(tmp_path), 8, 3)
  assert imgs.shape == (2, 8, 8, 3) and imgs.dtype == np.uint8
  batches = list(ip.eval_images('folder', folder=str(tmp_path), image_size=8, batch_size=1))
  assert len(batches) == 2 and batches[0].shape == (1, 8, 8, 3)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='No PNG/JPEG'):
    ip.load_folder(str(tmp_path / 'empty'), 8)


def test_tfds_mock_in_memory_stream_and_eval():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    arr = ip.load_tfds_array('cifar10', 'train', image_size=8)
    assert arr.shape == (12, 8, 8, 3) and arr.dtype == np.uint8
    full = ip.load_tfds_array('cifar10', 'train', image_size=32)
    assert full.shape == (12, 32, 32, 3)
    batches = list(ip.eval_images('cifar10', split='test', image_size=32, batch_size=5))
    assert [b.shape[0] for b in batches] == [5, 5, 2] and batches[0].dtype == np.uint8
    stream = ip.tfds_stream_batches(
      'cifar10', split='train', image_size=16, channels=3, global_batch=8, seed=0, num_local_devices=2
    )
    b = next(stream)
    assert b.shape == (2, 4, 16, 16, 3) and b.dtype == np.float32 and -1 <= b.min() and b.max() <= 1


def test_folder_reports_every_unreadable_file_by_path(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f'ok_{i}.png')
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / 'cut.png')
  data = (tmp_path / 'cut.png').read_bytes()
  (tmp_path / 'cut.png').write_bytes(data[: len(data) // 2])  # a torn copy: the header is fine, the pixels end
  (tmp_path / 'notes.jpg').write_text('not an image')
  with pytest.raises(errors.BadImageFilesError) as e:
    ip.load_folder(str(tmp_path), 8, 3)
  message = str(e.value)
  assert f'{tmp_path}/cut.png' in message and f'{tmp_path}/notes.jpg' in message and '2 of the 5' in message
  assert isinstance(e.value, ValueError)
  # Many bad files: the first MAX_LISTED_BAD_FILES by path, then a count.
  for i in range(ip.MAX_LISTED_BAD_FILES + 3):
    (tmp_path / f'z_{i:02d}.png').write_bytes(b'\x89PNG\r\n\x1a\n')
  with pytest.raises(errors.BadImageFilesError, match=r'and 5 more'):
    ip.load_folder(str(tmp_path), 8, 3)
  with pytest.raises(errors.BadImageFilesError, match='notes.jpg'):
    ip.load_image_file(str(tmp_path / 'notes.jpg'), 8, 3)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
  """A 16-bit grey PNG (PIL mode I;16) with values 40..65408 maps to round(v * 255 / 65535), not to near-white."""
  values = np.linspace(40, 65408, 64).astype(np.uint16).reshape(8, 8)
  Image.fromarray(values).save(tmp_path / 'deep.png')
  with Image.open(tmp_path / 'deep.png') as im:
    assert im.mode == 'I;16'  # a real 16-bit PNG
  grey = ip.load_image_file(str(tmp_path / 'deep.png'), 8, 1)
  expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
  np.testing.assert_array_equal(grey[..., 0], expected)
  assert grey.min() == 0 and grey.max() == 255 and 120 < grey.mean() < 135  # not near-white
  rgb = ip.load_image_file(str(tmp_path / 'deep.png'), 8, 3)
  np.testing.assert_array_equal(rgb, np.repeat(grey, 3, axis=-1))
  np.testing.assert_array_equal(ip.load_folder(str(tmp_path), 8, 1)[0], grey)


def test_real_tfds_offline_says_the_dataset_is_not_prepared(tmp_path):
  """The real tfds code path (no mock) on an empty data_dir: our message, fast, no download, nothing written."""
  tfds = pytest.importorskip('tensorflow_datasets')
  data_dir = tmp_path / 'tfds'
  start = time.time()
  with pytest.raises(errors.DatasetNotPreparedError) as e:
    ip.load_array('cifar10', image_size=32, channels=3, data_dir=str(data_dir))
  assert time.time() - start < 60  # tfds would retry the download for minutes
  message = str(e.value)
  assert message.startswith(f'CIFAR-10 is not prepared in {data_dir}') and 'tfds build cifar10' in message
  assert '--config.data.data_dir' in message and not data_dir.exists()
  with pytest.raises(errors.DatasetNotPreparedError, match='LSUN church_outdoor'):
    next(ip.eval_images('lsun/church_outdoor', split='train', image_size=8, data_dir=str(data_dir)))
  # What `tfds build cifar10` needs and a fresh install lacked: tfds imports importlib_resources here
  # (pyproject.toml declares it).
  assert tfds.builder('cifar10', data_dir=str(data_dir)).code_path is not None
