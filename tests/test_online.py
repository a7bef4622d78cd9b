"Class-group priors and `OnlineLabelSmoothing`: values by hand, real fastai Learners on the digits and the pets names, a real 2-process gloo run"
import re
from pathlib import Path
import matplotlib.pyplot as plt, numpy as np, pytest, torch, torch.nn.functional as F
from torch import nn
from sklearn.datasets import load_digits
from fastcore.basics import noop
from fastai.callback.core import Callback, CancelTrainException, CancelEpochException, CancelFitException
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.mixup import MixUp, CutMix
from fastai.vision.data import ImageDataLoaders
from fastai.vision.augment import Resize
from fastai.data.transforms import get_image_files
from fastai_ls.losses import LabelSmoothingCE, LabelSmoothingCEFlat
from fastai_ls.online import group_prior, pets_species_groups, cifar10_groups, OnlineLabelSmoothing
from conftest import digits_dls, run_torchrun

@pytest.fixture(autouse=True)
def one_thread():
    "One torch thread: these models are tiny, and the machine's cores are shared"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ---------------------------------------------------------------- class-group priors
def test_group_prior_by_hand():
    "Row y: `within` split over y's group mates, the rest over the classes outside; no group or no mate: uniform over the others"
    P = group_prior([[1, 3, 4], [0, 5], [2]], 7, within=0.6)   # 6 is in no group, 2 is alone in its group
    a, b = 0.6 / 2, 0.4 / 4   # class 1: mates 3 and 4; outside 0, 2, 5, 6
    c, d = 0.6 / 1, 0.4 / 5   # class 0: mate 5; outside 1, 2, 3, 4, 6
    u = 1 / 6
    expected = torch.tensor([[0, d, d, d, d, c, d],
                             [b, 0, b, a, a, b, b],
                             [u, u, 0, u, u, u, u],
                             [b, a, b, 0, a, b, b],
                             [b, a, b, a, 0, b, b],
                             [c, d, d, d, d, 0, d],
                             [u, u, u, u, u, u, 0]], dtype=torch.float64)
    assert P.dtype == torch.float32 and P.shape == (7, 7)
    assert torch.allclose(P.double(), expected, atol=1e-7)
    assert torch.allclose(P.sum(1).double(), torch.ones(7, dtype=torch.float64), atol=1e-6)

def test_group_prior_edges():
    "A group of every class ignores `within` (nothing is outside it); within 0 and 1; an empty group changes nothing"
    assert torch.equal(group_prior([range(5)], 5, within=0.1), group_prior([], 5))
    assert torch.allclose(group_prior([range(5)], 5, within=0.1), (1 - torch.eye(5)) / 4)
    assert torch.allclose(group_prior([[0, 1], [2, 3, 4]], 5, within=1.)[2], torch.tensor([0, 0, 0, .5, .5]))
    assert torch.allclose(group_prior([[0, 1], [2, 3, 4]], 5, within=0.)[2], torch.tensor([.5, .5, 0, 0, 0]))
    assert torch.equal(group_prior([[0, 1], []], 3), group_prior([[0, 1]], 3))
    # numpy and torch integers are class indices too
    assert torch.equal(group_prior([np.array([0, 1]), torch.tensor([2, 3])], 5), group_prior([[0, 1], [2, 3]], 5))

@pytest.mark.parametrize('args,kwargs,err,msg', [
    (([[0, 1], [1, 2]], 4), {}, ValueError, 'class 1 is in group 0 and in group 1: groups must not overlap'),
    (([[0, 1, 0]], 4), {}, ValueError, 'class 0 appears twice in group 0'),
    (([[0, 4]], 4), {}, ValueError, 'class 4 is outside [0, 4) for n_classes=4'),
    (([[-1, 2]], 4), {}, ValueError, 'class -1 is outside [0, 4)'),
    (([[0, 1]], 4), dict(within=1.5), ValueError, 'within=1.5 is outside [0, 1]'),
    (([[0, 1]], 4), dict(within=-0.1), ValueError, 'within=-0.1 is outside [0, 1]'),
    (([[0, 1]], 4), dict(within=float('nan')), ValueError, 'within=nan is outside [0, 1]'),
    (([[0, 1]], 1), {}, ValueError, 'n_classes must be an integer >= 2; got 1'),
    (([[0, 1]], 4.0), {}, ValueError, 'n_classes must be an integer >= 2; got 4.0'),
    (([[0, 1.5]], 4), {}, TypeError, 'class indices must be integers; got 1.5'),
    (([[True, 2]], 4), {}, TypeError, 'class indices must be integers; got True'),
    (([0, 1], 4), {}, TypeError, 'each group must be an iterable of class indices; group 0 is 0'),
])
def test_group_prior_bad_input(args, kwargs, err, msg):
    with pytest.raises(err) as e: group_prior(*args, **kwargs)
    assert msg in str(e.value)

