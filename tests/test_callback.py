"Tests of `AnnealSmoothing` with real fastai `Learner`s on real data (sklearn digits, the pet sample)"
import math, pickle
import cloudpickle, pytest, torch, torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from fastcore.basics import store_attr
from fastai.callback.core import (Callback, CancelBatchException, CancelTrainException, CancelValidException,
                                  CancelEpochException, CancelFitException)
from fastai.callback.mixup import MixUp, CutMix
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import SchedNo, SchedLin, SchedPoly, combine_scheds
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner, load_learner
from fastai.losses import (BaseLoss, CrossEntropyLossFlat, LabelSmoothingCrossEntropy,
                           LabelSmoothingCrossEntropyFlat)
from fastai.metrics import accuracy
from fastai.vision.all import ImageDataLoaders, Resize, get_image_files, resnet18, vision_learner
from fastai_ls.losses import LabelSmoothingCE, LabelSmoothingCEFlat
from fastai_ls.callback import *
from fastai_ls.callback import _find_eps_loss
from conftest import digits_dls

EPS0 = 0.05  # the loss's own ε: whatever a fit does, it must be back to this afterwards

def cos_ref(start, end): return lambda p: end + (start - end) * (1 + math.cos(math.pi * p)) / 2

def mlp(): return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

def cnn(): return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))

def mk_learner(loss=None, cbs=None, dls=None, model=None, **kwargs):
    torch.manual_seed(0)
    learn = Learner(dls or digits_dls(), model or mlp(), loss_func=LabelSmoothingCE(EPS0) if loss is None else loss,
                    cbs=cbs, lr=3e-3, **kwargs)
    return learn.remove_cb(ProgressCallback)

def n_iter(learn): return len(learn.dls.train)

def expected_pcts(n_it, n_epoch): return [(e + i / n_it) / n_epoch for e in range(n_epoch) for i in range(n_it)]

class Spy(Callback):
    "For every training batch: pct_train, the ε the loss holds, fastai's loss and an independent reference loss"
    order,run_valid = 90,False
    def __init__(self, loss, ref_eps=None): self.loss_,self.ref_eps,self.rows = loss,ref_eps,[]
    def after_loss(self):
        pct, ref = self.learn.pct_train, None
        if self.ref_eps is not None:
            pred, y = self.learn.pred.detach().float(), self.learn.yb[0]
            ce = lambda t: F.cross_entropy(pred, t, label_smoothing=self.ref_eps(pct), reduction='none')
            mix = getattr(self.learn, 'mix_up', None) or getattr(self.learn, 'cut_mix', None)
            ref = (torch.lerp(ce(mix.yb1[0]), ce(y), mix.lam) if mix else ce(y)).mean().item()
        self.rows.append((pct, float(self.loss_.eps), self.learn.loss.item(), ref))
    @property
    def pcts(self): return [r[0] for r in self.rows]
    @property
    def eps(self): return [r[1] for r in self.rows]

def check_clean(learn, loss):
    "The state after any fit: ε back, no `eps` column, no wrapper left on the learner"
    assert _find_eps_loss(loss).eps == EPS0
    assert 'eps' not in learn.metrics.attrgot('name')
    assert '_with_events' not in learn.__dict__

# ---------------------------------------------------------------- schedules

PCTS = [0., 0.1, 0.25, 0.5, 0.75, 0.9, 0.999]

