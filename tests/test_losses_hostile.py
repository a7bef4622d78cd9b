"Inputs torch accepts but a fused kernel can get wrong, and uses of autograd beyond a first gradient, each against torch"
import math
import numpy as np, pytest, torch, torch.nn.functional as F
import fastai_ls.losses as L
from fastai_ls.losses import LabelSmoothingCE, LabelSmoothingCEFlat, label_smoothing_ce, smooth_targets

torch.manual_seed(0)
X, Y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 1])
ONES = torch.ones(5, dtype=torch.float64)

# The three CPU paths: lean (2-D, no weight, small), blockwise (a weight of ones gives the same loss), N-d blockwise
def path_args(path):
    if path == 'lean': return X, Y, None
    if path == 'blockwise': return X, Y, ONES
    return X.view(3, 2, 5).transpose(1, 2).contiguous(), Y.view(3, 2), None   # (3, 5, 2): N-d, classes on dim 1

PATHS = ['lean', 'blockwise', 'nd']

def test_unnormalised_probability_targets_match_torch():
    "Rows that sum to anything (negative, zero, log-probabilities): torch's value, not a dropped lse term"
    x, t = torch.tensor([[0., 1, 2]]), torch.tensor([[-1., 0, 0]])
    torch.testing.assert_close(label_smoothing_ce(x, t, 0.0), F.cross_entropy(x, t))
    for t in [torch.log_softmax(torch.randn(6, 5, dtype=torch.float64), 1), torch.randn(6, 5, dtype=torch.float64),
              torch.zeros(6, 5, dtype=torch.float64)]:
        for w in (None, torch.rand(5, dtype=torch.float64)):
            for red in ('none', 'mean', 'sum'):
                torch.testing.assert_close(label_smoothing_ce(X, t, 0.2, weight=w, reduction=red),
                                           F.cross_entropy(X, t, weight=w, label_smoothing=0.2, reduction=red))

def test_probability_targets_refuse_a_nonnegative_ignore_index():
    t = torch.softmax(torch.randn(6, 5), 1)
    with pytest.raises(RuntimeError): F.cross_entropy(X.float(), t, ignore_index=1)   # torch refuses it too
    with pytest.raises(ValueError, match='ignore_index=1 does not apply to probability targets'):
        label_smoothing_ce(X.float(), t, ignore_index=1)
    # a negative ignore_index cannot match a class, and torch accepts it
    torch.testing.assert_close(label_smoothing_ce(X.float(), t, ignore_index=-1), F.cross_entropy(X.float(), t, ignore_index=-1, label_smoothing=0.1))

@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -1.])
def test_non_finite_or_negative_weights_are_refused(bad):
    w = torch.tensor([1, 1, bad, 1, 1.])
    with pytest.raises(ValueError, match=f'finite and non-negative; got {bad} at class 2'): label_smoothing_ce(X, Y, weight=w)
    with pytest.raises(ValueError, match=f'got {bad} at class 2'): LabelSmoothingCE(weight=w)
    with pytest.raises(ValueError, match=f'got {bad} at class 2'): LabelSmoothingCEFlat(weight=w)

@pytest.mark.parametrize('path', PATHS + ['soft'])
@pytest.mark.parametrize('variant', ['uniform', 'kl'])
def test_double_backward_matches_torch(path, variant):
    "A gradient taken with create_graph=True carries its graph: Hessian-vector products equal torch's"
    x, y, w = path_args(path if path != 'soft' else 'lean')
    if path == 'soft': y = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    v = torch.randn_like(x)
    def hvp(fn):
        xg = x.clone().requires_grad_()
        g, = torch.autograd.grad(fn(xg), xg, create_graph=True)
        assert g.requires_grad
        return torch.autograd.grad((g * v).sum(), xg)[0], g.detach()
    ours, g_ours = hvp(lambda x: label_smoothing_ce(x, y, 0.3, weight=w, variant=variant))
    ref, g_ref = hvp(lambda x: F.cross_entropy(x, y, weight=w, label_smoothing=0.3))   # 'kl' has the same gradient
    torch.testing.assert_close(g_ours, g_ref)
    torch.testing.assert_close(ours, ref)

