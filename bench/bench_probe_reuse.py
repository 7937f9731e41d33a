"""A linear probe scored from its encoder's feature stores against its own extraction.

    python bench/bench_probe_reuse.py --encoder <run>/last.pth --probe <run>/probe/linear.pth \
        --work runs/probe_reuse -- --in-dataset fashion-mnist --data-root datasets \
        --out-datasets fashion-mnist-heldout digits gaussian uniform --max-ood 4000 \
        --method msp energy odin vim react

Everything after ``--`` goes to ``CSD/CSD.py`` for all three runs (``--dtype fp32`` is added):
1. the encoder, with ``--method knn --k 1``, into ``<work>/shared``: its stores;
2. the probe into ``<work>/shared``: it finds the encoder's stores and computes only its logits;
3. the probe into ``<work>/own``, an empty cache: it extracts every split itself.
It prints the seconds of 2 and 3 (same machine, same run) and whether their logits, features,
scores and metrics are equal to the last bit. ``--work`` is emptied first.
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def get_args_parser():
    p = argparse.ArgumentParser('probe scored from its encoder\'s stores vs its own extraction')
    p.add_argument('--encoder', required=True, help='the SupCon / MODE checkpoint the probe was trained on')
    p.add_argument('--probe', required=True, help='its linear.pth (ALPA/main_linear.py)')
    p.add_argument('--work', required=True, help='a scratch folder for the caches and results (emptied first)')
    p.add_argument('csd', nargs=argparse.REMAINDER, help='-- then the CSD.py flags of all three runs')
    return p


def main(args):
    from CSD import CSD as csd_cli
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    flags = [a for a in args.csd if a != '--'] + ['--dtype', 'fp32']

    def run(ckp, cache, *extra):
        argv = [*flags, '--ckp', ckp, '--cache-dir', str(work / cache), '--output-dir', str(work / 'res' / cache),
                *extra]
        t0 = time.perf_counter()
        out = csd_cli.main(csd_cli.get_args_parser().parse_args(argv))
        return out, time.perf_counter() - t0

    _, t_encoder = run(args.encoder, 'shared', '--method', 'knn', '--k', '1', '--name', 'encoder')
    reused, t_reused = run(args.probe, 'shared', '--name', 'probe')
    own, t_own = run(args.probe, 'own', '--name', 'probe')
    same = {
        'logits': all(np.array_equal(own['splits'][s]['logits'], reused['splits'][s]['logits']) for s in own['splits']),
        'features': all(np.array_equal(own['splits'][s]['features'], reused['splits'][s]['features'])
                        for s in own['splits']),
        'scores': all(np.array_equal(own['scores'][m][0], reused['scores'][m][0]) and
                      all(np.array_equal(own['scores'][m][1][n], reused['scores'][m][1][n]) for n in own['scores'][m][1])
                      for m in own['scores']),
        'metrics': own['results'] == reused['results'],
    }
    print(f"\nencoder's stores written in {t_encoder:.1f} s (features + knn)")
    print(f"probe from the encoder's stores: {t_reused:.1f} s | probe extracting its own: {t_own:.1f} s | "
          f"ratio {t_own / t_reused:.2f}x")
    print('equal to the last bit: ' + ', '.join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()))
    return 0 if all(same.values()) else 1


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
