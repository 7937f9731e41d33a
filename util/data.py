"""Datasets and transforms shared by training (``ALPA/``) and test time (``CSD/``).

In-distribution (ID) sets -- ``get_id_dataset`` -- yield ``(image, label)``; the OOD
catalogue (``get_ood_dataset``, yielding ``(image, -1)``) is ``util/ood.py``. With ``transform=None`` the image is
a PIL image, otherwise whatever the transform returns (a tensor for ``test_transform``,
a list of two tensors for ``train_transform``). Every dataset has a ``.name``.

An image file that cannot be decoded makes ``__getitem__`` return ``None`` (with a warning
naming the file); load with ``collate_fn=collate_skip_none`` so such items are dropped.

The on-disk layout (``datasets/README.md``, docs/METHOD.md §7) is the one the authors' users
already have, with every path relative to ``root`` (``--data-root``, default ``datasets``):

    cifar-10-batches-py/{data_batch_1..5,test_batch}   torchvision's CIFAR-10 pickles
    cifar-100-python/{train,test}                      torchvision's CIFAR-100 pickles
    FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    imagenet/{train,val}/<class>/*.JPEG
    ood_data/svhn/selected_test_32x32.mat              made by select_svhn_data.py
    ood_data/<name>/...                                image folders, see OOD_DATASETS
"""
import dataclasses
import functools
import gzip
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torchvision
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate
from torchvision import transforms

from util.errors import UserError, first_line

# --------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class DatasetSpec:
    """What a model and its transforms need to know about an ID set."""
    name: str
    num_classes: int
    size: int          # side of the square network input, pixels
    channels: int      # 3 (RGB) or 1 (L)
    mean: tuple        # per-channel normalisation of [0,1] pixels
    std: tuple
    style: str         # 'cifar' (32-px stem, resize to `size`) | 'imagenet' (Resize 256 + CenterCrop 224)

    def replace(self, **changes):
        """A copy with ``changes`` (the spec is frozen)."""
        return dataclasses.replace(self, **changes)

    def with_id_classes(self, id_classes):
        """The spec of the open-set protocol that keeps ``id_classes`` (None: all classes)."""
        return self.replace(num_classes=len(id_classes)) if id_classes else self

    @property
    def mode(self):
        """The PIL mode images are converted to: 'RGB' or 'L'."""
        return 'RGB' if self.channels == 3 else 'L'


ID_DATASETS = {
    # The authors', SupContrast's and knn-ood's constants (docs/METHOD.md §5b), not the exact pixel
    # statistics (whose std is 0.2470, 0.2435, 0.2616): their checkpoints expect these.
    'CIFAR-10': DatasetSpec('CIFAR-10', 10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 'cifar'),
    # Training statistics; the authors' *test* loader used CIFAR-10's (see paper_test_norm).
    'CIFAR-100': DatasetSpec('CIFAR-100', 100, 32, 3, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 'cifar'),
    'imagenet': DatasetSpec('imagenet', 1000, 224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 'imagenet'),
    'fashion-mnist': DatasetSpec('fashion-mnist', 10, 28, 1, (0.2860,), (0.3530,), 'cifar'),
}


def _normalise_key(name):
    return str(name).lower().replace('-', '').replace('_', '')


# 'cifar10', 'CIFAR-10', 'cifar_10', 'fashionmnist', 'ImageNet', ... all resolve.
_SPEC_LOOKUP = {_normalise_key(k): k for k in ID_DATASETS}


def get_spec(name):
    """The ``DatasetSpec`` of an ID set by name (case, '-' and '_' ignored: ``cifar10`` works).
    A ``DatasetSpec`` is returned as is."""
    if isinstance(name, DatasetSpec):
        return name
    key = _SPEC_LOOKUP.get(_normalise_key(name))
    if key is None:
        raise UserError(f"unknown in-distribution dataset {name!r}: choose one of {', '.join(ID_DATASETS)} "
                        f"(aliases cifar10, cifar100)")
    return ID_DATASETS[key]


# --------------------------------------------------------------------------- transforms

class ConvertMode:
    """PIL image -> the same image in ``mode`` ('RGB' or 'L'). A class, not a lambda, so
    DataLoader workers can pickle it."""

    def __init__(self, mode):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self):
        return f"{type(self).__name__}({self.mode!r})"