def test_gradgradcheck_and_gradient_penalty():
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 1], [2, -100], [1, 1], [0, 2]])
    w = torch.rand(3, dtype=torch.float64) + 0.1
    for red in ('none', 'mean', 'sum'):
        assert torch.autograd.gradgradcheck(lambda x: label_smoothing_ce(x, y, 0.2, weight=w, reduction=red), (x,))
    # a gradient penalty: d/dx |grad_x loss|^2, with the incoming gradient itself depending on x
    def penalty(fn):
        xg = x.detach().clone().requires_grad_()
        g, = torch.autograd.grad(fn(xg) * xg.sum(), xg, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), xg)[0]
    torch.testing.assert_close(penalty(lambda x: label_smoothing_ce(x, y, 0.2, weight=w)),
                               penalty(lambda x: F.cross_entropy(x, y, weight=w, label_smoothing=0.2)))

def test_probability_targets_that_require_grad_get_torch_s_gradient():
    t = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    w = torch.rand(5, dtype=torch.float64)
    grads = []
    for fn in (label_smoothing_ce, lambda x, t, eps, weight: F.cross_entropy(x, t, weight=weight, label_smoothing=eps)):
        x, tg = X.clone().requires_grad_(), t.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(x, tg, 0.2, weight=w), (x, tg)))
    for o, r in zip(*grads): torch.testing.assert_close(o, r)

def _hand(x, y, eps, w):
    "Smoothed cross-entropy with explicit targets, float64: differentiable in eps and the weight"
    k = x.shape[1]
    q = F.one_hot(y, k).double() * (1 - eps) + eps / k
    per = -(q * torch.log_softmax(x, 1) * w).sum(1)
    return per.sum() / w[y].sum()

def test_tensor_eps_and_weight_that_require_grad_get_their_gradients():
    "torch cannot differentiate in ε (a float) and refuses a weight that requires grad; here both gradients flow"
    eps = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    ours = torch.autograd.grad(label_smoothing_ce(X, Y, eps, weight=w), (eps, w))
    ref = torch.autograd.grad(_hand(X, Y, eps, w), (eps, w))
    for o, r in zip(ours, ref): torch.testing.assert_close(o, r)
    assert torch.autograd.gradcheck(lambda e: label_smoothing_ce(X, Y, e), (eps,))

@pytest.mark.parametrize('path', ['lean', 'blockwise'])
def test_uint8_targets_do_not_wrap_ignore_index(path):
    "As uint8, -100 is 156: class 156 must still count, and a target of 156 is not 'ignored'"
    x = torch.randn(4, 200, dtype=torch.float64)
    y = torch.tensor([156, 3, 156, 199])
    w = None if path == 'lean' else torch.ones(200, dtype=torch.float64)
    for red in ('none', 'mean', 'sum'):
        torch.testing.assert_close(label_smoothing_ce(x, y.to(torch.uint8), 0.1, weight=w, reduction=red),
                                   F.cross_entropy(x, y, label_smoothing=0.1, reduction=red))
    torch.testing.assert_close(smooth_targets(y.to(torch.uint8), 200), smooth_targets(y, 200))
    assert smooth_targets(y.to(torch.uint8), 200)[0].sum() == 1   # not an ignored (all-zero) row

@pytest.mark.parametrize('path', PATHS)
def test_huge_logits(path):
    "Logits of 3e38 (a max-magnitude float32): shift-invariance, not lse - x_y = 0 at float32's resolution"
    x = torch.full((2, 100), 3e38); y = torch.tensor([0, 5])
    if path == 'blockwise': w = torch.ones(100)
    else: w = None
    if path == 'nd': x, y = x.T.reshape(1, 100, 2), y.view(1, 2)
    for eps in (0., 0.1):
        torch.testing.assert_close(label_smoothing_ce(x, y, eps, weight=w), F.cross_entropy(x, y, label_smoothing=eps))
    assert math.isclose(label_smoothing_ce(x, y, 0., weight=w).item(), math.log(100), rel_tol=1e-6)

