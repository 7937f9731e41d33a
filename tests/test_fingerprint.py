"""No stale results (issue 9): the main job reruns what a code change affects, and reuses
everything when nothing changed."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.fixtures import write_fashion_mnist
from util.fingerprint import code_hash, fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fingerprint_sees_config_and_code():
    assert fingerprint({'lr': 0.1}, ('ALPA',)) == fingerprint({'lr': 0.1}, ('ALPA',))
    assert fingerprint({'lr': 0.1}, ('ALPA',)) != fingerprint({'lr': 0.2}, ('ALPA',))
    assert code_hash(('ALPA',)) != code_hash(('util',))


@pytest.mark.slow
def test_main_job_retrains_after_a_code_change_and_reuses_otherwise(tmp_path):
    repo = tmp_path / 'repo'
    for part in ('ALPA', 'CSD', 'util', 'bench', 'experiments'):
        shutil.copytree(os.path.join(REPO, part), repo / part, ignore=shutil.ignore_patterns('__pycache__'))
    data = tmp_path / 'data'
    write_fashion_mnist(str(data), n_train=200, n_test=40)
    cmd = [sys.executable, 'experiments/mode_fmnist.py', '--seeds', '0', '--width', '4', '--batch-size', '8', '--epochs', '1',
           '--steps-per-epoch', '2', '--finetune-epochs', '1', '--max-train', '60', '--data-root', str(data),
           '--out-dir', str(tmp_path / 'runs'), '--device', 'cpu', '--num-workers', '0', '--far', 'digits']

    def run():
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, MODE_NO_PROGRESS='1', OMP_NUM_THREADS='1', PYTHONPATH=str(repo)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        table = [line for line in proc.stdout.splitlines() if line.count('±') == 4]
        assert len(table) == 6
        return proc.stdout, table

    first, table1 = run()
    assert 'retraining' not in first
    # A researcher edits the ALPA loss (here: its logits multiplied by 0) and reruns.
    losses = repo / 'ALPA' / 'losses.py'
    src = losses.read_text()
    assert 'logits = similarity * self.temperature_s' in src
    losses.write_text(src.replace('logits = similarity * self.temperature_s',
                                  'logits = similarity * self.temperature_s * 0'))
    second, table2 = run()
    assert second.count('retraining ') == 3, second            # Base, ALPA-finetune, ALPA-train
    assert '[cache]' not in second                             # new checkpoints: new features
    alpa_rows = lambda t: [r for r in t if r.startswith('ALPA-')]
    assert alpa_rows(table2) != alpa_rows(table1)              # the table comes from the new code
    stale = [d for _, ds, _ in os.walk(tmp_path / 'runs') for d in ds if '.stale-' in d]
    assert len(stale) == 3                                     # old runs kept aside, not deleted
    # Nothing changed: everything is reused, and the same table is printed.
    third, table3 = run()
    assert 'retraining' not in third and '[features]' not in third and third.count('resumed from') == 3
    assert table3 == table2
