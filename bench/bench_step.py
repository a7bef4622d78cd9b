"""Training throughput of a real fastai `fit` with label smoothing, against plain cross-entropy on the same batches.

For each model: a digits CNN, the CPU CIFAR-10 ResNet of `fastai_ls.data`, and a small fully-convolutional
segmentation net with N-d outputs, on random images and labels of fastai's tensor types, it times one epoch of
`Learner.fit` with `CrossEntropyLossFlat`, with `LabelSmoothingCE(0.1)`, and with `LabelSmoothingCE(0.1)` plus
`AnnealSmoothing`, in interleaved rounds, and reports the fastest round of each as images per second and as a ratio
to cross-entropy (1.00 = no cost). With `--runs`, it repeats the whole measurement and gives the range over runs.
Prints only its table.

    python bench/bench_step.py [--runs 3] [--rounds 5] [--threads N]
"""
import argparse, gc, time, warnings
import torch
from torch import nn
from torch.utils.data import TensorDataset
import fastai_ls   # first: it keeps fastai's import quiet
from fastai.basics import DataLoaders, Learner, CrossEntropyLossFlat, set_seed
from fastai.callback.progress import ProgressCallback
from fastai.layers import ConvLayer
from fastai.data.core import TfmdDL
from fastai.torch_core import TensorImage, TensorCategory, TensorMask
from fastai_ls.losses import LabelSmoothingCE, LabelSmoothingCEFlat
from fastai_ls.callback import AnnealSmoothing
from fastai_ls.data import digits_cnn, cifar_resnet

def seg_net(n_classes=21, nf=16):
    "A small fully-convolutional net: per-pixel logits `(N, C, H, W)`"
    return nn.Sequential(ConvLayer(3, nf), ConvLayer(nf, nf), nn.Conv2d(nf, n_classes, 1))

def setups(n_batches):
    "name → (model factory, inputs, targets, batch size, loss factories); random inputs, fixed by the seed"
    g = torch.Generator().manual_seed(0)
    def data(shape, n_classes, target_shape=()):
        "fastai's tensor types, as a `DataBlock` pipeline hands them to the model and the loss"
        n = n_batches*shape[0]
        x, y = torch.randn(n, *shape[1:], generator=g), torch.randint(0, n_classes, (n, *target_shape), generator=g)
        return TensorImage(x), (TensorMask if target_shape else TensorCategory)(y)
    flat = lambda: CrossEntropyLossFlat(axis=1)
    return {
        'digits CNN, bs 32, (1, 8, 8)': (digits_cnn, *data((32, 1, 8, 8), 10), 32, CrossEntropyLossFlat, LabelSmoothingCE),
        'CIFAR ResNet, bs 128, (3, 32, 32)': (cifar_resnet, *data((128, 3, 32, 32), 10), 128, CrossEntropyLossFlat, LabelSmoothingCE),
        'segmentation, bs 8, (3, 64, 64) → (21, 64, 64)': (seg_net, *data((8, 3, 64, 64), 21, (64, 64)), 8, flat,
                                                          lambda eps: LabelSmoothingCEFlat(eps, axis=1)),
    }

def epoch_time(make_model, x, y, bs, loss_func, cbs):
    "Seconds for one epoch of `fit` on (x, y), the same batches in the same order for every loss"
    set_seed(0)
    dls = DataLoaders(TfmdDL(TensorDataset(x, y), bs=bs, shuffle=False, num_workers=0),
                      TfmdDL(TensorDataset(x[:bs], y[:bs]), bs=bs, num_workers=0))
    learn = Learner(dls, make_model(), loss_func=loss_func, cbs=cbs)
    learn.remove_cbs(ProgressCallback); learn.logger = lambda *a: None
    gc.collect()   # the Learners of earlier rounds are cyclic garbage: collected here, not inside the timed fit
    t0 = time.perf_counter(); learn.fit(1, 1e-3); return time.perf_counter() - t0

def span(vals, fmt):
    "A range over runs, `lo–hi`, or one value where they agree"
    lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
    return lo if lo == hi else f"{lo}–{hi}"

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', type=int, default=1, help='repeats of the whole measurement; the table gives their range')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--batches', type=int, default=20, help='training batches per epoch')
    p.add_argument('--threads', type=int)
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    warnings.simplefilter('ignore')
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {args.runs} run(s) of {args.rounds} interleaved "
          f"rounds, {args.batches} batches per epoch, the fastest round of each in each run\n")
    print("| model | CE images/s | LS images/s (÷ CE) | LS + AnnealSmoothing images/s (÷ CE) |\n|---|---:|---:|---:|")
    for name, (model, x, y, bs, ce, ls) in setups(args.batches).items():
        runs = {'ce': lambda: (ce(), []), 'ls': lambda: (ls(0.1), []), 'anneal': lambda: (ls(0.1), [AnnealSmoothing('cos', show_eps=False)])}
        ips = {k: [] for k in runs}
        epoch_time(model, x, y, bs, *runs['ce']())   # warm-up
        for _ in range(args.runs):
            best = {k: float('inf') for k in runs}
            for _ in range(args.rounds):
                for k, make in runs.items(): best[k] = min(best[k], epoch_time(model, x, y, bs, *make()))
            for k, v in best.items(): ips[k].append(len(x)/v)
        cell = lambda k: (f"{span(ips[k], '{:,.0f}')} "
                          f"({span([a/c for a, c in zip(ips[k], ips['ce'])], '{:.3f}')})")
        print(f"| {name} | {span(ips['ce'], '{:,.0f}')} | {cell('ls')} | {cell('anneal')} |")

if __name__ == '__main__': main()
