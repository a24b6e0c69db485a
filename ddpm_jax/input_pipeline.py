"""Training and evaluation data: tfds, image folders and scikit-learn's digits, as uint8 or [-1, 1] batches.

This is the only module where pixel ranges change: `to_model_range` maps uint8 {0..255} to [-1, 1] exactly as
the paper (x / 127.5 - 1) and `to_uint8` maps model outputs back.

Two training paths:
  * In memory (digits, image folders, and tfds splits with ``in_memory=True`` such as CIFAR-10): the split is
    decoded once into a uint8 numpy array and batch ``step`` is a pure function of ``(seed, step)``: a fresh
    permutation per epoch from ``np.random.default_rng([seed, epoch])`` and per-example flips from
    ``default_rng([seed, step, 1])``. A resumed run therefore sees exactly the batches an uninterrupted run sees.
  * Streaming (large tfds splits: CelebA-HQ, LSUN): ``tf.data`` with a file-shuffle, a shuffle buffer and
    repeat. Its shuffle seed is derived from ``(seed, start_step)``, so a resumed run draws a fresh, reproducible
    order rather than replaying the interrupted one (statistically equivalent; not bit-exact).

The global batch is sliced per host (``process_index``) and then reshaped to ``[local_devices, per_device, ...]``.
TensorFlow is imported lazily and never sees an accelerator.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from ddpm_jax import errors

# Datasets this module knows: name -> (tfds name or None, natural channels).
TFDS_DATASETS = {
  'cifar10': 'cifar10',
  'celeb_a_hq/256': 'celeb_a_hq/256',
  'lsun/church_outdoor': 'lsun/church_outdoor',
  'lsun/bedroom': 'lsun/bedroom',
  'lsun/cat': 'lsun/cat',
}
DATASETS = tuple(TFDS_DATASETS) + ('digits', 'folder')
_PRETTY = {
  'cifar10': 'CIFAR-10',
  'celeb_a_hq/256': 'CelebA-HQ 256x256',
  'lsun/church_outdoor': 'LSUN church_outdoor',
  'lsun/bedroom': 'LSUN bedroom',
  'lsun/cat': 'LSUN cat',
}
# Datasets with class labels (for class-conditional training) and their number of classes; a folder's classes
# are its sub-folders (see `load_folder_labeled`).
LABELED_DATASETS = {'cifar10': 10, 'digits': 10, 'folder': None}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# How many unreadable files of a folder one error message lists by path (it counts the rest).
MAX_LISTED_BAD_FILES = 20
# PIL modes of 16-bit greyscale PNGs (PIL reads 16-bit RGB PNGs as 8-bit 'RGB', keeping each value's high byte).
_GREY16_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


# ------------------------------------------------------------------------------------------------------------------
# Pixel ranges
# ------------------------------------------------------------------------------------------------------------------


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 images {0..255} -> float32 in [-1, 1], x / 127.5 - 1 (the paper's scaling, REFERENCE §1)."""
  if images.dtype != np.uint8:
    raise ValueError(f'to_model_range expects uint8 images, got dtype {images.dtype}.')
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x) -> np.ndarray:
  """Model-range images in [-1, 1] -> uint8 {0..255}: clip, (x + 1) * 127.5, round half up.

  Rounding is the exact inverse of `to_model_range` (a training image comes back as the same uint8 image); see
  ``ddpm_jax.evaluation`` for why FID uses it rather than truncation.

  Args:
    x: float array of any shape (numpy or jax), nominally in [-1, 1]; values outside are clipped.

  Returns:
    uint8 numpy array of the same shape.

  Raises:
    ValueError: if x contains NaN (a diverged sampler should fail loudly, not map to some pixel value).
  """
  x = np.asarray(x, dtype=np.float64)  # float64: (x+1)*127.5 of float32 inputs lands within 1e-5 of integers
  if np.isnan(x).any():
    raise ValueError(f'to_uint8: input contains {int(np.isnan(x).sum())} NaN values; the sampler diverged.')
  return np.floor((np.clip(x, -1.0, 1.0) + 1.0) * 127.5 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------------------
# Sources -> uint8 arrays
# ------------------------------------------------------------------------------------------------------------------


def hide_accelerators_from_tf():
  """Imports TensorFlow with no GPU/TPU visible to it (tf.data and summaries only); returns the module."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy: only the tfds paths need it

  tf.config.set_visible_devices([], 'GPU')
  try:
    tf.config.set_visible_devices([], 'TPU')
  except (ValueError, RuntimeError):
    pass
  return tf


def _resize_uint8(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """Center-crops to a square and resizes with PIL (bicubic; box when shrinking a lot), to [S, S, channels]."""
  if image.ndim == 2:
    image = image[..., None]
  h, w = image.shape[:2]
  if (h, w) != (image_size, image_size):
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[top : top + s, left : left + s]
    mode_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    mode_image = mode_image.resize(
      (image_size, image_size), Image.Resampling.BICUBIC, reducing_gap=None if s <= 2 * image_size else 2.0
    )
    image = np.asarray(mode_image)
    if image.ndim == 2:
      image = image[..., None]
  return _to_channels(image, channels)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  c = image.shape[-1]
  if c == channels:
    return image
  if channels == 1:  # ITU-R 601 luma, as PIL 'L'.
    grey = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]
  if channels == 3 and c == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 3 and c == 4:
    return image[..., :3]
  raise ValueError(f'Cannot convert images with {c} channels to {channels}.')


def load_digits(image_size: int = 8) -> np.ndarray:
  """scikit-learn's bundled 8x8 digits (1,797 images, grey levels 0..16) as uint8 [N, S, S, 1].

  Levels are mapped to 0..255 with round(v * 255 / 16); for image_size > 8 images are upscaled bicubically.
  """
  from sklearn.datasets import load_digits as _load  # pylint: disable=g-import-not-at-top  # heavy: digits only

  raw = _load().images  # [1797, 8, 8] float64 in 0..16
  images = np.round(raw * (255.0 / 16.0)).astype(np.uint8)[..., None]
  if image_size != 8:
    images = np.stack([_resize_uint8(im, image_size, 1) for im in images])
  return images


def load_digits_labels() -> np.ndarray:
  """The class (0..9) of each of scikit-learn's digits, int32 [1797], in `load_digits` order."""
  from sklearn.datasets import load_digits as _load  # pylint: disable=g-import-not-at-top  # heavy: digits only

  return _load().target.astype(np.int32)


def folder_classes(folder: str) -> list[str]:
  """Class names of a labelled image folder: its immediate sub-folders that hold images, sorted."""
  return sorted(
    d
    for d in os.listdir(folder)
    if os.path.isdir(os.path.join(folder, d)) and list_image_files(os.path.join(folder, d))
  )


def list_image_files(folder: str) -> list[str]:
  """Sorted paths of the PNG/JPEG files under ``folder`` (recursive)."""
  paths = []
  for root, _, files in os.walk(folder):
    for f in files:
      if f.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, f))
  return sorted(paths)


