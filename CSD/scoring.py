"""k-NN scores on multi-scale features: the KNN baseline and Cross-Scale Decision (docs/METHOD.md §3).

Contract (as OpenOOD's post-processors): a score is fitted on ID training features and
then maps test features to one number per image, **higher = more ID**.

- ``knn``: bank = global vectors of the ID training set; score = −d_k, the squared L2
  distance to the k-th nearest neighbour (Sun et al., 2022).
- ``csd``: bank = all M = 6 vectors of every training image, pooled, unlabelled; for each of
  the test image's M vectors, d_s = squared L2 distance to its k-th neighbour in the bank;
  score = max_s(−d_s).
- ``local`` (quadrants + centre) and ``global+center``: the same rule on a subset of scales.
Every vector is L2-normalised first (``x / (‖x‖ + 1e-10)``). Search is exact (approximate
only when ``--search ivf|hnsw`` asks for it), all scales of all queries in one batched search, through the project's one k-NN search
(``util.knn.ExactKNN``: faiss or torch backend, same numbers).
"""
import numpy as np

from util.errors import UserError
from util.features import SCALES, l2_normalize
from util.knn import APPROX_BACKENDS, SEARCH_BACKENDS, ApproxKNN, Bank, ExactKNN  # noqa: F401  (the CLI's choices)

SCALE_SETS = {
    'knn': ('global',),
    'csd': SCALES,
    'local': ('q00', 'q01', 'q10', 'q11', 'center'),
    'global+center': ('global', 'center'),
}
DEFAULT_K = {'knn': 50, 'csd': 10, 'local': 10, 'global+center': 10}
# KNN's k follows the ID set, as in Sun et al. (2022); CSD and its ablations keep the
# authors' k = 10 everywhere.
KNN_K_BY_DATASET = {'CIFAR-10': 50, 'CIFAR-100': 200, 'imagenet': 1000}


class Detector:
    """The one contract of every score (``CSD/detectors.py`` registers them): ``fit(train,
    context)`` on the ID training split, then ``score(split)`` -> [N], **higher = more ID**.
    ``train`` / ``split``: the feature store's dict (``features`` [N, 6, C], ``labels``,
    ``logits``, ``meta``); ``context``: a ``CSD.detectors.Context``. ``needs``: what a split
    must hold."""
    needs = ('features',)

    def fit(self, train, context=None):
        return self

    def score(self, split):
        raise NotImplementedError


def _features(x):
    """A split dict's features, or the array itself."""
    return x['features'] if isinstance(x, dict) else x


def default_k(method, in_dataset=None):
    """The paper's k for ``method`` on ``in_dataset`` (a canonical ID name)."""
    if method == 'knn':
        return KNN_K_BY_DATASET.get(in_dataset, DEFAULT_K['knn'])
    return DEFAULT_K[method]


class MultiScaleKNN(Detector):
    """Fit on ID training features [N, 6, C]; ``score`` test features [Q, 6, C] -> [Q] (a split
    dict or its features array, either way).

    ``scales`` picks the vectors used (names from ``util.features.SCALES``); with one scale
    this is the KNN baseline, with all six it is CSD. ``scales=None`` takes every vector of
    features [N, M, C] of any M (``knn_scores`` / ``csd_scores``)."""

    def __init__(self, scales=SCALES, k=10, device='cpu', backend='faiss', mem_budget=None, bank_chunk=None,
                 approx=None):
        unknown = set(scales or ()) - set(SCALES)
        if unknown:
            raise UserError(f"unknown scales {sorted(unknown)}; known: {', '.join(SCALES)}")
        self.scales = tuple(scales) if scales is not None else None
        self.idx = [SCALES.index(s) for s in self.scales] if scales is not None else None
        self.k = k
        self.device = device
        self.backend = backend
        self.mem_budget = mem_budget
        self.bank_chunk = bank_chunk
        self.approx = approx or {}   # ApproxKNN's options with backend ivf / hnsw

    def select(self, feats):
        """[N, 6, C] features -> this method's scales, L2-normalised, float32: [N, M, C]."""
        feats = np.asarray(feats)
        if feats.ndim != 3 or (self.scales is not None and feats.shape[1] != len(SCALES)):
            raise ValueError(f"expected features [N, {len(SCALES)}, C], got {feats.shape}")
        picked = feats if self.idx is None else feats[:, self.idx]
        return l2_normalize(picked.astype(np.float32, copy=False))  # [N, M, C]

    def fit(self, train, context=None):
        """``bank_chunk`` (bank rows per chunk) streams the bank through the device instead of
        loading it whole: the features may then be a memory-mapped array of any size."""
        train_feats = _features(train)
        if self.idx is None:
            self.idx = list(range(np.shape(train_feats)[1]))
        if self.backend in APPROX_BACKENDS:
            bank = Bank(train_feats, self.idx) if self.bank_chunk else self.select(train_feats).reshape(
                -1, np.shape(train_feats)[-1])
            self.search = ApproxKNN(bank, self.backend, self.device, **self.approx)
            return self
        if self.bank_chunk:
            self.search = ExactKNN(Bank(train_feats, self.idx), self.device, mem_budget=self.mem_budget,
                                   k_max=self.k, bank_chunk=self.bank_chunk)
            return self
        bank = self.select(train_feats)
        self.search = ExactKNN(bank.reshape(-1, bank.shape[-1]), self.device, backend=self.backend,
                               mem_budget=self.mem_budget, k_max=self.k)  # [N·M, C]
        return self

    def score(self, feats, return_scale=False):
        """-> scores [Q]; with ``return_scale`` also the name of the scale that decided each
        score (the argmax over scales of −d_k), e.g. for the k-NN retrieval figure."""
        q = self.select(_features(feats))
        n, m, c = q.shape
        d = self.search.kth_distance(q.reshape(-1, c), self.k).reshape(n, m)   # [Q, M]
        scores = (-d).max(axis=1)
        if return_scale:
            names = self.scales or tuple(range(m))
            return scores, [names[i] for i in (-d).argmax(axis=1)]
        return scores


def build_score(method, k=None, device='cpu', backend='faiss', mem_budget=None, bank_chunk=None, approx=None):
    """Name -> fitted-later score object: ``knn``, ``csd``, ``local``, ``global+center``.
    ``backend`` ivf / hnsw: approximate search (``util.knn.ApproxKNN``, options ``approx``)."""
    if method not in SCALE_SETS:
        raise UserError(f"unknown --method {method!r}; known: {', '.join(SCALE_SETS)}")
    return MultiScaleKNN(SCALE_SETS[method], k=k or DEFAULT_K[method], device=device, backend=backend,
                         mem_budget=mem_budget, bank_chunk=bank_chunk, approx=approx)


def knn_scores(bank, queries, k, device='cpu', backend='faiss', mem_budget=None, bank_chunk=None):
    """bank [N, D], queries [Q, D] -> [Q] scores −d_k (higher = more ID): CSD with one vector
    per image. Inputs normalised here. ``bank_chunk``: stream the bank in chunks of that many rows."""
    return csd_scores(bank[:, None], queries[:, None], k, device, backend, mem_budget, bank_chunk)


def csd_scores(bank, queries, k, device='cpu', backend='faiss', mem_budget=None, bank_chunk=None):
    """bank [N, M, D], queries [Q, M, D] -> [Q] scores max_s(−d_{k,s}), where the bank pools
    all N·M vectors. Inputs normalised here. ``bank_chunk``: stream the bank (e.g. a
    memory-mapped array) in chunks of that many rows."""
    return MultiScaleKNN(None, k, device, backend, mem_budget, bank_chunk).fit(bank).score(queries)
