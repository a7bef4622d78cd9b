"The loss inside real fastai Learners, on real data (sklearn's digits, the Oxford-IIIT pet sample)"
import math
import pytest, torch, torch.nn.functional as F
from torch import nn
from fastai.vision.all import (Learner, MixUp, CutMix, ImageDataLoaders, Resize, accuracy, get_image_files,
                               load_learner, noop, set_seed)
from fastai_ls.all import LabelSmoothingCE, LabelSmoothingCEFlat
from conftest import digits_dls

def mlp(): return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

def test_learner_trains_and_predicts():
    set_seed(0)
    dls = digits_dls(bs=64)
    learn = Learner(dls, mlp(), loss_func=LabelSmoothingCE(0.1), metrics=accuracy)
    before = learn.validate()[0]
    learn.fit(4, 1e-2)
    losses = [float(l) for l in learn.recorder.losses]   # the training losses fall
    assert len(losses) > 10 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    valid_loss, acc = learn.validate()
    assert valid_loss < 0.6 * before, (before, valid_loss)
    assert acc > 0.9
    probs, targs = learn.get_preds()
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))
    assert (probs >= 0).all()
    # get_preds' probabilities are the softmax of the model's logits
    xb, yb = dls.valid.one_batch()
    torch.testing.assert_close(probs[:len(xb)], F.softmax(learn.model(xb), 1), rtol=1e-5, atol=1e-6)
    # with_loss returns the per-sample loss, equal to torch's
    _, _, per_sample = learn.get_preds(with_loss=True)
    logits, _ = learn.get_preds(act=noop)
    torch.testing.assert_close(per_sample, F.cross_entropy(logits, targs, label_smoothing=0.1, reduction='none'), rtol=1e-5, atol=1e-6)
    assert learn.loss_func.reduction == 'mean'   # NoneReduce restored it

@pytest.mark.parametrize('cb', [MixUp, CutMix])
def test_mixup_and_cutmix_train(cb):
    set_seed(0)
    dls = digits_dls(bs=64, images=True)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    learn = Learner(dls, model, loss_func=LabelSmoothingCE(0.1), metrics=accuracy, cbs=cb())
    learn.fit(2, 3e-3)
    losses = [float(l) for l in learn.recorder.losses]
    assert len(losses) > 10
    assert all(map(math.isfinite, losses)) and sum(losses[-5:]) < sum(losses[:5])
    assert learn.loss_func.reduction == 'mean' and isinstance(learn.loss_func, LabelSmoothingCE)
    assert learn.validate()[1] > 0.5

@pytest.mark.parametrize('loss_func', [LabelSmoothingCE(0.1), LabelSmoothingCEFlat(eps=0.1)], ids=['LabelSmoothingCE', 'Flat'])
def test_export_load_predict_on_pets(tmp_path, pets_path, loss_func):
    "Real photos through fastai's image pipeline; export -> load_learner -> predict round-trips"
    set_seed(0)
    fnames = get_image_files(pets_path)
    dls = ImageDataLoaders.from_name_re(pets_path, fnames, pat=r'^(.+)_\d+\.jpg$', item_tfms=Resize(32), bs=32, seed=0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, dls.c))
    learn = Learner(dls, model, loss_func=loss_func, path=tmp_path)
    learn.fit(1, 1e-3)
    learn.export('export.pkl')
    learn2 = load_learner(tmp_path/'export.pkl')
    assert learn2.loss_func.eps == pytest.approx(0.1)
    label, idx, probs = learn2.predict(fnames[0])
    assert label in dls.vocab and label == dls.vocab[idx]
    assert probs.shape == (37,) and probs.sum().item() == pytest.approx(1, abs=1e-5)
    assert idx == probs.argmax()
    label1, _, probs1 = learn.predict(fnames[0])
    assert label1 == label
    torch.testing.assert_close(probs1, probs)