CATS = ['Abyssinian', 'Bengal', 'Birman', 'Bombay', 'British_Shorthair', 'Egyptian_Mau', 'Maine_Coon', 'Persian',
        'Ragdoll', 'Russian_Blue', 'Siamese', 'Sphynx']   # the 12 cat breeds of Oxford-IIIT pets, written out

def test_pets_species_groups_from_the_file_names(pets_path):
    "The breeds of the real pet photos: 12 cats, 25 dogs; a Siamese is smoothed toward the Birman, not the pug"
    vocab = sorted({re.match(r'^(.+)_\d+\.jpg$', f.name).group(1) for f in pets_path.glob('*.jpg')})
    assert len(vocab) == 37
    cats, dogs = pets_species_groups(vocab)
    assert [vocab[i] for i in cats] == CATS
    assert sorted(cats + dogs) == list(range(37)) and len(dogs) == 25
    P = group_prior([cats, dogs], 37)
    s, b, p = vocab.index('Siamese'), vocab.index('Birman'), vocab.index('pug')
    assert P[s, b].item() == pytest.approx(0.8 / 11) and P[s, p].item() == pytest.approx(0.2 / 25)
    assert P[p, vocab.index('beagle')].item() == pytest.approx(0.8 / 24) and P[p, s].item() == pytest.approx(0.2 / 12)
    # the order of the vocab does not matter
    assert [vocab[::-1][i] for i in pets_species_groups(vocab[::-1])[0]] == CATS[::-1]

@pytest.mark.parametrize('vocab,msg', [
    (['beagle', 'pug'], 'got 0 cat and 2 dog names'),
    (['Bengal', 'Persian'], 'got 2 cat and 0 dog names'),
    (['Bengal', '3_dogs'], "got '3_dogs'"),
    (['Bengal', 7], 'got 7'),
])
def test_pets_species_groups_bad_vocab(vocab, msg):
    with pytest.raises(ValueError) as e: pets_species_groups(vocab)
    assert msg in str(e.value)

def test_cifar10_groups():
    "Vehicles and animals by name, whatever the vocab's order; unknown or repeated names are refused"
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']   # torchvision's order
    assert cifar10_groups(names) == [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]]
    assert cifar10_groups(['truck', 'cat', 'ship', 'dog']) == [[0, 2], [1, 3]]
    P = group_prior(cifar10_groups(names), 10)
    assert P[0, 1].item() == pytest.approx(0.8 / 3) and P[0, 2].item() == pytest.approx(0.2 / 6)   # airplane
    assert P[3, 5].item() == pytest.approx(0.8 / 5) and P[3, 9].item() == pytest.approx(0.2 / 4)   # cat
    with pytest.raises(ValueError, match="'boat' is not a CIFAR-10 class"): cifar10_groups(names[:9] + ['boat'])
    with pytest.raises(ValueError, match="class 'cat' appears twice"): cifar10_groups(names + ['cat'])

# ---------------------------------------------------------------- online label smoothing
def test_paper_loss_is_ours_with_eps_one_minus_alpha():
    "Zhang et al.'s α·CE + (1-α)·soft-CE(S[y]), written out in float64, is LabelSmoothingCE(eps=1-α, prior=S)"
    torch.manual_seed(0)
    x, y = torch.randn(32, 7, dtype=torch.float64), torch.randint(0, 7, (32,))
    S = torch.softmax(3 * torch.randn(7, 7, dtype=torch.float64), 1)
    logp = torch.log_softmax(x, 1)
    for alpha in (0.5, 0.3):
        paper = (-alpha * logp[torch.arange(32), y] - (1 - alpha) * (S[y] * logp).sum(1)).mean()
        assert LabelSmoothingCE(eps=1 - alpha, prior=S)(x, y).item() == pytest.approx(paper.item(), abs=1e-12)

