"""Forward+backward time and peak extra memory of label-smoothing losses, against the best peer at each shape.

Compares `fastai_ls.LabelSmoothingCE` with torch's `F.cross_entropy(label_smoothing=)` and fastai's
`LabelSmoothingCrossEntropy`. Time: each shape of each run in a fresh process (so that the allocator's state is that
shape's own, as in training), interleaved rounds, each loss timed in every round; the fastest round of each loss is
kept, and ours is divided by the fastest peer's. Peak extra memory is everything allocated during one
forward+backward beyond the logits (the gradient included), divided by the logits' bytes, measured for every loss
the same way in a fresh process after two warm-up steps: on the CPU, by the allocator's events (the profiler's
record of every allocation and free) and by the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs after `malloc_trim`); on a GPU, by the CUDA caching allocator's peak.

    python bench/bench_loss.py                 # CPU, the default shapes, 3 runs
    python bench/bench_loss.py --device cuda   # GPU
    python bench/bench_loss.py --prior         # a (C, C) prior, against the soft-target route with a materialised q
"""
import argparse, contextlib, ctypes, json, os, subprocess, sys, time
import torch, torch.nn.functional as F
from fastai_ls.losses import LabelSmoothingCE   # first: it keeps fastai's import quiet
from fastai.losses import LabelSmoothingCrossEntropy

EPS = 0.1
SHAPES = [((256, 37), torch.float32), ((4096, 1000), torch.float32), ((2048, 32768), torch.float32),
          ((8, 21, 128, 128), torch.float32), ((4096, 1000), torch.bfloat16)]
PRIOR_SHAPES = [((4096, 1000), torch.float32), ((2048, 32768), torch.float32)]

def losses(prior=None):
    "name → loss; ours first, then its peers"
    if prior is not None:
        def soft_route(x, y):   # what a user would otherwise write: q = (1-eps)*onehot + eps*P[y], then soft-target CE
            q = prior[y].mul_(EPS).scatter_add_(1, y[:, None], torch.full_like(y[:, None], 1 - EPS, dtype=prior.dtype))
            return F.cross_entropy(x, q)
        return {'fastai_ls': LabelSmoothingCE(EPS, prior=prior), 'soft-q': soft_route}
    return {'fastai_ls': LabelSmoothingCE(EPS), 'torch': lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS),
            'fastai': LabelSmoothingCrossEntropy(EPS)}

def problem(shape, dtype, device, prior):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).mul_(3).to(dtype).requires_grad_()
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:], device=device)
    p = torch.softmax(torch.randn(shape[1], shape[1], device=device), 1) if prior else None
    return x, y, p

def step(loss_fn, x, y):
    loss_fn(x, y).backward()
    x.grad = None

def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()

def round_ms(fn, device, min_time=0.3, max_reps=50):
    "The fastest of at least 5 calls (and at least `min_time` seconds of them), in ms"
    fn(); sync(device)                      # warm-up
    times = []
    while len(times) < max_reps and (len(times) < 5 or sum(times) < min_time):
        t0 = time.perf_counter(); fn(); sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3

@contextlib.contextmanager
def _quiet_stderr():
    "Silence file descriptor 2: the profiler's C++ side prints device-probe errors there, which are not ours to show"
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try: yield
    finally: os.dup2(saved, 2); os.close(saved); os.close(devnull)

def allocator_peak(fn):
    "Peak of the CPU bytes allocated during `fn` above what was live before it, from the profiler's allocation events"
    from torch.profiler import profile, ProfilerActivity
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes(); peak = max(peak, live)
    return peak

def _status_kb(field):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ':'))

def rss_peak(fn):
    "Growth of the resident high-water mark during `fn`, in bytes, after handing freed heap memory back to the OS"
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')   # resets VmHWM to the current RSS
    base = _status_kb('VmRSS')
    fn()
    return (_status_kb('VmHWM') - base) * 1024

def time_child(args):
    "In a fresh process: interleaved rounds of every loss at one shape; the fastest round of each, in ms"
    device = torch.device(args.device)
    x, y, prior = problem(eval(args.time_child[0]), getattr(torch, args.time_child[1]), device, args.prior)
    runs = {name: (lambda fn=fn: step(fn, x, y)) for name, fn in losses(prior).items()}
    rounds = [{name: round_ms(run, device) for name, run in runs.items()} for _ in range(args.rounds)]
    print(json.dumps({name: min(r[name] for r in rounds) for name in runs}))

