"Tests for `fastai_ls.bce` against independent references: torch's BCE on hand-smoothed float64 targets, real Learners"
import math, pickle, re
from pathlib import Path
import pytest, torch, torch.nn.functional as F
from torch import nn
from torch.profiler import profile, ProfilerActivity
from sklearn.datasets import load_digits
from fastai.vision.all import (Learner, DataLoaders, DataBlock, ImageBlock, MultiCategoryBlock, FuncSplitter, Resize, Normalize,
                               MixUp, imagenet_stats, get_image_files, accuracy_multi, load_learner, set_seed)
from fastai_ls.all import LabelSmoothingBCE, LabelSmoothingBCEFlat, label_smoothing_bce, smooth_binary_targets, AnnealSmoothing, ECE, MultiBrier
from fastai_ls import bce
from fastai_ls.callback import _find_eps_loss

VARIANTS = ('symmetric', 'uniform', 'mass')

def hand_smoothed(t, eps, variant):
    "The smoothed targets written out independently of the library, labels on dim 1"
    C = t.shape[1]
    if variant == 'symmetric': return t * (1 - eps) + eps / 2
    if variant == 'uniform': return t * (1 - eps) + eps / C
    return t * (1 - eps) + eps * t.sum(1, keepdim=True) / C

def label_view(w, ndim): return None if w is None else w.view((-1,) + (1,) * (ndim - 2))   # per label, for torch's broadcasting

