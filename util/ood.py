"""The OOD catalogue: every out-of-distribution set by name (docs/METHOD.md §7, ``datasets/README.md``).

``get_ood_dataset(name, root, spec, transform)`` -> a dataset of ``(transform(image), -1)``;
``resolve_ood_name`` checks a name without reading data, so every name on a command line can
be checked before any work starts. Image folders go through ``util.data``'s readers.
"""
import os

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from util.data import (
    CIFAR_FILES,
    ID_DATASETS,
    ArrayDataset,
    ImageFileDataset,
    check_id_classes,
    get_id_dataset,
    get_spec,
    scan_images,
)
from util.errors import UserError, first_line


# --------------------------------------------------------------------------- generated sets
class _GeneratedSet(Dataset):
    """``n`` seeded items of a generated OOD set (labels -1); item i depends only on (seed, i)."""
    KINDS = ()

    def __init__(self, kind, n, size, channels, seed=0, name=None):
        assert kind in self.KINDS
        self.kind, self.n, self.size, self.channels, self.seed = kind, n, size, channels, seed
        self.name = name or kind
        self.targets = np.full(n, -1, dtype=np.int64)

    def __len__(self):
        return self.n

    def _check(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)


class NoiseDataset(_GeneratedSet):
    """``n`` synthetic images of ``size x size x channels``: 'gaussian' N(mean 0.5, std 0.25)
    or 'uniform' U[0,1] per pixel, clipped to [0,1], stored as uint8 (round(x*255)).

    Image i is drawn from ``numpy.random.default_rng([seed, i])``: the same for a seed in
    any order, in any DataLoader worker, without holding 10,000 ImageNet-sized images in memory."""

    KINDS = ('gaussian', 'uniform')

    def __init__(self, kind, n, size, channels, seed=0, transform=None, name=None):
        _GeneratedSet.__init__(self, kind, n, size, channels, seed, name)
        self.transform = transform

    def image_array(self, index):
        self._check(index)
        rng = np.random.default_rng([self.seed, index])
        shape = (self.size, self.size, self.channels) if self.channels > 1 else (self.size, self.size)
        x = rng.normal(0.5, 0.25, shape) if self.kind == 'gaussian' else rng.uniform(0.0, 1.0, shape)
        return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)

    def __getitem__(self, index):
        img = Image.fromarray(self.image_array(index))
        if self.transform is not None:
            img = self.transform(img)
        return img, -1


class RandomInputDataset(_GeneratedSet):
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
        _GeneratedSet.__init__(self, kind, n, size, channels, seed, name)

    def input_array(self, index):
        self._check(index)
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
        raise UserError(f"cannot read {selected} ({first_line(e)}): delete it and rerun "
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


def missing_ood_folder(name, root='datasets'):
    """The one-line error for an OOD set whose image folder is not on disk, else None: a cheap
    check done for every OOD set before the first (long) forward pass."""
    canonical = resolve_ood_name(name)
    if canonical in _OOD_FOLDERS:
        folder, src = _ood_path(root, _OOD_FOLDERS[canonical][0]), _OOD_FOLDERS[canonical][1]
    elif canonical not in OOD_DATASETS:
        folder, src = canonical, 'an image folder given by path'
    else:
        return None
    return None if os.path.isdir(folder) else f"{canonical} not found at {folder}: download it ({src}) and extract it there"


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
    if canonical in CIFAR_FILES:
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
        raise UserError(f"{name} needs the ID classes (--id-classes): it is the {id_spec.name} test images "
                        f"of the other classes")
    ids = check_id_classes(id_classes, id_spec.num_classes)
    ds = get_id_dataset(id_spec.name, root, 'test', transform=transform)
    keep = np.flatnonzero(~np.isin(ds.targets, ids))
    if len(keep) == 0:
        raise UserError(f"{name} is empty: id_classes {ids.tolist()} cover every {id_spec.name} class")
    out = ds.subset(keep, np.full(len(keep), -1), name)
    out.mode = (spec or id_spec).mode
    return out
