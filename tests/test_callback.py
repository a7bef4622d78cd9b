"Tests of `AnnealSmoothing` with real fastai `Learner`s on real data (sklearn digits, the pet sample)"
import math, pickle, threading
import cloudpickle, pytest, torch, torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from fastcore.basics import store_attr
from fastai.callback.core import (_events, Callback, CancelBatchException, CancelTrainException, CancelValidException,
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
from fastai_ls.callback import _find_eps_loss, _FitBracket
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
    "The state after any fit: ε back, no `eps` column, nothing on the learner but the fit bracket of an attached callback"
    assert _find_eps_loss(loss).eps == EPS0
    assert 'eps' not in learn.metrics.attrgot('name')
    attached = [cb for cb in learn.cbs if isinstance(cb, AnnealSmoothing)]
    we = learn.__dict__.get('_with_events')
    if attached: assert isinstance(we, _FitBracket) and we.cb is attached[0] and we.prev is None
    else: assert we is None

def within(f, seconds=60):
    "`f()` in a thread: its result, or its exception re-raised; still running after `seconds` is a failure, not a hang"
    res = {}
    def run():
        try: res['value'] = f()
        except BaseException as e: res['error'] = e
    t = threading.Thread(target=run, daemon=True)
    t.start(); t.join(seconds)
    if t.is_alive(): pytest.fail(f"still running after {seconds}s: a deadlock")
    if 'error' in res: raise res['error']
    return res['value']

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

def test_events_without_a_method_are_skipped_and_a_subclass_keeps_its_own(monkeypatch):
    "fastai's event lookup runs only for the events the class defines, a subclass's included; the schedule is unchanged"
    looked_up = []
    orig = Callback.__call__
    def spy_call(self, event_name):
        if isinstance(self, AnnealSmoothing): looked_up.append(event_name)
        return orig(self, event_name)
    monkeypatch.setattr(Callback, '__call__', spy_call)
    class Counting(AnnealSmoothing):
        def after_batch(self): self.seen = getattr(self, 'seen', 0) + 1
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[cb := Counting(eps_cos(0.2, 0.)), spy := Spy(loss)])
    learn.fit(1)
    assert cb.seen == n_iter(learn)   # training batches only: run_valid is False
    assert {'before_fit', 'before_batch', 'after_batch', 'after_fit'} <= set(looked_up) <= {e for e in _events if hasattr(Counting, e)}
    assert spy.eps == pytest.approx([cos_ref(0.2, 0.)(p) for p in spy.pcts], abs=1e-12)
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
    "Every time, in `fit`, `validate`, `get_preds` and `predict`, and never with `learn.lock` left held (the next call would hang)"
    learn = mk_learner(CrossEntropyLossFlat(), cbs=AnnealSmoothing('cos'))
    msg = 'found CrossEntropyLossFlat wrapping CrossEntropyLoss'
    for call in (learn.get_preds, learn.get_preds, learn.validate, lambda: learn.predict(learn.dls.valid_ds.items[0]),
                 lambda: learn.fit(1), learn.get_preds):
        with pytest.raises(TypeError, match=msg): within(call)
    assert not learn.lock.locked() and learn.logger is print and learn.create_mbar
    learn.remove_cb(learn.anneal_smoothing)
    preds, targs = within(learn.get_preds)
    assert preds.shape == (len(learn.dls.valid_ds), 10)

def test_no_eps_loss_without_valid_eps():
    "`valid_eps=None` leaves validation alone: no loss is needed outside a fit"
    learn = mk_learner(CrossEntropyLossFlat(), cbs=AnnealSmoothing('cos', valid_eps=None))
    xv, yv = valid_tensors(learn)
    with torch.no_grad(): assert within(learn.validate)[0] == pytest.approx(F.cross_entropy(learn.model.eval()(xv), yv).item(), rel=1e-5)
    with pytest.raises(TypeError, match='found CrossEntropyLossFlat'): learn.fit(1)

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

def raising(event, order):
    "A callback of `order` whose `event` raises a RuntimeError"
    def f(self): raise RuntimeError(f'injected in {event}')
    return type('Raising', (Callback,), {'order': order, event: f})()

def check_loaded(learn2, learn):
    "`learn2`, loaded from a file `learn` exported: `validate` (twice: no lock left held) and `predict` work, and clean up"
    xv, yv = valid_tensors(learn)
    with torch.no_grad(): nll = F.cross_entropy(learn2.model.eval()(xv), yv).item()
    for _ in range(2): assert within(lambda: learn2.validate(dl=learn.dls.valid)) == [pytest.approx(nll, rel=1e-5)]
    assert 'eps' not in learn2.recorder.metric_names
    check_clean(learn2, learn2.loss_func)
    assert within(lambda: learn2.predict(learn.dls.valid_ds.items[0]))[2].shape == (10,)
    check_clean(learn2, learn2.loss_func)

