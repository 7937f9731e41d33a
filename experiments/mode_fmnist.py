"""MODE on real data this machine has: Fashion-MNIST, open-set protocol, CPU-sized.

    python experiments/mode_fmnist.py --seeds 0 --figures          # the main job (demo.sh), one seed
    python experiments/mode_fmnist.py --seeds 0 1 2                # the 3-seed table in BENCHMARKS.md
    python experiments/mode_fmnist.py --preset full --seeds 0 --jobs 2   # trained to convergence, 2 models at a time
    python experiments/mode_fmnist.py --preset full --seeds 1 2    # later; the summary covers every seed found
    python experiments/mode_fmnist.py --released checkpoints       # no training: score the released checkpoints

ID = Fashion-MNIST classes 0-5 (T-shirt, trouser, pullover, dress, coat, sandal); OOD =
the held-out classes 6-9 (near OOD: shirt, sneaker, bag, ankle boot) and far OOD: sklearn's
digits, Gaussian and uniform noise. For each seed it trains
    Base           SupCon from scratch,
    ALPA-finetune  ALPA alone, starting from Base (MODE-F),
    ALPA-train     SupCon + ALPA from scratch (MODE-T),
collects multi-scale features and scores them with KNN (global, k=50) and CSD (6 scales,
k=10). k and every other knob are the paper's defaults or fixed before looking at any
result here; nothing is tuned on the OOD sets that are reported.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from util.cli import Parser
from util.errors import UserError, first_line
from util.misc import seeded_indices

FMNIST_CLASSES = ['T-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle boot']
NEAR = ['fashion-mnist-heldout']
MODELS = ['Base', 'ALPA-finetune', 'ALPA-train', 'CE', 'ALPA-finetune*',
          'Base +probe', 'ALPA-finetune +probe', 'ALPA-train +probe']
METHODS = ['knn', 'csd']   # the demo's scores (the figures draw these)
# The full preset: the paper's ablation rows for every model, and the post-hoc baselines where
# they apply (feature-only ones on SupCon encoders; logit ones on CE models and on the linear
# probes of the SupCon encoders, reported as '<model> +probe').
ABLATIONS = ['knn', 'global+center', 'local', 'csd']
FEATURE_BASELINES = ['mahalanobis', 'ssd']
LOGIT_BASELINES = ['msp', 'energy', 'odin', 'vim', 'react']


# Budgets of the presets; explicit flags override them. 'demo' is the main job (bash demo.sh,
# at most 10 minutes from a fresh clone on these 2 cores); 'full' trains every model to
# convergence (issue 10): whole epochs over the 36,000 ID images and the full bank. Both score
# 4,000 of each 10,000-image noise set (max_ood; the held-out classes, 4,000 images, whole):
# in the demo that is a third fewer images to extract, about a minute of its ten.
PRESETS = {
    'demo': dict(epochs=4, steps_per_epoch=40, finetune_epochs=2, lr=0.1, finetune_lr=0.02, train_lr=0.1,
                 max_train=6000, max_ood=4000, ce=False, baselines=False, probe_epochs=0),
    # 5 epochs: Base's loss is within 0.05 of its 10-epoch plateau by then (BENCHMARKS), and the
    # ALPA models cost 2.1-2.8x a Base step here. 3 fine-tune epochs of SupContrast's epoch-wise
    # cosine (lr 0.75x, 0.25x, ~0 of --finetune-lr) bring the ALPA loss to ALPA-train's own
    # plateau.
    'full': dict(epochs=5, steps_per_epoch=None, finetune_epochs=3, lr=0.1, finetune_lr=0.02, train_lr=0.1,
                 max_train=None, max_ood=4000, ce=True, baselines=True, probe_epochs=3),
}


def get_args_parser():
    p = Parser('MODE Fashion-MNIST protocol')
    p.add_argument('--preset', default='demo', choices=sorted(PRESETS),
                   help="budgets: demo (the main job, minutes) or full (converged; about 2 h of one core a seed, "
                        "--jobs 2 shares it over two, see BENCHMARKS.md); default demo")
    p.add_argument('--precision', default='auto', choices=['auto', 'fp32', 'bf16'],
                   help='training precision: auto = bf16 autocast + channels_last where the CPU/GPU runs bf16 '
                        'natively, else fp32 (features are always fp32); default auto')
    p.add_argument('--seeds', type=int, nargs='+', default=[0], help='training seeds (default 0)')
    p.add_argument('--id-classes', type=int, nargs='+', default=[0, 1, 2, 3, 4, 5], help='ID classes (default 0-5)')
    p.add_argument('--model', default='resnet18', help='CIFAR-style encoder (default resnet18)')
    p.add_argument('--width', type=int, default=16, help='ResNet base width, 64 in the paper (default 16 for CPU)')
    p.add_argument('--batch-size', type=int, default=128, help='images per step, 2 views each (default 128)')
    p.add_argument('--epochs', type=int, default=None, help='Base and ALPA-train epochs (default: the preset\'s)')
    p.add_argument('--steps-per-epoch', type=int, default=None,
                   help='steps per epoch, a random part of the 36k images (default: the preset\'s; full = whole epochs)')
    p.add_argument('--finetune-epochs', type=int, default=None, help='ALPA-finetune epochs (default: the preset\'s)')
    p.add_argument('--lr', type=float, default=None, help='Base learning rate (default: the preset\'s, 0.1)')
    p.add_argument('--finetune-lr', type=float, default=None,
                   help='ALPA-finetune learning rate (default 0.02: the paper\'s finetune/base ratio 0.1/0.5 of --lr)')
    p.add_argument('--train-lr', type=float, default=None, help='ALPA-train learning rate (default: the preset\'s)')
    p.add_argument('--max-train', type=int, default=None,
                   help='ID training images in the k-NN bank (default: the preset\'s; demo 6000, full all)')
    p.add_argument('--max-ood', type=int, default=None,
                   help='images scored per OOD set, a seeded subset (default: the preset\'s; demo all, full 4000)')
    p.add_argument('--data-root', default='datasets', help='data root (default ./datasets)')
    p.add_argument('--out-dir', default='runs/fmnist', help='checkpoints, caches, tables, figures (default ./runs/fmnist)')
    p.add_argument('--device', default=None, help='cpu or cuda (default cuda when present)')
    p.add_argument('--num-workers', type=int, default=2, help='data-loading workers (default 2)')
    p.add_argument('--jobs', type=int, default=1,
                   help='models trained and scored at once, each in its own process with 1/N of the threads and '
                        'its output in <out-dir>/seed<S>/logs/ (default 1: one after another, in this process); '
                        'a seed of the full preset on 2 cores: 2')
    p.add_argument('--far', nargs='+', default=['digits', 'gaussian', 'uniform'],
                   help='far-OOD sets (default digits gaussian uniform)')
    p.add_argument('--search', default='torch', choices=['faiss', 'torch'],
                   help='exact k-NN backend; torch is 2-4x faster than faiss-cpu here, same numbers (default torch)')
    p.add_argument('--figures', action='store_true', help='also draw histograms, ROC, t-SNE and k-NN grids (first seed)')
    p.add_argument('--download', action='store_true', help='let torchvision download Fashion-MNIST if missing')
    p.add_argument('--probe-epochs', type=int, default=None,
                   help='linear-probe epochs for the SupCon encoders (0: no probe; default: the preset\'s, full 3)')
    p.add_argument('--released', nargs='?', const='checkpoints', default=None, metavar='DIR',
                   help='no training: score the checkpoints listed in DIR/manifest.json (experiments/release_checkpoints.py) '
                        'on the bank they were released with, print the same tables and figures, and compare with '
                        'the recorded results (DIR default ./checkpoints; --out-dir default then runs/fmnist_released)')
    p.add_argument('--summary-only', action='store_true',
                   help='no training or scoring: the table over every seed under --out-dir made with this '
                        'protocol (the same preset and flags) and this code')
    p.add_argument('--baselines', action=argparse.BooleanOptionalAction, default=None,
                   help='also the ablation rows and the post-hoc baselines (default: the preset\'s, on for full)')
    return p


def slug(mode):
    """A model name as a folder name: 'ALPA-finetune*' -> 'ALPA-finetune-ce', 'Base +probe' -> 'Base-probe'."""
    return mode.replace('*', '-ce').replace(' +', '-')


def resolve_preset(args):
    """Fill every budget flag left unset from ``--preset``; pick the training precision."""
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    from util.misc import autocast_dtype, pick_device
    device = pick_device(args.device)
    if args.precision == 'auto':
        args.precision = 'bf16' if autocast_dtype(device, True) == torch.bfloat16 else 'fp32'
    how = {'bf16': 'bf16 autocast + channels_last', 'fp32': 'fp32'}[args.precision]
    why = ('native bf16 on this CPU' if device.type == 'cpu' else 'GPU') if args.precision == 'bf16' else ''
    print(f"[mode_fmnist] preset {args.preset}; training in {how}" + (f" ({why})" if why else '') + "; features fp32")
    return args


def train(args, seed, mode, base_ckp=None, loss='supcon'):
    from ALPA import main_supcon
    argv = ['--dataset', 'fashion-mnist', '--data-root', args.data_root, '--id-classes', *map(str, args.id_classes),
            '--model', args.model, '--width', str(args.width), '--batch-size', str(args.batch_size),
            '--num-workers', str(args.num_workers), '--cosine', '--seed', str(seed),
            '--save-folder', os.path.join(args.out_dir, f'seed{seed}', slug(mode)), '--save-freq', '0',
            '--eval', 'none', '--resume', 'auto']   # the score job prints the ID accuracy, from its own stores
    if loss == 'supcon':
        argv += ['--temp', '0.1']
    if args.steps_per_epoch:
        argv += ['--max-steps', str(args.steps_per_epoch)]
    if args.precision == 'bf16':
        argv += ['--amp', '--amp-dtype', 'bf16', '--channels-last']
    if args.device:
        argv += ['--device', args.device]
    if args.download:
        argv += ['--download']
    if mode.startswith('ALPA-finetune'):
        argv += ['--alpa-finetune', '--ckp', base_ckp, '--epochs', str(args.finetune_epochs),
                 '--learning-rate', str(args.finetune_lr)]
    elif mode == 'ALPA-train':
        argv += ['--alpa-train', '--epochs', str(args.epochs), '--learning-rate', str(args.train_lr)]
    else:
        argv += ['--epochs', str(args.epochs), '--learning-rate', str(args.lr)]
    parser = main_supcon.get_args_parser(loss)
    return main_supcon.main(parser.parse_args(argv))


def probe(args, seed, mode, ckp):
    """SupContrast's linear probe on a SupCon encoder (ALPA/main_linear.py) -> linear.pth."""
    from ALPA import main_linear
    argv = ['--ckp', ckp, '--dataset', 'fashion-mnist', '--data-root', args.data_root, '--epochs',
            str(args.probe_epochs), '--lr-decay-epochs', ','.join(str(round(args.probe_epochs * f)) for f in (.6, .75, .9)),
            '--num-workers', str(args.num_workers), '--seed', str(seed),
            '--save-folder', os.path.join(args.out_dir, f'seed{seed}', slug(mode), 'probe')]
    if args.steps_per_epoch:
        argv += ['--max-steps', str(args.steps_per_epoch)]
    if args.device:
        argv += ['--device', args.device]
    return main_linear.main(main_linear.get_args_parser().parse_args(argv))


