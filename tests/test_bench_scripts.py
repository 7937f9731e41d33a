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


def test_bench_probe_reuse_finds_the_probe_from_stores_equal_to_its_own(data_root, probe, tmp_path):
    out = run('bench/bench_probe_reuse.py', '--encoder', probe[0], '--probe', probe[1], '--work', str(tmp_path / 'w'),
              '--', '--in-dataset', 'CIFAR-10', '--data-root', str(data_root), '--num-workers', '0', '--device', 'cpu',
              '--out-datasets', 'SVHN', '--method', 'energy', 'odin', 'vim')
    assert 'equal to the last bit: logits yes, features yes, scores yes, metrics yes' in out
    assert re.search(r"probe from the encoder's stores: [\d.]+ s \| probe extracting its own: [\d.]+ s", out)
    assert out.count("this probe's logits computed from them") == 3


def test_bench_smallest_k_prints_equal_values_for_each_k():
    out = run('bench/bench_smallest_k.py', '--rows', '16', '--bank', '9000', '--k', '3', '64', '65', '--repeats', '1')
    lines = [line for line in out.splitlines() if line.startswith('k=')]
    assert len(lines) == 3 and all(line.endswith('values equal: True') for line in lines), out


GPU_CHECK_SAMPLE = '''
import pytest

def test_quiet():
    pass

def test_prints_a_figure():
    print('peak above the bank: 300 MiB')
    print('PASSED a line that looks like a result')

def test_fails_after_printing():
    print('ALPA step 1.2 s')
    assert 1 == 2

@pytest.mark.skipif(True, reason='needs a CUDA GPU')
def test_skipped():
    pass

@pytest.mark.parametrize('n', [1, 2])
def test_param(n):
    print('bank', n)

def test_skips_inside():
    pytest.skip('faiss without GPU support')
'''
GPU_CHECK_EXPECT = ['PASS test_quiet', 'PASS test_prints_a_figure', 'PASS test_param[1]', 'PASS test_param[2]',
                    'FAIL test_fails_after_printing (assert 1 == 2)', 'SKIP test_skipped (needs a CUDA GPU)',
                    'SKIP test_skips_inside (faiss without GPU support)']


def test_gpu_check_says_no_cuda_and_exits_0():
    out = subprocess.run(['bash', 'bench/gpu_check.sh'], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert out.returncode == 0 and 'no CUDA here' in out.stdout


def test_gpu_check_reads_one_result_per_test_from_pytest_rA(tmp_path):
    """A real pytest -rA log of printed and unprinted tests, one failing, two skipped (with and
    without -s): one line per test, the failure makes the exit status 1, and a line a test
    printed ('PASSED ...') is not taken for a result."""
    (tmp_path / 'test_sample.py').write_text(GPU_CHECK_SAMPLE)
    for extra in ([], ['-s']):
        log = tmp_path / f'log{len(extra)}.txt'
        with open(log, 'w') as f:
            subprocess.run([sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-v', '-rA', *extra,
                            'test_sample.py'], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, timeout=120)
        out = subprocess.run([sys.executable, 'bench/pytest_results.py', str(log)], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 1
        assert out.stdout.splitlines() == GPU_CHECK_EXPECT
    (tmp_path / 'cut.txt').write_text('collected 7 items\ntest_sample.py::test_quiet PASSED\n')   # a killed run
    out = subprocess.run([sys.executable, 'bench/pytest_results.py', str(tmp_path / 'cut.txt')], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and 'no \'short test summary info\'' in out.stdout
