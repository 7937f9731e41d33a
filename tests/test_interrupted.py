"""Interrupted runs: training killed at any point resumes to the same weights, a checkpoint
write that fails or is killed keeps the previous file, and an interrupted or outdated feature
cache is never served."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from CSD import feature_collect
from tests.clitools import ENV, REPO, collect_args
from tests.fixtures import (
    Killed,
    tiny_train_argv,
    write_svhn_mat,
)
from util.checkpoint import read_checkpoint, save_checkpoint
from util.errors import UserError


# ---------------------------------------------------------------- 4. interrupted training
def train_cmd(data_root, save, *extra):
    return [sys.executable, str(REPO / 'ALPA' / 'main_supcon.py'),
            *tiny_train_argv(data_root, save, '--device', 'cpu', '--alpa-train', *extra)]


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
