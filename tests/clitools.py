"""Running the entry scripts as a user would, for the CLI tests: subprocesses two at a time or
``__main__`` in this process, and the check that a failure is one ``error:`` line.

Subprocesses run single-threaded (``OMP_NUM_THREADS=1``): two of them share this machine's two
cores without oversubscribing, and training runs compared bit for bit use the same kernels."""
import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', MODE_NO_PROGRESS='1')


def run_all(cmds, cwd, env=None, in_process=()):
    """Run ``{name: argv}`` -> ``{name: CompletedProcess}``: as subprocesses two at a time,
    except the names in ``in_process``, which run the same script's ``__main__`` in this
    process (``run_in_process``) meanwhile: the same code from the flags on, without the
    interpreter start and torch import (~3 s of CPU each) of a fresh process."""
    def one(argv):
        return subprocess.run(argv, capture_output=True, text=True, cwd=str(cwd), env=env or ENV, timeout=300)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(one, argv) for name, argv in cmds.items() if name not in in_process}
        done = {name: run_in_process(cmds[name]) for name in in_process}
        return {**done, **{name: f.result() for name, f in futures.items()}}


def run_in_process(argv):
    """``[python, script.py, *flags]`` run as ``python script.py *flags`` would, inside this
    process (``runpy`` with ``__name__ == '__main__'`` and ``sys.argv`` set), stdout and stderr
    captured -> a ``CompletedProcess``: the ``SystemExit`` code as return code, 0 when the
    script returns, 1 and the traceback on stderr for any other exception (as Python's own)."""
    import contextlib
    import io
    import runpy
    import traceback
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, list(sys.path)
    sys.argv = list(argv[1:])
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[1])))   # as `python script.py` puts it first
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter('default')
            try:
                runpy.run_path(argv[1], run_name='__main__')
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = saved
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *needles):
    """Exit 2, no traceback, last stderr line ``error: ...`` containing every needle."""
    report = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-1500:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, report
    assert 'Traceback' not in proc.stderr, report
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: '), report
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def collect_args(data_root, cache, ckp, *out, extra=()):
    """feature_collect.py's parsed flags for the fixture CIFAR-10 and the given OOD sets, on the CPU."""
    from CSD import feature_collect
    return feature_collect.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(ckp), '--name', 'h', '--data-root', str(data_root),
        '--cache-dir', str(cache), '--num-workers', '0', '--batch-size', '16', '--device', 'cpu',
        '--out-datasets', *map(str, out), *extra])
