"The `fastai-ls compare` command line: real runs on digits and on the pet sample, bad arguments, Ctrl-C"
import os, re, shutil, signal, subprocess, sys, tempfile, time, urllib.error
from pathlib import Path
import pandas as pd, pytest, torch
import fastai_ls.data
from fastai_ls import compare as C
from fastai_ls.compare import main, Comparison, STRATEGIES, METRICS, OUTPUTS
from fastai_ls.losses import LabelSmoothingCE
from fastai_ls.callback import AnnealSmoothing
from fastai_ls.online import OnlineLabelSmoothing

TINY = ['--seeds', '2', '--epochs', '2', '--train-size', '100']

def run_cli(*args, cwd=None, **kwargs):
    "Run a command line in a fresh process, as a user would"
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=300, **kwargs)

def exit_of(argv, capsys):
    "Exit status and stderr of `main(argv)`"
    try: main(argv); code = 0
    except SystemExit as e: code = e.code
    return code, capsys.readouterr().err

def check_results(out, strategies, seeds):
    "The CSV holds one finite row per (seed, strategy); the table and plots are there"
    df = pd.read_csv(out/'results.csv')
    assert (df.status == 'ok').all() and df.error.isna().all()
    assert sorted(zip(df.seed, df.strategy)) == sorted((s, st) for s in range(seeds) for st in strategies)
    assert df[list(METRICS)].notna().all().all() and (df[list(METRICS)] >= 0).all().all()
    assert df.error_rate.le(1).all() and df.ece.le(1).all()
    for f in ('reliability.png', 'eps_schedule.png'): assert (out/f).stat().st_size > 10_000
    summary = (out/'summary.md').read_text()
    assert all(f"| {st} | {seeds} |" in summary for st in strategies)
    return df

@pytest.mark.slow
def test_default_digits_console_script(tmp_path):
    "The README's command at a tiny size: all four strategies, progress bars, the table, the CSV and the plots"
    r = run_cli('fastai-ls', 'compare', *TINY, '--out', str(tmp_path/'res'))
    assert r.returncode == 0, r.stderr
    assert 'train_loss' in r.stdout  # fastai's epoch table: progress is shown
    assert '| strategy | seeds | error % | NLL | ECE | Brier |' in r.stdout
    df = check_results(tmp_path/'res', STRATEGIES, 2)
    assert (df.n_train == 100).all() and (df.n_calib == 250).all() and (df.n_valid == 500).all() and (df.epochs_run == 2).all()
    assert (df.error_rate_ts == df.error_rate).all() and (df.temperature > 0).all() and df.nll_ts.notna().all()
    assert 'Paired differences against ce' in r.stdout

