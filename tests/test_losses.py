"Property tests of the label-smoothing loss against torch's `F.cross_entropy` and float64 formulas written out by hand"
import math
import pytest, torch, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.losses import LabelSmoothingCrossEntropy
import fastai_ls.losses as L
from fastai_ls.losses import LabelSmoothingCE, LabelSmoothingCEFlat, label_smoothing_ce, smooth_targets

N_CASES = 400  # per property test (each also runs with tiny blocks)
relaxed = settings(max_examples=N_CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

@pytest.fixture(params=[False, True], ids=['default-blocks', 'tiny-blocks'])
def blocks(request, monkeypatch):
    "Run each property with the default block size and with blocks of a few elements, to exercise the blockwise paths"
    if request.param:
        monkeypatch.setattr(L, '_MAX_BLOCK', 5)
        monkeypatch.setattr(L, '_MIN_BLOCK', 5)
    return request.param

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]

@st.composite
def problems(draw, soft=None, malformed=False):
    """A random loss problem: logits (N, C, *spatial), targets, eps, weight, reduction, ignore_index.
    `malformed` also draws what torch accepts but a careless kernel gets wrong: probability rows that do not sum to 1
    (unnormalised, negative, log-probabilities), every integer target dtype with any ignore_index (as uint8, -100 is
    class 156: hence C=200 sometimes), shifted logits, and probability targets that require grad; and weights with a
    NaN, inf or negative entry, which must be refused."""
    n = draw(st.integers(0, 6))
    k = draw(st.sampled_from([200]) if malformed and draw(st.integers(0, 5)) == 0 else st.integers(2, 7))
    spatial = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((n, k) + spatial, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1., 10.]))
    if malformed: x = x + draw(st.sampled_from([0., -1e3, 1e5]))
    is_soft = draw(st.booleans()) if soft is None else soft
    ignore_index = -100
    if is_soft:
        kind = draw(st.sampled_from(['softmax', 'unnormalised', 'randn', 'log-probs']) if malformed else st.just('softmax'))
        z = torch.randn(x.shape, generator=g, dtype=torch.float64) * 3
        target = dict(softmax=lambda: torch.softmax(z, 1), unnormalised=lambda: z.abs(), randn=lambda: z,
                      **{'log-probs': lambda: torch.log_softmax(z, 1)})[kind]()
        if malformed and draw(st.booleans()): target.requires_grad_()
    else:
        dtype = draw(st.sampled_from(INT_DTYPES)) if malformed else torch.int64
        if malformed: ignore_index = draw(st.sampled_from([-100, -1, 0, 156]))
        target = torch.randint(0, min(k, torch.iinfo(dtype).max + 1), (n,) + spatial, generator=g)
        if k > 156 and torch.iinfo(dtype).max >= 156: target[..., :1] = 156   # as uint8, both -100 and 156 read 156
        ignore_p = draw(st.sampled_from([0., 0.3, 1.]))
        if torch.iinfo(dtype).min <= ignore_index <= torch.iinfo(dtype).max:
            target[torch.rand(target.shape, generator=g) < ignore_p] = ignore_index
        target = target.to(dtype)
    weight = torch.rand(k, generator=g, dtype=torch.float64) + 0.05 if draw(st.booleans()) else None
    if malformed and weight is not None and draw(st.integers(0, 7)) == 0:   # a weight the loss must refuse
        weight[draw(st.integers(0, k - 1))] = draw(st.sampled_from([float('nan'), float('inf'), -0.5]))
    eps = draw(st.floats(0., 0.99))
    reduction = draw(st.sampled_from(['none', 'mean', 'sum']))
    return x, target, eps, weight, reduction, ignore_index

def _value_and_grad(fn, x, cotangent_seed=0, *more):
    "The loss and the gradient of <loss, random cotangent> with respect to x (and to `more` leaves)"
    x = x.clone().requires_grad_()
    loss = fn(x)
    ct = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(cotangent_seed), dtype=torch.float64) + 0.5).to(loss.dtype)
    grads = torch.autograd.grad((loss * ct).sum(), (x,) + more)
    return (loss.detach(),) + grads if more else (loss.detach(), grads[0])

