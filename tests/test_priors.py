"Smoothing toward a prior and one ε per position, against the per-position formula written out by hand in float64"
import pickle
import pytest, torch, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
import fastai_ls.losses as L
from fastai_ls.losses import LabelSmoothingCE, LabelSmoothingCEFlat, label_smoothing_ce, smooth_targets

relaxed = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

@pytest.fixture(params=[False, True], ids=['default-blocks', 'tiny-blocks'])
def blocks(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(L, '_MAX_BLOCK', 5)
        monkeypatch.setattr(L, '_MIN_BLOCK', 5)
    return request.param

def hand_loss(x, target, eps, weight, prior, variant, reduction, ignore_index=-100):
    """float64, per position: q = (1-ε)·onehot(y) + ε·P[y] (P[y] = prior, or prior[y] for a matrix, or 1/K);
    loss = -Σ_k w_k q_k log p_k (+ Σ_k w_k q_k log q_k for 'kl'); 'mean' divides by Σ w_y over kept targets"""
    k = x.shape[1]
    logp = torch.log_softmax(x, 1).movedim(1, -1)   # (..., C)
    w = torch.ones(k, dtype=x.dtype) if weight is None else weight
    eps = torch.as_tensor(eps, dtype=x.dtype)
    if target.is_floating_point():
        t = target.movedim(1, -1)
        u = torch.full((k,), 1 / k, dtype=x.dtype) if prior is None else prior
        q = t * (1 - eps[..., None]) + eps[..., None] * u
        keep, wy = torch.ones(t.shape[:-1], dtype=torch.bool), torch.ones(t.shape[:-1], dtype=x.dtype)
    else:
        keep = target != ignore_index
        y = torch.where(keep, target, 0).long()
        onehot = F.one_hot(y, k).to(x.dtype)
        P = torch.full((k, k), 1 / k, dtype=x.dtype) if prior is None else (prior.expand(k, k) if prior.dim() == 1 else prior)
        q = onehot * (1 - eps[..., None]) + eps[..., None] * P[y]
        wy = w[y] * keep
    per = -(w * q * logp).sum(-1)
    if variant == 'kl': per = per + (w * torch.xlogy(q, q)).sum(-1)
    per = torch.where(keep, per, 0.)
    if reduction == 'none': return per
    if reduction == 'sum': return per.sum()
    denom = wy.sum() if not target.is_floating_point() else torch.tensor(float(per.numel()), dtype=x.dtype)
    return per.sum() / denom if denom > 0 else per.sum() * 0

@st.composite
def prior_problems(draw):
    n = draw(st.integers(1, 5))
    k = draw(st.integers(2, 6))
    spatial = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((n, k) + spatial, generator=g, dtype=torch.float64) * 3
    soft = draw(st.booleans())
    kind = draw(st.sampled_from(['none', 'vector'] if soft else ['none', 'vector', 'matrix', 'matrix-zero-diag']))
    dirichlet = lambda *shape: torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample(shape)
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    prior = dict(none=None, vector=dirichlet(), matrix=dirichlet(k),
                 **{'matrix-zero-diag': (lambda m: m / m.sum(1, keepdim=True))(dirichlet(k) * (1 - torch.eye(k, dtype=torch.float64)))})[kind]
    if soft: target = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64) * 2, 1)
    else:
        target = torch.randint(0, k, (n,) + spatial, generator=g)
        target[torch.rand(target.shape, generator=g) < draw(st.sampled_from([0., 0.3]))] = -100
    weight = torch.rand(k, generator=g, dtype=torch.float64) + 0.1 if draw(st.booleans()) else None
    positions = (n,) + spatial
    eps = torch.rand(positions, generator=g, dtype=torch.float64) * 0.99 if draw(st.booleans()) else draw(st.floats(0, 0.99))
    return x, target, eps, weight, prior, draw(st.sampled_from(['uniform', 'kl'])), draw(st.sampled_from(['none', 'mean', 'sum']))

def value_and_grad(fn, x):
    x = x.clone().requires_grad_()
    loss = fn(x)
    ct = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
    return loss.detach(), torch.autograd.grad((loss * ct).sum(), x)[0]

@relaxed
@given(prior_problems())
def test_prior_and_per_position_eps_match_the_hand_formula(blocks, prob):
    x, target, eps, weight, prior, variant, reduction = prob
    ours = value_and_grad(lambda x: label_smoothing_ce(x, target, eps, weight=weight, reduction=reduction, variant=variant, prior=prior), x)
    ref = value_and_grad(lambda x: hand_loss(x, target, eps, weight, prior, variant, reduction), x)
    for o, r in zip(ours, ref): torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9)

