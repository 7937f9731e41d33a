"""The k smallest of each row of a distance block on the CPU: ``util.knn.smallest_k`` (two passes
for small k) against ``torch.topk``, on the block shape of the exact torch search (1,000 query
rows × a 216,003-vector bank: the Fashion-MNIST bank of 36,000 images × 6 scales, plus 3).

    python bench/bench_smallest_k.py --rows 1000 --bank 216003 --k 10 50 200 1000

Prints, per k, the median seconds of each (``--repeats`` runs), their ratio, and whether the
values are equal (they must be: the same k smallest, in the same order)."""
import argparse
import statistics
import time

import torch

from util.knn import smallest_k


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rows', type=int, default=1000, help='query rows of the block (default 1000)')
    p.add_argument('--bank', type=int, default=216_003, help='bank vectors, the block width (default 216003)')
    p.add_argument('--k', type=int, nargs='+', default=[10, 50, 200, 1000], help='k values (default 10 50 200 1000)')
    p.add_argument('--repeats', type=int, default=5, help='timed runs per side (default 5)')
    args = p.parse_args()
    block = torch.rand(args.rows, args.bank, generator=torch.Generator().manual_seed(0))
    print(f"block {args.rows} x {args.bank} fp32 | torch threads {torch.get_num_threads()} | "
          f"median of {args.repeats}")
    for k in args.k:
        t_topk, ref = timed(lambda: block.topk(k, dim=1, largest=False), args.repeats)
        t_ours, (values, _) = timed(lambda: smallest_k(block, k), args.repeats)
        print(f"k={k:<5d} topk {t_topk:.3f} s | smallest_k {t_ours:.3f} s | {t_topk / t_ours:.2f}x | "
              f"values equal: {torch.equal(values, ref.values)}")


if __name__ == '__main__':
    main()
