"""Fingerprints of the code and config that made a reused result (a run folder, a feature
cache): a reuse happens only when the fingerprint matches, so a code change never brings
old numbers back.

The code part hashes the source files themselves (not a git commit id), so it works the
same in a clone, a dirty work tree or an unpacked tarball.
"""
import hashlib
import json
import os
from functools import lru_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_CODE = ('ALPA', 'util')                       # what a training run executes
FEATURE_CODE = ('util', 'CSD/feature_collect.py')     # what feature extraction executes


@lru_cache(maxsize=None)
def code_hash(parts):
    """sha256 over the ``.py`` files under ``parts`` (folders or files, relative to the repo
    root), each named by its relative path, in sorted order."""
    h = hashlib.sha256()
    files = []
    for part in parts:
        path = os.path.join(REPO, part)
        if os.path.isfile(path):
            files.append(path)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
            files += [os.path.join(dirpath, f) for f in filenames if f.endswith('.py')]
    for f in sorted(files):
        h.update(os.path.relpath(f, REPO).encode() + b'\0')
        with open(f, 'rb') as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def fingerprint(config, parts):
    """sha256 (16 hex digits) of a JSON-able ``config`` together with ``code_hash(parts)``."""
    payload = json.dumps({'config': config, 'code': code_hash(tuple(parts))}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