def make(shape, soft, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 3
    t = torch.rand(shape, generator=g, dtype=dtype)
    return x, (t if soft else (t < 0.3).to(dtype))

# ---------------------------------------------------------------- value and gradient against torch, float64
@pytest.mark.parametrize('shape', [(7, 5), (3, 4, 2, 3)], ids=['2d', 'nd'])
@pytest.mark.parametrize('soft', [False, True], ids=['multihot', 'soft'])
@pytest.mark.parametrize('weights', ['none', 'weight', 'pos_weight', 'both'])
@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_matches_torch_on_hand_smoothed_targets(variant, reduction, weights, soft, shape):
    x, t = make(shape, soft)
    C = shape[1]
    w = torch.rand(C, dtype=torch.float64) + 0.5 if weights in ('weight', 'both') else None
    pw = torch.rand(C, dtype=torch.float64) * 4 if weights in ('pos_weight', 'both') else None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = label_smoothing_bce(xa, t, 0.2, variant, weight=w, pos_weight=pw, reduction=reduction)
    ref = F.binary_cross_entropy_with_logits(xb, hand_smoothed(t, 0.2, variant), weight=label_view(w, len(shape)),
                                             pos_weight=label_view(pw, len(shape)), reduction=reduction)
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    ours.backward(g); ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize('variant', VARIANTS)
def test_module_and_flat_match_torch(variant):
    x, t = make((6, 8, 5), soft=False)   # (N, T, C) for the flat loss, labels last
    ref = F.binary_cross_entropy_with_logits(x, hand_smoothed(t.transpose(1, 2), 0.1, variant).transpose(1, 2))
    torch.testing.assert_close(LabelSmoothingBCEFlat(eps=0.1, variant=variant)(x, t), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(LabelSmoothingBCE(0.1, variant)(x.transpose(1, 2), t.transpose(1, 2)), ref, rtol=1e-12, atol=1e-12)
    # `axis` names the label axis of the flat loss
    torch.testing.assert_close(LabelSmoothingBCEFlat(eps=0.1, variant=variant, axis=1)(x.transpose(1, 2), t.transpose(1, 2)), ref,
                               rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('shape', [(300, 7), (2, 3, 50, 40), (5, 3000, 2)], ids=['rows', 'columns', 'wide'])
def test_many_blocks(monkeypatch, variant, shape):
    "Tiny blocks: row blocks, column blocks of N-d inputs, and blocks narrower than the label dim all give torch's answer"
    monkeypatch.setattr(bce, '_BLOCK', 64)
    n, k, s = shape[0], shape[1], math.prod(shape[2:])
    assert len(bce._blocks(n, k, s, False)) > 5
    x, t = make(shape, soft=True, seed=1)
    w, pw = torch.rand(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) * 2
    for red in ('none', 'sum'):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = label_smoothing_bce(xa, t, 0.3, variant, weight=w, pos_weight=pw, reduction=red)
        ref = F.binary_cross_entropy_with_logits(xb, hand_smoothed(t, 0.3, variant), weight=label_view(w, len(shape)),
                                                 pos_weight=label_view(pw, len(shape)), reduction=red)
        torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
        g = torch.randn_like(ref)
        ours.backward(g); ref.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-11, atol=1e-11)

def test_float32_close_to_float64():
    x, t = make((4096, 300), soft=False, seed=2, dtype=torch.float32)   # several default-size blocks
    assert len(bce._blocks(4096, 300, 1, False)) > 1
    for v in VARIANTS:
        ref = F.binary_cross_entropy_with_logits(x.double(), hand_smoothed(t.double(), 0.1, v))
        torch.testing.assert_close(label_smoothing_bce(x, t, 0.1, v).double(), ref, rtol=1e-6, atol=0)

def test_smooth_binary_targets():
    t = torch.tensor([[1., 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    for v in VARIANTS: torch.testing.assert_close(smooth_binary_targets(t, 0.2, v), hand_smoothed(t, 0.2, v))
    m = smooth_binary_targets(t, 0.2, 'mass')
    torch.testing.assert_close(m.sum(1), t.sum(1))   # 'mass' keeps each row's number of positives
    assert (m[2] == 0).all()
    # smoothing the targets and smoothing in the loss give the same loss
    x = torch.randn(3, 5)
    torch.testing.assert_close(label_smoothing_bce(x, smooth_binary_targets(t, 0.2, 'uniform'), eps=0.),
                               label_smoothing_bce(x, t, 0.2, 'uniform'))

# ---------------------------------------------------------------- precision
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('variant', VARIANTS)
def test_half_extreme_logits(dtype, variant):
    "Logits of ±3e4 (and ordinary ones) in half precision: float32 inside, finite, close to float64 on the same rounded logits"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g) * 4
    x[::3, 0], x[1::3, 1], x[2::4, 2] = 3e4, -3e4, 1e4
    t = (torch.rand(64, 6, generator=g) < 0.4).float()
    xh = x.to(dtype).requires_grad_()
    x64 = xh.detach().double().requires_grad_()
    for red in ('mean', 'none'):
        ours = label_smoothing_bce(xh, t.to(dtype), 0.1, variant, reduction=red)
        ref = F.binary_cross_entropy_with_logits(x64, hand_smoothed(t.double(), 0.1, variant), reduction=red)
        assert ours.dtype == torch.float32 and ours.isfinite().all()
        # float32 inside: the smoothed target's rounding (~6e-8), times logits of 3e4, bounds the error
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    xh.grad = x64.grad = None
    label_smoothing_bce(xh, t.to(dtype), 0.1, variant, reduction='sum').backward()
    F.binary_cross_entropy_with_logits(x64, hand_smoothed(t.double(), 0.1, variant), reduction='sum').backward()
    assert xh.grad.dtype == dtype and xh.grad.isfinite().all()
    torch.testing.assert_close(xh.grad.double(), x64.grad, rtol=1e-2, atol=1e-2)

def test_large_logits_float32():
    "±3e4 in float32: no cancellation between the two softplus terms"
    x = torch.tensor([[3e4, -3e4, 20., -20.]])
    t = torch.tensor([[1., 0., 1., 0.]])
    for v in VARIANTS:
        ours = label_smoothing_bce(x, t, 0.1, v, reduction='none')
        ref = F.binary_cross_entropy_with_logits(x.double(), hand_smoothed(t.double(), 0.1, v), reduction='none')
        torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-9)

def test_infinite_logits_and_empty_inputs():
    inf = float('inf')
    x = torch.tensor([[inf, -inf, inf, -inf]], requires_grad=True)
    t = torch.tensor([[1., 0., 0., 1.]])
    l = label_smoothing_bce(x, t, 0., reduction='none')
    assert l.tolist() == [[0., 0., inf, inf]]   # the limits; torch gives NaN for the first two
    assert F.binary_cross_entropy_with_logits(x.detach(), t, reduction='none')[0, :2].isnan().all()
    label_smoothing_bce(x, t, 0.1).backward()
    assert x.grad.isfinite().all()
    for red, expected in (('mean', 0.), ('sum', 0.)):
        e = torch.zeros(0, 3, requires_grad=True)
        l = label_smoothing_bce(e, torch.zeros(0, 3), reduction=red)
        assert l.item() == expected
        l.backward(); assert e.grad.shape == (0, 3)
    assert label_smoothing_bce(torch.zeros(0, 3), torch.zeros(0, 3), reduction='none').shape == (0, 3)

# ---------------------------------------------------------------- gradients beyond the input's
def test_double_backward_func_and_soft_target_grads():
    x, t = make((8, 5), soft=True, seed=4)
    w, pw, v = torch.rand(5, dtype=torch.float64) + .5, torch.rand(5, dtype=torch.float64) * 2, torch.randn(8, 5, dtype=torch.float64)
    def hvp(loss_fn):
        xg = x.clone().requires_grad_()
        g, = torch.autograd.grad(loss_fn(xg), xg, create_graph=True)
        return torch.autograd.grad((g * v).sum(), xg)[0]
    for var in VARIANTS:
        q = hand_smoothed(t, 0.2, var)
        torch.testing.assert_close(hvp(lambda x: label_smoothing_bce(x, t, 0.2, var, weight=w, pos_weight=pw)),
                                   hvp(lambda x: F.binary_cross_entropy_with_logits(x, q, weight=w, pos_weight=pw)))
        # soft targets that require grad (distillation), and a tensor ε that requires grad
        ta, tb = t.clone().requires_grad_(), t.clone().requires_grad_()
        ea, eb = torch.tensor(0.2, dtype=torch.float64, requires_grad=True), torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        label_smoothing_bce(x, ta, ea, var, pos_weight=pw).backward()
        F.binary_cross_entropy_with_logits(x, hand_smoothed(tb, eb, var), pos_weight=pw).backward()
        torch.testing.assert_close(ta.grad, tb.grad); torch.testing.assert_close(ea.grad, eb.grad)
        torch.testing.assert_close(torch.func.grad(lambda x: label_smoothing_bce(x, t, 0.2, var))(x),
                                   torch.func.grad(lambda x: F.binary_cross_entropy_with_logits(x, q))(x))

# ---------------------------------------------------------------- memory
def peak_extra_bytes(fn):
    "Peak of the CPU bytes allocated during `fn`, above what was live before it (profiler allocation events in time order)"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes(); peak = max(peak, live)
    return peak

@pytest.mark.parametrize('pos_weight', [False, True])
@pytest.mark.parametrize('variant', ['symmetric', 'mass'])
def test_memory_no_worse_than_torch(variant, pos_weight):
    "Forward+backward peak, the gradient included, below torch's BCE given targets already smoothed (which it then keeps)"
    x, t = make((2048, 512), soft=False, seed=5, dtype=torch.float32)
    x.requires_grad_()
    q, pw = hand_smoothed(t, 0.1, variant), (torch.rand(512) * 3 if pos_weight else None)
    def ours(): label_smoothing_bce(x, t, 0.1, variant, pos_weight=pw).backward(); x.grad = None
    def torchs(): F.binary_cross_entropy_with_logits(x, q, pos_weight=pw).backward(); x.grad = None
    ours(); torchs()   # warm-up
    nbytes = x.numel() * 4
    mine, theirs = peak_extra_bytes(ours), peak_extra_bytes(torchs)
    assert mine <= theirs, (mine / nbytes, theirs / nbytes)
    assert mine < nbytes + 6 * bce._BLOCK * 4, mine / nbytes   # the gradient, and a few block-sized float32 temporaries

# ---------------------------------------------------------------- bad input
def test_bad_inputs():
    x, t = torch.randn(4, 3), torch.tensor([[1., 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]])
    cases = [(dict(eps=1.0), 'eps=1.0 is outside [0, 1)'), (dict(eps=-0.5), 'eps=-0.5 is outside [0, 1)'),
             (dict(eps=torch.full((4, 3), 0.1)), 'eps must be a float or a tensor with one real element; got a tensor of shape (4, 3)'),
             (dict(eps=torch.tensor(1.5, requires_grad=True)), 'eps=1.5 is outside [0, 1)'),
             (dict(variant='timm'), "variant='timm' is not one of 'symmetric', 'uniform', 'mass'"),
             (dict(reduction='avg'), "reduction='avg' is not one of"),
             (dict(weight=torch.ones(4)), 'weight must be a 1-D real tensor with one entry per label (C=3); got shape (4,)'),
             (dict(pos_weight=torch.ones(2)), 'pos_weight must be a 1-D real tensor with one entry per label (C=3); got shape (2,)'),
             (dict(weight=torch.ones(1, 3)), 'weight must be a 1-D'),
             (dict(weight=torch.tensor([1., float('nan'), 1.])), 'weight must be finite and non-negative; got nan at label 1'),
             (dict(pos_weight=torch.tensor([1., 1., -1.])), 'pos_weight must be finite and non-negative; got -1.0 at label 2')]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)): label_smoothing_bce(x, t, **kw)
    for bad, shown in ((1.5, '1.5'), (-0.25, '-0.25'), (float('nan'), 'nan'), (float('inf'), 'inf')):
        tb = t.clone(); tb[2, 1] = bad
        with pytest.raises(ValueError, match=re.escape(f'target must lie in [0, 1]; got {shown} at index (2, 1)')): label_smoothing_bce(x, tb)
    with pytest.raises(ValueError, match=r"target must have the input's shape \(4, 3\); got \(4, 2\)"): label_smoothing_bce(x, t[:, :2])
    with pytest.raises(ValueError, match=r"target must have the input's shape \(4, 3\); got \(3, 4\)"): LabelSmoothingBCEFlat()(x, t.T)
    with pytest.raises(ValueError, match='at least 2 dims'): label_smoothing_bce(x[:, 0], t[:, 0])
    for v in ('uniform', 'mass'):
        with pytest.raises(ValueError, match=f"variant='{v}' spreads eps over the C labels of dim 1 and needs C >= 2"):
            label_smoothing_bce(x[:, :1], t[:, :1], variant=v)
    with pytest.raises(TypeError, match='target must be a floating-point tensor'): label_smoothing_bce(x, t.long())
    with pytest.raises(TypeError, match='input must be a floating-point tensor'): label_smoothing_bce(x.long(), t)
    # the module checks its arguments when it is built, and its ε whenever it is set
    with pytest.raises(ValueError, match='eps=1.0 is outside'): LabelSmoothingBCE(1.0)
    with pytest.raises(ValueError, match="variant='keras' is not one of"): LabelSmoothingBCEFlat(variant='keras')
    with pytest.raises(ValueError, match='pos_weight must be finite'): LabelSmoothingBCE(pos_weight=torch.tensor([1., -1.]))
    with pytest.raises(ValueError, match='one entry per label each; got 3 and 2'): LabelSmoothingBCE(weight=torch.ones(3), pos_weight=torch.ones(2))
    with pytest.raises(ValueError, match=r'thresh=1.5 must be a probability in \[0, 1\]'): LabelSmoothingBCEFlat(thresh=1.5)
    loss = LabelSmoothingBCE(weight=torch.ones(3))
    with pytest.raises(ValueError, match='eps=2.0 is outside'): loss.eps = 2.
    assert loss.eps == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r'one entry per label \(C=4\)'): loss(torch.randn(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match='eps=1.5 is outside'): loss.load_state_dict({**loss.state_dict(), 'eps_t': torch.tensor(1.5)})
    with pytest.raises(ValueError, match='weight must be finite'): loss.load_state_dict({**loss.state_dict(), 'weight': torch.tensor([1., -1., 1.])})
    assert loss.eps == pytest.approx(0.1) and (loss.weight == 1).all()   # a refused checkpoint changes nothing

# ---------------------------------------------------------------- the module
def test_module_eps_buffer_and_devices():
    loss = LabelSmoothingBCE(0.1, 'uniform', pos_weight=torch.tensor([1., 2., 3.]))
    buf = loss.eps_t
    loss.eps = 0.25
    assert loss.eps_t is buf and loss.eps == 0.25   # updated in place: a compiled step sees the new ε without a recompile
    loss.double()
    assert loss.eps_t.dtype == torch.float64 and loss.eps_t.device.type == 'cpu' and loss.pos_weight.dtype == torch.float64
    x, t = make((5, 3), soft=True)
    torch.testing.assert_close(loss(x, t), F.binary_cross_entropy_with_logits(x, hand_smoothed(t, 0.25, 'uniform'), pos_weight=loss.pos_weight))
    loss.reduction = 'none'   # fastai's NoneReduce sets it
    assert loss(x, t).shape == (5, 3)
    loss.reduction = 'bogus'
    with pytest.raises(ValueError, match="reduction='bogus'"): loss(x, t)
    for lf in (LabelSmoothingBCE(0.2, 'mass', weight=torch.rand(3)), LabelSmoothingBCEFlat(eps=0.2, variant='mass', thresh=0.7)):
        lf2 = pickle.loads(pickle.dumps(lf))
        assert (lf2.eps, lf2.thresh) == (lf.eps, lf.thresh)
        torch.testing.assert_close(lf2(x, t), lf(x, t))

def test_flat_one_output_per_item_and_targets():
    "A 1-D input is one binary output per item; integer and boolean multi-hot targets are made floats, as fastai's flat BCE does"
    x, t = torch.randn(10), (torch.rand(10) < 0.5)
    ref = F.binary_cross_entropy_with_logits(x, t.float() * 0.8 + 0.1)
    for targ in (t, t.long(), t.float()): torch.testing.assert_close(LabelSmoothingBCEFlat(eps=0.2)(x, targ), ref)
    with pytest.raises(ValueError, match='needs C >= 2'): LabelSmoothingBCEFlat(eps=0.2, variant='mass')(x, t)
    lf = LabelSmoothingBCEFlat(eps=0.1, pos_weight=torch.tensor([1., 4.]))   # pos_weight needs no flatten=False here
    x2, t2 = torch.randn(3, 5, 2), (torch.rand(3, 5, 2) < 0.5).float()
    torch.testing.assert_close(lf(x2, t2), F.binary_cross_entropy_with_logits(x2, t2 * 0.9 + 0.05, pos_weight=torch.tensor([1., 4.])))

def test_anneal_smoothing_finds_eps():
    for loss in (LabelSmoothingBCE(0.1), LabelSmoothingBCEFlat(eps=0.1)):
        inner = _find_eps_loss(loss)
        assert isinstance(inner, LabelSmoothingBCE)
        inner.eps = 0.05
        assert loss.eps == pytest.approx(0.05)

# ---------------------------------------------------------------- real Learners
def digits_multilabel(bs=64):
    "sklearn's digits with 12 labels per image: odd, at least 5, and the digit one-hot"
    X, y = load_digits(return_X_y=True)
    x, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
    t = torch.cat([torch.stack([y % 2 == 1, y >= 5], 1), F.one_hot(y, 10).bool()], 1).float()
    ds = lambda s: list(zip(x[s], t[s]))
    return DataLoaders.from_dsets(ds(slice(400, None)), ds(slice(0, 400)), bs=bs, device='cpu')

def test_multilabel_learner_learns_with_annealing():
    "A multi-label Learner with AnnealSmoothing learns, far beyond the all-zeros predictor, and gets its ε back after the fit"
    set_seed(0)
    dls = digits_multilabel()
    learn = Learner(dls, nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 12)), cbs=AnnealSmoothing('cos'),
                    loss_func=LabelSmoothingBCEFlat(eps=0.1), metrics=[accuracy_multi, MultiBrier(multilabel=True)])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 1e-2)
    eps = learn.anneal_smoothing.hps['eps']
    assert eps[0] == pytest.approx(0.1) and eps[-1] < 1e-3 and all(a >= b - 1e-12 for a, b in zip(eps, eps[1:]))
    assert learn.loss_func.eps == pytest.approx(0.1) and learn.loss_func.func.eps_t.item() == pytest.approx(0.1)
    with learn.no_bar():
        valid_loss, acc, brier = learn.validate()
        probs, targs = learn.get_preds()
    zeros_err = targs.mean().item()   # the all-zeros predictor gets every positive wrong: 2 of 12 labels per image on average
    assert 1 - acc < 0.5 * zeros_err and brier < 0.5 * zeros_err, (acc, 1 - zeros_err, brier)
    # the validation loss is the plain BCE (`valid_eps=0`), and get_preds applies the loss's sigmoid
    assert valid_loss == pytest.approx(F.binary_cross_entropy(probs, targs).item(), rel=1e-4)
    logits, _ = learn.get_preds(act=lambda x: x)
    torch.testing.assert_close(probs, torch.sigmoid(logits))