def methods_for(args, mode):
    """The ablation rows for the SupCon models (the paper's ablation); KNN and CSD and the
    logit baselines for the CE models; the logit baselines alone for the linear probes."""
    if not args.baselines:
        return METHODS
    if mode.endswith('+probe'):
        return LOGIT_BASELINES
    if mode in ('CE', 'ALPA-finetune*'):
        return METHODS + FEATURE_BASELINES + LOGIT_BASELINES
    return ABLATIONS + FEATURE_BASELINES


def score(args, seed, mode, ckp):
    from CSD import CSD as csd_cli
    argv = ['--in-dataset', 'fashion-mnist', '--ckp', ckp, '--name', f'seed{seed}-{slug(mode)}', '--data-root', args.data_root,
            '--cache-dir', os.path.join(args.out_dir, 'cache'), '--output-dir', os.path.join(args.out_dir, 'results'),
            '--num-workers', str(args.num_workers), '--out-datasets', *NEAR, *args.far, '--method', *methods_for(args, mode),
            '--search', args.search, '--dtype', 'fp32']
    if args.max_train:
        argv += ['--max-train', str(args.max_train)]
    if args.max_ood:
        argv += ['--max-ood', str(args.max_ood)]
    if args.device:
        argv += ['--device', args.device]
    return csd_cli.main(csd_cli.get_args_parser().parse_args(argv))


