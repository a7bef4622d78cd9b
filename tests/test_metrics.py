"Tests for `fastai_ls.metrics` that read better outside the notebook: independent references, Learners, PNG output."
import math, io, warnings
from types import SimpleNamespace
import matplotlib
matplotlib.use('Agg')
import numpy as np, pytest, torch, torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image
from sklearn.calibration import calibration_curve
from sklearn.datasets import load_digits
from torch import nn
from fastai.basics import DataBlock, TransformBlock, CategoryBlock, RandomSplitter, Learner, CrossEntropyLossFlat, set_seed, noop, to_detach
from fastai.distributed import DistributedDL
from fastai_ls.metrics import *
from fastai_ls.metrics import _prob_violation

def two_col(conf, hits, dtype=torch.float64):
    "3-class probabilities whose top class (0) has confidence `conf`; target 0 where `hits` else 1"
    conf = torch.tensor(conf, dtype=torch.float64)
    rest = (1-conf)/2
    probs = torch.stack([conf, rest, 1-conf-rest], 1).to(dtype)
    return probs, torch.where(torch.tensor(hits, dtype=torch.bool), 0, 1)

# ---------------------------------------------------------------- ECE, hand-computed
def test_ece_perfect_calibration_is_zero():
    # confidence 1/2 right 1 time in 2, 3/4 right 3 times in 4, 1 always right
    conf = [.5]*2 + [.75]*4 + [1.]*3
    hits = [1, 0] + [1, 1, 1, 0] + [1]*3
    probs, targs = two_col(conf, hits)
    for m in (ECE(), ECE(n_bins=4), ECE(adaptive=True), MCE()): assert m(probs, targs) == pytest.approx(0, abs=1e-12)

@pytest.mark.parametrize('n_bins', [1, 5, 15])
@pytest.mark.parametrize('conf,acc', [(.9, .6), (.8, .25)])
def test_ece_constant_overconfident(n_bins, conf, acc):
    n = 400
    probs, targs = two_col([conf]*n, [i < acc*n for i in range(n)])
    assert ECE(n_bins)(probs, targs) == pytest.approx(conf-acc, abs=1e-12)
    assert MCE(n_bins)(probs, targs) == pytest.approx(conf-acc, abs=1e-12)

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_ece_bin_edges(dtype):
    # 10 items at 0.6 (all right) and 10 at 0.5 (all wrong). With 5 bins, 0.6 is the upper edge of (0.4, 0.6], so both
    # groups share a bin: |0.5 - 0.55| = 0.05. Were 0.6 put into (0.6, 0.8] the ECE would be (0.4 + 0.5)/2 = 0.45.
    probs, targs = two_col([.6]*10 + [.5]*10, [True]*10 + [False]*10, dtype)
    assert ECE(5)(probs, targs) == pytest.approx(.05, abs=1e-6)
    assert ECE(4)(probs, targs) == pytest.approx(.45, abs=1e-6)  # (0.5, 0.75] and (0.25, 0.5]: 0.5 on an edge too
    _, cnt, _, _ = calibration_bins(torch.tensor([0., .2, .4, .6, .8, 1.], dtype=dtype), torch.ones(6), 5)
    assert cnt.tolist() == [2, 1, 1, 1, 1]

# ---------------------------------------------------------------- ECE against sklearn
def sk_ece(hits, conf, n_bins):
    "ECE and MCE from sklearn's per-bin accuracy/confidence, weighted by np.histogram counts (no value lies on an edge)"
    prob_true, prob_pred = calibration_curve(hits, conf, n_bins=n_bins, strategy='uniform')
    cnt = np.histogram(conf, bins=np.linspace(0, 1, n_bins+1))[0]
    cnt = cnt[cnt > 0]
    assert len(cnt) == len(prob_true)
    gaps = np.abs(prob_true - prob_pred)
    return (gaps*cnt).sum()/cnt.sum(), gaps.max()

@pytest.mark.parametrize('seed,n_bins', [(0, 15), (1, 10), (2, 7)])
def test_ece_matches_sklearn(seed, n_bins):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3000, 6, generator=g, dtype=torch.float64)*2
    targs = torch.multinomial(F.softmax(logits*.7, 1), 1, generator=g)[:, 0]  # miscalibrated on purpose
    probs = F.softmax(logits, 1).numpy()
    conf, hits = probs.max(1), (probs.argmax(1) == targs.numpy())
    ece, mce = sk_ece(hits, conf, n_bins)
    assert ece > 0.01
    for p in (logits, torch.from_numpy(probs)):
        assert ECE(n_bins)(p, targs) == pytest.approx(ece, abs=1e-10)
        assert MCE(n_bins)(p, targs) == pytest.approx(mce, abs=1e-10)
    cw = np.mean([sk_ece(targs.numpy() == k, probs[:, k], n_bins)[0] for k in range(6)])
    assert ECE(n_bins, classwise=True)(logits, targs) == pytest.approx(cw, abs=1e-10)

