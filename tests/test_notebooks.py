"Execute every notebook in nbs/ as `nbdev-test` does (cells flagged with `tst_flags`, i.e. slow or cuda, are skipped)"
import subprocess, sys
from pathlib import Path
import pytest

NBS = Path(__file__).parents[1]/'nbs'
NOTEBOOKS = sorted(p for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts and not p.name.startswith('_'))
RUN = ("import sys; from nbdev.test import test_nb; from nbdev.config import get_config; "
       "ok, _ = test_nb(sys.argv[1], skip_flags=get_config().tst_flags.split()); sys.exit(0 if ok else 1)")

def test_all_notebooks_found():
    assert {'index.ipynb', '00_losses.ipynb'} <= {p.name for p in NOTEBOOKS}

@pytest.mark.slow
@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb):
    # a fresh interpreter per notebook, like nbdev-test, so notebooks cannot lean on each other's state
    res = subprocess.run([sys.executable, '-c', RUN, str(nb)], capture_output=True, text=True, cwd=NBS, timeout=1200)
    assert res.returncode == 0, f"{nb.name} failed:\n{res.stderr[-6000:]}"
