"""Paired differences between strategies, from the `results.csv` of `fastai-ls compare` runs.

All strategies of a seed share initial weights and batches, so the noise level of a difference is the std of the
per-seed difference. Prints a markdown table: mean ± std over seeds of (first − second), and in brackets the number
of seeds where the first was lower (better).

    python bench/paired.py bench/results/digits_100 bench/results/digits_200 bench/results/digits_1000
"""
import argparse
from pathlib import Path
import pandas as pd
from fastai_ls.compare import METRICS

PAIRS = [('anneal', 'ls'), ('anneal', 'ce'), ('ls', 'ce'), ('anneal', 'ce+temp')]

def cell(d, metric):
    scale, digits = (100, 2) if metric == 'error_rate' else (1, 4)
    return f"{d.mean()*scale:+.{digits}f} ± {d.std()*scale:.{digits}f} ({(d < 0).sum()}/{len(d)})".replace('-', '−')

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+', type=Path, help='folders holding a results.csv')
    args = p.parse_args()
    print(f"| train | difference | error (points) | {' | '.join(list(METRICS.values())[1:])} |")
    print('|---:|---|' + '---:|' * len(METRICS))
    for df in sorted((pd.read_csv(run/'results.csv') for run in args.runs), key=lambda df: df.n_train.iloc[0]):
        by = {st: g.set_index('seed').sort_index() for st, g in df.groupby('strategy')}
        for a, b in PAIRS:
            if a not in by or b not in by: continue
            d = by[a][list(METRICS)] - by[b][list(METRICS)]
            print(f"| {df.n_train.iloc[0]} | {a} − {b} | {' | '.join(cell(d[m].dropna(), m) for m in METRICS)} |")

if __name__ == '__main__': main()
