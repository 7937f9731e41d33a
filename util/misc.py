"""Small helpers shared by the entry scripts: device choice, seeding, progress bars."""
import os
import random
import sys

import numpy as np
import torch

from util.errors import UserError


def pick_device(name=None):
    """``None``/'auto' -> cuda when present, else cpu. 'cuda' without a GPU is a user error."""
    if name in (None, '', 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable, desc='', total=None, leave=False):
    """tqdm on stderr, refreshed at most once a second (quiet in logs)."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=leave, mininterval=1.0, file=sys.stderr,
                dynamic_ncols=True, disable=os.environ.get('MODE_NO_PROGRESS') == '1')


def default_workers():
    return min(4, os.cpu_count() or 1)