def load_folder(folder: str, image_size: int, channels: int = 3) -> np.ndarray:
  """Every PNG/JPEG under ``folder``, center-cropped and resized, as uint8 [N, S, S, channels].

  Each file is decoded once, completely; files that cannot be read (truncated, not an image, an unsupported
  mode) do not stop the loop: they are all reported together, by path, in one `errors.BadImageFilesError`.
  """
  paths = list_image_files(folder)
  if not paths:
    raise errors.UserError(f'No PNG/JPEG images found under {folder!r}.')
  images, bad = [], []
  for p in paths:
    try:
      images.append(load_image_file(p, image_size, channels))
    except errors.BadImageFilesError as e:
      bad.append(e.args[0])
  if bad:
    listed = '; '.join(bad[:MAX_LISTED_BAD_FILES])
    more = f'; and {len(bad) - MAX_LISTED_BAD_FILES} more' if len(bad) > MAX_LISTED_BAD_FILES else ''
    raise errors.BadImageFilesError(
      f'{len(bad)} of the {len(paths)} image files under {folder!r} cannot be used: {listed}{more}. '
      'Fix or remove them (or move them out of the folder).'
    )
  return np.stack(images)


def load_image_file(path: str, image_size: int, channels: int = 3) -> np.ndarray:
  """One PNG/JPEG file, converted to grey or RGB, center-cropped and resized, as uint8 [S, S, channels].

  16-bit greyscale PNGs are scaled to 0..255 as round(v * 255 / 65535); 16-bit RGB PNGs keep each value's
  high byte (PIL's reading, within one level of the same scaling).

  Raises:
    errors.BadImageFilesError: the file cannot be decoded completely (truncated, not an image) or has a mode
      that cannot be converted; the message starts with the path.
  """
  try:
    with Image.open(path) as im:
      im.load()  # decode everything now: a truncated file fails here, with its name
      if im.mode in _GREY16_MODES:
        image = _grey16_to_uint8(np.asarray(im), path)
        return _resize_uint8(image, image_size, channels)
      im = im.convert('L' if channels == 1 else 'RGB')
      return _resize_uint8(np.asarray(im), image_size, channels)
  except UnidentifiedImageError:
    raise errors.BadImageFilesError(f'{path} (not a PNG/JPEG image PIL can read)') from None
  except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated data, broken chunks, odd modes
    if isinstance(e, errors.BadImageFilesError):
      raise
    raise errors.BadImageFilesError(f'{path} ({type(e).__name__}: {e})') from None