def test_compiled_checks_of_eps():
    "Inside torch.compile, a tensor ε out of range is an error, not a number; a float ε gets the library's message"
    f = torch.compile(lambda x, y, e: label_smoothing_ce(x, y, e), fullgraph=True, backend='aot_eager')
    x, y = X.float(), Y
    torch.testing.assert_close(f(x, y, torch.tensor(0.3)), F.cross_entropy(x, y, label_smoothing=0.3))
    for bad in (1.5, -0.1, float('nan')):
        with pytest.raises(RuntimeError, match=r'eps is outside \[0, 1\)'): f(x, y, torch.tensor(bad))
    g = torch.compile(lambda x, y: label_smoothing_ce(x, y, 1.5), backend='aot_eager')
    with pytest.raises(ValueError, match=r'^eps=1.5 is outside \[0, 1\)'): g(x, y)
    # fullgraph=True: Dynamo wraps every exception raised while tracing, ours included; its text still names ε
    h = torch.compile(lambda x, y: label_smoothing_ce(x, y, 1.5), fullgraph=True, backend='aot_eager')
    with pytest.raises(Exception, match=r'eps=1.5 is outside \[0, 1\)'): h(x, y)

@pytest.mark.parametrize('key, value, match', [
    ('eps_t', torch.tensor(1.5, dtype=torch.float64), 'eps=1.5 is outside'),
    ('eps_t', torch.tensor(float('nan'), dtype=torch.float64), 'eps=nan is outside'),
    ('weight', torch.tensor([1., -1., 1.]), 'non-negative; got -1.0 at class 1'),
    ('weight', torch.tensor([1., float('nan'), 1.]), 'got nan at class 1'),
])
def test_load_state_dict_validates(key, value, match):
    lf = LabelSmoothingCE(0.1, weight=torch.ones(3))
    sd = lf.state_dict() | {key: value}
    with pytest.raises(ValueError, match=match): lf.load_state_dict(sd)
    assert lf.eps == 0.1 and (lf.weight == 1).all()   # refused: nothing changed
    ok = LabelSmoothingCE(0.3, weight=torch.full((3,), 2.)); lf.load_state_dict(ok.state_dict())
    assert lf.eps == 0.3 and (lf.weight == 2).all()

@pytest.mark.parametrize('path', PATHS)
def test_torch_func_grad_vmap_jacrev_hessian(path):
    "The transforms torch's own loss supports: same answers"
    x, y, w = path_args(path)
    ours = lambda x, y: label_smoothing_ce(x, y, 0.2, weight=w)
    ref = lambda x, y: F.cross_entropy(x, y, weight=w, label_smoothing=0.2)
    for tf in (torch.func.grad, torch.func.jacrev, torch.func.hessian):
        torch.testing.assert_close(tf(ours)(x, y), tf(ref)(x, y))
    # vmap against a loop (torch's own loss cannot be vmapped with a weight and label smoothing)
    xs, ys = torch.stack([x, x * 2, -x]), torch.stack([y, y.flip(0), y])
    loop = lambda f: torch.stack([f(xi, yi) for xi, yi in zip(xs, ys)])
    torch.testing.assert_close(torch.func.vmap(ours)(xs, ys), loop(ref))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(ours))(xs, ys), loop(torch.func.grad(ref)))

@pytest.mark.parametrize('eps', [np.array([0.1]), np.float32(0.1), np.array(0.1), torch.tensor([0.1]), 0.1])
def test_eps_types_accepted(eps):
    torch.testing.assert_close(label_smoothing_ce(X, Y, eps), F.cross_entropy(X, Y, label_smoothing=0.1))
    assert math.isclose(LabelSmoothingCE(eps).eps, float(np.asarray(eps).item()))

