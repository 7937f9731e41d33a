"""Linear probe (SupContrast's ``main_linear.py``): a linear classifier on the frozen encoder of
a SupCon or MODE checkpoint. It prints the ID top-1 accuracy (how the authors report ID
accuracy for contrastive backbones) and saves ``linear.pth``: encoder + ``fc``, a CE-style
checkpoint that ``CSD/feature_collect.py`` and ``CSD/CSD.py`` read directly, so the
logit-based scores (msp, energy, vim, react) work for SupCon models too.

    python ALPA/main_linear.py --ckp save/SupCon/cifar10_models/<run>/last.pth --dataset cifar10

SupContrast's recipe: SGD (momentum 0.9, no weight decay), batch 256, lr 0.1 decayed ×0.2 at
epochs 60, 75, 90 of 100, RandomResizedCrop(32, 0.2-1) + flip; the encoder stays in eval
mode (BatchNorm statistics frozen) and gets no gradient.

``linear.pth`` carries a fingerprint of the encoder's bytes, the flags that decide the probe
and the training code: a second run that would compute the same probe reuses the file and
prints its accuracy; any difference trains it again and replaces the file.
"""
import os

import torch
import torch.nn.functional as F

from util import data as data_lib
from util.checkpoint import file_sha256, load_model, read_checkpoint, resolve_id_classes, save_checkpoint
from util.cli import Parser
from util.errors import UserError, run_cli
from util.fingerprint import TRAINING_CODE, fingerprint
from util.lr_sched import adjust_learning_rate, parse_epochs
from util.misc import WORKERS_HELP, default_workers, pick_device, progress, set_seed
from util.networks import build_model

DATASETS = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'imagenet': 'imagenet', 'fashion-mnist': 'fashion-mnist'}


def get_args_parser():
    p = Parser('MODE linear probe', add_help=True)
    p.add_argument('--ckp', required=True, help='the SupCon / MODE checkpoint whose encoder is probed')
    p.add_argument('--dataset', default='cifar10', choices=list(DATASETS), help='ID set (default cifar10)')
    p.add_argument('--data-root', '--data_folder', default='datasets',
                   help="data root, the authors' --data_folder (default ./datasets)")
    p.add_argument('--id-classes', type=int, nargs='+', default=None,
                   help='open-set protocol: these classes only (default: what the checkpoint records, else all)')
    p.add_argument('--batch-size', type=int, default=256, help='images per step (default 256)')
    p.add_argument('--epochs', type=int, default=100, help='epochs (default 100)')
    p.add_argument('--learning-rate', type=float, default=0.1, help='learning rate (default 0.1)')
    p.add_argument('--lr-decay-epochs', default='60,75,90', help='step-decay epochs (default 60,75,90)')
    p.add_argument('--lr-decay-rate', type=float, default=0.2, help='step decay factor (default 0.2)')
    p.add_argument('--cosine', action='store_true', help='cosine schedule instead of steps')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum (default 0.9)')
    p.add_argument('--weight-decay', type=float, default=0.0, help='SGD weight decay (default 0)')
    p.add_argument('--max-steps', type=int, default=None, help='stop each epoch after this many steps (smoke tests)')
    p.add_argument('--num-workers', type=int, default=default_workers(), help=WORKERS_HELP)
    p.add_argument('--device', default=None, help='cpu, cuda, cuda:N (default cuda when present, else cpu)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--save-folder', default=None, help='where linear.pth goes (default: beside --ckp)')
    p.add_argument('--download', action='store_true', help='let torchvision download CIFAR/Fashion-MNIST if missing')
    return p


@torch.no_grad()
def accuracy(model, loader, device):
    model.eval()
    correct = seen = 0
    for batch in loader:
        if batch is None:
            continue
        x, y = batch[0].to(device), batch[1].to(device)
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


def probe_fingerprint(args):
    """What decides the probe: every flag but where it reads, writes and runs, the encoder's
    bytes and the training code (``ALPA/``, ``util/``)."""
    if not os.path.isfile(args.ckp):
        raise UserError(f"--ckp {args.ckp}: no such file; give the last.pth of a SupCon / MODE run")
    config = {k: v for k, v in sorted(vars(args).items())
              if k not in ('ckp', 'data_root', 'num_workers', 'device', 'save_folder', 'download')}
    return fingerprint({**config, 'ckp_sha256': file_sha256(args.ckp)}, TRAINING_CODE)