@relaxed
@given(problems(malformed=True))
def test_matches_torch(blocks, prob):
    x, target, eps, weight, reduction, ignore_index = prob
    if weight is not None and not bool(((weight >= 0) & (weight < math.inf)).all()):
        with pytest.raises(ValueError, match='weight must be finite and non-negative'):
            label_smoothing_ce(x, target, eps, weight=weight, reduction=reduction, ignore_index=ignore_index)
        return
    more = (target,) if target.requires_grad else ()
    ours = _value_and_grad(lambda x: label_smoothing_ce(x, target, eps, weight=weight, reduction=reduction,
                                                        ignore_index=ignore_index), x, 0, *more)
    t = target if target.is_floating_point() else target.long()   # torch takes int64 class indices only
    ref = _value_and_grad(lambda x: F.cross_entropy(x, t, weight=weight, label_smoothing=eps, reduction=reduction,
                                                    ignore_index=ignore_index), x, 0, *more)
    if reduction == 'mean' and torch.isnan(ref[0]):
        # no kept target weight (all ignored, an empty batch): torch gives NaN, we give 0 and a zero gradient
        assert ours[0].item() == 0. and (ours[1] == 0).all()
        return
    for o, r in zip(ours, ref): torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9)

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problems(soft=False), st.sampled_from([1e4, 1e5, 1e7, -1e7]))
def test_shifted_float32_logits_keep_their_precision(blocks, prob, shift):
    "Softmax is shift-invariant: on float32 logits near 1e7 the loss is as accurate as torch's, not off by lse - x_y's rounding"
    x, target, eps, weight, reduction, _ = prob
    xs = (x + shift).float()
    w32 = None if weight is None else weight.float()
    ours, g_ours = _value_and_grad(lambda x: label_smoothing_ce(x, target, eps, weight=w32, reduction=reduction), xs)
    ref, g_ref = _value_and_grad(lambda x: F.cross_entropy(x, target, weight=weight, label_smoothing=eps, reduction=reduction), xs.double())
    if reduction == 'mean' and torch.isnan(ref): return
    torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=2e-6)

def _hand_loss(x, target, eps, variant, reduction):
    "The variants written out with explicit target distributions, in float64, without weights"
    n, k = x.shape[:2]
    logp = torch.log_softmax(x, 1)
    keep = target != -100
    onehot = F.one_hot(target.clamp_min(0), k).movedim(-1, 1).double()
    if variant == 'others': q = onehot * (1 - eps) + (1 - onehot) * eps / (k - 1)
    else: q = onehot * (1 - eps + eps / k) + (1 - onehot) * eps / k
    per_pos = -(q * logp).sum(1)
    if variant == 'kl': per_pos = per_pos + torch.xlogy(q, q).sum(1)
    per_pos = torch.where(keep, per_pos, 0.)
    if reduction == 'none': return per_pos
    if reduction == 'sum': return per_pos.sum()
    return per_pos.sum() / keep.sum() if keep.any() else per_pos.sum() * 0

@relaxed
@given(problems(soft=False), st.sampled_from(['others', 'kl']))
def test_variants_match_hand_formulas(blocks, prob, variant):
    x, target, eps, _, reduction, _ = prob
    ours, g_ours = _value_and_grad(lambda x: label_smoothing_ce(x, target, eps, reduction=reduction, variant=variant), x)
    ref, g_ref = _value_and_grad(lambda x: _hand_loss(x, target, eps, variant, reduction), x)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-9)

@relaxed
@given(problems(soft=True), st.sampled_from(['uniform', 'kl']))
def test_kl_is_ce_minus_target_entropy(blocks, prob, variant):
    "With weights and soft targets, 'kl' differs from the cross-entropy by the weighted target entropy only"
    x, target, eps, weight, reduction, _ = prob
    ce, g_ce = _value_and_grad(lambda x: F.cross_entropy(x, target, weight=weight, label_smoothing=eps, reduction=reduction), x)
    ours, g_ours = _value_and_grad(lambda x: label_smoothing_ce(x, target, eps, weight=weight, reduction=reduction, variant=variant), x)
    if reduction == 'mean' and x.shape[0] == 0: return
    q = target * (1 - eps) + eps / x.shape[1]
    w = torch.ones(x.shape[1], dtype=x.dtype) if weight is None else weight
    ent = torch.xlogy(q, q) * w.view((1, -1) + (1,) * (x.dim() - 2))
    ent = ent.sum(1) if variant == 'kl' else torch.zeros_like(ent.sum(1))
    ent = {'none': ent, 'sum': ent.sum(), 'mean': ent.mean()}[reduction]
    torch.testing.assert_close(ours, ce + ent, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_ours, g_ce, rtol=1e-9, atol=1e-9)

