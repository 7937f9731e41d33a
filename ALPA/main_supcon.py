"""Training: SupCon (Base), ALPA-train (MODE-T) and ALPA-finetune (MODE-F); ``main_ce.py``
runs the same with a cross-entropy backbone (the * rows).

    Base:           python ALPA/main_supcon.py --batch-size 512 --learning-rate 0.5 --temp 0.1 --cosine
    ALPA-train:     python ALPA/main_supcon.py --batch-size 128 --learning-rate 0.5 --temp 0.1 --cosine --alpa-train
    ALPA-finetune:  python ALPA/main_supcon.py --batch-size 128 --learning-rate 0.1 --temp 0.1 --cosine \
                        --alpa-finetune --ckp save/SupCon/cifar10_models/<base run>/last.pth

Multi-GPU: torchrun --nproc_per_node=N ALPA/main_supcon.py ... (--batch-size is the global batch).
Checkpoints (``last.pth`` every epoch, ``ckpt_epoch_N.pth`` every ``--save-freq``) hold the
model, the ALPA attention, optimizer, scaler, epoch, every rank's RNG states, args, an
architecture record and the run's fingerprint; ``--resume auto`` continues a run only when
the fingerprint matches (single-process CPU runs resume bit-exactly).
"""
import os

import torch
import torch.nn as nn

from ALPA.attention import AttentionSimilarity
from ALPA.engine import NonFiniteLoss, Trainer, TrainForward
from util import data as data_lib
from util import distributed as dist_lib
from util.checkpoint import (
    file_sha256,
    load_model,
    load_weights,
    plain_args,
    rank_rng_states,
    resume_source,
    resume_training,
    save_checkpoint,
)
from util.cli import Parser
from util.errors import UserError, run_cli
from util.features import collect_features
from util.fingerprint import TRAINING_CODE, fingerprint
from util.knn import knn_accuracy
from util.lr_sched import adjust_learning_rate, cosine_lr, parse_epochs
from util.misc import WORKERS_HELP, autocast_dtype, default_workers, seeded_indices, set_seed
from util.networks import ENCODERS, build_model

DATASET_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'imagenet': 'imagenet',
                 'fashion-mnist': 'fashion-mnist', 'path': 'path'}


