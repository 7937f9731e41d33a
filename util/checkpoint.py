"""Reading and writing checkpoints: data only, never code.

Layouts read by ``read_checkpoint``:
- ours / the authors': ``{'model', 'attention', 'opt', 'optimizer', 'epoch', ...}``
  (``opt`` an ``argparse.Namespace``);
- SupContrast's: ``{'opt', 'model', 'optimizer', 'epoch'}``;
- a bare ``state_dict`` (e.g. torchvision's ``resnet50`` weights).
Every file is opened with ``torch.load(weights_only=True)``; ``argparse.Namespace`` is the
only class allowed beyond tensors and builtins, so a pickle that would run code is refused.
Writes go to a temporary file that is renamed over the target, so a crash mid-write leaves
the previous checkpoint intact.
"""
import argparse
import hashlib
import os
import pickle
import random
import zipfile

import numpy as np
import torch

from util import distributed
from util.errors import UserError

_PREFIXES = ('module.', '_orig_mod.')  # DDP / DataParallel, torch.compile


def file_sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def torch_load_safe(path):
    """``torch.load`` with ``weights_only=True`` (Namespace allowed); user errors are one line."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a directory, not a file: pass the .pth file inside it "
                        f"(e.g. {os.path.join(path, 'last.pth')}) as --ckp")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: check --ckp")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if 'Weights only load failed' in str(e) or 'Unsupported global' in str(e):
            raise UserError(f"refusing to load {path}: it holds Python objects other than tensors, "
                            f"numbers and argparse.Namespace, so loading it could run code "
                            f"({_unsupported_global(str(e))}); re-save its state_dict with torch.save") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({first}); re-download or use an earlier one") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError) as e:
        # torch.load of a non-checkpoint (a text file, an image) fails in many ways, e.g.
        # KeyError: 101 from the legacy pickle reader: all of them are one line here.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise UserError(f"checkpoint {path} is corrupt or truncated, or not a PyTorch checkpoint at all "
                        f"({type(e).__name__}: {first[:120]}); re-download it or use an earlier one") from None


def _unsupported_global(msg):
    for line in msg.splitlines():
        if 'Unsupported global' in line or 'GLOBAL' in line:
            return line.strip()[:160]
    return 'unsupported global'


def strip_prefixes(state_dict):
    """Drop ``module.`` (anywhere, e.g. SupContrast's ``encoder.module.conv1``) and ``_orig_mod.``."""
    out = {}
    for key, value in state_dict.items():
        for p in _PREFIXES:
            key = key.replace(p, '') if key.startswith(p) else key.replace('.' + p, '.')
        out[key] = value
    return out


def read_checkpoint(path):
    """-> dict with ``model`` (state_dict), ``attention`` (state_dict or None), ``opt``
    (Namespace or None), ``epoch``, ``arch`` (our architecture record or None), what a resume
    needs (``optimizer``, ``scaler``, ``global_step``, ``rng``: each None when absent), the
    run's ``fingerprint`` (ours; None for others) and ``raw`` (the whole loaded object)."""
    raw = torch_load_safe(path)
    if not isinstance(raw, dict):
        raise UserError(f"checkpoint {path} holds a {type(raw).__name__}, not a dict or state_dict")
    if 'model' in raw and isinstance(raw['model'], dict):
        model = raw['model']
    elif 'state_dict' in raw and isinstance(raw['state_dict'], dict):
        model = raw['state_dict']
    elif raw and all(torch.is_tensor(v) for v in raw.values()):
        model = raw
    else:
        raise UserError(f"checkpoint {path} has no 'model' or 'state_dict' entry and is not a state_dict "
                        f"(keys: {', '.join(list(raw)[:8])})")
    attention = raw.get('attention') if isinstance(raw.get('attention'), dict) else None
    return {
        'model': strip_prefixes(model),
        'attention': strip_prefixes(attention) if attention else None,
        'opt': raw.get('opt'),
        'epoch': raw.get('epoch'),
        'arch': raw.get('arch') if isinstance(raw.get('arch'), dict) else None,
        'optimizer': raw.get('optimizer'),
        'scaler': raw.get('scaler') or None,
        'global_step': int(raw.get('global_step', 0)),
        'rng': raw.get('rng'),
        'fingerprint': raw.get('fingerprint'),
        'raw': raw,
    }


def adapt_keys(model, state_dict):
    """Map other codebases' names onto ``model``'s (only renames; nothing is dropped):

    - a flat state_dict (torchvision's, knn-ood's CIFAR ``ResNetCifar``: ``conv1.weight``,
      ``layer1.0.conv1.weight`` ...) goes under ``encoder.``, except ``fc.*`` / ``head.*``;
    - ``downsample`` (torchvision, knn-ood) and ``shortcut`` (SupContrast) name the same
      1×1-conv + BN projection of a residual block: a key the model lacks is tried with the
      other name."""
    expected = model.state_dict()
    if any(k.startswith('encoder.') for k in expected) and not any(k.startswith('encoder.') for k in state_dict):
        state_dict = {(k if k.split('.')[0] in ('fc', 'head') else 'encoder.' + k): v for k, v in state_dict.items()}
    out = {}
    for key, value in state_dict.items():
        if key not in expected:
            for a, b in (('.downsample.', '.shortcut.'), ('.shortcut.', '.downsample.')):
                if a in key and key.replace(a, b) in expected:
                    key = key.replace(a, b)
                    break
        out[key] = value
    return out


def load_weights(model, state_dict, path='checkpoint', ignore=()):
    """Strict load: any missing, unexpected or mis-shaped key is a ``UserError`` naming them.
    ``ignore``: key prefixes allowed to be absent from / extra in the checkpoint; callers
    print what they ignored (``load_model`` does)."""
    state_dict = adapt_keys(model, strip_prefixes(state_dict))
    expected = model.state_dict()
    keep = lambda k: not any(k.startswith(p) for p in ignore)
    missing = [k for k in expected if k not in state_dict and keep(k)]
    unexpected = [k for k in state_dict if k not in expected and keep(k)]
    shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shape)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ''
                parts.append(f"{label}: {', '.join(keys[:4])}{more}")
        raise UserError(f"{path} does not match this architecture ({'; '.join(parts)}); "
                        f"check --model-arch / --model")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    return model


