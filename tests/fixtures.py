"""Tiny datasets written in the exact on-disk formats ``util/data.py`` reads.

Each ``write_*`` takes a folder (usually pytest's ``tmp_path``), writes a few images with
deterministic content there and returns what it wrote, so a test can check pixels and
labels after loading. Paths follow ``datasets/README.md`` with ``root`` standing for
``datasets``:

    write_cifar10(root)          root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    write_cifar100(root)         root/cifar-100-python/{train,test,meta}
    write_fashion_mnist(root)    root/FashionMNIST/raw/{train,t10k}-*-ubyte.gz
    write_imagenet(root)         root/imagenet/{train,val}/<wnid>/*.JPEG
    write_svhn_mat(path)         an SVHN .mat (X 32x32x3xN, y Nx1)
    write_image_folder(path, n)  n image files, flat or in class subfolders

``Killed`` is the exception the interrupted-run tests raise from inside a job;
``authors_checkpoint`` and ``write_bad_checkpoints`` write checkpoints (the authors' layout,
and every kind of bad one the CLI tests feed in).
"""
import argparse
import gzip
import os
import pickle
import struct

import numpy as np
import torch
from PIL import Image


class Killed(BaseException):
    """Stands for the job being killed mid-run (a BaseException, so no ``except Exception`` in
    the code under test can swallow it)."""


def _cifar_split(rng, n_per_class, num_classes):
    """Shuffled labels (every class n_per_class times) and random images [N, 32, 32, 3]."""
    labels = rng.permutation(np.repeat(np.arange(num_classes), n_per_class))
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    return images, labels


def _cifar_rows(images):
    """[N, 32, 32, 3] -> CIFAR's rows of 1024 R, 1024 G, 1024 B values."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _pickle(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, n_per_class=2, n_test_per_class=None, seed=0):
    """CIFAR-10 in torchvision's python layout. Train images are dealt round-robin over the
    five batches; returns ``{'train': (images, labels), 'test': (images, labels)}`` in the
    order a reader concatenating data_batch_1..5 sees them (images ``[N, 32, 32, 3]`` uint8)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    train = _cifar_split(rng, n_per_class, 10)
    test = _cifar_split(rng, n_test_per_class or n_per_class, 10)
    order = []
    for b in range(5):
        idx = np.arange(b, len(train[1]), 5)
        order.append(idx)
        _pickle(os.path.join(folder, f'data_batch_{b + 1}'), {
            'batch_label': f'training batch {b + 1} of 5', 'labels': train[1][idx].tolist(),
            'data': _cifar_rows(train[0][idx]), 'filenames': [f'img_{i}.png' for i in idx]})
    _pickle(os.path.join(folder, 'test_batch'), {
        'batch_label': 'testing batch 1 of 1', 'labels': test[1].tolist(), 'data': _cifar_rows(test[0]),
        'filenames': [f'test_{i}.png' for i in range(len(test[1]))]})
    _pickle(os.path.join(folder, 'batches.meta'), {
        'num_cases_per_batch': len(order[0]), 'num_vis': 3072,
        'label_names': ['airplane', 'automobile', 'bird', 'cat', 'deer',
                        'dog', 'frog', 'horse', 'ship', 'truck']})
    order = np.concatenate(order)
    return {'train': (train[0][order], train[1][order]), 'test': test}


