"""Collect multi-scale features [N, 6, C] for the ID train/test sets and each OOD set.

    python CSD/feature_collect.py --in-dataset CIFAR-10 --name resnet18 \
        --model-arch resnet18-supcon --ckp path/to/last.pth --out-datasets SVHN dtd

One forward pass per split; the vectors (docs/METHOD.md §2 order: q00 q01 q10 q11 global center,
not normalised), labels and, for models with a classifier, logits go to a feature store
``cache/<in-dataset>/<name>/<split>-<key>/`` (``util/store.py``): streamed to disk batch
by batch (memory does not grow with the dataset), fp16 by default (``--dtype fp32``),
resumable after a kill, and renamed into place only when complete. The key hashes the
checkpoint's bytes, the architecture, the dataset and split, where its images are read from
(``--data-root`` or the folder), the transform, the scales, the dtype and the extraction
code, so a store made from anything else is never reused.

    torchrun --nproc_per_node=4 CSD/feature_collect.py ...    # one GPU (or CPU process) each

splits every set into contiguous runs of batches, one per process: each image is extracted
once, and the store is byte-identical to one process's.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from util import data as data_lib
from util import distributed as dist_lib
from util import ood as ood_lib
from util.checkpoint import file_sha256, load_model, resolve_id_classes
from util.cli import Parser
from util.errors import UserError, run_cli
from util.features import SCALES, exact_fp32
from util.fingerprint import FEATURE_CODE, code_hash
from util.misc import WORKERS_HELP, default_workers, progress, seeded_indices
from util.networks import MODEL_ARCHS
from util.store import STORE_DTYPES, load_store, write_store

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
                        help="ID dataset: CIFAR-10, CIFAR-100, imagenet, fashion-mnist, or path (class folders, for a "
                             "model trained with --dataset path; see --in-train / --in-test) (default CIFAR-10)")
    parser.add_argument('--in-train', default=None,
                        help='with --in-dataset path: the ID training folder <class>/<image> (default: the '
                             '--data-root the checkpoint was trained on)')
    parser.add_argument('--in-test', default=None, help='with --in-dataset path: the ID test folder <class>/<image>')
    parser.add_argument('--out-datasets', nargs='+', default=None,
                        help='OOD sets by name (SVHN dtd places365 LSUN iSUN LSUN_fix ImageNet_fix Imagenet_resize '
                             'iNaturalist SUN Places digits gaussian uniform <in-dataset>-heldout) or image folders; '
                             'default: the paper\'s sets for the ID dataset')
    parser.add_argument('--name', default=None, help='run name for cache/ and results/ (default: checkpoint file stem)')
    parser.add_argument('--model-arch', default=None,
                        help=f"architecture, one of {', '.join(MODEL_ARCHS)} (default: read from the checkpoint)")
    parser.add_argument('--ckp', required=True, help='checkpoint path (ours, the authors\', SupContrast\'s or a state_dict)')
    parser.add_argument('--data-root', '--data_folder', default='datasets',
                   help="data root, the authors' --data_folder (default ./datasets)")
    parser.add_argument('--id-classes', type=int, nargs='+', default=None,
                        help='open-set protocol: ID classes kept (default: read from the checkpoint, else all)')
    parser.add_argument('--batch-size', type=int, default=256, help='images per forward pass (default 256)')
    parser.add_argument('--num-workers', type=int, default=default_workers(), help=WORKERS_HELP)
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:N (default cuda when present, else cpu)')
    parser.add_argument('--cache-dir', default='cache', help='feature cache root (default ./cache)')
    parser.add_argument('--max-train', type=int, default=None,
                        help='use a seeded random subset of this many ID training images as the bank (default all)')
    parser.add_argument('--bank-fraction', type=float, default=None,
                        help='use a seeded uniform random fraction of the ID training images as the bank, as Sun et '
                             'al. (0.01 is their ImageNet setting; default all)')
    parser.add_argument('--max-ood', type=int, default=None,
                        help='score a seeded random subset of at most this many images of each OOD set (for quick '
                             'runs; the tables say how many were used; default all)')
    parser.add_argument('--test-norm', default=None,
                        help="test-time Normalize: paper (the authors' test pipeline: CIFAR-10's constants for "
                             "CIFAR-10 and CIFAR-100), train (the ID set's own training statistics), or MEAN,STD "
                             "numbers (default: what the checkpoint records, else paper)")
    parser.add_argument('--dtype', default='fp16', choices=sorted(STORE_DTYPES),
                        help='how the feature store keeps the vectors on disk: fp16 (half the disk and I/O; scores '
                             'are computed in fp32 from it, see BENCHMARKS.md for its effect) or fp32 (bit-for-bit '
                             'the fp32 forward pass, as the authors\' in-memory features) (default fp16)')
    parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR/Fashion-MNIST if missing')
    return parser


def get_args_parser():
    parser = Parser('MODE feature collection', add_help=True)
    add_feature_args(parser)
    parser.add_argument('--force', action='store_true', help='recompute even when a valid cache exists')
    return parser


# ---------------------------------------------------------------- normalisation
def resolve_test_norm(choice, spec, record):
    """-> (mean, std, label) of the test-time Normalize.

    Default (``choice`` None): the statistics the checkpoint records it was trained with
    (ours do), else the authors' test pipeline (``paper``: CIFAR-10's constants for CIFAR-10
    and CIFAR-100, docs/METHOD.md §5b). ``train``: the ID set's own training statistics.
    ``MEAN,STD``: 2·channels numbers, the means first (``'(0.5,0.5,0.5),(0.25,0.25,0.25)'``)."""
    if choice is None:
        if record.get('mean') and record.get('std'):
            return tuple(record['mean']), tuple(record['std']), 'checkpoint'
        choice = 'paper'
    if choice == 'paper':
        return (*data_lib.paper_test_norm(spec), 'paper')
    if choice == 'train':
        return spec.mean, spec.std, 'train'
    values = data_lib.parse_floats(choice, '--test-norm')
    if len(values) != 2 * spec.channels:
        raise UserError(f"--test-norm {choice!r}: give paper, train, or {2 * spec.channels} numbers "
                        f"({spec.channels} means, then {spec.channels} stds) for {spec.name}")
    return values[:spec.channels], values[spec.channels:], 'given'


def describe_norm(norm):
    mean, std, label = norm
    fmt = lambda v: '(' + ','.join(f'{x:g}' for x in v) + ')'
    return f"test norm {label} {fmt(mean)}/{fmt(std)}"


# ---------------------------------------------------------------- cache
def cache_key(ckp_hash, arch, in_dataset, split, transform, id_classes, max_train, source=None, device='cpu',
              bank_fraction=None, dtype='fp16', max_ood=None):
    """``source``: where the split's images are read from (the absolute data root, or the
    image folder itself), so the same names under another ``--data-root`` do not hit.
    ``device``: its type ('cpu', 'cuda'): features made on a GPU (other kernels, other last
    bits) and on a CPU are never mixed in one run, not even in fp32. The key also hashes the
    extraction code (``util/``, this file), so features made by older code are recomputed."""
    payload = json.dumps({'ckp': ckp_hash, 'arch': arch, 'in': in_dataset, 'split': split, 'device': device,
                          'transform': repr(transform), 'scales': SCALES, 'v': FEATURE_VERSION,
                          'id_classes': id_classes, 'max_train': max_train if split == 'train' else None,
                          'bank_fraction': bank_fraction if split == 'train' else None,
                          'max_ood': max_ood if split not in ('train', 'test') else None,
                          'source': source, 'code': code_hash(FEATURE_CODE), 'dtype': dtype},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def store_name(split, key):
    """A split's store folder name under ``cache/<in-dataset>/<name>/``: ``<split>-<key>``."""
    return f"{split.replace(os.sep, '_').strip('_') or 'root'}-{key}"