def test_adaptive_ece_equal_mass_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1003, 4, generator=g, dtype=torch.float64)*2
    targs = torch.randint(0, 4, (1003,), generator=g)
    probs = F.softmax(logits, 1).numpy()
    conf, hits = probs.max(1), (probs.argmax(1) == targs.numpy())
    o, m, b = np.argsort(conf), len(conf), 10
    chunks = np.split(o, [math.ceil(i*m/b) for i in range(1, b)])  # bin i holds the ranks up to ceil(i*m/b)
    ref = sum(len(c)*abs(conf[c].mean() - hits[c].mean()) for c in chunks)/m
    assert ECE(b, adaptive=True)(logits, targs) == pytest.approx(ref, abs=1e-12)

# ---------------------------------------------------------------- Brier and NLL in float64
@pytest.mark.parametrize('axis', [1, -1])
def test_brier_nll_float64(axis):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 5, 7, generator=g)*3          # (N, C, T)
    targs = torch.randint(0, 5, (20, 7), generator=g)
    targs[::3, 2] = -100
    preds = logits if axis == 1 else logits.movedim(1, -1)
    z = logits.double().numpy().transpose(0, 2, 1)         # (N, T, C)
    t, keep = targs.numpy(), targs.numpy() != -100
    z, t = z[keep], t[keep]
    p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    brier = ((p - np.eye(5)[t])**2).sum(1).mean()
    nll = -np.log(p[np.arange(len(t)), t]).mean()
    assert MultiBrier(axis=axis)(preds, targs) == pytest.approx(brier, rel=1e-12)
    assert NLL(axis=axis)(preds, targs) == pytest.approx(nll, rel=1e-12)
    probs = F.softmax(preds.double(), axis)                # probabilities give the same values
    assert MultiBrier(axis=axis)(probs, targs) == pytest.approx(brier, rel=1e-9)
    assert NLL(axis=axis)(probs, targs) == pytest.approx(nll, rel=1e-9)

# ---------------------------------------------------------------- temperature scaling
@pytest.mark.parametrize('t_true', [0.5, 1.7, 3.0])
def test_temperature_recovers_known_T(t_true):
    # labels are drawn from softmax(z): z is calibrated, so the logits z*t_true need T = t_true.
    g = torch.Generator().manual_seed(int(t_true*10))
    z = torch.randn(20000, 10, generator=g, dtype=torch.float64)*1.5
    y = torch.multinomial(F.softmax(z, 1), 1, generator=g)[:, 0]
    logits = z*t_true
    T = fit_temperature(logits.float(), y)
    # MLE of beta = 1/T: standard error from the Fisher information sum_i Var_{k~p_i}(logit_ik) at the true beta
    p = F.softmax(logits/t_true, 1)
    info = ((p*logits**2).sum(1) - (p*logits).sum(1)**2).sum()
    se = 1/info.sqrt().item()
    assert abs(1/T - 1/t_true) < 5*se, (T, t_true, se)
    assert fit_temperature(logits.float(), y) == T  # deterministic

@pytest.mark.parametrize('seed', range(6))
def test_temperature_never_raises_nll(seed):
    g = torch.Generator().manual_seed(seed)
    n = [3, 10, 50, 200, 1000, 5000][seed]
    logits = torch.randn(n, 5, generator=g)*(seed+1)
    y = torch.randint(0, 5, (n,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tiny sets may hit the search bounds
        T = fit_temperature(logits, y)
    nll = lambda t: F.cross_entropy(logits.double()/t, y).item()
    assert T > 0 and nll(T) <= nll(1.)
    if 1e-2*1.01 < T < 1e2/1.01: assert nll(T) <= min(nll(T*1.01), nll(T/1.01)) + 1e-12  # a minimum, not just better

def test_temperature_separable_warns():
    logits = torch.eye(3).repeat(10, 1)*5
    with pytest.warns(UserWarning, match='edge of'):
        T = fit_temperature(logits, torch.arange(3).repeat(10))
    assert T == pytest.approx(1e-2, rel=1e-3)

# ---------------------------------------------------------------- a real Learner
@pytest.fixture(scope='module')
def digits_learn():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)/16
    dblock = DataBlock(blocks=(TransformBlock, CategoryBlock), get_x=lambda i: x[i], get_y=lambda i: int(y[i]),
                       splitter=RandomSplitter(0.3, seed=0))
    dls = dblock.dataloaders(range(len(y)), bs=64, device='cpu')
    set_seed(0)
    learn = Learner(dls, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), loss_func=CrossEntropyLossFlat(),
                    metrics=[ECE(), ECE(adaptive=True), ECE(classwise=True), MCE(), MultiBrier(), NLL()])
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2)
    return learn