def test_multilabel_learner_mixup():
    "y_int = False: MixUp mixes the multi-hot targets into soft ones, which the loss takes as they are"
    set_seed(0)
    learn = Learner(digits_multilabel(), nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 12)),
                    loss_func=LabelSmoothingBCEFlat(eps=0.1, variant='mass'), cbs=[MixUp(), AnnealSmoothing('cos')], metrics=accuracy_multi)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    losses = [float(l) for l in learn.recorder.losses]
    assert all(map(math.isfinite, losses)) and sum(losses[-5:]) < sum(losses[:5])
    assert learn.loss_func.reduction == 'mean' and learn.loss_func.eps == pytest.approx(0.1)
    with learn.no_bar(): acc, (_, targs) = learn.validate()[1], learn.get_preds()
    assert 1 - acc < 0.8 * targs.mean().item()   # fewer errors than the all-zeros predictor

def pets_multilabel(path, size=32, n_valid=2, bs=32):
    "Pets with two labels per photo, species and breed (39 binary outputs), `n_valid` photos of each breed held out"
    files = sorted(get_image_files(path))
    breed = lambda f: re.match(r'^(.+)_\d+\.jpg$', f.name).group(1)
    held_out = {f for b in {breed(f) for f in files} for f in sorted(g for g in files if breed(g) == b)[:n_valid]}
    dblock = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_y=lambda f: ['cat' if breed(f)[0].isupper() else 'dog', breed(f)],
                       splitter=FuncSplitter(lambda f: f in held_out), item_tfms=Resize(size),
                       batch_tfms=Normalize.from_stats(*imagenet_stats))
    return dblock.dataloaders(files, bs=bs, device='cpu', num_workers=0)