@pytest.mark.parametrize('variant', ['uniform', 'others', 'kl'])
@pytest.mark.parametrize('soft', [False, True])
def test_gradcheck(variant, soft):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.softmax(torch.randn(5, 4, 3, generator=g, dtype=torch.float64), 1) if soft else torch.tensor([[0, 1, -100]] * 5)
    weight = torch.rand(4, dtype=torch.float64, generator=g) + 0.1
    for reduction in ['none', 'mean', 'sum']:
        assert torch.autograd.gradcheck(lambda x: label_smoothing_ce(x, target, 0.3, weight=weight, reduction=reduction, variant=variant), (x,))

def test_large_spatial_blocks_match_torch():
    "N-d inputs whose spatial size spans several blocks, with the default block sizes"
    x = torch.randn(2, 5, 300000, requires_grad=True)
    y = torch.randint(0, 5, (2, 300000)); y[:, ::7] = -100
    assert len(L._blocks(x.shape, x.numel() * 4, False, False)) > 3
    ours = label_smoothing_ce(x, y, 0.2); ours.backward(); g = x.grad; x.grad = None
    ref = F.cross_entropy(x, y, label_smoothing=0.2); ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-9)

@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
def test_matches_fastai(reduction):
    x, y = torch.randn(64, 37, requires_grad=True), torch.randint(0, 37, (64,))
    ours = LabelSmoothingCE(0.1, reduction=reduction)(x, y)
    ref = LabelSmoothingCrossEntropy(0.1, reduction=reduction)(x, y)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g_ours, = torch.autograd.grad(ours.sum(), x); g_ref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('shape', [(64, 37), (4, 21, 8, 8), (3, 70000)])
def test_half_precision_matches_float64(dtype, shape):
    "Half inputs, including logits of +-1e4, give finite float32 losses and input-dtype gradients close to float64"
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3)
    x.view(-1)[::5] = 1e4; x.view(-1)[1::7] = -1e4
    xh = x.to(dtype).requires_grad_()
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)
    loss = label_smoothing_ce(xh, y, 0.1, reduction='none'); loss.sum().backward()
    x64 = xh.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, y, label_smoothing=0.1, reduction='none'); ref.sum().backward()
    assert loss.dtype == torch.float32 and xh.grad.dtype == dtype
    assert loss.isfinite().all() and xh.grad.float().isfinite().all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(xh.grad.double(), x64.grad, rtol=1e-2, atol=1e-2)

def test_compile_no_recompile_when_eps_changes():
    "eps lives in a tensor buffer: five different values, one compiled graph, correct values and gradients"
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    lf = LabelSmoothingCE(0.1)
    step = torch.compile(lambda x, y: lf(x, y), backend=counter, fullgraph=True)
    x, y = torch.randn(32, 10), torch.randint(0, 10, (32,))
    compiles = []
    for eps in [0.1, 0.0, 0.25, 0.5, 0.05]:
        lf.eps = eps
        xg = x.clone().requires_grad_()
        loss = step(xg, y); loss.backward()
        compiles.append(counter.frame_count)
        xr = x.clone().requires_grad_()
        ref = F.cross_entropy(xr, y, label_smoothing=eps); ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-7)
    assert compiles[0] >= 1 and compiles == compiles[:1] * 5, f"graphs compiled after each eps: {compiles}"

