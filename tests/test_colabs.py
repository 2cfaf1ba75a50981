"""Every notebook in colabs/ runs top to bottom without errors.

The code cells are joined into one script and run in a fresh interpreter, so
a notebook that depends on state left by an earlier test fails here.
"""

import json
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).parent.parent / 'colabs').glob('*.ipynb')
)


def notebook_script(path: pathlib.Path) -> str:
  cells = json.loads(path.read_text())['cells']
  sources = [
      ''.join(cell['source']) for cell in cells if cell['cell_type'] == 'code'
  ]
  # Shell escapes such as `!pip install` only work inside IPython.
  lines = [
      line
      for source in sources
      for line in source.splitlines()
      if not line.lstrip().startswith('!')
  ]
  return '\n'.join(lines) + '\n'


def test_colabs_exist():
  assert NOTEBOOKS, 'colabs/ contains no notebook'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
  script = tmp_path / f'{path.stem}.py'
  script.write_text(notebook_script(path))
  result = subprocess.run(
      [sys.executable, str(script)],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr[-4000:]
