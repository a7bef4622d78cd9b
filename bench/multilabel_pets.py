"""Multi-label label smoothing on real photos: plain BCE vs each smoothing variant vs annealed smoothing, over seeds.

Pets: the 370-photo sample in tests/data with two labels per photo, species and breed (39 binary outputs: 'cat',
'dog' and the 37 breeds), 2 photos of each breed held out (74 validation photos, 296 for training), a small CNN
trained from scratch on the CPU. Strategies, all with the same data, initial weights and batches for a seed:

- bce: fastai's `BCEWithLogitsLossFlat`, no smoothing;
- symmetric, uniform, mass: `LabelSmoothingBCEFlat(eps, variant)` with a fixed ε;
- anneal: `LabelSmoothingBCEFlat(eps, 'symmetric')` with `AnnealSmoothing('cos')`, ε from `eps` to 0.

Writes to --out: results.csv (one row per strategy and seed), summary.md (mean ± std over seeds, paired differences
against bce, the command and its wall time) and reliability.png (seed 0, pooled over every (photo, label) pair).

    python bench/multilabel_pets.py                      # pets, 5 seeds -> bench/results/multilabel_pets
    python bench/multilabel_pets.py --dataset planet     # fastai's PLANET_TINY (needs the download)
"""
import argparse, functools, re, shlex, sys, time
from pathlib import Path
import pandas as pd, torch
from fastai.vision.all import (DataBlock, ImageBlock, MultiCategoryBlock, FuncSplitter, IndexSplitter, ColReader, RandomResizedCrop, FlipItem,
                               Normalize, PILImage, Learner, BCEWithLogitsLossFlat, accuracy_multi, get_image_files,
                               imagenet_stats, set_seed, untar_data, URLs, noop, nn)
from fastai_ls.all import LabelSmoothingBCEFlat, AnnealSmoothing, ECE, MultiBrier, NLL, reliability_diagram

ROOT = Path(__file__).parents[1]
PETS = ROOT/'tests'/'data'/'oxford-iiit-pet'/'images'
STRATEGIES = ('bce', 'symmetric', 'uniform', 'mass', 'anneal')
METRICS = {'accuracy_multi': 'accuracy_multi', 'ece': 'ECE', 'classwise_ece': 'per-label ECE', 'brier': 'Brier', 'nll': 'NLL'}
HIGHER_IS_BETTER = {'accuracy_multi', 'species_acc', 'breed_top1'}

def breed(f:Path) -> str: return re.match(r'^(.+)_\d+\.jpg$', f.name).group(1)
def pets_labels(f:Path) -> list: return ['cat' if breed(f)[0].isupper() else 'dog', breed(f)]   # cat breeds are capitalised