def test_compile_functional_tensor_eps():
    "The functional API with a 0-dim tensor eps also compiles once"
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    f = torch.compile(label_smoothing_ce, backend=counter)
    x, y = torch.randn(16, 6), torch.randint(0, 6, (16,))
    compiles = []
    for eps in [0.1, 0.2, 0.3]:
        torch.testing.assert_close(f(x, y, torch.tensor(eps, dtype=torch.float64)), F.cross_entropy(x, y, label_smoothing=eps))
        compiles.append(counter.frame_count)
    assert compiles[0] >= 1 and compiles == compiles[:1] * 3, f"graphs compiled after each eps: {compiles}"

def test_saved_state_is_O_N():
    "The general path's backward keeps, besides the input and target, one float per position and scalars"
    x = torch.randn(128, 1000, requires_grad=True); y = torch.randint(0, 1000, (128,))
    loss = label_smoothing_ce(x, y, torch.full((128,), 0.1))   # one ε per position: the general path
    assert type(loss.grad_fn).__name__ == '_LabelSmoothingCEFnBackward'
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    extra = [t for t in saved if t.data_ptr() not in (x.data_ptr(), y.data_ptr())]
    assert sum(t.numel() for t in extra) <= 2 * 128 + 3, [t.shape for t in extra]

@pytest.mark.parametrize('shape', [(64, 37), (128, 1000), (2, 21, 40, 40)])
def test_cpu_path_holds_only_the_gradient(shape):
    "The CPU path keeps the input, the target and the gradient it computed forward, which backward hands over uncopied"
    x = torch.randn(shape, requires_grad=True); y = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    loss = label_smoothing_ce(x, y)
    assert type(loss.grad_fn).__name__ == '_CPULabelSmoothingCEFnBackward'
    assert loss.grad_fn.grad.shape == x.shape
    assert [t.data_ptr() for t in loss.grad_fn.saved_tensors] == [x.data_ptr(), y.data_ptr()]
    held = loss.grad_fn.grad.data_ptr()   # the address only: a reference would make autograd copy the gradient
    loss.backward()
    assert x.grad.data_ptr() == held and loss.grad_fn.grad is None
    ref = x.detach().clone().requires_grad_(); F.cross_entropy(ref, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad, ref.grad)
    with torch.no_grad(): assert label_smoothing_ce(x, y).grad_fn is None
    assert label_smoothing_ce(x.detach(), y).grad_fn is None   # no gradient wanted: none computed or kept

@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
@pytest.mark.parametrize('shape', [(64, 37), (128, 1000), (2, 21, 40, 40)])
def test_cpu_path_retained_graph(shape, reduction):
    "A second backward through a retained graph (the buffer was handed out) computes the same gradient again"
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True); y = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    y.view(-1)[::7] = -100
    w = torch.rand(shape[1], dtype=torch.float64) + 0.1
    for weight in (None, w):
        loss = label_smoothing_ce(x, y, 0.2, weight=weight, reduction=reduction).sum()
        g1, = torch.autograd.grad(loss, x, retain_graph=True)
        g2, = torch.autograd.grad(loss * 3, x)
        ref = x.detach().clone().requires_grad_()
        F.cross_entropy(ref, y, weight=weight, label_smoothing=0.2, reduction=reduction).sum().backward()
        torch.testing.assert_close(g1, ref.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g2, 3 * ref.grad, rtol=1e-10, atol=1e-12)

