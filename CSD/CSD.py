"""Score ID test and OOD sets with KNN / CSD and print the paper's table.

    python CSD/CSD.py --in-dataset CIFAR-10 --name resnet18 --model-arch resnet18-supcon \
        --ckp path/to/last.pth --method knn csd

Features come from ``feature_collect.py``'s cache (collected here first when missing or
stale). For each method the table has one row per OOD set and an ``AVG`` row, columns
FPR (FPR95, ID positive) AUROC AUIN, ×100; it is also written as CSV, JSON and Markdown
under ``--output-dir/<in-dataset>/<name>/``.
"""
import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == '__main__' and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # `python CSD/CSD.py` puts CSD/ first on sys.path, where this very file would shadow the
    # CSD package (`import CSD.scoring` would find CSD.py): drop that entry. The only sys.path
    # change in the project; the package itself is importable through the editable install.
    del sys.path[0]

import torch  # noqa: E402  (after the sys.path fix above)

from CSD.feature_collect import add_feature_args, describe_norm, get_splits, prepare, run_name
from CSD.scoring import SCALE_SETS, SEARCH_BACKENDS, build_score, default_k
from util.errors import UserError, run_cli
from util.metrics import TABLE_COLUMNS, cal_metric, format_table, write_results


def get_args_parser():
    parser = argparse.ArgumentParser('MODE test-time OOD detection (KNN / CSD)', add_help=True)
    add_feature_args(parser)
    parser.add_argument('--method', nargs='+', default=['knn', 'csd'], choices=list(SCALE_SETS),
                        help='scores to report (default: knn csd)')
    parser.add_argument('--k', type=int, nargs='+', default=None,
                        help="neighbours, one per --method or one for all (default: knn 50 for CIFAR-10, 200 for "
                             "CIFAR-100, 1000 for ImageNet, 50 otherwise, as Sun et al.; csd and its ablations 10)")
    parser.add_argument('--search', default='faiss', choices=SEARCH_BACKENDS,
                        help='exact k-NN backend: faiss (IndexFlatL2, GPU index on CUDA) or torch (GEMM + topk); '
                             'same numbers (default faiss)')
    parser.add_argument('--search-mem', type=float, default=None,
                        help='GiB the torch search may use for one distance block (default: a quarter of free '
                             'GPU memory / available RAM, at most 1)')
    parser.add_argument('--output-dir', default='results', help='tables are written here (default ./results)')
    parser.add_argument('--ood-positive-fpr', action='store_true',
                        help="also print OpenOOD's FPR@95TPR with OOD as positive (a different number)")
    parser.add_argument('--auout', action='store_true', help='also print AUOUT')
    return parser


def score_splits(splits, method, k, device, ood_names, backend='faiss', mem_budget=None):
    """Fit ``method`` on the train bank; -> (ID test scores, {ood: scores})."""
    scorer = build_score(method, k, str(device), backend, mem_budget).fit(splits['train']['features'])
    id_scores = scorer.score(splits['test']['features'])
    return id_scores, {n: scorer.score(splits[n]['features']) for n in ood_names}


def evaluate(splits, method, k, device, ood_names, ood_positive_fpr=False, backend='faiss', mem_budget=None):
    """-> ({ood: metrics}, (ID scores, {ood: scores}))."""
    id_scores, ood_scores = score_splits(splits, method, k, device, ood_names, backend, mem_budget)
    metrics = {n: cal_metric(id_scores, s, ood_positive_fpr=ood_positive_fpr) for n, s in ood_scores.items()}
    return metrics, (id_scores, ood_scores)


def main(args):
    methods = args.method
    ks = args.k or [None] * len(methods)
    if len(ks) == 1:
        ks = ks * len(methods)
    if len(ks) != len(methods):
        raise UserError(f"--k takes one value or one per --method ({len(methods)}), got {len(ks)}")
    bad = [k for k in ks if k is not None and k < 1]
    if bad:
        raise UserError(f"--k {bad[0]} is not a number of neighbours: give k >= 1 (or leave --k out for the paper's k)")
    device, spec, model, info = prepare(args)
    splits = get_splits(args, model, info, spec, device)
    del model  # the search needs the memory now (a faiss GPU index allocates outside torch's cache)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    ood_names = [n for n in splits if n not in ('train', 'test')]
    if not ood_names:
        raise UserError('no OOD sets to score: pass --out-datasets')
    columns = TABLE_COLUMNS + (('AUOUT',) if args.auout else ()) + (('FPR_OODpos',) if args.ood_positive_fpr else ())
    out_dir = Path(args.output_dir) / spec.name / run_name(args)
    all_results, all_scores = {}, {}
    for method, k in zip(methods, ks):
        k = default_k(method, spec.name) if k is None else k
        t0 = time.perf_counter()
        results, scores = evaluate(splits, method, k, device, ood_names, args.ood_positive_fpr, args.search,
                                   int(args.search_mem * 2**30) if args.search_mem else None)
        title = (f"{method.upper()} (k={k}) | ID {spec.name} | {info['arch']} | {run_name(args)} "
                 f"| bank {splits['train']['features'].shape[0]} images | {describe_norm(info['norm'])} "
                 f"| {time.perf_counter() - t0:.1f}s")
        print()
        print(format_table(results, title, columns))
        meta = {'method': method, 'k': k, 'in_dataset': spec.name, 'arch': info['arch'], 'ckp': str(args.ckp),
                'test_norm': {'source': info['norm'][2], 'mean': list(info['norm'][0]), 'std': list(info['norm'][1])},
                'n_train': int(splits['train']['meta']['n']), 'n_test': int(splits['test']['meta']['n']),
                'n_ood': {n: int(splits[n]['meta']['n']) for n in ood_names}}
        files = write_results(results, str(out_dir / f'{method}_k{k}'), columns, meta)
        print(f"written: {', '.join(files)}")
        all_results[method] = results
        all_scores[method] = scores
    return {'results': all_results, 'scores': all_scores, 'splits': splits, 'out_dir': str(out_dir)}


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
