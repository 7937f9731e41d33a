"""The benchmark scripts still run (tiny sizes): their figures are quoted in BENCHMARKS.md."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv):
    out = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_scale_synthetic_then_real_store_queries(tmp_path):
    store = str(tmp_path / 'bank')
    out = run('bench/bench_scale.py', '--bank', '1200', '--dim', '8', '--queries', '20', '--store', store,
              '--ivf', '1', '200', '--compare', '60', '--threads', '1')
    assert 'wrote ' in out and 'max |diff| 0.00e+00' in out
    assert re.search(r'IVF nprobe  200: .* recall@10 1\.0000', out)      # every list probed: exact
    assert out.count('in-memory:') == 2 and out.count('streamed:') == 2
    # --query-store: an existing store is the bank (never rewritten) and another gives the queries
    again = run('bench/bench_scale.py', '--store', store, '--query-store', store, '--queries', '15', '--ivf', '200')
    assert 'real bank' in again and 'wrote ' not in again and '90 queries' in again
    assert re.search(r'recall@10 1\.0000', again)
