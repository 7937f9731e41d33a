"""What the fp16 feature store (the default) changes against fp32, on a real checkpoint.

    python bench/bench_store_dtype.py --ckp runs/fmnist/seed0/Base/.../last.pth --in-dataset fashion-mnist

Runs ``CSD/CSD.py --dtype fp32`` on the checkpoint, then scores the same features rounded to
fp16 with the same score objects: the fp16 store holds exactly that rounding of the fp32
forward pass (``tests/test_e2e_csd.py::test_features_match_direct_forward``), so one
extraction serves both. Prints, for KNN and CSD: the relative change of every image's k-th
distance (max and mean over the ID test and OOD images) and the change of FPR95 and AUROC
(×100) per OOD set.
"""
import argparse
import os
import tempfile

import numpy as np


def main():
    p = argparse.ArgumentParser('fp16 vs fp32 feature store')
    p.add_argument('--ckp', required=True)
    p.add_argument('--in-dataset', default='fashion-mnist')
    p.add_argument('--data-root', default='datasets')
    p.add_argument('--out-datasets', nargs='+', default=None, help='OOD sets (default: the ID set\'s)')
    p.add_argument('--max-train', type=int, default=None, help='bank images (default all)')
    p.add_argument('--work-dir', default=None, help='caches and tables (default: a temporary folder)')
    args = p.parse_args()
    from CSD import CSD as csd_cli
    work = args.work_dir or tempfile.mkdtemp(prefix='store_dtype_')
    argv = ['--in-dataset', args.in_dataset, '--ckp', args.ckp, '--data-root', args.data_root, '--name', 'fp32',
            '--cache-dir', os.path.join(work, 'cache'), '--output-dir', os.path.join(work, 'results'),
            '--method', 'knn', 'csd', '--search', 'torch', '--dtype', 'fp32']
    if args.out_datasets:
        argv += ['--out-datasets', *args.out_datasets]
    if args.max_train:
        argv += ['--max-train', str(args.max_train)]
    a = csd_cli.main(csd_cli.get_args_parser().parse_args(argv))
    from CSD.scoring import build_score
    from util.metrics import cal_metric
    half = {n: np.asarray(s['features']).astype(np.float16) for n, s in a['splits'].items()}
    b = {'scores': {}, 'results': {}}
    for method, k in (('knn', 50), ('csd', 10)):
        scorer = build_score(method, k, backend='torch').fit(half['train'])
        ids = scorer.score(half['test'])
        oods = {n: scorer.score(half[n]) for n in a['scores'][method][1]}
        b['scores'][method] = (ids, oods)
        b['results'][method] = {n: cal_metric(ids, s) for n, s in oods.items()}
    print(f"\nfp16 store vs fp32 store, {args.ckp}, bank {len(a['splits']['train']['features'])} images")
    for method in ('knn', 'csd'):
        d32 = np.concatenate([-a['scores'][method][0], *(-s for s in a['scores'][method][1].values())])
        d16 = np.concatenate([-b['scores'][method][0], *(-s for s in b['scores'][method][1].values())])
        rel = np.abs(d16 - d32) / np.maximum(np.abs(d32), 1e-12)
        print(f"{method}: k-th distance relative change max {rel.max():.2e}, mean {rel.mean():.2e} "
              f"over {len(d32)} images")
        for name, m32 in a['results'][method].items():
            m16 = b['results'][method][name]
            print(f"  {name:<24} FPR {100 * m32['FPR']:.2f} -> {100 * m16['FPR']:.2f} ({100 * (m16['FPR'] - m32['FPR']):+.2f})"
                  f"   AUROC {100 * m32['AUROC']:.2f} -> {100 * m16['AUROC']:.2f} "
                  f"({100 * (m16['AUROC'] - m32['AUROC']):+.3f})")


if __name__ == '__main__':
    main()
