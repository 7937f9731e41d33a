"""Epoch curves of every model of a full-preset run, from its TensorBoard event files: one
line per run folder with each ``epoch/*`` scalar over epochs (later event files of a resumed
run override earlier ones at the same step).

    python bench/session_scripts/tb_curves.py /work/runs/fmnist_full2 [--tag epoch/alpa]
"""
import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def curves(tb_dir, prefix):
    values = {}
    for events in sorted(tb_dir.glob('events.out.tfevents.*'), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={'scalars': 0})
        acc.Reload()
        for tag in acc.Tags()['scalars']:
            if tag.startswith(prefix):
                for ev in acc.Scalars(tag):
                    values.setdefault(tag, {})[ev.step] = ev.value
    return values


def main():
    p = argparse.ArgumentParser()
    p.add_argument('out_dir')
    p.add_argument('--tag', default='epoch/', help='scalar tags starting with this (default epoch/)')
    args = p.parse_args()
    for tb in sorted(Path(args.out_dir).glob('seed*/*/*/*_models/*/tb')):
        run = tb.relative_to(args.out_dir).parts
        for tag, by_step in sorted(curves(tb, args.tag).items()):
            print(f"{run[0]} {run[1]:<18} {tag:<14} " + ' '.join(f"{by_step[s]:.3f}" for s in sorted(by_step)))


if __name__ == '__main__':
    main()
