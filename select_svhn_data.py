"""Make the SVHN OOD test subset: the first 1000 images of each label, in file order.

    python select_svhn_data.py                     # datasets/ood_data/svhn/test_32x32.mat
                                                   #   -> datasets/ood_data/svhn/selected_test_32x32.mat

Same selection as the authors' script (from POEM/KNN): walk ``test_32x32.mat`` in order and
keep an image while fewer than 1000 of its label have been kept. Labels stay as stored
(1..10, where 10 is the digit 0); the kept images stay in file order. Output: ``X``
32x32x3xN uint8 and ``y`` Nx1, written to a temporary file and renamed, so an interrupted
run never leaves a half-written subset behind.
"""
import os
import sys

import numpy as np
import scipy.io

from util.cli import Parser
from util.errors import UserError, run_cli
from util.misc import atomic_path

SVHN_LABELS = tuple(range(1, 11))  # SVHN stores digit 0 as label 10


def get_args_parser():
    p = Parser(description=__doc__.split('\n\n')[0], add_help=True)
    p.add_argument('--root', default=os.path.join('datasets', 'ood_data', 'svhn'),
                   help="folder holding test_32x32.mat; the subset is written next to it "
                        "(default: datasets/ood_data/svhn)")
    p.add_argument('--per-class', type=int, default=1000,
                   help="images kept per label, first ones in file order (default: 1000, giving 10,000)")
    return p


def select_first_per_label(labels, per_class):
    """Indices (ascending) of the first ``per_class`` items of each label, in file order."""
    labels = np.asarray(labels).reshape(-1)
    keep = np.zeros(len(labels), dtype=bool)
    for lab in np.unique(labels):
        keep[np.flatnonzero(labels == lab)[:per_class]] = True
    return np.flatnonzero(keep)


def main(args):
    src = os.path.join(args.root, 'test_32x32.mat')
    dst = os.path.join(args.root, 'selected_test_32x32.mat')
    if args.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {args.per_class}")
    if not os.path.isfile(src):
        raise UserError(f"SVHN test set not found at {src}: download http://ufldl.stanford.edu/housenumbers/"
                        f"test_32x32.mat there, or point --root at the folder that holds it")
    try:
        mat = scipy.io.loadmat(src)
        x, y = np.asarray(mat['X']), np.asarray(mat['y'])
    except Exception as e:
        raise UserError(f"cannot read {src} as SVHN's test_32x32.mat ({type(e).__name__}): download it again") from e
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise UserError(f"{src} holds X {x.shape} and y {y.shape}, expected 32x32x3xN and Nx1: download it again")

    labels = y.reshape(-1)
    idx = select_first_per_label(labels, args.per_class)
    for lab in sorted(set(SVHN_LABELS) | set(np.unique(labels).tolist())):
        n = int(np.sum(labels == lab))
        if n < args.per_class:
            print(f"warning: label {lab} has only {n} images in {src}, fewer than {args.per_class}; "
                  f"keeping all of them", file=sys.stderr)

    out = {'X': np.ascontiguousarray(x[..., idx]), 'y': y.reshape(-1, 1)[idx]}
    with atomic_path(dst, suffix='.mat') as tmp:
        with open(tmp, 'wb') as f:
            scipy.io.savemat(f, out)
    print(f"kept {len(idx)} of {labels.size} images ({args.per_class} per label at most) -> {dst}")
    return dst


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
