"""The on-disk feature store (issue 12): streamed, resumable, visible only when complete,
every image once under torchrun and byte-identical to one process, memory flat in N."""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from tests.fixtures import Killed
from util import store as store_lib
from util.data import collate_skip_none
from util.features import collect_features
from util.networks import SupConResNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Images(torch.utils.data.Dataset):
    """n seeded random 3×16×16 images; ``bad`` indices are unreadable (None); ``seen`` counts reads;
    reading index ``kill_at`` raises ``Killed``."""

    def __init__(self, n, bad=(), seed=0, kill_at=None):
        self.x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32))
        self.bad, self.seen, self.name, self.kill_at = set(bad), [], 'images', kill_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.kill_at:
            raise Killed(i)
        self.seen.append(i)
        return None if i in self.bad else (self.x[i], i % 5)


def tiny_model():
    torch.manual_seed(0)
    return SupConResNet('resnet18', width=4).eval()


def write(path, dataset, **kw):
    kw = {'batch_size': 8, 'key': 'k', **kw}
    return store_lib.write_store(path, tiny_model(), dataset, torch.device('cpu'), log=lambda *a: None, **kw)


def test_store_equals_in_memory_extraction_and_fp16_is_its_rounding(tmp_path):
    ds = Images(30)
    ref = collect_features(tiny_model(), torch.utils.data.DataLoader(ds, batch_size=8), 'cpu')
    fp32 = write(tmp_path / 'a', ds, dtype='fp32')
    fp16 = write(tmp_path / 'b', ds)
    assert isinstance(fp32['features'], np.memmap) and fp16['features'].dtype == np.float16
    np.testing.assert_array_equal(fp32['features'], ref['features'])
    np.testing.assert_array_equal(fp16['features'], ref['features'].astype(np.float16))
    np.testing.assert_array_equal(fp32['labels'], ref['labels'])
    assert fp32['meta']['n'] == 30 and fp16['meta']['dtype'] == 'fp16'
    assert sorted(os.listdir(tmp_path / 'a')) == ['features.npy', 'labels.npy', 'meta.json']


def test_interrupted_extraction_resumes_and_reads_every_image_once(tmp_path):
    ds = Images(60)                                                   # 8 batches of 8 (the last of 4)
    clean = write(tmp_path / 'clean', ds, dtype='fp32')
    ds.seen.clear()
    ds.kill_at = 40                                                   # killed while reading batch 6
    with pytest.raises(Killed):
        write(tmp_path / 's', ds, dtype='fp32', block=2)
    assert not (tmp_path / 's').exists() and (tmp_path / 's.partial').is_dir()     # never visible half-written
    assert store_lib.load_store(tmp_path / 's') is None
    done = np.load(tmp_path / 's.partial' / 'done.npy')
    assert done.tolist() == [1] * 4 + [0] * 4                         # blocks of 2: batch 5 was not flushed
    ds.seen.clear()
    ds.kill_at = None
    logs = []
    again = store_lib.write_store(tmp_path / 's', tiny_model(), ds, torch.device('cpu'), batch_size=8, key='k',
                                  dtype='fp32', log=logs.append)
    assert 'resuming s: 4 of 8 batches already on disk' in logs[0]
    assert sorted(set(ds.seen) - {0}) == list(range(32, 60))         # only the missing batches (+ the shape probe)
    for part in ('features', 'labels'):
        np.testing.assert_array_equal(again[part], clean[part])
    # a partial store of other inputs (another key) is started over, not mixed in
    ds.kill_at = 24
    with pytest.raises(Killed):
        write(tmp_path / 't', ds, dtype='fp32', block=1)
    assert np.load(tmp_path / 't.partial' / 'done.npy').sum() == 3
    ds.kill_at = None
    other = store_lib.write_store(tmp_path / 't', tiny_model(), ds, torch.device('cpu'), batch_size=8, key='other',
                                  dtype='fp32', log=logs.append)
    assert 'resuming t' not in ' '.join(logs)
    np.testing.assert_array_equal(other['features'], clean['features'])


def test_unreadable_images_are_dropped_with_their_bank_indices(tmp_path):
    ds = Images(20, bad={3, 8, 9, 10, 11, 12, 13, 14, 15})          # batch 1 (8..15) entirely unreadable
    keep = np.arange(100, 120)
    out = write(tmp_path / 's', ds, dtype='fp32', indices=keep)
    good = [i for i in range(20) if i not in ds.bad]
    assert out['meta']['n'] == len(good) and out['meta']['skipped'] == 9
    np.testing.assert_array_equal(out['indices'], keep[good])
    ref = collect_features(tiny_model(), torch.utils.data.DataLoader(
        Images(20), batch_size=8, collate_fn=collate_skip_none), 'cpu')
    np.testing.assert_array_equal(out['labels'], ref['labels'][good])
    np.testing.assert_allclose(out['features'], ref['features'][good], rtol=1e-5, atol=1e-6)