@pytest.mark.parametrize('shape', [(16, 7), (4, 7, 3, 5)])
def test_uniform_prior_is_today_s_loss_and_torch_s(shape):
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, 7, (shape[0],) + shape[2:]); y.view(-1)[::4] = -100
    w = torch.rand(7, dtype=torch.float64) + 0.1
    for prior in (torch.full((7,), 1 / 7, dtype=torch.float64), torch.full((7, 7), 1 / 7, dtype=torch.float64)):
        for red in ('none', 'mean', 'sum'):
            torch.testing.assert_close(label_smoothing_ce(x, y, 0.2, weight=w, reduction=red, prior=prior),
                                       F.cross_entropy(x, y, weight=w, label_smoothing=0.2, reduction=red))

def test_others_is_the_prior_with_zero_diagonal():
    "variant='others' (ε/(K-1) on the other classes) equals the uniform-off-the-diagonal prior, and refuses a prior of its own"
    k = 5
    x, y = torch.randn(8, k, dtype=torch.float64), torch.randint(0, k, (8,))
    offdiag = (1 - torch.eye(k, dtype=torch.float64)) / (k - 1)
    torch.testing.assert_close(label_smoothing_ce(x, y, 0.3, variant='others'), label_smoothing_ce(x, y, 0.3, prior=offdiag))
    with pytest.raises(ValueError, match="variant='others' is the prior with a zero diagonal"):
        label_smoothing_ce(x, y, 0.3, variant='others', prior=offdiag)
    with pytest.raises(ValueError, match="variant='others' is the prior"): LabelSmoothingCE(variant='others', prior=offdiag)

@pytest.mark.parametrize('prior, match', [
    (torch.tensor([0.5, 0.5, 0.5]), 'entries must sum to 1 \\(within 0.0001\\); it sums to 1.5'),
    (torch.tensor([[0.5, 0.5, 0.], [0.2, 0.2, 0.2], [1., 0., 0.]]), 'row 1 sums to 0.6'),
    (torch.tensor([1.5, -0.5, 0.]), 'finite and non-negative; got -0.5 at 1'),
    (torch.tensor([float('nan'), 0.5, 0.5]), 'got nan at 0'),
    (torch.tensor([float('inf'), 0., 0.]), 'sums to inf'),
    (torch.ones(3, 2) / 2, 'shape \\(C,\\) or \\(C, C\\)'),
    (torch.ones(3, 3, 3) / 3, 'shape \\(C,\\) or \\(C, C\\)'),
    (torch.tensor([0, 1, 0]), 'float tensor'),
    (torch.ones(4) / 4, 'does not match the C=3 classes'),
])
def test_bad_priors(prior, match):
    x, y = torch.randn(2, 3), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=match): label_smoothing_ce(x, y, prior=prior)
    if 'does not match' not in match:   # the module does not know C until it sees logits
        with pytest.raises(ValueError, match=match): LabelSmoothingCE(prior=prior)
        lf = LabelSmoothingCE()
        with pytest.raises(ValueError, match=match): lf.prior = prior
        assert lf.prior is None   # a refused prior leaves the old one

def test_matrix_prior_needs_class_indices():
    with pytest.raises(ValueError, match='needs class-index targets'):
        label_smoothing_ce(torch.randn(2, 3), torch.softmax(torch.randn(2, 3), 1), prior=torch.eye(3).roll(1, 0))

def test_module_prior_is_a_buffer():
    "Settable, moved by .to(), saved in state_dict (and checked on load), pickled, passed through by the Flat wrapper"
    P = torch.eye(4).roll(1, 1) * 0.5 + 0.125   # rows sum to 1
    lf = LabelSmoothingCE(0.2)
    assert lf.prior is None and 'prior_t' not in lf.state_dict()
    lf.prior = P
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    torch.testing.assert_close(lf(x, y), label_smoothing_ce(x, y, 0.2, prior=P))
    torch.testing.assert_close(lf(x, y), hand_loss(x, y, 0.2, None, P.double(), 'uniform', 'mean'))
    assert (lf.to(torch.float64).prior.dtype == torch.float64) and 'prior' in repr(lf)
    lf2 = pickle.loads(pickle.dumps(lf)); torch.testing.assert_close(lf2.prior, lf.prior)
    lf3 = LabelSmoothingCE(0.2); lf3.load_state_dict(lf.state_dict()); torch.testing.assert_close(lf3.prior, lf.prior)
    with pytest.raises(ValueError, match='row 0 sums to'): lf3.load_state_dict({**lf.state_dict(), 'prior_t': P * 2})
    flat = LabelSmoothingCEFlat(eps=0.2, prior=P)
    torch.testing.assert_close(flat.prior, P)
    flat.prior = None; assert flat.func.prior is None