def write_cifar100(root, n_per_class=1, n_test_per_class=None, seed=0):
    """CIFAR-100 in torchvision's python layout (``fine_labels`` 0..99, ``coarse_labels``).
    Returns ``{'train': (images, fine_labels), 'test': (...)}``."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, 'cifar-100-python')
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (('train', n_per_class), ('test', n_test_per_class or n_per_class)):
        images, labels = _cifar_split(rng, n, 100)
        _pickle(os.path.join(folder, split), {
            'filenames': [f'{split}_{i}.png' for i in range(len(labels))], 'batch_label': f'{split} batch',
            'fine_labels': labels.tolist(), 'coarse_labels': (labels // 5).tolist(), 'data': _cifar_rows(images)})
        out[split] = (images, labels)
    _pickle(os.path.join(folder, 'meta'), {'fine_label_names': [f'class_{i}' for i in range(100)],
                                           'coarse_label_names': [f'super_{i}' for i in range(20)]})
    return out


def svhn_index_pixels(x):
    """Recover the index an image had in a ``write_svhn_mat`` file from its first two bytes."""
    x = np.asarray(x)
    return x[0, 0, 0, ...].astype(np.int64) + 256 * x[0, 0, 1, ...].astype(np.int64)


def write_svhn_mat(path, labels=None, n=20, seed=0):
    """An SVHN-format .mat: ``X`` 32x32x3xN uint8, ``y`` Nx1 uint8 (labels 1..10; default
    cycles through them). Image i carries i in its top-left pixel (R = i % 256,
    G = i // 256, see ``svhn_index_pixels``); the rest is random. Returns ``(X, y)``."""
    import scipy.io
    labels = np.asarray(labels if labels is not None else np.arange(n) % 10 + 1, dtype=np.uint8).reshape(-1)
    n = len(labels)
    x = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    x[0, 0, 0, :] = np.arange(n) % 256
    x[0, 0, 1, :] = np.arange(n) // 256
    y = labels.reshape(-1, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    scipy.io.savemat(path, {'X': x, 'y': y})
    return x, y


def write_image_folder(path, n, size=32, nested=False, ext='png', mode='RGB', seed=0):
    """``n`` random images of ``size`` (int or (w, h)) under ``path``: flat, or with
    ``nested`` dealt over two class subfolders. Returns the written paths, sorted."""
    rng = np.random.default_rng(seed)
    w, h = (size, size) if isinstance(size, int) else size
    paths = []
    for i in range(n):
        folder = os.path.join(path, f'class_{i % 2}') if nested else path
        os.makedirs(folder, exist_ok=True)
        shape = (h, w, 3) if mode == 'RGB' else (h, w)
        img = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).convert(mode)
        p = os.path.join(folder, f'img_{i:04d}.{ext}')
        img.save(p)
        paths.append(p)
    os.makedirs(path, exist_ok=True)
    return sorted(paths)


def write_truncated_image(path, size=32, ext='png', seed=0):
    """A valid image file cut to half its bytes (header intact, pixel data short)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(
        path, format='JPEG' if ext.lower() in ('jpg', 'jpeg') else ext.upper())
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])
    return path


def _write_idx(path, array, gz):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack('>II', magic, len(array)) + b''.join(struct.pack('>I', d) for d in array.shape[1:])
    opener = gzip.open if gz else open
    with opener(path + ('.gz' if gz else ''), 'wb') as f:
        f.write(header + array.tobytes())


def write_fashion_mnist(root, n_train=20, n_test=10, gz=True, seed=0):
    """Fashion-MNIST IDX files (28x28 uint8, labels cycling 0..9) in ``root/FashionMNIST/raw``.
    Returns ``{'train': (images, labels), 'test': (...)}``."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, 'FashionMNIST', 'raw')
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, prefix, n in (('train', 'train', n_train), ('test', 't10k', n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte'), images, gz)
        _write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte'), labels, gz)
        out[split] = (images, labels)
    return out


def write_imagenet(root, num_classes=3, n_per_class=2, size=40, seed=0, n_val_per_class=None):
    """``root/imagenet/{train,val}/<wnid>/*.JPEG`` with ``num_classes`` WordNet-style class
    folders (``n_val_per_class`` images each in val, default ``n_per_class``). Returns the
    class folder names, sorted (= label order)."""
    classes = [f'n{1440764 + 17 * c:08d}' for c in range(num_classes)]
    for s, split in enumerate(('train', 'val')):
        n = n_per_class if split == 'train' or n_val_per_class is None else n_val_per_class
        for c, wnid in enumerate(classes):
            folder = os.path.join(root, 'imagenet', split, wnid)
            os.makedirs(folder, exist_ok=True)
            rng = np.random.default_rng([seed, s, c])
            for i in range(n):
                img = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f'{wnid}_{i}.JPEG'), format='JPEG')
    return sorted(classes)


# ---------------------------------------------------------------- the one tiny-training helper
def tiny_train_argv(data_root, save, *extra, width=4, batch=8, epochs=1, evaluate='none', eval_k=20):
    """Flags of a seconds-long training run on the fixture CIFAR-10 (``extra`` overrides:
    argparse keeps the last value given)."""
    return ['--dataset', 'cifar10', '--data-root', str(data_root), '--model', 'resnet18', '--width', str(width),
            '--batch-size', str(batch), '--epochs', str(epochs), '--learning-rate', '0.05', '--num-workers', '0',
            '--save-folder', str(save), '--eval', evaluate, '--eval-k', str(eval_k), '--feat-dim', '8', *extra]


def train_cli(script, argv, cwd=None, env=None, timeout=300):
    """``python ALPA/main_<script>.py *argv`` as a user runs it, single-threaded -> CompletedProcess
    (asserted successful). The last.pth it wrote: ``find_last(save)``."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS='1', MODE_NO_PROGRESS='1') if env is None else env
    proc = subprocess.run([sys.executable, os.path.join(repo, 'ALPA', f'main_{script}.py'), *argv],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def find_last(save):
    """The one ``last.pth`` under a save folder."""
    last = [os.path.join(d, 'last.pth') for d, _, files in os.walk(save) if 'last.pth' in files]
    assert len(last) == 1, last
    return last[0]


# ---------------------------------------------------------------- checkpoints
def authors_checkpoint(path, arch='resnet18-supcon', width=8, data_parallel=True):
    """The authors' dict: {'opt' Namespace, 'model', 'attention', 'optimizer', 'epoch'};
    SupContrast wraps the encoder in DataParallel, hence ``encoder.module.*`` keys."""
    from ALPA.attention import AttentionSimilarity
    from util.networks import build_model
    torch.manual_seed(0)
    model = build_model(arch, width=width)
    state = model.state_dict()
    if data_parallel:
        state = {k.replace('encoder.', 'encoder.module.', 1): v for k, v in state.items()}
    attention = AttentionSimilarity(model.encoder.out_dim, 80)
    opt = argparse.Namespace(model=arch.split('-')[0], dataset='cifar10', batch_size=128, learning_rate=0.1,
                             temp=0.1, alpa_finetune=True)
    torch.save({'opt': opt, 'model': state, 'attention': attention.state_dict(),
                'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 500}, path)
    return model, attention


class Evil:
    """Pickles to ``os.system(command)``: loading it with plain ``pickle`` runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def malicious_checkpoint(path, marker, how='torch'):
    """A checkpoint that looks like ours but creates ``marker`` when unpickled."""
    obj = {'model': {'w': torch.zeros(2)}, 'epoch': 1, 'opt': Evil(f"touch '{marker}'")}
    if how == 'torch':
        torch.save(obj, path)
    else:  # a bare pickle, as torch.save's legacy format and many hand-made files are
        with open(path, 'wb') as f:
            pickle.dump(obj, f, protocol=2)
    return path


def write_bad_checkpoints(d):
    """A real checkpoint (the authors' layout, width 8), its first half, and a malicious one."""
    authors_checkpoint(d / 'ckpt.pth')
    raw = (d / 'ckpt.pth').read_bytes()
    (d / 'half.pth').write_bytes(raw[:len(raw) // 2])
    malicious_checkpoint(d / 'evil.pth', d / 'PWNED')
    (d / 'notes.txt').write_text('this is not a checkpoint\n')
    (d / 'a_run_folder').mkdir()
    ck = torch.load(d / 'ckpt.pth', weights_only=False)
    ck['model'] = {k: (torch.full_like(v, float('nan')) if v.is_floating_point() else v) for k, v in ck['model'].items()}
    torch.save(ck, d / 'nan.pth')   # a diverged run's weights
    return d
