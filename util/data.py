"""Datasets and transforms shared by training (``ALPA/``) and test time (``CSD/``).

In-distribution (ID) sets -- ``get_id_dataset`` -- yield ``(image, label)``; out-of-distribution
(OOD) sets -- ``get_ood_dataset`` -- yield ``(image, -1)``. With ``transform=None`` the image is
a PIL image, otherwise whatever the transform returns (a tensor for ``test_transform``,
a list of two tensors for ``train_transform``). Every dataset has a ``.name``.

An image file that cannot be decoded makes ``__getitem__`` return ``None`` (with a warning
naming the file); load with ``collate_fn=collate_skip_none`` so such items are dropped.

The on-disk layout (``datasets/README.md``, PAPER §7) is the one the authors' users
already have, with every path relative to ``root`` (``--data_root``, default ``datasets``):

    cifar-10-batches-py/{data_batch_1..5,test_batch}   torchvision's CIFAR-10 pickles
    cifar-100-python/{train,test}                      torchvision's CIFAR-100 pickles
    FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    imagenet/{train,val}/<class>/*.JPEG
    ood_data/svhn/selected_test_32x32.mat              made by select_svhn_data.py
    ood_data/<name>/...                                image folders, see OOD_DATASETS
"""
import gzip
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate
from torchvision import transforms

from util.errors import UserError


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

    @property
    def mode(self):
        """The PIL mode images are converted to: 'RGB' or 'L'."""
        return 'RGB' if self.channels == 3 else 'L'


ID_DATASETS = {
    # The authors', SupContrast's and knn-ood's constants (PAPER §5b), not the exact pixel
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
    """(mean, std) of the authors' test pipeline (PAPER §5b): CIFAR-10's constants for both
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
    (PAPER §5b). ``mean``/``std`` default to the spec's.

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
    """Training augmentation (PAPER §5); with ``two_crop`` the transform returns ``[view1, view2]``.

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


class ImageFileDataset(Dataset):
    """Image files decoded on access; items are ``(transform(PIL image), label)``, or
    ``None`` (with a warning naming the file) when the file cannot be decoded."""

    def __init__(self, paths, targets, name, transform=None, mode='RGB'):
        assert len(paths) == len(targets)
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.name = name
        self.transform = transform
        self.mode = mode
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by another module: "
                          "truncated images will be padded with grey instead of skipped")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                # Decoding happens in load(); with LOAD_TRUNCATED_IMAGES False (PIL's default,
                # never changed here) a truncated file raises instead of being padded.
                img.load()
                img = img.convert(self.mode) if self.mode else img.copy()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def subset(self, indices, targets, name=None):
        return ImageFileDataset([self.paths[i] for i in indices], targets, name or self.name,
                                self.transform, self.mode)


class NoiseDataset(Dataset):
    """``n`` synthetic images of ``size x size x channels``: 'gaussian' N(mean 0.5, std 0.25)
    or 'uniform' U[0,1] per pixel, clipped to [0,1], stored as uint8 (round(x*255)).

    Image i is drawn from ``numpy.random.default_rng([seed, i])``: the same for a seed in
    any order, in any DataLoader worker, without holding 10,000 ImageNet-sized images in memory."""

    def __init__(self, kind, n, size, channels, seed=0, transform=None, name=None):
        assert kind in ('gaussian', 'uniform')
        self.kind, self.n, self.size, self.channels, self.seed = kind, n, size, channels, seed
        self.transform = transform
        self.name = name or kind
        self.targets = np.full(n, -1, dtype=np.int64)

    def __len__(self):
        return self.n

    def image_array(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        shape = (self.size, self.size, self.channels) if self.channels > 1 else (self.size, self.size)
        x = rng.normal(0.5, 0.25, shape) if self.kind == 'gaussian' else rng.uniform(0.0, 1.0, shape)
        return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)

    def __getitem__(self, index):
        img = Image.fromarray(self.image_array(index))
        if self.transform is not None:
            img = self.transform(img)
        return img, -1