def small_cnn(c, w=16):
    blk = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
    return nn.Sequential(blk(3, w), blk(w, 2 * w), blk(2 * w, 4 * w), blk(4 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, c))

@pytest.fixture(scope='module')
def annealed_pets(pets_path):
    "A multi-label pets model, photos read through fastai's image pipeline, trained with `LabelSmoothingBCEFlat` and `AnnealSmoothing`"
    set_seed(0)
    dls = pets_multilabel(pets_path)
    learn = Learner(dls, small_cnn(dls.c), loss_func=LabelSmoothingBCEFlat(eps=0.1, variant='uniform'), cbs=AnnealSmoothing('cos'),
                    metrics=[accuracy_multi, ECE(multilabel=True), MultiBrier(multilabel=True)])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(8, 3e-3)
    return learn

def test_pets_multilabel_learner(annealed_pets):
    learn = annealed_pets
    assert learn.dls.c == 39 and {'cat', 'dog'} <= set(learn.dls.vocab) and len(learn.dls.valid_ds) == 74
    assert learn.loss_func.eps == pytest.approx(0.1) and learn.anneal_smoothing.hps['eps'][-1] < 1e-3
    with learn.no_bar():
        probs, targs = learn.get_preds()
        valid_loss, acc, ece, brier = learn.validate()
    assert ((probs >= 0) & (probs <= 1)).all() and targs.shape == probs.shape == (74, 39)
    # the all-zeros predictor gets the 2 positive labels of each photo wrong; from scratch on 296 photos the model
    # mostly learns how frequent each label is, which already beats it
    zeros_err = 2 / 39
    assert 1 - acc < 0.9 * zeros_err and brier < 0.8 * zeros_err, (acc, brier)
    assert valid_loss == pytest.approx(F.binary_cross_entropy(probs, targs).item(), rel=1e-4)
    assert acc == pytest.approx(accuracy_multi(probs, targs, sigmoid=False).item(), abs=1e-6)
    assert ece == pytest.approx(ECE(multilabel=True, from_logits=False)(probs, targs), abs=1e-6)

