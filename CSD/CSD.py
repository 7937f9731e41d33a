"""Score ID test and OOD sets with KNN / CSD and print the paper's table.

    python CSD/CSD.py --in-dataset CIFAR-10 --name resnet18 --model-arch resnet18-supcon \
        --ckp path/to/last.pth --method knn csd

Features come from ``feature_collect.py``'s cache (collected here first when missing or
stale). For each method the table has one row per OOD set and an ``AVG`` row, columns
FPR (FPR95, ID positive) AUROC AUIN, ×100; it is also written as CSV, JSON and Markdown
under ``--output-dir/<in-dataset>/<name>/``.
"""
import importlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from util import distributed as dist_lib
from util.cli import Parser
from util.errors import UserError, run_cli
from util.knn import knn_accuracy
from util.metrics import TABLE_COLUMNS, cal_metric, format_table, openood_rows, write_openood_csv, write_results
from util.misc import seeded_indices

# `python CSD/CSD.py` puts CSD/ first on the path, where this very file would shadow the CSD
# package (`import CSD.scoring` would find CSD.py): run as a script, the modules beside it are
# imported by their own names (they import only util.*, so nothing is loaded twice).
_PACKAGE = 'CSD.' if __package__ else ''
detectors = importlib.import_module(_PACKAGE + 'detectors')
feature_collect = importlib.import_module(_PACKAGE + 'feature_collect')
scoring = importlib.import_module(_PACKAGE + 'scoring')

METHODS = list(detectors.DETECTORS)


def get_args_parser():
    parser = Parser('MODE test-time OOD detection (KNN / CSD)', add_help=True)
    feature_collect.add_feature_args(parser)
    parser.add_argument('--method', nargs='+', default=['knn', 'csd'], choices=METHODS,
                        help='scores to report: k-NN scores knn csd local global+center; post-hoc baselines msp '
                             'energy mahalanobis vim react ssd odin (CSD/baselines.py; logit-based ones need a CE or '
                             'linear-probe checkpoint; odin runs its own forward passes) (default: knn csd)')
    parser.add_argument('--odin-temperature', type=float, default=1000.0, help='ODIN temperature T (default 1000)')
    parser.add_argument('--odin-batch-size', type=int, default=None,
                        help='images per ODIN forward/backward pass (its autograd graph is the memory peak; halved '
                             'by itself after an out-of-memory error; scores do not depend on it) (default '
                             '--batch-size)')
    parser.add_argument('--odin-epsilon', type=float, default=0.0014,
                        help='ODIN input perturbation ε, in pixel units (default 0.0014)')
    parser.add_argument('--near', nargs='+', default=None,
                        help='OOD rows that are near OOD: the tables add "AVG near" and "AVG far" rows (OpenOOD v1.5)')
    parser.add_argument('--save-scores', action='store_true',
                        help='also write <method>_scores.npz: the ID test scores under "id", one array per OOD row')
    parser.add_argument('--k', nargs='+', default=None,
                        help="neighbours, one per --method or one for all (default: knn 50 for CIFAR-10, 200 for "
                             "CIFAR-100, 1000 for ImageNet, 50 otherwise, as Sun et al.; csd and its ablations 10). "
                             "'auto' picks k from a grid on validation data the tables never use: a seeded 20%% of the "
                             "ID test images (then left out of every table of the run) against --k-val-ood")
    parser.add_argument('--k-val-ood', default='noise',
                        help="with --k auto: the validation OOD set, never reported (default noise: the authors' "
                             "Gaussian inputs, generated)")
    parser.add_argument('--search', default='faiss', choices=scoring.SEARCH_BACKENDS + scoring.APPROX_BACKENDS,
                        help='k-NN search: exact faiss (IndexFlatL2, GPU index on CUDA) or torch (GEMM + topk), '
                             'same numbers; or approximate ivf (faiss IndexIVFFlat) / hnsw (IndexHNSWFlat), which '
                             'print their recall@k and the FPR/AUROC change against exact search on a sample '
                             '(default faiss)')
    parser.add_argument('--ivf-nlist', type=int, default=None, help='--search ivf: inverted lists (default 4·√N)')
    parser.add_argument('--ivf-nprobe', type=int, default=32, help='--search ivf: lists searched per query (default 32)')
    parser.add_argument('--hnsw-m', type=int, default=32, help='--search hnsw: links per node (default 32)')
    parser.add_argument('--hnsw-ef', type=int, default=128, help='--search hnsw: efSearch, at least k (default 128)')
    parser.add_argument('--approx-check', type=int, default=1000,
                        help='--search ivf/hnsw: images per set (ID test and each OOD set) searched exactly too, for '
                             'the recall@k and ΔFPR/ΔAUROC line (0: no check; default 1000)')
    parser.add_argument('--bank-chunk', type=lambda v: v if v == 'auto' else int(v), default=None,
                        help='stream the bank through the device in chunks of this many vectors, or auto (sized from '
                             'free memory); exact, for banks larger than memory: the cached features are '
                             'memory-mapped (default: the whole bank in memory)')
    parser.add_argument('--search-mem', type=float, default=None,
                        help='GiB the torch search may use for one distance block (default: a quarter of free '
                             'GPU memory / available RAM, at most 1)')
    parser.add_argument('--output-dir', default='results', help='tables are written here (default ./results)')
    parser.add_argument('--ood-positive-fpr', action='store_true',
                        help="also print OpenOOD's FPR@95TPR with OOD as positive (a different number)")
    parser.add_argument('--auout', action='store_true', help='also print AUOUT')
    return parser