def get_args_parser(loss='supcon'):
    """The authors' (SupContrast's) flag names and defaults, plus ours. ``loss``: 'supcon'
    (this script) or 'ce' (``main_ce.py``); it sets the defaults that differ."""
    p = Parser(f'MODE training ({loss})', add_help=True)
    p.set_defaults(loss=loss)
    p.add_argument('--print-freq', type=int, default=10, help='log every N steps (default 10)')
    p.add_argument('--save-freq', type=int, default=50, help='also keep ckpt_epoch_N.pth every N epochs (default 50)')
    p.add_argument('--batch-size', type=int, default=512 if loss == 'supcon' else 256,
                   help=f"images per step, each giving 2 views (default {512 if loss == 'supcon' else 256})")
    p.add_argument('--num-workers', type=int, default=default_workers(), help=WORKERS_HELP)
    p.add_argument('--epochs', type=int, default=500, help='training epochs (default 500)')
    p.add_argument('--learning-rate', type=float, default=0.5, help='base learning rate (default 0.5)')
    p.add_argument('--lr-decay-epochs', type=str, default='350,400,450',
                   help='step-decay epochs when not --cosine, comma-separated (default 350,400,450)')
    p.add_argument('--lr-decay-rate', type=float, default=0.1, help='step decay factor; cosine ends at lr·rate³ (default 0.1)')
    p.add_argument('--weight-decay', type=float, default=1e-4, help='SGD weight decay (default 1e-4)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum (default 0.9)')
    p.add_argument('--model', type=str, default='resnet18', choices=sorted(ENCODERS), help='encoder (default resnet18)')
    p.add_argument('--width', type=int, default=64, help='ResNet base width; 64 is the paper\'s, smaller for CPU runs (default 64)')
    p.add_argument('--dataset', type=str, default='cifar10', choices=list(DATASET_NAMES),
                   help='ID training set (default cifar10); path = class folders under --data-root')
    p.add_argument('--data-root', '--data_folder', type=str, default='datasets',
                   help="data root, the authors' --data_folder (default ./datasets)")
    p.add_argument('--mean', type=str, default=None,
                   help="with --dataset path: per-channel mean, '0.5,0.5,0.5' or the authors' '(0.5,0.5,0.5)'")
    p.add_argument('--std', type=str, default=None, help="with --dataset path: per-channel std, same syntax as --mean")
    p.add_argument('--size', type=int, default=32, help='with --dataset path: input size in pixels (default 32)')
    p.add_argument('--id-classes', type=int, nargs='+', default=None,
                   help='open-set protocol: train on these classes only (default all)')
    p.add_argument('--download', action='store_true', help='let torchvision download CIFAR/Fashion-MNIST when missing')
    p.add_argument('--cosine', action='store_true', help='cosine learning-rate schedule to lr·lr_decay_rate³')
    p.add_argument('--warm', action='store_true',
                   help='linear warm-up from 0.01 over 10 epochs (on by default when batch_size > 256)')
    p.add_argument('--trial', type=str, default='0', help='run id appended to the run folder (default 0)')
    if loss == 'supcon':
        p.add_argument('--temp', type=float, default=0.1, help='SupCon temperature τ (default 0.1)')
        p.add_argument('--head-dim', type=int, default=128,
                       help="SupCon projection-head output size (SupContrast's feat_dim; default 128)")
    # ALPA
    p.add_argument('--alpa-train', action='store_true', help='train with base loss + lam·ALPA (MODE-T)')
    p.add_argument('--alpa-finetune', action='store_true', help='fine-tune --ckp with ALPA alone (MODE-F)')
    p.add_argument('--ckp', type=str, default=None, help='checkpoint to fine-tune from (required with --alpa-finetune)')
    p.add_argument('--feat-dim', '--inner-size', dest='feat_dim', type=int, default=80,
                   help="ALPA query/key/value size d, the authors' --feat_dim (alias --inner-size; default 80)")
    p.add_argument('--keep-attention', action='store_true',
                   help='with --alpa-finetune: start from the ALPA weights stored in --ckp when it has them '
                        "(default: a fresh attention, as the authors' fine-tuning)")
    p.add_argument('--temperature-s', type=float, default=10.0,
                   help='ALPA inverse temperature τ_s: the cosine similarities are multiplied by it (not divided) '
                        'before the softmax; larger is sharper (default 10)')
    p.add_argument('--aggregation', type=str, default='mean', choices=['mean', 'max', 'sum', 'logsum'],
                   help='ALPA aggregation over positions (default mean)')
    p.add_argument('--lam', type=float, default=1.0, help='weight λ of the ALPA term with --alpa-train (default 1)')
    p.add_argument('--drop-prob', type=float, default=0.0, help='dropout on ALPA attention probabilities (default 0)')
    # ours
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--device', type=str, default=None, help='cpu, cuda (default cuda when present, else cpu)')
    p.add_argument('--resume', type=str, default=None, help="checkpoint to resume, or 'auto' for the run folder's last.pth")
    p.add_argument('--amp', action='store_true',
                   help='mixed precision: bf16 autocast on GPUs and CPUs with native bf16, fp16 + loss scaling on older '
                        'GPUs, fp32 on CPUs without bf16; losses and ALPA cosines stay fp32 (default off)')
    p.add_argument('--amp-dtype', default='auto', choices=['auto', 'bf16', 'fp16'],
                   help='with --amp: force the autocast dtype (fp16 comes with loss scaling; default auto)')
    p.add_argument('--channels-last', action='store_true',
                   help='model and inputs in channels_last memory format (faster convolutions, above all with '
                        'bf16 --amp; default off, as the authors)')
    p.add_argument('--sync-bn', '--syncBN', dest='sync_bn', action='store_true',
                   help="under DDP, SyncBatchNorm so statistics do not depend on the GPU count (the authors' --syncBN)")
    p.add_argument('--save-folder', type=str, default='save', help='runs are written under this folder (default ./save)')
    p.add_argument('--max-steps', type=int, default=None, help='stop each epoch after this many steps (smoke tests)')
    p.add_argument('--eval', default='knn', choices=['knn', 'classifier', 'none'],
                   help='ID test accuracy at the end: knn (a kNN vote on global features, and the classifier of a CE '
                        'model), classifier (CE models only), none (default knn)')
    p.add_argument('--eval-k', type=int, default=20, help='with --eval knn: neighbours of the vote (default 20)')
    p.add_argument('--eval-max-train', type=int, default=None,
                   help='kNN accuracy: use a seeded subset of this many training images as neighbours (default all)')
    return p


