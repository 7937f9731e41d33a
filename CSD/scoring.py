"""k-NN scores on multi-scale features: the KNN baseline and Cross-Scale Decision (PAPER §3).

Contract (as OpenOOD's post-processors): a score is fitted on ID training features and
then maps test features to one number per image, **higher = more ID**.

- ``knn``: bank = global vectors of the ID training set; score = −d_k, the squared L2
  distance to the k-th nearest neighbour (Sun et al., 2022).
- ``csd``: bank = all M = 6 vectors of every training image, pooled, unlabelled; for each of
  the test image's M vectors, d_s = squared L2 distance to its k-th neighbour in the bank;
  score = max_s(−d_s).
- ``local`` (quadrants + centre) and ``global+center``: the same rule on a subset of scales.
Every vector is L2-normalised first (``x / (‖x‖ + 1e-10)``). Search is exact, all scales
of all queries in one batched search, with one of two backends (same arithmetic,
‖q‖² + ‖b‖² − 2q·b, tested equal):
- ``faiss`` (default): ``IndexFlatL2``, a faiss GPU index on CUDA when faiss has GPU
  support, else falls back to ``torch`` on the GPU;
- ``torch``: chunked GEMM + ``topk``. On these 2-core CPUs it is about 2× faster than
  faiss-cpu's flat search (bench/bench_csd.py), so the CPU demo uses it.
"""
import numpy as np
import torch

from util.errors import UserError
from util.features import SCALES, l2_normalize

try:
    import faiss
except ImportError:  # pragma: no cover - faiss is in requirements.txt
    faiss = None

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


def default_k(method, in_dataset=None):
    """The paper's k for ``method`` on ``in_dataset`` (a canonical ID name)."""
    if method == 'knn':
        return KNN_K_BY_DATASET.get(in_dataset, DEFAULT_K['knn'])
    return DEFAULT_K[method]


def _faiss_gpu_available():
    return faiss is not None and hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0


SEARCH_BACKENDS = ('faiss', 'torch')


FAISS_GPU_MAX_K = 2048   # faiss's GPU k-selection stops here; larger k goes to the torch backend


