"""Hardening: bad input, damaged data, untrusted checkpoints, interruptions, determinism,
and the metrics under fuzzing.

CLI cases run the real entry scripts (as subprocesses, or their ``__main__`` in this process)
and check what a user sees: one ``error: `` line last on stderr, exit status 2, no traceback. Subprocesses run
single-threaded (``OMP_NUM_THREADS=1``): two of them share this machine's two cores without
oversubscribing, and training runs compared bit for bit use the same kernels.
"""
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from CSD import feature_collect
from tests.fixtures import Killed, tiny_train_argv, write_image_folder, write_svhn_mat, write_truncated_image
from tests.test_e2e_csd import authors_checkpoint
from util import ood as ood_lib
from util.checkpoint import read_checkpoint, save_checkpoint
from util.errors import UserError, run_cli
from util.metrics import cal_metric

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


class Evil:
    """Pickles to ``os.system(command)``: loading it with plain ``pickle`` runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def malicious_checkpoint(path, marker, how='torch'):
    """A checkpoint that looks like ours but creates ``marker`` when unpickled."""
    obj = {'model': {'w': torch.zeros(2)}, 'epoch': 1, 'opt': Evil(f"touch '{marker}'")}
    if how == 'torch':
        torch.save(obj, path)
    else:  # a bare pickle, as torch.save's legacy format and many hand-made files are
        with open(path, 'wb') as f:
            pickle.dump(obj, f, protocol=2)
    return path


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """A real checkpoint (the authors' layout, width 8), its first half, and a malicious one."""
    d = tmp_path_factory.mktemp('ckpts')
    authors_checkpoint(d / 'ckpt.pth')
    raw = (d / 'ckpt.pth').read_bytes()
    (d / 'half.pth').write_bytes(raw[:len(raw) // 2])
    malicious_checkpoint(d / 'evil.pth', d / 'PWNED')
    (d / 'notes.txt').write_text('this is not a checkpoint\n')
    (d / 'a_run_folder').mkdir()
    ck = torch.load(d / 'ckpt.pth', weights_only=False)
    ck['model'] = {k: (torch.full_like(v, float('nan')) if v.is_floating_point() else v) for k, v in ck['model'].items()}
    torch.save(ck, d / 'nan.pth')   # a diverged run's weights
    return d


# ---------------------------------------------------------------- 1. bad input -> one line, exit 2
@pytest.fixture(scope='module')
def cli_errors(data_root, ckpts, tmp_path_factory):
    """Every bad-input case through the real CLIs, run concurrently once for this module."""
    work = tmp_path_factory.mktemp('cli')
    (work / 'empty_folder').mkdir()
    py = sys.executable
    csd = [py, str(REPO / 'CSD' / 'CSD.py'), '--in-dataset', 'CIFAR-10', '--num-workers', '0', '--device', 'cpu',
           '--cache-dir', str(work / 'cache'), '--output-dir', str(work / 'results')]
    collect = [py, str(REPO / 'CSD' / 'feature_collect.py'), *csd[2:-2]]
    good = ['--ckp', str(ckpts / 'ckpt.pth'), '--data-root', str(data_root)]
    cmds = {
        'missing_data_root': collect + ['--ckp', str(ckpts / 'ckpt.pth'), '--data-root', str(work / 'no_such_root'),
                                        '--out-datasets', 'SVHN'],
        'empty_ood_folder': csd + good + ['--out-datasets', 'SVHN', str(work / 'empty_folder')],
        'wrong_model_arch': csd + good + ['--model-arch', 'resnet18-ce', '--out-datasets', 'SVHN'],
        'truncated_ckpt': collect + ['--ckp', str(ckpts / 'half.pth'), '--data-root', str(data_root)],
        'unknown_ood_name': collect + good + ['--out-datasets', 'SVHN', 'dtd', 'Textures2',
                                              '--cache-dir', str(work / 'cache_unknown')],
        'malicious_ckpt': csd + ['--ckp', str(ckpts / 'evil.pth'), '--data-root', str(data_root)],
        'text_ckpt': csd + ['--ckp', str(ckpts / 'notes.txt'), '--data-root', str(data_root), '--out-datasets', 'SVHN'],
        'dir_ckpt': csd + ['--ckp', str(ckpts / 'a_run_folder'), '--data-root', str(data_root), '--out-datasets', 'SVHN'],
        'k_zero': csd + good + ['--out-datasets', 'SVHN', '--method', 'knn', '--k', '0'],
        'nan_ckpt': csd + ['--ckp', str(ckpts / 'nan.pth'), '--data-root', str(data_root), '--out-datasets', 'SVHN',
                           '--cache-dir', str(work / 'cache_nan')],
        'train_wrong_model_for_ckp': [
            py, str(REPO / 'ALPA' / 'main_supcon.py'), '--dataset', 'cifar10', '--data_folder', str(data_root),
            '--model', 'resnet34', '--width', '8', '--batch_size', '8', '--epochs', '1', '--num_workers', '0',
            '--device', 'cpu', '--save_folder', str(work / 'save'), '--alpa_finetune', '--ckp', str(ckpts / 'ckpt.pth')],
    }
    # Two through a real fresh interpreter (each entry script's __main__ wiring is run that way
    # elsewhere too); the rest in this process, the same code from the flags on.
    in_process = [name for name in cmds if name not in ('missing_data_root', 'malicious_ckpt')]
    return {'work': work, **run_all(cmds, cwd=work, in_process=in_process)}


def test_cli_missing_dataset_directory(cli_errors):
    last = assert_one_line_error(cli_errors['missing_data_root'], 'CIFAR-10 not found at', 'no_such_root',
                                 'cifar-10-batches-py')
    assert '--download' in last   # says what to do


def test_cli_empty_image_folder_as_ood_set(cli_errors):
    assert_one_line_error(cli_errors['empty_ood_folder'], 'no images in', 'empty_folder')


def test_cli_wrong_model_arch_names_the_keys(cli_errors):
    # A SupCon checkpoint read as CE: its head is set aside with a note, the missing fc is the error.
    assert_one_line_error(cli_errors['wrong_model_arch'], 'does not match this architecture',
                          'missing: fc.weight', '--model-arch')
    assert 'ignoring head.0.bias' in cli_errors['wrong_model_arch'].stdout


def test_cli_text_file_as_checkpoint(cli_errors):
    assert_one_line_error(cli_errors['text_ckpt'], 'notes.txt', 'not a PyTorch checkpoint')


def test_cli_directory_as_checkpoint(cli_errors):
    assert_one_line_error(cli_errors['dir_ckpt'], 'a_run_folder', 'is a directory', 'last.pth')


def test_cli_k_zero_is_an_error(cli_errors):
    assert_one_line_error(cli_errors['k_zero'], '--k 0', 'k >= 1')


def test_cli_nan_weights_stop_extraction(cli_errors):
    assert_one_line_error(cli_errors['nan_ckpt'], 'nan.pth', 'non-finite')
    assert 'FPR' not in cli_errors['nan_ckpt'].stdout   # no table of FPR 0.00 / AUROC 50.00


def test_cli_truncated_checkpoint(cli_errors):
    assert_one_line_error(cli_errors['truncated_ckpt'], 'half.pth', 'corrupt or truncated')


def test_cli_unknown_ood_name_fails_before_any_extraction(cli_errors):
    proc = cli_errors['unknown_ood_name']
    last = assert_one_line_error(proc, "unknown OOD dataset 'Textures2'")
    for known in ood_lib.OOD_DATASETS:
        assert known in last
    # Checked up front: no split was extracted or cached before the typo was reported.
    assert '[features]' not in proc.stdout and '[cache]' not in proc.stdout, proc.stdout
    assert not (cli_errors['work'] / 'cache_unknown').exists()


def test_cli_training_with_a_checkpoint_of_another_model(cli_errors):
    assert_one_line_error(cli_errors['train_wrong_model_for_ckp'], 'ckpt.pth does not match this architecture',
                          'missing: encoder.layer1.2', '--model')


def test_ood_names_are_resolved_without_reading_data(data_root, tmp_path):
    """Aliases, case, ``<id>-heldout`` spellings and existing folders pass the up-front check;
    anything else is a UserError listing the known names."""
    assert ood_lib.resolve_ood_name('svhn') == 'SVHN'
    assert ood_lib.resolve_ood_name('Textures') == 'dtd'
    assert ood_lib.resolve_ood_name('cifar10-heldout') == 'CIFAR-10-heldout'
    assert ood_lib.resolve_ood_name(str(data_root / 'my_ood_folder')) == str(data_root / 'my_ood_folder')
    with pytest.raises(UserError, match=r"unknown OOD dataset '.*my_ood_folder_typo'.*SVHN, dtd"):
        ood_lib.resolve_ood_name(str(data_root / 'my_ood_folder_typo'))
    with pytest.raises(UserError, match="unknown in-distribution dataset 'cifar11'"):
        ood_lib.resolve_ood_name('cifar11-heldout')


# ---------------------------------------------------------------- 2. damaged data
def collect_args(data_root, cache, ckp, *out, extra=()):
    return feature_collect.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(ckp), '--name', 'h', '--data-root', str(data_root),
        '--cache-dir', str(cache), '--num-workers', '0', '--batch-size', '16', '--device', 'cpu',
        '--out-datasets', *map(str, out), *extra])


def test_damaged_ood_folder_is_collected_with_every_bad_file_reported(data_root, ckpts, tmp_path, capsys):
    good = write_image_folder(str(tmp_path / 'damaged'), 4)              # img_0000..0003.png
    bad = {'img_0004_garbage.png': b'this is not a png at all',
           'img_0005_cut.jpg': None, 'notes.txt': b'not an image', '.DS_Store': b'\x00\x00\x00\x01Bud1'}
    for name, content in bad.items():
        if content is None:
            write_truncated_image(str(tmp_path / 'damaged' / name), ext='jpg')
        else:
            (tmp_path / 'damaged' / name).write_bytes(content)
    (tmp_path / 'clean').mkdir()
    for p in good:
        shutil.copy(p, tmp_path / 'clean')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        splits = feature_collect.main(collect_args(data_root, tmp_path / 'cache', ckpts / 'ckpt.pth',
                                                   tmp_path / 'damaged', tmp_path / 'clean'))
    out = capsys.readouterr().out
    messages = [str(w.message) for w in caught]
    for name in bad:
        assert any(name in m for m in messages), f"no warning names {name}: {messages}"
    # The printed summary counts both kinds: undecodable images and non-image files.
    assert f"{tmp_path / 'damaged'}: skipped 2 of 6 unreadable files" in out, out
    assert f"{tmp_path / 'damaged'}: ignored 2 non-image files (.DS_Store, notes.txt)" in out, out
    damaged, clean = splits['damaged'], splits['clean']
    assert damaged['meta']['n'] == 4 and damaged['meta']['skipped'] == 2
    assert damaged['features'].shape == clean['features'].shape == (4, 6, 64)
    np.testing.assert_array_equal(damaged['features'], clean['features'])   # exactly the good images

    # A folder where nothing can be read is a one-line user error, not a traceback.
    (tmp_path / 'all_bad').mkdir()
    (tmp_path / 'all_bad' / 'a.png').write_bytes(b'garbage')
    write_truncated_image(str(tmp_path / 'all_bad' / 'b.png'))
    args = collect_args(data_root, tmp_path / 'cache', ckpts / 'ckpt.pth', tmp_path / 'all_bad')
    with warnings.catch_warnings(), pytest.raises(SystemExit) as e:
        warnings.simplefilter('ignore')
        run_cli(feature_collect.main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith('error: none of the 2 images of all_bad could be read')


# ---------------------------------------------------------------- 3. untrusted checkpoints
@pytest.mark.parametrize('how', ['torch', 'pickle'])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / 'PWNED'
    path = malicious_checkpoint(tmp_path / f'evil_{how}.pth', marker, how)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # torch notes the bare pickle's protocol
        with pytest.raises(UserError, match=r"refusing to load .*evil_.*could run code"):
            read_checkpoint(str(path))
    assert not marker.exists()
    # The same file under plain pickle does run the command: the guard above is what stops it.
    if how == 'pickle':
        with open(path, 'rb') as f:
            pickle.load(f)
        assert marker.exists()


def test_cli_refuses_checkpoint_that_would_run_code(cli_errors, ckpts):
    assert_one_line_error(cli_errors['malicious_ckpt'], 'refusing to load', 'evil.pth', 'could run code')
    assert not (ckpts / 'PWNED').exists()


# ---------------------------------------------------------------- 4. interrupted training
def train_cmd(data_root, save, *extra):
    return [sys.executable, str(REPO / 'ALPA' / 'main_supcon.py'),
            *tiny_train_argv(data_root, save, '--device', 'cpu', '--alpa_train', *extra)]


def _saves_seen(run_root, seen):
    """Record each new version of ``last.pth`` (a new inode/mtime per atomic rename)."""
    for p in run_root.glob('SupCon/cifar10_models/*/last.pth'):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        seen.add((st.st_ino, st.st_mtime_ns))
    return seen


@pytest.mark.slow
def test_training_killed_at_random_then_resumed_equals_uninterrupted(data_root, tmp_path):
    """SIGKILL at a random moment of a long run, then ``--resume auto`` for one more epoch,
    equals a run of that many epochs straight through. Independent of the machine's speed:
    wherever the kill lands, the comparison run is made for the epoch reached (step decay,
    so the run's total epochs do not enter its schedule or its fingerprint)."""
    rng = random.Random(1)
    after_saves, delay = rng.choice([1, 2]), rng.uniform(0.0, 0.15)
    victim = subprocess.Popen(train_cmd(data_root, tmp_path / 'victim', '--epochs', '1000'), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=str(tmp_path), env=ENV)
    seen, deadline = set(), time.time() + 240
    while len(_saves_seen(tmp_path / 'victim', seen)) < after_saves:
        assert victim.poll() is None, f"run ended before its checkpoint {after_saves}: {victim.communicate()}"
        assert time.time() < deadline
        time.sleep(0.002)
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    last = next((tmp_path / 'victim').glob('SupCon/cifar10_models/*/last.pth'))
    killed_at = read_checkpoint(str(last))['epoch']     # loadable: the kill never leaves half a file
    assert killed_at >= after_saves
    target = str(killed_at + 1)
    resumed = subprocess.run(train_cmd(data_root, tmp_path / 'victim', '--epochs', target, '--resume', 'auto'),
                             capture_output=True, text=True, cwd=str(tmp_path), env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {killed_at + 1}" in resumed.stdout
    straight = subprocess.run(train_cmd(data_root, tmp_path / 'straight', '--epochs', target),
                              capture_output=True, text=True, cwd=str(tmp_path), env=ENV, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = read_checkpoint(str(next((tmp_path / 'straight').glob('SupCon/cifar10_models/*/last.pth'))))
    b = read_checkpoint(str(last))
    assert a['epoch'] == b['epoch'] == killed_at + 1
    for part in ('model', 'attention'):
        assert set(a[part]) == set(b[part])
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs (killed after epoch {killed_at})"


def test_corrupt_image_in_path_training_is_skipped_and_named(tmp_path):
    for c in ('cat', 'dog'):
        write_image_folder(str(tmp_path / 'data' / c), 4, size=36, seed=len(c))
    write_truncated_image(str(tmp_path / 'data' / 'dog' / 'zz_broken.jpg'))
    proc = subprocess.run([sys.executable, str(REPO / 'ALPA' / 'main_ce.py'), '--dataset', 'path',
                           '--data_folder', str(tmp_path / 'data'), '--mean', '0.5,0.5,0.5', '--std', '0.25,0.25,0.25',
                           '--width', '4', '--batch_size', '3', '--epochs', '1', '--num_workers', '0', '--device', 'cpu',
                           '--save_folder', str(tmp_path / 'save'), '--eval_knn', '-1'],
                          capture_output=True, text=True, cwd=str(tmp_path), env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'skipping unreadable image' in proc.stderr and 'zz_broken.jpg' in proc.stderr


def _old_checkpoint(path):
    old = {'epoch': 1, 'model': {'w': torch.arange(6.0), 'b': torch.ones(2, 3)}}
    save_checkpoint(old, str(path))
    return old


def _assert_same(ck, old):
    assert ck['epoch'] == old['epoch']
    assert set(ck['model']) == set(old['model'])
    assert all(torch.equal(ck['model'][k], v) for k, v in old['model'].items())


def test_checkpoint_write_that_fails_keeps_the_previous_one(tmp_path):
    path = tmp_path / 'last.pth'
    old = _old_checkpoint(path)
    with pytest.raises(Exception):   # a lambda cannot be pickled: torch.save fails half way
        save_checkpoint({'epoch': 2, 'model': {'w': torch.zeros(6)}, 'hook': lambda: 0}, str(path))
    _assert_same(read_checkpoint(str(path)), old)
    assert sorted(os.listdir(tmp_path)) == ['last.pth']   # the temporary file was removed


KILLED_MID_WRITE = """
import io, os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from util.checkpoint import save_checkpoint
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)   # killed mid-write: no finally, no cleanup
torch.save = dying_save
save_checkpoint({'epoch': 2, 'model': {'w': torch.zeros(6), 'b': torch.zeros(2, 3)}}, sys.argv[2])
"""


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    path = tmp_path / 'last.pth'
    old = _old_checkpoint(path)
    proc = subprocess.run([sys.executable, '-c', KILLED_MID_WRITE, str(REPO), str(path)], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stray = [f for f in os.listdir(tmp_path) if f != 'last.pth']
    assert len(stray) == 1 and stray[0].startswith('last.pth.tmp'), stray   # the kill did land mid-write
    _assert_same(read_checkpoint(str(path)), old)
    with pytest.raises(UserError, match='corrupt or truncated'):
        read_checkpoint(str(tmp_path / stray[0]))
    # The next save replaces last.pth and is read back, whatever the stray file holds.
    save_checkpoint({'epoch': 3, 'model': {'w': torch.full((6,), 3.0)}}, str(path))
    assert read_checkpoint(str(path))['epoch'] == 3


# ---------------------------------------------------------------- 5. interrupted feature collection
def _assert_splits_equal(a, b):
    assert set(a) == set(b)
    for name in a:
        for part in ('features', 'labels'):
            np.testing.assert_array_equal(a[name][part], b[name][part], err_msg=f"{name}/{part}")


def test_interrupted_feature_cache_is_never_served(data_root, ckpts, tmp_path, capsys, monkeypatch):
    ckp = ckpts / 'ckpt.pth'
    args = lambda cache, *extra: collect_args(data_root, cache, ckp, 'SVHN', extra=extra)
    clean = feature_collect.main(args(tmp_path / 'clean'))

    # (a) killed while writing the 'test' split, after its first batch reached the disk: the
    # store is not visible under its name, and the rerun resumes it (the train store is reused).
    from util import store as store_lib
    monkeypatch.setattr(store_lib, 'BLOCK', 1)
    real_iter, calls = store_lib.iter_features, []

    def dying_iter(model, batches, *a, **k):   # splits go train, test, SVHN: the 2nd call is 'test'
        calls.append(1)
        for j, out in enumerate(real_iter(model, batches, *a, **k)):
            if len(calls) == 2 and j == 1:
                raise Killed
            yield out
    monkeypatch.setattr(store_lib, 'iter_features', dying_iter)
    with pytest.raises(Killed):
        feature_collect.main(args(tmp_path / 'c'))
    monkeypatch.setattr(store_lib, 'iter_features', real_iter)
    stores = [p for p in (tmp_path / 'c').rglob('test-*') if p.is_dir()]   # (test-<key>.lock: the writer's lock)
    assert stores and all(p.name.endswith('.partial') for p in stores), stores   # only the half-written folder
    capsys.readouterr()
    rerun = feature_collect.main(args(tmp_path / 'c'))
    out = capsys.readouterr().out
    assert '[cache] train' in out and 'resuming test-' in out and '1 of 2 batches' in out, out
    _assert_splits_equal(rerun, clean)

    # (b) killed while --force replaces a finished cache (the old folder half deleted).
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *a, **k):
        if '.partial' in Path(path).name or not Path(path).exists():
            return real_rmtree(path, *a, **k)
        os.remove(Path(path) / 'features.npy')   # the first file goes, then the kill
        raise Killed
    monkeypatch.setattr(shutil, 'rmtree', dying_rmtree)
    with pytest.raises(Killed):
        feature_collect.main(args(tmp_path / 'c', '--force'))
    monkeypatch.setattr(shutil, 'rmtree', real_rmtree)
    _assert_splits_equal(feature_collect.main(args(tmp_path / 'c')), clean)

    # (c) a finished cache damaged afterwards (an array missing) is recomputed, not a crash.
    train_dir = next(p for p in (tmp_path / 'c' / 'CIFAR-10' / 'h').iterdir()
                     if p.name.startswith('train-') and '.' not in p.name)
    os.remove(train_dir / 'features.npy')
    capsys.readouterr()
    with pytest.warns(UserWarning, match='damaged feature store'):
        again = feature_collect.main(args(tmp_path / 'c'))
    assert '[features] train' in capsys.readouterr().out
    _assert_splits_equal(again, clean)


def test_cache_key_covers_every_input():
    base = dict(ckp_hash='a' * 64, arch='resnet18-supcon', in_dataset='CIFAR-10', split='train',
                transform='T', id_classes=None, max_train=None, source='/data')
    key = feature_collect.cache_key(**base)
    assert feature_collect.cache_key(**base) == key
    for field, other in [('ckp_hash', 'b' * 64), ('arch', 'resnet18-ce'), ('in_dataset', 'CIFAR-100'),
                         ('split', 'test'), ('transform', 'T2'), ('id_classes', [0, 1]), ('max_train', 10),
                         ('source', '/other')]:
        assert feature_collect.cache_key(**{**base, field: other}) != key, field
    # max_train only changes the bank
    assert feature_collect.cache_key(**{**base, 'split': 'SVHN', 'max_train': 10}) == \
        feature_collect.cache_key(**{**base, 'split': 'SVHN'})
    # max_ood only changes the OOD sets
    assert feature_collect.cache_key(**{**base, 'split': 'SVHN', 'max_ood': 10}) != \
        feature_collect.cache_key(**{**base, 'split': 'SVHN'})
    assert feature_collect.cache_key(**{**base, 'max_ood': 10}) == key
    assert feature_collect.cache_key(**{**base, 'split': 'test', 'max_ood': 10}) == \
        feature_collect.cache_key(**{**base, 'split': 'test'})


def test_cache_is_recomputed_when_id_classes_transform_or_data_change(data_root, ckpts, tmp_path, capsys,
                                                                        monkeypatch):
    ckp, cache = ckpts / 'ckpt.pth', tmp_path / 'cache'
    run = lambda root=data_root, *extra: feature_collect.main(collect_args(root, cache, ckp, 'SVHN', extra=extra))
    first = run()
    capsys.readouterr()
    run()
    assert capsys.readouterr().out.count('[cache]') == 3          # the same inputs do hit

    by_class = run(data_root, '--id-classes', '0', '1', '2', '3', '4')
    assert capsys.readouterr().out.count('[cache]') == 0
    assert by_class['train']['features'].shape[0] == 20 and set(by_class['train']['labels']) == set(range(5))

    other = run(data_root, '--test-norm', '(0.5,0.5,0.5),(0.25,0.25,0.25)')   # another Normalize
    assert capsys.readouterr().out.count('[cache]') == 0
    assert not np.allclose(other['train']['features'], first['train']['features'])

    # The same names under another --data-root (another copy of the data) are not served old features.
    root2 = tmp_path / 'root2'
    shutil.copytree(data_root / 'cifar-10-batches-py', root2 / 'cifar-10-batches-py')
    write_svhn_mat(str(root2 / 'ood_data' / 'svhn' / 'selected_test_32x32.mat'), n=12, seed=1)
    moved = run(root2)
    assert capsys.readouterr().out.count('[cache]') == 0
    np.testing.assert_array_equal(moved['train']['features'], first['train']['features'])
    assert not np.allclose(moved['SVHN']['features'], first['SVHN']['features'])


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


# ---------------------------------------------------------------- 7. metrics under fuzzing
_finite = st.floats(allow_nan=False, allow_infinity=False)
_scores = st.one_of(
    st.lists(_finite, min_size=1, max_size=60),                                     # anything finite
    st.lists(st.sampled_from([-1.7976931348623157e308, -1e300, -0.0, 0.0, 5e-324, 1e300, 1.7976931348623157e308]),
             min_size=1, max_size=60),                                              # extremes, ±0, subnormal
    st.lists(st.integers(-2, 2).map(float), min_size=1, max_size=60),              # heavy ties
    st.integers(1, 60).map(lambda n: [0.5] * n),                                    # all one value
)


@settings(max_examples=200, deadline=None)
@given(known=_scores, novel=_scores)
def test_metrics_fuzz(known, novel):
    known, novel = np.array(known), np.array(novel)
    k0, n0 = known.copy(), novel.copy()
    with warnings.catch_warnings(), np.errstate(over='raise', divide='raise', invalid='raise'):
        warnings.simplefilter('error')   # an overflow warning on valid scores counts as a failure
        m = cal_metric(known, novel, ood_positive_fpr=True)
        swapped = cal_metric(novel, known)
    assert set(m) == {'FPR', 'AUROC', 'AUIN', 'AUOUT', 'DTERR', 'FPR_OODpos'}
    for name, v in m.items():
        assert isinstance(v, float) and 0.0 <= v <= 1.0, (name, v)
    assert abs(swapped['AUROC'] - (1.0 - m['AUROC'])) <= 1e-9
    np.testing.assert_array_equal(known, k0)   # inputs untouched
    np.testing.assert_array_equal(novel, n0)