def test_fp16_overflow_stores_that_split_in_fp32(tmp_path):
    """Features past fp16's range (in a late batch, after fp16 rows were written) send the split
    to fp32 by itself: one line, meta.json says so, and the rows are the fp32 forward pass."""
    class Huge(SupConResNet):
        def forward_features(self, x):
            fmap = super().forward_features(x)
            return fmap + 1e5 * (x[:, :1, :1, :1] > 1.0)   # only some images overflow
    torch.manual_seed(0)
    model, ds, lines = Huge('resnet18', width=4), Images(24), []
    out = store_lib.write_store(tmp_path / 's', model, ds, torch.device('cpu'), batch_size=8, block=1,
                                log=lines.append)
    assert out['features'].dtype == np.float32 and out['meta']['dtype'] == 'fp32' and out['meta']['fp16_overflow']
    assert [line for line in lines if 'storing this split in fp32' in line] and np.abs(out['features']).max() > 65504
    ref = collect_features(model, torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_skip_none), 'cpu')
    np.testing.assert_allclose(out['features'], ref['features'], rtol=1e-6)
    # A model that stays in range keeps the fp16 default and says nothing of fp32.
    plain = store_lib.write_store(tmp_path / 't', SupConResNet('resnet18', width=4), Images(8), torch.device('cpu'),
                                  batch_size=8, log=lines.append)
    assert plain['features'].dtype == np.float16 and 'fp16_overflow' not in plain['meta']


def test_shares_split_what_is_left_evenly():
    """Every remaining batch once, in contiguous even runs, whatever was done before (a resume
    with another process count)."""
    done = np.zeros(10, np.uint8)
    done[:6] = 1                                   # one process did 6 of 10, then 4 processes resume
    shares = [store_lib.share(done, r, 4) for r in range(4)]
    assert shares == [[6], [7], [8], [9]]
    done[:] = 0
    done[[0, 1, 5]] = 1
    for world in (1, 2, 3, 7):
        shares = [store_lib.share(done, r, world) for r in range(world)]
        assert sorted(b for s in shares for b in s) == [2, 3, 4, 6, 7, 8, 9]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_extraction_memory_does_not_grow_with_the_dataset(tmp_path):
    """numpy's peak allocation while extracting (tracemalloc sees every numpy buffer) is the
    same for 256 and 2048 images: batches go to disk, nothing accumulates."""
    peaks = []
    for n in (256, 2048):
        ds = Images(n)
        tracemalloc.start()
        write(tmp_path / f's{n}', ds, batch_size=32, dtype='fp32')
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    held = 2048 * 6 * 32 * 4                                          # what an in-memory [N, 6, C] would take
    assert peaks[1] < peaks[0] + held / 4, peaks


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_byte_for_byte(data_root, tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU): each rank extracts its contiguous run of
    batches, says so, and the stores are byte-identical to one process's."""
    from tests.fixtures import authors_checkpoint
    authors_checkpoint(tmp_path / 'ck.pth')
    argv = ['CSD/feature_collect.py', '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ck.pth'), '--name', 'r',
            '--data-root', str(data_root), '--num-workers', '0', '--batch-size', '8', '--device', 'cpu',
            '--out-datasets', 'SVHN', 'dtd']
    env = {**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1'}
    one = subprocess.run([sys.executable, *argv, '--cache-dir', str(tmp_path / 'one')], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *argv,
                          '--cache-dir', str(tmp_path / 'two')], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr + two.stdout
    for r in (0, 1):
        assert f'rank {r}/2: ' in two.stdout, two.stdout
    # 40 train images = 5 batches of 8: rank 0 takes batches 0-1 (16 images), rank 1 batches 2-4 (24)
    assert 'rank 0/2: 16 images' in two.stdout and 'rank 1/2: 24 images' in two.stdout, two.stdout
    a = sorted(p.relative_to(tmp_path / 'one') for p in (tmp_path / 'one').rglob('*.npy'))
    b = sorted(p.relative_to(tmp_path / 'two') for p in (tmp_path / 'two').rglob('*.npy'))
    assert a == b and len(a) >= 8
    for rel in a:
        assert (tmp_path / 'one' / rel).read_bytes() == (tmp_path / 'two' / rel).read_bytes(), rel
    metas = [json.loads(p.read_text()) for p in (tmp_path / 'two').rglob('meta.json')]
    assert sorted(m['split'] for m in metas) == ['SVHN', 'dtd', 'test', 'train']
    # CSD.py under torchrun reads the same stores and prints its tables once (rank 0 scores)
    score = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                            'CSD/CSD.py', *argv[1:], '--cache-dir', str(tmp_path / 'two'), '--method', 'csd', '--k', '3',
                            '--output-dir', str(tmp_path / 'res')], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert score.returncode == 0, score.stderr[-3000:]
    assert score.stdout.count('CSD (k=3)') == 1 and score.stdout.count('[cache]') == 4, score.stdout


def test_a_second_writer_waits_for_the_first_and_uses_its_store(tmp_path, monkeypatch):
    """Two jobs asking for one store: the second waits on <store>.lock, then returns the
    store the first finished without extracting anything itself."""
    import fcntl
    import threading
    ds = Images(20)
    ref = write(tmp_path / 'ref', ds, dtype='fp32')
    target = tmp_path / 'shared'
    held = open(tmp_path / 'shared.lock', 'a')
    fcntl.flock(held, fcntl.LOCK_EX)                      # "the first job" holds the lock ...
    logs, result = [], {}

    def second():
        result['store'] = store_lib.write_store(target, tiny_model(), ds, torch.device('cpu'), batch_size=8, key='k',
                                                dtype='fp32', log=logs.append)

    def no_extraction(*a, **k):
        raise AssertionError('the waiting job extracted features itself')
    monkeypatch.setattr(store_lib, 'iter_features', no_extraction)
    t = threading.Thread(target=second)
    t.start()
    t.join(timeout=1.0)
    assert t.is_alive() and any('another process is writing shared' in m for m in logs)
    import shutil
    shutil.copytree(tmp_path / 'ref', target)             # ... finishes the store and lets go
    held.close()
    t.join(timeout=30)
    assert not t.is_alive()
    np.testing.assert_array_equal(result['store']['features'], ref['features'])
    assert any('written meanwhile by another process' in m for m in logs)
