"""Launched by `tests/test_online.py` through `torchrun --nproc_per_node 2`: a CPU (gloo) fit of a small MLP on the
digits with `OnlineLabelSmoothing`, under fastai's `distrib_ctx(cpu=True)`. Each rank saves, to `rank{i}.pt` in the
folder given as the only argument, the logits and targets of every training batch it saw and the priors it held."""
import sys
from pathlib import Path
import torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, str(Path(__file__).parent))
import fastai_ls.distributed  # noqa: F401  the CPU/gloo fix for `DistributedDL._broadcast`
from fastai.callback.core import Callback
from fastai.distributed import rank_distrib  # also patches `Learner.distrib_ctx`
from fastai.learner import Learner
from fastai_ls.losses import LabelSmoothingCE
from fastai_ls.online import OnlineLabelSmoothing
from conftest import digits_dls

class Seen(Callback):
    "Per epoch: the prior the loss trained with, the logits and targets of each training batch, the prior learned"
    order,run_valid = OnlineLabelSmoothing.order+1,False
    def __init__(self): self.used, self.batches, self.learned, self.setup = [], [], [], None
    def before_fit(self): self.setup = (dist.get_world_size(), dist.get_backend())
    def before_train(self): self.used.append(loss.prior); self.batches.append([])
    def after_loss(self): self.batches[-1].append((self.learn.pred.detach().clone(), self.learn.yb[0].clone()))
    def after_train(self): self.learned.append(cb.prior)

torch.manual_seed(0)
loss = LabelSmoothingCE(0.5)
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
learn = Learner(digits_dls(bs=64), model, loss_func=loss, cbs=[cb := OnlineLabelSmoothing(), seen := Seen()])
with learn.distrib_ctx(cpu=True): learn.fit(2, 1e-2)
torch.save(dict(setup=seen.setup, used=seen.used, batches=seen.batches, learned=seen.learned, final=loss.prior),
           Path(sys.argv[1], f'rank{rank_distrib()}.pt'))
