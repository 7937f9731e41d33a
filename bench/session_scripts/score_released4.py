# As run on 2026-12-01 for the released checkpoints (BENCHMARKS.md); paths are that machine's.
"""Score the four released models exactly as bench/mode_fmnist.py's score() does (same argv,
same bank, same cache), restricted to KNN and CSD and the two real-image OOD sets."""
import glob
import os
import time

from bench import mode_fmnist as m
from CSD import CSD as csd_cli

args = m.resolve_preset(m.get_args_parser().parse_args(['--preset', 'full', '--seeds', '0', '--data-root',
        '/work/main/datasets', '--out-dir', '/work/runs/fmnist_full', '--num-workers', '1']))
for mode in ['Base', 'ALPA-finetune', 'ALPA-train', 'CE']:
    t0 = time.perf_counter()
    ckp = [f for f in glob.glob(f'/work/runs/fmnist_full/seed0/{m.slug(mode)}/**/last.pth', recursive=True)
           if '/probe/' not in f][0]
    argv = ['--in-dataset', 'fashion-mnist', '--ckp', ckp, '--name', f'seed0-{m.slug(mode)}', '--data-root', args.data_root,
            '--cache-dir', os.path.join(args.out_dir, 'cache'), '--output-dir', os.path.join(args.out_dir, 'results'),
            '--num-workers', '1', '--out-datasets', 'fashion-mnist-heldout', 'digits', '--method', 'knn', 'csd',
            '--search', args.search]
    csd_cli.main(csd_cli.get_args_parser().parse_args(argv))
    print(f"[score4] {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
