"""What BENCHMARKS.md quotes beside a mode_fmnist table: per model, the ID accuracy of each seed
(from the result JSONs the score jobs wrote) and the per-epoch loss curve of each training run
(from its TensorBoard ``epoch/*`` scalars).

    python experiments/fmnist_report.py --out-dir runs/fmnist_full
"""
import argparse
import json
import statistics
from pathlib import Path

# Training run folder -> the epoch scalar its curve is read from.
CURVES = {'Base': 'supcon', 'ALPA-train': 'alpa', 'ALPA-finetune': 'alpa', 'ALPA-finetune-ce': 'alpa', 'CE': 'ce'}


def get_args_parser():
    p = argparse.ArgumentParser('ID accuracies and loss curves of a mode_fmnist run')
    p.add_argument('--out-dir', required=True, help="mode_fmnist's --out-dir")
    return p


def seeds_of(out):
    return sorted(int(d.name[4:]) for d in out.glob('seed*') if (d / 'results.json').is_file())


def id_accuracies(out, seeds):
    """-> {model folder: {seed: (how, percent)}} from results/fashion-mnist/seed<S>-<model>/*.json."""
    acc = {}
    for d in sorted((out / 'results' / 'fashion-mnist').glob('seed*-*')):
        seed, model = d.name.split('-', 1)
        files = sorted(d.glob('*.json'))
        if int(seed[4:]) in seeds and files:
            meta = json.loads(files[0].read_text())['meta']['id_accuracy']
            acc.setdefault(model, {})[int(seed[4:])] = (meta['how'], 100 * meta['value'])
    return acc


def loss_curve(out, seed, model, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = sorted((out / f'seed{seed}' / model).glob('*/*/*/tb'))
    if not runs:
        return '-'
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    tags = [t for t in events.Tags()['scalars'] if t.startswith('epoch/') and t.endswith(tag)]
    return ' '.join(f'{e.value:.3f}' for e in events.Scalars(tags[0])) if tags else '-'


def main(args):
    out = Path(args.out_dir)
    seeds = seeds_of(out)
    if not seeds:
        raise SystemExit(f"{out}: no seed*/results.json; run experiments/mode_fmnist.py with this --out-dir first")
    for model, per_seed in sorted(id_accuracies(out, seeds).items()):
        vals = [per_seed[s][1] for s in seeds if s in per_seed]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{model:<22} {statistics.mean(vals):6.2f} ± {spread:.2f}  ({next(iter(per_seed.values()))[0]}; "
              + ', '.join(f'seed{s} {v[1]:.2f}' for s, v in sorted(per_seed.items())) + ')')
    print()
    for model, tag in CURVES.items():
        if (out / f'seed{seeds[0]}' / model).is_dir():
            print(f"{model + ' ' + tag:<21} " + ' | '.join(loss_curve(out, s, model, tag) for s in seeds))


if __name__ == '__main__':
    main(get_args_parser().parse_args())
