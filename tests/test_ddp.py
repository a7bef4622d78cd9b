"A real 2-process distributed fit on CPUs (gloo), launched by torchrun: every rank must see the same ε sequence"
import json, math
from pathlib import Path
import pytest
from conftest import run_torchrun

SCRIPT = Path(__file__).parent/'ddp_script.py'

@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    run_torchrun(SCRIPT, tmp_path)
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