def mlp(): return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

class Watch(Callback):
    "The prior `loss` holds at the start of each training phase and of each validation, and each prior `cb` learned (with a copy)"
    order = OnlineLabelSmoothing.order + 1
    def __init__(self, loss, cb): self.loss_, self.cb, self.trained, self.validated, self.learned = loss, cb, [], [], []
    def before_train(self): self.trained.append(self.loss_.prior)
    def before_validate(self): self.validated.append(self.loss_.prior)
    def after_train(self): self.learned.append((self.cb.prior, self.cb.prior.clone()))

def digits_learner(eps=0.5, cbs=(), bs=128, **kwargs):
    torch.manual_seed(0)
    loss = LabelSmoothingCE(eps)
    cb = OnlineLabelSmoothing()
    learn = Learner(digits_dls(bs=bs, **kwargs), mlp(), loss_func=loss, lr=1e-2, cbs=[cb, w := Watch(loss, cb), *cbs])
    return learn, loss, cb, w

def mean_softmax_of_right(logits, targs, axis=1, ignore=-100, c=10):
    "The reference prior, in float64: for each class, the mean softmax of its correctly predicted positions, else uniform"
    probs = torch.softmax(logits.double(), axis).movedim(axis, -1).reshape(-1, c)
    t = targs.reshape(-1)
    right = (probs.argmax(1) == t) & (t != ignore) & probs.isfinite().all(1)
    return torch.stack([probs[right & (t == k)].mean(0) if (right & (t == k)).any() else torch.full((c,), 1 / c, dtype=torch.float64)
                        for k in range(c)]), right, t

def pair_dls(bs=128):
    "Digits with a 2-position target, the digit and (digit + 1) mod 10; every training item once per epoch"
    X, y = load_digits(return_X_y=True)
    x, y = torch.tensor(X / 16., dtype=torch.float32), torch.tensor(y)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(42)).tolist()
    dsets = Datasets(list(zip(x, torch.stack([y, (y + 1) % 10], 1))), tfms=[[ItemGetter(0)], [ItemGetter(1)]],
                     splits=(idx[359:], idx[:359]))
    return dsets.dataloaders(bs=bs, device='cpu', drop_last=False)

class TwoHeads(nn.Module):
    "An MLP with 2 positions of 10 classes out, the classes on dim `axis` (1: (N, 10, 2); -1: (N, 2, 10))"
    def __init__(self, axis):
        super().__init__()
        self.axis, self.body = axis, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 20))
    def forward(self, x):
        o = self.body(x).view(-1, 2, 10)
        return o.transpose(1, 2) if self.axis == 1 else o

@pytest.mark.parametrize('kind', ['2d', 'nd', 'flat'])
def test_frozen_epoch_prior_is_the_mean_softmax_of_right_predictions(kind):
    """Learning rate 0, no batchnorm or dropout: one epoch's prior is, per class, the mean softmax of the correctly
    classified training positions, recomputed from `get_preds` (the train loader keeps its last batch, so both see
    every training item). N-d outputs and `LabelSmoothingCEFlat` flatten positions; `ignore_index` positions never count."""
    torch.manual_seed(0)
    if kind == '2d': dls, model, loss, axis = digits_dls(bs=128, drop_last=False), mlp(), LabelSmoothingCE(0.5), 1
    else:
        dls, axis = pair_dls(), (1 if kind == 'nd' else -1)
        model, loss = TwoHeads(axis), (LabelSmoothingCE(0.5) if kind == 'nd' else LabelSmoothingCEFlat(eps=0.5))
    learn = Learner(dls, model, loss_func=loss, lr=1e-2)
    with learn.no_bar(), learn.no_logging(): learn.fit(3)   # a model that gets most digits right
    inner = loss.func if kind == 'flat' else loss
    if kind == '2d':
        ignore, empty = -100, 9
        with torch.no_grad(): model[-1].bias[9] -= 100   # 9 is never predicted: its row must be uniform
    else: inner.ignore_index = ignore = empty = 3   # 3 is often predicted right but ignored: its row must be uniform
    frozen = [p.detach().clone() for p in model.parameters()]
    cb = OnlineLabelSmoothing()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0, cbs=cb)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))
    logits, targs = learn.get_preds(ds_idx=0, act=noop)
    assert len(targs) == len(dls.train_ds)
    ref, right, t = mean_softmax_of_right(logits, targs, axis, ignore)
    assert not (right & (t == empty)).any() and right.sum() > 0.7 * len(t) - (t == empty).sum()
    if kind != '2d': assert ((logits.argmax(axis).reshape(-1) == t) & (t == 3)).sum() > 100   # the mask is what empties row 3
    assert torch.allclose(cb.prior.double(), ref, atol=1e-5)
    assert torch.allclose(cb.prior[empty], torch.full((10,), 0.1))
    assert inner.prior is cb.prior and loss.prior is cb.prior
    assert cb._fit is None and cb._acc is None   # per-fit state gone