def seed_jobs(args):
    """The jobs of one seed, ``(kind, model, needs)``, in the order they start once what they
    need is done: the long training chains first (Base -> ALPA-finetune, ALPA-train, CE ->
    ALPA-finetune*), then the probes, then the scoring of every model (a probe's after its
    encoder's, ``waits_for``)."""
    jobs = [('train', 'Base', None), ('train', 'ALPA-train', None), ('train', 'ALPA-finetune', 'Base')]
    if args.ce:   # the * rows: a CE backbone and its MODE-F*
        jobs += [('train', 'CE', None), ('train', 'ALPA-finetune*', 'CE')]
    if args.probe_epochs:   # linear probes of the SupCon encoders, for the logit-based baselines
        jobs += [('probe', f'{m} +probe', m) for m in ('Base', 'ALPA-finetune', 'ALPA-train')]
    made = {model for _, model, _ in jobs}
    return jobs + [('score', m, m) for m in MODELS if m in made]


def waits_for(kind, mode):
    """The job that must be done before this one besides the one making its checkpoint: a
    probe's scoring reads its encoder's feature stores (``CSD/feature_collect.probe_split``),
    so it starts after the encoder's scoring wrote them."""
    return ('score', mode.removesuffix(' +probe')) if kind == 'score' and mode.endswith(' +probe') else None