def test_per_position_eps_bad_values():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match='eps=1.5 at position \\(1,\\) is outside \\[0, 1\\)'):
        label_smoothing_ce(x, y, torch.tensor([0.1, 1.5, 0.2]))
    with pytest.raises(ValueError, match='eps=nan at position \\(0,\\)'): label_smoothing_ce(x, y, torch.tensor([float('nan'), 0.1, 0.2]))
    with pytest.raises(ValueError, match='one value per position, of shape \\(3,\\); got shape \\(3, 1\\)'):
        label_smoothing_ce(x, y, torch.full((3, 1), 0.1))
    with pytest.raises(TypeError, match='per-position eps must be a float tensor'): label_smoothing_ce(x, y, torch.zeros(3, dtype=torch.long))

def test_per_position_eps_equals_separate_calls():
    "Smoothing noisy-looking samples more: each position's loss is the loss with its own ε"
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 6, (5,))
    eps = torch.tensor([0., 0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    per = label_smoothing_ce(x, y, eps, reduction='none')
    torch.testing.assert_close(per, torch.stack([F.cross_entropy(x[i:i+1], y[i:i+1], label_smoothing=e.item()) for i, e in enumerate(eps)]))

def test_smooth_targets_with_a_prior_gives_the_same_loss():
    k = 4
    P = torch.softmax(torch.randn(k, k, dtype=torch.float64), 1)
    x, y = torch.randn(6, k, dtype=torch.float64), torch.tensor([0, 1, 2, 3, -100, 1])
    t = smooth_targets(y, k, 0.3, prior=P).double()
    torch.testing.assert_close(t[0], 0.7 * F.one_hot(torch.tensor(0), k).double() + 0.3 * P[0])
    torch.testing.assert_close(label_smoothing_ce(x, t, 0., reduction='sum'), label_smoothing_ce(x, y, 0.3, prior=P, reduction='sum'))

def test_gradients_through_a_prior_and_per_position_eps():
    "A prior or per-position ε that requires grad gets its gradient (the hand formula, by autograd)"
    k = 4
    x, y = torch.randn(6, k, dtype=torch.float64), torch.randint(0, k, (6,))
    P = torch.softmax(torch.randn(k, k, dtype=torch.float64), 1).requires_grad_()
    eps = (torch.rand(6, dtype=torch.float64) * 0.5).requires_grad_()
    ours = torch.autograd.grad(label_smoothing_ce(x, y, eps, prior=P), (P, eps))
    ref = torch.autograd.grad(hand_loss(x, y, eps, None, P, 'uniform', 'mean'), (P, eps))
    for o, r in zip(ours, ref): torch.testing.assert_close(o, r)

def test_double_backward_with_a_prior():
    k = 5
    x, y = torch.randn(6, k, dtype=torch.float64, requires_grad=True), torch.randint(0, k, (6,))
    P, w = torch.softmax(torch.randn(k, k, dtype=torch.float64), 1), torch.rand(k, dtype=torch.float64) + 0.5
    hv = []
    for f in (lambda x: label_smoothing_ce(x, y, 0.3, weight=w, prior=P), lambda x: hand_loss(x, y, 0.3, w, P, 'uniform', 'mean')):
        g, = torch.autograd.grad(f(x), x, create_graph=True)
        hv.append(torch.autograd.grad(g.pow(2).sum(), x)[0])
    torch.testing.assert_close(*hv)

def test_half_precision_with_a_matrix_prior():
    k = 37
    P = torch.softmax(torch.randn(k, k), 1)
    x = (torch.randn(64, k) * 3); x[::5, 0] = 1e4
    y = torch.randint(0, k, (64,))
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt).requires_grad_()
        loss = label_smoothing_ce(xh, y, 0.1, prior=P); loss.backward()
        x64 = xh.detach().double().requires_grad_()
        ref = hand_loss(x64, y, 0.1, None, P.double(), 'uniform', 'mean'); ref.backward()
        assert loss.dtype == torch.float32 and xh.grad.dtype == dt
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(xh.grad.double(), x64.grad, rtol=1e-2, atol=1e-3)

def test_compiled_prior_and_per_position_eps():
    "One graph with a prior and per-position ε; inside it, an ε out of range is still an error"
    P = torch.softmax(torch.randn(10, 10), 1)
    lf = LabelSmoothingCE(0.2, prior=P)
    x, y, e = torch.randn(32, 10), torch.randint(0, 10, (32,)), torch.rand(32) * 0.5
    f = torch.compile(lambda x, y: lf(x, y), fullgraph=True, backend='aot_eager')
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, ref = f(xg, y), lf(xr, y)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, xg)[0], torch.autograd.grad(ref, xr)[0])
    g = torch.compile(lambda x, y, e: label_smoothing_ce(x, y, e, prior=P), fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(g(x, y, e), label_smoothing_ce(x, y, e, prior=P))
    with pytest.raises(RuntimeError, match=r'eps is outside \[0, 1\)'): g(x, y, e + 1)