def reuse(path, fp):
    """``linear.pth`` at ``path`` when it carries the fingerprint ``fp`` -> ``main``'s result, else None."""
    if not os.path.isfile(path):
        return None
    try:
        saved = read_checkpoint(path)
    except UserError as e:   # cut short or not a checkpoint: trained again and replaced, like a stale one
        print(f"{path} is unreadable ({e}): training it again")
        return None
    if saved['fingerprint'] != fp or 'linear_accuracy' not in saved['raw']:
        print(f"{path} was made from another encoder, flags or code: training it again")
        return None
    acc = float(saved['raw']['linear_accuracy'])
    print(f"{path} is this probe already (same encoder, flags and code): reused")
    print(f"ID test accuracy (linear probe): {100 * acc:.2f}%")
    return {'accuracy': acc, 'path': path}


def main(args):
    fp = probe_fingerprint(args)
    path = os.path.join(args.save_folder or os.path.dirname(os.path.abspath(args.ckp)), 'linear.pth')
    done = reuse(path, fp)
    if done:
        return done
    device = pick_device(args.device)
    set_seed(args.seed)
    encoder_model, info = load_model(args.ckp, None, DATASETS[args.dataset])
    rec = info['record']
    base, kind = info['arch'].rsplit('-', 1)
    if kind != 'supcon':
        raise UserError(f"{args.ckp} is a {info['arch']} model: the linear probe is for SupCon / MODE encoders "
                        f"(a CE model already has its classifier)")
    spec = data_lib.get_spec(DATASETS[args.dataset])
    id_classes = resolve_id_classes(args.id_classes, rec)
    spec = spec.with_id_classes(id_classes)
    if rec.get('mean') and rec.get('std'):   # train and test the probe with the encoder's own normalisation
        spec = spec.replace(mean=tuple(rec['mean']), std=tuple(rec['std']))
    model = build_model(f'{base}-ce', num_classes=spec.num_classes, in_channel=rec.get('in_channel', spec.channels),
                        width=rec.get('width', 64))
    model.encoder.load_state_dict(encoder_model.encoder.state_dict())
    model.to(device).encoder.requires_grad_(False)

    def loader(split, transform, shuffle):
        ds = data_lib.get_id_dataset(spec.name, args.data_root, split, transform, id_classes, download=args.download)
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle, num_workers=args.num_workers,
                                           pin_memory=device.type == 'cuda', collate_fn=data_lib.collate_skip_none)

    train = loader('train', data_lib.train_transform(spec, two_crop=False, recipe='ce'), True)
    test = loader('test', data_lib.test_transform(spec), False)
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    args.lr_decay_epochs_list = parse_epochs(args.lr_decay_epochs)
    print(f"linear probe on {info['arch']} from {args.ckp} | {spec.name} {len(train.dataset)} images | {device}")
    for epoch in range(1, args.epochs + 1):
        adjust_learning_rate(args, optimizer, epoch)
        model.encoder.eval()   # frozen: BatchNorm keeps the encoder's statistics
        model.fc.train()
        for step, batch in enumerate(progress(train, desc=f'epoch {epoch}/{args.epochs}')):
            if args.max_steps is not None and step >= args.max_steps:
                break
            if batch is None:
                continue
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            with torch.no_grad():
                feats = torch.flatten(F.adaptive_avg_pool2d(model.encoder.forward_features(x), 1), 1)
            loss = F.cross_entropy(model.fc(feats), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    acc = accuracy(model, test, device)
    print(f"ID test accuracy (linear probe): {100 * acc:.2f}%")
    record = {**rec, 'model_arch': f'{base}-ce', 'num_classes': spec.num_classes, 'mean': list(spec.mean),
              'std': list(spec.std), 'id_classes': list(id_classes) if id_classes else None, 'probe_of': args.ckp}
    save_checkpoint({'model': {k: v.cpu() for k, v in model.state_dict().items()}, 'arch': record,
                     'epoch': args.epochs, 'linear_accuracy': acc, 'fingerprint': fp}, path)
    print(f"written: {path}")
    return {'accuracy': acc, 'path': path}


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
