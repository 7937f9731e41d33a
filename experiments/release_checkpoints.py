"""Release one seed of the full Fashion-MNIST preset: stripped checkpoints + manifest.json.

    python experiments/release_checkpoints.py --out-dir runs/fmnist_full --seed 0 --dest checkpoints \
        --commit $(git rev-parse --short HEAD)

For Base, ALPA-finetune, ALPA-train and CE, the seed's ``last.pth`` is copied without its
optimizer, GradScaler, RNG and step state (the model, the ALPA attention when there is one,
``opt``, ``epoch``, the architecture record with the normalisation, and the run fingerprint
stay), written atomically to ``<dest>/fmnist_<model>_seed<seed>.pth``. ``manifest.json`` lists
each with its sha256, the command that trained and scored it, the machine, its ID accuracy
and the KNN and CSD results (×100) that ``experiments/mode_fmnist.py`` printed for it, with the
bank they were scored on (``max_train``: null = all 36,000 ID training images), the OOD
subset size (``max_ood``: null = every image of each OOD set) and the command that re-scores it.
"""
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from util.cli import Parser
from util.misc import write_text_atomic

RELEASED = ['Base', 'ALPA-finetune', 'ALPA-train', 'CE']
KEEP = ('model', 'attention', 'opt', 'epoch', 'arch', 'fingerprint')


def machine():
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        fields = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
        name = fields.get('Model name', '').strip()
        flags = fields.get('Flags', '')
        bf16 = [f for f in ('avx512_bf16', 'amx_bf16') if f in flags.split()]
        return f"{name}, {os.cpu_count()} CPUs" + (f", {' + '.join(bf16)}" if bf16 else '') + f", {platform.system()}"
    except OSError:
        return platform.processor() or 'unknown'


def get_args_parser():
    p = Parser('release full-preset checkpoints')
    p.add_argument('--out-dir', required=True, help="experiments/mode_fmnist.py's --out-dir of the full preset")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--dest', default='checkpoints')
    p.add_argument('--commit', required=True, help='the commit the preset ran at')
    p.add_argument('--command', default=None, help='the preset command (default: the usual one for --seed)')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from experiments.mode_fmnist import slug
    from util.checkpoint import file_sha256, read_checkpoint, save_checkpoint
    out, dest = Path(args.out_dir), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary = json.loads((out / 'summary.json').read_text()) if (out / 'summary.json').exists() else {}
    command = args.command or f"python experiments/mode_fmnist.py --preset full --seeds {args.seed}"
    entries = []
    for mode in RELEASED:
        run = out / f'seed{args.seed}' / slug(mode)
        found = [f for f in run.rglob('last.pth') if 'probe' not in f.parts]
        if len(found) != 1:
            raise SystemExit(f"expected one last.pth under {run}, found {len(found)}")
        ckp = read_checkpoint(found[0])
        stripped = {k: ckp[k] for k in KEEP if ckp.get(k) is not None}
        file = dest / f"fmnist_{slug(mode)}_seed{args.seed}.pth"
        save_checkpoint(stripped, str(file))
        name = f'seed{args.seed}-{slug(mode)}'
        results, id_acc, max_train, max_ood, ks = {}, None, None, None, {}
        for method in ('knn', 'csd'):
            js = sorted((out / 'results' / 'fashion-mnist' / name).glob(f'{method}_k*.json'))
            if len(js) != 1:
                raise SystemExit(f"expected one {method} result for {name}, found {[str(j) for j in js]}")
            saved = json.loads(js[0].read_text())
            results[method] = {n: {'FPR': round(100 * m['FPR'], 4), 'AUROC': round(100 * m['AUROC'], 4)}
                               for n, m in saved['metrics'].items()}
            ks[method] = saved['meta']['k']
            id_acc = saved['meta']['id_accuracy']
            n_train = saved['meta']['n_train']
            max_ood = saved['meta'].get('max_ood')
            if 'args' in summary:
                max_train = n_train if summary['args'].get('max_train') else None
            else:   # no summary (the models were scored on their own): the full bank is 36,000 images
                max_train = None if n_train == 36000 else n_train
        oods = list(results['knn'])   # the rows that were scored (NEAR + far when the whole preset ran)
        rescore = (f"python CSD/CSD.py --in-dataset fashion-mnist --ckp {file.as_posix()} --method knn csd "
                   f"--k {ks['knn']} {ks['csd']} --dtype fp32 --out-datasets {' '.join(oods)}"
                   + (f" --max-train {max_train}" if max_train else '') + (f" --max-ood {max_ood}" if max_ood else ''))
        entries.append({'name': mode, 'file': file.name, 'sha256': file_sha256(str(file)),
                        'bytes': file.stat().st_size, 'arch': stripped['arch'], 'epoch': stripped.get('epoch'),
                        'command': f"{command}   # at commit {args.commit}; this model: {out}/seed{args.seed}/{slug(mode)}",
                        'rescore_command': rescore, 'machine': machine(),
                        'id_accuracy': {'how': id_acc['how'], 'percent': round(100 * id_acc['value'], 2)},
                        'max_train': max_train, 'max_ood': max_ood, 'k': ks, 'results': results})
        print(f"{file}: {entries[-1]['sha256'][:12]}..., {entries[-1]['bytes'] / 1e6:.1f} MB, ID accuracy "
              f"{entries[-1]['id_accuracy']['percent']}% ({id_acc['how']})")
    manifest = {'protocol': 'Fashion-MNIST, ID classes 0-5 (experiments/mode_fmnist.py); OOD rows as listed: held-out '
                            'classes 6-9 (near), digits / gaussian / uniform (far); results x100, FPR = FPR95 with '
                            'ID positive',
                'commit': args.commit, 'seed': args.seed, 'checkpoints': entries}
    write_text_atomic(dest / 'manifest.json', json.dumps(manifest, indent=1) + '\n')
    print(f"written: {dest / 'manifest.json'}")
    return manifest


if __name__ == '__main__':
    torch.set_num_threads(1)
    main()
