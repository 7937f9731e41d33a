"""Streamed exact search (``CSD.py --bank-chunk``) per method on a disk-backed store: the time
to score one split, and how many numbers were read from the bank.

    python bench/bench_streamed.py --store runs/bank_300k --images 300000 --dim 128 --queries 20000

Writes (or reuses) ``--store`` with ``bench/bench_scale.py``'s writer ([images, 6, dim] fp16,
seeded Gaussian), then scores ``--queries`` images × their scales with each ``--method``
through ``MultiScaleKNN`` over the memory-mapped bank (``--bank-chunk``, default auto), and
prints one line per method: seconds, and the bank numbers read per bank number the method
uses (1.0 = each chunk read once, only the method's scales). Run it from two checkouts
(``PYTHONPATH=<other tree>``) to compare code versions on the same store.
"""
import argparse
import os
import time

import numpy as np


class Counting:
    """Wraps the memory-mapped bank and counts the numbers read from it."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.numbers = a, a.shape, a.dtype, 0

    def __getitem__(self, key):
        out = np.asarray(self.a[key])
        self.numbers += out.size
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--store', required=True, help='store folder (written when missing)')
    p.add_argument('--images', type=int, default=300_000, help='bank images when the store is written (default 300000)')
    p.add_argument('--dim', type=int, default=128, help='feature dimension when written (default 128)')
    p.add_argument('--queries', type=int, default=20_000, help='query images (default 20000)')
    p.add_argument('--method', nargs='+', default=['knn', 'csd'], help='methods (default knn csd)')
    p.add_argument('--k', type=int, default=10, help='k (default 10)')
    p.add_argument('--bank-chunk', type=int, default=None, help='bank rows per chunk (default auto)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default torch\'s)')
    args = p.parse_args()
    import torch

    from bench.bench_scale import write_bank
    from CSD.scoring import SCALE_SETS, build_score
    from util.store import load_store
    if args.threads:
        torch.set_num_threads(args.threads)
    if load_store(args.store) is None:
        write_bank(args.store, args.images, args.dim, 'fp16')
    feats = load_store(args.store)['features']
    q = np.random.default_rng(1).standard_normal((args.queries, 6, feats.shape[-1])).astype(np.float32)
    print(f"code: {os.path.dirname(os.path.dirname(os.path.abspath(build_score.__code__.co_filename)))} | bank "
          f"{feats.shape[0]} x 6 x {feats.shape[-1]} fp16 | {args.queries} query images | torch threads "
          f"{torch.get_num_threads()}")
    for method in args.method:
        bank = Counting(feats)
        t0 = time.perf_counter()
        scorer = build_score(method, args.k, backend='torch', bank_chunk=args.bank_chunk or 'auto').fit(bank)
        scores = scorer.score(q)
        dt = time.perf_counter() - t0
        used = feats.shape[0] * len(SCALE_SETS[method]) * feats.shape[-1]
        print(f"{method:<14} {dt:7.2f} s | bank numbers read / used {bank.numbers / used:5.2f} | "
              f"mean score {scores.mean():.6f}")


if __name__ == '__main__':
    main()
