"""Overhead of `AnnealSmoothing`: its per-batch cost in µs, and fit throughput with and without it on the same Learner.

    python bench/bench_callback.py [--epochs 5] [--reps 7] [--bs 64]

The Learner is a small MLP on sklearn's digits, about the cheapest batch fastai can run, so the ratio is a worst
case. Fits with and without the callback alternate, and the best of `reps` is kept for each, which filters out
other load on the machine."""
import argparse, statistics, sys, time, timeit
from pathlib import Path
import torch
from torch import nn
sys.path.insert(0, str(Path(__file__).parents[1]/'tests'))
from conftest import digits_dls
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai_ls.callback import AnnealSmoothing, eps_cos, eps_two_stage, _FitBracket
from fastai_ls.losses import LabelSmoothingCE

def mk_learner(bs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return Learner(digits_dls(bs=bs), model, loss_func=LabelSmoothingCE(0.1), lr=1e-2).remove_cb(ProgressCallback)

def per_call_us(f, n):
    "Best of 5 runs of `n` calls, in µs per call"
    return min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6

def event_costs(bs, n=20_000):
    "µs per call of the callback's `before_batch` (as fastai dispatches it) and of its `_with_events` bracket"
    rows = []
    for name, sched in [('cos (new ε every batch)', eps_cos(0.2, 0.)), ('two_stage (ε constant)', eps_two_stage(0.1, 0.5))]:
        learn = mk_learner(bs)
        cb = AnnealSmoothing(sched)
        learn.add_cb(cb)
        learn.training, learn.pct_train = True, 0.
        cb._in_fit = True   # what `_FitBracket` sets when a fit starts
        cb('before_fit')
        pcts = iter([i / (n * 6) for i in range(n * 6)])
        def step(): learn.pct_train = next(pcts); cb('before_batch')
        base = per_call_us(lambda: setattr(learn, 'pct_train', 0.1), n)   # the assignment alone, subtracted
        rows.append((f"before_batch, {name}", per_call_us(step, n) - base))
        cb('after_fit')
    class Stub:   # a learner whose `_with_events` costs nothing: what remains is the bracket's own cost
        def _with_events(self, *a): pass
    stub = Stub()
    b = _FitBracket(None, stub, None)   # it passes every event but 'fit' straight through
    rows.append(("_with_events bracket, per call (3 per batch)",
                 per_call_us(lambda: b(None, 'batch', None), n) - per_call_us(lambda: stub._with_events(None, 'batch', None), n)))
    return rows

def throughput(bs, epochs, reps):
    learn = mk_learner(bs)
    n_items = len(learn.dls.train) * bs * epochs
    times = {'without': [], 'with': []}
    with learn.no_logging():
        learn.fit(1)   # warm up
        for _ in range(reps):
            for k in ('without', 'with'):
                cbs = AnnealSmoothing(eps_cos(0.2, 0.)) if k == 'with' else None
                t = time.perf_counter(); learn.fit(epochs, cbs=cbs); times[k].append(time.perf_counter() - t)
    return n_items, times, len(learn.dls.train) * epochs

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=5)
    ap.add_argument('--reps', type=int, default=7)
    ap.add_argument('--bs', type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, batch size {a.bs}\n")
    print(f"{'per-batch cost':<52}{'µs':>8}")
    rows = event_costs(a.bs)
    for name, us in rows: print(f"{name:<52}{us:>8.2f}")
    total = rows[0][1] + 3 * rows[-1][1]
    print(f"{'total per training batch (cos, with 3 brackets)':<52}{total:>8.2f}\n")
    n_items, times, n_batches = throughput(a.bs, a.epochs, a.reps)
    best = {k: min(v) for k, v in times.items()}
    print(f"fit throughput, {a.epochs} epochs x {n_batches // a.epochs} batches, best / median of {a.reps}")
    print(f"{'':<20}{'samples/s (best)':>18}{'samples/s (median)':>20}{'ms/batch (best)':>17}")
    for k in ('without', 'with'):
        print(f"{k + ' callback':<20}{n_items / best[k]:>18,.0f}{n_items / statistics.median(times[k]):>20,.0f}{best[k] / n_batches * 1e3:>17.3f}")
    print(f"\nthroughput ratio with/without: {best['without'] / best['with']:.4f} (best), "
          f"{statistics.median(times['without']) / statistics.median(times['with']):.4f} (median); target >= 0.99")