@pytest.mark.parametrize('sched,formula,tol', [
    (eps_cos(0.2, 0.02), cos_ref(0.2, 0.02), 1e-12),
    (eps_linear(0.2, 0.02), lambda p: 0.2 + (0.02 - 0.2) * p, 1e-12),
    (eps_exp(0.2, 0.002), lambda p: math.exp((1 - p) * math.log(0.2) + p * math.log(0.002)), 1e-12),
    (eps_warmup(0.1, p=0.3, start=0.02), lambda p: 0.02 + 0.08 * min(p / 0.3, 1.), 1e-12),
    (eps_two_stage(0.1, p=0.4), lambda p: 0.1 * (p < 0.4), 1e-12),
    (SchedPoly(0.2, 0., 2), lambda p: 0.2 - 0.2 * p * p, 1e-12),
    # combine_scheds keeps its phase boundaries in float32
    (combine_scheds([0.5, 0.5], [SchedNo(0.1, 0.1), SchedLin(0.1, 0.)]), lambda p: 0.1 if p < 0.5 else 0.1 - 0.2 * (p - 0.5), 1e-8),
])
def test_schedule_formulas(sched, formula, tol):
    for p in PCTS: assert sched(p) == pytest.approx(formula(p), abs=tol), p

@pytest.mark.parametrize('p', [0.1, 0.3, 0.5, 0.7])
def test_two_stage_switches_exactly_at_p(p):
    f = eps_two_stage(0.15, p)
    assert f(math.nextafter(p, 0)) == 0.15 and f(p) == 0. and f(math.nextafter(p, 1)) == 0.

def test_two_stage_in_a_fit():
    "p=0.47 of 2x22 batches: batches with pct < 0.47 smooth, the first one at or after it does not"
    learn = mk_learner(cbs=(cb := AnnealSmoothing(eps_two_stage(0.1, 0.47))))
    learn.fit(2)
    pcts = expected_pcts(n_iter(learn), 2)
    assert cb.hps['eps'] == [0.1 if p < 0.47 else 0. for p in pcts]
    assert 0 < cb.hps['eps'].index(0.) < len(pcts)

def test_named_presets():
    assert set(EPS_SCHEDULES) == {'cos', 'linear', 'exp', 'warmup', 'two_stage'}
    for name, factory in EPS_SCHEDULES.items():
        cb = AnnealSmoothing(name)
        assert [cb.sched(p) for p in PCTS] == [factory()(p) for p in PCTS]
    with pytest.raises(ValueError, match="unknown ε schedule 'cosine'"): AnnealSmoothing('cosine')
    with pytest.raises(TypeError, match='callable'): AnnealSmoothing(0.1)
    with pytest.raises(ValueError, match=r'valid_eps=1.0 is outside \[0, 1\)'): AnnealSmoothing('cos', valid_eps=1.)

def test_public_names_do_not_shadow_fastai():
    import fastai_ls.callback as m
    ns = {}
    exec('from fastai.vision.all import *\nfrom fastai.text.all import *\nfrom fastai.tabular.all import *', ns)
    assert m.__all__ and not set(m.__all__) & set(ns)

@pytest.mark.parametrize('bad,shown', [
    (lambda p: 1.2, 'eps=1.2 at pct_train=0.0000'), (lambda p: float('nan'), 'eps=nan at pct_train=0.0000'),
    (lambda p: 0.1 if p < 0.5 else -0.1, 'eps=-0.1 at pct_train=0.5000'),   # the first batch of the 2nd epoch
    (lambda p: torch.tensor([0.1, 0.2]), 'returned tensor([0.1000, 0.2000]) at pct_train=0.0000; expected one number')])
def test_bad_schedule_output(bad, shown):
    learn = mk_learner(cbs=AnnealSmoothing(bad))
    with pytest.raises((ValueError, TypeError)) as e: learn.fit(2)
    assert shown in str(e.value)
    check_clean(learn, learn.loss_func)

# ---------------------------------------------------------------- the loss it drives

