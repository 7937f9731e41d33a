"""Determinism: two independent CLI runs write the same tables byte for byte."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.clitools import ENV, REPO


# ---------------------------------------------------------------- 6. determinism
def test_two_independent_cli_runs_give_identical_tables(data_root, ckpts, tmp_path):
    def cmd(run):
        return [sys.executable, str(REPO / 'CSD' / 'CSD.py'), '--in-dataset', 'CIFAR-10',
                '--ckp', str(ckpts / 'ckpt.pth'), '--name', 'det', '--data-root', str(data_root),
                '--cache-dir', str(tmp_path / run / 'cache'), '--output-dir', str(tmp_path / run / 'results'),
                '--num-workers', '0', '--device', 'cpu', '--method', 'knn', 'csd', '--k', '5', '3',
                '--auout', '--ood-positive-fpr',
                '--out-datasets', 'SVHN', 'textures', 'places365', str(data_root / 'my_ood_folder')]
    # Different hash seeds: nothing may depend on set or dict-of-str iteration order.
    procs = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {run: pool.submit(subprocess.run, cmd(run), capture_output=True, text=True, cwd=str(tmp_path),
                                    env=dict(ENV, PYTHONHASHSEED=seed), timeout=300)
                   for run, seed in (('one', '1'), ('two', '2'))}
        procs = {run: f.result() for run, f in futures.items()}
    for proc in procs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    files = {run: sorted(p.relative_to(tmp_path / run / 'results')
                         for p in (tmp_path / run / 'results').rglob('*') if p.is_file()) for run in procs}
    assert files['one'] == files['two'] and len(files['one']) == 8     # {knn, csd} x {csv, json, md, _openood.csv}
    for rel in files['one']:
        a, b = (tmp_path / 'one' / 'results' / rel).read_bytes(), (tmp_path / 'two' / 'results' / rel).read_bytes()
        assert a == b, rel
    assert (tmp_path / 'one' / 'results' / 'CIFAR-10' / 'det' / 'csd_k3.csv').read_text().count('\n') == 6