def split_dir(cache_root, in_dataset, name, split, key):
    return Path(cache_root) / in_dataset / name / store_name(split, key)


def get_splits(args, run, force=False, log=print):
    """Features for 'train', 'test' and each OOD set of ``run`` (``prepare``); reuse finished
    stores, extract the rest (``util.store``: streamed to disk, resumable; under torchrun every
    process extracts its share). -> {split: {'features', 'labels', ['logits'], 'meta'}}, memory-mapped."""
    if not dist_lib.is_main():
        log = lambda *a, **k: None
    transform = run.transform
    ckp_hash = file_sha256(args.ckp)
    data_root = os.path.abspath(args.data_root)
    encoder = None if force else probed_encoder(args, run, log)
    splits = {}
    for split in ['train', 'test', *run.ood]:
        source = os.path.abspath(split) if split in run.ood_folders else data_root
        if run.spec.name == 'path' and split in ('train', 'test'):
            source = os.path.abspath(args.in_train if split == 'train' else args.in_test)
        key_of = lambda sha, arch: cache_key(sha, arch, run.spec.name, split, transform, run.id_classes, args.max_train,
                                             source, run.device.type, args.bank_fraction, args.dtype, args.max_ood)
        key = key_of(ckp_hash, run.info['arch'])
        path = split_dir(args.cache_dir, run.spec.name, run.name, split_label(split), key)
        cached = None if force else load_store(path)
        if cached is not None:
            log(f"[cache] {split}: {cached['meta']['n']} images from {path}")
            splits[split_label(split)] = cached
            continue
        if encoder is not None:
            reused = probe_split(args, run, encoder[0], split_label(split), key_of(*encoder[1:]))
            if reused is not None:
                log(f"[cache] {split}: {reused['meta']['n']} images from the encoder's store {reused['meta']['store']}; "
                    f"this probe's logits computed from them")
                splits[split_label(split)] = reused
                continue
        dataset, keep = split_dataset(args, run, split, log)
        meta = {'split': split, 'in_dataset': run.spec.name, 'arch': run.info['arch'], 'ckp': str(args.ckp),
                'ckp_sha256': ckp_hash, 'key': key, 'id_classes': run.id_classes, 'transform': repr(transform),
                'device': run.device.type}
        bar = (lambda it, s=split: progress(it, desc=f'features {s}')) if dist_lib.is_main() else None
        store = write_store(path, run.model, dataset, run.device, batch_size=args.batch_size,
                            num_workers=args.num_workers, dtype=args.dtype, key=key, indices=keep, meta=meta, log=log,
                            progress=bar, source=f"checkpoint {args.ckp}")
        if store['meta']['skipped']:
            log(f"[warn] {split}: skipped {store['meta']['skipped']} of {len(dataset)} unreadable files")
        log(f"[features] {split}: {store['meta']['n']} images -> {path}")
        splits[split_label(split)] = store
    return splits


