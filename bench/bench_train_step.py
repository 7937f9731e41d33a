"""Training-step time: ALPA-train against Base, and the four precision/layout variants.

    python bench/bench_train_step.py                          # ResNet-18 w64, B=128 (256 views), ALPA vs Base
    python bench/bench_train_step.py --variants --width 16    # fp32 / bf16 x NCHW / channels_last, same run
    python bench/bench_train_step.py --device cuda --amp --batch 256
    python bench/bench_train_step.py --compile --width 16 --channels 1 --size 28   # torch.compile vs eager

Every step goes through ``ALPA.engine.Trainer`` exactly as training does (forward, losses,
backward, SGD step) on the same random batch; the configurations alternate step by step
and the medians are compared. ``--variants`` times Base and ALPA-train steps in fp32 and
bf16 autocast, each with and without channels_last, and says which is fastest here; bf16
is only worth it where the CPU has native bf16 (``util.misc.cpu_has_native_bf16``).
``--compile`` times the Base step of the fastest variant eagerly and with
``torch.compile`` of the model (inductor): the compile time (first steps), the steady step
and the number of steps after which compiling pays off.
"""
import argparse
import statistics
import time

import torch

VARIANTS = {  # name: (amp, channels_last)
    'fp32': (False, False),
    'fp32 + channels_last': (False, True),
    'bf16': (True, False),
    'bf16 + channels_last': (True, True),
}


def get_args_parser():
    p = argparse.ArgumentParser('train-step benchmark')
    p.add_argument('--model', default='resnet18', help='CIFAR-style encoder (default resnet18)')
    p.add_argument('--width', type=int, default=64, help='ResNet width (default 64, the paper)')
    p.add_argument('--batch', type=int, default=128, help='images per step, 2 views each (default 128)')
    p.add_argument('--size', type=int, default=32, help='input size (default 32)')
    p.add_argument('--channels', type=int, default=3, help='input channels (default 3; 1 for Fashion-MNIST)')
    p.add_argument('--repeats', type=int, default=3, help='timed steps per configuration after one warm-up (default 3)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    p.add_argument('--amp', action='store_true', help='ALPA vs Base with autocast (bf16, or fp16 on old GPUs)')
    p.add_argument('--variants', action='store_true', help='time the four precision/layout variants instead')
    p.add_argument('--compile', action='store_true',
                   help='time torch.compile against eager (Base, bf16 + channels_last where native, else fp32)')
    return p


def make_trainer(args, device, mode, amp, channels_last, compile_model=False):
    from ALPA.attention import AttentionSimilarity
    from ALPA.engine import Trainer, TrainForward
    from util.networks import build_model
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    net = build_model(f'{args.model}-supcon', width=args.width, in_channel=args.channels).to(device, memory_format=fmt)
    net.train()
    att = AttentionSimilarity(net.encoder.out_dim, 80).to(device) if mode != 'Base' else None
    params = list(net.parameters()) + (list(att.parameters()) if att is not None else [])
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    ns = argparse.Namespace(loss='supcon', temp=0.1, temperature_s=10.0, lam=1.0, amp=amp, amp_dtype='auto',
                            channels_last=channels_last, alpa_train=mode != 'Base', alpa_finetune=False)
    forward = TrainForward(net)
    if compile_model:
        # The step calls TrainForward, which calls net.forward_features/forward_head: compiling
        # `net` itself would compile nothing the step runs (an OptimizedModule only wraps
        # forward), so the module the step calls is the one compiled.
        forward = torch.compile(forward)
    return Trainer(ns, forward, att, opt, device, None), opt


def time_steps(configs, images, labels, device, repeats):
    """{name: (trainer, opt)} -> {name: [seconds per step]}, configurations alternating."""
    def step(trainer, opt):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = trainer.losses(trainer.to_device(images), labels)['loss']
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for trainer, opt in configs.values():
        step(trainer, opt)  # warm-up
    times = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (trainer, opt) in configs.items():
            times[name].append(step(trainer, opt))
    return times


def compile_report(args, device, images, labels):
    """Eager vs torch.compile on the same batch: warm-up cost, steady median, break-even."""
    from util.misc import cpu_has_native_bf16
    fast = device.type == 'cuda' or cpu_has_native_bf16()
    amp, cl = (True, True) if fast else (False, False)
    configs = {'eager': make_trainer(args, device, 'Base', amp, cl),
               'compiled': make_trainer(args, device, 'Base', amp, cl, compile_model=True)}
    t0 = time.perf_counter()
    time_steps({'compiled': configs['compiled']}, images, labels, device, 1)   # compiles on the first steps
    first = time.perf_counter() - t0
    times = time_steps(configs, images, labels, device, args.repeats)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"{args.model} width {args.width}, batch {args.batch}, {args.channels}x{args.size}x{args.size}, "
          f"{'bf16 + channels_last' if fast else 'fp32'}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for m, t in times.items():
        print(f"{m:<10} median {med[m]:7.3f} s   runs {', '.join(f'{x:.3f}' for x in t)}")
    gain = med['eager'] - med['compiled']
    print(f"compile + first 2 steps: {first:.1f} s; steady speed-up {med['eager'] / med['compiled']:.2f}x; "
          + (f"pays off after {(first - 2 * med['compiled']) / gain:.0f} steps" if gain > 0 else 'never pays off'))
    return med


def main(args):
    from util.misc import cpu_has_native_bf16
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(2 * args.batch, args.channels, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    if args.compile:
        return compile_report(args, device, images, labels)
    if args.variants:
        configs = {f'{mode} {name}': make_trainer(args, device, mode, amp, cl)
                   for mode in ('Base', 'ALPA-train') for name, (amp, cl) in VARIANTS.items()}
    else:
        configs = {mode: make_trainer(args, device, mode, args.amp, False) for mode in ('Base', 'ALPA-train')}
    times = time_steps(configs, images, labels, device, args.repeats)
    native = cpu_has_native_bf16() if device.type == 'cpu' else None
    print(f"{args.model} width {args.width}, batch {args.batch} ({2 * args.batch} views), {args.channels}x{args.size}x"
          f"{args.size}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", native CPU bf16: {native}" if native is not None else ''))
    med = {m: statistics.median(t) for m, t in times.items()}
    for m, t in times.items():
        print(f"{m:<32} median {med[m]:7.3f} s   runs {', '.join(f'{x:.3f}' for x in t)}")
    if args.variants:
        for mode in ('Base', 'ALPA-train'):
            ref = med[f'{mode} fp32']
            print(f"{mode}: " + ', '.join(f"{name} {ref / med[f'{mode} {name}']:.2f}x" for name in VARIANTS)
                  + ' (speed-up over fp32)')
        best = min(VARIANTS, key=lambda n: med[f'Base {n}'] + med[f'ALPA-train {n}'])
        print(f"fastest here: {best}")
        return best
    ratio = med['ALPA-train'] / med['Base']
    print(f"ALPA-train step / Base step: {ratio:.3f}x  (target <= 1.3x)")
    return ratio


if __name__ == '__main__':
    main(get_args_parser().parse_args())