@dataclass(frozen=True)
class SearchConfig:
    """The k-NN search flags, resolved once: the backend, the distance block's byte budget,
    streaming, and the approximate index's options."""
    backend: str = 'faiss'
    mem_budget: int = None
    bank_chunk: object = None
    approx: dict = None

    @classmethod
    def from_args(cls, args):
        approx = ({'nlist': args.ivf_nlist, 'nprobe': args.ivf_nprobe} if args.search == 'ivf' else
                  {'m': args.hnsw_m, 'ef_search': args.hnsw_ef} if args.search == 'hnsw' else None)
        return cls(args.search, int(args.search_mem * 2**30) if args.search_mem else None, args.bank_chunk, approx)

    @property
    def exact_backend(self):
        """The exact backend for what must be exact (ID accuracy, --k auto, the approximation check)."""
        return self.backend if self.backend in scoring.SEARCH_BACKENDS else 'torch'

    def kwargs(self):
        return {'backend': self.backend, 'mem_budget': self.mem_budget, 'bank_chunk': self.bank_chunk,
                'approx': self.approx}


def evaluate(splits, method, k, context, ood_names, ood_positive_fpr=False):
    """Fit ``method`` (any registered detector) on the ID training split and score the ID test
    split and every OOD split -> ({ood: metrics}, (ID scores, {ood: scores}), the fitted detector)."""
    detector = detectors.build_detector(method, k, context).fit(splits['train'], context)
    id_scores = detector.score(splits['test'])
    ood_scores = {n: detector.score(splits[n]) for n in ood_names}
    metrics = {n: cal_metric(id_scores, s, ood_positive_fpr=ood_positive_fpr) for n, s in ood_scores.items()}
    return metrics, (id_scores, ood_scores), detector


