# As run on 2026-12-01 for the seed-0 full preset (BENCHMARKS.md); paths are that machine's.
# PYTHONPATH=<worktree at 91068e2> OMP_NUM_THREADS=1 python bench/session_scripts/preset_parts.py 0 ALPA-train
"""Run parts of bench/mode_fmnist.py's full preset for one seed, with exactly its argv
(same run folders and fingerprints), so the later full invocation reuses them."""
import sys
import time

from bench import mode_fmnist as m

seed, parts = int(sys.argv[1]), sys.argv[2].split(',')
args = m.resolve_preset(m.get_args_parser().parse_args(['--preset', 'full', '--seeds', str(seed), '--data-root',
        '/work/main/datasets', '--out-dir', '/work/runs/fmnist_full', '--num-workers', '1']))
ck = {}
for part in parts:
    t0 = time.perf_counter()
    if part == 'Base':
        ck['Base'] = m.train(args, seed, 'Base')['last']
    elif part == 'ALPA-finetune':
        ck['Base'] = ck.get('Base') or m.train(args, seed, 'Base')['last']
        ck[part] = m.train(args, seed, part, base_ckp=ck['Base'])['last']
    elif part == 'ALPA-train':
        ck[part] = m.train(args, seed, part)['last']
    elif part == 'CE':
        ck[part] = m.train(args, seed, 'CE', loss='ce')['last']
    elif part == 'ALPA-finetune*':
        ck[part] = m.train(args, seed, part, base_ckp=ck['CE'], loss='ce')['last']
    elif part.endswith('+probe'):
        mode = part[:-len(' +probe')] if ' ' in part else part[:-len('+probe')]
        ck[part] = m.probe(args, seed, mode, ck[mode])['path']
    print(f"[driver] seed{seed} {part}: {time.perf_counter() - t0:.0f} s", flush=True)