def test_learner_one_batch_vs_many(digits_learn):
    learn = digits_learn
    n = len(learn.dls.valid_ds)
    with learn.no_bar():
        whole = learn.validate(dl=learn.dls.valid.new(bs=n))
        small = learn.validate(dl=learn.dls.valid.new(bs=8))   # n is not a multiple of 8: a ragged last batch
        probs, targs = learn.get_preds()
    assert n % 8 and len(whole) == 7
    for a, b in zip(whole, small): assert a == pytest.approx(b, abs=1e-6)
    # the metrics inside `validate` (logits) equal the metrics on `get_preds` output (probabilities)
    for m, v in zip(learn.metrics, whole[1:]): assert m(probs, targs) == pytest.approx(v, abs=1e-6)
    assert whole[-1] == pytest.approx(whole[0], rel=1e-5)  # NLL is the validation CE loss

class FakeDDL(DistributedDL):
    "`DistributedDL` for one of 2 simulated processes: `gathered` holds what the other process contributes"
    gathered = {}
    def _broadcast(self, t, rank): return t
    def _to_detach(self, b, cpu=True, gather=True):
        b = to_detach(b, cpu, gather=False)
        if self.rank == 1: FakeDDL.gathered[1] = b; return b
        assert all(o.shape == p.shape for o, p in zip(b, FakeDDL.gathered[1])), 'all_gather needs equal shapes'
        return tuple(torch.cat([o, p]) for o, p in zip(b, FakeDDL.gathered[1]))

def test_distributed_gathering_drops_padding(digits_learn):
    # two "processes" see halves of the validation set, padded to equal length by `DistributedDL`; rank 0's metrics, fed
    # the gathered per-item statistics through `DistributedDL.to_detach`, must equal the single-process values.
    # Class 3 is ignored, so masking before gathering would give ranks unequal shapes.
    ign = lambda y: torch.where(y == 3, -100, y)
    learn = digits_learn
    dl = learn.dls.valid.new(bs=10, shuffle=False)
    ddls = [FakeDDL(dl, rank=r, world_size=2) for r in (0, 1)]
    mk = [lambda: ECE(), lambda: ECE(adaptive=True), lambda: ECE(classwise=True), lambda: MultiBrier(), lambda: NLL()]
    mets = [f() for f in mk]
    for m in mets: m.reset()
    model = learn.model.eval()
    with torch.no_grad():
        for b0, b1 in zip(*ddls):
            for f, m in zip(mk, mets):
                f().accum_values(model(b1[0]), ign(b1[1]), SimpleNamespace(to_detach=ddls[1].to_detach))  # fills `gathered`
                m.accumulate(SimpleNamespace(pred=model(b0[0]), y=ign(b0[1]), to_detach=ddls[0].to_detach))
    assert ddls[0].n_padded > ddls[0].n == len(dl.dataset)  # there was padding to drop
    with learn.no_bar(): logits, targs = learn.get_preds(dl=dl, act=noop)
    for f, m in zip(mk, mets): assert m.value == pytest.approx(f()(logits, ign(targs)), abs=1e-9)

# ---------------------------------------------------------------- temperature scaling on a Learner
def test_learner_temperature_scale(digits_learn):
    learn = digits_learn
    with learn.no_bar():
        raw, targs = learn.get_preds(act=noop)
        before = learn.validate()
        T = learn.temperature_scale()
        try:
            assert T == fit_temperature(raw, targs)
            after = learn.validate()
            assert after[0] <= before[0] and after[-1] == pytest.approx(after[0], rel=1e-5)
            probs, _ = learn.get_preds()
            assert torch.allclose(probs, F.softmax(raw/T, 1), atol=1e-6)
            x, y = learn.dls.valid_ds[0]
            _, _, p = learn.predict(x)
            assert torch.allclose(p, probs[0], atol=1e-6)
            assert learn.temperature_scale() == pytest.approx(T)      # refit ignores the installed T, updates it
            assert len([c for c in learn.cbs if isinstance(c, TemperatureScaling)]) == 1
        finally: learn.remove_cb(TemperatureScaling)
    assert torch.allclose(learn.get_preds(act=noop)[0], raw)