@pytest.mark.parametrize('eps, err, match', [
    ('0.1', TypeError, "eps must be a real number in \\[0, 1\\); got '0.1'"),
    (True, TypeError, 'got True of type bool'),
    (None, TypeError, 'got None'),
    (np.array([[0.1, 0.2]]), ValueError, 'one value per position, of shape \\(6,\\); got shape \\(1, 2\\)'),
    (torch.tensor(0.1j), ValueError, 'one real element'),
])
def test_eps_types_refused(eps, err, match):
    with pytest.raises(err, match=match): label_smoothing_ce(X, Y, eps)
    if not isinstance(eps, np.ndarray):   # the module holds one ε, so its message is about that
        with pytest.raises(err, match=match): LabelSmoothingCE(eps)

def test_smooth_targets_bad_input_like_the_loss():
    with pytest.raises(TypeError, match='integer tensor; got torch.bool'): smooth_targets(torch.tensor([True, False]), 2)
    with pytest.raises(TypeError, match='n_classes must be an integer; got 3.0'): smooth_targets(torch.tensor([1, 0]), 3.0)
    torch.testing.assert_close(smooth_targets(torch.tensor([1, 0]), np.int64(3)), smooth_targets(torch.tensor([1, 0]), 3))

@pytest.mark.parametrize('soft', [False, True])
@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
def test_unbatched_input_like_torch(soft, reduction):
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(torch.randn(5, dtype=torch.float64), 0) if soft else torch.tensor(3)
    ours = label_smoothing_ce(x, y, 0.2, reduction=reduction)
    ref = F.cross_entropy(x, y, label_smoothing=0.2, reduction=reduction)
    assert ours.shape == ref.shape == ()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
    torch.testing.assert_close(LabelSmoothingCE(0.2, reduction=reduction)(x, y), ref)

def test_unbatched_input_with_a_batched_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r'unbatched input of shape \(5,\), the target must be one class index'):
        label_smoothing_ce(torch.randn(5), torch.tensor([3]))

@pytest.mark.parametrize('path', ['lean', 'blockwise'])
def test_no_kept_target_weight_gives_zero_for_mean(path):
    "Decided: all targets ignored, an empty batch, or zero weight on every target present all give 0 and a zero gradient"
    w = None if path == 'lean' else ONES
    cases = [(X, torch.full((6,), -100), w), (X[:0], Y[:0], w)]
    if path == 'blockwise': cases.append((X, torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 1.], dtype=torch.float64)))
    for x, y, w in cases:
        assert torch.isnan(F.cross_entropy(x, y, weight=w, label_smoothing=0.1))   # torch's 0/0
        xg = x.clone().requires_grad_()
        loss = label_smoothing_ce(xg, y, 0.1, weight=w)
        assert loss.item() == 0
        assert (torch.autograd.grad(loss, xg)[0] == 0).all()

def test_double_backward_uses_the_eps_of_its_forward():
    "A double backward keeps a copy of ε: `AnnealSmoothing` changing it in place before it runs changes nothing"
    w = torch.rand(5, dtype=torch.float64) + 0.5   # with weights the curvature depends on ε (its scale is a*w_y + b*W)
    lf = LabelSmoothingCE(0.3, weight=w)
    x = X.clone().requires_grad_()
    g, = torch.autograd.grad(lf(x, Y), x, create_graph=True)
    lf.eps = 0.   # as AnnealSmoothing does before the next batch
    hv = torch.autograd.grad(g.sum(), x)[0]
    x2 = X.clone().requires_grad_()
    g2, = torch.autograd.grad(F.cross_entropy(x2, Y, weight=w, label_smoothing=0.3), x2, create_graph=True)
    torch.testing.assert_close(hv, torch.autograd.grad(g2.sum(), x2)[0])
