"""Writes a batch of uint8 images as one PNG grid."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, *, ncols: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one image [rows*(H+p)+p, ncols*(W+p)+p, C] with a border of ``pad_value``.

  ncols defaults to ceil(sqrt(N)); missing cells of the last row stay ``pad_value``.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f'make_grid expects uint8 [N, H, W, C], got {images.dtype} {images.shape}.')
  n, h, w, c = images.shape
  ncols = ncols or max(1, math.ceil(math.sqrt(n)))
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y : y + h, x : x + w] = images[i]
  return grid


def rows_by_class(images: np.ndarray, labels: np.ndarray, pad_value: int = 255) -> tuple[np.ndarray, int]:
  """Reorders images so that a grid with the returned ``ncols`` has one row per class (ascending label).

  Rows shorter than the largest class are filled with blank (``pad_value``) cells.

  Returns:
    ``(images [K * ncols, H, W, C], ncols)``.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if len(images) != len(labels):
    raise ValueError(f'{len(labels)} labels for {len(images)} images.')
  classes = np.unique(labels)
  ncols = int(max(np.sum(labels == k) for k in classes))
  rows = []
  for k in classes:
    row = images[labels == k]
    rows.append(np.concatenate([row, np.full((ncols - len(row),) + images.shape[1:], pad_value, images.dtype)]))
  return np.concatenate(rows), ncols


def save_png(path: str, images: np.ndarray, *, ncols: int | None = None, scale: int = 1, padding: int = 2) -> str:
  """Saves uint8 images [N, H, W, C] as a PNG grid (each pixel repeated ``scale`` times); returns the path."""
  grid = make_grid(images, ncols=ncols, padding=padding)
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path