# ---------------------------------------------------------------- figures
def synthetic(n=5000, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g)*1.5
    return z, torch.multinomial(F.softmax(z, 1), 1, generator=g)[:, 0]

def png(fig, dpi=100):
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi)
    return buf.getvalue()

def test_reliability_png():
    z, y = synthetic()
    fig = reliability_diagram({'calibrated': z, 'over-confident': (2*z, y), 'under-confident': z/2}, y, title='Synthetic')
    assert matplotlib.get_backend().lower() == 'agg'
    data = png(fig)
    img = Image.open(io.BytesIO(data))
    assert img.size == (1020, 430)   # three models: one panel each, 3.4 × 4.3 inches at 100 dpi
    assert 20_000 < len(data) < 1_000_000
    assert np.asarray(img.convert('L')).std() > 20  # not blank
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    eces = {k: ECE()(p, y) for k, p in (('calibrated', z), ('over-confident', 2*z), ('under-confident', z/2))}
    assert titles == [f'{k}\nECE {v:.4f}' for k, v in eces.items()]
    assert eces['over-confident'] > 5*eces['calibrated']
    overlay = reliability_diagram({k: p for k, p in (('calibrated', z), ('over-confident', 2*z))}, y, panels=False)
    assert Image.open(io.BytesIO(png(overlay))).size == (600, 650)
    assert overlay.axes[0].get_title() == '\n'.join(f'{k}: ECE {eces[k]:.4f}' for k in ('calibrated', 'over-confident'))

def test_plot_reliability(digits_learn):
    with digits_learn.no_bar(): fig = digits_learn.plot_reliability(n_bins=10, title='digits')
    probs, targs = digits_learn.get_preds()
    assert f'{ECE(10)(probs, targs):.4f}' in fig.axes[0].get_title()
    assert Image.open(io.BytesIO(png(fig))).size == (600, 650)

# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    z, y = synthetic(100, 4)
    p = F.softmax(z, 1)
    for cls in (ECE, MultiBrier, NLL):
        with pytest.raises(ValueError, match=r'declared probabilities.*sum to 0\.8'): cls(from_logits=False)(p*.8, y)
    with pytest.raises(ValueError, match=r'declared probabilities.*outside \[0, 1\]'): ECE(from_logits=False)(z, y)
    with pytest.raises(ValueError, match=r'`targs` shape \(99,\) does not match .* expected \(100,\)'): NLL()(z, y[:99])
    with pytest.raises(ValueError, match=r'expected \(100,\)'): reliability_diagram(z, y[None])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f'`n_bins` must be a positive integer, got {bad!r}'): ECE(bad)
    with pytest.raises(ValueError, match='positive integer, got 0'): reliability_diagram(z, y, n_bins=0)
    with pytest.raises(ValueError, match=r'outside \[0, 4\)'): ECE()(z, y+4)
    with pytest.raises(ValueError, match='needs logits'): fit_temperature(p, y)
    with pytest.raises(ValueError, match='t_min=2'): fit_temperature(z, y, t_min=2, t_max=1)
    with pytest.raises(ValueError, match='`targs` are needed'): fit_temperature(z)
    assert _prob_violation(p) is None

# ---------------------------------------------------------------- malformed but legitimate inputs
@pytest.mark.parametrize('n_bins', [np.int64(7), np.int32(7), np.uint8(7), torch.tensor(7)])
def test_n_bins_any_integral_number(n_bins):
    z, y = synthetic(500, 4)
    assert ECE(n_bins)(z, y) == ECE(7)(z, y) and type(ECE(n_bins).n_bins) is int
    assert MCE(n_bins)(z, y) == MCE(7)(z, y)
    assert calibration_bins(F.softmax(z, 1).max(1).values, torch.ones(500), n_bins)[1].shape == (7,)
    assert 'ECE' in reliability_diagram(z, y, n_bins=n_bins).axes[0].get_title()

@pytest.mark.parametrize('bad', [7., np.float64(7), np.True_, '7', None])
def test_n_bins_refuses_floats_and_bools(bad):
    with pytest.raises(ValueError, match='`n_bins` must be a positive integer'): ECE(bad)

