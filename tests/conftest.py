"Shared fixtures: real data for real fastai `Learner`s (sklearn's bundled digits, the Oxford-IIIT pet sample), and torchrun"
import os, signal, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from fastai.data.transforms import ItemGetter
from fastai.data.core import Datasets, DataLoaders

PETS = Path(__file__).parent/'data'/'oxford-iiit-pet'/'images'

def digits_dls(bs:int=64, valid_pct:float=0.2, seed:int=42, images:bool=False, device='cpu', **kwargs) -> DataLoaders:
    "`DataLoaders` over sklearn's `load_digits` (1,797 8x8 digits, 10 classes) with a fixed, seeded train/valid split"
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X / 16., dtype=torch.float32)
    if images: x = x.view(-1, 1, 8, 8)  # (N, 1, 8, 8) for CNNs and CutMix
    y = torch.tensor(y, dtype=torch.long)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).tolist()
    n_valid = int(len(x) * valid_pct)
    # fastai `Datasets` (not a `TensorDataset`), so that `learn.export()` can make an empty copy
    dsets = Datasets(list(zip(x, y)), tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=(idx[n_valid:], idx[:n_valid]))
    return dsets.dataloaders(bs=bs, device=device, **kwargs)

@pytest.fixture
def digits():
    "Digits `DataLoaders` with the default batch size: 1,438 train / 359 valid samples"
    return digits_dls()

@pytest.fixture(scope='session')
def pets_path() -> Path:
    "Folder of the 370 pet JPEGs; labels come from the file names, `^(.+)_\\d+\\.jpg$`"
    if not PETS.is_dir(): pytest.skip(f"pet sample not found at {PETS}")
    return PETS

def pytest_collection_modifyitems(config, items):
    "Skip `@pytest.mark.cuda` tests on machines without a CUDA GPU"
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)

def run_torchrun(script, out_dir, timeout:int=150) -> str:
    "Run `script out_dir` as a real 2-process CPU (gloo) job under torchrun; fail the test with the workers' output if it fails"
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script), str(out_dir)]
    # one thread per process on a shared 2-core machine; no GPU, so that the gloo path is the one tested
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try: out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)   # torchrun and its workers: the process group started above
        out, _ = p.communicate()
        pytest.fail(f"torchrun did not finish within {timeout}s; its output ends with:\n{out[-5000:]}")
    # torchrun prefixes the workers' tracebacks with "[rankN]:"; its own summary comes last
    workers = '\n'.join(l for l in out.splitlines() if l.startswith('[rank'))
    assert p.returncode == 0, f"torchrun exited with {p.returncode}.\nWorkers:\n{workers[-6000:]}\nEnd of output:\n{out[-2000:]}"
    return out