def _grey16_to_uint8(values: np.ndarray, path: str) -> np.ndarray:
  """A 16-bit grey image (PIL mode I;16 or I) -> uint8, round(v * 255 / 65535)."""
  values = values.astype(np.int64)
  if values.size and (values.min() < 0 or values.max() > 65535):
    raise errors.BadImageFilesError(
      f'{path} (32-bit grey values {values.min()}..{values.max()} outside the 16-bit range 0..65535)'
    )
  return ((values * 255 + 32767) // 65535).astype(np.uint8)


def load_folder_labeled(folder: str, image_size: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """A folder with one sub-folder per class (``folder/<class>/*.png``): images and labels by sorted class name.

  Returns:
    ``(uint8 [N, S, S, C], int32 [N])``; images in `load_folder` order (sorted paths).
  """
  classes = folder_classes(folder)
  if not classes:
    raise errors.UserError(
      f'{folder!r} has no sub-folders with images; class-conditional training on a folder needs '
      'one sub-folder per class (folder/<class name>/*.png).'
    )
  images = load_folder(folder, image_size, channels)
  paths = list_image_files(folder)
  top = [os.path.relpath(p, folder).split(os.sep)[0] for p in paths]
  stray = [p for p, t in zip(paths, top) if t not in classes]
  if stray:
    raise errors.UserError(
      f'{len(stray)} images of {folder!r} lie outside the class sub-folders (e.g. {stray[0]!r}); '
      'move them into a class folder.'
    )
  return images, np.asarray([classes.index(t) for t in top], np.int32)


def _tfds_dataset(name: str, split: str, data_dir: str | None, shuffle_files: bool, seed: int | None):
  """``(tf, tf.data.Dataset)`` of a prepared tfds split; never downloads (see `open_tfds_split`)."""
  ds = open_tfds_split(name, split, data_dir, shuffle_files=shuffle_files, seed=seed)
  return hide_accelerators_from_tf(), ds


def open_tfds_split(name: str, split: str, data_dir: str | None, *, shuffle_files: bool = False, seed=None):
  """The ``tf.data.Dataset`` of a tfds split that is already prepared in ``data_dir``, built lazily (cheap).

  Never downloads: without network tfds would retry for minutes before failing, and the LSUN/CelebA-HQ data
  need manual downloads anyway. Call it before any model is built to check that the data are there.

  Args:
    name: one of ``TFDS_DATASETS``.
    split: a tfds split ('train', 'test', 'train[:1000]', ...).
    data_dir: tfds data_dir (None or '': tfds' default, ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets).
    shuffle_files: shuffle the file order (training streams).
    seed: the file-shuffle seed.

  Raises:
    errors.DatasetNotPreparedError: the dataset is not prepared in the data_dir (the message names it).
    errors.UserError: the split does not exist.
  """
  hide_accelerators_from_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy (TensorFlow)

  if name not in TFDS_DATASETS:
    raise errors.UserError(f'Unknown tfds dataset {name!r}; choose one of {tuple(TFDS_DATASETS)}.')
  tfds_name = TFDS_DATASETS[name]
  builder = tfds.builder(tfds_name, data_dir=data_dir or None)
  read_config = tfds.ReadConfig(shuffle_seed=seed) if shuffle_files else None
  try:
    return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
  except Exception as e:  # pylint: disable=broad-except  # tfds raises AssertionError for missing data
    if not builder.is_prepared():
      root = builder.data_dir_root
      how = (
        f'run `tfds build {tfds_name.split("/")[0]} --data_dir {root}` with network access'
        if name == 'cifar10'
        else f'prepare it with `tfds build {tfds_name} --data_dir {root}` (it needs the manual download tfds describes)'
      )
      raise errors.DatasetNotPreparedError(
        f'{_PRETTY.get(name, name)} is not prepared in {root}; {how}, or point the data_dir at the folder that '
        'holds it (train.py: --config.data.data_dir=..., other commands: --data_dir=...).'
      ) from None
    if isinstance(e, (ValueError, KeyError)) and 'split' in str(e).lower():
      raise errors.UserError(f'Split {split!r} of {name!r}: {e}') from None
    raise


def _tf_preprocess(tf, image_size: int, channels: int):
  """tf.data map fn: uint8 image -> center-cropped, resized uint8 [S, S, channels]."""

  def fn(example):
    image = example['image']
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    s = tf.minimum(h, w)
    image = tf.image.crop_to_bounding_box(image, (h - s) // 2, (w - s) // 2, s, s)
    image = tf.cond(
      tf.logical_and(tf.equal(s, image_size), tf.equal(s, image_size)),
      lambda: image,
      lambda: tf.cast(
        tf.clip_by_value(
          tf.round(tf.image.resize(image, [image_size, image_size], method='bicubic', antialias=True)), 0, 255
        ),
        tf.uint8,
      ),
    )
    if channels == 1 and image.shape[-1] == 3:
      image = tf.image.rgb_to_grayscale(image)
    image = tf.ensure_shape(image, [image_size, image_size, channels])
    return image

  return fn


def load_tfds_array(
  name: str, split: str, image_size: int, channels: int = 3, data_dir: str | None = None, with_labels: bool = False
):
  """A whole tfds split decoded into host memory as uint8 [N, S, S, C] (in file order).

  With ``with_labels`` returns ``(images, labels int32 [N])`` from the examples' ``label`` feature.
  """
  tf, ds = _tfds_dataset(name, split, data_dir, shuffle_files=False, seed=None)
  prep = _tf_preprocess(tf, image_size, channels)
  if with_labels:
    ds = ds.map(lambda ex: (prep(ex), tf.cast(ex['label'], tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
    batches = list(ds.batch(1024).as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  batches = [b for b in ds.batch(1024).as_numpy_iterator()]
  return np.concatenate(batches, axis=0)


def load_array(
  dataset: str,
  *,
  split: str = 'train',
  image_size: int,
  channels: int,
  folder: str = '',
  data_dir: str = '',
  with_labels: bool = False,
):
  """Any known source (``DATASETS``) as an in-memory uint8 array [N, S, S, C].

  With ``with_labels`` returns ``(images, labels int32 [N])``; only ``LABELED_DATASETS`` have labels.
  """
  if with_labels and dataset not in LABELED_DATASETS:
    raise errors.UserError(f'{dataset!r} has no class labels; labelled datasets are {sorted(LABELED_DATASETS)}.')
  if dataset == 'digits':
    images = load_digits(image_size)
    return (images, load_digits_labels()) if with_labels else images
  if dataset == 'folder':
    return (
      load_folder_labeled(folder, image_size, channels) if with_labels else load_folder(folder, image_size, channels)
    )
  if dataset in TFDS_DATASETS:
    return load_tfds_array(dataset, split, image_size, channels, data_dir or None, with_labels=with_labels)
  raise errors.UserError(f'Unknown dataset {dataset!r}; choose one of {DATASETS}.')


# ------------------------------------------------------------------------------------------------------------------
# Training batches
# ------------------------------------------------------------------------------------------------------------------


def global_batch_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
  """Example indices of global batch ``step``: epochs of seeded permutations, a pure function of (seed, step).

  Args:
    num_examples: N, the size of the in-memory split.
    global_batch: B.
    seed: data seed.
    step: the optimizer step this batch feeds.

  Returns:
    int64 [B] indices; batches wrap across epoch boundaries like ``shuffle().repeat().batch()``.
  """
  start = step * global_batch
  idx = np.empty(global_batch, dtype=np.int64)
  filled = 0
  while filled < global_batch:
    epoch, offset = divmod(start + filled, num_examples)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    take = min(global_batch - filled, num_examples - offset)
    idx[filled : filled + take] = perm[offset : offset + take]
    filled += take
  return idx


def _host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  if global_batch % process_count:
    raise ValueError(f'Global batch {global_batch} is not divisible by the host count {process_count}.')
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


def shard(batch: np.ndarray, num_devices: int) -> np.ndarray:
  """[B, ...] -> [num_devices, B // num_devices, ...] (device d gets examples d*b .. d*b+b-1)."""
  if batch.shape[0] % num_devices:
    raise ValueError(f'Batch of {batch.shape[0]} is not divisible by {num_devices} devices.')
  return batch.reshape((num_devices, batch.shape[0] // num_devices) + batch.shape[1:])


def in_memory_batches(
  images: np.ndarray,
  *,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  random_flip: bool = True,
  num_local_devices: int = 1,
  process_index: int = 0,
  process_count: int = 1,
  labels: np.ndarray | None = None,
) -> Iterator[np.ndarray | dict]:
  """Yields this host's part of every global batch from ``start_step`` on, sharded and in [-1, 1].

  Args:
    images: uint8 [N, H, W, C], the whole split.
    labels: optional int [N] class labels; then each batch is ``{'image': ..., 'label': int32 [D, b]}``.
    global_batch: batch size over all hosts and devices.
    seed: data seed; batch ``step`` depends only on (seed, step, global_batch).
    start_step: the first step to yield (the step a resumed run restarts from).
    random_flip: flip each example horizontally with probability 1/2.
    num_local_devices: leading axis of the yielded arrays.
    process_index: this host's index.
    process_count: number of hosts.

  Yields:
    float32 [num_local_devices, global_batch / (process_count * num_local_devices), H, W, C] in [-1, 1]
    (or a dict with it as ``image`` and the labels as ``label`` when ``labels`` is given).
  """
  if labels is not None and len(labels) != len(images):
    raise ValueError(f'{len(labels)} labels for {len(images)} images.')
  host = _host_slice(global_batch, process_index, process_count)
  step = start_step
  while True:
    idx = global_batch_indices(len(images), global_batch, seed, step)
    batch = images[idx]
    if random_flip:
      flips = np.random.default_rng([seed, step, 1]).random(global_batch) < 0.5
      batch = np.where(flips[:, None, None, None], batch[:, :, ::-1], batch)
    x = shard(to_model_range(batch[host]), num_local_devices)
    if labels is None:
      yield x
    else:
      yield {'image': x, 'label': shard(np.asarray(labels, np.int32)[idx][host], num_local_devices)}
    step += 1


def tfds_stream_batches(
  dataset: str,
  *,
  split: str,
  image_size: int,
  channels: int,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  random_flip: bool = True,
  shuffle_buffer: int = 10_000,
  data_dir: str = '',
  num_local_devices: int = 1,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[np.ndarray]:
  """Streams a tfds split (shuffle, repeat, per-example flips, this host's shard), sharded and in [-1, 1].

  Each host reads a disjoint 1/process_count of the split (``tfds.even_splits``). Shuffle seeds are derived from
  (seed, start_step, process_index), so a resumed run is reproducible but not a replay of the interrupted one.

  Yields:
    float32 [num_local_devices, global_batch / (process_count * num_local_devices), H, W, C] in [-1, 1].
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy (TensorFlow)

  local_batch = global_batch // process_count
  host_split = tfds.even_splits(split, n=process_count)[process_index] if process_count > 1 else split
  stream_seed = int(np.random.default_rng([seed, start_step, process_index]).integers(2**31))
  tf, ds = _tfds_dataset(dataset, host_split, data_dir or None, shuffle_files=True, seed=stream_seed)
  ds = ds.repeat().shuffle(shuffle_buffer, seed=stream_seed)
  ds = ds.map(_tf_preprocess(tf, image_size, channels), num_parallel_calls=tf.data.AUTOTUNE)
  if random_flip:

    def flip(image, i):
      return tf.image.stateless_random_flip_left_right(image, seed=tf.stack([tf.cast(stream_seed, tf.int64), i]))

    ds = ds.enumerate().map(lambda i, im: flip(im, i), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  for batch in ds.as_numpy_iterator():
    yield shard(to_model_range(batch), num_local_devices)


def prefetch_to_device(iterator: Iterator[np.ndarray], size: int, sharding) -> Iterator:
  """Keeps up to ``size`` sharded batches on the devices ahead of the consumer (async host-to-device copies).

  Args:
    iterator: yields this process's host arrays [num_local_devices, b, ...] (or dicts of them).
    size: batches in flight (0: no prefetch, arrays are placed on use).
    sharding: a `jax.sharding.Sharding` over the leading axis (data_parallel.device_sharding); with several
      processes the yielded global arrays are [num_devices, b, ...], each process holding its own rows.
  """
  queue = collections.deque()
  for batch in iterator:
    queue.append(jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ------------------------------------------------------------------------------------------------------------------
# Evaluation images
# ------------------------------------------------------------------------------------------------------------------


def eval_images(
  dataset: str,
  *,
  split: str = 'train',
  image_size: int,
  channels: int = 3,
  batch_size: int = 256,
  folder: str = '',
  data_dir: str = '',
  num_images: int | None = None,
) -> Iterator[np.ndarray]:
  """Yields one pass over a split (tfds, folder or digits) as uint8 [b, S, S, C] batches, unshuffled, no flips.

  The last batch may be smaller. For FID reference statistics, bits/dim on the test set, etc.

  Args:
    dataset: one of ``DATASETS``.
    split: tfds split name (ignored for 'digits' and 'folder').
    image_size: output resolution (center crop + resize when different).
    channels: 3 or 1.
    batch_size: images per yielded batch.
    folder: image folder for dataset='folder'.
    data_dir: tfds data_dir ('' for the default).
    num_images: stop after this many images (None: the whole split).
  """
  if dataset in TFDS_DATASETS:
    tf, ds = _tfds_dataset(dataset, split, data_dir or None, shuffle_files=False, seed=None)
    ds = ds.map(_tf_preprocess(tf, image_size, channels), num_parallel_calls=tf.data.AUTOTUNE)
    if num_images is not None:
      ds = ds.take(num_images)
    yield from ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    return
  images = load_array(dataset, split=split, image_size=image_size, channels=channels, folder=folder, data_dir=data_dir)
  if num_images is not None:
    images = images[:num_images]
  for i in range(0, len(images), batch_size):
    yield images[i : i + batch_size]