@pytest.mark.parametrize('mk_bad,exc', [
    (lambda: raising('before_fit', 55), RuntimeError),   # after AnnealSmoothing's `before_fit`
    (lambda: EarlyStoppingCallback(monitor='acuracy'), Exception),   # fastai's bare `assert` on the column, mangled by fastai
    (lambda: raising('after_fit', 0), RuntimeError),     # before AnnealSmoothing's `after_fit`
    (lambda: raising('after_fit', 90), RuntimeError),
    (lambda: [raising('after_cancel_fit', 0), Raise(CancelFitException, 'train')], RuntimeError)],
    ids=['before_fit', 'tracker_before_fit', 'after_fit_early', 'after_fit_late', 'after_cancel_fit'])
def test_another_callback_failing_where_fastai_calls_nothing_after(mk_bad, exc, tmp_path):
    "ε, the column and the learner as they were, at once; the Learner, exported in that state too, still works"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=(cb := AnnealSmoothing(eps_cos(0.2, 0.))), path=tmp_path)
    learn.add_cbs(bad := mk_bad())
    with pytest.raises(exc): learn.fit(1)
    check_clean(learn, loss)
    learn.remove_cbs(bad)
    learn.export('m.pkl')
    check_loaded(load_learner(tmp_path/'m.pkl'), learn)
    learn.fit(1)
    assert learn.recorder.metric_names.count('eps') == 1 and len(cb.hps['eps']) == n_iter(learn)
    check_clean(learn, loss)

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
    assert learn2.anneal_smoothing.hps == {'eps': []}
    assert learn2.loss_func.eps_t.dtype == torch.float64
    check_clean(learn2, learn2.loss_func)

class ExportMidFit(Callback):
    "Export the learner in the middle of the first epoch's training, or at its end"
    order = 90
    def __init__(self, when): self.when = when
    def after_batch(self):
        if self.when == 'batch' and self.training and self.epoch == 0 and self.iter == 5: self.learn.export('mid.pkl')
    def after_epoch(self):
        if self.when == 'epoch' and self.epoch == 0: self.learn.export('mid.pkl')

@pytest.mark.parametrize('when,first_use', [('batch', 'validate'), ('epoch', 'validate'), ('epoch', 'fit')])
def test_export_in_the_middle_of_a_fit(when, first_use, tmp_path):
    "The file holds the fit's ε and `eps` column, which the loaded Learner undoes on its first use"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[AnnealSmoothing(eps_cos(0.2, 0.)), spy := Spy(loss, cos_ref(0.2, 0.)), ExportMidFit(when)],
                       path=tmp_path)
    learn.fit(1)   # 'epoch' exports in its last `after_epoch`: still inside the fit
    assert len(spy.rows) == n_iter(learn) and spy.eps == pytest.approx([cos_ref(0.2, 0.)(p) for p in spy.pcts], abs=1e-12)   # undisturbed
    check_clean(learn, loss)
    learn2 = load_learner(tmp_path/'mid.pkl')
    assert learn2.loss_func.eps != EPS0 and 'eps' in learn2.metrics.attrgot('name')   # what the file holds
    learn2.remove_cbs([learn2.spy, learn2.export_mid_fit])
    learn2.dls = learn.dls
    if first_use == 'fit':
        learn2.fit(1, cbs=(spy2 := Spy(learn2.loss_func)))
        assert learn2.recorder.metric_names.count('eps') == 1
        assert spy2.eps == pytest.approx([cos_ref(0.2, 0.)(p) for p in expected_pcts(n_iter(learn), 1)], abs=1e-12)
    check_loaded(learn2, learn)
    learn2.fit(1)
    assert len(learn2.anneal_smoothing.hps['eps']) == n_iter(learn)
    check_clean(learn2, learn2.loss_func)

# ---------------------------------------------------------------- one per learner; validation inside and outside a fit

def test_one_anneal_smoothing_per_learner():
    "A second one is refused when it is added, and the Learner is left as it was"
    msg = r'already has an AnnealSmoothing \(`learn.anneal_smoothing`\)'
    with pytest.raises(ValueError, match=msg): mk_learner(cbs=[AnnealSmoothing('cos'), AnnealSmoothing('linear')])
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=(first := AnnealSmoothing(eps_cos(0.2, 0.))))
    n_cbs = len(learn.cbs)
    for add in (lambda: learn.add_cb(AnnealSmoothing('linear')), lambda: learn.add_cb(first),
                lambda: learn.fit(1, cbs=AnnealSmoothing('linear'))):
        with pytest.raises(ValueError, match=msg): add()
        assert len(learn.cbs) == n_cbs and learn.anneal_smoothing is first
        check_clean(learn, loss)
    learn.fit(1)
    assert learn.recorder.metric_names.count('eps') == 1
    assert first.hps['eps'] == pytest.approx([cos_ref(0.2, 0.)(p) for p in expected_pcts(n_iter(learn), 1)], abs=1e-12)
    learn.remove_cb(first)
    check_clean(learn, loss)
    learn.fit(1, cbs=(second := AnnealSmoothing(eps_linear(0.2, 0.))))   # after removing the first, another one is fine
    assert second.hps['eps'][0] == 0.2
    check_clean(learn, loss)