def memory_child(args):
    "In a fresh process: one loss at one shape, two warm-up steps, then its peak extra memory ÷ the logits' bytes"
    device = torch.device(args.device)
    shape, dtype = eval(args.mem_child[0]), getattr(torch, args.mem_child[1])
    x, y, prior = problem(shape, dtype, device, args.prior)
    fn = losses(prior)[args.mem_child[2]]
    run = lambda: step(fn, x, y)
    run(); run(); sync(device)
    nbytes = x.numel() * x.element_size()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        run(); sync(device)
        print(json.dumps([(torch.cuda.max_memory_allocated() - base) / nbytes, None]))
    else:
        print(json.dumps([allocator_peak(run) / nbytes, rss_peak(run) / nbytes]))

def child(args, flag, shape, dtype, *more):
    "What a fresh process of this script prints for `flag` at one shape (and loss), parsed"
    cmd = [sys.executable, __file__, '--device', args.device, '--rounds', str(args.rounds), flag, str(shape), str(dtype)[6:], *more]
    if args.threads: cmd += ['--threads', str(args.threads)]
    if args.prior: cmd.append('--prior')
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

def fmt_range(vals, f='{:.2f}'):
    lo, hi = min(vals), max(vals)
    return f.format(lo) if f.format(lo) == f.format(hi) else f"{f.format(lo)}–{f.format(hi)}"

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--prior', action='store_true', help='time the loss with a random (C, C) prior against a materialised soft target')
    p.add_argument('--runs', type=int, default=3, help='independent runs of the whole timing; the table gives their range')
    p.add_argument('--rounds', type=int, default=7, help='interleaved rounds per shape in each run')
    p.add_argument('--mem-child', nargs=3, help=argparse.SUPPRESS)
    p.add_argument('--time-child', nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    if args.mem_child: return memory_child(args)
    if args.time_child: return time_child(args)
    device = torch.device(args.device)
    shapes = PRIOR_SHAPES if args.prior else SHAPES
    names = list(losses(torch.eye(2) if args.prior else None))
    # times[run][(shape, dtype)][name]: the fastest round's ms, each shape of each run in a fresh process
    times = [{(shape, dtype): child(args, '--time-child', shape, dtype) for shape, dtype in shapes} for _ in range(args.runs)]
    mem = {(shape, dtype, name): child(args, '--mem-child', shape, dtype, name) for shape, dtype in shapes for name in names}
    ours, peers = names[0], names[1:]
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, eps={EPS}; "
          f"{args.runs} runs of {args.rounds} interleaved rounds, each shape of each run in a fresh process, the fastest round "
          f"of each loss in each run")
    mem_how = ("CUDA allocator peak" if device.type == 'cuda' else
               "allocator: the profiler's allocation events; RSS: growth of VmHWM")
    print(f"peak extra memory ÷ the logits' bytes, the gradient included, in a fresh process after 2 warm-up steps ({mem_how})\n")
    print("| shape | dtype | loss | fwd+bwd ms | ÷ best peer | peak extra memory, allocator | RSS |")
    print("|---|---|---|---:|---:|---:|---:|")
    for shape, dtype in shapes:
        best_peer = [min(t[shape, dtype][n] for n in peers) for t in times]
        for name in names:
            ms = [t[shape, dtype][name] for t in times]
            ratio = fmt_range([m / b for m, b in zip(ms, best_peer)]) + 'x'
            a, r = mem[shape, dtype, name]
            rss = '' if r is None else f"{r:.2f}x"
            print(f"| {shape} | {str(dtype)[6:]} | {name} | {fmt_range(ms)} | {ratio} | {a:.2f}x | {rss} |")
    # the README's table: ranges over the runs, the fastest peer of each run, memory of ours and each peer
    print(f"\n| shape | dtype | {ours} | best peer | ÷ best peer | peak extra memory, {' / '.join(names)}: allocator (RSS) |")
    print("|---|---|---:|---:|---:|---|")
    for shape, dtype in shapes:
        best_peer = [min(t[shape, dtype][n] for n in peers) for t in times]
        who = sorted({min(peers, key=lambda n: t[shape, dtype][n]) for t in times})
        ms = [t[shape, dtype][ours] for t in times]
        rs = [m / b for m, b in zip(ms, best_peer)]
        ratio = f"**{fmt_range(rs)}×**" if max(rs) <= 1 else f"{fmt_range(rs)}×"   # bold: faster in every run
        mems = ' / '.join(f"{mem[shape, dtype, n][0]:.2f}×" for n in names)
        rss = '' if device.type == 'cuda' else f" ({' / '.join(f'{mem[shape, dtype, n][1]:.2f}×' for n in names)})"
        print(f"| {shape} | {str(dtype)[6:].replace('float', 'fp').replace('bfp', 'bf')} | {fmt_range(ms)} ms | "
              f"{fmt_range(best_peer)} ms ({', '.join(who)}) | {ratio} | {mems}{rss} |")

if __name__ == '__main__': main()
