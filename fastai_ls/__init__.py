__version__ = "0.1.0"

import warnings
# fastai compiles two activations with `torch.jit.script`, which recent torch deprecates with a FutureWarning on every
# import; users can do nothing about it, so importing fastai_ls (and fastai through it) stays quiet
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
