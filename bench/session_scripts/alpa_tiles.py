"""ALPA with AlignmentStats' [Nb, m, X] passes done a cache-sized tile at a time (the CPU
default) against one whole-tensor pass (the code before), same process, alternating:

  1. AlignmentStats forward + backward at the full preset's shapes (2B = 256 views, 4x4 maps, d = 80);
  2. whole ALPA-train steps at the full preset's shape (width 16, 1x28x28, bf16 + channels_last
     where the CPU has native bf16), through ``ALPA.engine.Trainer`` as training runs them.

    OMP_NUM_THREADS=T .venv/bin/python bench/session_scripts/alpa_tiles.py [--repeats 7] [--against REV]

``--against REV`` adds a third contender: ``AlignmentStats`` as it was at commit REV
(``git show REV:ALPA/attention.py``), e.g. the last commit before the tiles.
"""
import argparse
import statistics
import subprocess
import time
import types

import torch

from ALPA import attention
from bench.bench_train_step import make_trainer
from util.misc import cpu_has_native_bf16

NB, M, D = 256, 16, 80
SETTINGS = {'one tile': (attention.AlignmentStats, 1 << 62),
            'tiled': (attention.AlignmentStats, attention.TILE_ELEMENTS)}


def add_revision(rev):
    src = subprocess.check_output(['git', 'show', f'{rev}:ALPA/attention.py'], text=True)
    old = types.ModuleType(f'attention_{rev}')
    exec(compile(src, f'{rev}:ALPA/attention.py', 'exec'), old.__dict__)
    SETTINGS[f'at {rev}'] = (old.AlignmentStats, attention.TILE_ELEMENTS)


def use(name):
    """align_cosine looks AlignmentStats up in the module at call time."""
    attention.AlignmentStats, attention.TILE_ELEMENTS = SETTINGS[name]


def stats_step(inputs):
    q, va, k, vb = (x.detach().requires_grad_() for x in inputs)
    t0 = time.perf_counter()
    dot, sq = attention.AlignmentStats.apply(q, va, k, vb, 0.0)
    (dot.sum() + sq.sqrt().sum()).backward()
    return time.perf_counter() - t0


def alternate(step, repeats):
    times = {name: [] for name in SETTINGS}
    for name in SETTINGS:   # warm-up
        use(name)
        step()
    for _ in range(repeats):
        for name in SETTINGS:
            use(name)
            times[name].append(step())
    use('tiled')
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:<14} median {med[name]:.3f} s   runs {', '.join(f'{x:.3f}' for x in t)}")
    print("  speed-up of the tiles: " + ', '.join(f"{med[name] / med['tiled']:.2f}x over {name}"
                                                  for name in SETTINGS if name != 'tiled'))


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--against', metavar='REV', help='also time AlignmentStats as it was at this commit')
    args = p.parse_args()
    if args.against:
        add_revision(args.against)
    torch.manual_seed(0)
    inputs = (torch.randn(NB * M, D) / 9, torch.randn(NB * M, D), torch.randn(NB, M, D), torch.randn(NB, M, D))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tile = "
          f"{attention.tile_size(NB, M, NB * M, torch.device('cpu'))} of {NB} maps")
    print(f"AlignmentStats forward + backward, {NB} x {M} tokens, d = {D}:")
    alternate(lambda: stats_step(inputs), args.repeats)
    bf16 = cpu_has_native_bf16()
    ns = argparse.Namespace(model='resnet18', width=16, channels=1)
    trainer, opt = make_trainer(ns, torch.device('cpu'), 'ALPA-train', bf16, bf16)
    images = torch.randn(2 * 128, 1, 28, 28)
    labels = torch.randint(0, 6, (128,))

    def train_step():
        t0 = time.perf_counter()
        loss = trainer.losses(trainer.to_device(images), labels)['loss']
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    print(f"ALPA-train step, resnet18 w16, 128 images (256 views) of 1x28x28, "
          f"{'bf16 + channels_last' if bf16 else 'fp32'}:")
    alternate(train_step, args.repeats)


if __name__ == '__main__':
    main()
