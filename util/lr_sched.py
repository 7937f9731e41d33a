"""Learning-rate schedules of SupContrast (and the authors): cosine or step decay per epoch,
linear warm-up per step. ``args`` carries the resolved schedule (``finalize_args``)."""
import math


def parse_epochs(text):
    """'350,400,450' -> [350, 400, 450] (``--lr-decay-epochs``)."""
    return [int(x) for x in str(text).split(',') if x.strip()]


def cosine_lr(lr, decay_rate, epoch, epochs):
    """SupContrast's cosine: from ``lr`` at epoch 0 to lr·decay_rate³ at ``epochs``."""
    eta_min = lr * decay_rate ** 3
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def adjust_learning_rate(args, optimizer, epoch):
    lr = args.learning_rate
    if args.cosine:
        lr = cosine_lr(lr, args.lr_decay_rate, epoch, args.epochs)
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