@pytest.mark.parametrize('method,kw', [('fit', {}), ('fit_one_cycle', {}), ('fit_flat_cos', {})])
def test_loss_follows_schedule(method, kw):
    "fastai's training loss equals F.cross_entropy at sched(pct) on every batch; the lr schedule is untouched"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[cb := AnnealSmoothing(eps_cos(0.2, 0.)), spy := Spy(loss, cos_ref(0.2, 0.))])
    getattr(learn, method)(2, **kw)
    assert spy.pcts == pytest.approx(expected_pcts(n_iter(learn), 2), abs=1e-9)
    assert spy.eps == pytest.approx([cos_ref(0.2, 0.)(p) for p in spy.pcts], abs=1e-12)
    assert [r[2] for r in spy.rows] == pytest.approx([r[3] for r in spy.rows], rel=1e-5)
    assert cb.hps['eps'] == spy.eps
    lrs = learn.recorder.lrs
    plain = mk_learner(LabelSmoothingCE(EPS0))
    getattr(plain, method)(2, **kw)
    assert lrs == plain.recorder.lrs
    check_clean(learn, loss)

@pytest.mark.parametrize('mk_loss', [
    lambda: LabelSmoothingCE(EPS0), lambda: LabelSmoothingCEFlat(eps=EPS0), lambda: BaseLoss(LabelSmoothingCE, eps=EPS0),
    lambda: LabelSmoothingCrossEntropy(EPS0), lambda: LabelSmoothingCrossEntropyFlat(eps=EPS0)])
def test_loss_wrappers(mk_loss):
    "ε reaches the loss that computes, also through `BaseLoss` (whose copied `eps` attribute is stale)"
    loss = mk_loss()
    learn = mk_learner(loss, cbs=[AnnealSmoothing(eps_linear(0.2, 0.)), spy := Spy(_find_eps_loss(loss), lambda p: 0.2 * (1 - p))])
    learn.fit(1)
    assert [r[2] for r in spy.rows] == pytest.approx([r[3] for r in spy.rows], rel=1e-5)
    check_clean(learn, loss)

def test_explicit_loss_overrides_search():
    inner = LabelSmoothingCE(EPS0)
    wrapped = lambda pred, y: inner(pred, y)   # a plain function: nothing to find in it
    learn = mk_learner(wrapped, cbs=[AnnealSmoothing('linear', loss=inner), spy := Spy(inner, lambda p: 0.1 * (1 - p))])
    learn.fit(1)
    assert [r[2] for r in spy.rows] == pytest.approx([r[3] for r in spy.rows], rel=1e-5)
    assert inner.eps == EPS0

def test_no_eps_loss_is_a_clear_error():
    learn = mk_learner(CrossEntropyLossFlat(), cbs=AnnealSmoothing('cos'))
    with pytest.raises(TypeError, match='found CrossEntropyLossFlat wrapping CrossEntropyLoss'): learn.fit(1)
    assert '_with_events' not in learn.__dict__

# ---------------------------------------------------------------- validation, table, history

def valid_tensors(learn): return map(torch.stack, zip(*learn.dls.valid_ds))

@pytest.mark.parametrize('valid_eps', [0.0, 0.07, None])
def test_valid_loss(valid_eps):
    "valid_loss is F.cross_entropy of the final model at valid_eps (None: at the last training ε)"
    learn = mk_learner(cbs=(cb := AnnealSmoothing(eps_cos(0.2, 0.05), valid_eps=valid_eps)))
    learn.fit(2)
    xv, yv = valid_tensors(learn)
    ls = cb.hps['eps'][-1] if valid_eps is None else valid_eps
    with torch.no_grad(): ref = F.cross_entropy(learn.model.eval()(xv), yv, label_smoothing=ls).item()
    assert learn.recorder.values[-1][1] == pytest.approx(ref, rel=1e-5)
    if valid_eps is not None:   # `validate` and `get_preds` outside a fit use valid_eps too, then put ε back
        assert learn.validate()[0] == pytest.approx(ref, rel=1e-5)
        assert learn.get_preds(with_loss=True)[2].mean().item() == pytest.approx(ref, rel=1e-5)
    check_clean(learn, learn.loss_func)