def test_probabilities_with_rounding_noise():
    "Probabilities that pass the check within its tolerance (entries of -1e-7 and 1+1e-7) give finite metrics"
    g = torch.Generator().manual_seed(0)
    p = F.softmax(torch.randn(200, 5, generator=g, dtype=torch.float64)*8, 1).float()
    y = torch.randint(0, 5, (200,), generator=g)
    p[:50] = F.one_hot(y[:50], 5).float()                         # confident and right
    p[50:60] = F.one_hot((y[50:60]+1) % 5, 5).float()               # confident and wrong: 0 on the target
    noise = torch.where(p == 0, -1e-7, torch.where(p == 1, 1e-7, 0.))
    noisy = p + noise
    assert (noisy < 0).any() and (noisy > 1).any() and _prob_violation(noisy) is None
    # float64 reference by hand: clamp to [0, 1], and the log at float32's smallest normal number
    pc = np.clip(noisy.double().numpy(), 0, 1)
    logp = np.log(np.maximum(pc, np.finfo(np.float32).tiny))
    nll = -logp[np.arange(200), y.numpy()].mean()
    brier = ((pc - np.eye(5)[y.numpy()])**2).sum(1).mean()
    for fl in (None, False):
        assert NLL(from_logits=fl)(noisy, y) == pytest.approx(nll, rel=1e-12) and math.isfinite(nll)
        assert MultiBrier(from_logits=fl)(noisy, y) == pytest.approx(brier, rel=1e-12)
        assert ECE(from_logits=fl)(noisy, y) == pytest.approx(ECE()(p, y), abs=1e-6)
    # an exact 0 on the target gives the same finite value as its noisy version
    assert NLL()(p, y) == pytest.approx(nll, rel=1e-12)

@pytest.mark.parametrize('T', [0, -1., float('inf'), -float('inf'), float('nan'), torch.tensor(float('inf'))])
def test_temperature_scaling_refuses_bad_T(T):
    with pytest.raises(ValueError, match='`T` must be finite and > 0'): TemperatureScaling(T)

def test_fit_temperature_tiny_tol_returns():
    "tol=0 or below float resolution: the search stops at float resolution instead of looping forever"
    import threading
    z, y = synthetic(2000, 10)
    res = {}
    def fit():
        for t in (1e-7, 0, 1e-17, 1e-300): res[t] = fit_temperature(2*z, y, tol=t)
    th = threading.Thread(target=fit, daemon=True)  # daemon: a regression fails here rather than hang the suite
    th.start(); th.join(60)
    assert not th.is_alive(), f"fit_temperature did not return: {res}"
    T = res[1e-7]
    assert 1.5 < T < 2.5 and all(res[t] == pytest.approx(T, rel=1e-6) for t in (0, 1e-17, 1e-300))

def test_fit_temperature_uninformative_inputs():
    z, y = synthetic(300, 5)
    for logits, targs, msg in [(z[:0], y[:0], 'the logits are empty'),
                               (z, torch.full_like(y, -100), 'every target is `ignore_index`=-100'),
                               (z.where(torch.arange(300)[:, None] != 7, float('nan')), y, r'1 of the 300 items have NaN'),
                               (z.where(torch.arange(300)[:, None] != 7, float('inf')), y, 'needs finite logits'),
                               (torch.full_like(z, float('nan')), y, 'did training diverge')]:
        with pytest.raises(ValueError, match=msg) as e: fit_temperature(logits, targs)
        assert 'probabilities' not in str(e.value)
    with pytest.raises(ValueError, match='`tol` must be >= 0'): fit_temperature(z, y, tol=float('nan'))
    with pytest.raises(ValueError, match='t_max=inf'): fit_temperature(z, y, t_max=float('inf'))
    # the NLL of equal logits does not depend on T: T = 1, and no warning about the edge of the search
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for c in (0., 3., -1e4): assert fit_temperature(torch.full_like(z, c), y) == 1.
        # items with equal logits mixed with informative ones: the fit is that of the informative ones alone
        mixed = torch.cat([z, torch.zeros_like(z)])
        assert fit_temperature(mixed, torch.cat([y, y])) == pytest.approx(fit_temperature(z, y), rel=1e-5)

