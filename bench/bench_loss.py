"""Forward+backward time and peak extra memory of label-smoothing losses.

Compares `fastai_ls.LabelSmoothingCE` with torch's `F.cross_entropy(label_smoothing=)` and fastai's
`LabelSmoothingCrossEntropy`. Peak extra memory is everything allocated during forward+backward beyond the
logits (the gradient included), divided by the logits' bytes.

    python bench/bench_loss.py                 # CPU, the default shapes
    python bench/bench_loss.py --device cuda   # GPU
    python bench/bench_loss.py --prior         # a (C, C) prior, against the soft-target route with a materialised q
"""
import argparse, contextlib, os, statistics, sys, time
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from fastai_ls.losses import LabelSmoothingCE   # first: it keeps fastai's import quiet
from fastai.losses import LabelSmoothingCrossEntropy

EPS = 0.1
ROUNDS = 5
SHAPES = [((256, 37), torch.float32), ((4096, 1000), torch.float32), ((2048, 32768), torch.float32),
          ((8, 21, 128, 128), torch.float32), ((4096, 1000), torch.bfloat16)]

def losses():
    ours, fastai_ls = LabelSmoothingCE(EPS), LabelSmoothingCrossEntropy(EPS)
    return {'fastai_ls': ours, 'torch': lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS), 'fastai': fastai_ls}

PRIOR_SHAPES = [((4096, 1000), torch.float32), ((2048, 32768), torch.float32)]

def prior_losses(prior):
    "Ours with a (C, C) prior, and what a user would otherwise write: q = (1-eps)*onehot + eps*P[y], then soft-target CE"
    ours = LabelSmoothingCE(EPS, prior=prior)
    def soft_route(x, y):
        q = prior[y].mul_(EPS).scatter_add_(1, y[:, None], torch.full_like(y[:, None], 1 - EPS, dtype=prior.dtype))
        return F.cross_entropy(x, q)
    return {'fastai_ls': ours, 'soft-q': soft_route}

def step(loss_fn, x, y):
    loss_fn(x, y).backward()
    x.grad = None

def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()

def median_ms(fn, device, min_time=1.0, max_reps=50):
    fn(); sync(device)                      # warm-up
    times = []
    while len(times) < max_reps and (len(times) < 5 or sum(times) < min_time):
        t0 = time.perf_counter(); fn(); sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3

@contextlib.contextmanager
def _quiet_stderr():
    "Silence file descriptor 2: the profiler's C++ side prints device-probe errors there, which are not ours to show"
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try: yield
    finally: os.dup2(saved, 2); os.close(saved); os.close(devnull)

def peak_extra_bytes(fn, device):
    "Peak of the bytes allocated during `fn`, above what was live before it"
    if device.type == 'cuda':
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(); torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # On CPU, replay the profiler's allocation/free events in time order.
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes(); peak = max(peak, live)
    return peak

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--prior', action='store_true', help='time the loss with a random (C, C) prior against a materialised soft target')
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads: torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, eps={EPS}\n")
    ref_name = 'soft-q' if args.prior else 'torch'
    header = f"| {'shape':<18} | {'dtype':<8} | {'loss':<9} | {'fwd+bwd ms':>10} | {'vs ' + ref_name:>9} | {'peak extra mem':>14} |"
    print(header); print('|' + '|'.join('-' * (len(c)) for c in header.split('|')[1:-1]) + '|')
    for shape, dtype in (PRIOR_SHAPES if args.prior else SHAPES):
        x = torch.randn(shape, device=device).mul_(3).to(dtype).requires_grad_()
        y = torch.randint(0, shape[1], (shape[0],) + shape[2:], device=device)
        fns = prior_losses(torch.softmax(torch.randn(shape[1], shape[1], device=device), 1)) if args.prior else losses()
        runs = {name: (lambda fn=fn: step(fn, x, y)) for name, fn in fns.items()}
        # interleaved rounds, then the median of the rounds: a shared machine's load comes and goes
        rounds = [{name: median_ms(run, device, min_time=0.3) for name, run in runs.items()} for _ in range(ROUNDS)]
        results = {name: (statistics.median(r[name] for r in rounds), peak_extra_bytes(run, device) / (x.numel() * x.element_size()))
                   for name, run in runs.items()}
        ref = results[ref_name][0]
        for name, (ms, mem) in results.items():
            print(f"| {str(shape):<18} | {str(dtype)[6:]:<8} | {name:<9} | {ms:>10.2f} | {ms / ref:>8.2f}x | {mem:>13.2f}x |")
        del x, y

if __name__ == '__main__': main()
