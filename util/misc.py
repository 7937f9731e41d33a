"""Small helpers shared by the entry scripts: device choice, precision choice, seeding, progress bars."""
import contextlib
import glob
import os
import random
import re
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


def arch_supported(capability, arch_list):
    """Whether a torch build compiled for ``arch_list`` (``torch.cuda.get_arch_list()``, e.g.
    ['sm_75', ..., 'compute_90']) has kernels for a GPU of compute ``capability`` (major,
    minor): a cubin ``sm_XY`` runs on major X with minor >= Y, PTX ``compute_XY`` is compiled
    at load time for any GPU of capability >= XY. An empty list (a CPU build) says nothing: True."""
    if not arch_list:
        return True
    cap = tuple(capability)
    for arch in arch_list:
        m = re.fullmatch(r'(sm|compute)_(\d+)(a?)', arch)   # 'sm_86', 'sm_100', 'sm_90a', 'compute_90'
        if m is None:
            continue
        major, minor = int(m.group(2)[:-1]), int(m.group(2)[-1])
        if m.group(3):   # arch-specific ('sm_90a'): that capability only
            ok = cap == (major, minor)
        elif m.group(1) == 'sm':
            ok = cap[0] == major and cap[1] >= minor
        else:
            ok = cap >= (major, minor)
        if ok:
            return True
    return False


def unsupported_gpu(device):
    """None when this torch build has kernels for ``device``; else one line saying what to install."""
    cap = torch.cuda.get_device_capability(device)
    arch_list = torch.cuda.get_arch_list()
    if arch_supported(cap, arch_list):
        return None
    return (f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}) has no kernels in this torch build "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda}, built for {' '.join(arch_list)}): every GPU "
            f"kernel would fail with 'no kernel image'. Install a build that still targets it, e.g. "
            f"pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126 "
            f"(README, 'CUDA'), or pass --device cpu")


def pick_device(name=None, log=None):
    """``None``/'auto' -> cuda when torch can use it, else cpu (with one loud line when an
    NVIDIA GPU is present that torch cannot use). An explicit cuda device without CUDA is a
    ``UserError``, never a fallback. A GPU this torch build has no kernels for (a V100 or
    P100 under the default CUDA 13 wheel, ``unsupported_gpu``) is the same: a loud line and the
    CPU by default, a ``UserError`` when asked for by name. A chosen GPU becomes the current one
    (``torch.cuda.set_device``), so pinned memory, faiss and capability checks use it too."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if name in (None, '', 'auto'):
        if torch.cuda.is_available():
            device = torch.device('cuda', torch.cuda.current_device())
            why = unsupported_gpu(device)
            if why:
                log(f"WARNING: running on the CPU: {why}")
                return torch.device('cpu')
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
            why = unsupported_gpu(device)
            if why:
                raise UserError(f"--device {name}: {why}")
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
    overrides the choice (``--amp-dtype``)."""
    if not amp:
        return None
    if prefer != 'auto':
        return {'bf16': torch.bfloat16, 'fp16': torch.float16}[prefer]
    if device.type == 'cuda':
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


@contextlib.contextmanager
def atomic_path(path, suffix=''):
    """Write to a temporary name beside ``path`` and rename it over ``path`` only when the block
    ends without an exception: a reader never sees a half-written file, and a kill while
    writing leaves the old one. -> the temporary path (``suffix`` keeps an extension a writer
    needs, e.g. '.png'). Flushed to disk before the rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, 'w', newline='') as f:
            f.write(text)
    return os.fspath(path)


def seeded_indices(n, size, rng=0):
    """``size`` of ``range(n)`` without replacement, sorted: the same ones on every run for a
    given seed (``rng`` an int) or the next draw of a shared ``numpy.random.Generator``."""
    rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    return np.sort(rng.choice(n, size, replace=False))


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable, desc='', total=None, leave=False):
    """tqdm on stderr, refreshed at most once a second (quiet in logs)."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=leave, mininterval=1.0, file=sys.stderr,
                dynamic_ncols=True, disable=os.environ.get('MODE_NO_PROGRESS') == '1')


WORKERS_HELP = 'data-loading workers (default: min(4, cores) on a CPU run; on a GPU box the cores per GPU process, at most 16)'


def default_workers(env=None):
    """Data-loading workers: on a CPU run at most 4 (the model shares the cores with them); on
    a GPU box the cores this process may use divided among the GPU processes of the node
    (``LOCAL_WORLD_SIZE`` under torchrun, else one per visible GPU), at most 16, since
    decoding and augmenting feed a GPU that would otherwise wait."""
    env = os.environ if env is None else env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if not torch.cuda.is_available():
        return max(1, min(4, cores))
    procs = int(env.get('LOCAL_WORLD_SIZE', '') or max(1, torch.cuda.device_count()))
    return max(1, min(16, cores // max(1, procs)))
