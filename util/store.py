"""The feature store: one split's features, labels and logits as ``.npy`` files on disk,
written batch by batch, so extraction memory does not grow with the dataset.

    <split>-<key>/            the finished store (read memory-mapped by ``load_store``)
        features.npy          [N, 6, C] fp16 (default) or fp32
        labels.npy            [N] int64
        logits.npy            [N, K] fp32 (models with a classifier)
        indices.npy           [N] rows of the bank -> images of the training set (a sampled bank)
        meta.json
    <split>-<key>.partial/    while it is written: the same arrays at full size, plus
        state.json            what is being written (key, images, batch size, shapes)
        valid.npy [N] uint8   1 where the image was read (unreadable images are dropped at the end)
        done.npy  [B] uint8   1 for every batch whose rows are on disk

Images go in batches of ``batch_size`` in dataset order; batch ``b`` holds images
``[b·bs, (b+1)·bs)`` whichever process computes it, so one process and ``torchrun`` with N
processes run the very same forward passes (the store is byte-identical). Each process
takes a contiguous run of batches (no DistributedSampler padding: every image once). Every
``block`` batches the rows are flushed to disk and only then marked done, so a killed run
resumes from its last complete block. The folder gets its real name (one rename) only once
every batch is done: a reader never sees a half-written store.
"""
import fcntl
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from util import distributed as dist_lib
from util.data import collate_skip_none
from util.errors import UserError
from util.features import exact_fp32, iter_features
from util.misc import atomic_path

STORE_DTYPES = {'fp16': np.float16, 'fp32': np.float32}
FP16_MAX = float(np.finfo(np.float16).max)
BLOCK = 16   # batches between flushes: a killed run loses at most this many