def resolve_id_classes(flag, record):
    """The ID classes of a run: ``--id-classes`` when given, else what the checkpoint records
    it was trained on (``record['id_classes']``), else None (every class)."""
    return flag if flag is not None else record.get('id_classes')


def save_checkpoint(obj, path):
    """Atomic ``torch.save`` (``util.misc.atomic_path``)."""
    from util.misc import atomic_path
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)



def load_model(path, model_arch=None, in_dataset=None, log=print):
    """The one way from a checkpoint file to a model: -> ``(model, info)``.

    ``model_arch`` (a ``--model-arch`` name or one of the authors' aliases) may be None for
    our checkpoints (they record it) and for the authors' (``opt.model`` + head or fc).
    Width, input channels, classes and head size are read from the tensors. A classifier
    ``fc`` in a checkpoint loaded as a SupCon model (knn-ood's and the authors' ImageNet
    ``SupConResNet``, knn-ood's CIFAR ``ResNetCifar``), or a ``head`` loaded as a CE model,
    is ignored with a printed note; every other mismatch is an error.
    ``info``: ``arch``, ``record`` (our architecture record, completed), ``epoch``,
    ``attention`` (ALPA weights or None), ``opt``."""
    from util.networks import MODEL_ARCHS, build_model, resolve_arch
    ckpt = read_checkpoint(path)
    state = ckpt['model']
    arch = model_arch
    if arch is None and ckpt['arch'] and ckpt['arch'].get('model_arch'):
        arch = ckpt['arch']['model_arch']
    if arch is None:
        base = getattr(ckpt['opt'], 'model', None) if ckpt['opt'] is not None else None
        if base:
            arch = f"{base}-{'supcon' if any(k.startswith('head.') for k in state) else 'ce'}"
    if arch is None:
        raise UserError(f"{path} does not record its architecture: pass --model-arch ({', '.join(MODEL_ARCHS)})")
    resolved = resolve_arch(arch, in_dataset)
    if resolved != arch:
        log(f"note: --model-arch {arch} read as {resolved}" + (f" for {in_dataset}" if in_dataset else ''))
    arch = resolved
    flat = strip_prefixes(state)
    conv1 = flat.get('encoder.conv1.weight', flat.get('conv1.weight'))
    kwargs = {}
    if conv1 is not None and conv1.dim() == 4:
        kwargs['in_channel'] = conv1.shape[1]
        if not arch.startswith('resnet50-imagenet'):
            kwargs['width'] = conv1.shape[0]
    kind = arch.rpartition('-')[2]
    if kind == 'ce' and 'fc.weight' in flat:
        kwargs['num_classes'] = flat['fc.weight'].shape[0]
    if kind == 'supcon' and 'head.2.weight' in flat:
        kwargs['feat_dim'] = flat['head.2.weight'].shape[0]
    model = build_model(arch, **kwargs)
    unused = 'fc.' if kind == 'supcon' else 'head.'
    extra = sorted(k for k in flat if k.startswith(unused))
    if extra:
        log(f"note: {path}: ignoring {', '.join(extra)} (a {'classifier' if unused == 'fc.' else 'projection head'} "
            f"that a {kind} model does not use)")
    load_weights(model, state, path=path, ignore=(unused,) if extra else ())
    record = dict(ckpt['arch'] or {})
    record.update(model_arch=arch, **{k: int(v) for k, v in kwargs.items()})
    return model, {'arch': arch, 'record': record, 'epoch': ckpt['epoch'], 'attention': ckpt['attention'],
                   'opt': ckpt['opt']}