def test_pets_multilabel_export_and_predict(annealed_pets, tmp_path):
    learn = annealed_pets
    learn.path = tmp_path
    learn.export('export.pkl')
    learn2 = load_learner(tmp_path / 'export.pkl')
    assert isinstance(learn2.loss_func, LabelSmoothingBCEFlat) and learn2.loss_func.eps == pytest.approx(0.1)
    assert learn2.loss_func.func.variant == 'uniform'
    f = learn.dls.valid_ds.items[0]
    labels, decoded, probs = learn2.predict(f)
    assert probs.shape == (39,) and decoded.dtype == torch.bool and (decoded == (probs > 0.5)).all()
    assert list(labels) == [v for v, d in zip(learn.dls.vocab, decoded) if d]
    torch.testing.assert_close(learn.predict(f)[2], probs)

def test_bench_script_planet_layout(tmp_path, pets_path):
    "bench/multilabel_pets.py end to end on a folder in PLANET_TINY's layout (labels.csv, train/*.jpg), made from pets photos"
    import importlib.util, shutil
    import pandas as pd
    spec = importlib.util.spec_from_file_location('multilabel_pets', Path(__file__).parents[1]/'bench'/'multilabel_pets.py')
    bench_script = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench_script)
    (tmp_path/'train').mkdir()
    files = sorted(get_image_files(pets_path))[::12]   # 31 photos
    for i, f in enumerate(files): shutil.copy(f, tmp_path/'train'/f'train_{i}.jpg')
    tags = [' '.join(bench_script.pets_labels(f) + (['hazy'] if i % 3 == 0 else [])) for i, f in enumerate(files)]
    pd.DataFrame({'image_name': [f'train_{i}' for i in range(len(files))], 'tags': tags}).to_csv(tmp_path/'labels.csv', index=False)
    out = tmp_path/'out'
    assert bench_script.main(['--dataset', 'planet', '--path', str(tmp_path), '--seeds', '2', '--epochs', '1',
                              '--strategies', 'bce', 'mass', 'anneal', '--out', str(out)]) == 0
    df = pd.read_csv(out/'results.csv')
    assert len(df) == 6 and set(df.strategy) == {'bce', 'mass', 'anneal'} and (df.n_valid == 6).all()
    assert df.n_labels.iloc[0] == len({t for ts in tags for t in ts.split()})
    summary = (out/'summary.md').read_text()
    assert '--dataset planet' in summary and 'wall time' in summary and '| anneal |' in summary
    assert (out/'reliability.png').stat().st_size > 10_000