class IndexedDataset(torch.utils.data.Dataset):
    """``(image, label, index)`` for every readable item of ``dataset``; ``None`` stays ``None``
    (an unreadable image, dropped by ``collate_skip_none``)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.name = getattr(dataset, 'name', 'the dataset')

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (item[0], item[1], i)


class BatchRuns(torch.utils.data.Sampler):
    """The index lists of the given batch numbers (``[b·bs, min(n, (b+1)·bs))`` each), lazily."""

    def __init__(self, batches, batch_size, n):
        self.batches, self.batch_size, self.n = list(batches), batch_size, n

    def __iter__(self):
        for b in self.batches:
            yield list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))

    def __len__(self):
        return len(self.batches)


def load_store(path):
    """A finished store's arrays, memory-mapped, plus ``meta``; ``None`` when there is none or
    it is damaged (a file missing or cut short): the caller then recomputes it."""
    path = Path(path)
    meta_file = path / 'meta.json'
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        out = {'meta': meta}
        for part in meta['arrays']:
            out[part] = np.load(path / f'{part}.npy', mmap_mode='r')
        if len(out['features']) != meta['n']:
            raise ValueError(f"features.npy holds {len(out['features'])} rows, meta.json says {meta['n']}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring damaged feature store {path} ({type(e).__name__}: {e}); recomputing")
        return None
    return out


def _first_item(dataset):
    for i in range(len(dataset)):
        item = dataset[i]
        if item is not None:
            return item
    raise UserError(f"none of the {len(dataset)} images of {getattr(dataset, 'name', 'the dataset')} could be read "
                    f"(each is named in a warning above): replace or remove those files")


@torch.no_grad()
def _probe_shapes(model, dataset, device):
    """(C, K or None) from one forward pass of the first readable image."""
    x = _first_item(dataset)[0][None].to(device)
    with exact_fp32(device):
        fmap = model.eval().forward_features(x).float()
        k = model.forward_head(fmap).shape[1] if hasattr(model, 'fc') else None
    return int(fmap.shape[1]), (int(k) if k is not None else None)


def _create(partial, state):
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    n, nb = state['n'], state['batches']
    shapes = {'features': ((n, 6, state['dim']), STORE_DTYPES[state['dtype']]), 'labels': ((n,), np.int64),
              'valid': ((n,), np.uint8), 'done': ((nb,), np.uint8)}
    if state['classes']:
        shapes['logits'] = ((n, state['classes']), np.float32)
    for part, (shape, dtype) in shapes.items():
        np.lib.format.open_memmap(partial / f'{part}.npy', mode='w+', dtype=dtype, shape=shape).flush()
    (partial / 'state.json').write_text(json.dumps(state, sort_keys=True))


def _resumable(partial, state):
    """Batches already done in ``partial`` when it was started with the same ``state``, else None."""
    try:
        old = json.loads((partial / 'state.json').read_text())
        if old != state:
            return None
        return int(np.load(partial / 'done.npy', mmap_mode='r').sum())
    except (OSError, ValueError):
        return None


def share(done, rank, world):
    """The batches process ``rank`` of ``world`` computes: an even, contiguous run of the
    batches not yet done. Spread over what is left, not over all batches, so a store resumed
    with another process count (or after one process got further) still splits evenly. Every
    process reads the same ``done`` after the barrier, so the runs tile the remaining batches."""
    left = np.flatnonzero(np.asarray(done) == 0)
    return left[len(left) * rank // world:len(left) * (rank + 1) // world].tolist()


def _barrier():
    if dist_lib.world_size() > 1:
        torch.distributed.barrier()


def write_store(path, model, dataset, device, *, batch_size, num_workers=0, dtype='fp16', key='', indices=None,
                meta=None, block=None, log=print, progress=None, source='the model'):
    """Extract ``dataset`` into the store at ``path`` (see the module docstring) and return
    ``load_store(path)``. Under ``torchrun`` every process calls it with the same arguments
    and computes its own contiguous run of batches. ``indices``: the bank's rows -> images of
    the training set (kept for the readable images). A killed run keeps every flushed
    block of ``block`` batches; the next call with the same ``key`` resumes from there.

    Two jobs asking for the same store at once (two ``CSD.py`` runs sharing a cache) do not
    both write it: the first holds ``<store>.lock`` (``flock``), the second waits for it and
    then uses the finished store, or resumes what the first left."""
    rank, world = dist_lib.rank(), dist_lib.world_size()
    lock, waited = _lock(Path(path), log) if rank == 0 else (None, False)
    try:
        if waited and world == 1:
            done = load_store(path)
            if done is not None:   # another job finished it while this one waited
                log(f"[features] {Path(path).name}: written meanwhile by another process")
                return done
        kw = dict(batch_size=batch_size, num_workers=num_workers, key=key, indices=indices, block=block, log=log,
                  progress=progress, source=source)
        store = _write_store(path, model, dataset, device, dtype=dtype, meta=meta, **kw)
        if store is None:
            # Features above fp16's range (an unnormalised CE encoder can get there): this split
            # is stored in fp32 instead, under the same key, and meta.json says so.
            log(f"[features] {Path(path).name}: {source} gives features above {FP16_MAX:.0f}, the largest fp16 "
                f"number; storing this split in fp32 instead")
            store = _write_store(path, model, dataset, device, dtype='fp32',
                                 meta={**(meta or {}), 'fp16_overflow': True}, **kw)
        return store
    finally:
        if lock is not None:
            lock.close()   # releases the flock; the empty lock file stays (unlinking it would race)


def _any_rank(flag, device):
    """Whether ``flag`` is true on any process (every process must call it)."""
    if dist_lib.world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(flag)], device=device if device.type == 'cuda' else 'cpu')
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _lock(path, log):
    """An exclusive ``flock`` on ``<store>.lock`` -> (the open file, whether it had to wait for
    another process holding it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path.with_name(path.name + '.lock'), 'a')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f, False
    except BlockingIOError:
        log(f"[features] another process is writing {path.name}; waiting for it")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f, True


