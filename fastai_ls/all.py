"Star-import everything public: `from fastai_ls.all import *`"
from .losses import *
from .metrics import *