# ---------------------------------------------------------------- setup
def resolve_spec(args):
    name = DATASET_NAMES[args.dataset]
    if name == 'path':
        if not (args.mean and args.std):
            raise UserError('--dataset path needs --mean and --std, e.g. --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25')
        mean = data_lib.parse_floats(args.mean, '--mean')
        std = data_lib.parse_floats(args.std, '--std')
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise UserError(f"--mean {args.mean!r} and --std {args.std!r} need 1 or 3 numbers each, as many means as stds")
        classes = _path_classes(args.data_root)
        return data_lib.DatasetSpec('path', len(classes), args.size, len(mean), mean, std, 'cifar')
    return data_lib.get_spec(name).with_id_classes(args.id_classes)


def _path_classes(folder):
    if not os.path.isdir(folder):
        raise UserError(f"--data-root {folder} does not exist: with --dataset path give a folder of class subfolders")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise UserError(f"--data-root {folder} has no class subfolders (expected {folder}/<class>/<image>)")
    return classes


def build_train_dataset(args, spec, transform, split='train'):
    if spec.name == 'path':
        return data_lib.image_folder(args.data_root, transform, spec.mode, 'path',
                                     'with --dataset path give a folder of class subfolders')
    return data_lib.get_id_dataset(spec.name, args.data_root, split, transform, args.id_classes,
                                   download=args.download)


def run_folder_name(args, loss):
    method = 'SupCon' if loss == 'supcon' else 'SupCE'
    name = f"{method}_{args.dataset}_{args.model}_lr_{args.learning_rate}_decay_{args.weight_decay}_bsz_{args.batch_size}"
    if loss == 'supcon':
        name += f"_temp_{args.temp}"
    name += f"_trial_{args.trial}"
    if args.width != 64:
        name += f"_w{args.width}"
    if args.id_classes:
        name += "_ids" + "-".join(map(str, args.id_classes))
    if args.seed:
        name += f"_seed{args.seed}"
    if args.max_steps:
        name += f"_steps{args.max_steps}"
    if args.alpa_train:
        name += f"_alpatrain_lam_{args.lam}_ts_{args.temperature_s}_{args.aggregation}"
    if args.alpa_finetune:
        name += f"_alpaft_ts_{args.temperature_s}_{args.aggregation}"
    if args.cosine:
        name += '_cosine'
    if args.warm:
        name += '_warm'
    return name