def probed_encoder(args, run, log=print):
    """A linear probe (``ALPA/main_linear.py``) sees its encoder's features: the same frozen
    weights give the same feature map, so where the encoder's own fp32 stores are in the cache
    (``CSD.py`` on the encoder, same data and flags) only the logits are new. -> ``(encoder
    checkpoint, its sha256, its arch)``, or None (not a probe, fp16 stores, the encoder file
    gone, or its weights not the probe's: then the probe extracts as any model)."""
    of = (run.info['record'] or {}).get('probe_of')
    if not of or args.dtype != 'fp32' or getattr(run.model, 'fc', None) is None:
        return None
    if not os.path.isfile(of):
        log(f"[cache] the encoder this probe was trained on, {of}, is not here: extracting its features again")
        return None
    encoder, info = load_model(of, None, run.spec.name, log=lambda *a, **k: None)
    mine, theirs = run.model.encoder.state_dict(), encoder.encoder.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k].cpu(), theirs[k]) for k in mine):
        log(f"[cache] this probe's encoder is not the one in {of}: extracting its features again")
        return None
    return of, file_sha256(of), info['arch']


def probe_split(args, run, encoder, label, key):
    """The encoder's finished fp32 store of one split (any run name under --cache-dir) with
    this probe's logits: its ``fc`` on the stored global vector, in the extraction's batches.
    The same numbers as the probe's own extraction, to the last bit: the stored global vector is
    ``fmap.mean((2, 3))``, which is what ``adaptive_avg_pool2d(fmap, 1)`` computes (torch
    reduces a 1×1 adaptive pool to that mean; tests/test_baselines.py holds both to it), and the
    linear layer sees the same rows in the same batch shapes. -> a split, or None."""
    found = sorted((Path(args.cache_dir) / run.spec.name).glob(f'*/{store_name(label, key)}'))
    store = load_store(found[0]) if found else None
    if store is None or store['meta'].get('dtype') != 'fp32' or store['meta'].get('skipped'):
        return None   # rows of a store with unreadable images no longer fall into the extraction's batches
    glob = store['features'][:, SCALES.index('global')]
    bs, fc = args.batch_size, run.model.fc
    with exact_fp32(run.device), torch.no_grad():
        logits = [fc(torch.from_numpy(np.ascontiguousarray(glob[i:i + bs])).to(run.device)).float().cpu().numpy()
                  for i in range(0, len(glob), bs)]
    meta = {**store['meta'], 'store': str(found[0]), 'logits_of': str(args.ckp), 'features_of': encoder}
    return {**store, 'logits': np.concatenate(logits), 'meta': meta}