# ---------------------------------------------------------------- properties over malformed but legitimate inputs
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), c=st.integers(2, 7), sharp=st.floats(0, 60),
       noise=st.floats(0, 1e-4), dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_noisy_probabilities_property(seed, n, c, sharp, noise, dtype):
    "Probabilities within the check's tolerance, at any sharpness (exact 0s and 1s) and dtype: finite, and as computed by hand"
    g = torch.Generator().manual_seed(seed)
    p = F.softmax(torch.randn(n, c, generator=g, dtype=torch.float64)*sharp, 1)
    y = torch.randint(0, c, (n,), generator=g)
    noisy = (p + (torch.rand(n, c, generator=g, dtype=torch.float64)*2-1)*noise).to(dtype)
    if _prob_violation(noisy) is not None: return  # rounding to a low precision can leave the tolerance
    ref_p = np.clip(noisy.double().numpy(), 0, 1)
    tiny = np.finfo(np.float64 if dtype == torch.float64 else np.float32).tiny
    nll = -np.log(np.maximum(ref_p, tiny))[np.arange(n), y.numpy()].mean()
    brier = ((ref_p - np.eye(c)[y.numpy()])**2).sum(1).mean()
    assert NLL(from_logits=False)(noisy, y) == pytest.approx(nll, rel=1e-9)
    assert MultiBrier(from_logits=False)(noisy, y) == pytest.approx(brier, rel=1e-9, abs=1e-12)
    for m in (ECE(from_logits=False), ECE(np.int64(4), adaptive=True, from_logits=False), ECE(classwise=True, from_logits=False)):
        assert 0 <= m(noisy, y) <= 1

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 60), c=st.integers(2, 6), scale=st.floats(0, 50),
       shift=st.sampled_from([0., -7., 1e4, 1e7]), n_const=st.integers(0, 5), tol=st.sampled_from([0., 1e-12, 1e-7, 1e-2]))
def test_fit_temperature_property(seed, n, c, scale, shift, n_const, tol):
    "Any finite logits (shifted, flat, constant rows) and tol: T in [t_min, t_max], and never a higher NLL than T=1"
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64)*scale + shift
    z[:n_const] = shift   # items whose logits are all equal
    y = torch.randint(0, c, (n,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tiny or separable sets may hit the search bounds
        T = fit_temperature(z, y, tol=tol)
    nll = lambda t: F.cross_entropy(z/t, y).item()
    assert 1e-2 <= T <= 1e2 and nll(T) <= nll(1.)
    if (z == z[:, :1]).all(): assert T == 1.

# ---------------------------------------------------------------- multi-label outputs
from sklearn.metrics import brier_score_loss
from fastai.basics import DataLoaders, accuracy_multi

def multilabel_data(n=3000, c=6, seed=0, scale=0.6):
    "Logits and labels drawn from sigmoid(scale*logits): miscalibrated on purpose unless scale is 1"
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64)*2
    return z, torch.bernoulli(torch.sigmoid(z*scale), generator=g)

@pytest.mark.parametrize('seed,n_bins', [(0, 15), (1, 10), (2, 7)])
def test_multilabel_ece_matches_sklearn(seed, n_bins):
    z, y = multilabel_data(seed=seed)
    p = torch.sigmoid(z).numpy()
    ece, mce = sk_ece(y.numpy().ravel(), p.ravel(), n_bins)   # every (item, label) pair, pooled
    assert ece > 0.02
    for preds in (z, torch.sigmoid(z), torch.sigmoid(z).float()):
        assert ECE(n_bins, multilabel=True)(preds, y) == pytest.approx(ece, abs=1e-6 if preds.dtype == torch.float32 else 1e-10)
        assert MCE(n_bins, multilabel=True)(preds, y) == pytest.approx(mce, abs=1e-6 if preds.dtype == torch.float32 else 1e-10)
    per_label = np.mean([sk_ece(y[:, k].numpy(), p[:, k], n_bins)[0] for k in range(6)])
    assert ECE(n_bins, classwise=True, multilabel=True)(z, y) == pytest.approx(per_label, abs=1e-10)
    # a calibrated model scores far lower
    zc, yc = multilabel_data(seed=seed, scale=1.)
    assert ECE(n_bins, multilabel=True)(zc, yc) < ece/3

@pytest.mark.parametrize('axis', [1, -1])
def test_multilabel_brier_nll_float64(axis):
    "(N, C, T) outputs with ignored pairs, against sklearn's Brier score and the float64 binary cross-entropy by hand"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 5, 7, generator=g)*3
    targs = torch.bernoulli(torch.full((20, 5, 7), 0.3), generator=g)
    targs[::3, 2] = -100
    preds, t = (logits, targs) if axis == 1 else (logits.movedim(1, -1), targs.movedim(1, -1))
    keep = (targs != -100).numpy()
    z, y = logits.double().numpy()[keep], targs.numpy()[keep]
    p = 1/(1 + np.exp(-z))
    brier = brier_score_loss(y, p)
    nll = -(y*np.log(p) + (1-y)*np.log(1-p)).mean()
    assert MultiBrier(axis=axis, multilabel=True)(preds, t) == pytest.approx(brier, rel=1e-12)
    assert NLL(axis=axis, multilabel=True)(preds, t) == pytest.approx(nll, rel=1e-10)
    assert NLL(axis=axis, multilabel=True)(preds, t) == pytest.approx(F.binary_cross_entropy_with_logits(logits.double()[targs != -100], targs.double()[targs != -100]).item(), rel=1e-12)
    probs = torch.sigmoid(preds.double())                    # probabilities give the same values
    assert MultiBrier(axis=axis, multilabel=True)(probs, t) == pytest.approx(brier, rel=1e-9)
    assert NLL(axis=axis, multilabel=True)(probs, t) == pytest.approx(nll, rel=1e-9)
    # soft targets: the same formulas with fractional y
    ts = torch.where(targs == -100, targs, torch.rand(20, 5, 7, generator=g))
    ys = ts.numpy()[keep]
    assert MultiBrier(multilabel=True)(logits, ts) == pytest.approx(((p - ys)**2).mean(), rel=1e-12)
    assert NLL(multilabel=True)(logits, ts) == pytest.approx(-(ys*np.log(p) + (1-ys)*np.log(1-p)).mean(), rel=1e-10)