def available_memory_bytes(device):
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` on a GPU, MemAvailable on the CPU."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_search_budget(device):
    """Bytes the torch search may spend on its distance block: a quarter of free memory,
    at most 1 GiB (more rows per block stop paying off well before that)."""
    return max(16 << 20, min(1 << 30, available_memory_bytes(device) // 4))


class ExactKNN:
    """Exact squared-L2 k-th neighbour distance against a fixed bank.

    ``mem_budget``: bytes for the torch backend's distance block (default
    ``default_search_budget``): the queries go through in blocks of ``rows`` such that one
    preallocated ``[rows, N]`` fp32 buffer fits the budget; each block is built in place
    (``addmm`` of −2·q·bᵀ onto ‖b‖², then += ‖q‖²) and reduced with ``topk``."""

    def __init__(self, bank, device='cpu', query_chunk=16384, backend='faiss', mem_budget=None, k_max=None):
        if backend not in SEARCH_BACKENDS:
            raise UserError(f"unknown --search {backend!r}; known: {', '.join(SEARCH_BACKENDS)}")
        bank = np.ascontiguousarray(bank, dtype=np.float32)  # [N, D]
        self.n, self.dim = bank.shape
        self.device = torch.device(device)
        self.query_chunk = query_chunk
        self.mem_budget = mem_budget
        use_torch = backend == 'torch' or (self.device.type == 'cuda' and not _faiss_gpu_available())
        if self.device.type == 'cuda' and k_max is not None and k_max > FAISS_GPU_MAX_K:
            use_torch = True  # faiss-gpu raises for k > 2048
        if use_torch:
            self.backend = 'torch'
            self.bank = torch.from_numpy(bank).to(self.device)
            self.bank_sq = (self.bank * self.bank).sum(1)
            return
        if faiss is None:
            raise UserError("faiss is not installed: pip install faiss-cpu (or faiss-gpu-cu12 on CUDA)")
        index = faiss.IndexFlatL2(self.dim)
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()  # hand torch's cached blocks back before faiss allocates
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, self.device.index or 0, index)
            self.backend = 'faiss-gpu'
        else:
            self.backend = 'faiss-cpu'
        index.add(bank)
        self.index = index

    def kth_distance(self, queries, k):
        """queries [Q, D] -> [Q] squared L2 distance to the k-th nearest bank vector."""
        if not 1 <= k <= self.n:
            raise UserError(f"--k {k} is out of range: the bank holds {self.n} vectors, so 1 <= k <= {self.n}")
        if self.backend == 'faiss-gpu' and k > FAISS_GPU_MAX_K:
            raise ValueError(f"k={k} > {FAISS_GPU_MAX_K} on faiss-gpu: build ExactKNN with k_max={k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.empty(len(queries), dtype=np.float32)
        starts = range(0, len(queries), self.query_chunk)
        if len(starts) > 2:  # long searches show progress; short ones stay quiet
            from util.misc import progress
            starts = progress(starts, desc=f'k-NN search ({len(queries)} queries x {self.n} bank)')
        for s in starts:
            q = queries[s:s + self.query_chunk]
            if self.backend == 'torch':
                out[s:s + len(q)] = self._torch_kth(q, k)
            else:
                dist, _ = self.index.search(q, k)
                out[s:s + len(q)] = dist[:, k - 1]
        return out

    def block_rows(self, k):
        """Query rows per distance block under the memory budget: the [rows, N] buffer plus
        topk's [rows, k] values and indices."""
        budget = self.mem_budget or default_search_budget(self.device)
        return int(max(1, min(self.query_chunk, budget // (4 * self.n + 12 * k))))

    def _torch_kth(self, q, k):
        rows = self.block_rows(k)
        buf = torch.empty(min(rows, len(q)), self.n, device=self.device)   # the one distance block
        out = []
        for s in range(0, len(q), rows):
            qt = torch.from_numpy(q[s:s + rows]).to(self.device)
            block = buf[:len(qt)]
            torch.addmm(self.bank_sq[None], qt, self.bank.T, beta=1.0, alpha=-2.0, out=block)
            block.add_((qt * qt).sum(1, keepdim=True))
            out.append(block.topk(k, dim=1, largest=False).values[:, k - 1].cpu().numpy())
        return np.concatenate(out)


class MultiScaleKNN:
    """Fit on ID training features [N, 6, C]; ``score`` test features [Q, 6, C] -> [Q].

    ``scales`` picks the vectors used (names from ``util.features.SCALES``); with one scale
    this is the KNN baseline, with all six it is CSD."""

    def __init__(self, scales=SCALES, k=10, device='cpu', backend='faiss', mem_budget=None):
        unknown = set(scales) - set(SCALES)
        if unknown:
            raise UserError(f"unknown scales {sorted(unknown)}; known: {', '.join(SCALES)}")
        self.scales = tuple(scales)
        self.idx = [SCALES.index(s) for s in self.scales]
        self.k = k
        self.device = device
        self.backend = backend
        self.mem_budget = mem_budget

    def _select(self, feats):
        feats = np.asarray(feats)
        if feats.ndim != 3 or feats.shape[1] != len(SCALES):
            raise ValueError(f"expected features [N, {len(SCALES)}, C], got {feats.shape}")
        return l2_normalize(feats[:, self.idx].astype(np.float32, copy=False))  # [N, M, C]

    def fit(self, train_feats):
        bank = self._select(train_feats)
        self.search = ExactKNN(bank.reshape(-1, bank.shape[-1]), self.device, backend=self.backend,
                               mem_budget=self.mem_budget, k_max=self.k)  # [N·M, C]
        return self

    def score(self, feats):
        q = self._select(feats)
        n, m, c = q.shape
        d = self.search.kth_distance(q.reshape(-1, c), self.k).reshape(n, m)   # [Q, M]
        return (-d).max(axis=1)


def build_score(method, k=None, device='cpu', backend='faiss', mem_budget=None):
    """Name -> fitted-later score object: ``knn``, ``csd``, ``local``, ``global+center``."""
    if method not in SCALE_SETS:
        raise UserError(f"unknown --method {method!r}; known: {', '.join(SCALE_SETS)}")
    return MultiScaleKNN(SCALE_SETS[method], k=k or DEFAULT_K[method], device=device, backend=backend,
                         mem_budget=mem_budget)


def knn_scores(bank, queries, k, device='cpu', backend='faiss', mem_budget=None):
    """bank [N, D], queries [Q, D] -> [Q] scores −d_k (higher = more ID). Inputs normalised here."""
    search = ExactKNN(l2_normalize(bank), device, backend=backend, mem_budget=mem_budget, k_max=k)
    return -search.kth_distance(l2_normalize(queries), k)


def csd_scores(bank, queries, k, device='cpu', backend='faiss', mem_budget=None):
    """bank [N, M, D], queries [Q, M, D] -> [Q] scores max_s(−d_{k,s}), where the bank pools
    all N·M vectors. Inputs normalised here."""
    bank, queries = l2_normalize(bank), l2_normalize(queries)
    n, m, d = queries.shape
    search = ExactKNN(bank.reshape(-1, bank.shape[-1]), device, backend=backend, mem_budget=mem_budget, k_max=k)
    return (-search.kth_distance(queries.reshape(-1, d), k).reshape(n, m)).max(axis=1)
