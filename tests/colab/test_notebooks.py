"""Every notebook in colab/ runs top to bottom in a fresh 'python3' kernel without an error.

The kernel starts in a temporary directory, so a notebook must not rely on the working directory
(the tutorials find the repository through `lab.__file__`). The Colab install cell does nothing
outside Colab. The kernel compiles with XLA's default flags, not the tests' fast-compile ones
(conftest.py): the tutorials' training loops run several times slower unoptimised.
"""
import os
import pathlib

import nbclient
import nbformat
import pytest

from conftest import FAST_COMPILE_FLAGS

_REPO = pathlib.Path(__file__).resolve().parents[2]
_NOTEBOOKS = sorted((_REPO / 'colab').glob('*.ipynb'))


@pytest.mark.parametrize('path', _NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
  """nbformat v4, kernel python3, and no stored outputs or execution counts."""
  nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata.kernelspec.name == 'python3'
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'
           and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, f'{path.name}: cells {dirty} have stored outputs; clear them before committing'


@pytest.mark.parametrize('path', _NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', os.environ['XLA_FLAGS'].replace(FAST_COMPILE_FLAGS, '').strip())
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError, naming the cell, on the first error