class RandomInputDataset(Dataset):
    """The authors' ``noise`` and ``lfnoise`` OOD sets (``ylib.dataloader.random_data``):
    ``n`` network inputs ``[channels, size, size]`` (float32) fed to the model *as they
    are* -- no image, no transform, no normalisation, as in the authors' loader.

    - ``noise`` (their ``GaussianRandom``): every value N(0, 1).
    - ``lfnoise`` (their ``LowFreqRandom``): N(0, 1) values x, then keep only the
      low-frequency quarter of an orthonormal 2-D DCT basis, ``z = idct(idct(x * mask, axis=W),
      axis=H)`` with ``mask = 1`` on the first ``int(size/2)`` rows and columns (DCT-II
      inverse, ``norm='ortho'``, per channel).

    Deliberate difference: theirs draw from numpy's global RNG (a different set on every
    run and worker); input i here comes from ``default_rng([seed, i])``, the same in any
    order and worker, with the same distribution."""

    KINDS = ('noise', 'lfnoise')

    def __init__(self, kind, n, size, channels, seed=0, name=None):
        assert kind in self.KINDS
        self.kind, self.n, self.size, self.channels, self.seed = kind, n, size, channels, seed
        self.name = name or kind
        self.targets = np.full(n, -1, dtype=np.int64)

    def __len__(self):
        return self.n

    def input_array(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        x = np.random.default_rng([self.seed, index]).standard_normal((self.channels, self.size, self.size))
        if self.kind == 'lfnoise':
            from scipy.fft import idct
            keep = int(self.size * 0.5)
            x[:, keep:, :] = 0.0
            x[:, :, keep:] = 0.0
            x = idct(idct(x, axis=2, norm='ortho'), axis=1, norm='ortho')
        return x.astype(np.float32)

    def __getitem__(self, index):
        import torch
        return torch.from_numpy(self.input_array(index)), -1


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
    id_classes = _check_id_classes(id_classes, num_classes)
    lut = np.full(num_classes, -1, dtype=np.int64)
    lut[id_classes] = np.arange(len(id_classes))
    keep = np.flatnonzero(lut[dataset.targets] >= 0)
    return dataset.subset(keep, lut[dataset.targets[keep]])


def _check_id_classes(id_classes, num_classes):
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

_CIFAR = {
    'CIFAR-10': dict(folder='cifar-10-batches-py', train=[f'data_batch_{i}' for i in range(1, 6)],
                     test=['test_batch'], label_key='labels', archive='cifar-10-python.tar.gz'),
    'CIFAR-100': dict(folder='cifar-100-python', train=['train'], test=['test'],
                      label_key='fine_labels', archive='cifar-100-python.tar.gz'),
}


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _download_with_torchvision(cls_name, root, name, **kw):
    import torchvision.datasets  # imported here: only the --download path needs it
    try:
        getattr(torchvision.datasets, cls_name)(root, download=True, **kw)
    except Exception as e:  # no network, disk full, bad checksum...
        raise UserError(f"downloading {name} into {root} failed ({_first_line(e)}): check the internet "
                        f"connection or place the files there by hand (see datasets/README.md)") from e


def _load_cifar(name, root, split, download):
    info = _CIFAR[name]
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
        # No md5 check (unlike torchvision), so hand-made or re-pickled files load too.
        try:
            with open(f, 'rb') as fh:
                entry = pickle.load(fh, encoding='latin1')
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
            x = np.asarray(entry['data'], dtype=np.uint8).reshape(-1, 3072)
            y = np.asarray(entry[info['label_key']], dtype=np.int64)
        except Exception as e:
            raise UserError(f"cannot read {f} as a CIFAR pickle ({_first_line(e)}): "
                            f"re-extract {info['archive']} into {root}") from e
        data.append(x)
        labels.append(y)
    # Rows are 1024 R, 1024 G, 1024 B values: [N, 3, 32, 32] -> HWC.
    images = np.ascontiguousarray(np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)


# Searched in order; the second is where this machine's system image keeps Fashion-MNIST.
FASHION_MNIST_DIRS = ('{root}/FashionMNIST/raw', '/usr/share/datasets/fashion-mnist')
_FMNIST_PREFIX = {'train': 'train', 'test': 't10k'}


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
        raise UserError(f"cannot read {path} as an IDX file ({_first_line(e)}): re-download it "
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
        raise UserError(f"Fashion-MNIST not found at {dirs[0]} ({stems[0]}[.gz], {stems[1]}[.gz]): pass "
                        f"--download (needs internet) or place the IDX files from "
                        f"https://github.com/zalandoresearch/fashion-mnist there")
    images, labels = read_idx(found[0], 2051), read_idx(found[1], 2049)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{found[0]} and {found[1]} do not match ({images.shape} images, {labels.shape} "
                        f"labels): re-download them")
    return images, labels.astype(np.int64)


def _load_imagenet(root, split, download):
    folder = os.path.join(root, 'imagenet', 'train' if split == 'train' else 'val')
    how = ("download ILSVRC-2012 from https://image-net.org and place one subfolder per class there "
           "(sort val with the standard valprep.sh)")
    if download:
        raise UserError(f"ImageNet cannot be downloaded automatically: {how}")
    if not os.path.isdir(folder):
        raise UserError(f"ImageNet not found at {folder}: {how}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise UserError(f"no class subfolders in {folder}: {how}")
    paths, targets = [], []
    for label, c in enumerate(classes):
        files = scan_images(os.path.join(folder, c))
        paths += files
        targets += [label] * len(files)
    if not paths:
        raise UserError(f"no images in {folder}: {how}")
    return paths, targets, classes


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
    if spec.name in _CIFAR:
        images, labels = _load_cifar(spec.name, root, split, download)
        ds = ArrayDataset(images, labels, spec.name, transform)
    elif spec.name == 'fashion-mnist':
        images, labels = _load_fashion_mnist(root, split, download)
        ds = ArrayDataset(images, labels, spec.name, transform)
    else:  # imagenet
        paths, labels, classes = _load_imagenet(root, split, download)
        ds = ImageFileDataset(paths, labels, spec.name, transform, mode=spec.mode)
        ds.classes = classes
    if id_classes is not None:
        ds = _filter_classes(ds, id_classes, spec.num_classes)
        if spec.name == 'imagenet':
            ds.classes = [classes[int(c)] for c in id_classes]
    return ds


# --------------------------------------------------------------------------- OOD loaders

_SVHN_URL = 'http://ufldl.stanford.edu/housenumbers/test_32x32.mat'
_TINY_OOD = 'tar.gz from the ODIN repo (github.com/facebookresearch/odin): https://www.dropbox.com/s/'

# name -> (path under <root>/ood_data, where it comes from)
_OOD_FOLDERS = {
    'dtd': ('dtd/images', 'Textures: https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz'),
    'places365': ('places365/test_subset', '10,000 images sampled from '
                  'http://data.csail.mit.edu/places/places365/test_256.tar'),
    'LSUN': ('LSUN', _TINY_OOD + 'fhtsw1m3qxlwj6h/LSUN.tar.gz'),
    'iSUN': ('iSUN', _TINY_OOD + 'ssz7qxfqae0cca5/iSUN.tar.gz'),
    'LSUN_resize': ('LSUN_resize', _TINY_OOD + 'moqh2wh8696c3yl/LSUN_resize.tar.gz (what the authors\' '
                    '"LSUN_FIX" option reads)'),
    'LSUN_fix': ('LSUN_fix', 'from the CSI repo (github.com/alinlab/CSI), LSUN_fix'),
    'ImageNet_fix': ('ImageNet_fix', 'from the CSI repo (github.com/alinlab/CSI), ImageNet_fix'),
    'Imagenet_resize': ('Imagenet_resize', _TINY_OOD + 'kp3my3412u5k9rl/Imagenet_resize.tar.gz'),
    'iNaturalist': ('iNaturalist', 'http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/iNaturalist.tar.gz'),
    'SUN': ('SUN', 'http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/SUN.tar.gz'),
    'Places': ('Places', 'http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/Places.tar.gz'),
    'TinyImages': ('TinyImages', 'a folder of 32x32 TinyImages images (the authors\' "tim" set)'),
}

OOD_DATASETS = {
    'SVHN': f'ood_data/svhn/selected_test_32x32.mat (run select_svhn_data.py on test_32x32.mat from {_SVHN_URL})',
    **{k: f'ood_data/{p}/ (image folder; {src})' for k, (p, src) in _OOD_FOLDERS.items()},
    'CIFAR-10': 'the CIFAR-10 test set (cifar-10-batches-py/test_batch), as OOD for CIFAR-100',
    'CIFAR-100': 'the CIFAR-100 test set (cifar-100-python/test), as OOD for CIFAR-10',
    'imagenet-val': 'imagenet/val/ (every image, resized by the ID test transform), as OOD for CIFAR',
    'noise': "generated: 10,000 network inputs, N(0,1) per value, no transform (the authors' GaussianRandom)",
    'lfnoise': "generated: 10,000 low-frequency noise inputs, no transform (the authors' LowFreqRandom)",
    'digits': 'generated: scikit-learn 8x8 digits (1,797), upscaled to the ID size; no download',
    'gaussian': 'generated: 10,000 images, N(0.5, 0.25) per pixel clipped to [0,1], seeded; no download',
    'uniform': 'generated: 10,000 images, U[0,1] per pixel, seeded; no download',
    **{f'{k}-heldout': f'the {k} test images whose class is not in id_classes (open-set)' for k in ID_DATASETS},
}

# The KNN repo's and the paper's other names for the same sets.
# Only true aliases: a name never silently stands for another data set (the authors' option
# "LSUN_FIX" read LSUN_resize, so it is not accepted here: name the folder you mean).
_OOD_ALIASES = {'inat': 'iNaturalist', 'sun50': 'SUN', 'places50': 'Places', 'places365_sub': 'places365',
                'texture': 'dtd', 'textures': 'dtd', 'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100',
                'imagenet': 'imagenet-val', 'tim': 'TinyImages', 'tinyimages': 'TinyImages'}
_OOD_LOOKUP = {**{k.lower(): k for k in OOD_DATASETS}, **_OOD_ALIASES}


def _unknown_ood(name):
    return UserError(f"unknown OOD dataset {name!r} (and no such directory): choose one of "
                     f"{', '.join(OOD_DATASETS)}, or pass the path of an image folder")


def resolve_ood_name(name):
    """The canonical name of an OOD set (a key of ``OOD_DATASETS``; case, aliases and
    ``<ID set>-heldout`` spellings resolved), or ``name`` itself when it is an existing
    directory; otherwise a ``UserError`` listing the known names. Reads no data, so every
    name can be checked before any work starts."""
    key = str(name)
    if key == 'LSUN_FIX':
        raise UserError("OOD set 'LSUN_FIX' is ambiguous: the authors' code read the LSUN_resize folder under "
                        "that name; pass LSUN_resize for their row, or LSUN_fix for the LSUN_fix folder")
    canonical = _OOD_LOOKUP.get(key.lower())
    if canonical is not None:
        return canonical
    if key.lower().endswith('-heldout'):
        return f"{get_spec(key[:-len('-heldout')]).name}-heldout"
    if os.path.isdir(key):
        return key
    raise _unknown_ood(name)


def _ood_path(root, rel):
    """``root/ood_data/rel``, its first folder matched case-insensitively when the exact
    spelling is absent (CSI ships ``Imagenet_fix``, the paper writes ``ImageNet_fix``)."""
    base = os.path.join(root, 'ood_data')
    first, _, rest = rel.partition('/')
    path = os.path.join(base, first)
    if not os.path.isdir(path) and os.path.isdir(base):
        match = sorted(e.path for e in os.scandir(base) if e.is_dir() and e.name.lower() == first.lower())
        path = match[0] if match else path
    return os.path.join(path, *rest.split('/')) if rest else path


def _load_svhn(root):
    folder = _ood_path(root, 'svhn')
    selected = os.path.join(folder, 'selected_test_32x32.mat')
    raw = os.path.join(folder, 'test_32x32.mat')
    if not os.path.isfile(selected):
        if os.path.isfile(raw):
            raise UserError(f"SVHN subset not found at {selected}: run `python select_svhn_data.py "
                            f"--root {folder}` to make it from {raw}")
        raise UserError(f"SVHN not found at {selected}: download {_SVHN_URL} into {folder}, then run "
                        f"`python select_svhn_data.py --root {folder}`")
    import scipy.io  # only SVHN needs it
    try:
        mat = scipy.io.loadmat(selected)
        x = np.asarray(mat['X'])
    except Exception as e:
        raise UserError(f"cannot read {selected} ({_first_line(e)}): delete it and rerun "
                        f"`python select_svhn_data.py --root {folder}`") from e
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise UserError(f"{selected} holds X of shape {x.shape}, expected 32x32x3xN: rerun select_svhn_data.py")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2).astype(np.uint8))  # [N, 32, 32, 3]


def _folder_dataset(folder, name, transform, mode):
    if not os.path.isdir(folder):
        src = _OOD_FOLDERS[name][1] if name in _OOD_FOLDERS else 'see datasets/README.md'
        raise UserError(f"{name} not found at {folder}: download it ({src}) and extract it there")
    ignored = []
    paths = scan_images(folder, ignored)
    if not paths:
        raise UserError(f"no images in {folder}: put the {name} image files there (see datasets/README.md)")
    ds = ImageFileDataset(paths, [-1] * len(paths), name, transform, mode)
    ds.ignored_files = ignored  # non-image files left out at scan time, for the caller's summary
    return ds


def _load_digits():
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
    x = load_digits().images  # [1797, 8, 8] floats 0..16
    return np.round(x * (255.0 / 16.0)).astype(np.uint8)


def get_ood_dataset(name, root='datasets', spec=None, transform=None, id_classes=None, seed=0):
    """An OOD set, items ``(transform(PIL image), -1)``; ``name`` is a key of ``OOD_DATASETS``
    (case-insensitive; aliases inat, sun50, places50, places365_sub, textures), an
    ``<ID set>-heldout`` name, or the path of any image folder (its name = the basename).

    ``spec`` (a ``DatasetSpec`` or ID name) is the ID set's: images are converted to its
    channels, and digits/gaussian/uniform are made at its size (they need it; other sets
    default to RGB). ``id_classes`` is needed by ``-heldout`` sets; ``seed`` by
    gaussian/uniform."""
    spec = get_spec(spec) if spec is not None else None
    canonical = resolve_ood_name(name)
    mode = spec.mode if spec is not None else 'RGB'
    if canonical not in OOD_DATASETS:  # an image folder given by path
        return _folder_dataset(canonical, os.path.basename(os.path.normpath(canonical)), transform, mode)
    if canonical.endswith('-heldout'):
        return _heldout(canonical[:-len('-heldout')], root, spec, transform, id_classes)
    if canonical == 'SVHN':
        images = _load_svhn(root)
        return ArrayDataset(images, np.full(len(images), -1), 'SVHN', transform, mode)
    if canonical in _OOD_FOLDERS:
        return _folder_dataset(_ood_path(root, _OOD_FOLDERS[canonical][0]), canonical, transform, mode)
    if canonical in _CIFAR:
        ds = get_id_dataset(canonical, root, 'test', transform=transform)
        return ArrayDataset(ds.images, np.full(len(ds), -1), canonical, transform, mode)
    if canonical == 'imagenet-val':
        folder = os.path.join(root, 'imagenet', 'val')
        if not os.path.isdir(folder):
            raise UserError(f"imagenet-val not found at {folder}: place the ILSVRC-2012 validation images there")
        return _folder_dataset(folder, canonical, transform, mode)
    if spec is None:
        raise ValueError(f"get_ood_dataset({canonical!r}) needs spec= (the ID DatasetSpec) for the image size")
    if canonical == 'digits':
        images = _load_digits()
        return ArrayDataset(images, np.full(len(images), -1), 'digits', transform, mode, size=spec.size)
    if canonical in RandomInputDataset.KINDS:
        return RandomInputDataset(canonical, 10_000, spec.size, spec.channels, seed, canonical)
    return NoiseDataset(canonical, 10_000, spec.size, spec.channels, seed, transform, canonical)


def _heldout(id_name, root, spec, transform, id_classes):
    id_spec = get_spec(id_name)
    name = f'{id_spec.name}-heldout'
    if id_classes is None:
        raise UserError(f"{name} needs the ID classes (--id_classes): it is the {id_spec.name} test images "
                        f"of the other classes")
    ids = _check_id_classes(id_classes, id_spec.num_classes)
    ds = get_id_dataset(id_spec.name, root, 'test', transform=transform)
    keep = np.flatnonzero(~np.isin(ds.targets, ids))
    if len(keep) == 0:
        raise UserError(f"{name} is empty: id_classes {ids.tolist()} cover every {id_spec.name} class")
    out = ds.subset(keep, np.full(len(keep), -1), name)
    out.mode = (spec or id_spec).mode
    return out
