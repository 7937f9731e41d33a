"""One --alpa_train training step against one Base (SupCon) step at equal batch.

    python bench/bench_train_step.py                         # CIFAR ResNet-18, B=128 (256 views), CPU
    python bench/bench_train_step.py --device cuda --amp --batch 256

Both steps go through ``ALPA.engine.Trainer`` exactly as training does (forward, losses,
backward, SGD step) on the same random batch; runs alternate Base, ALPA-train, Base, ...
and the medians are compared.
"""
import argparse
import statistics
import time

import torch


def get_args_parser():
    p = argparse.ArgumentParser('train-step benchmark')
    p.add_argument('--model', default='resnet18', help='CIFAR-style encoder (default resnet18)')
    p.add_argument('--width', type=int, default=64, help='ResNet width (default 64, the paper)')
    p.add_argument('--batch', type=int, default=128, help='images per step, 2 views each (default 128)')
    p.add_argument('--size', type=int, default=32, help='input size (default 32)')
    p.add_argument('--repeats', type=int, default=3, help='timed steps per mode after one warm-up (default 3)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    p.add_argument('--amp', action='store_true', help='bf16 autocast on CUDA')
    return p


def main(args):
    from ALPA.attention import AttentionSimilarity
    from ALPA.engine import Trainer, TrainForward
    from util.networks import build_model
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(2 * args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    trainers = {}
    for mode in ('Base', 'ALPA-train'):
        net = build_model(f'{args.model}-supcon', width=args.width).to(device).train()
        att = AttentionSimilarity(net.encoder.out_dim, 80).to(device) if mode != 'Base' else None
        params = list(net.parameters()) + (list(att.parameters()) if att is not None else [])
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        ns = argparse.Namespace(loss='supcon', temp=0.1, temperature_s=10.0, lam=1.0, amp=args.amp,
                                amp_dtype='auto', alpa_train=mode != 'Base', alpa_finetune=False)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        trainers[mode] = (Trainer(ns, TrainForward(net), att, opt, device, scaler), opt, scaler)

    def step(mode):
        trainer, opt, scaler = trainers[mode]
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = trainer.losses(images, labels)['loss']
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for mode in trainers:
        step(mode)  # warm-up
    times = {m: [] for m in trainers}
    for _ in range(args.repeats):
        for mode in trainers:
            times[mode].append(step(mode))
    print(f"{args.model} width {args.width}, batch {args.batch} ({2 * args.batch} views), {args.size}x{args.size}, "
          f"device {device}, amp {args.amp}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    med = {m: statistics.median(t) for m, t in times.items()}
    for m, t in times.items():
        print(f"{m:<11} median {med[m]:7.3f} s   runs {', '.join(f'{x:.3f}' for x in t)}")
    ratio = med['ALPA-train'] / med['Base']
    print(f"ALPA-train step / Base step: {ratio:.3f}x  (target <= 1.3x)")
    return ratio


if __name__ == '__main__':
    main(get_args_parser().parse_args())