def split_dataset(args, run, split, log=print):
    """The dataset of one split ('train', 'test' or an OOD name/folder) under the test
    transform -> (dataset, indices or None). ``--max-train`` / ``--bank-fraction`` keep a seeded
    subset of the training images (``indices``: rows of the bank -> images of the training set),
    ``--max-ood`` one of each OOD set (ODIN's forward passes go through here too, so they see
    the same images in the same order)."""
    keep, spec, transform = None, run.spec, run.transform
    if split in ('train', 'test') and spec.name == 'path':
        folder = args.in_train if split == 'train' else args.in_test
        dataset = data_lib.image_folder(folder, transform, spec.mode, f'path-{split}',
                                        f'--in-{split} must be a folder of class subfolders')
    elif split in ('train', 'test'):
        dataset = data_lib.get_id_dataset(spec.name, args.data_root, split, transform, run.id_classes,
                                          download=args.download)
    else:
        dataset = ood_lib.get_ood_dataset(split, args.data_root, spec, transform, run.id_classes)
        ignored = getattr(dataset, 'ignored_files', [])
        if ignored:
            shown = ', '.join(os.path.basename(f) for f in ignored[:5]) + (' ...' if len(ignored) > 5 else '')
            log(f"[warn] {split}: ignored {len(ignored)} non-image files ({shown})")
    if split == 'train':
        size = min(args.max_train or len(dataset), max(1, round(args.bank_fraction * len(dataset)))
                   if args.bank_fraction else len(dataset))
        if size < len(dataset):
            dataset, keep = seeded_subset(dataset, size)
    if split not in ('train', 'test') and args.max_ood is not None and args.max_ood < len(dataset):
        dataset, keep = seeded_subset(dataset, args.max_ood)
    return dataset, keep


def seeded_subset(dataset, size):
    """The same ``size`` images of ``dataset`` on every run (seed 0), in dataset order ->
    (Subset, their indices)."""
    keep = seeded_indices(len(dataset), size)
    return torch.utils.data.Subset(dataset, keep.tolist()), keep


def make_loader(args, dataset, device):
    """The test-time loader in dataset order (ODIN's own forward passes use it)."""
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                                       pin_memory=device.type == 'cuda', collate_fn=data_lib.collate_skip_none,
                                       persistent_workers=False)


def split_label(split):
    """Display name of a split: an image-folder path is named by its basename."""
    return Path(split).name if os.sep in split or os.path.isdir(split) else split


def default_ood(in_dataset, id_classes):
    names = list(DEFAULT_OOD.get(in_dataset, []))
    if id_classes is None:
        names = [n for n in names if not n.endswith('-heldout')]
    return names


def path_spec(args, info):
    """--in-dataset path: the ID spec (size, channels, mean, std, classes) as the checkpoint
    recorded it when trained with ``--dataset path``; the folders from --in-train / --in-test."""
    rec, opt = info['record'], info['opt']
    missing = [k for k in ('size', 'in_channel', 'mean', 'std', 'num_classes') if rec.get(k) is None]
    if missing:
        raise UserError(f"{args.ckp} does not record {', '.join(missing)}: --in-dataset path needs a checkpoint "
                        f"trained here with --dataset path")
    if args.in_train is None:
        # the training run's --data-root (stored as data_folder by older checkpoints)
        args.in_train = (getattr(opt, 'data_root', None) or getattr(opt, 'data_folder', None)) if opt is not None else None
    for flag, folder in (('--in-train', args.in_train), ('--in-test', args.in_test)):
        if not folder:
            raise UserError(f"--in-dataset path needs {flag} FOLDER (class subfolders of images)")
    return data_lib.DatasetSpec('path', int(rec['num_classes']), int(rec['size']), int(rec['in_channel']),
                                tuple(rec['mean']), tuple(rec['std']), 'cifar')