@functools.lru_cache
def _photos(path:Path, size:int) -> dict:
    "Every photo, decoded once and resized to 5/4 of `size`, for the random crops"
    return {f: PILImage.create(f).resize((size * 5 // 4,) * 2) for f in sorted(get_image_files(path))}

def pets_dls(path=PETS, size=32, bs=32, n_valid=2):
    "Pets with species and breed labels; the first `n_valid` photos of each breed (by file name) are held out"
    imgs = _photos(Path(path), size)
    files = list(imgs)
    held_out = {f for b in {breed(f) for f in files} for f in sorted(g for g in files if breed(g) == b)[:n_valid]}
    dblock = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_x=lambda f: imgs[f], get_y=pets_labels,
                       splitter=FuncSplitter(lambda f: f in held_out),
                       item_tfms=[RandomResizedCrop(size, min_scale=0.5), FlipItem()], batch_tfms=Normalize.from_stats(*imagenet_stats))
    return dblock.dataloaders(files, bs=bs, device='cpu', num_workers=0)

def planet_dls(path, size=32, bs=32, valid_pct=0.2):
    "fastai's PLANET_TINY layout: labels.csv (image_name, space-separated tags) and train/<image_name>.jpg; the first rows are held out"
    df = pd.read_csv(path/'labels.csv')
    n_valid = round(len(df) * valid_pct)
    vocab = sorted({t for tags in df.tags for t in tags.split()})   # a tag seen only in validation is a label all the same
    dblock = DataBlock(blocks=(ImageBlock, MultiCategoryBlock(vocab=vocab)), get_x=ColReader('image_name', pref=path/'train', suff='.jpg'),
                       get_y=ColReader('tags', label_delim=' '), splitter=IndexSplitter(range(n_valid)),
                       item_tfms=[RandomResizedCrop(size, min_scale=0.5), FlipItem()], batch_tfms=Normalize.from_stats(*imagenet_stats))
    return dblock.dataloaders(df, bs=bs, device='cpu', num_workers=0)

def small_cnn(n_out:int, width:int=16) -> nn.Module:
    "Four stride-2 conv-BN-ReLU blocks, global average pooling and a linear head"
    blk = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
    w = width
    return nn.Sequential(blk(3, w), blk(w, 2 * w), blk(2 * w, 4 * w), blk(4 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, n_out))

def loss_and_cbs(strategy:str, eps:float):
    if strategy == 'bce': return BCEWithLogitsLossFlat(), []
    if strategy == 'anneal': return LabelSmoothingBCEFlat(eps=eps, variant='symmetric'), [AnnealSmoothing('cos')]
    return LabelSmoothingBCEFlat(eps=eps, variant=strategy), []

def train(make_dls, strategy, seed, epochs, lr, eps, width):
    "One seeded run: data order, augmentation and initial weights depend on the seed only, not on the strategy"
    set_seed(seed)
    dls = make_dls()
    set_seed(seed)
    loss, cbs = loss_and_cbs(strategy, eps)
    learn = Learner(dls, small_cnn(dls.c, width), loss_func=loss, cbs=cbs, metrics=accuracy_multi)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    train_s = time.perf_counter() - t0
    with learn.no_bar(): logits, targs = learn.get_preds(act=noop)
    return learn, logits, targs, train_s

def evaluate(logits, targs, vocab) -> dict:
    "The metrics on the validation logits (label axis last); for pets also species accuracy and breed top-1"
    m = {'accuracy_multi': accuracy_multi(logits, targs).item(), 'ece': ECE(multilabel=True)(logits, targs),
         'classwise_ece': ECE(multilabel=True, classwise=True)(logits, targs), 'brier': MultiBrier(multilabel=True)(logits, targs),
         'nll': NLL(multilabel=True)(logits, targs)}
    if {'cat', 'dog'} <= set(vocab):
        sp = [list(vocab).index('cat'), list(vocab).index('dog')]
        br = [i for i in range(len(vocab)) if i not in sp]
        m['species_acc'] = (logits[:, sp].argmax(1) == targs[:, sp].argmax(1)).float().mean().item()
        m['breed_top1'] = (logits[:, br].argmax(1) == targs[:, br].argmax(1)).float().mean().item()
    return m

def baselines(dls) -> dict:
    "Constant predictors on the validation set: all labels absent (probability 0), and each label's training frequency"
    ytr = torch.stack([y for _, y in dls.train_ds]).float()
    yva = torch.stack([y for _, y in dls.valid_ds]).float()
    prior = ytr.mean(0).clamp(1e-6, 1 - 1e-6).expand_as(yva)
    return {'all-zeros': {'accuracy_multi': 1 - yva.mean().item(), 'brier': yva.mean().item()},
            'train frequency': evaluate(torch.logit(prior), yva, dls.vocab)}

def fmt(s:pd.Series) -> str: return f"{s.mean():.4f} ± {s.std():.4f}"

def summarise(df:pd.DataFrame, base:dict, header:str) -> str:
    cols = [c for c in list(METRICS) + ['species_acc', 'breed_top1'] if c in df]
    name = {**METRICS, 'species_acc': 'species acc.', 'breed_top1': 'breed top-1'}
    lines = [header, '', f"| strategy | seeds | {' | '.join(name[c] for c in cols)} | s per run |", '|---|---:|' + '---:|' * (len(cols) + 1)]
    for st in [s for s in STRATEGIES if s in set(df.strategy)]:
        g = df[df.strategy == st]
        lines.append(f"| {st} | {len(g)} | {' | '.join(fmt(g[c]) for c in cols)} | {g.train_s.mean():.1f} |")
    lines += ['', 'Constant predictors on the same validation set:', '',
              f"| predictor | {' | '.join(name[c] for c in cols)} |", '|---|' + '---:|' * len(cols)]
    for k, v in base.items(): lines.append(f"| {k} | {' | '.join(f'{v[c]:.4f}' if c in v else '' for c in cols)} |")
    lines += ['', 'Paired differences against bce (same seed: same data order, augmentation and initial weights), mean ± std '
              'over seeds of (strategy − bce), and in brackets the number of seeds where the strategy was better (higher accuracy, '
              'lower calibration error, Brier score and NLL):', '',
              f"| strategy − bce | {' | '.join(name[c] for c in cols)} |", '|---|' + '---:|' * len(cols)]
    by = {st: g.set_index('seed').sort_index() for st, g in df.groupby('strategy')}
    for st in [s for s in STRATEGIES if s in by and s != 'bce']:
        d = by[st][cols] - by['bce'][cols]
        better = {c: (d[c] > 0) if c in HIGHER_IS_BETTER else (d[c] < 0) for c in cols}
        lines.append(f"| {st} | {' | '.join(f'{d[c].mean():+.4f} ± {d[c].std():.4f} ({better[c].sum()}/{len(d)})' for c in cols)} |")
    return '\n'.join(lines) + '\n'

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dataset', choices=['pets', 'planet'], default='pets')
    p.add_argument('--path', type=Path, default=None, help='pets: folder of <breed>_<n>.jpg photos (default: the sample in tests/data); '
                                                            'planet: the dataset root (default: untar_data(URLs.PLANET_TINY))')
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--eps', type=float, default=0.1)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--width', type=int, default=16, help='channels of the first conv block')
    p.add_argument('--strategies', nargs='+', choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument('--out', type=Path, default=None, help='default: bench/results/multilabel_<dataset>')
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or ROOT/'bench'/'results'/f'multilabel_{args.dataset}'
    if args.dataset == 'pets': make_dls = lambda: pets_dls(args.path or PETS, args.size)
    else:
        try: path = args.path or untar_data(URLs.PLANET_TINY)
        except OSError as e:   # offline: urllib's URLError is an OSError
            print(f"PLANET_TINY is not available ({e}); pass --path to a copy, or run online. Nothing was run.")
            return 1
        make_dls = lambda: planet_dls(path, args.size)
    out.mkdir(parents=True, exist_ok=True)
    t0, rows, figs = time.perf_counter(), [], {}
    for seed in range(args.seeds):
        for st in args.strategies:
            learn, logits, targs, train_s = train(make_dls, st, seed, args.epochs, args.lr, args.eps, args.width)
            rows.append({'dataset': args.dataset, 'strategy': st, 'seed': seed, **evaluate(logits, targs, learn.dls.vocab),
                         'train_s': round(train_s, 2), 'epochs': args.epochs, 'lr': args.lr, 'eps': args.eps, 'size': args.size,
                         'n_train': len(learn.dls.train_ds), 'n_valid': len(learn.dls.valid_ds), 'n_labels': learn.dls.c})
            print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in rows[-1].items()), flush=True)
            if seed == 0 and st in ('bce', 'symmetric', 'anneal'): figs[st] = (logits, targs)
            if seed == 0 and st == args.strategies[0]: base = baselines(learn.dls)
    wall = time.perf_counter() - t0
    df = pd.DataFrame(rows)
    df.to_csv(out/'results.csv', index=False)
    if figs: reliability_diagram(figs, multilabel=True, title=f'{args.dataset}, seed 0, validation').savefig(out/'reliability.png', dpi=100)
    r = rows[0]
    header = (f"{args.dataset}: {r['n_labels']} labels, {r['n_train']} training and {r['n_valid']} validation photos at {args.size} px; "
              f"small CNN (width {args.width}) from scratch, {args.epochs} epochs of fit_one_cycle, lr {args.lr}, ε {args.eps}; "
              f"mean ± std over {args.seeds} seeds.\n\nCommand: `{shlex.join(['python', 'bench/multilabel_pets.py'] + (sys.argv[1:] if argv is None else list(argv)))}`, "
              f"wall time {wall:.0f} s ({torch.get_num_threads()} torch threads).")
    (out/'summary.md').write_text(summarise(df, base, header))
    print((out/'summary.md').read_text())
    return 0

if __name__ == '__main__': sys.exit(main())