def test_each_epoch_a_new_prior_that_the_next_epoch_and_validation_use():
    "Epoch 1 trains uniformly; each later epoch with the last one's prior, a new tensor; the old ones are never changed"
    learn, loss, cb, w = digits_learner()
    loss.prior = group_prior([[0, 1]], 10)   # the callback owns the prior: the first epoch is uniform all the same
    with learn.no_bar(), learn.no_logging(): learn.fit(3)
    (p0, c0), (p1, c1), (p2, c2) = w.learned
    assert w.trained[0] is None and w.trained[1] is p0 and w.trained[2] is p1
    assert len(w.validated) == 3 and all(a is b for a, b in zip(w.validated, (p0, p1, p2)))
    assert len({id(p0), id(p1), id(p2)}) == 3 and torch.equal(p0, c0) and torch.equal(p1, c1) and torch.equal(p2, c2)
    assert cb.prior is p2 and loss.prior is p2   # kept after the fit
    # a row averages softmax vectors whose largest entry is its class: so is the row's
    assert torch.allclose(p2.sum(1), torch.ones(10), atol=1e-6) and torch.equal(p2.argmax(1), torch.arange(10))
    last = learn.recorder.values[-1][1]
    assert learn.validate()[0] == pytest.approx(last, rel=1e-6)   # the last validation used the prior the loss keeps

class Record(Callback):
    "The logits and targets of every training batch, per epoch, as the loss saw them"
    order,run_valid = OnlineLabelSmoothing.order+1,False
    def __init__(self): self.epochs = []
    def before_train(self): self.epochs.append([])
    def after_loss(self): self.epochs[-1].append((self.learn.pred.detach().clone(), self.learn.yb[0].clone()))

@pytest.mark.parametrize('mix', [MixUp, CutMix])
def test_mixed_batches_accumulate_with_the_unmixed_label(mix):
    "MixUp/CutMix leave each sample's own label in `yb` (the loss has `y_int`): a position counts when the prediction on the mixed input equals it"
    learn, loss, cb, w = digits_learner(cbs=[mix(), rec := Record()], images=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    for e in range(2):
        logits, targs = map(torch.cat, zip(*rec.epochs[e]))
        assert targs.dtype == torch.int64 and targs.dim() == 1   # not mixed
        assert torch.allclose(w.learned[e][0].double(), mean_softmax_of_right(logits, targs)[0], atol=1e-5)
    assert learn.loss_func is loss and loss.prior is cb.prior   # MixUp gave the loss back; it holds the learned prior

def test_fine_tune_carries_the_prior_over():
    "`fine_tune` runs two fits: the second trains with the first one's prior, not a uniform one"
    learn, loss, cb, w = digits_learner()
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, base_lr=1e-2, freeze_epochs=1)
    (p0, _), (p1, _) = w.learned
    assert w.trained[0] is None and w.trained[1] is p0
    assert cb.prior is p1 and loss.prior is p1 and not torch.equal(p0, p1)

class Interrupt(Callback):
    "Raise `exc` after training batch `at` of epoch `epoch`"
    order,run_valid = OnlineLabelSmoothing.order+1,False
    def __init__(self, exc, epoch, at): self.exc, self.when = exc, (epoch, at)
    def after_batch(self):
        if (self.learn.epoch, self.learn.iter) == self.when: raise self.exc

