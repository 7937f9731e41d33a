"""Peak memory of the exact k-NN search (torch backend) above the bank, measured by the kernel.

    python bench/bench_search_mem.py --bank 200000 --dim 256 --queries 8192 --k 50

Prints the peak resident memory (VmHWM) above what the process held once the bank and
queries were built, and the time. Run each configuration in a fresh process. To measure
another checkout, put it first on the path: ``PYTHONPATH=/path/to/other python bench/...``.
"""
import argparse
import os
import time

import numpy as np
import torch


def hwm_bytes():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    return 0


def main():
    p = argparse.ArgumentParser('k-NN search peak memory')
    p.add_argument('--bank', type=int, default=200_000, help='bank vectors (default 200000)')
    p.add_argument('--dim', type=int, default=256, help='dimension (default 256)')
    p.add_argument('--queries', type=int, default=8192, help='query vectors (default 8192)')
    p.add_argument('--k', type=int, default=50, help='neighbours (default 50)')
    args = p.parse_args()
    import CSD.scoring
    from CSD.scoring import knn_scores
    torch.set_num_threads(os.cpu_count() or 1)
    bank = np.random.default_rng(0).standard_normal((args.bank, args.dim), dtype=np.float32)
    q = np.random.default_rng(1).standard_normal((args.queries, args.dim), dtype=np.float32)
    base = hwm_bytes()
    t0 = time.perf_counter()
    s = knn_scores(bank, q, args.k, backend='torch')
    dt = time.perf_counter() - t0
    assert np.isfinite(s).all()
    print(f"bank {args.bank}x{args.dim} ({bank.nbytes / 2**20:.0f} MiB), {args.queries} queries, k {args.k}, "
          f"{torch.get_num_threads()} threads, code {os.path.dirname(os.path.dirname(CSD.scoring.__file__))}: "
          f"peak above the bank "
          f"{(hwm_bytes() - base) / 2**30:.2f} GiB, {dt:.1f} s")


if __name__ == '__main__':
    main()