# ---------------------------------------------------------------- state for exact resume
def rng_state(device):
    """This process's RNG states: torch (CPU), Python, numpy, and the CUDA generator of the
    device in use only. Saving every visible GPU's state (``get_rng_state_all``) would make a
    resume on a machine that sees fewer GPUs fail."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    random.setstate(_to_tuple(state['python']))
    n = state['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    cuda = state.get('cuda')
    if device.type == 'cuda' and cuda is not None:
        if isinstance(cuda, (list, tuple)):   # older checkpoints: one state per visible GPU
            cuda = cuda[min(device.index or 0, len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, device)


def rank_rng_states(device):
    """Every rank's ``rng_state`` in rank order (a list of one without DDP): each rank
    resumes with its own generators, not rank 0's."""
    return distributed.gather_objects(rng_state(device))


def restore_rank_rng(saved, device):
    """Restore this rank's entry of a checkpoint's ``rng`` (a list per rank, or one dict)."""
    if isinstance(saved, dict):
        saved = [saved]
    r = distributed.rank()
    if len(saved) != distributed.world_size() and distributed.is_main():
        print(f"note: the checkpoint holds RNG states of {len(saved)} process(es), this run has "
              f"{distributed.world_size()}; rank r resumes with state r mod {len(saved)}")
    set_rng_state(saved[r % len(saved)], device)


def set_aside_stale_run(run_dir, last_path, fingerprint_now):
    """``--resume auto`` reuses a run folder only when its ``last.pth`` was made by this code
    and config. A stale folder is renamed to ``<folder>.stale-<its fingerprint>`` (nothing
    is deleted) and the run starts again; -> True when that happened."""
    try:
        old = read_checkpoint(last_path)['fingerprint']
    except UserError:
        old = None   # unreadable: treat as stale, keep it aside for inspection
    if old == fingerprint_now:
        return False
    aside = f"{run_dir}.stale-{old or 'none'}"
    if distributed.is_main():
        n = 1
        while os.path.exists(aside):
            n += 1
            aside = f"{run_dir}.stale-{old or 'none'}-{n}"
        os.rename(run_dir, aside)
        print(f"retraining {run_dir}: it was made by other code or config (fingerprint {old} != "
              f"{fingerprint_now}); the old run is kept as {aside}")
    if distributed.is_dist():
        torch.distributed.barrier()
    return True


def resume_source(flag, run_dir, fingerprint_now):
    """The checkpoint a training run continues from: ``--resume PATH`` as given; with
    ``--resume auto`` the run folder's ``last.pth`` when it exists and was made by this code
    and config (a stale folder is set aside); else None (start at epoch 1)."""
    if flag != 'auto':
        return flag
    last = os.path.join(run_dir, 'last.pth')
    if not os.path.exists(last) or set_aside_stale_run(run_dir, last, fingerprint_now):
        return None
    return last


def resume_training(path, model, attention, optimizer, scaler, device):
    """Loads a training checkpoint into the run's objects (weights, ALPA attention, optimizer,
    loss scaler, this rank's RNG states): -> ``(first epoch to run, global step)``; ``(1, 0)``
    when ``path`` is None."""
    if not path:
        return 1, 0
    ck = read_checkpoint(path)
    load_weights(model, ck['model'], path=path)
    if attention is not None:
        if not ck['attention']:
            raise UserError(f"{path} has no ALPA attention weights, but this run trains with ALPA")
        load_weights(attention, ck['attention'], path=path)
    if ck['optimizer'] is None or ck['epoch'] is None:
        raise UserError(f"{path} holds no optimizer state or epoch, so it cannot be resumed: pass it as "
                        f"--ckp (fine-tuning) or start a new run")
    optimizer.load_state_dict(ck['optimizer'])
    if ck['scaler']:
        scaler.load_state_dict(ck['scaler'])
    if ck['rng'] is not None:
        restore_rank_rng(ck['rng'], device)
    if distributed.is_main():
        print(f"resumed from {path} at epoch {int(ck['epoch']) + 1}")
    return int(ck['epoch']) + 1, ck['global_step']


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def plain_args(args):
    """The Namespace stored as ``opt`` keeps only plain values (weights_only-loadable)."""
    keep = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))
            or (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in v))}
    return argparse.Namespace(**keep)