def run_job(args, seed, kind, mode, ckp):
    """One job -> its checkpoint path (train, probe) or its scores (score)."""
    if kind == 'train':
        return train(args, seed, mode, base_ckp=ckp, loss='ce' if mode in ('CE', 'ALPA-finetune*') else 'supcon')['last']
    if kind == 'probe':
        return probe(args, seed, mode.removesuffix(' +probe'), ckp)['path']
    out = score(args, seed, mode, ckp)
    keep_splits = args.figures and seed == args.seeds[0]   # the figures read the features
    return {k: v for k, v in out.items() if k != 'splits' or keep_splits}


def timing_key(seed, kind, mode):
    what = {'train': 'train', 'probe': 'probe', 'score': 'features+scores'}[kind]
    return f"seed{seed} {what} {mode.removesuffix(' +probe') if kind == 'probe' else mode}"


def run_seed(args, seed):
    """Every job of one seed -> ({model: scores}, {job: seconds}). ``--jobs 1``: one after
    another in this process. ``--jobs N``: N at a time, each in its own process with 1/N of the
    threads and its output in seed<S>/logs/; a job starts as soon as what it needs is done."""
    done, timings, pending = {}, {}, seed_jobs(args)
    if args.jobs == 1:
        for kind, mode, needs in pending:
            t0 = time.perf_counter()
            done[kind, mode] = run_job(args, seed, kind, mode, done.get(('train', needs)) or done.get(('probe', needs)))
            timings[timing_key(seed, kind, mode)] = time.perf_counter() - t0
    else:
        run_in_processes(args, seed, pending, done, timings)
    scored = {mode: done['score', mode] for kind, mode, _ in seed_jobs(args) if kind == 'score'}
    if args.figures and seed == args.seeds[0]:
        t0 = time.perf_counter()
        paths = draw_figures(args, seed, scored, os.path.join(args.out_dir, 'figures'))
        timings['figures'] = time.perf_counter() - t0
        print('\nfigures:\n  ' + '\n  '.join(paths))
    return scored, timings