def finalize_args(args):
    if args.alpa_train and args.alpa_finetune:
        raise UserError('choose one of --alpa-train and --alpa-finetune')
    if args.alpa_finetune and not args.ckp:
        raise UserError('--alpa-finetune needs --ckp PATH (the trained checkpoint to fine-tune)')
    if args.batch_size < 2:
        raise UserError('--batch-size must be at least 2')
    if args.eval == 'classifier' and args.loss == 'supcon':
        raise UserError('--eval classifier: a SupCon model has no classifier; use --eval knn, or '
                        'ALPA/main_linear.py for a linear probe')
    loss = args.loss
    if args.dataset == 'path' and args.id_classes:
        raise UserError('--id-classes is not supported with --dataset path: put only the classes you want '
                        'in --data-root')
    args.lr_decay_epochs_list = parse_epochs(args.lr_decay_epochs)
    if args.batch_size > 256:
        args.warm = True
    args.warm_epochs = 10
    args.warmup_from = 0.01
    if args.cosine:
        args.warmup_to = cosine_lr(args.learning_rate, args.lr_decay_rate, args.warm_epochs, args.epochs)
    else:
        args.warmup_to = args.learning_rate
    args.model_name = run_folder_name(args, loss)
    sub = 'SupCon' if loss == 'supcon' else 'SupCE'
    args.run_dir = os.path.join(args.save_folder, sub, f'{args.dataset}_models', args.model_name)
    return args



# ---------------------------------------------------------------- fingerprinted runs
# Not part of what a run computes: how it logs, loads data, where it writes, what it
# evaluates at the end, and how it was started.
_FINGERPRINT_IGNORES = ('resume', 'print_freq', 'num_workers', 'save_freq', 'save_folder', 'eval', 'eval_k',
                        'eval_max_train', 'run_dir', 'fingerprint', 'device')


def run_fingerprint(args):
    """The resolved config (with the sha256 of ``--ckp``'s bytes when fine-tuning) plus a
    hash of the training code (``ALPA/``, ``util/``): everything that decides what the
    epochs already in the run folder computed."""
    config = {k: v for k, v in vars(plain_args(args)).items() if k not in _FINGERPRINT_IGNORES}
    if not args.cosine:
        # Step decay does not depend on the total: a run extended from N to M epochs with
        # --resume auto computes its first N epochs exactly as before, so it may continue.
        # The cosine schedule (and its warm-up target) does depend on it.
        config.pop('epochs')
    if args.ckp:
        config['ckp_sha256'] = file_sha256(args.ckp) if os.path.isfile(args.ckp) else None
    return fingerprint(config, TRAINING_CODE)


def arch_record(args, spec):
    return {'model_arch': f"{args.model}-{args.loss}", 'width': args.width, 'in_channel': spec.channels,
            'num_classes': spec.num_classes, 'head_dim': args.head_dim if args.loss == 'supcon' else None,
            'inner_size': args.feat_dim, 'size': spec.size,
            'dataset': spec.name, 'mean': list(spec.mean), 'std': list(spec.std),
            'id_classes': list(args.id_classes) if args.id_classes else None}


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def id_accuracy(args, model, spec, device):
    """ID test accuracy: the classifier of a CE model, and with ``--eval knn`` a cosine kNN vote
    on global features (``--eval-k`` neighbours from the training set, weighted by similarity)."""
    transform = data_lib.test_transform(spec)
    make = lambda split: torch.utils.data.DataLoader(
        build_train_dataset(args, spec, transform, split), batch_size=256, shuffle=False,
        num_workers=args.num_workers, collate_fn=data_lib.collate_skip_none)
    test = collect_features(model, make('test'), device, with_logits=hasattr(model, 'fc'))
    out = {}
    if 'logits' in test:
        out['classifier'] = float((test['logits'].argmax(1) == test['labels']).mean())
    if args.eval == 'knn':
        train_set = make('train').dataset
        if args.eval_max_train and args.eval_max_train < len(train_set):
            train_set = torch.utils.data.Subset(train_set, seeded_indices(len(train_set), args.eval_max_train).tolist())
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=256, shuffle=False,
                                                   num_workers=args.num_workers, collate_fn=data_lib.collate_skip_none)
        train = collect_features(model, train_loader, device, with_logits=False)
        out[f'knn{args.eval_k}'] = knn_accuracy(train['features'][:, 4], train['labels'], test['features'][:, 4],
                                                test['labels'], args.eval_k, spec.num_classes, device=str(device))
    return out