def test_the_fit_bracket_lives_while_attached():
    "`learn._with_events` is replaced only while the callback is attached, also when a fit with `cbs=` raises"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss)
    cb = AnnealSmoothing('cos')
    learn.fit(1, cbs=cb)
    assert cb.learn is None and '_with_events' not in learn.__dict__
    with pytest.raises(KeyboardInterrupt): learn.fit(1, cbs=[cb, Raise(KeyboardInterrupt, 'train')])
    assert cb.learn is None and '_with_events' not in learn.__dict__
    check_clean(learn, loss)
    learn.add_cb(cb)
    assert learn.__dict__['_with_events'].cb is cb
    learn.remove_cb(cb)
    assert '_with_events' not in learn.__dict__

class PredsInFit(Callback):
    "Calls `get_preds`/`validate` in the middle of a fit, as a callback computing its own metrics would"
    order = 90
    def __init__(self, event, call): self.call,self.results,self.refs,self.busy = call,[],[],False; setattr(self, event, self._run)
    def _run(self):
        if self.busy: return   # `get_preds`/`validate` call `after_epoch` too
        self.busy = True
        try:
            if self.call == 'validate': self.results.append(self.learn.validate())
            else: self.results.append(self.learn.get_preds(with_loss=True, inner=self.call == 'inner')[2])
        finally: self.busy = False
        xv, yv = valid_tensors(self.learn)
        with torch.no_grad(): ref = F.cross_entropy(self.learn.model.eval()(xv), yv, reduction='none')
        self.refs.append(ref.mean().item() if self.call == 'validate' else ref)

@pytest.mark.parametrize('event,call', [('after_epoch', 'get_preds'), ('after_epoch', 'validate'), ('after_train', 'inner'),
                                        ('after_epoch', 'inner')])
def test_get_preds_inside_a_fit(event, call):
    "The nested call gets `valid_eps`; the fit keeps its schedule and its column, and ends with the loss's ε"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[cb := AnnealSmoothing(eps_cos(0.2, 0.)), spy := Spy(loss, cos_ref(0.2, 0.)),
                                  nested := PredsInFit(event, call)])
    learn.logger = (logged := []).append   # the rows of the epoch table; `validate`/`get_preds` do not log
    learn.fit(2)
    assert spy.pcts == pytest.approx(expected_pcts(n_iter(learn), 2), abs=1e-9)
    assert spy.eps == pytest.approx([cos_ref(0.2, 0.)(p) for p in spy.pcts], abs=1e-12)
    assert len(nested.results) == 2
    if call == 'validate':   # the nested `validate` reports the fit's columns: the NLL, and the `eps` column
        assert nested.results == [[pytest.approx(ref, rel=1e-5), h] for ref, h in zip(nested.refs, cb.hps['eps'][n_iter(learn) - 1::n_iter(learn)])]
    else:
        for res, ref in zip(nested.results, nested.refs): assert res == pytest.approx(ref, rel=1e-4, abs=1e-6)   # the NLL
    # every row ends with the fit's validation, `eps`, then the time (fastai's Recorder also logs an inner `get_preds`)
    assert list(learn.recorder.metric_names[-2:]) == ['eps', 'time'] and len(logged) == 2
    assert [row[-2] for row in logged] == [cb.hps['eps'][n_iter(learn) - 1], cb.hps['eps'][-1]]
    check_clean(learn, loss)

class FailingPredsInFit(Callback):
    "Calls a `get_preds` that fails (a callback of its own raises) at the end of the first epoch, and carries on"
    order = 90
    def __init__(self, inner): self.inner,self.busy = inner,False
    def after_epoch(self):
        if self.busy or self.epoch: return
        self.busy = True
        try: self.learn.get_preds(cbs=Raise(RuntimeError, 'valid', at=2), inner=self.inner)
        except RuntimeError: pass
        finally: self.busy = False

