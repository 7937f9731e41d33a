"""CSD over a bank larger than memory: a synthetic disk-backed bank, streamed exact search.

    python bench/bench_scale.py --bank 1000000 --dim 256 --queries 1000 --store runs/bank_1m_256
    python bench/bench_scale.py --bank 1000000 --dim 256 --store runs/bank_1m_256 --ivf 1 4 16 64
    python bench/bench_scale.py --store CACHE/train-KEY --query-store CACHE/test-KEY --queries 6000 --ivf 1 4 32

Writes (or reuses) ``--store``: a finished feature store (``util/store.py``'s layout:
``features.npy`` [bank/6, 6, dim] in ``--dtype``, fp16 by default as CSD.py's, plus
``labels.npy`` and ``meta.json``), written block by block so memory stays flat, and read
back with ``util.store.load_store`` as CSD.py reads its stores. Then
scores ``--queries`` × 6 query vectors with CSD (k = 10) through the code path of
``CSD.py --bank-chunk`` (``MultiScaleKNN`` over a memory-mapped bank), checks the result
against the in-memory search on a subset of the bank, and prints the time and the peak
anonymous memory above the baseline (RssAnon sampled every 20 ms; the bank's file pages are
not counted: the kernel reclaims them as needed).

``--query-store``: real features instead of synthetic ones. ``--store`` is then an existing
store that ``CSD.py`` wrote (its training split: the bank) and the queries are the first
``--queries`` images of the query store (e.g. the ID test split), so ``--ivf`` measures recall
against speed on real features, where the inverted file's clusters mean something.
"""
import argparse
import os
import time

import numpy as np


def rss_anon_bytes():
    """Anonymous resident memory now (RssAnon): the memory-mapped bank's file pages, which the
    kernel can drop at any time, are not counted."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('RssAnon:'):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples RssAnon every 20 ms in a thread; ``.peak`` is the largest value seen."""

    def __init__(self):
        import threading
        self.peak, self._stop = rss_anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon_bytes())

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())
        return self.peak


def write_bank(store, images, dim, dtype, block=20_000):
    """A finished store of [images, 6, dim] seeded Gaussian vectors, written block by block
    into ``<store>.partial`` and renamed into place (memory flat)."""
    import json
    import shutil
    partial = store + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    np_dtype = {'fp16': np.float16, 'fp32': np.float32}[dtype]
    out = np.lib.format.open_memmap(os.path.join(partial, 'features.npy'), mode='w+', dtype=np_dtype,
                                    shape=(images, 6, dim))
    for s in range(0, images, block):
        n = min(block, images - s)
        out[s:s + n] = np.random.default_rng([0, s]).standard_normal((n, 6, dim), dtype=np.float32)
    out.flush()
    del out
    np.save(os.path.join(partial, 'labels.npy'), np.zeros(images, dtype=np.int64))
    with open(os.path.join(partial, 'meta.json'), 'w') as f:
        json.dump({'arrays': ['features', 'labels'], 'n': images, 'skipped': 0, 'dtype': dtype,
                   'split': 'train', 'synthetic': 'seeded N(0, 1)'}, f)
    shutil.rmtree(store, ignore_errors=True)
    os.rename(partial, store)


