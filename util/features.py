"""Multi-scale features (docs/METHOD.md §2) and the one feature-extraction loop every score uses."""
import contextlib
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from util.errors import UserError

# Order of the M = 6 vectors per image. Scores select scales by these names.
SCALES = ('q00', 'q01', 'q10', 'q11', 'global', 'center')


def center_slice(n):
    """Central half of a side of length n, symmetric, trimming ``ceil(n/4 - 1/2)`` (n/4
    rounded, halves down) from each end: 4 -> 1:3 (the authors' 4×4 case), 7 -> 2:5,
    8 -> 2:6, 2 -> 0:2, 1 -> 0:1."""
    lo = max(math.ceil(n / 4 - 0.5), 0)
    return slice(lo, max(n - lo, lo + 1))


def multi_scale_pool(fmap):
    """Last-stage map [N, C, H, W] -> [N, 6, C] (not normalised): the 2×2 adaptive-average
    quadrants row-major (q00, q01, q10, q11), the global average, the central-region average."""
    quads = F.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)          # [N, 4, C]
    glob = fmap.mean(dim=(2, 3)).unsqueeze(1)                                   # [N, 1, C]
    hs, ws = center_slice(fmap.shape[2]), center_slice(fmap.shape[3])
    cent = fmap[:, :, hs, ws].mean(dim=(2, 3)).unsqueeze(1)                     # [N, 1, C]
    return torch.cat([quads, glob, cent], dim=1)


def l2_normalize(x, axis=-1):
    """``x / (‖x‖ + 1e-10)``, the authors' normalisation (numpy or torch)."""
    if torch.is_tensor(x):
        return x / (x.norm(dim=axis, keepdim=True) + 1e-10)
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=axis, keepdims=True) + 1e-10)


TF32_OVERRIDE_ENV = 'TORCH_ALLOW_TF32_CUBLAS_OVERRIDE'
_warned_override = []


@contextlib.contextmanager
def exact_fp32(device):
    """TF32 off for cuDNN convolutions and CUDA matmuls, restored afterwards: test-time
    features and the "exact" k-NN distances are fp32 on every device, whatever the caller set
    (``allow_tf32``, ``torch.set_float32_matmul_precision('high')``, or the newer
    ``fp32_precision`` attributes). Only the ``fp32_precision`` API is read and written:
    torch 2.14 raises when the legacy and the new API are mixed, so reading ``allow_tf32``
    here would break a caller who uses the new one. ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``
    forces TF32 inside cuBLAS where no flag can undo it: said once, as a warning."""
    if torch.device(device).type != 'cuda':
        yield
        return
    if os.environ.get(TF32_OVERRIDE_ENV, '') not in ('', '0') and not _warned_override:
        _warned_override.append(True)
        warnings.warn(f"{TF32_OVERRIDE_ENV} is set: cuBLAS matmuls (features, k-NN distances) run in TF32 "
                      f"whatever this code asks, so they are not exact fp32; unset it for reproducible numbers")
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = 'ieee'
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def collect_features(model, loader, device, with_logits=None, progress=None, source='the model'):
    """One forward pass over ``loader`` (TF32 off, see ``exact_fp32``) -> dict of numpy arrays: ``features`` [N, 6, C]
    (raw, un-normalised, fp32 — no autocast, so the numbers do not depend on the device's
    reduced-precision kernels), ``labels`` [N], and ``logits`` [N, K] when the model has a
    classifier. Batches may be smaller than requested (corrupt images dropped by the
    collate); ``skipped`` counts the images that never arrived. Non-finite features stop
    the extraction with a ``UserError`` naming ``source`` (e.g. the checkpoint)."""
    with exact_fp32(device):
        return _collect_features(model, loader, device, with_logits, progress, source)


@torch.no_grad()
def iter_features(model, batches, device, with_logits=None, source='the model', name='the dataset'):
    """The extraction loop: one forward pass per batch of ``batches`` (a loader, maybe wrapped
    in a progress bar; ``name``: its dataset, for errors) -> yields, per batch,
    ``(features [n, 6, C] fp32 numpy, labels [n] int64, logits [n, K] fp32 or None, extra)``,
    or ``None`` for a batch whose every image was unreadable. ``extra`` is what the batch
    carries after (image, label), e.g. the dataset indices of ``IndexedDataset``. No autograd;
    call it under ``exact_fp32``; the model is put in eval mode."""
    model.eval()
    if with_logits is None:
        with_logits = hasattr(model, 'fc')
    for batch in batches:
        if batch is None:
            yield None
            continue
        fmap = model.forward_features(batch[0].to(device, non_blocking=True)).float()
        pooled = multi_scale_pool(fmap).cpu().numpy()
        if not np.isfinite(pooled).all():
            raise UserError(f"{source} gives non-finite (NaN or inf) features on {name}: its weights are probably "
                            f"broken (a diverged run?); use another checkpoint")
        logits = model.forward_head(fmap).float().cpu().numpy() if with_logits else None
        yield pooled, np.asarray(batch[1], dtype=np.int64), logits, batch[2:]


@torch.no_grad()
def _collect_features(model, loader, device, with_logits, progress, source):
    if with_logits is None:
        with_logits = hasattr(model, 'fc')
    feats, labels, logits = [], [], []
    batches = iter_features(model, progress(loader) if progress else loader, device, with_logits, source,
                            getattr(loader.dataset, 'name', 'the dataset'))
    for out in batches:
        if out is None:
            continue
        feats.append(out[0])
        labels.append(out[1])
        if with_logits:
            logits.append(out[2])
    n_seen = sum(len(l) for l in labels)
    skipped = len(loader.dataset) - n_seen
    if skipped:
        warnings.warn(f"{skipped} of {len(loader.dataset)} images could not be read and were skipped")
    if not feats:
        name = getattr(loader.dataset, 'name', 'the dataset')
        raise UserError(f"none of the {len(loader.dataset)} images of {name} could be read "
                        f"(each is named in a warning above): replace or remove those files")
    result = {'n': n_seen, 'skipped': skipped, 'features': np.concatenate(feats), 'labels': np.concatenate(labels)}
    if with_logits:
        result['logits'] = np.concatenate(logits)
    return result