def test_tracker_callbacks_see_the_nll(tmp_path):
    learn = mk_learner(cbs=[AnnealSmoothing('cos'), EarlyStoppingCallback(monitor='valid_loss', patience=1),
                            SaveModelCallback(monitor='valid_loss', fname='best')], path=tmp_path)
    learn.fit(3)
    vl = [v[1] for v in learn.recorder.values]
    assert learn.save_model.best == pytest.approx(min(vl))
    xv, yv = valid_tensors(learn)   # the best model was loaded back: its NLL is the best valid_loss
    with torch.no_grad(): assert F.cross_entropy(learn.model.eval()(xv), yv).item() == pytest.approx(min(vl), rel=1e-5)

def test_eps_column_and_history():
    learn = mk_learner(cbs=(cb := AnnealSmoothing(eps_cos(0.2, 0.))), metrics=accuracy)
    learn.fit(3)
    names = list(learn.recorder.metric_names)
    assert names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'eps', 'time']
    n = n_iter(learn)
    assert cb.hps['eps'] == pytest.approx([cos_ref(0.2, 0.)(p) for p in expected_pcts(n, 3)], abs=1e-9)
    assert [v[names.index('eps') - 1] for v in learn.recorder.values] == [cb.hps['eps'][(e + 1) * n - 1] for e in range(3)]
    ax = cb.plot_sched()
    assert list(ax.lines[0].get_ydata()) == cb.hps['eps']
    assert learn.metrics.attrgot('name') == ['accuracy']
    learn = mk_learner(cbs=AnnealSmoothing('cos', show_eps=False))
    learn.fit(1)
    assert 'eps' not in learn.recorder.metric_names

# ---------------------------------------------------------------- restoring state

class Raise(Callback):
    "Raise `exc` at batch `at` of the first epoch's `phase` ('train' or 'valid'), or at its 'after_epoch'"
    order = 90
    def __init__(self, exc, phase, at=3): store_attr()
    def after_pred(self):
        if self.learn.epoch == 0 and self.phase == ('train' if self.learn.training else 'valid') and self.learn.iter == self.at:
            raise self.exc('injected')
    def after_epoch(self):
        if self.learn.epoch == 0 and self.phase == 'after_epoch': raise self.exc('injected')

class EpochEndEps(Callback):
    order = 90
    def __init__(self, loss): self.loss_,self.eps = loss,[]
    def after_epoch(self): self.eps.append(self.loss_.eps)

ENDS_FIT = (CancelFitException, KeyboardInterrupt, RuntimeError)

@pytest.mark.parametrize('exc,phase', [
    (CancelBatchException, 'train'), (CancelTrainException, 'train'), (CancelEpochException, 'train'),
    (CancelValidException, 'valid'), (CancelEpochException, 'valid'), (CancelFitException, 'train'),
    (CancelFitException, 'valid'), (KeyboardInterrupt, 'train'), (KeyboardInterrupt, 'valid'),
    (KeyboardInterrupt, 'after_epoch'), (RuntimeError, 'train')])
def test_state_restored(exc, phase):
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[cb := AnnealSmoothing(eps_cos(0.2, 0.)), Raise(exc, phase), end := EpochEndEps(loss)])
    if exc in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(exc): learn.fit(2)
    else: learn.fit(2)
    check_clean(learn, loss)
    h, n = cb.hps['eps'], n_iter(learn)
    if exc in ENDS_FIT: assert len(h) == (4 if phase == 'train' else n), len(h)
    else:   # training went on: the schedule held, and ε was the training ε again when each epoch ended
        cut = exc in (CancelTrainException, CancelEpochException) and phase == 'train'   # epoch 0 stops after batch 3
        pcts = [(e + i / n) / 2 for e in range(2) for i in range(n) if not (cut and e == 0 and i > 3)]
        assert h == pytest.approx([cos_ref(0.2, 0.)(p) for p in pcts], abs=1e-9)
        assert end.eps == [h[len(pcts) - n - 1], h[-1]]

class RaiseBeforeFit(Callback):
    "A later callback whose `before_fit` fails, after `AnnealSmoothing.before_fit` has run"
    order = 55
    def before_fit(self): raise RuntimeError('injected in before_fit')

