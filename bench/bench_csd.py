"""CSD scoring throughput against a bare faiss search doing the same arithmetic.

    python bench/bench_csd.py                      # ~1 minute on 2 CPU cores
    python bench/bench_csd.py --n 50000 --q 10000 --device cuda

Both sides get the same random vectors: a bank of M·N (M = 6 scales) and M·Q queries.
- bare faiss: vectors already L2-normalised and flattened; ``IndexFlatL2`` add + search,
  then the k-th column;
- ours: ``CSD.scoring.csd_scores(bank [N, 6, D], queries [Q, 6, D], k)`` from raw vectors,
  i.e. normalisation, index build, one batched search and the max over scales, with the
  faiss backend (the default) and with the torch backend (``--search torch``).
Runs alternate (bare, ours, bare, ours, ...) and the medians are compared.
"""
import argparse
import statistics
import time

import faiss
import numpy as np


def get_args_parser():
    p = argparse.ArgumentParser('CSD scoring benchmark')
    p.add_argument('--n', type=int, default=8000, help='ID training images in the bank (default 8000 -> 48,000 vectors)')
    p.add_argument('--q', type=int, default=1500, help='test images (default 1500 -> 9,000 queries)')
    p.add_argument('--dim', type=int, default=512, help='feature size (default 512, ResNet-18)')
    p.add_argument('--k', type=int, default=10, help='neighbours (default 10)')
    p.add_argument('--repeats', type=int, default=3, help='timed runs per side (default 3)')
    p.add_argument('--device', default='cpu', help='cpu or cuda (default cpu)')
    return p


def bare_faiss(bank_flat, queries_flat, k):
    index = faiss.IndexFlatL2(bank_flat.shape[1])
    index.add(bank_flat)
    dist, _ = index.search(queries_flat, k)
    return dist[:, k - 1]


def main(args):
    from CSD.scoring import ExactKNN, csd_scores
    from util.features import l2_normalize
    rng = np.random.default_rng(0)
    m = 6
    bank = rng.standard_normal((args.n, m, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.q, m, args.dim), dtype=np.float32)
    bank_flat = np.ascontiguousarray(l2_normalize(bank).reshape(-1, args.dim))
    queries_flat = np.ascontiguousarray(l2_normalize(queries).reshape(-1, args.dim))

    def run_bare():
        if args.device == 'cpu':
            return bare_faiss(bank_flat, queries_flat, args.k)
        return ExactKNN(bank_flat, args.device).kth_distance(queries_flat, args.k)

    check_bare = run_bare()
    check_ours = csd_scores(bank, queries, args.k, device=args.device)
    assert np.allclose(check_ours, (-check_bare.reshape(args.q, m)).max(1), atol=1e-5), 'results differ'
    check_torch = csd_scores(bank, queries, args.k, device=args.device, backend='torch')
    assert np.allclose(check_torch, check_ours, atol=1e-5), 'backends differ'
    runs = {'bare faiss': run_bare,
            'ours, faiss': lambda: csd_scores(bank, queries, args.k, device=args.device),
            'ours, torch': lambda: csd_scores(bank, queries, args.k, device=args.device, backend='torch')}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"bank {args.n}x{m}={args.n * m} vectors, queries {args.q}x{m}={args.q * m}, dim {args.dim}, k {args.k}, "
          f"device {args.device}, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    print(f"{'':<20} {'median s':>9} {'queries/s':>11}   runs")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(f"{name:<20} {med[name]:>9.3f} {args.q * m / med[name]:>11.0f}   {', '.join(f'{t:.2f}' for t in ts)}")
    for name in ('ours, faiss', 'ours, torch'):
        print(f"{name} / bare faiss throughput: {100 * med['bare faiss'] / med[name]:.1f}%  (target >= 80%)")
    return med['bare faiss'] / med['ours, faiss']


if __name__ == '__main__':
    main(get_args_parser().parse_args())
