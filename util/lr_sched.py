"""Learning-rate schedules of SupContrast (and the authors): cosine or step decay per epoch,
linear warm-up per step. ``args`` carries the resolved schedule (``finalize_args``)."""
import math


def adjust_learning_rate(args, optimizer, epoch):
    lr = args.learning_rate
    if args.cosine:
        eta_min = lr * args.lr_decay_rate ** 3
        lr = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / args.epochs)) / 2
    else:
        steps = sum(epoch > e for e in args.lr_decay_epochs_list)
        lr = lr * args.lr_decay_rate ** steps
    for g in optimizer.param_groups:
        g['lr'] = lr


def warmup_learning_rate(args, epoch, batch_id, total_batches, optimizer):
    if args.warm and epoch <= args.warm_epochs:
        p = (batch_id + (epoch - 1) * total_batches) / (args.warm_epochs * total_batches)
        lr = args.warmup_from + p * (args.warmup_to - args.warmup_from)
        for g in optimizer.param_groups:
            g['lr'] = lr