def main():
    p = argparse.ArgumentParser('streamed CSD over a disk-backed bank')
    p.add_argument('--bank', type=int, default=None, help='bank vectors (6 per image); not with --query-store')
    p.add_argument('--dim', type=int, default=256, help='dimension (default 256)')
    p.add_argument('--queries', type=int, default=1000, help='query images, 6 vectors each (default 1000)')
    p.add_argument('--store', required=True, help='the bank\'s feature store (written once, then reused)')
    p.add_argument('--dtype', default='fp16', choices=['fp16', 'fp32'], help='stored dtype (default fp16, as CSD.py)')
    p.add_argument('--ivf', type=int, nargs='*', default=None,
                   help='also an IVF index (faiss IndexIVFFlat, nlist 4·√N) over the bank: recall@k and time of '
                        'the queries for each of these nprobe values')
    p.add_argument('--k', type=int, default=10, help='CSD k (default 10)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: every core)')
    p.add_argument('--bank-chunk', type=int, default=None, help='vectors per chunk (default: from free memory)')
    p.add_argument('--check-images', type=int, default=20_000, help='bank images of the in-memory check (default 20000)')
    p.add_argument('--query-store', default=None,
                   help='a real feature store (CSD.py cache) whose first --queries images are the queries; '
                        '--store is then an existing real store (the bank) and is never written')
    p.add_argument('--compare', type=int, default=0,
                   help='also time in-memory vs streamed search on the first N bank images, alternating twice (default 0)')
    args = p.parse_args()
    import torch

    from CSD.scoring import build_score
    from util.store import load_store
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    store = load_store(args.store) if os.path.isdir(args.store) else None
    if args.query_store:   # real features: both stores exist, nothing is written
        queries = load_store(args.query_store)
        if store is None or queries is None:
            raise SystemExit(f"--query-store: {args.store} and {args.query_store} must be finished feature stores")
        images, args.dim, args.dtype = store['features'].shape[0], store['features'].shape[2], store['meta']['dtype']
        print(f"real bank {args.store}: {images:,} images x 6 x {args.dim} ({args.dtype})")
        q = np.asarray(queries['features'][:args.queries], dtype=np.float32)
        args.queries = len(q)
    else:
        if args.bank is None:
            raise SystemExit('give --bank N (a synthetic bank) or --query-store DIR (real features)')
        images = args.bank // 6
        if store is not None and store['features'].shape == (images, 6, args.dim) and store['meta']['dtype'] == args.dtype:
            print(f"reusing {args.store}")
        else:
            t0 = time.perf_counter()
            write_bank(args.store, images, args.dim, args.dtype)
            store = load_store(args.store)
            print(f"wrote {args.store} ({store['features'].nbytes / 2**30:.2f} GiB, {args.dtype}) "
                  f"in {time.perf_counter() - t0:.1f} s")
        q = np.random.default_rng(1).standard_normal((args.queries, 6, args.dim), dtype=np.float32)
    bank = store['features']
    gib = bank.nbytes / 2**30
    base = rss_anon_bytes()
    sampler = PeakAnon()
    t0 = time.perf_counter()
    scorer = build_score('csd', args.k, backend='torch', bank_chunk=args.bank_chunk or 'auto').fit(bank)
    scores = scorer.score(q)
    elapsed = time.perf_counter() - t0
    peak = (sampler.stop() - base) / 2**30
    sub = min(args.check_images, images)
    chunk = scorer.search.bank_chunk
    streamed = build_score('csd', args.k, backend='torch', bank_chunk=chunk).fit(bank[:sub]).score(q[:200])
    in_memory = build_score('csd', args.k, backend='torch').fit(np.asarray(bank[:sub])).score(q[:200])
    err = float(np.abs(streamed - in_memory).max())
    print(f"bank {images * 6:,} vectors x {args.dim} ({gib:.2f} GiB on disk, {args.dtype}), "
          f"{args.queries * 6:,} queries, k {args.k}, chunk {chunk:,} vectors, "
          f"{torch.get_num_threads()} threads: {elapsed:.1f} s, {args.queries * 6 / elapsed:,.0f} queries/s, "
          f"peak anonymous memory above baseline {peak:.2f} GiB; check vs in-memory on {sub * 6:,} vectors: max |diff| {err:.2e}")
    assert err < 1e-4 and np.isfinite(scores).all()
    if args.ivf is not None:
        ivf_report(args, bank, q, scorer)
    if args.compare:
        part = np.asarray(bank[:args.compare]).copy()
        for _ in range(2):
            for name, kw, b in (('in-memory', {}, part), ('streamed', {'bank_chunk': 'auto'}, bank[:args.compare])):
                t0 = time.perf_counter()
                build_score('csd', args.k, backend='torch', **kw).fit(b).score(q)
                print(f"{args.compare * 6:,}-vector bank, {args.queries * 6:,} queries, {name}: "
                      f"{time.perf_counter() - t0:.2f} s")


def ivf_report(args, bank, q, exact_scorer, sample=1000):
    """IVF over the whole bank: build time, then per nprobe the time of all Q×6 queries and the
    recall@k of the first ``sample`` query vectors against the exact (streamed) search."""
    from util.features import l2_normalize
    from util.knn import ApproxKNN, Bank
    t0 = time.perf_counter()
    ivf = ApproxKNN(Bank(bank, range(6)), 'ivf')
    print(f"IVF build ({ivf.describe.split(',')[1].strip()}, k-means on {min(ivf.n, 64 * ivf.nlist):,} vectors): "
          f"{time.perf_counter() - t0:.1f} s")
    flat = l2_normalize(q.reshape(-1, q.shape[-1]))
    _, exact = exact_scorer.search.search(flat[:sample], args.k)
    for nprobe in args.ivf or [32]:
        ivf.index.nprobe = nprobe
        t0 = time.perf_counter()
        ivf.search(flat, args.k, need_indices=False)
        elapsed = time.perf_counter() - t0
        _, got = ivf.search(flat[:sample], args.k)
        recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(got, exact)])
        print(f"IVF nprobe {nprobe:>4}: {len(flat):,} queries in {elapsed:.2f} s ({len(flat) / elapsed:,.0f} queries/s), "
              f"recall@{args.k} {recall:.4f}")


if __name__ == '__main__':
    main()
