"""CSD over a bank larger than memory: a synthetic disk-backed bank, streamed exact search.

    python bench/bench_scale.py --bank 1000000 --dim 256 --queries 1000 --store /tmp/bank_1m_256

Writes (or reuses) ``--store/features.npy``: ``--bank`` vectors as [bank/6, 6, dim] float32,
the layout of a feature-cache split, written block by block so memory stays flat. Then
scores ``--queries`` × 6 query vectors with CSD (k = 10) through the code path of
``CSD.py --bank-chunk`` (``MultiScaleKNN`` over a memory-mapped bank), checks the result
against the in-memory search on a subset of the bank, and prints the time and the peak
anonymous memory above the baseline (RssAnon sampled every 20 ms; the bank's file pages are
not counted: the kernel reclaims them as needed).
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


def write_bank(path, images, dim, block=20_000):
    """[images, 6, dim] float32 .npy written block by block (seeded), memory flat."""
    tmp = path + '.tmp.npy'
    out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32, shape=(images, 6, dim))
    for s in range(0, images, block):
        n = min(block, images - s)
        out[s:s + n] = np.random.default_rng([0, s]).standard_normal((n, 6, dim), dtype=np.float32)
    out.flush()
    del out
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser('streamed CSD over a disk-backed bank')
    p.add_argument('--bank', type=int, required=True, help='bank vectors (6 per image)')
    p.add_argument('--dim', type=int, default=256, help='dimension (default 256)')
    p.add_argument('--queries', type=int, default=1000, help='query images, 6 vectors each (default 1000)')
    p.add_argument('--store', required=True, help='folder of the bank (written once, then reused)')
    p.add_argument('--k', type=int, default=10, help='CSD k (default 10)')
    p.add_argument('--bank-chunk', type=int, default=None, help='vectors per chunk (default: from free memory)')
    p.add_argument('--check-images', type=int, default=20_000, help='bank images of the in-memory check (default 20000)')
    p.add_argument('--compare', type=int, default=0,
                   help='also time in-memory vs streamed search on the first N bank images, alternating twice (default 0)')
    args = p.parse_args()
    import torch

    from CSD.scoring import build_score
    torch.set_num_threads(os.cpu_count() or 1)
    images = args.bank // 6
    path = os.path.join(args.store, 'features.npy')
    os.makedirs(args.store, exist_ok=True)
    if os.path.exists(path) and np.load(path, mmap_mode='r').shape == (images, 6, args.dim):
        print(f"reusing {path}")
    else:
        t0 = time.perf_counter()
        write_bank(path, images, args.dim)
        print(f"wrote {path} ({images * 6 * args.dim * 4 / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    bank = np.load(path, mmap_mode='r')
    q = np.random.default_rng(1).standard_normal((args.queries, 6, args.dim), dtype=np.float32)
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
    print(f"bank {images * 6:,} vectors x {args.dim} ({images * 6 * args.dim * 4 / 2**30:.2f} GiB on disk), "
          f"{args.queries * 6:,} queries, k {args.k}, chunk {chunk:,} vectors, "
          f"{torch.get_num_threads()} threads: {elapsed:.1f} s, {args.queries * 6 / elapsed:,.0f} queries/s, "
          f"peak anonymous memory above baseline {peak:.2f} GiB; check vs in-memory on {sub * 6:,} vectors: max |diff| {err:.2e}")
    assert err < 1e-4 and np.isfinite(scores).all()
    if args.compare:
        part = np.asarray(bank[:args.compare]).copy()
        for _ in range(2):
            for name, kw, b in (('in-memory', {}, part), ('streamed', {'bank_chunk': 'auto'}, bank[:args.compare])):
                t0 = time.perf_counter()
                build_score('csd', args.k, backend='torch', **kw).fit(b).score(q)
                print(f"{args.compare * 6:,}-vector bank, {args.queries * 6:,} queries, {name}: "
                      f"{time.perf_counter() - t0:.2f} s")


if __name__ == '__main__':
    main()