def test_multilabel_extreme_logits_finite():
    z = torch.tensor([[1e4, -1e4, 0.], [-3e4, 3e4, 30.]])
    y = torch.tensor([[0., 1., 1.], [1., 0., 1.]])
    assert NLL(multilabel=True)(z, y) == pytest.approx((1e4 + 1e4 + math.log(2) + 3e4 + 3e4 + math.log1p(math.exp(-30)))/6, rel=1e-12)
    assert NLL(multilabel=True)(z, (z > 0).float()) == pytest.approx((math.log(2) + math.log1p(math.exp(-30)))/6, rel=1e-12)
    for m in (ECE(multilabel=True), MultiBrier(multilabel=True)): assert math.isfinite(m(z, y))

def test_multilabel_logit_detection_on_all_batches():
    "One batch of logits that all lie in [0, 1] must not be read as probabilities when the others are clearly logits"
    z, y = multilabel_data(300, 4, seed=5)
    z[:10] = torch.rand(10, 4, dtype=torch.float64)   # a batch whose logits happen to lie in [0, 1]
    for m in (ECE(multilabel=True), MultiBrier(multilabel=True), NLL(multilabel=True)):
        m.reset()
        for i in range(0, 300, 10): m.accum_values(z[i:i+10], y[i:i+10])
        assert m.value == pytest.approx(type(m)(multilabel=True, from_logits=True)(z, y), abs=1e-12)
        assert m.value != pytest.approx(type(m)(multilabel=True)(z[:10], y[:10]), abs=1e-12)
    # probabilities everywhere are read as probabilities, declared or not
    p = torch.sigmoid(z)
    assert MultiBrier(multilabel=True)(p, y) == pytest.approx(MultiBrier(multilabel=True, from_logits=False)(p, y), abs=0)

def test_multilabel_bad_inputs():
    z, y = multilabel_data(50, 4)
    with pytest.raises(ValueError, match=r'must have the shape of `preds` \(50, 4\) \(one target per label\), got \(50,\)'): ECE(multilabel=True)(z, y[:, 0])
    with pytest.raises(ValueError, match=r'must lie in \[0, 1\] or be `ignore_index`=-100, got 2.0'): MultiBrier(multilabel=True)(z, y*2)
    with pytest.raises(ValueError, match='got nan'): NLL(multilabel=True)(z, y.where(y == 0, float('nan')))
    with pytest.raises(ValueError, match=r'declared probabilities.*outside \[0, 1\]'): ECE(multilabel=True, from_logits=False)(z, y)
    with pytest.raises(ValueError, match='batch axis'): ECE(multilabel=True, axis=0)(z, y)
    with pytest.raises(TypeError, match='floating point'): ECE(multilabel=True)(y.long(), y)
    with pytest.raises(ValueError, match='must have the shape of `preds`'): reliability_diagram(z, y[:, :3], multilabel=True)
    # targets of -1 mark unknown labels when asked to: those pairs are left out
    yi = y.clone(); yi[:, 0] = -1
    assert MultiBrier(multilabel=True, ignore_index=-1)(z, yi) == pytest.approx(MultiBrier(multilabel=True)(z[:, 1:], y[:, 1:]), rel=1e-12)
    # every pair of a label ignored: the per-label mean skips it
    assert ECE(classwise=True, multilabel=True, ignore_index=-1)(z, yi) == pytest.approx(ECE(classwise=True, multilabel=True)(z[:, 1:], y[:, 1:]), rel=1e-12)