def test_failure_in_a_later_before_fit_is_cleaned_up():
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[AnnealSmoothing('cos'), bad := RaiseBeforeFit()])
    with pytest.raises(RuntimeError, match='injected'): learn.fit(1)
    learn.remove_cb(bad)
    learn.fit(1)
    check_clean(learn, loss)
    assert learn.recorder.metric_names.count('eps') == 1

def test_keyboard_interrupt_in_standalone_validate():
    learn = mk_learner(cbs=[AnnealSmoothing('cos'), Raise(KeyboardInterrupt, 'valid')])
    with pytest.raises(KeyboardInterrupt): learn.validate()
    check_clean(learn, learn.loss_func)

def test_export_is_clean(tmp_path):
    learn = mk_learner(cbs=AnnealSmoothing('two_stage'), path=tmp_path)
    learn.fit(1)
    assert b'AnnealSmoothing' not in cloudpickle.dumps(learn.loss_func)
    learn.export('m.pkl')
    learn2 = load_learner(tmp_path/'m.pkl')
    assert isinstance(learn2.loss_func, LabelSmoothingCE) and learn2.loss_func.eps == EPS0
    assert learn2.anneal_smoothing.hps == {'eps': []} and learn2.anneal_smoothing.eps_loss is None
    assert learn2.loss_func.eps_t.dtype == torch.float64

# ---------------------------------------------------------------- fastai workflows

def test_fine_tune_runs_the_schedule_per_fit(pets_path):
    dls = ImageDataLoaders.from_name_re(pets_path, get_image_files(pets_path), r'^(.+)_\d+\.jpg$', item_tfms=Resize(64),
                                        bs=32, seed=42, valid_pct=0.2, num_workers=0)
    loss = LabelSmoothingCE(EPS0)
    torch.manual_seed(0)
    learn = vision_learner(dls, resnet18, pretrained=False, loss_func=loss,
                           cbs=[cb := AnnealSmoothing(eps_linear(0.2, 0.)), spy := Spy(loss, lambda p: 0.2 * (1 - p))])
    learn.remove_cb(ProgressCallback)
    learn.fine_tune(1, freeze_epochs=1)
    n = len(dls.train)
    assert spy.pcts == pytest.approx(expected_pcts(n, 1) * 2, abs=1e-9)   # two fits, each from pct 0
    assert spy.eps == pytest.approx([0.2 * (1 - p) for p in spy.pcts], abs=1e-12)
    assert [r[2] for r in spy.rows] == pytest.approx([r[3] for r in spy.rows], rel=1e-4)
    assert len(cb.hps['eps']) == n   # the history is the last fit's
    check_clean(learn, loss)

def test_lr_find_leaves_eps_alone(tmp_path):
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[cb := AnnealSmoothing('cos'), spy := Spy(loss)], path=tmp_path)
    learn.fit(1)
    h = list(cb.hps['eps']); spy.rows.clear()
    learn.lr_find(num_it=30, stop_div=False, show_plot=False)
    assert len(spy.rows) == 30 and set(spy.eps) == {EPS0}
    assert cb.hps['eps'] == h and 'eps' not in learn.recorder.metric_names
    check_clean(learn, loss)
    learn.fit(1)   # and the callback is back for the next fit
    assert cb.hps['eps'] == h

@pytest.mark.parametrize('mix', ['mixup', 'cutmix'])
def test_mixup_cutmix(mix):
    "MixUp/CutMix swap learn.loss_func; the loss still gets sched(pct), and their mixed loss matches the formula"
    loss = LabelSmoothingCE(EPS0)
    images = mix == 'cutmix'
    learn = mk_learner(loss, dls=digits_dls(images=images), model=cnn() if images else mlp(),
                       cbs=[AnnealSmoothing(eps_cos(0.2, 0.)), MixUp() if mix == 'mixup' else CutMix(), spy := Spy(loss, cos_ref(0.2, 0.))])
    learn.fit(2)
    assert spy.eps == pytest.approx([cos_ref(0.2, 0.)(p) for p in spy.pcts], abs=1e-12)
    assert [r[2] for r in spy.rows] == pytest.approx([r[3] for r in spy.rows], rel=1e-5)
    assert learn.loss_func is loss
    check_clean(learn, loss)