def test_a_cancelled_training_phase_changes_nothing():
    "CancelTrainException in epoch 2: the loss keeps epoch 1's prior, for that epoch's validation and after the fit"
    learn, loss, cb, w = digits_learner(cbs=[Interrupt(CancelTrainException(), 1, 5)])
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    (p0, c0), (p1, _) = w.learned   # `Watch.after_train` runs after a cancelled training phase too
    assert p1 is p0 and cb.prior is p0 and loss.prior is p0 and torch.equal(p0, c0)
    assert w.validated[1] is p0
    assert cb._fit is None and cb._acc is None

@pytest.mark.parametrize('exc', [CancelEpochException(), CancelFitException(), RuntimeError('boom')])
def test_a_partial_epoch_leaves_no_trace(exc):
    "An epoch interrupted mid-training (cancelled, or failing) adds nothing to the next: a frozen fit gives the get_preds reference exactly"
    learn, loss, cb, w = digits_learner(drop_last=False)
    with learn.no_bar(), learn.no_logging():
        learn.fit(2)
        learn.add_cb(stop := Interrupt(exc, 0, 5))
        if isinstance(exc, RuntimeError):
            with pytest.raises(RuntimeError, match='boom'): learn.fit(2, 0)
        else: learn.fit(2, 0)
        logits, targs = learn.get_preds(ds_idx=0, act=noop)
        if isinstance(exc, CancelEpochException):   # the second epoch of the fit was learned, from its own sums only
            assert len(w.learned) == 3 and torch.allclose(cb.prior.double(), mean_softmax_of_right(logits, targs)[0], atol=1e-5)
        prior = w.learned[-1][0]
        assert cb.prior is prior and loss.prior is prior   # an interrupted epoch changes nothing
        learn.remove_cb(stop)
        learn.fit(1, 0)
    logits, targs = learn.get_preds(ds_idx=0, act=noop)
    assert torch.allclose(cb.prior.double(), mean_softmax_of_right(logits, targs)[0], atol=1e-5)

class Overflow(Callback):
    "Make some outputs of training batch 2 non-finite after the loss saw them, as an fp16 overflow would"
    order,run_valid = OnlineLabelSmoothing.order-1,False
    def after_loss(self):
        if self.learn.iter != 2: return
        pred = self.learn.pred.detach().clone()
        pred[:4] = float('nan'); pred[4:8, :] = float('inf')
        self.learn.pred = pred