@dataclass(frozen=True)
class Run:
    """What the flags and the checkpoint resolve to, once (``prepare``); every test-time step
    reads it instead of re-deciding."""
    device: torch.device
    spec: data_lib.DatasetSpec   # the ID set, num_classes = the ID classes kept
    model: torch.nn.Module
    info: dict                   # load_model's: arch, record, opt, attention
    norm: tuple                  # (mean, std, where they came from) of the test-time Normalize
    id_classes: tuple            # the open-set protocol's ID classes; None = every class
    ood: tuple                   # the OOD sets scored, names or folders, in table order
    name: str                    # run name: cache/<in-dataset>/<name>/, results/<in-dataset>/<name>/

    @property
    def transform(self):
        return data_lib.test_transform(self.spec, self.norm[0], self.norm[1])

    @property
    def ood_folders(self):
        """The OOD entries that are folders, not catalogue names."""
        return {n for n in self.ood if ood_lib.resolve_ood_name(n) not in ood_lib.OOD_DATASETS}


def prepare(args, extra_ood=()):
    """Resolve device, checkpoint, model, dataset spec, normalisation, ID classes and OOD sets
    from the shared flags -> ``Run``. ``extra_ood``: sets scored but not reported (``--k auto``'s
    validation set). Every OOD name and subset flag is checked here, before the first forward
    pass. Under torchrun (``WORLD_SIZE`` > 1) the process group starts here and each process
    takes its own GPU (``util.distributed.init_from_env``)."""
    if args.bank_fraction is not None and not 0 < args.bank_fraction <= 1:
        raise UserError(f"--bank-fraction {args.bank_fraction}: give a fraction in (0, 1]")
    if args.max_ood is not None and args.max_ood < 1:
        raise UserError(f"--max-ood {args.max_ood}: give a positive number of images")
    device = dist_lib.init_from_env(args.device)
    if str(args.in_dataset).lower() == 'path':
        model, info = load_model(args.ckp, args.model_arch, None)
        spec = path_spec(args, info)
    else:
        spec = data_lib.get_spec(args.in_dataset)
        model, info = load_model(args.ckp, args.model_arch, spec.name)
    args.in_dataset = spec.name
    id_classes = resolve_id_classes(args.id_classes, info['record'])
    spec = spec.with_id_classes(id_classes)
    in_channel = info['record'].get('in_channel')
    if in_channel is not None and in_channel != spec.channels:
        raise UserError(f"{args.ckp} expects {in_channel}-channel input but --in-dataset {spec.name} "
                        f"has {spec.channels}; check --in-dataset")
    ood = list(args.out_datasets if args.out_datasets is not None else default_ood(spec.name, id_classes))
    if extra_ood and set(extra_ood) & set(ood):
        raise UserError(f"--k-val-ood {' '.join(extra_ood)} is also in --out-datasets: the validation set of "
                        f"--k auto must not be reported")
    ood += list(extra_ood)
    # A typo in the last OOD name should not cost the minutes of extracting the training set first.
    missing = [m for m in (ood_lib.missing_ood_folder(n, args.data_root) for n in ood) if m]
    if missing:
        raise UserError('; '.join(missing))
    return Run(device, spec, model.to(device), info, resolve_test_norm(args.test_norm, spec, info['record']),
               tuple(id_classes) if id_classes is not None else None, tuple(ood), args.name or Path(args.ckp).stem)


def main(args):
    """One process, or ``torchrun --nproc_per_node=N CSD/feature_collect.py ...``: every
    image is extracted once, by one of the processes, into the same stores."""
    run = prepare(args)
    say = print if dist_lib.is_main() else (lambda *a, **k: None)
    say(f"model {run.info['arch']} from {args.ckp} on {run.device} | {describe_norm(run.norm)}"
        + (f" | {dist_lib.world_size()} processes" if dist_lib.world_size() > 1 else ''))
    try:
        splits = get_splits(args, run, force=args.force)
    finally:
        dist_lib.shutdown()
    for name, s in splits.items():
        say(f"  {name:<24} {tuple(s['features'].shape)} {s['features'].dtype}")
    return splits


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