def test_gradient_accumulation():
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[cb := AnnealSmoothing(eps_cos(0.2, 0.)), GradientAccumulation(n_acc=128), spy := Spy(loss, cos_ref(0.2, 0.))])
    learn.fit(2)
    assert spy.pcts == pytest.approx(expected_pcts(n_iter(learn), 2), abs=1e-9)
    assert [r[2] for r in spy.rows] == pytest.approx([r[3] for r in spy.rows], rel=1e-5)
    assert cb.hps['eps'] == spy.eps
    check_clean(learn, loss)

@pytest.mark.parametrize('half', ['to_fp16', 'to_bf16'])
def test_half_precision(half):
    "On CPU MixedPrecision is inert, but the callback must run with it; the loss's half path is checked directly"
    loss = LabelSmoothingCE(EPS0)
    learn = getattr(mk_learner(loss, cbs=(cb := AnnealSmoothing(eps_cos(0.2, 0.)))), half)()
    learn.fit(1)
    check_clean(learn, loss)
    x, y = torch.randn(64, 10) * 4, torch.randint(0, 10, (64,))
    dt = torch.float16 if half == 'to_fp16' else torch.bfloat16
    for eps in cb.hps['eps'][::4]:
        loss.eps = eps
        xh = x.to(dt).requires_grad_()
        out = loss(xh, y)
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(F.cross_entropy(xh.float(), y, label_smoothing=eps).item(), rel=1e-6)
        out.backward()
        xf = xh.detach().float().requires_grad_()
        F.cross_entropy(xf, y, label_smoothing=eps).backward()
        assert xh.grad.dtype == dt and torch.allclose(xh.grad.float(), xf.grad, atol=1e-3)

@pytest.mark.cuda
def test_to_fp16_on_cuda():
    loss = LabelSmoothingCE(EPS0)
    dls = digits_dls(device='cuda')
    learn = mk_learner(loss, dls=dls, cbs=[cb := AnnealSmoothing(eps_cos(0.2, 0.)), spy := Spy(loss, cos_ref(0.2, 0.))]).to_fp16()
    learn.fit(2)
    assert spy.eps == pytest.approx([cos_ref(0.2, 0.)(p) for p in spy.pcts], abs=1e-12)
    assert [r[2] for r in spy.rows] == pytest.approx([r[3] for r in spy.rows], rel=1e-3)
    check_clean(learn, loss)

def test_compile_does_not_recompile_as_eps_moves():
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend('aot_eager')
    loss = LabelSmoothingCE(0.1)
    learn = mk_learner(torch.compile(loss, backend=cnt))
    learn.fit(1, cbs=AnnealSmoothing(SchedNo(0.1, 0.1), valid_eps=None))   # compiles training, no_grad validation, last batch
    n_frames = cnt.frame_count
    learn.fit(2, cbs=(cb := AnnealSmoothing(eps_cos(0.2, 0.))))   # a new ε every batch, and valid_eps=0 for validation
    assert len(set(cb.hps['eps'])) == len(cb.hps['eps']) > 40
    assert cnt.frame_count == n_frames
    assert loss.eps == 0.1

def test_compile_counter_sees_recompiles():
    "The counter used above does catch recompiles: fastai's loss keeps ε in a float that dynamo guards on"
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend('aot_eager')
    loss = LabelSmoothingCrossEntropy(0.1)
    f = torch.compile(loss, backend=cnt)
    x, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    f(x, y); n = cnt.frame_count
    loss.eps = 0.05; f(x, y)
    assert cnt.frame_count > n