@pytest.mark.parametrize('shift', [0., 30., 64., 65., 1e3, -1e4])
@pytest.mark.parametrize('weighted', [False, True])
def test_cpu_sums_with_and_without_the_shift(shift, weighted):
    "2-D logits sum x directly while |max| <= _SUM_SHIFT, and x - max beyond it: both as accurate as torch on float32"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1000, generator=g) * 4 + shift   # above _MIN_BLOCK: the blockwise CPU route
    x[::5, :200] = -1e4   # masked classes: sums of mixed magnitudes
    y = torch.randint(0, 1000, (64,), generator=g)
    w = torch.rand(1000, generator=g) + 0.1 if weighted else None
    ours = label_smoothing_ce(x.requires_grad_(), y, 0.3, weight=w, reduction='none')
    ref64 = F.cross_entropy(x.detach().double(), y, weight=None if w is None else w.double(), label_smoothing=0.3, reduction='none')
    theirs = F.cross_entropy(x.detach(), y, weight=w, label_smoothing=0.3, reduction='none')
    err, terr = (ours.double() - ref64).abs().max().item(), (theirs.double() - ref64).abs().max().item()
    assert err <= max(2 * terr, 1e-5 * ref64.abs().max().item()), (err, terr)
    ours.sum().backward()
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, y, weight=None if w is None else w.double(), label_smoothing=0.3, reduction='sum').backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
def test_half_blocks_working_in_the_gradient(dtype, reduction):
    "Half 2-D logits work in float32 slots of the gradient's unwritten rows: odd sizes (odd offsets), weights, ignored rows"
    n, k = 1031, 997
    assert any(in_grad for *_, in_grad in L._in_grad_blocks(n, k))   # this shape takes that route
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(n, k, generator=g) * 4).to(dtype).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g); y[::7] = -100
    w = torch.rand(k, generator=g) + 0.1
    for weight in (None, w):
        loss = label_smoothing_ce(x, y, 0.2, weight=weight, reduction=reduction)
        grad, = torch.autograd.grad(loss.sum(), x)
        x64 = x.detach().double().requires_grad_()
        ref = F.cross_entropy(x64, y, weight=None if weight is None else weight.double(), label_smoothing=0.2, reduction=reduction)
        ref.sum().backward()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        # one rounding of an exact float32 gradient to the half dtype (bf16: 8 significant bits)
        torch.testing.assert_close(grad.double(), x64.grad, rtol=2 ** -7, atol=1e-3 * x64.grad.abs().max().item())

def peak_bytes(fn):
    "Peak of the CPU bytes allocated during `fn`, above what was live before it (the profiler's allocation events in time order)"
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'), key=lambda e: e.start_ns()):
        live += e.nbytes(); peak = max(peak, live)
    return peak

@pytest.mark.parametrize('dtype, bound', [(torch.float32, 1.05), (torch.bfloat16, 1.25)])
@pytest.mark.parametrize('shape', [(256, 37), (1024, 1000), (4, 21, 64, 64)])
def test_cpu_peak_memory(shape, dtype, bound):
    "Forward+backward allocates the gradient and little else: at most 1.05x the logits in float32, 1.25x in bfloat16"
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_(); y = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    def step(): label_smoothing_ce(x, y).backward(); x.grad = None
    step()
    peak = peak_bytes(step)
    # half inputs work in a float32 block of a ninth of them, and of at least _MIN_BLOCK elements
    floor = L._MIN_BLOCK * 4 if dtype != torch.float32 else 0
    assert peak <= bound * x.numel() * x.element_size() + floor, peak / (x.numel() * x.element_size())

def test_smooth_targets_nd_and_errors():
    y = torch.tensor([[0, 2], [1, -100]])
    t = smooth_targets(y, 3, eps=0.3)
    assert t.shape == (2, 3, 2)
    torch.testing.assert_close(t[0, :, 1], torch.tensor([0.1, 0.1, 0.8]))
    torch.testing.assert_close(t[1, :, 1], torch.zeros(3))
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    # ignored positions become zero rows: they add nothing to the summed loss
    torch.testing.assert_close(label_smoothing_ce(x, t.double(), 0., reduction='sum'), label_smoothing_ce(x, y, 0.3, reduction='sum'))
    with pytest.raises(ValueError, match='n_classes=4 on dim 1'): smooth_targets(torch.eye(3), 4)
    with pytest.raises(ValueError, match='eps=1.5'): smooth_targets(y, 3, eps=1.5)
    with pytest.raises(ValueError, match='n_classes=1'): smooth_targets(y, 1)

@pytest.mark.parametrize('bad, match', [
    (dict(eps=float('nan')), 'outside \\[0, 1\\)'),
    (dict(eps=torch.tensor([0.1, 0.2])), 'one value per position, of shape \\(3,\\); got shape \\(2,\\)'),
    (dict(target=torch.tensor([0, 1, 5])), 'class 5, outside \\[0, 4\\) for C=4'),
    (dict(target=torch.tensor([0., 1., 2.])), "input's shape \\(3, 4\\)"),
    (dict(target=torch.tensor([[0, 1, 2]])), 'must have shape \\(3,\\)'),
    (dict(weight=torch.ones(3)), 'one entry per class \\(C=4\\)'),
    (dict(weight=torch.tensor([1., 1., -0.5, 1.])), 'non-negative; got -0.5 at class 2'),
    (dict(reduction='mean '), "reduction='mean ' is not one of"),
    (dict(variant='KL'), "variant='KL' is not one of"),
])
def test_bad_input(bad, match):
    args = dict(input=torch.randn(3, 4), target=torch.tensor([0, 1, 3]), eps=0.1) | bad
    with pytest.raises((ValueError, TypeError), match=match): label_smoothing_ce(**args)