@pytest.mark.slow
def test_module_entry_and_default_out(tmp_path):
    "`python -m fastai_ls.compare` (without the word `compare`) writes to ./fastai_ls_results by default"
    r = run_cli(sys.executable, '-m', 'fastai_ls.compare', '--seeds', '1', '--epochs', '1', '--train-size', '50',
                '--strategies', 'ls,anneal', '--quiet', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'train_loss' not in r.stdout
    check_results(tmp_path/'fastai_ls_results', ['ls', 'anneal'], 1)

def test_in_process_run_restores_global_settings(tmp_path, monkeypatch):
    "A run inside a notebook leaves the caller's cuDNN flags and thread count as they were"
    for flag, value in (('deterministic', False), ('benchmark', True)): monkeypatch.setattr(torch.backends.cudnn, flag, value)
    threads = torch.get_num_threads()
    main(['compare', '--seeds', '1', '--epochs', '1', '--train-size', '50', '--strategies', 'ce', '--threads', str(threads + 1),
          '--quiet', '--out', str(tmp_path/'res')])
    check_results(tmp_path/'res', ['ce'], 1)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    assert torch.get_num_threads() == threads

@pytest.mark.slow
def test_pets_sample_from_scratch(tmp_path, pets_path):
    "The pets ResNet34 on the 370-photo sample, tiny, from random weights (`fit_one_cycle`)"
    main(['compare', '--dataset', 'pets', '--path', str(pets_path), '--no-pretrained', '--size', '32', '--bs', '32',
          '--epochs', '1', '--seeds', '1', '--strategies', 'ce', 'anneal', '--num-workers', '0', '--threads', '2',
          '--quiet', '--out', str(tmp_path)])
    df = check_results(tmp_path, ['ce', 'anneal'], 1)
    assert (df.n_train == 259).all() and (df.n_calib == 37).all() and (df.n_valid == 74).all() and (df.model == 'resnet34').all()
    assert not df.pretrained.any() and (df.epochs_run == 1).all()

@pytest.fixture
def offline(monkeypatch):
    "torchvision cannot download weights, whatever the machine's network"
    import torchvision.models._api
    def fail(*args, **kwargs): raise urllib.error.URLError('Name or service not known (simulated)')
    monkeypatch.setattr(torchvision.models._api, 'load_state_dict_from_url', fail)   # where torchvision looks it up

def test_pets_pretrained_offline(tmp_path, pets_path, offline, capsys):
    "Missing pretrained weights: a plain message and exit 2, or a warning and a run from scratch with --scratch-fallback"
    argv = ['compare', '--dataset', 'pets', '--path', str(pets_path), '--arch', 'resnet18', '--size', '32', '--bs', '32',
            '--epochs', '1', '--seeds', '1', '--strategies', 'ls', '--num-workers', '0', '--quiet', '--out', str(tmp_path)]
    code, err = exit_of(argv, capsys)
    assert code == 2 and 'ImageNet weights of resnet18 could not be loaded' in err and '--scratch-fallback' in err
    assert not (tmp_path/'results.csv').exists()
    with pytest.warns(UserWarning, match='training from random weights instead'): main(argv + ['--scratch-fallback'])
    assert not check_results(tmp_path, ['ls'], 1).pretrained.any()

def test_pets_download_offline(tmp_path, capsys, monkeypatch):
    "No --path and no network: a plain message naming the download and the way out, exit 2"
    def fail(*args, **kwargs): raise urllib.error.URLError('Name or service not known (simulated)')
    monkeypatch.setattr(fastai_ls.data, 'untar_data', fail)
    for ds, name in (('pets', 'Oxford-IIIT Pets'), ('cifar10', 'CIFAR-10')):
        code, err = exit_of(['compare', '--dataset', ds, '--out', str(tmp_path/'out')], capsys)
        assert code == 2 and f'could not download the {name} dataset' in err and 'pass --path' in err, err
        assert 'Traceback' not in err and not (tmp_path/'out').exists()

def test_hanging_weights_download_times_out(monkeypatch):
    "A network that drops packets makes a download hang forever: the check gives up and says so"
    from fastai_ls.data import pretrained_available
    from torchvision.models import resnet18
    import torchvision.models._api
    monkeypatch.setattr(torchvision.models._api, 'load_state_dict_from_url', lambda *a, **k: time.sleep(60))
    t0 = time.perf_counter()
    why = pretrained_available(resnet18, timeout=0.5)
    assert time.perf_counter() - t0 < 10
    assert why == "the weights' server did not answer within 0.5 s"

def _bad_folders(tmp_path, pets_path):
    (tmp_path/'empty').mkdir()
    (tmp_path/'nomatch').mkdir()
    src = next(pets_path.iterdir())
    for n in ('cat.jpg', 'IMG_0001.JPG', 'dog-3.jpg'): shutil.copy(src, tmp_path/'nomatch'/n)
    (tmp_path/'afile.jpg').write_bytes(src.read_bytes())
    (tmp_path/'few').mkdir()   # 2 breeds, but too few images for a validation set
    for n in ('a_1.jpg', 'a_2.jpg', 'b_1.jpg', 'b_2.jpg'): shutil.copy(src, tmp_path/'few'/n)

@pytest.mark.parametrize('args,msg', [
    (['--dataset', 'mnist'], "unknown dataset 'mnist'"),
    (['--strategies', 'ce', 'focal'], "unknown strategy 'focal'"),
    (['--strategies', 'ce,,ls'], "unknown strategy ''"),
    (['--strategies', 'ls', 'group'], "strategy 'group' needs groups of similar classes, which digits does not have; it is for --dataset pets, cifar10"),
    (['--eps', '0'], '--eps must be in (0, 1)'),
    (['--eps', '1'], '--eps must be in (0, 1)'),
    (['--eps', '-0.1'], '--eps must be in (0, 1)'),
    (['--eps', 'abc'], "invalid float value: 'abc'"),
    (['--schedule', 'step'], "unknown schedule 'step'"),
    (['--seeds', '0'], '--seeds must be at least 1'),
    (['--lr', 'inf'], '--lr must be a finite number > 0; got inf'),
    (['--lr', 'nan'], '--lr must be a finite number > 0; got nan'),
    (['--lr', '-1'], '--lr must be a finite number > 0; got -1'),
    (['--train-size', '20', '--bs', '32'], '--bs 32 is larger than the 20 training images'),
    (['--dataset', 'pets', '--path', '{tmp}/few'], 'has only 4 images: the 20% validation set would be empty'),
    (['--epochs', '0'], '--epochs must be at least 1'),
    (['--train-size', '5000'], '--train-size must be between 10 and 1047 for digits'),
    (['--calib-size', '0'], '--calib-size must be between 1 and'),
    (['--label-noise', '1'], '--label-noise must be in [0, 1)'),
    (['--label-noise', '-0.1'], '--label-noise must be in [0, 1)'),
    (['--strategies', 'ce', 'ce+temp'], "strategy 'ce+temp' was dropped"),
    (['--strategies', 'ls:2'], "strategy 'ls:2': ε must be in (0, 1)"),
    (['--strategies', 'anneal:warm'], "unknown schedule 'warm'"),
    (['--strategies', 'ls', 'ls'], "strategy 'ls' is given twice"),
    (['--path', '.'], '--path is not an option of --dataset digits; it is for --dataset pets, cifar10'),
    (['--size', '64'], '--size is not an option of --dataset digits; it is for --dataset pets'),
    (['--dataset', 'cifar10', '--path', '{tmp}/empty'], 'has no labels.txt'),
    (['--dataset', 'cifar10', '--path', '{tmp}/missing'], 'does not exist'),
    (['--dataset', 'pets', '--path', '{tmp}/missing'], 'does not exist'),
    (['--dataset', 'pets', '--path', '{tmp}/empty'], 'contains no images'),
    (['--dataset', 'pets', '--path', '{tmp}/afile.jpg'], 'is not a folder'),
    (['--dataset', 'pets', '--path', '{tmp}/nomatch'], r'none of the 3 images'),
    (['--dataset', 'pets', '--path', '{tmp}/nomatch', '--arch', 'vgg16'], "unknown arch 'vgg16'"),
    (['--device', 'gpu0'], "--device 'gpu0' is not a torch device"),
    (['--device', f'cuda:{torch.cuda.device_count()}'], f"--device 'cuda:{torch.cuda.device_count()}': this machine has"),
    (['--device', 'meta'], "--device 'meta': this machine has 0 meta device(s)"),
])
def test_bad_arguments(tmp_path, pets_path, capsys, args, msg):
    "Every bad argument: a message naming the problem, exit status 2, nothing trained or written"
    _bad_folders(tmp_path, pets_path)
    code, err = exit_of(['compare', *[a.format(tmp=tmp_path) for a in args], '--out', str(tmp_path/'out')], capsys)
    assert code == 2, err
    assert msg in err and 'usage: fastai-ls compare' in err, err
    assert 'Traceback' not in err and not (tmp_path/'out').exists()

def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as e: main(['compare', '--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and '--train-size' in out and '(default: 3)' in out   # --seeds
    assert '(default: None)' not in out and not re.search(r'\(default:[^)]*\)\s*\(default:', out), out

def test_bad_arguments_console_script():
    "The same from the shell: no subcommand, an unknown one"
    for args, msg in [((), 'the following arguments are required: command'), (('frobnicate',), 'invalid choice')]:
        r = run_cli('fastai-ls', *args)
        assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr

def _ctrl_c_works():
    "In the child: a shell's background job (`pytest ... &`) starts with SIGINT ignored, and Python keeps it so"
    signal.signal(signal.SIGINT, signal.SIG_DFL)

@pytest.mark.skipif(sys.platform == 'win32', reason='SIGINT to a child process')
@pytest.mark.slow
def test_ctrl_c_keeps_finished_runs(tmp_path):
    "SIGINT after the first run has finished: exit 130, the finished runs on disk with their table and plots"
    out = tmp_path/'res'
    p = subprocess.Popen(['fastai-ls', 'compare', '--seeds', '2', '--epochs', '30', '--train-size', '1000',
                          '--strategies', 'ce', 'ls', '--quiet', '--out', str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_works)
    csv, t0 = out/'results.csv', time.time()
    while not (csv.exists() and len(csv.read_text().splitlines()) >= 2):
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 240, 'no run finished in time'
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert 'Interrupted:' in stderr and 'Traceback' not in stderr
    df = pd.read_csv(csv)
    assert 1 <= len(df) < 4 and df[list(METRICS)].notna().all().all()
    summary = (out/'summary.md').read_text()
    for st, n in df.groupby('strategy').seed.nunique().items(): assert f"| {st} | {n} |" in summary
    for f in ('reliability.png', 'eps_schedule.png'): assert (out/f).stat().st_size > 10_000

# ---------------------------------------------------------------- results on disk are never lost
def read_only_dir(tmp_path):
    "A folder in which no file can be created, even by root"
    if os.geteuid() != 0:
        d = tmp_path/'ro'; d.mkdir(); d.chmod(0o555)
        return d
    d = Path('/sys')  # root may write anywhere but in a kernel file system
    try: tempfile.TemporaryFile(dir=d).close()
    except OSError: return d
    pytest.skip('no read-only folder for root on this machine')

@pytest.mark.parametrize('kind', ['file', 'inside a file', 'read-only'])
def test_unusable_out_refused_before_training(tmp_path, capsys, kind):
    "A file or a read-only --out: exit 2 and a message before anything trains, not a traceback after the first run"
    f = tmp_path/'afile'; f.write_text('not a folder')
    out, msg = dict(file=(f, f"--out {f} is a file, not a folder"),
                    **{'inside a file': (f/'res', f"--out {f/'res'} cannot be created: {f} is a file, not a folder")}).get(
                    kind, (None, 'is not writable: no file can be created in'))
    if out is None: out = read_only_dir(tmp_path)/'res'
    with pytest.raises(SystemExit) as e:
        main(['compare', '--seeds', '1', '--epochs', '1', '--train-size', '50', '--strategies', 'ce', '--quiet', '--out', str(out)])
    std = capsys.readouterr()
    assert e.value.code == 2 and msg in std.err and 'usage: fastai-ls compare' in std.err, std.err
    assert '[1/1]' not in std.out and f.read_text() == 'not a folder'   # nothing trained, nothing written

TINY1 = ['--seeds', '1', '--epochs', '1', '--train-size', '50', '--quiet']

def test_earlier_results_are_never_replaced(tmp_path, capsys):
    "A second comparison into the same --out is refused, whichever of the files is there; --overwrite replaces them"
    out = tmp_path/'res'
    main(['compare', '--strategies', 'anneal', *TINY1, '--out', str(out)])
    before = {f: (out/f).read_bytes() for f in OUTPUTS}
    capsys.readouterr()
    code, err = exit_of(['compare', '--strategies', 'ce', *TINY1, '--out', str(out)], capsys)
    assert code == 2 and f"--out {out} already holds results.csv, summary.md, reliability.png, eps_schedule.png" in err, err
    assert '--overwrite' in err and {f: (out/f).read_bytes() for f in OUTPUTS} == before
    (out/'results.csv').unlink()   # an old summary or plot alone is refused too: it would sit beside the new CSV
    code, err = exit_of(['compare', '--strategies', 'ce', *TINY1, '--out', str(out)], capsys)
    assert code == 2 and 'already holds summary.md, reliability.png, eps_schedule.png' in err, err
    main(['compare', '--strategies', 'ce', '--overwrite', *TINY1, '--out', str(out)])
    check_results(out, ['ce'], 1)
    assert '| anneal |' not in (out/'summary.md').read_text()
    # in Python, a second `run` of the same `Comparison` would replace the first's results
    cmp = Comparison(strategies='ce', seeds=1, epochs=1, train_size=50, show_progress=False, out=tmp_path/'py')
    cmp.run()
    with pytest.raises(C.CompareError, match='already holds results.csv'): cmp.run()

@pytest.mark.skipif(sys.platform == 'win32', reason='SIGINT to a child process')
@pytest.mark.slow
def test_overwrite_removes_earlier_results_only_once_a_new_run_finished(tmp_path):
    "--overwrite, then Ctrl-C before the first new run finishes: the earlier results stay; killed after it: no stale file"
    out = tmp_path/'res'
    main(['compare', '--strategies', 'anneal', *TINY1, '--out', str(out)])
    before = {f: (out/f).read_bytes() for f in OUTPUTS}
    argv = ['fastai-ls', 'compare', '--overwrite', '--seeds', '1', '--epochs', '10', '--train-size', '300',
            '--strategies', 'ce', 'ls', '--quiet', '--out', str(out)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_works)
    line = p.stdout.readline()   # printed just before the first run starts training
    assert line.startswith('[1/2] digits: ce, seed 0'), (line, p.communicate())
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert f"Interrupted before the first run finished; nothing was written to {out}" in err and 'their results' not in err
    assert {f: (out/f).read_bytes() for f in OUTPUTS} == before
    # a crash (here SIGKILL, which no handler sees) once the first new run is saved: only new results are left
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while '\ndigits,ce,0,' not in ((out/'results.csv').read_text() if (out/'results.csv').exists() else ''):
        assert p.poll() is None and time.time() - t0 < 120, 'the first run did not finish in time'
        time.sleep(0.02)
    p.kill(); p.wait()
    assert sorted(os.listdir(out)) == ['results.csv']
    assert pd.read_csv(out/'results.csv').strategy.tolist() == ['ce']

# ---------------------------------------------------------------- runs that cannot train, or diverge
def test_training_set_smaller_than_a_batch(tmp_path):
    "--train-size 10 with the default batch size of 32: one batch of 10 per epoch, not zero batches and an untrained model"
    main(['compare', '--train-size', '10', '--epochs', '3', '--seeds', '1', '--strategies', 'ce', 'ls', '--quiet',
          '--out', str(tmp_path)])
    df = check_results(tmp_path, ['ce', 'ls'], 1)
    assert (df.bs == 10).all() and (df.iters == 3).all() and (df.n_train == 10).all()
    assert 'bs 10;' in (tmp_path/'summary.md').read_text()

def test_diverged_runs_are_recorded_and_the_others_go_on(tmp_path, capsys):
    "--lr 1e6: every model goes to NaN; each run is recorded as failed, the comparison finishes, says so, and exits 1"
    with pytest.raises(SystemExit) as e:
        main(['compare', '--lr', '1e6', '--epochs', '5', '--train-size', '100', '--seeds', '1',
              '--strategies', 'ce', 'ls', '--quiet', '--out', str(tmp_path)])
    std = capsys.readouterr()
    assert e.value.code == 1, std.err
    df = pd.read_csv(tmp_path/'results.csv')
    assert df.strategy.tolist() == ['ce', 'ls'] and (df.status == 'failed').all()
    assert df[list(METRICS) + ['nll_ts', 'temperature']].isna().all().all()
    assert df.error.str.contains('FloatingPointError: the model diverged').all(), df.error
    assert 'Traceback' not in std.err and 'ls, seed 0 failed: FloatingPointError: the model diverged' in std.err
    summary = (tmp_path/'summary.md').read_text()
    assert '**2 of 2 runs failed**' in summary and '| ls | 0 | n/a | n/a | n/a | n/a |' in summary
    assert '- ls, seed 0: FloatingPointError' in summary and summary.split('\n\n', 1)[1] in std.out
    assert sorted(os.listdir(tmp_path)) == ['results.csv', 'summary.md']   # no plot without a successful run

class LsDiverges(Comparison):
    "`ls` (not `anneal`) trains at a learning rate of 1e6 and ends with NaN weights; the other strategies train as usual"
    def fit(self, learn):
        if isinstance(learn.loss_func, LabelSmoothingCE) and not any(isinstance(c, AnnealSmoothing) for c in learn.cbs):
            learn.fit_one_cycle(5, 1e6)
        else: super().fit(learn)

def test_one_diverged_strategy_among_others(tmp_path):
    "The successful runs make the table and the plots; the diverged one is listed, not averaged in"
    cmp = LsDiverges(strategies='ce,ls,anneal', seeds=2, epochs=2, train_size=100, show_progress=False, out=tmp_path)
    df = cmp.run()
    assert df.status.tolist() == ['ok', 'failed', 'ok']*2 and df[df.status == 'ok'][list(METRICS)].notna().all().all()
    assert set(cmp.preds) == set(cmp.eps_logs) == {'ce', 'anneal'}
    assert pd.read_csv(tmp_path/'results.csv').status.tolist() == df.status.tolist()
    summary = (tmp_path/'summary.md').read_text()
    assert '| ce | 2 |' in summary and '| anneal | 2 |' in summary and '| ls | 0 | n/a |' in summary
    assert '**2 of 6 runs failed**' in summary and '- ls, seed 1: FloatingPointError: the model diverged' in summary
    assert '| ls | 0 | n/a |' in summary.split('Paired differences')[1]   # no seed where both ls and ce succeeded
    assert [t.splitlines()[0] for t in png_titles(cmp)] == ['ce', 'anneal']

def png_titles(cmp):
    "The panel titles of the reliability diagram `cmp` draws from its successful runs (`reliability.png` holds the same)"
    from fastai_ls.metrics import reliability_diagram
    assert (cmp.out/'reliability.png').stat().st_size > 10_000
    return [a.get_title() for a in reliability_diagram(cmp.preds, from_logits=True, panels=True).axes if a.get_title()]

def test_truncated_image_named_before_training(tmp_path, pets_path, capsys):
    "A truncated JPEG in --path: exit 2 naming the file before anything trains, not a bare OSError mid-epoch"
    imgs = tmp_path/'imgs'; imgs.mkdir()
    for breed in ('Abyssinian', 'beagle'):
        for f in sorted(pets_path.glob(f'{breed}_*.jpg'))[:5]: shutil.copy(f, imgs)
    bad = sorted(imgs.glob('beagle_*.jpg'))[2]
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size//2])
    code, err = exit_of(['compare', '--dataset', 'pets', '--path', str(imgs), '--no-pretrained', '--size', '32', '--bs', '4',
                         '--epochs', '1', '--seeds', '1', '--strategies', 'ce', '--num-workers', '0', '--quiet',
                         '--out', str(tmp_path/'out')], capsys)
    assert code == 2 and f"1 of the 10 images in {imgs} cannot be read" in err, err
    assert f"{bad.name} (OSError: image file is truncated" in err and 'Traceback' not in err
    assert not (tmp_path/'out').exists()

# ---------------------------------------------------------------- the prior strategies: ols and group
def test_ols_on_digits(tmp_path):
    "`ols` trains at ε = 0.5 with `OnlineLabelSmoothing`, which leaves a learned (C, C) prior on the loss"
    cmp = Comparison(strategies='ls,ols', seeds=1, epochs=2, train_size=100, show_progress=False, out=tmp_path)
    df = cmp.run()
    check_results(tmp_path, ['ls', 'ols'], 1)
    assert df.set_index('strategy').eps.to_dict() == {'ls': 0.1, 'ols': C.OLS_EPS} and C.OLS_EPS == 0.5
    assert set(cmp.eps_logs['ols']) == {0.5} and len(cmp.eps_logs['ols']) == df.iters[1]
    assert 'ols (ε 0.5)' in (tmp_path/'summary.md').read_text()
    learn, _ = cmp.learner(C.parse_strategy('ols'))
    cb = next(c for c in learn.cbs if isinstance(c, OnlineLabelSmoothing))
    learn.fit(1)
    assert learn.loss_func.eps == 0.5 and learn.loss_func.prior is cb.prior and cb.prior.shape == (10, 10)

@pytest.mark.slow
def test_group_and_ols_on_pets(tmp_path, pets_path):
    "`group` on 2 cat and 2 dog breeds: the species prior, checked by hand, trains end to end next to `ols`"
    imgs = tmp_path/'imgs'; imgs.mkdir()
    for breed in ('Abyssinian', 'Bengal', 'beagle', 'boxer'):
        for f in sorted(pets_path.glob(f'{breed}_*.jpg')): shutil.copy(f, imgs)
    args = dict(dataset='pets', path=imgs, pretrained=False, arch='resnet18', size=32, bs=8, epochs=1, seeds=1,
                num_workers=0, threads=1, show_progress=False)
    learn, _ = Comparison(strategies='group', out=tmp_path/'none', **args).learner(C.parse_strategy('group'))
    assert list(learn.dls.vocab) == ['Abyssinian', 'Bengal', 'beagle', 'boxer']
    # row y: 0.8 on the other breed of its species, 0.1 on each breed of the other species, 0 on itself
    assert torch.allclose(learn.loss_func.prior, torch.tensor([[0, .8, .1, .1], [.8, 0, .1, .1], [.1, .1, 0, .8], [.1, .1, .8, 0]]))
    assert learn.loss_func.eps == 0.1 and not any(isinstance(c, OnlineLabelSmoothing) for c in learn.cbs)
    df = Comparison(strategies='ols,group', out=tmp_path/'res', **args).run()
    check_results(tmp_path/'res', ['ols', 'group'], 1)
    assert df.strategy.tolist() == ['ols', 'group'] and df.eps.tolist() == [0.5, 0.1]
    assert 'group (ε 0.1, prior within 0.8)' in (tmp_path/'res'/'summary.md').read_text()


# ---------------------------------------------------------------- CIFAR-10, calibration split, label noise, paired statistics
CIFAR = Path(__file__).parent/'data'/'cifar10'

@pytest.mark.slow
def test_cifar10_sample_every_option(tmp_path):
    "The committed 420-image CIFAR-10 sample end to end: held-out calibration, label noise, ε in strategy names, a baseline"
    out = tmp_path/'res'
    main(['compare', '--dataset', 'cifar10', '--path', str(CIFAR), '--epochs', '1', '--seeds', '2', '--bs', '50',
          '--calib-size', '60', '--label-noise', '0.4', '--strategies', 'ce', 'ls:0.05', 'anneal:two_stage:0.2', 'ols', 'group',
          '--baseline', 'ls:0.05', '--quiet', '--out', str(out)])
    names = ['ce', 'ls:0.05', 'anneal:two_stage:0.2', 'ols', 'group']
    df = check_results(out, names, 2)
    assert (df.n_train == 240).all() and (df.n_calib == 60).all() and (df.n_valid == 120).all() and (df.label_noise == 0.4).all()
    assert df.set_index('strategy').eps.groupby(level=0).first().to_dict() == {'ce': 0, 'ls:0.05': 0.05, 'anneal:two_stage:0.2': 0.2,
                                                                               'ols': 0.5, 'group': 0.1}
    assert (df.model == 'cifar_resnet').all() and (df.dataset == 'cifar10').all() and (df.iters == 240//50).all()
    assert (df.error_rate_ts == df.error_rate).all() and df[['nll_ts', 'ece_ts', 'brier_ts']].notna().all().all()
    summary = (out/'summary.md').read_text()
    assert '40% of the training labels noisy' in summary and 'Paired differences against ls:0.05' in summary
    paired = summary.split('Paired differences')[1]
    assert '| strategy − ls:0.05 | seeds |' in paired and all(f"| {n} | 2 |" in paired for n in names if n != 'ls:0.05')

def test_calibration_split_is_held_out_and_labels_stay_clean():
    "The calibration images are not trained on; label noise touches the training labels only, the same for every run"
    from fastai_ls.data import Cifar10Data
    clean, noisy = Cifar10Data(CIFAR, calib_size=60), Cifar10Data(CIFAR, calib_size=60, label_noise=0.4)
    train = {bytes(x.numpy()) for x in noisy.train[0]}
    assert not train & {bytes(x.numpy()) for x in noisy.calib[0]} and not train & {bytes(x.numpy()) for x in noisy.valid[0]}
    assert (noisy.train[1] != clean.train[1]).sum() == 96 and (noisy.calib[1] == clean.calib[1]).all()
    assert (Cifar10Data(CIFAR, calib_size=60, label_noise=0.4).train[1] == noisy.train[1]).all()