def approximation_check(splits, method, scorer, scores, ood_names, device, sample, mem_budget=None):
    """--search ivf/hnsw: on a seeded sample of ``sample`` images of the ID test set and of each
    OOD set, the exact search (streamed, memory-bounded) beside the approximate one ->
    (one line: recall@k of the sample's vectors and, per OOD set, the FPR/AUROC change the
    approximation caused on that sample; a dict of the same numbers)."""
    rng = np.random.default_rng(0)
    exact = scoring.build_score(method, scorer.k, str(device), 'torch', mem_budget, 'auto').fit(
        splits['train']['features'])
    picks, hits, total = {}, 0, 0
    for name in ['test', *ood_names]:
        n = len(splits[name]['features'])
        picks[name] = seeded_indices(n, min(sample, n), rng)
        q = scorer.select(np.asarray(splits[name]['features'])[picks[name]])
        q = q.reshape(-1, q.shape[-1])
        _, ia = scorer.search.search(q, scorer.k)
        _, ie = exact.search.search(q, scorer.k)
        hits += sum(len(np.intersect1d(a, e)) for a, e in zip(ia, ie))
        total += ie.size
    exact_scores = {n: exact.score(np.asarray(splits[n]['features'])[picks[n]]) for n in picks}
    approx_scores = {'test': scores[0][picks['test']], **{n: scores[1][n][picks[n]] for n in ood_names}}
    delta = {}
    for name in ood_names:
        e = cal_metric(exact_scores['test'], exact_scores[name])
        a = cal_metric(approx_scores['test'], approx_scores[name])
        delta[name] = {'FPR': 100 * (a['FPR'] - e['FPR']), 'AUROC': 100 * (a['AUROC'] - e['AUROC'])}
    recall = hits / max(total, 1)
    widened = getattr(scorer.search, 'widened', 0)
    line = (f"{scorer.search.describe}: recall@{scorer.k} {recall:.4f} against exact search on "
            f"{len(picks['test'])} ID test + up to {sample} images per OOD set; on that sample the approximation "
            f"moved " + ', '.join(f"{n} FPR {d['FPR']:+.2f} AUROC {d['AUROC']:+.2f}" for n, d in delta.items())
            + (f"; {widened} query vectors had fewer than k vectors in their lists and were probed wider"
               if widened else ''))
    return line, {'describe': scorer.search.describe, 'recall': recall, 'sample': sample, 'delta': delta,
                  'widened': widened}


K_GRID = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def parse_k(text):
    if str(text) == 'auto':
        return 'auto'
    try:
        k = int(text)
    except ValueError:
        raise UserError(f"--k {text!r} is not a number of neighbours: give k >= 1 or auto") from None
    if k < 1:
        raise UserError(f"--k {k} is not a number of neighbours: give k >= 1 (or leave --k out for the paper's k)")
    return k


def _take(split, idx):
    """The rows ``idx`` of a split; ``rows`` remembers which images they are (ODIN re-reads them)."""
    rows = np.asarray(split.get('rows', np.arange(len(split['features']))))[idx]
    return {**{k: np.asarray(v)[idx] for k, v in split.items() if k in ('features', 'labels', 'logits')},
            'rows': rows, 'meta': {**split['meta'], 'n': len(idx)}}


