"""The code is formatted by the formatter configured in pyproject.toml ([tool.ruff]: 2 spaces, 120 columns)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args):
  exe = shutil.which('ruff') or pytest.skip('ruff is not installed (pip install -e ".[test]")')
  return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_code_is_formatted():
  result = _ruff('format', '--check', '--diff', '.')
  assert result.returncode == 0, f'Run `ruff format .` in the repository root:\n{result.stdout[-4000:]}'


def test_no_line_over_120_columns():
  # The formatter leaves long strings and comments alone; this catches them.
  result = _ruff('check', '--select', 'E501', '.')
  assert result.returncode == 0, result.stdout[-4000:]