def evaluate(args, net, spec, device, writer):
    acc = id_accuracy(args, net, spec, device)
    print('ID test accuracy: ' + ', '.join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))
    for k, v in acc.items():
        writer.add_scalar(f'eval/acc_{k}', v, args.epochs)
    return acc


# ---------------------------------------------------------------- building blocks
def make_loader(args, spec, device):
    """-> (dataset, sampler or None, loader). One process keeps the last partial batch, as the
    authors' and SupContrast's loaders do. Under DDP every rank must send the same number of
    rows to the all-gather, so the sampler and the loader drop the ragged end instead (said
    once in the log)."""
    two_views = args.loss == 'supcon' or args.alpa_train or args.alpa_finetune
    dataset = build_train_dataset(args, spec, data_lib.train_transform(spec, two_crop=two_views, recipe=args.loss))
    world = dist_lib.world_size()
    if args.batch_size % world:
        raise UserError(f'--batch-size {args.batch_size} must be divisible by the {world} processes')
    if len(dataset) < args.batch_size:
        raise UserError(f'--batch-size {args.batch_size} is larger than the training set ({len(dataset)} images)')
    sampler = (torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
               if world > 1 else None)
    if world > 1 and dist_lib.is_main() and len(dataset) % args.batch_size:
        print(f"note: DDP drops the last {len(dataset) % args.batch_size} images of each epoch (equal shards "
              f"for the all-gather); one process keeps them")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size // world, shuffle=sampler is None, sampler=sampler, drop_last=world > 1,
        collate_fn=data_lib.collate_skip_none,
        num_workers=args.num_workers, pin_memory=device.type == 'cuda', persistent_workers=False)
    return dataset, sampler, loader


def build_networks(args, spec, device):
    """-> (net, attention or None) on ``device``: a fresh encoder, or ``--ckp``'s with
    ``--alpa-finetune`` (read the one way a checkpoint becomes a model,
    ``util.checkpoint.load_model``, as at test time)."""
    loss = args.loss
    net = build_model(f'{args.model}-{loss}', num_classes=spec.num_classes, in_channel=spec.channels,
                      feat_dim=args.head_dim if loss == 'supcon' else 128, width=args.width)
    attention = None
    if args.alpa_train or args.alpa_finetune:
        attention = AttentionSimilarity(net.encoder.out_dim, args.feat_dim, args.aggregation,
                                        drop_prob=args.drop_prob)
    if args.alpa_finetune:
        net, info = load_model(args.ckp, f'{args.model}-{loss}', spec.name)
        width = info['record'].get('width')
        if width is not None and width != args.width:
            raise UserError(f"--ckp {args.ckp} holds a width-{width} {args.model}: pass --width {width}")
        if loss == 'ce' and info['record'].get('num_classes') != spec.num_classes:
            raise UserError(f"--ckp {args.ckp} classifies {info['record'].get('num_classes')} classes, "
                            f"{spec.name} here has {spec.num_classes}: check --dataset / --id-classes")
        if args.keep_attention and info['attention']:
            load_weights(attention, info['attention'], path=args.ckp + ' (attention)')
    if args.sync_bn and dist_lib.world_size() > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)   # statistics over the global batch
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True                # fixed input sizes: let cuDNN pick kernels
    net.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if attention is not None:
        attention.to(device)
    return net, attention


def make_sgd(params, args, device):
    """SupContrast's SGD. On a GPU the fused kernel: one launch for all parameters, and under
    fp16 the GradScaler hands it the scale and the inf check as device tensors instead of
    reading them out (a sync) every step. The CPU keeps the loop form the released
    checkpoints were trained with."""
    return torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=True if device.type == 'cuda' else None)