@pytest.mark.parametrize('inner', [False, True])
def test_failing_get_preds_inside_a_fit(inner):
    "An exception that leaves a nested `get_preds`, and which its caller handles, does not end the fit's state"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[cb := AnnealSmoothing(eps_cos(0.2, 0.)), spy := Spy(loss, cos_ref(0.2, 0.)),
                                  FailingPredsInFit(inner)])
    learn.logger = (logged := []).append
    learn.fit(2)
    assert spy.eps == pytest.approx([cos_ref(0.2, 0.)(p) for p in spy.pcts], abs=1e-12) and len(spy.rows) == 2 * n_iter(learn)
    xv, yv = valid_tensors(learn)
    with torch.no_grad(): assert logged[-1][2] == pytest.approx(F.cross_entropy(learn.model.eval()(xv), yv).item(), rel=1e-5)
    assert logged[-1][3] == cb.hps['eps'][-1]
    check_clean(learn, loss)

class AddAt(Callback):
    "Adds `cb` to the learner at the 4th batch of the first epoch's training"
    order = 90
    def __init__(self, cb): self.cb_ = cb
    def after_batch(self):
        if self.training and self.epoch == 0 and self.iter == 3: self.learn.add_cb(self.cb_)

def test_added_during_a_fit():
    "It anneals from the next fit on; for the rest of this one it only gives validation `valid_eps`, and undoes that"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[spy := Spy(loss), AddAt(cb := AnnealSmoothing(eps_cos(0.2, 0.)))])
    learn.fit(1)
    assert set(spy.eps) == {EPS0} and cb.hps['eps'] == []
    xv, yv = valid_tensors(learn)
    with torch.no_grad(): nll = F.cross_entropy(learn.model.eval()(xv), yv).item()
    assert learn.recorder.values[-1][1] == pytest.approx(nll, rel=1e-5)
    check_clean(learn, loss)
    learn.remove_cb(learn.add_at)
    learn.fit(1)
    assert cb.hps['eps'] == pytest.approx([cos_ref(0.2, 0.)(p) for p in expected_pcts(n_iter(learn), 1)], abs=1e-12)
    check_clean(learn, loss)

def test_inner_get_preds_that_raises_outside_a_fit():
    "fastai calls nothing after an exception in `get_preds(inner=True)`: the next `validate`, `get_preds` or fit undoes `valid_eps`"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=(cb := AnnealSmoothing(eps_cos(0.2, 0.))))
    for then in (learn.validate, lambda: learn.get_preds(inner=True), lambda: learn.fit(1)):
        with pytest.raises(RuntimeError, match='injected'): learn.get_preds(inner=True, cbs=raising('before_batch', 0))
        assert loss.eps == 0.0   # valid_eps, left behind
        within(then)
        check_clean(learn, loss)
    assert cb.hps['eps'][0] == 0.2

def test_chains_an_existing_with_events_wrapper():
    "Another instance-level `_with_events` keeps running inside the bracket, and is put back when the callback leaves"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss)
    seen = []
    def theirs(f, event_type, ex, final=lambda: None):
        seen.append(event_type)
        return Learner._with_events(learn, f, event_type, ex, final)
    learn._with_events = theirs
    learn.add_cb(cb := AnnealSmoothing(eps_cos(0.2, 0.)))
    with pytest.raises(KeyboardInterrupt): learn.fit(1, cbs=Raise(KeyboardInterrupt, 'train'))
    assert seen[0] == 'fit' and loss.eps == EPS0 and 'eps' not in learn.metrics.attrgot('name')
    learn.fit(1)
    assert len(cb.hps['eps']) == n_iter(learn) and loss.eps == EPS0
    learn.remove_cb(cb)
    assert learn.__dict__['_with_events'] is theirs

def test_tta_leaves_the_callback_alone():
    "fastai's `tta` calls `before_fit`/`after_fit` around `get_preds`, without `learn.lock`: not a fit"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=(cb := AnnealSmoothing('cos')))
    learn.fit(1)
    h = list(cb.hps['eps'])
    preds, targs = learn.tta(n=2)
    assert preds.shape == (len(learn.dls.valid_ds), 10)
    assert cb.hps['eps'] == h
    check_clean(learn, loss)

def test_interrupted_lr_find_does_not_switch_the_callback_off(tmp_path):
    "`lr_find` switches the callback off for its fit (`run=False`); fastai switches it back on only in `after_fit`"
    loss = LabelSmoothingCE(EPS0)
    learn = mk_learner(loss, cbs=[cb := AnnealSmoothing(eps_cos(0.2, 0.)), stop := Raise(KeyboardInterrupt, 'train', at=5)],
                       path=tmp_path)
    with pytest.raises(KeyboardInterrupt): learn.lr_find(num_it=20, show_plot=False)
    learn.remove_cb(stop)
    check_clean(learn, loss)
    learn.fit(1)
    assert cb.hps['eps'] == pytest.approx([cos_ref(0.2, 0.)(p) for p in expected_pcts(n_iter(learn), 1)], abs=1e-12)
    check_clean(learn, loss)

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