def test_non_finite_outputs_are_not_counted():
    "A NaN or infinite output row counts as no prediction: the prior stays the mean of the finite ones"
    learn, loss, cb, w = digits_learner(cbs=[Overflow(), rec := Record()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    logits, targs = map(torch.cat, zip(*rec.epochs[0]))
    assert (~logits.isfinite()).any(1).sum() == 8
    assert torch.allclose(cb.prior.double(), mean_softmax_of_right(logits, targs)[0], atol=1e-5)

class Evaluate(Callback):
    "Call `learn.get_preds` at the end of every epoch of a fit, as a callback evaluating on a test set would"
    busy = False   # `get_preds` runs `after_epoch` too
    def after_epoch(self):
        if self.busy: return
        self.busy = True
        try: self.learn.get_preds(ds_idx=1)
        finally: self.busy = False

def test_validate_and_get_preds_change_nothing():
    "Inside a fit (from a callback) or outside it, `get_preds` and `validate` neither reset nor update the prior"
    learn, loss, cb, w = digits_learner(cbs=[ev := Evaluate()])
    with learn.no_bar(), learn.no_logging(): learn.fit(3)
    (p0, _), (p1, _), (p2, _) = w.learned
    assert w.trained[0] is None and w.trained[1] is p0 and w.trained[2] is p1
    assert len({id(p0), id(p1), id(p2)}) == 3 and cb.prior is p2
    learn.remove_cbs([w, ev])
    with learn.no_bar():
        learn.validate(); learn.get_preds(ds_idx=0)
    assert cb.prior is p2 and loss.prior is p2 and cb._fit is None and cb._acc is None

class NoSums(Callback):
    "Fail if `cb` holds sums after a training batch"
    order,run_valid = OnlineLabelSmoothing.order+1,False
    def __init__(self, cb): self.cb, self.batches = cb, 0
    def after_batch(self):
        assert self.cb._acc is None, 'OnlineLabelSmoothing accumulated during lr_find'
        self.batches += 1

def test_lr_find_stays_out(tmp_path):
    "`lr_find`, even after a fit that failed mid-epoch, accumulates nothing and leaves the prior; the next fit starts from `cb.prior`"
    learn, loss, cb, w = digits_learner(cbs=[stop := Interrupt(RuntimeError('boom'), 0, 3)])
    learn.path = tmp_path
    with learn.no_bar(), learn.no_logging(), pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    learn.remove_cb(stop)
    start = group_prior([[0, 6, 8, 9], [1, 7], [3, 5]], 10)   # a prior to start from
    cb.prior = loss.prior = start
    learn.add_cb(spy := NoSums(cb))
    with learn.no_bar(): learn.lr_find(num_it=10, show_plot=False)
    learn.remove_cb(spy)
    assert spy.batches >= 10 and loss.prior is start and cb.prior is start
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert w.trained[-1] is start and cb.prior is not start and loss.prior is cb.prior

class SeeState(Callback):
    "What `cb` would pickle in the middle of a training epoch"
    order,run_valid = OnlineLabelSmoothing.order+1,False
    def __init__(self): self.state = None
    def after_batch(self):
        cb = next(c for c in self.learn.cbs if isinstance(c, OnlineLabelSmoothing))
        if self.learn.iter == 3: self.state = (cb._acc is not None, set(cb.__getstate__()))

@pytest.mark.filterwarnings("ignore:load_learner` uses Python's insecure pickle")
def test_export_and_load_learner(tmp_path):
    "The learned prior pickles with the loss, as one tensor with `cb.prior`; the per-fit state does not; training goes on from it"
    learn, loss, cb, w = digits_learner(cbs=[see := SeeState()])
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    had_sums, keys = see.state
    assert had_sums and not {'_acc', '_fit'} & keys and 'prior' in keys
    learn.remove_cbs([see, w])
    learn.export(tmp_path/'ols.pkl')
    l2 = load_learner(tmp_path/'ols.pkl')
    cb2 = next(c for c in l2.cbs if isinstance(c, OnlineLabelSmoothing))
    assert torch.equal(cb2.prior, cb.prior) and l2.loss_func.prior is cb2.prior
    assert cb2._fit is None and cb2._acc is None
    l2.dls = digits_dls()
    l2.add_cb(w2 := Watch(l2.loss_func, cb2))
    with l2.no_bar(), l2.no_logging(): l2.fit(1, 1e-2)
    assert torch.equal(w2.trained[0], cb.prior) and l2.loss_func.prior is cb2.prior and not torch.equal(cb2.prior, cb.prior)

def test_refuses_what_it_cannot_learn_with():
    "No `prior` on the loss, variant='others', a second callback, probability targets: a clear error, the loss's prior untouched"
    def fit(learn):
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    learn = Learner(digits_dls(), mlp(), loss_func=CrossEntropyLossFlat(), cbs=OnlineLabelSmoothing())
    with pytest.raises(TypeError, match='found CrossEntropyLossFlat wrapping CrossEntropyLoss'): fit(learn)
    learn = Learner(digits_dls(), mlp(), loss_func=(loss := LabelSmoothingCE(0.5, variant='others')), cbs=OnlineLabelSmoothing())
    with pytest.raises(ValueError, match="variant='others' cannot take"): fit(learn)
    learn = Learner(digits_dls(), mlp(), loss_func=(loss := LabelSmoothingCE(0.5)), cbs=[OnlineLabelSmoothing(), OnlineLabelSmoothing()])
    loss.prior = P = group_prior([[0, 1]], 10)
    with pytest.raises(ValueError, match='two OnlineLabelSmoothing callbacks'): fit(learn)
    assert loss.prior is P
    X, y = load_digits(return_X_y=True)
    soft = Datasets(list(zip(torch.tensor(X / 16., dtype=torch.float32), F.one_hot(torch.tensor(y), 10).float())),
                    tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=(range(300, 1797), range(300)))
    learn = Learner(soft.dataloaders(bs=64, device='cpu'), mlp(), loss_func=(loss := LabelSmoothingCE(0.5)), cbs=(cb := OnlineLabelSmoothing()))
    with pytest.raises(TypeError, match='needs class-index targets; got torch.float32 targets of shape'): fit(learn)
    assert loss.prior is None and cb.prior is None

def test_plot_prior_names_the_classes(pets_path, tmp_path):
    "Tick labels from `learn.dls.vocab` (the pets breeds), or the class indices without a vocab; the figure is returned"
    cb = OnlineLabelSmoothing()
    with pytest.raises(ValueError, match='no prior learned yet'): cb.plot_prior()
    dls = ImageDataLoaders.from_name_re(pets_path, get_image_files(pets_path), r'^(.+)_\d+\.jpg$', item_tfms=Resize(32),
                                        bs=8, num_workers=0, device='cpu')
    Learner(dls, nn.Linear(1, 37), loss_func=LabelSmoothingCE(0.1), cbs=cb)
    cb.prior = group_prior(pets_species_groups(dls.vocab), 37)
    fig = cb.plot_prior()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(dls.vocab) == [t.get_text() for t in ax.get_yticklabels()]
    fig.savefig(tmp_path/'pets.png'); plt.close(fig)
    assert (tmp_path/'pets.png').stat().st_size > 10_000
    with pytest.raises(ValueError, match='vocab has 2 names for the 37 classes'): cb.plot_prior(vocab=['a', 'b'])
    learn, loss, cb, w = digits_learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    fig = cb.plot_prior(log=False)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(i) for i in range(10)]
    plt.close(fig)

SCRIPT = Path(__file__).parent/'ddp_online_script.py'

@pytest.mark.slow
def test_ddp_every_rank_learns_the_prior_of_all_the_data(tmp_path):
    "A real 2-process gloo fit: each epoch's prior is the mean over both ranks' correct predictions, the same on both"
    run_torchrun(SCRIPT, tmp_path)
    r0, r1 = (torch.load(tmp_path/f'rank{i}.pt') for i in range(2))
    assert r0['setup'] == r1['setup'] == (2, 'gloo')
    for e in range(2):
        assert torch.equal(r0['learned'][e], r1['learned'][e])   # every rank holds the same prior
        b0, b1 = r0['batches'][e], r1['batches'][e]
        assert len(b0) == len(b1) == 11   # 22 training batches of 64 digits, split between the ranks
        logits, targs = map(torch.cat, zip(*(b0 + b1)))
        ref = mean_softmax_of_right(logits, targs)[0]
        assert torch.allclose(r0['learned'][e].double(), ref, atol=1e-5)
        own = mean_softmax_of_right(*map(torch.cat, zip(*b0)))[0]
        assert not torch.allclose(own, ref, atol=1e-3)   # one rank's data alone gives another prior
    assert r0['used'][0] is None and torch.equal(r0['used'][1], r0['learned'][0])
    assert torch.equal(r0['final'], r0['learned'][1]) and torch.equal(r1['final'], r0['learned'][1])

class SyncGuard(Callback):
    "Set CUDA's sync debug mode in `after_loss`, just before or just after `OnlineLabelSmoothing` runs"
    run_valid = False
    def __init__(self, order, mode): self.order, self.mode = order, mode
    def after_loss(self): torch.cuda.set_sync_debug_mode(self.mode)

@pytest.mark.cuda
def test_accumulating_needs_no_host_sync():
    "On the GPU, a host sync in `after_loss` would raise under sync debug mode 'error'"
    torch.manual_seed(0)
    o = OnlineLabelSmoothing.order
    learn = Learner(digits_dls(device='cuda'), mlp(), loss_func=LabelSmoothingCE(0.5), lr=1e-2,
                    cbs=[cb := OnlineLabelSmoothing(), SyncGuard(o - 0.5, 'error'), SyncGuard(o + 0.5, 'default')])
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(2)
    finally: torch.cuda.set_sync_debug_mode('default')
    assert cb.prior.is_cuda and torch.allclose(cb.prior.sum(1), torch.ones(10, device='cuda'), atol=1e-6)