def wrap_ddp(net, attention, args, device):
    """-> (the training forward, the attention module the loss calls), DDP-wrapped under torchrun."""
    forward, att = TrainForward(net), attention
    if dist_lib.world_size() > 1:
        ids = [device.index] if device.type == 'cuda' else None
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=ids, find_unused_parameters=args.alpa_finetune)
        if attention is not None:
            att = nn.parallel.DistributedDataParallel(attention, device_ids=ids)
    return forward, att


def open_log(args, spec, n_images, device):
    """The TensorBoard writer of the main process (None elsewhere), after one line saying what runs."""
    if not dist_lib.is_main():
        return None
    os.makedirs(args.run_dir, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter
    mode = 'ALPA-finetune' if args.alpa_finetune else ('ALPA-train' if args.alpa_train else 'Base')
    print(f"{mode} {args.loss} | {spec.name} {n_images} images | {args.model} w{args.width} | "
          f"{device} x{dist_lib.world_size()} | run folder {args.run_dir}")
    return SummaryWriter(os.path.join(args.run_dir, 'tb'))


def checkpoint_state(args, spec, net, attention, optimizer, scaler, epoch, global_step, rng):
    state = {'model': net.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
             'epoch': epoch, 'global_step': global_step, 'opt': plain_args(args), 'arch': arch_record(args, spec),
             'fingerprint': args.fingerprint, 'rng': rng}
    if attention is not None:  # absent, not None: the authors' loader reads any 'attention' it finds
        state['attention'] = attention.state_dict()
    return state


def log_epoch(writer, epoch, stats):
    print(f"epoch {epoch}: " + ', '.join(f"{k} {v:.4f}" for k, v in stats.items()))
    for k, v in stats.items():
        writer.add_scalar(f'epoch/{k}', v, epoch)


# ---------------------------------------------------------------- the run
def main(args):
    args = finalize_args(args)
    device = dist_lib.init_from_env(args.device)
    try:
        return train(args, device)
    finally:
        dist_lib.shutdown()


def train(args, device):
    set_seed(args.seed + dist_lib.rank())
    spec = resolve_spec(args)
    dataset, sampler, loader = make_loader(args, spec, device)
    net, attention = build_networks(args, spec, device)
    optimizer = make_sgd([*net.parameters(), *(attention.parameters() if attention else [])], args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, args.amp, args.amp_dtype) == torch.float16)
    args.fingerprint = run_fingerprint(args)
    last_path = os.path.join(args.run_dir, 'last.pth')
    start_epoch, global_step = resume_training(resume_source(args.resume, args.run_dir, args.fingerprint),
                                               net, attention, optimizer, scaler, device)
    writer = open_log(args, spec, len(dataset), device)
    trainer = Trainer(args, *wrap_ddp(net, attention, args, device), optimizer, device, scaler, writer)
    stats = {}
    for epoch in range(start_epoch, args.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        adjust_learning_rate(args, optimizer, epoch)
        try:
            stats, global_step = trainer.train_one_epoch(loader, epoch, global_step)
        except NonFiniteLoss as e:
            kept = last_path if os.path.exists(last_path) else 'none written yet'
            raise UserError(f"{e}; stopped, last good checkpoint: {kept}. Lower --learning-rate or drop --amp") from None
        rng = rank_rng_states(device)   # a collective: every rank takes part
        if dist_lib.is_main():
            log_epoch(writer, epoch, stats)
            state = checkpoint_state(args, spec, net, attention, optimizer, scaler, epoch, global_step, rng)
            save_checkpoint(state, last_path)
            if args.save_freq and epoch % args.save_freq == 0:
                save_checkpoint(state, os.path.join(args.run_dir, f'ckpt_epoch_{epoch}.pth'))
    result = {'run_dir': args.run_dir, 'last': last_path, 'stats': stats}
    if writer is not None:
        if args.eval != 'none' and start_epoch <= args.epochs and spec.name != 'path':
            result['accuracy'] = evaluate(args, net, spec, device, writer)
        writer.close()
    return result


if __name__ == '__main__':
    run_cli(main, get_args_parser('supcon').parse_args())