def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match='eps=1.0'): LabelSmoothingCE(eps=1.0)
    with pytest.raises(ValueError, match="variant='x'"): LabelSmoothingCE(variant='x')
    with pytest.raises(ValueError, match='non-negative'): LabelSmoothingCE(weight=torch.tensor([1., -1.]))
    lf = LabelSmoothingCE(0.2)
    with pytest.raises(ValueError, match='eps=nan'): lf.eps = float('nan')
    assert math.isclose(lf.eps, 0.2)   # a rejected value leaves eps as it was
    lf.reduction = 'avg'
    with pytest.raises(ValueError, match="reduction='avg'"): lf(torch.randn(2, 3), torch.tensor([0, 1]))

@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('shape', [(256, 37), (512, 32768), (4, 21, 64, 64)])
def test_cuda_matches_torch(dtype, shape):
    x = (torch.randn(shape, device='cuda') * 3).to(dtype).requires_grad_()
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:], device='cuda'); y.view(-1)[::5] = -100
    w = torch.rand(shape[1], device='cuda') + 0.1
    loss = label_smoothing_ce(x, y, 0.1, weight=w); loss.backward()
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, y, weight=w.double(), label_smoothing=0.1); ref.backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=1e-4 if dtype == torch.float32 else 2e-3)

@pytest.mark.cuda
def test_cuda_bad_target_is_a_clear_error_not_a_device_assert():
    x, y = torch.randn(8, 5, device='cuda'), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1], device='cuda')
    with pytest.raises(ValueError, match='class 5, outside \\[0, 5\\)'): label_smoothing_ce(x, y)
    torch.cuda.synchronize()   # the context is still healthy
    assert label_smoothing_ce(x, y.clamp_max(4)).isfinite()

@pytest.mark.cuda
def test_cuda_inductor_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('inductor')
    lf = LabelSmoothingCE(0.1)
    step = torch.compile(lambda x, y: lf(x, y), backend=counter)
    x, y = torch.randn(64, 100, device='cuda'), torch.randint(0, 100, (64,), device='cuda')
    compiles = []
    for eps in [0.1, 0.3, 0.0]:
        lf.eps = eps
        torch.testing.assert_close(step(x, y), F.cross_entropy(x, y, label_smoothing=eps), rtol=1e-5, atol=1e-5)
        compiles.append(counter.frame_count)
    assert compiles == compiles[:1] * 3

# A weight of ones gives the same loss through the blockwise path; without a weight small inputs take the lean path
paths = pytest.mark.parametrize('ones_weight', [False, True], ids=['lean', 'blockwise'])

@paths
@pytest.mark.parametrize('eps', [0., 0.2])
def test_infinite_logits(eps, ones_weight):
    "Masked (-inf) logits and ignored rows with non-finite logits give torch's finite answers, not 0 * inf = NaN"
    x = torch.randn(4, 10, dtype=torch.float64); x[:, 7:] = float('-inf'); x[3] = float('nan')
    y = torch.tensor([0, 3, 6, -100])
    w = torch.ones(10, dtype=torch.float64) if ones_weight else None
    for reduction in ['none', 'mean', 'sum']:   # with eps > 0 the -inf logits enter the loss: inf, as in torch
        torch.testing.assert_close(label_smoothing_ce(x, y, eps, weight=w, reduction=reduction),
                                   F.cross_entropy(x, y, label_smoothing=eps, reduction=reduction))
    ours = label_smoothing_ce(x, y, eps, weight=w, reduction='none')
    assert ours[3] == 0 and (ours[:3].isfinite().all() if eps == 0 else ours[:3].isposinf().all())

