"A real 2-process distributed fit on CPUs (gloo), launched by torchrun: every rank must see the same ε sequence"
import json, math, os, signal, subprocess, sys
from pathlib import Path
import pytest

SCRIPT = Path(__file__).parent/'ddp_script.py'
TIMEOUT = 150

def test_ddp_two_cpu_processes(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(SCRIPT), str(tmp_path)]
    # one thread per process on a shared 2-core machine; no GPU, so that the gloo path is the one tested
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try: out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)   # torchrun and its workers: the session started above
        out, _ = p.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT}s; its output ends with:\n{out[-5000:]}")
    # torchrun prefixes the workers' tracebacks with "[rankN]:"; its own summary comes last
    workers = '\n'.join(l for l in out.splitlines() if l.startswith('[rank'))
    assert p.returncode == 0, f"torchrun exited with {p.returncode}.\nWorkers:\n{workers[-6000:]}\nEnd of output:\n{out[-2000:]}"
    r0, r1 = (json.loads((tmp_path/f'rank{i}.json').read_text()) for i in range(2))
    assert r0['world_size'] == r1['world_size'] == 2
    assert {row[4] for row in r0['rows'] + r1['rows']} == {'gloo'}
    n = r0['n_iter']
    assert n == 11   # 22 training batches of 64 digits, split between 2 ranks
    assert r0['hps'] == r1['hps'] and len(r0['hps']) == 2 * n   # the identical ε sequence on every rank
    pcts = [(e + i / n) / 2 for e in range(2) for i in range(n)]
    assert r0['hps'] == pytest.approx([0.1 * (1 + math.cos(math.pi * q)) for q in pcts], abs=1e-9)
    for r in (r0, r1):
        assert [row[0] for row in r['rows']] == pytest.approx(pcts, abs=1e-9)
        assert [row[1] for row in r['rows']] == pytest.approx(r['hps'], abs=1e-12)   # the loss held that ε
        assert [row[2] for row in r['rows']] == pytest.approx([row[3] for row in r['rows']], rel=1e-5)
        assert r['eps_after'] == 0.05 and len(r['values']) == 2
    assert r0['params'] == pytest.approx(r1['params'], rel=1e-6)   # DDP kept the replicas in step
