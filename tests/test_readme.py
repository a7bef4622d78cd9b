"README.md's Python code blocks run, in order, in a fresh interpreter; and README mirrors nbs/index.ipynb's code"
import json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT/'README.md').read_text()

def python_blocks(markdown): return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)

def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks(README)
    assert blocks, "README.md has no ```python blocks"
    script = tmp_path/'readme_blocks.py'
    script.write_text('import matplotlib; matplotlib.use("Agg")\n' + '\n'.join(blocks))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-6000:]

def test_readme_code_matches_index_notebook():
    nb = json.loads((ROOT/'nbs'/'index.ipynb').read_text())
    cells = [''.join(c['source']).strip() for c in nb['cells'] if c['cell_type'] == 'code' and not ''.join(c['source']).startswith('#| hide')]
    assert [b.strip() for b in python_blocks(README)] == cells

def test_result_tables_match_the_committed_csvs():
    "Each README table marked `<!-- results: RUN -->` is what `format_table` makes of bench/results/RUN/results.csv"
    import pandas as pd
    from fastai_ls.compare import format_table
    cols = dict(error_rate='error %', nll='NLL', ece='ECE', nll_ts='NLL after TS', ece_ts='ECE after TS')
    marked = re.findall(r'<!-- results: (\w+) -->\n((?:\|.*\n)+)', README)
    assert len(marked) >= 2, "README.md has no marked results tables"
    for run, table in marked:
        assert table.strip() == format_table(pd.read_csv(ROOT/'bench'/'results'/run/'results.csv'), cols), run

def test_speed_tables_are_the_committed_runs():
    "Each README table marked `<!-- bench: FILE -->` is the last table of the committed benchmark run in bench/results/FILE, as printed"
    marked = re.findall(r'<!-- bench: ([\w.]+) -->\n((?:\|.*\n)+)', README)
    assert {f for f, _ in marked} >= {'bench_loss_cpu_2cores.txt', 'bench_step_cpu_2cores.txt'}, marked
    for run, table in marked:
        tables = re.findall(r'(?:^\|.*\n)+', (ROOT/'bench'/'results'/run).read_text(), flags=re.M)
        assert table == tables[-1], run