@pytest.fixture(scope='module')
def digits_multilabel_learn():
    "A multi-label Learner on sklearn's digits: 12 labels per image (odd, at least 5, and the digit one-hot)"
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32)/16, torch.tensor(y)
    t = torch.cat([torch.stack([y % 2 == 1, y >= 5], 1), F.one_hot(y, 10).bool()], 1).float()
    ds = lambda s: list(zip(x[s], t[s]))
    dls = DataLoaders.from_dsets(ds(slice(401, None)), ds(slice(0, 401)), bs=64, device='cpu')
    set_seed(0)
    learn = Learner(dls, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 12)), loss_func=nn.BCEWithLogitsLoss(),
                    metrics=[accuracy_multi, ECE(multilabel=True), ECE(multilabel=True, classwise=True, adaptive=True),
                             MultiBrier(multilabel=True), NLL(multilabel=True)])
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2)
    return learn

def test_multilabel_learner_metrics(digits_multilabel_learn):
    learn = digits_multilabel_learn
    with learn.no_bar():
        whole = learn.validate(dl=learn.dls.valid.new(bs=401))
        small = learn.validate(dl=learn.dls.valid.new(bs=7))   # 401 is not a multiple of 7: a ragged last batch
        logits, targs = learn.get_preds(act=noop)
    for a, b in zip(whole, small): assert a == pytest.approx(b, abs=1e-6)
    assert whole[1] > 0.9   # it learned something
    assert [m.name for m in learn.metrics[1:]] == ['multilabel_ece', 'multilabel_classwise_adaptive_ece', 'multilabel_brier', 'multilabel_nll']
    # inside `validate` the metrics saw logits; on probabilities they give the same values
    for m, v in zip(learn.metrics[1:], whole[2:]): assert m(torch.sigmoid(logits), targs) == pytest.approx(v, abs=1e-6)
    assert whole[-1] == pytest.approx(whole[0], rel=1e-5)  # NLL is the validation BCE loss

def test_multilabel_distributed_gathering_drops_padding(digits_multilabel_learn):
    "As for the multi-class metrics: two simulated processes, padded batches, ignored pairs, gathered per-item statistics"
    ign = lambda y: torch.where(torch.arange(12) == 3, -100., y)
    learn = digits_multilabel_learn
    dl = learn.dls.valid.new(bs=9, shuffle=False)
    ddls = [FakeDDL(dl, rank=r, world_size=2) for r in (0, 1)]
    mk = [lambda: ECE(multilabel=True), lambda: ECE(multilabel=True, classwise=True), lambda: MultiBrier(multilabel=True), lambda: NLL(multilabel=True)]
    mets = [f() for f in mk]
    model = learn.model.eval()
    with torch.no_grad():
        for b0, b1 in zip(*ddls):
            for f, m in zip(mk, mets):
                f().accum_values(model(b1[0]), ign(b1[1]), SimpleNamespace(to_detach=ddls[1].to_detach))  # fills `gathered`
                m.accumulate(SimpleNamespace(pred=model(b0[0]), y=ign(b0[1]), to_detach=ddls[0].to_detach))
    assert ddls[0].n_padded > ddls[0].n == len(dl.dataset)
    with learn.no_bar(): logits, targs = learn.get_preds(dl=dl, act=noop)
    for f, m in zip(mk, mets): assert m.value == pytest.approx(f()(logits, ign(targs)), abs=1e-9)

def test_multilabel_reliability_png(digits_multilabel_learn):
    z, y = multilabel_data(2000, 8, scale=1.)
    fig = reliability_diagram({'calibrated': z, 'over-confident': 3*z}, y, multilabel=True, title='Synthetic')
    img = Image.open(io.BytesIO(png(fig)))
    assert img.size == (600, 650) and np.asarray(img.convert('L')).std() > 20
    title = fig.axes[0].get_title()
    for k, p in (('calibrated', z), ('over-confident', 3*z)): assert f'{k}: ECE {ECE(multilabel=True)(p, y):.4f}' in title
    assert fig.axes[0].get_ylabel() == 'Fraction of positives'
    with digits_multilabel_learn.no_bar(): fig = digits_multilabel_learn.plot_reliability(multilabel=True, n_bins=10)
    probs, targs = digits_multilabel_learn.get_preds()
    assert f'{ECE(10, multilabel=True)(probs, targs):.4f}' in fig.axes[0].get_title()