@paths
@pytest.mark.parametrize('k', [2, 4, 10])
def test_others_with_zero_target_coefficient(k, ones_weight):
    "variant='others' at eps = (K-1)/K puts nothing on x_y itself (a = 0): a -inf target logit gives inf, not NaN"
    x = torch.randn(3, k, dtype=torch.float64); x[0, 1] = float('-inf')
    y = torch.tensor([1, 0, 1])
    eps = (k - 1) / k
    w = torch.ones(k, dtype=torch.float64) if ones_weight else None
    ours = label_smoothing_ce(x, y, eps, weight=w, reduction='none', variant='others')
    ref = _hand_loss(x, y, eps, 'others', 'none')   # q_y = 1 - eps > 0 on a -inf logit: +inf
    assert ours[0].isposinf() and ref[0].isposinf()
    torch.testing.assert_close(ours[1:], ref[1:], rtol=1e-9, atol=1e-9)

@paths
@pytest.mark.parametrize('tdtype', [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_target_dtypes_float32(tdtype, ones_weight):
    "Any integer dtype of class indices works, like in torch; float32 logits match it in value and gradient"
    x = torch.randn(64, 37) * 3
    y = torch.randint(0, 37, (64,))
    w = torch.ones(37) if ones_weight else None
    ours, g_ours = _value_and_grad(lambda x: label_smoothing_ce(x, y.to(tdtype), 0.1, weight=w), x)
    ref, g_ref = _value_and_grad(lambda x: F.cross_entropy(x, y, label_smoothing=0.1), x)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)

def test_eps_stays_an_exact_cpu_scalar():
    "Moving or casting the loss (fastai calls `loss_func.to(device)`) moves its weight, never ε"
    lf = LabelSmoothingCE(0.1, weight=torch.ones(3)).half()
    assert lf.eps == 0.1 and lf.eps_t.dtype == torch.float64 and lf.eps_t.device.type == 'cpu'
    assert lf.weight.dtype == torch.float16
    lf.to('meta')
    assert lf.eps == 0.1 and lf.weight.device.type == 'meta'

def test_weight_must_be_1d():
    with pytest.raises(ValueError, match='1-D tensor with one entry per class; got shape \\(\\)'):
        LabelSmoothingCE(weight=torch.tensor(1.))

@pytest.mark.cuda
def test_cuda_hostile_inputs():
    "On the GPU paths too: uint8 targets keep class 156, shifted logits keep their precision, double backward works"
    x = torch.randn(4, 200, device='cuda', dtype=torch.float64).add_(1e5).float()
    y = torch.tensor([156, 3, 156, 199], device='cuda')
    for w in (None, torch.rand(200, device='cuda') + 0.5):
        xg = x.clone().requires_grad_()
        loss = label_smoothing_ce(xg, y.to(torch.uint8), 0.1, weight=w)
        g, = torch.autograd.grad(loss, xg, create_graph=True)
        hv, = torch.autograd.grad(g.sum(), xg)
        x64 = x.double().requires_grad_()
        ref = F.cross_entropy(x64, y, weight=None if w is None else w.double(), label_smoothing=0.1)
        g64, = torch.autograd.grad(ref, x64, create_graph=True)
        torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(hv.double(), torch.autograd.grad(g64.sum(), x64)[0], rtol=1e-3, atol=1e-6)

@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
@pytest.mark.parametrize('shape', [(6, 5), (2, 5, 7), (2, 5, 3, 4)])
def test_flat_takes_classes_on_dim_1_without_a_copy(shape, reduction):
    "The Flat loss with classes on dim 1 gives fastai's flattened results, in fastai's order, without its transposed copy"
    from fastai.losses import BaseLoss
    x = torch.randn(shape); y = torch.randint(0, 5, (shape[0],) + shape[2:]); y.view(-1)[::4] = -100
    lf = LabelSmoothingCEFlat(0.2, axis=-1 if len(shape) == 2 else 1, reduction=reduction)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, fastais = lf(a, y), BaseLoss.__call__(lf, b, y)   # fastai's route: transpose, copy, flatten
    assert ours.shape == fastais.shape
    torch.testing.assert_close(ours, fastais)
    ours.sum().backward(); fastais.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    ref = F.cross_entropy(x, y, label_smoothing=0.2, reduction=reduction)
    torch.testing.assert_close(ours, ref if reduction != 'none' else ref.transpose(1, -1).reshape(-1) if ref.dim() > 1 else ref)

def test_flat_volumetric_pairs_logits_and_targets_by_position():
    "(N, C, D, H, W): fastai's flattening would pair logits and targets of different positions; the loss does not"
    x = torch.randn(2, 5, 2, 3, 4); y = torch.randint(0, 5, (2, 2, 3, 4))
    torch.testing.assert_close(LabelSmoothingCEFlat(0.2, axis=1)(x, y), F.cross_entropy(x, y, label_smoothing=0.2))

def test_fastai_tensor_types_are_computed_as_plain_tensors():
    "TensorImage/TensorCategory inputs: the same loss and gradient, with no op of the loss dispatched through fastai's types"
    from fastai.torch_core import TensorBase, TensorCategory
    x, y = torch.randn(64, 10), torch.randint(0, 10, (64,))
    xs, xp = TensorBase(x.clone()).requires_grad_(), x.clone().requires_grad_()
    calls = []
    orig = TensorBase.__torch_function__.__func__
    def spy(cls, func, types, args=(), kwargs=None):
        calls.append(getattr(func, '__name__', str(func)))
        return orig(cls, func, types, args, kwargs)
    TensorBase.__torch_function__ = classmethod(spy)
    try:
        xs * 2
        assert calls, "the spy sees fastai's dispatch"
        calls.clear()
        loss = label_smoothing_ce(xs, TensorCategory(y))
    finally: TensorBase.__torch_function__ = classmethod(orig)
    assert calls == [], calls
    loss.backward(); label_smoothing_ce(xp, y).backward()
    torch.testing.assert_close(xs.grad, xp.grad)

def test_cpu_reduced_losses_keep_row_precision():
    "Row statistics are combined row by row, relative to the row's max: no cancellation across rows or for shifted half logits"
    n = 32768   # rows of logits near 63 (under _SUM_SHIFT): summed over rows first, their cancellation would cost ~1e-3
    x = torch.stack([63 + torch.rand(n), 40 + torch.rand(n)], 1); y = torch.zeros(n, dtype=torch.long); y[:5] = 1
    ref = F.cross_entropy(x.double(), y, reduction='sum').item()
    assert abs(label_smoothing_ce(x, y, 0., reduction='sum').item() - ref) <= 1e-6 * ref
    for dt, shift in [(torch.bfloat16, 1e7), (torch.bfloat16, 1e5), (torch.float16, 2e4), (torch.float16, 0.)]:
        xh = (torch.randn(64, 10) * 3 + shift).to(dt); yh = torch.randint(0, 10, (64,))
        for red in ('mean', 'none'):
            torch.testing.assert_close(label_smoothing_ce(xh, yh, 0.1, reduction=red).double(),
                                       F.cross_entropy(xh.double(), yh, label_smoothing=0.1, reduction=red), rtol=1e-6, atol=1e-6)
    # a NaN row, ignored, must not switch its block to the unshifted sums
    x = torch.randn(2048, 10) * 2 + 1e5; y = torch.randint(0, 10, (2048,)); y[0] = -100; x[0] = float('nan')
    torch.testing.assert_close(label_smoothing_ce(x, y, 0.1).double(), F.cross_entropy(x.double(), y, label_smoothing=0.1),
                               rtol=1e-6, atol=0)

@pytest.mark.parametrize('shape', [(1024, 1000), (4, 21, 64, 64)])
def test_no_gradient_is_computed_under_no_grad(shape):
    "Under torch.no_grad() (validation, get_preds) the loss computes no gradient, and allocates a block, not logits"
    x = torch.randn(shape, requires_grad=True); y = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    out = []
    with torch.no_grad(): peak = peak_bytes(lambda: out.append(label_smoothing_ce(x, y)))
    assert out[0].grad_fn is None
    torch.testing.assert_close(out[0], F.cross_entropy(x.detach(), y, label_smoothing=0.1))
    assert peak < 0.3 * x.numel() * 4, peak / (x.numel() * 4)   # a float32 block of a ninth (and softmax's copy of it)
