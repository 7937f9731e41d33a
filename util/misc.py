"""Small helpers shared by the entry scripts: device choice, precision choice, seeding, progress bars."""
import glob
import os
import random
import shutil
import sys

import numpy as np
import torch

from util.errors import UserError

CUDA_HELP = ("the NVIDIA driver is probably older than the CUDA this torch was built for "
             f"({torch.version.cuda or 'no CUDA'}): install a torch build for your driver's CUDA, e.g. "
             "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126 "
             "(see README, 'CUDA'), or pass --device cpu")


def nvidia_device_present():
    """True when the machine shows an NVIDIA GPU to the OS (device nodes, the driver's proc
    entry, or nvidia-smi), whatever torch thinks."""
    return bool(glob.glob('/dev/nvidia[0-9]*') or os.path.exists('/proc/driver/nvidia/version')
                or shutil.which('nvidia-smi'))


def pick_device(name=None, log=None):
    """``None``/'auto' -> cuda when torch can use it, else cpu (with one loud line when an
    NVIDIA GPU is present that torch cannot use). An explicit cuda device without CUDA is a
    ``UserError``, never a fallback. A chosen GPU becomes the current one
    (``torch.cuda.set_device``), so pinned memory, faiss and capability checks use it too."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if name in (None, '', 'auto'):
        if torch.cuda.is_available():
            device = torch.device('cuda', torch.cuda.current_device())
        else:
            if nvidia_device_present():
                log(f"WARNING: an NVIDIA GPU is present but torch.cuda.is_available() is False, running on the "
                    f"CPU: {CUDA_HELP}")
            return torch.device('cpu')
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            why = CUDA_HELP if nvidia_device_present() else 'this machine has no NVIDIA GPU'
            raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU: {why}")
        if device.type == 'cuda':
            if device.index is None:
                device = torch.device('cuda', torch.cuda.current_device())
            if device.index >= torch.cuda.device_count():
                raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible "
                                f"(device indices 0 to {torch.cuda.device_count() - 1})")
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    return device


def cpu_has_native_bf16():
    """AVX-512 BF16 or AMX-BF16 in the CPU flags (Linux ``/proc/cpuinfo``): bf16 matmuls run
    natively there; elsewhere they are emulated and slower than fp32."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return bool(flags & {'avx512_bf16', 'amx_bf16'})
    except OSError:
        pass
    return False


def autocast_dtype(device, amp, prefer='auto'):
    """The autocast dtype of ``--amp`` on ``device``, or None for fp32.

    CUDA: bf16 where the GPU runs it natively (Ampere and later); ``is_bf16_supported()``
    counts emulation by default, which would send V100/T4/P100 down a slow (or failing)
    bf16 path, so emulation is excluded and those GPUs get fp16 + GradScaler. CPU: bf16 only
    with native support (``cpu_has_native_bf16``), else fp32. ``prefer`` ('bf16' or 'fp16')
    overrides the choice (``--amp_dtype``)."""
    if not amp:
        return None
    if prefer != 'auto':
        return {'bf16': torch.bfloat16, 'fp16': torch.float16}[prefer]
    if device.type == 'cuda':
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


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
