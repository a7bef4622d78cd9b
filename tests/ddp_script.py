"""Launched by `tests/test_ddp.py` through `torchrun --nproc_per_node 2`: a CPU (gloo) fit of a small MLP on the
digits with `AnnealSmoothing`, under fastai's `distrib_ctx(cpu=True)`. Each rank writes what it saw to `rank{i}.json`
in the folder given as the only argument."""
import json, sys
from pathlib import Path
import torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
sys.path.insert(0, str(Path(__file__).parent))
import fastai_ls.distributed  # noqa: F401  the CPU/gloo fix for `DistributedDL._broadcast`
from fastai.callback.core import Callback
from fastai.distributed import rank_distrib  # also patches `Learner.distrib_ctx`
from fastai.learner import Learner
from fastai_ls.callback import AnnealSmoothing, eps_cos
from fastai_ls.losses import LabelSmoothingCE
from conftest import digits_dls

class Seen(Callback):
    "Per training batch: pct_train, the ε the loss holds, fastai's loss and F.cross_entropy at that ε"
    order,run_valid = 90,False
    def __init__(self, loss): self.loss_,self.rows = loss,[]
    def after_loss(self):
        ref = F.cross_entropy(self.learn.pred.detach(), self.learn.yb[0], label_smoothing=self.loss_.eps).item()
        self.rows.append((self.learn.pct_train, self.loss_.eps, self.learn.loss.item(), ref, dist.get_backend()))

torch.manual_seed(0)
loss = LabelSmoothingCE(0.05)
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
learn = Learner(digits_dls(bs=64), model, loss_func=loss, cbs=[cb := AnnealSmoothing(eps_cos(0.2, 0.)), seen := Seen(loss)])
with learn.distrib_ctx(cpu=True): learn.fit(2, 1e-2)
res = dict(world_size=dist.get_world_size(), rows=seen.rows, hps=cb.hps['eps'], eps_after=loss.eps,
           n_iter=len(seen.rows) // 2, values=[list(map(float, v)) for v in learn.recorder.values],
           params=[p.detach().double().sum().item() for p in learn.model.parameters()])
Path(sys.argv[1], f'rank{rank_distrib()}.json').write_text(json.dumps(res))
