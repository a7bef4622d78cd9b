"Star-import everything public: `from fastai_ls.all import *`. (`fastai_ls.distributed`, which patches fastai, is imported explicitly.)"
from .losses import *
from .bce import *
from .callback import *
from .metrics import *
from .online import *
from .interpret import *