def _write_store(path, model, dataset, device, *, batch_size, num_workers, dtype, key, indices, meta, block, log,
                 progress, source):
    block = block or BLOCK
    if dtype not in STORE_DTYPES:
        raise UserError(f"--dtype {dtype!r}: give fp16 or fp32")
    path = Path(path)
    partial = path.with_name(path.name + '.partial')
    rank, world = dist_lib.rank(), dist_lib.world_size()
    n = len(dataset)
    if n == 0:
        raise UserError(f"{getattr(dataset, 'name', 'the dataset')} has no images")
    nb = math.ceil(n / batch_size)
    if rank == 0:
        dim, classes = _probe_shapes(model, dataset, device)
        state = {'key': key, 'n': n, 'batch_size': batch_size, 'batches': nb, 'dtype': dtype, 'dim': dim,
                 'classes': classes}
        done = _resumable(partial, state)
        if done is None:
            _create(partial, state)
        elif done:
            log(f"[features] resuming {path.name}: {done} of {nb} batches already on disk")
    _barrier()
    state = json.loads((partial / 'state.json').read_text())
    arrays = {part: np.load(partial / f'{part}.npy', mmap_mode='r+')
              for part in ('features', 'labels', 'logits', 'valid', 'done') if (partial / f'{part}.npy').exists()}
    done_now = np.array(arrays['done'])
    _barrier()   # every process has read the same done flags before any is set
    todo = share(done_now, rank, world)
    if world > 1:
        images = sum(min(n, (b + 1) * batch_size) - b * batch_size for b in todo)
        print(f"rank {rank}/{world}: {images} images ({getattr(dataset, 'name', path.name)})", flush=True)
    loader = torch.utils.data.DataLoader(IndexedDataset(dataset), batch_sampler=BatchRuns(todo, batch_size, n),
                                         num_workers=num_workers, pin_memory=device.type == 'cuda',
                                         collate_fn=collate_skip_none)
    wide = STORE_DTYPES[dtype] == np.float16
    pending = []

    def flush():
        for part in ('features', 'labels', 'logits', 'valid'):
            if part in arrays:
                arrays[part].flush()
        for b in pending:
            arrays['done'][b] = 1
        arrays['done'].flush()
        pending.clear()

    with exact_fp32(device):
        batches = iter_features(model, progress(loader) if progress else loader, device,
                                with_logits=bool(state['classes']), source=source,
                                name=getattr(dataset, 'name', 'the dataset'))
        overflow = False
        for j, out in enumerate(batches):
            if out is not None:
                feats, labels, logits, (idx,) = out
                idx = np.asarray(idx, dtype=np.int64)
                if wide and np.abs(feats).max() > FP16_MAX:
                    overflow = True   # this split goes to fp32 (write_store), nothing more to do here
                    break
                arrays['features'][idx] = feats
                arrays['labels'][idx] = labels
                if logits is not None:
                    arrays['logits'][idx] = logits
                arrays['valid'][idx] = 1
            pending.append(todo[j])
            if len(pending) >= block:
                flush()
        flush()
    arrays.clear()   # close the memory maps before the rename
    if _any_rank(overflow, device):
        _barrier()
        return None
    _barrier()
    if rank == 0:
        _finish(path, partial, state, indices, meta or {})
    _barrier()
    return load_store(path)


def _finish(path, partial, state, indices, meta):
    """All batches done: drop the unreadable images' rows, write meta.json, rename into place."""
    done = np.load(partial / 'done.npy', mmap_mode='r')
    if not done.all():
        raise RuntimeError(f"{partial}: {int((done == 0).sum())} batches missing after every process finished")
    valid = np.load(partial / 'valid.npy').astype(bool)
    n_ok = int(valid.sum())
    if n_ok == 0:
        raise UserError(f"none of the {state['n']} images could be read (each is named in a warning above): "
                        f"replace or remove those files")
    parts = [p for p in ('features', 'labels', 'logits') if (partial / f'{p}.npy').exists()]
    if n_ok < state['n']:
        for part in parts:
            _compact(partial / f'{part}.npy', valid)
    if indices is not None:
        np.save(partial / 'indices.npy', np.asarray(indices, dtype=np.int64)[valid])
        parts.append('indices')
    for f in ('valid.npy', 'done.npy', 'state.json'):
        os.remove(partial / f)
    meta = dict(meta, arrays=parts, n=n_ok, skipped=state['n'] - n_ok, dtype=state['dtype'])
    (partial / 'meta.json').write_text(json.dumps(meta, indent=2, sort_keys=True))
    old = path.with_name(path.name + f'.old{os.getpid()}')
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        # Renamed aside, not deleted in place: a kill during a long rmtree would otherwise
        # leave a meta.json beside missing arrays under the real name.
        os.rename(path, old)
    os.rename(partial, path)
    shutil.rmtree(old, ignore_errors=True)


def _compact(file, valid, block=65536):
    """Keep the rows of ``file`` where ``valid``, copying block by block (memory stays flat)."""
    src = np.load(file, mmap_mode='r')
    with atomic_path(file) as tmp:
        dst = np.lib.format.open_memmap(tmp, mode='w+', dtype=src.dtype, shape=(int(valid.sum()), *src.shape[1:]))
        at = 0
        for s in range(0, len(src), block):
            rows = np.asarray(src[s:s + block])[valid[s:s + block]]
            dst[at:at + len(rows)] = rows
            at += len(rows)
        dst.flush()
        del src, dst