def hold_out_validation(splits, val_ood):
    """--k auto: a seeded 20% of the ID test images becomes validation ID data and leaves the
    ID test split (every table of the run then uses the other 80%); the validation OOD set is
    popped from the splits, so it is never reported."""
    test = splits['test']
    n = len(test['features'])
    val = seeded_indices(n, max(1, n // 5))
    rest = np.setdiff1d(np.arange(n), val)
    splits['val_id'], splits['test'] = _take(test, val), _take(test, rest)
    splits['val_ood'] = splits.pop(val_ood)
    return {'train': splits['train'], 'val_id': splits['val_id'], 'val_ood': splits['val_ood'], 'name': val_ood}


def choose_k(validation, method, device, backend):
    """The k of ``K_GRID`` (up to the bank size) with the best validation AUROC; ties -> the smaller k."""
    results = {}
    for k in K_GRID:
        scorer = scoring.build_score(method, k, str(device), backend)
        try:
            scorer.fit(validation['train']['features'])
            id_s, ood_s = scorer.score(validation['val_id']['features']), scorer.score(validation['val_ood']['features'])
        except UserError:   # k larger than the bank
            break
        results[k] = cal_metric(id_s, ood_s)['AUROC']
    best = max(results, key=lambda k: (results[k], -k))
    return best, {'grid': list(results), 'auroc': results, 'chosen': best,
                  'val_id': len(validation['val_id']['features']), 'val_ood': validation['name']}


SANITY_RATIO = 0.95


def distance_check(id_scores, ood_scores):
    """k-NN scores are −(k-th distance): -> (one line with the mean k-th distance of the ID test
    set beside each OOD set's, a warning line or None). ID test images should sit much closer
    to the bank than OOD ones; when their mean distance reaches SANITY_RATIO of the OOD sets'
    mean, the usual cause is a wrong transform, a wrong checkpoint or random weights
    (knn-ood issue #8), and the tables below mean little."""
    id_d = float(-np.mean(id_scores))
    ood_d = {n: float(-np.mean(s)) for n, s in ood_scores.items()}
    line = f"mean k-th distance: ID test {id_d:.4f} | " + ' | '.join(f"{n} {d:.4f}" for n, d in ood_d.items())
    ratio = id_d / max(float(np.mean(list(ood_d.values()))), 1e-12)
    warning = None
    if ratio >= SANITY_RATIO:
        warning = (f"WARNING: the ID test images are as far from the bank as the OOD sets (ratio {ratio:.2f}): "
                   f"check the checkpoint (random or broken weights?), --model-arch and --test-norm")
    return line, warning


def id_accuracy(splits, num_classes, device, backend):
    """-> (how, fraction) of the ID test set: the classifier when the model has one, else a
    kNN vote (k = 20, cosine weights) on global features against the training bank."""
    test, train = splits['test'], splits['train']
    if 'logits' in test:
        return 'classifier', float((np.asarray(test['logits']).argmax(1) == np.asarray(test['labels'])).mean())
    acc = knn_accuracy(train['features'][:, 4], train['labels'], test['features'][:, 4], test['labels'], 20,
                       num_classes, device=str(device), backend=backend)
    return 'kNN-20 vote', acc


def parse_ks(args):
    """--k against --method -> one k (or 'auto', or None for the paper's) per method."""
    ks = [parse_k(k) for k in args.k] if args.k else [None] * len(args.method)
    ks = ks * len(args.method) if len(ks) == 1 else ks
    if len(ks) != len(args.method):
        raise UserError(f"--k takes one value or one per --method ({len(args.method)}), got {len(ks)}")
    return ks


def make_context(args, run, search):
    """The detectors' ``Context``: the model and an image reader only when a method runs the
    network (ODIN); otherwise the model is dropped before the search needs the memory."""
    runs_model = any('images' in getattr(detectors.build_detector(m, None), 'needs', ()) for m in args.method
                     if not detectors.uses_k(m))
    head = None
    if getattr(run.model, 'fc', None) is not None:   # SupCEResNet or a linear probe: (W, b) for ViM / ReAct
        head = (run.model.fc.weight.detach().cpu().numpy(), run.model.fc.bias.detach().cpu().numpy())
    odin = {'temperature': args.odin_temperature, 'epsilon': args.odin_epsilon, 'batch_size': args.odin_batch_size,
            'num_workers': args.num_workers, 'loader_batch': args.batch_size}
    images = (lambda split: feature_collect.split_dataset(args, run, split)[0]) if runs_model else None
    return detectors.Context(str(run.device), search.kwargs(), head, run.model if runs_model else None,
                             tuple(run.norm[1]), images, odin)


def report(args, run, splits, method, k, results, scores, detector, search, accuracy, selection, seconds):
    """Print one method's table (with its header lines) and write its files."""
    ood_names = list(results)
    uses_k = detectors.uses_k(method)
    name = f"{method.upper()} (k={k})" if uses_k else method.upper()
    title = (f"{name} | ID {run.spec.name} | {run.info['arch']} | {run.name} | bank "
             f"{splits['train']['features'].shape[0]} images | {feature_collect.describe_norm(run.norm)} | {seconds:.1f}s")
    header = [f"ID accuracy ({accuracy[0]}): {100 * accuracy[1]:.2f}%"]
    if args.max_ood is not None:
        header.append(f"--max-ood {args.max_ood}: each OOD set is a seeded subset (" + ', '.join(
            f"{n} {int(splits[n]['meta']['n'])}" for n in ood_names) + ' images)')
    approx_check = None
    if uses_k:
        line, warning = distance_check(*scores)
        header += [line] + ([warning] if warning else [])
        if search.backend in scoring.APPROX_BACKENDS and args.approx_check > 0:
            check_line, approx_check = approximation_check(splits, method, detector, scores, ood_names, run.device,
                                                           args.approx_check, search.mem_budget)
            header.append(check_line)
    near = [n for n in (args.near or []) if n in ood_names]
    columns = TABLE_COLUMNS + (('AUOUT',) if args.auout else ()) + (('FPR_OODpos',) if args.ood_positive_fpr else ())
    print()
    print(format_table(results, title, columns, near=near, header=header))
    prefix = str(Path(args.output_dir) / run.spec.name / run.name / (f'{method}_k{k}' if uses_k else method))
    meta = {'method': method, 'k': k, 'in_dataset': run.spec.name, 'arch': run.info['arch'], 'ckp': str(args.ckp),
            'id_accuracy': {'how': accuracy[0], 'value': accuracy[1]}, 'near': near, 'k_selection': selection,
            'search': search.backend, 'approximation': approx_check,
            'test_norm': {'source': run.norm[2], 'mean': list(run.norm[0]), 'std': list(run.norm[1])},
            'n_train': int(splits['train']['meta']['n']), 'n_test': int(splits['test']['meta']['n']),
            'n_ood': {n: int(splits[n]['meta']['n']) for n in ood_names}, 'max_ood': args.max_ood}
    files = write_results(results, prefix, columns, meta, near=near)
    files.append(write_openood_csv(openood_rows(scores[0], scores[1], near, accuracy[1]), prefix + '_openood.csv'))
    if args.save_scores:
        np.savez(prefix + '_scores.npz', id=scores[0], **scores[1])
        files.append(prefix + '_scores.npz')
    print(f"written: {', '.join(files)}")


def main(args):
    ks, search = parse_ks(args), SearchConfig.from_args(args)
    run = feature_collect.prepare(args, extra_ood=[args.k_val_ood] if 'auto' in ks else ())
    splits = feature_collect.get_splits(args, run)
    if dist_lib.is_dist():   # under torchrun the processes shared the extraction; rank 0 scores
        dist_lib.shutdown()
        if dist_lib.rank_from_env() != 0:
            return None
    validation = hold_out_validation(splits, args.k_val_ood) if 'auto' in ks else None
    context = make_context(args, run, search)
    if context.model is None and run.device.type == 'cuda':
        torch.cuda.empty_cache()   # the search needs the memory now (a faiss GPU index allocates outside torch)
    ood_names = [feature_collect.split_label(n) for n in run.ood if not validation or n != args.k_val_ood]
    if not ood_names:
        raise UserError('no OOD sets to score: pass --out-datasets')
    unknown = sorted(set(args.near or []) - set(ood_names))
    if unknown:
        raise UserError(f"--near {' '.join(unknown)}: not among the OOD rows ({', '.join(ood_names)})")
    accuracy = id_accuracy(splits, run.spec.num_classes, run.device, search.exact_backend)
    all_results, all_scores = {}, {}
    for method, k in zip(args.method, ks):
        selection = None
        if detectors.uses_k(method) and k == 'auto':
            k, selection = choose_k(validation, method, run.device, search.exact_backend)
            print(f"\n--k auto for {method}: k = {k}, the best AUROC on validation data the table does not use "
                  f"({selection['val_id']} held-out ID test images vs {selection['val_ood']}, never reported)")
        k = (scoring.default_k(method, run.spec.name) if k is None else k) if detectors.uses_k(method) else None
        t0 = time.perf_counter()
        results, scores, detector = evaluate(splits, method, k, context, ood_names, args.ood_positive_fpr)
        report(args, run, splits, method, k, results, scores, detector, search, accuracy, selection,
               time.perf_counter() - t0)
        all_results[method], all_scores[method] = results, scores
        del detector   # the next method's index is built after this one is gone (a faiss GPU index holds GPU memory)
    out_dir = str(Path(args.output_dir) / run.spec.name / run.name)
    return {'results': all_results, 'scores': all_scores, 'splits': splits, 'out_dir': out_dir}


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