def _job_process(queue, args, seed, kind, mode, ckp, threads, log_path):
    """A job in a process of its own: its output to ``log_path``, its result to ``queue``."""
    import contextlib
    import traceback
    torch.set_num_threads(threads)
    with open(log_path, 'w', buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        t0 = time.perf_counter()
        try:
            result = run_job(args, seed, kind, mode, ckp)
        except BaseException as e:   # the whole traceback to the log, one line to the parent
            traceback.print_exc()
            queue.put((kind, mode, None, f'exit status {e.code}' if isinstance(e, SystemExit) else first_line(e)))
            return
    queue.put((kind, mode, result, time.perf_counter() - t0))


def run_in_processes(args, seed, pending, done, timings):
    import multiprocessing as mp
    import queue as queue_lib
    ctx = mp.get_context('spawn')
    results, running = ctx.Queue(), {}
    threads = max(1, torch.get_num_threads() // args.jobs)
    logs = Path(args.out_dir) / f'seed{seed}' / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    made = lambda needs: needs is None or ('train', needs) in done or ('probe', needs) in done
    ready = lambda kind, mode, needs: made(needs) and waits_for(kind, mode) in (None, *done)
    try:
        while pending or running:
            for job in [j for j in pending if ready(*j)][:args.jobs - len(running)]:
                kind, mode, needs = job
                pending.remove(job)
                log_path = logs / f"{kind}-{slug(mode)}.log"
                ckp = done.get(('train', needs)) or done.get(('probe', needs))
                proc = ctx.Process(target=_job_process, args=(results, args, seed, kind, mode, ckp, threads, log_path))
                proc.start()
                running[kind, mode] = (proc, log_path)
                print(f"[seed {seed}] {kind} {mode}: started, {threads} thread(s), output in {log_path}", flush=True)
            try:
                kind, mode, result, info = results.get(timeout=2)
            except queue_lib.Empty:
                for (kind, mode), (proc, log_path) in running.items():
                    if not proc.is_alive() and proc.exitcode != 0:
                        raise UserError(f"{kind} {mode} (seed {seed}) died with exit code {proc.exitcode}; its output "
                                        f"is in {log_path}; run the same command again to go on from what is done")
                continue
            proc, log_path = running.pop((kind, mode))
            proc.join()
            if result is None:
                raise UserError(f"{kind} {mode} (seed {seed}) failed: {info}; the whole output is in {log_path}; "
                                "run the same command again to go on from what is done")
            done[kind, mode] = result
            timings[timing_key(seed, kind, mode)] = info
            print(f"[seed {seed}] {kind} {mode}: done in {info:.0f} s", flush=True)
    finally:   # a failed job stops the others; finished checkpoints and feature stores stay
        for proc, _ in running.values():
            proc.terminate()
            proc.join()


def protocol_config(args):
    """What makes two seeds' results comparable: every knob but the seeds, paths and workers."""
    from util.fingerprint import code_hash
    skip = {'seeds', 'out_dir', 'data_root', 'num_workers', 'device', 'figures', 'download', 'search', 'summary_only',
            'jobs'}
    config = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    config['code'] = code_hash(('ALPA', 'CSD', 'util', 'experiments/mode_fmnist.py'))   # never merge old code's numbers
    return config


def merge_seeds(args, per_seed):
    """This run's seeds plus every other seed's ``results.json`` under --out-dir made with the
    same protocol (seeds run in separate invocations end up in one table)."""
    merged = dict(per_seed)
    for f in sorted(Path(args.out_dir).glob('seed*/results.json')):
        seed = int(f.parent.name[4:])
        if seed in merged:
            continue
        saved = json.loads(f.read_text())
        if saved.get('config') == json.loads(json.dumps(protocol_config(args))):
            merged[seed] = saved['results']
            print(f"[mode_fmnist] seed {seed}: results from an earlier run ({f})")
    return dict(sorted(merged.items()))


def summary_rows(per_seed, far):
    """per_seed[seed][model][method][ood] = metrics -> rows of mean ± std (×100)."""
    rows = []
    for model in [m for m in MODELS if all(m in per_seed[s] for s in per_seed)]:
        methods = [m for m in per_seed[next(iter(per_seed))][model] if all(m in per_seed[s][model] for s in per_seed)]
        for method in methods:
            cells = {}
            for group, names in (('near', NEAR), ('far', far)):
                for metric in ('FPR', 'AUROC'):
                    vals = [100 * float(np.mean([per_seed[s][model][method][n][metric] for n in names])) for s in per_seed]
                    cells[f'{group} {metric}'] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
            rows.append((model, method, cells))
    return rows


def format_summary(rows, n_seeds, far):
    cols = ['near FPR', 'near AUROC', 'far FPR', 'far AUROC']
    wm = max([14, *(len(m) for m, _, _ in rows)])
    ws = max([5, *(len(s) for _, s, _ in rows)])
    head = f"{'model':<{wm}} {'score':<{ws}} " + ' '.join(f'{c:>15}' for c in cols)
    lines = [f"Fashion-MNIST, ID classes 0-5, mean ± std over {n_seeds} seed(s), ×100 "
             f"(near = held-out classes 6-9; far = mean of {', '.join(far)})", head]
    md = ['| model | score | ' + ' | '.join(cols) + ' |', '|---|---|' + '---:|' * len(cols)]
    for model, method, cells in rows:
        lines.append(f"{model:<{wm}} {method:<{ws}} " + ' '.join(f"{cells[c][0]:>8.2f} ± {cells[c][1]:<4.2f}" for c in cols))
        md.append(f"| {model} | {method} | " + ' | '.join(f"{cells[c][0]:.2f} ± {cells[c][1]:.2f}" for c in cols) + ' |')
    return '\n'.join(lines), '\n'.join(md) + '\n'


def draw_figures(args, seed, scored, out):
    """Histograms and ROC per model, t-SNE Base vs ALPA, k-NN retrieval grid."""
    from CSD.scoring import build_score, default_k
    from CSD.visualize import plot_knn_grid, plot_roc, plot_score_histograms, plot_tsne
    from util import data as data_lib
    from util import ood as ood_lib
    from util.features import SCALES, l2_normalize
    paths = []
    for model, res in scored.items():
        for method in METHODS:
            ids, oods = res['scores'][method]
            paths.append(plot_score_histograms(ids, oods, os.path.join(out, f'hist_{slug(model)}_{method}.png'),
                                               f'{model}, {method.upper()} scores: ID test vs each OOD set (seed {seed})'))
        curves = {n: {m.upper(): (res['scores'][m][0], res['scores'][m][1][n]) for m in METHODS}
                  for n in res['scores']['knn'][1]}
        paths.append(plot_roc(curves, os.path.join(out, f'roc_{slug(model)}.png'), f'{model}: ROC, ID = positive (seed {seed})'))
    # t-SNE: the same 1,200 ID test images + 300 held-out + 300 digits (or fewer), global vectors
    rng = np.random.default_rng(0)
    panels = {}
    pick = None
    for model in ('Base', 'ALPA-finetune', 'ALPA-train'):
        sp = scored[model]['splits']
        if pick is None:
            pick = {n: seeded_indices(len(sp[n]['features']), min(size, len(sp[n]['features'])), rng)
                    for n, size in (('test', 1200), ('fashion-mnist-heldout', 300), ('digits', 300)) if n in sp}
        feats = np.concatenate([l2_normalize(np.asarray(sp[n]['features'][pick[n], 4])) for n in pick])
        ood_label = {'fashion-mnist-heldout': -1, 'digits': -2}
        labels = np.concatenate([np.asarray(sp['test']['labels'])[pick['test']]] +
                                [np.full(len(pick[n]), ood_label[n]) for n in pick if n != 'test'])
        panels[model] = (feats, labels)
    names = {i: FMNIST_CLASSES[c] for i, c in enumerate(args.id_classes)}
    paths.append(plot_tsne(panels, os.path.join(out, 'tsne.png'),
                           'Global features (t-SNE): ID test classes vs OOD', class_names=names))
    # k-NN retrieval: queries from ID test and held-out; neighbours by the global vector
    # (KNN) and by the scale that decides the CSD score
    spec = data_lib.get_spec('fashion-mnist')
    train_imgs = data_lib.get_id_dataset('fashion-mnist', args.data_root, 'train', None, args.id_classes)
    test_imgs = data_lib.get_id_dataset('fashion-mnist', args.data_root, 'test', None, args.id_classes)
    held = ood_lib.get_ood_dataset('fashion-mnist-heldout', args.data_root, spec, None, args.id_classes)
    for model in ('Base', 'ALPA-finetune'):
        sp = scored[model]['splits']
        train_feats = np.asarray(sp['train']['features'])                  # [N, 6, C]
        bank_idx = np.asarray(sp['train']['indices']) if 'indices' in sp['train'] else np.arange(len(train_feats))
        # The table's own scorers (same k, same search): CSD also says which scale decided.
        csd = build_score('csd', default_k('csd'), backend=args.search).fit(train_feats)
        knn = build_score('knn', 5, backend=args.search).fit(train_feats)
        rows = []
        for split, ds in (('test', test_imgs), ('fashion-mnist-heldout', held)):
            q_all = np.asarray(sp[split]['features'][:50])
            # Among the first 50 queries: two whose CSD score is decided by a local vector
            # (what the paper's figure illustrates), then one decided by the global one.
            _, decided = csd.score(q_all, return_scale=True)
            local = [i for i, s_ in enumerate(decided) if s_ != 'global'][:2]
            glob = [i for i, s_ in enumerate(decided) if s_ == 'global'][:3 - len(local)]
            for i in local + glob:
                q = l2_normalize(q_all[i])                                    # [6, C]
                _, g = knn.search.search(q[4:5], 5)                           # global bank: rows = images
                _, loc = csd.search.search(q[SCALES.index(decided[i])][None], 5)   # pooled bank: N·6 rows
                lab = lambda j: FMNIST_CLASSES[args.id_classes[int(train_imgs[j][1])]]
                rows.append({
                    'query': np.asarray(ds[i][0]),
                    'query_label': f"{'ID' if split == 'test' else 'OOD'}, CSD uses {decided[i]}",
                    'groups': [('KNN: global', [(np.asarray(train_imgs[bank_idx[j]][0]), lab(bank_idx[j]))
                                                for j in g[0]]),
                               ('CSD: its deciding scale', [(np.asarray(train_imgs[bank_idx[j // 6]][0]),
                                                            f'{lab(bank_idx[j // 6])} {SCALES[j % 6]}')
                                                           for j in loc[0]])]})
        paths.append(plot_knn_grid(rows, os.path.join(out, f'knn_grid_{model}.png'),
                                   f'{model}: 5 nearest training images, global (KNN) vs CSD\'s deciding scale'))
    return paths


def score_released(args):
    """--released DIR: the manifest's checkpoints scored as the protocol scores its own models
    (KNN and CSD, the bank they were released with), with the figures, and each AUROC beside
    the one recorded in the manifest."""
    if args.out_dir == 'runs/fmnist':
        args.out_dir = 'runs/fmnist_released'
    manifest = json.loads((Path(args.released) / 'manifest.json').read_text())
    entries = manifest['checkpoints']
    args.max_train = entries[0]['max_train']
    args.max_ood = entries[0].get('max_ood')
    seed, scored, per_seed, t0 = manifest['seed'], {}, {}, time.perf_counter()
    print(f"[mode_fmnist] scoring {len(entries)} released checkpoints from {args.released} "
          f"(commit {manifest['commit']}), bank {args.max_train or 'all'} images")
    for e in entries:
        scored[e['name']] = score(args, seed, e['name'], str(Path(args.released) / e['file']))
    per_seed[seed] = {m: r['results'] for m, r in scored.items()}
    if args.figures:
        print('\nfigures:\n  ' + '\n  '.join(draw_figures(args, seed, scored, os.path.join(args.out_dir, 'figures'))))
    text, md = format_summary(summary_rows(per_seed, args.far), 1, args.far)
    print('\n' + text)
    worst = 0.0
    print('\nAUROC now vs recorded in the manifest (×100):')
    for e in entries:
        for method in ('knn', 'csd'):
            diffs = {n: 100 * scored[e['name']]['results'][method][n]['AUROC'] - r['AUROC']
                     for n, r in e['results'][method].items()}
            worst = max(worst, *(abs(d) for d in diffs.values()))
            print(f"  {e['name']:<14} {method}: " + ', '.join(f"{n} {d:+.3f}" for n, d in diffs.items()))
    print(f"largest |difference| {worst:.3f}; total {(time.perf_counter() - t0) / 60:.1f} min")
    os.makedirs(args.out_dir, exist_ok=True)
    (Path(args.out_dir) / 'summary.md').write_text(md)
    return per_seed


def main(args):
    args = resolve_preset(args)
    if args.released:
        return score_released(args)
    t_start = time.perf_counter()
    per_seed, timings = {}, {}
    for seed in ([] if args.summary_only else args.seeds):
        scored, seed_timings = run_seed(args, seed)
        per_seed[seed] = {mode: res['results'] for mode, res in scored.items()}
        timings.update(seed_timings)
        seed_file = Path(args.out_dir) / f'seed{seed}' / 'results.json'
        seed_file.parent.mkdir(parents=True, exist_ok=True)
        seed_file.write_text(json.dumps({'config': protocol_config(args), 'results': per_seed[seed]}, indent=1))
    per_seed = merge_seeds(args, per_seed)
    if not per_seed:
        raise UserError(f"--summary-only: no seed*/results.json under {args.out_dir} made with this protocol and code")
    text, md = format_summary(summary_rows(per_seed, args.far), len(per_seed), args.far)
    print('\n' + text)
    os.makedirs(args.out_dir, exist_ok=True)
    (Path(args.out_dir) / 'summary.md').write_text(md)
    if args.summary_only:   # summary.json keeps the args and timings of the run that trained
        print(f"written: {args.out_dir}/summary.md")
        return per_seed
    (Path(args.out_dir) / 'summary.json').write_text(json.dumps(
        {'args': vars(args), 'per_seed': per_seed, 'timings_s': timings}, indent=2, default=str))
    total = time.perf_counter() - t_start
    print(f"\ntotal {total / 60:.1f} min; " + ', '.join(f'{k} {v:.0f}s' for k, v in timings.items()))
    print(f"written: {args.out_dir}/summary.md, summary.json, results/, figures/")
    return per_seed


if __name__ == '__main__':
    from util.errors import run_cli
    run_cli(main, get_args_parser().parse_args())
