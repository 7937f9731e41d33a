"""Collect multi-scale features [N, 6, C] for the ID train/test sets and each OOD set.

    python CSD/feature_collect.py --in-dataset CIFAR-10 --name resnet18 \
        --model-arch resnet18-supcon --ckp path/to/last.pth --out-datasets SVHN dtd

One forward pass per split; the vectors (PAPER §2 order: q00 q01 q10 q11 global center,
not normalised), labels and, for models with a classifier, logits are cached under
``cache/<in-dataset>/<name>/<split>-<key>/``. The key hashes the checkpoint's bytes, the
architecture, the dataset and split, where its images are read from (``--data-root`` or the
folder), the transform and the scales, so a cache made from anything else is never reused;
it is written to a temporary folder and renamed, so an interrupted run never leaves a
half-written cache that a later run would read (a damaged one is recomputed).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python CSD/feature_collect.py`

import numpy as np
import torch

from util import data as data_lib
from util.checkpoint import file_sha256, load_weights, read_checkpoint
from util.errors import UserError, run_cli
from util.features import SCALES, collect_features
from util.misc import default_workers, pick_device, progress
from util.networks import ENCODERS, MODEL_ARCHS, build_model

FEATURE_VERSION = 1  # bump when the pooling changes, so old caches are not reused
DEFAULT_OOD = {
    'CIFAR-10': ['SVHN', 'places365', 'LSUN', 'iSUN', 'dtd'],
    'CIFAR-100': ['SVHN', 'places365', 'LSUN', 'iSUN', 'dtd'],
    'imagenet': ['iNaturalist', 'SUN', 'Places', 'dtd'],
    'fashion-mnist': ['fashion-mnist-heldout', 'digits', 'gaussian', 'uniform'],
}


def add_feature_args(parser):
    """Flags shared by feature_collect.py and CSD.py (the authors' names kept)."""
    parser.add_argument('--in-dataset', default='CIFAR-10',
                        help="ID dataset: CIFAR-10, CIFAR-100, imagenet, fashion-mnist (default CIFAR-10)")
    parser.add_argument('--out-datasets', nargs='+', default=None,
                        help='OOD sets by name (SVHN dtd places365 LSUN iSUN LSUN_fix ImageNet_fix Imagenet_resize '
                             'iNaturalist SUN Places digits gaussian uniform <in-dataset>-heldout) or image folders; '
                             'default: the paper\'s sets for the ID dataset')
    parser.add_argument('--name', default=None, help='run name for cache/ and results/ (default: checkpoint file stem)')
    parser.add_argument('--model-arch', default=None,
                        help=f"architecture, one of {', '.join(MODEL_ARCHS)} (default: read from the checkpoint)")
    parser.add_argument('--ckp', required=True, help='checkpoint path (ours, the authors\', SupContrast\'s or a state_dict)')
    parser.add_argument('--data-root', default='datasets', help='data root (default ./datasets)')
    parser.add_argument('--id-classes', type=int, nargs='+', default=None,
                        help='open-set protocol: ID classes kept (default: read from the checkpoint, else all)')
    parser.add_argument('--batch-size', type=int, default=256, help='images per forward pass (default 256)')
    parser.add_argument('--num-workers', type=int, default=default_workers(), help='data-loading workers (default min(4, cores))')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:N (default cuda when present, else cpu)')
    parser.add_argument('--cache-dir', default='cache', help='feature cache root (default ./cache)')
    parser.add_argument('--max-train', type=int, default=None,
                        help='use a seeded random subset of this many ID training images as the bank (default all)')
    parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR/Fashion-MNIST if missing')
    return parser


def get_args_parser():
    parser = argparse.ArgumentParser('MODE feature collection', add_help=True)
    add_feature_args(parser)
    parser.add_argument('--force', action='store_true', help='recompute even when a valid cache exists')
    return parser


# ---------------------------------------------------------------- model from a checkpoint
def infer_arch(ckpt, state):
    """Architecture name from our record, the authors' ``opt.model``, or the keys."""
    if ckpt['arch'] and ckpt['arch'].get('model_arch'):
        return ckpt['arch']['model_arch']
    kind = 'supcon' if any(k.startswith('head.') for k in state) else 'ce'
    opt = ckpt['opt']
    base = getattr(opt, 'model', None) if opt is not None else None
    if base in ENCODERS:
        return f'{base}-{kind}'
    return None


def load_model(ckp, model_arch=None, spec=None):
    """-> (model, info). Shapes (width, input channels, classes, head size) come from the
    checkpoint's tensors, so only the architecture family has to be named."""
    ckpt = read_checkpoint(ckp)
    state = ckpt['model']
    arch = model_arch or infer_arch(ckpt, state)
    if arch is None:
        raise UserError(f"{ckp} does not record its architecture: pass --model-arch ({', '.join(MODEL_ARCHS)})")
    if arch not in MODEL_ARCHS:
        raise UserError(f"unknown --model-arch {arch!r}; known: {', '.join(MODEL_ARCHS)}")
    conv1 = state.get('encoder.conv1.weight', state.get('conv1.weight'))
    kwargs = {}
    if conv1 is not None and conv1.dim() == 4:
        kwargs['in_channel'] = conv1.shape[1]
        if not arch.startswith('resnet50-imagenet'):
            kwargs['width'] = conv1.shape[0]
    if 'fc.weight' in state:
        kwargs['num_classes'] = state['fc.weight'].shape[0]
    if 'head.2.weight' in state:
        kwargs['feat_dim'] = state['head.2.weight'].shape[0]
    model = build_model(arch, **kwargs)
    load_weights(model, state, path=ckp)
    record = dict(ckpt['arch'] or {})
    record.update(model_arch=arch, **kwargs)
    return model, {'arch': arch, 'record': record, 'epoch': ckpt['epoch'], 'attention': ckpt['attention'],
                   'opt': ckpt['opt']}


# ---------------------------------------------------------------- cache
def cache_key(ckp_hash, arch, in_dataset, split, transform, id_classes, max_train, source=None):
    """``source``: where the split's images are read from (the absolute data root, or the
    image folder itself), so the same names under another ``--data-root`` do not hit."""
    payload = json.dumps({'ckp': ckp_hash, 'arch': arch, 'in': in_dataset, 'split': split,
                          'transform': repr(transform), 'scales': SCALES, 'v': FEATURE_VERSION,
                          'id_classes': id_classes, 'max_train': max_train if split == 'train' else None,
                          'source': source},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def split_dir(cache_root, in_dataset, name, split, key):
    safe = split.replace(os.sep, '_').strip('_') or 'root'
    return Path(cache_root) / in_dataset / name / f'{safe}-{key}'


def load_split(path):
    """Read a finished cache folder (memory-mapped), or return None when there is none or
    it is damaged (a file missing or cut short): the caller then recomputes it."""
    meta_file = path / 'meta.json'
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        out = {'meta': meta}
        for part in meta['arrays']:
            out[part] = np.load(path / f'{part}.npy', mmap_mode='r')
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring damaged feature cache {path} ({type(e).__name__}: {e}); recomputing")
        return None
    return out


def write_split(path, result, meta):
    """Write arrays + meta.json into a temporary sibling folder, then rename it into place."""
    tmp = path.with_name(path.name + f'.tmp{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = [p for p in ('features', 'labels', 'logits', 'indices') if p in result]
    for part in arrays:
        np.save(tmp / f'{part}.npy', result[part])
    meta = dict(meta, arrays=arrays, n=int(result['n']), skipped=int(result['skipped']))
    (tmp / 'meta.json').write_text(json.dumps(meta, indent=2, sort_keys=True))
    old = path.with_name(path.name + f'.old{os.getpid()}')
    shutil.rmtree(old, ignore_errors=True)  # left by a killed run that had this pid
    if path.exists():
        # Renamed aside, not deleted in place: a kill during a long rmtree would otherwise
        # leave a meta.json beside missing arrays under the real name.
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def run_name(args):
    return args.name or Path(args.ckp).stem


def get_splits(args, model, info, spec, device, force=False, log=print):
    """Features for 'train', 'test' and each OOD set; reuse valid caches, compute the rest.
    -> {split: {'features', 'labels', ['logits'], 'meta'}}."""
    id_classes = args.id_classes if args.id_classes is not None else info['record'].get('id_classes')
    transform = data_lib.test_transform(spec)
    ckp_hash = file_sha256(args.ckp)
    name = run_name(args)
    out_names = args.out_datasets if args.out_datasets is not None else default_ood(args.in_dataset, id_classes)
    # Every OOD name is checked before the first forward pass: a typo in the last name should
    # not cost the minutes of extracting the ID training features first.
    folders = {n for n in out_names if data_lib.resolve_ood_name(n) not in data_lib.OOD_DATASETS}
    data_root = os.path.abspath(args.data_root)
    splits = {}
    for split in ['train', 'test', *out_names]:
        source = os.path.abspath(split) if split in folders else data_root
        key = cache_key(ckp_hash, info['arch'], spec.name, split, transform, id_classes, args.max_train, source)
        path = split_dir(args.cache_dir, spec.name, name, _split_label(split), key)
        cached = None if force else load_split(path)
        if cached is not None:
            log(f"[cache] {split}: {cached['meta']['n']} images from {path}")
            splits[_split_label(split)] = cached
            continue
        keep = None
        if split in ('train', 'test'):
            dataset = data_lib.get_id_dataset(spec.name, args.data_root, split, transform, id_classes,
                                              download=args.download)
            if split == 'train' and args.max_train and args.max_train < len(dataset):
                rng = np.random.default_rng(0)
                keep = np.sort(rng.choice(len(dataset), args.max_train, replace=False))
                dataset = torch.utils.data.Subset(dataset, keep.tolist())
        else:
            dataset = data_lib.get_ood_dataset(split, args.data_root, spec, transform, id_classes)
            ignored = getattr(dataset, 'ignored_files', [])
            if ignored:
                shown = ', '.join(os.path.basename(f) for f in ignored[:5]) + (' ...' if len(ignored) > 5 else '')
                log(f"[warn] {split}: ignored {len(ignored)} non-image files ({shown})")
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
            pin_memory=device.type == 'cuda', collate_fn=data_lib.collate_skip_none,
            persistent_workers=False)
        result = collect_features(model, loader, device,
                                  progress=lambda it, s=split: progress(it, desc=f'features {s}'))
        if keep is not None:
            result['indices'] = keep  # rows of the bank -> images of the training set
        if result['skipped']:
            log(f"[warn] {split}: skipped {result['skipped']} of {len(dataset)} unreadable files")
        write_split(path, result, {'split': split, 'in_dataset': spec.name, 'arch': info['arch'],
                                   'ckp': str(args.ckp), 'ckp_sha256': ckp_hash, 'key': key,
                                   'id_classes': id_classes, 'transform': repr(transform)})
        log(f"[features] {split}: {result['n']} images -> {path}")
        splits[_split_label(split)] = load_split(path)
    return splits


def _split_label(split):
    """Display name of a split: an image-folder path is named by its basename."""
    return Path(split).name if os.sep in split or os.path.isdir(split) else split


def default_ood(in_dataset, id_classes):
    names = list(DEFAULT_OOD.get(in_dataset, []))
    if id_classes is None:
        names = [n for n in names if not n.endswith('-heldout')]
    return names


def prepare(args):
    """Resolve device, checkpoint, model and dataset spec from the shared flags."""
    device = pick_device(args.device)
    spec = data_lib.get_spec(args.in_dataset)
    args.in_dataset = spec.name
    model, info = load_model(args.ckp, args.model_arch, spec)
    id_classes = args.id_classes if args.id_classes is not None else info['record'].get('id_classes')
    if id_classes is not None:
        spec = data_lib.DatasetSpec(**{**spec.__dict__, 'num_classes': len(id_classes)})
    in_channel = info['record'].get('in_channel')
    if in_channel is not None and in_channel != spec.channels:
        raise UserError(f"{args.ckp} expects {in_channel}-channel input but --in-dataset {spec.name} "
                        f"has {spec.channels}; check --in-dataset")
    return device, spec, model.to(device), info


def main(args):
    device, spec, model, info = prepare(args)
    print(f"model {info['arch']} from {args.ckp} on {device}")
    splits = get_splits(args, model, info, spec, device, force=args.force)
    for name, s in splits.items():
        print(f"  {name:<24} {tuple(s['features'].shape)}")
    return splits


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
