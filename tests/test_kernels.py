"The loss's Triton path (used on GPU), run on the CPU through Triton's interpreter and checked against torch"
import os, subprocess, sys, textwrap
import pytest

pytest.importorskip('triton')

SCRIPT = textwrap.dedent('''
    import torch, torch.nn.functional as F
    import triton
    import fastai_ls.losses as L
    from fastai_ls.losses import label_smoothing_ce
    torch.manual_seed(0)
    ONE_EPS = torch.tensor(0.1)
    cases = 0
    for n, k in [(5, 3), (9, 37), (4, 5000)]:
        for dtype in (torch.float32, torch.bfloat16):
            for weighted in (False, True):
                for reduction in ('none', 'mean', 'sum'):
                    for variant in ('uniform', 'others', 'kl'):
                        x = (torch.randn(n, k) * 3).to(dtype).requires_grad_()
                        y = torch.randint(0, k, (n,)); y[1] = -100
                        w = torch.rand(k) + 0.1 if weighted else None
                        assert L._use_kernels(x, y, ONE_EPS, None)
                        loss = label_smoothing_ce(x, y, 0.2, weight=w, reduction=reduction, variant=variant)
                        (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum().backward()
                        L.kernels.triton = None   # the same call again, on the blockwise torch path
                        x2 = x.detach().clone().requires_grad_()
                        ref = label_smoothing_ce(x2, y, 0.2, weight=w, reduction=reduction, variant=variant)
                        (ref * torch.linspace(0.5, 1.5, ref.numel()).view(ref.shape)).sum().backward()
                        L.kernels.triton = triton
                        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
                        # bf16: the CPU path rounds its gradient once forward and again when the incoming gradient
                        # is not 1, the kernel once: up to 1.5 ulp (2^-7 each) apart
                        torch.testing.assert_close(x.grad.float(), x2.grad.float(), rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
                        if variant == 'uniform':
                            x64 = x.detach().double()
                            t = F.cross_entropy(x64, y, weight=None if w is None else w.double(), label_smoothing=0.2, reduction=reduction)
                            torch.testing.assert_close(loss.double(), t, rtol=1e-5, atol=1e-5)
                        cases += 1
    # a 'none' loss reduced by autograd: the incoming gradient is an expanded, stride-0 tensor
    x = torch.randn(6, 300, requires_grad=True); y = torch.randint(0, 300, (6,)); y[0] = -100
    for reduce in (torch.sum, torch.mean):
        reduce(label_smoothing_ce(x, y, 0.1, reduction='none')).backward()
        ref = x.detach().clone().requires_grad_()
        reduce(F.cross_entropy(ref, y, label_smoothing=0.1, reduction='none')).backward()
        torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-7); x.grad = None
    # -inf logits, including a whole 4096-wide block of them, at eps = 0 and in an ignored row: finite, like torch
    x = torch.randn(3, 5000); x[:, :4096] = float('-inf'); y = torch.tensor([4500, 4999, -100])
    assert L._use_kernels(x, y, ONE_EPS, None)
    torch.testing.assert_close(label_smoothing_ce(x, y, 0., reduction='none'), F.cross_entropy(x, y, reduction='none'))
    # variant='others' at eps = (K-1)/K has no weight on x_y itself: a -inf target logit gives inf (q_y > 0), not NaN
    x = torch.randn(2, 4); x[0, 1] = float('-inf'); y = torch.tensor([1, 2])
    loss = label_smoothing_ce(x, y, 0.75, reduction='none', variant='others')
    L.kernels.triton = None
    ref = label_smoothing_ce(x, y, 0.75, reduction='none', variant='others')
    L.kernels.triton = triton
    assert loss[0].isposinf() and ref[0].isposinf(), (loss, ref)
    torch.testing.assert_close(loss[1:], ref[1:])
    # uint8 targets: -100 must not wrap to class 156 (before the fix the kernel read column 156 of each ignored row)
    x = torch.randn(4, 200); y = torch.tensor([156, 3, 156, 199])
    for yy, ii in ((y.to(torch.uint8), -100), (torch.tensor([156, -100, 2, 1], dtype=torch.int16), -100)):
        assert L._use_kernels(x, yy.long(), ONE_EPS, None)
        torch.testing.assert_close(label_smoothing_ce(x, yy, 0.1, reduction='none'),
                                   F.cross_entropy(x, yy.long(), label_smoothing=0.1, reduction='none', ignore_index=ii))
    # shifted logits keep float32 precision in the loss and the gradient (the kernels work relative to the row max)
    for k in (37, 5000):
        z = torch.randn(8, k, dtype=torch.float64) * 2
        y = torch.randint(0, k, (8,))
        w = torch.rand(k) + 0.5
        for shift in (1e5, 1e7):
            xs = (z + shift).float().requires_grad_()
            x64 = xs.detach().double().requires_grad_()
            for ww in (None, w):
                loss = label_smoothing_ce(xs, y, 0.1, weight=ww)
                ref = F.cross_entropy(x64, y, weight=None if ww is None else ww.double(), label_smoothing=0.1)
                g, = torch.autograd.grad(loss, xs); gr, = torch.autograd.grad(ref, x64)
                torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
                torch.testing.assert_close(g.double(), gr, rtol=1e-3, atol=1e-6)
    # double backward through the kernel path
    x = torch.randn(5, 40, requires_grad=True); y = torch.randint(0, 40, (5,)); w = torch.rand(40) + 0.5
    v = torch.randn(5, 40)
    hv = []
    for f in (lambda x: label_smoothing_ce(x, y, 0.2, weight=w), lambda x: F.cross_entropy(x, y, weight=w, label_smoothing=0.2)):
        g, = torch.autograd.grad(f(x), x, create_graph=True)
        hv.append(torch.autograd.grad((g * v).sum(), x)[0])
    torch.testing.assert_close(hv[0], hv[1], rtol=1e-4, atol=1e-6)
    # a prior or one ε per position takes the blockwise path, on a GPU too
    x = torch.randn(6, 9); y = torch.randint(0, 9, (6,)); P = torch.softmax(torch.randn(9, 9), 1)
    assert not L._use_kernels(x, y, ONE_EPS, P) and not L._use_kernels(x, y, torch.full((6,), 0.1), None)
    assert type(label_smoothing_ce(x.requires_grad_(), y, 0.1, prior=P).grad_fn).__name__ == '_LabelSmoothingCEFnBackward'
    print('cases', cases)
''')

def test_triton_path_matches_torch_path():
    env = dict(os.environ, TRITON_INTERPRET='1')
    res = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    assert 'cases 108' in res.stdout