class TwoCrop:
    """Two independent draws of ``transform`` on the same image (SupCon's two views)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return [self.transform(img), self.transform(img)]

    def __repr__(self):
        return f"{type(self).__name__}({self.transform!r})"


def paper_test_norm(spec):
    """(mean, std) of the authors' test pipeline (docs/METHOD.md §5b): CIFAR-10's constants for both
    CIFAR sets (the paper's CIFAR-100 rows were produced that way), else the set's own."""
    spec = get_spec(spec)
    if spec.name in ('CIFAR-10', 'CIFAR-100'):
        return ID_DATASETS['CIFAR-10'].mean, ID_DATASETS['CIFAR-10'].std
    return spec.mean, spec.std


def parse_floats(text, what='value'):
    """'0.5,0.5,0.5', '(0.5, 0.5, 0.5)' (the authors' tuple syntax) or '[0.5 0.5]' -> tuple of
    floats. Never ``eval``: a flag is data."""
    parts = [p for p in re.split(r'[\s,()\[\]]+', str(text)) if p]
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise UserError(f"{what} {text!r} is not a list of numbers: write e.g. '0.5,0.5,0.5' or "
                        f"'(0.5,0.5,0.5)'") from None


def test_transform(spec, mean=None, std=None):
    """PIL image -> normalised tensor ``[channels, size, size]``, the authors' test pipeline
    (docs/METHOD.md §5b). ``mean``/``std`` default to the spec's.

    cifar style: ``Resize((size, size))`` -- a squash, the aspect ratio is not kept, exactly
    as the authors' ``transform_test`` -- then ``CenterCrop(size)`` (a no-op after the squash,
    kept for parity). imagenet style: ``Resize(256)`` + ``CenterCrop(224)``."""
    spec = get_spec(spec)
    resize = 256 if spec.style == 'imagenet' else (spec.size, spec.size)
    return transforms.Compose([
        ConvertMode(spec.mode),
        transforms.Resize(resize),
        transforms.CenterCrop(spec.size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean if mean is None else tuple(mean), spec.std if std is None else tuple(std)),
    ])


test_transform.__test__ = False  # the name starts with "test": keep pytest from collecting it where imported

TRAIN_RECIPES = ('supcon', 'ce')


def train_transform(spec, two_crop=True, recipe='supcon'):
    """Training augmentation (docs/METHOD.md §5); with ``two_crop`` the transform returns ``[view1, view2]``.

    ``recipe='supcon'``: RandomResizedCrop(size, scale 0.2-1), flip, ColorJitter(0.4, 0.4, 0.4,
    0.1) with p 0.8, RandomGrayscale p 0.2 (jitter and grey skipped for 1-channel sets: nothing
    to jitter). ``recipe='ce'`` (SupContrast's ``main_ce.py``): the crop and the flip only."""
    spec = get_spec(spec)
    if recipe not in TRAIN_RECIPES:
        raise ValueError(f"recipe must be one of {TRAIN_RECIPES}, got {recipe!r}")
    ops = [ConvertMode(spec.mode),
           transforms.RandomResizedCrop(spec.size, scale=(0.2, 1.0)),
           transforms.RandomHorizontalFlip()]
    if recipe == 'supcon' and spec.channels == 3:
        ops += [transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2)]
    ops += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    t = transforms.Compose(ops)
    return TwoCrop(t) if two_crop else t


def collate_skip_none(batch):
    """``default_collate`` after dropping ``None`` items (undecodable images). Returns
    ``None`` when every item of the batch was dropped: skip that batch."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return default_collate(batch)


# --------------------------------------------------------------------------- dataset classes

class ArrayDataset(Dataset):
    """Images held as one uint8 array ``[N, H, W, C]`` or ``[N, H, W]``; items are
    ``(transform(PIL image), label)``. ``mode`` converts each image ('RGB'/'L'); ``size``
    resizes it (bilinear) to ``size x size`` first (used to upscale 8x8 digits)."""

    def __init__(self, images, targets, name, transform=None, mode=None, size=None):
        assert images.dtype == np.uint8 and len(images) == len(targets)
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.name = name
        self.transform = transform
        self.mode = mode
        self.size = size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index])
        if self.size is not None and img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        if self.mode is not None and img.mode != self.mode:
            img = img.convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def subset(self, indices, targets, name=None):
        """A new dataset of the images at ``indices`` with the given labels."""
        return ArrayDataset(self.images[indices], targets, name or self.name, self.transform, self.mode, self.size)


def load_image(path, mode='RGB'):
    """The one image loader (training and test time): the PIL image at ``path`` in ``mode``,
    or None, with a warning naming the file, when it cannot be decoded. Pair it with
    ``collate_skip_none``, which drops the Nones."""
    try:
        with Image.open(path) as img:
            # Decoding happens in load(); with LOAD_TRUNCATED_IMAGES False (PIL's default,
            # never changed here) a truncated file raises instead of being padded.
            img.load()
            return img.convert(mode) if mode else img.copy()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
        return None


def _warn_if_truncated_allowed():
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by another module: "
                      "truncated images will be padded with grey instead of skipped")


class ImageFileDataset(Dataset):
    """Image files decoded on access by ``load_image``; items ``(transform(image), label)`` or
    None. Used for OOD folders, which may be flat (``places365/test_subset/*.jpg``) or
    nested to any depth: torchvision's ``ImageFolder`` reads only ``root/<class>/<file>``."""

    def __init__(self, paths, targets, name, transform=None, mode='RGB'):
        assert len(paths) == len(targets)
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.name = name
        self.transform = transform
        self.mode = mode
        _warn_if_truncated_allowed()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = load_image(self.paths[index], self.mode)
        if img is None:
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def subset(self, indices, targets, name=None):
        return ImageFileDataset([self.paths[i] for i in indices], targets, name or self.name,
                                self.transform, self.mode)


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ``ImageFolder`` (``root/<class>/<image>``, classes sorted) read with
    ``load_image``: an unreadable file gives None instead of an exception. ImageNet and
    ``--dataset path`` training use it, so both skip and name corrupt files the same way."""

    def __init__(self, root, transform=None, mode='RGB', name=None):
        super().__init__(root, transform=transform, loader=functools.partial(load_image, mode=mode),
                         allow_empty=True)
        self.name = name or os.path.basename(os.path.normpath(root))
        self.mode = mode
        self.paths = [p for p, _ in self.samples]
        self.targets = np.asarray(self.targets, dtype=np.int64)
        _warn_if_truncated_allowed()

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = self.loader(path)
        if img is None:
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, int(target)

    def subset(self, indices, targets, name=None):
        return ImageFileDataset([self.paths[i] for i in indices], targets, name or self.name,
                                self.transform, self.mode)


# --------------------------------------------------------------------------- file helpers

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.pgm', '.pbm', '.bmp', '.tif', '.tiff', '.webp', '.gif')


def _is_image_file(path):
    return path.lower().endswith(IMG_EXTENSIONS)


def _warn_skipped(skipped, folder):
    if skipped:
        shown = ', '.join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else '')
        warnings.warn(f"skipping {len(skipped)} non-image file(s) in {folder}: {shown}")


def scan_images(folder, skipped=None):
    """Sorted paths of the image files under ``folder``, searched recursively (flat or
    with class subfolders). Other files are skipped with one warning naming them, and
    appended to ``skipped`` when a list is given (so a caller can count them in its summary)."""
    paths, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in filenames:
            p = os.path.join(dirpath, f)
            (paths if _is_image_file(f) else others).append(p)
    _warn_skipped(sorted(others), folder)
    if skipped is not None:
        skipped.extend(sorted(others))
    return sorted(paths)


def _filter_classes(dataset, id_classes, num_classes):
    """Keep the items whose label is in ``id_classes``, relabelled 0..len-1 in the given order."""
    id_classes = check_id_classes(id_classes, num_classes)
    lut = np.full(num_classes, -1, dtype=np.int64)
    lut[id_classes] = np.arange(len(id_classes))
    keep = np.flatnonzero(lut[dataset.targets] >= 0)
    return dataset.subset(keep, lut[dataset.targets[keep]])


def check_id_classes(id_classes, num_classes):
    """``id_classes`` as an int64 array, after checking each is a class index, listed once."""
    ids = [int(c) for c in id_classes]
    if not ids:
        raise UserError("id_classes is empty: give at least one class index")
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"id_classes {bad} out of range: class indices must be in 0..{num_classes - 1}")
    if len(set(ids)) != len(ids):
        raise UserError(f"id_classes {ids} has repeated classes: list each class once")
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------- ID loaders

# Each CIFAR set's folder, pickles, label key and archive, as torchvision unpacks them.
CIFAR_FILES = {
    'CIFAR-10': dict(folder='cifar-10-batches-py', train=[f'data_batch_{i}' for i in range(1, 6)],
                     test=['test_batch'], label_key='labels', archive='cifar-10-python.tar.gz'),
    'CIFAR-100': dict(folder='cifar-100-python', train=['train'], test=['test'],
                      label_key='fine_labels', archive='cifar-100-python.tar.gz'),
}


def _download_with_torchvision(cls_name, root, name, **kw):
    import torchvision.datasets  # imported here: only the --download path needs it
    try:
        getattr(torchvision.datasets, cls_name)(root, download=True, **kw)
    except Exception as e:  # no network, disk full, bad checksum...
        raise UserError(f"downloading {name} into {root} failed ({first_line(e)}): check the internet "
                        f"connection or place the files there by hand (see datasets/README.md)") from e


def _load_cifar(name, root, split, download):
    info = CIFAR_FILES[name]
    folder = os.path.join(root, info['folder'])
    files = [os.path.join(folder, f) for f in info[split]]
    if not all(os.path.isfile(f) for f in files) and download:
        _download_with_torchvision(name.replace('-', ''), root, name)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        what = f"{name} not found at {folder}" if not os.path.isdir(folder) else f"{name} file {missing[0]} missing"
        raise UserError(f"{what}: pass --download (needs internet) or place torchvision's "
                        f"{info['archive']} files there (https://www.cs.toronto.edu/~kriz/{info['archive']})")
    data, labels = [], []
    for f in files:
        # Our own reader, not torchvision.datasets.CIFAR10: torchvision checks each batch's md5
        # before reading, so the tests' small files in the real pickle format (and any
        # re-packed copy a user has) would be refused.
        try:
            with open(f, 'rb') as fh:
                entry = pickle.load(fh, encoding='latin1')
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
            x = np.asarray(entry['data'], dtype=np.uint8).reshape(-1, 3072)
            y = np.asarray(entry[info['label_key']], dtype=np.int64)
        except Exception as e:
            raise UserError(f"cannot read {f} as a CIFAR pickle ({first_line(e)}): "
                            f"re-extract {info['archive']} into {root}") from e
        data.append(x)
        labels.append(y)
    # Rows are 1024 R, 1024 G, 1024 B values: [N, 3, 32, 32] -> HWC.
    images = np.ascontiguousarray(np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)


# torchvision's layout. Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
# is linked here by `bash setup.sh --with-fashion-mnist`, so the loader knows one place.
FASHION_MNIST_DIRS = ('{root}/FashionMNIST/raw',)
_FMNIST_PREFIX = {'train': 'train', 'test': 't10k'}


# Our own IDX reader, not torchvision.datasets.FashionMNIST: torchvision reads only the
# uncompressed files it extracted itself, while Debian's dataset-fashion-mnist (the data
# of the main job here) and the tests' fixtures are the standard .gz files.
def read_idx(path, expected_magic=None):
    """An IDX file (plain or gzip) as a numpy array: images (magic 2051) ``[N, rows, cols]``
    uint8, labels (magic 2049) ``[N]`` uint8. Big-endian header."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
        magic, n = struct.unpack('>II', raw[:8])
        if expected_magic is not None and magic != expected_magic:
            raise ValueError(f"magic number {magic}, expected {expected_magic}")
        if magic == 2051:
            rows, cols = struct.unpack('>II', raw[8:16])
            shape, offset = (n, rows, cols), 16
        elif magic == 2049:
            shape, offset = (n,), 8
        else:
            raise ValueError(f"magic number {magic}, expected 2051 (images) or 2049 (labels)")
        count = int(np.prod(shape))
        if len(raw) - offset < count:
            raise ValueError(f"file holds {len(raw) - offset} bytes of data, header says {count}")
        return np.frombuffer(raw, dtype=np.uint8, count=count, offset=offset).reshape(shape)
    except (OSError, EOFError, struct.error, ValueError) as e:
        raise UserError(f"cannot read {path} as an IDX file ({first_line(e)}): re-download it "
                        f"(https://github.com/zalandoresearch/fashion-mnist)") from e


def _find_idx(folder, stem):
    for f in (stem, stem + '.gz'):
        p = os.path.join(folder, f)
        if os.path.isfile(p):
            return p
    return None


def _load_fashion_mnist(root, split, download):
    prefix = _FMNIST_PREFIX[split]
    stems = (f'{prefix}-images-idx3-ubyte', f'{prefix}-labels-idx1-ubyte')
    dirs = [d.format(root=root) for d in FASHION_MNIST_DIRS]

    def find():
        for d in dirs:
            found = [_find_idx(d, s) for s in stems]
            if all(found):
                return found
        return None

    found = find()
    if found is None and download:
        _download_with_torchvision('FashionMNIST', root, 'Fashion-MNIST', train=(split == 'train'))
        found = find()
    if found is None:
        raise UserError(f"Fashion-MNIST not found at {dirs[0]} ({stems[0]}[.gz], {stems[1]}[.gz]): run "
                        f"`bash setup.sh --with-fashion-mnist` (links Debian's dataset-fashion-mnist there), pass "
                        f"--download (needs internet) or place the IDX files from "
                        f"https://github.com/zalandoresearch/fashion-mnist there")
    images, labels = read_idx(found[0], 2051), read_idx(found[1], 2049)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{found[0]} and {found[1]} do not match ({images.shape} images, {labels.shape} "
                        f"labels): re-download them")
    return images, labels.astype(np.int64)


def image_folder(folder, transform=None, mode='RGB', name=None, how='see datasets/README.md'):
    """A ``SafeImageFolder`` over ``folder/<class>/<image>``, with one-line errors when the
    folder, its class subfolders or its images are missing."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist: {how}")
    if not any(e.is_dir() for e in os.scandir(folder)):
        raise UserError(f"no class subfolders in {folder} (expected {folder}/<class>/<image>): {how}")
    ds = SafeImageFolder(folder, transform, mode, name)
    if not len(ds):
        raise UserError(f"no images in {folder}: {how}")
    return ds


def _load_imagenet(root, split, download, transform, mode):
    folder = os.path.join(root, 'imagenet', 'train' if split == 'train' else 'val')
    how = ("download ILSVRC-2012 from https://image-net.org and place one subfolder per class there "
           "(sort val with the standard valprep.sh)")
    if download:
        raise UserError(f"ImageNet cannot be downloaded automatically: {how}")
    if not os.path.isdir(folder):
        raise UserError(f"ImageNet not found at {folder}: {how}")
    return image_folder(folder, transform, mode, 'imagenet', how)


def get_id_dataset(name, root='datasets', split='train', transform=None, id_classes=None, download=False):
    """An ID set, items ``(transform(PIL image), label)``; ``split`` is 'train' or 'test'
    ('val' is accepted for 'test'; ImageNet reads ``imagenet/val``).

    ``id_classes`` keeps only those labels and renumbers them 0..len-1 in the given order
    (open-set protocol). ``download`` fetches CIFAR / Fashion-MNIST with torchvision when
    missing. Small sets are held as one uint8 array; ImageNet is read from files."""
    spec = get_spec(name)
    if split == 'val':
        split = 'test'
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec.name in CIFAR_FILES:
        images, labels = _load_cifar(spec.name, root, split, download)
        ds = ArrayDataset(images, labels, spec.name, transform)
    elif spec.name == 'fashion-mnist':
        images, labels = _load_fashion_mnist(root, split, download)
        ds = ArrayDataset(images, labels, spec.name, transform)
    else:  # imagenet
        ds = _load_imagenet(root, split, download, transform, spec.mode)
        classes = ds.classes
    if id_classes is not None:
        ds = _filter_classes(ds, id_classes, spec.num_classes)
        if spec.name == 'imagenet':
            ds.classes = [classes[int(c)] for c in id_classes]
    return ds
