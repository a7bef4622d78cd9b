"The docs configuration stays valid for users who build the site with quarto (`nbdev-docs`), which CI cannot run"
from pathlib import Path
import yaml

NBS = Path(__file__).parents[1]/'nbs'

def _notebooks(): return {str(p.relative_to(NBS)) for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts}

def _sidebar_entries(contents):
    for c in contents:
        if isinstance(c, str): yield c
        else: yield from _sidebar_entries(c.get('contents', []))

def test_quarto_config_parses_and_its_files_exist():
    cfg = yaml.safe_load((NBS/'_quarto.yml').read_text())
    assert cfg['project']['type'] == 'website'
    for f in cfg['metadata-files']: assert (NBS/f).is_file(), f
    assert (NBS/cfg['format']['html']['css']).is_file()

def test_sidebar_lists_every_notebook_once():
    sidebar = yaml.safe_load((NBS/'sidebar.yml').read_text())
    entries = list(_sidebar_entries(sidebar['website']['sidebar']['contents']))
    assert len(entries) == len(set(entries)), entries
    assert set(entries) == _notebooks()

def test_every_notebook_has_a_title():
    import json
    for nb in _notebooks():
        cells = json.loads((NBS/nb).read_text())['cells']
        md = [''.join(c['source']) for c in cells if c['cell_type'] == 'markdown']
        assert md and md[0].lstrip().startswith('# '), f"{nb}: the first markdown cell must be the title"
