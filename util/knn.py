"""The one exact k-NN search of the project: test-time scores (``CSD/scoring.py``), the kNN
accuracy at the end of training, the benchmarks and the figures all call ``ExactKNN``.

Squared L2 distances, exact, with one of two backends (same arithmetic, tested equal):
``faiss`` (``IndexFlatL2``; a faiss GPU index on CUDA when faiss has GPU support, else the
torch backend on the GPU) and ``torch`` (one preallocated distance block + ``topk``; on
these 2-core CPUs 2–4× faster than faiss-cpu's flat search, bench/bench_csd.py).
"""
import numpy as np
import torch

from util.errors import UserError
from util.features import exact_fp32
from util.misc import seeded_indices

try:
    import faiss
except ImportError:  # pragma: no cover - faiss is in requirements.txt
    faiss = None

SEARCH_BACKENDS = ('faiss', 'torch')
APPROX_BACKENDS = ('ivf', 'hnsw')   # faiss IndexIVFFlat / IndexHNSWFlat: approximate, on request


def _faiss_gpu_available():
    return faiss is not None and hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0


_GPU_RESOURCES = []


def gpu_resources():
    """The process's one faiss ``StandardGpuResources`` (each holds its own scratch memory and
    streams, so one per index would multiply them), made the first time after torch hands its
    cached blocks back (faiss allocates outside torch's caching allocator)."""
    if not _GPU_RESOURCES:
        torch.cuda.empty_cache()
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def squared_norms(x, rows=1 << 16):
    """‖x_i‖² of [N, D] ``x``, block by block: ``(x * x).sum(1)`` at once would hold a second
    [N, D] copy of the bank for a moment. Same numbers (each row's sum is the same kernel)."""
    return torch.cat([(b * b).sum(1) for b in x.split(rows)]) if len(x) else x.new_zeros(0)


# The k smallest entries of each row of a distance block, on the CPU, in two passes: the
# minimum of each group of GROUP columns, then a topk over the k groups with the smallest
# minima only. Those k groups hold the k smallest entries (an entry outside them would have
# k smaller group minima below it), so the values are topk's exactly; 3.5x faster than topk
# for k = 10 on a 216,000-column block (bench/bench_csd.py). Large k gains nothing: topk then.
GROUP, TWO_PASS_MAX_K = 256, 64


def smallest_k(block, k):
    """[rows, n] -> (values [rows, k] ascending, column indices [rows, k]), as
    ``block.topk(k, dim=1, largest=False)`` (same values; among equal values the indices may
    differ). Two passes on the CPU for small k (see GROUP), ``topk`` otherwise."""
    rows, n = block.shape
    if block.device.type != 'cpu' or k > TWO_PASS_MAX_K or n < 4 * GROUP * k or block.stride(1) != 1:
        top = block.topk(k, dim=1, largest=False)
        return top.values, top.indices
    groups = n // GROUP
    mins = block.as_strided((rows, groups, GROUP), (block.stride(0), GROUP, 1)).amin(2)    # [rows, G]
    if groups * GROUP < n:
        mins = torch.cat([mins, block[:, groups * GROUP:].amin(1, keepdim=True)], 1)      # the short last group
    best = mins.topk(k, dim=1, largest=False, sorted=False).indices                       # [rows, k]
    cols = (best[..., None] * GROUP + torch.arange(GROUP, device=block.device)).view(rows, -1)
    outside = cols >= n                                                                   # past the short group's end
    values = block.gather(1, cols.clamp_(max=n - 1)).masked_fill_(outside, float('inf'))
    top = values.topk(k, dim=1, largest=False)
    return top.values, cols.gather(1, top.indices)


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


class Bank:
    """A k-NN bank read chunk by chunk: ``features`` [N, M_all, C] (any array-like, e.g. a
    memory-mapped ``.npy``) restricted to the scale indices ``scales`` and L2-normalised per
    chunk, so the whole normalised bank never has to exist in memory. Row ``i·M + m`` of the
    bank is scale ``scales[m]`` of image ``i``, the layout of the in-memory search."""

    def __init__(self, features, scales):
        self.features, self.scales = features, list(scales)
        self.images, self.per_image, self.dim = features.shape[0], len(self.scales), features.shape[-1]
        self.n = self.images * self.per_image

    def rows(self, start, stop):
        """Bank rows [start, stop) as a normalised float32 array; start/stop multiples of M.
        Only this bank's scales are read from ``features`` (the KNN bank reads one of the six)."""
        from util.features import l2_normalize
        images = slice(start // self.per_image, stop // self.per_image)
        lo, hi = self.scales[0], self.scales[-1] + 1
        scales = slice(lo, hi) if self.scales == list(range(lo, hi)) else self.scales
        chunk = np.asarray(self.features[images, scales])
        return l2_normalize(chunk.reshape(-1, self.dim))


class ExactKNN:
    """Exact squared-L2 k-th neighbour distance against a fixed bank.

    ``mem_budget``: bytes for the torch backend's distance block (default
    ``default_search_budget``): the queries go through in blocks of ``rows`` such that one
    preallocated ``[rows, N]`` fp32 buffer fits the budget; each block is built in place
    (``addmm`` of −2·q·bᵀ onto ‖b‖², then += ‖q‖²) and reduced with ``topk``."""

    def __init__(self, bank, device='cpu', query_chunk=16384, backend='faiss', mem_budget=None, k_max=None,
                 bank_chunk=None):
        if backend not in SEARCH_BACKENDS:
            raise UserError(f"unknown --search {backend!r}; known: {', '.join(SEARCH_BACKENDS)}")
        self.device = torch.device(device)
        self.query_chunk = query_chunk
        self.mem_budget = mem_budget
        if isinstance(bank, Bank):
            # Streamed: the bank stays where it is (RAM or a memory-mapped file) and goes through
            # the device chunk by chunk, each query block keeping a running top-k.
            self.backend, self.stream, self.n, self.dim = 'torch-stream', bank, bank.n, bank.dim
            budget = self.mem_budget or default_search_budget(self.device)
            per_image = bank.per_image
            # 'auto': a quarter of the budget per chunk (its normalised copy and the read-out
            # take about twice that), half for the distance block.
            chunk = bank_chunk if isinstance(bank_chunk, int) else max(per_image, (budget // 4) // (4 * bank.dim))
            self.bank_chunk = max(per_image, chunk // per_image * per_image)   # whole images per chunk
            return
        bank = np.ascontiguousarray(bank, dtype=np.float32)  # [N, D]
        self.n, self.dim = bank.shape
        use_torch = backend == 'torch' or (self.device.type == 'cuda' and not _faiss_gpu_available())
        if self.device.type == 'cuda' and k_max is not None and k_max > FAISS_GPU_MAX_K:
            use_torch = True  # faiss-gpu raises for k > 2048
        if use_torch:
            self.backend = 'torch'
            self.bank = torch.from_numpy(bank).to(self.device)
            self.bank_sq = squared_norms(self.bank)
            return
        if faiss is None:
            raise UserError("faiss is not installed: pip install faiss-cpu (or faiss-gpu-cu12 on CUDA)")
        index = faiss.IndexFlatL2(self.dim)
        if self.device.type == 'cuda':
            index = faiss.index_cpu_to_gpu(gpu_resources(), self.device.index or 0, index)
            self.backend = 'faiss-gpu'
        else:
            self.backend = 'faiss-cpu'
        index.add(bank)
        self.index = index

    def kth_distance(self, queries, k):
        """queries [Q, D] -> [Q] squared L2 distance to the k-th nearest bank vector."""
        return self.search(queries, k, need_indices=False)[0][:, -1]

    def search(self, queries, k, need_indices=True):
        """queries [Q, D] -> (distances [Q, k] ascending, bank indices [Q, k] or None)."""
        if not 1 <= k <= self.n:
            raise UserError(f"--k {k} is out of range: the bank holds {self.n} vectors, so 1 <= k <= {self.n}")
        if self.backend == 'faiss-gpu' and k > FAISS_GPU_MAX_K:
            raise ValueError(f"k={k} > {FAISS_GPU_MAX_K} on faiss-gpu: build ExactKNN with k_max={k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.backend == 'torch-stream':
            with exact_fp32(self.device):   # TF32 would make "exact" distances approximate
                return self._streamed_search(queries, k, need_indices)
        dist = np.empty((len(queries), k), dtype=np.float32)
        idx = np.empty((len(queries), k), dtype=np.int64) if need_indices else None
        starts = range(0, len(queries), self.query_chunk)
        if len(starts) > 2:  # long searches show progress; short ones stay quiet
            from util.misc import progress
            starts = progress(starts, desc=f'k-NN search ({len(queries)} queries x {self.n} bank)')
        for s in starts:
            q = queries[s:s + self.query_chunk]
            if self.backend == 'torch':
                with exact_fp32(self.device):
                    d, i = self._torch_search(q, k, need_indices)
            else:
                d, i = self.index.search(q, k)
            dist[s:s + len(q)] = d
            if need_indices:
                idx[s:s + len(q)] = i
        return dist, idx

    def block_rows(self, k):
        """Query rows per distance block under the memory budget: the [rows, N] buffer plus
        topk's [rows, k] values and indices."""
        budget = self.mem_budget or default_search_budget(self.device)
        return int(max(1, min(self.query_chunk, budget // (4 * self.n + 12 * k))))

    def query_rows(self, k):
        """Queries whose running top-k (and, on a GPU, the vectors) stay on the device while the
        bank streams past them once: from a quarter of the free memory (CPU queries are not
        copied). Each group of this many queries reads the whole bank once."""
        per_query = 12 * k + (4 * self.dim if self.device.type == 'cuda' else 0)
        return int(max(1, available_memory_bytes(self.device) // 4 // per_query))

    def _streamed_search(self, queries, k, need_indices):
        """Exact top-k over the streamed bank: each bank chunk is read once per group of
        ``query_rows`` queries (once per split, in practice), its block of distances built in
        place (as ``_torch_search``) and reduced with ``topk``, and merged into each query's
        running top-k."""
        budget = self.mem_budget or default_search_budget(self.device)
        group = self.query_rows(k)
        dist = np.empty((len(queries), k), dtype=np.float32)
        idx = np.empty((len(queries), k), dtype=np.int64) if need_indices else None
        chunks = range(0, self.n, self.bank_chunk)
        if len(chunks) * -(-len(queries) // group) > 2:
            from util.misc import progress
            chunks = progress(chunks, desc=f'k-NN search ({len(queries)} queries x {self.n} streamed bank)')
        for g in range(0, len(queries), group):
            q = queries[g:g + group]
            d, i = self._stream_group(q, k, budget, chunks)
            dist[g:g + len(q)] = d
            if need_indices:
                idx[g:g + len(q)] = i
        return dist, idx

    def _stream_group(self, q, k, budget, chunks):
        rows = int(max(1, min(len(q), (budget // 2) // (4 * self.bank_chunk + 12 * k))))
        best_d = torch.full((len(q), k), float('inf'), device=self.device)
        best_i = torch.zeros((len(q), k), dtype=torch.long, device=self.device)
        queries = torch.from_numpy(q).to(self.device)
        q_sq = (queries * queries).sum(1, keepdim=True)
        for start in chunks:
            stop = min(self.n, start + self.bank_chunk)
            kk = min(k, stop - start)
            chunk = self.stream.rows(start, stop)   # the one read of these rows for this group
            if self._use_knn_gpu(kk):
                # faiss's brute-force GPU search on this chunk (its own tiling), merged as below
                d, i = faiss.knn_gpu(gpu_resources(), q, chunk, kk, device=self.device.index or 0)
                merged_d = torch.cat([best_d, torch.as_tensor(d, device=self.device)], 1)
                merged_i = torch.cat([best_i, torch.as_tensor(i, device=self.device) + start], 1)
                keep = merged_d.topk(k, dim=1, largest=False)
                best_d, best_i = keep.values, merged_i.gather(1, keep.indices)
                continue
            bank = torch.from_numpy(chunk).to(self.device)   # [chunk, D]
            bank_sq = (bank * bank).sum(1)
            for s in range(0, len(q), rows):
                block = torch.addmm(bank_sq[None], queries[s:s + rows], bank.T, beta=1.0, alpha=-2.0)
                block.add_(q_sq[s:s + rows])
                top_d, top_i = smallest_k(block, kk)
                merged_d = torch.cat([best_d[s:s + rows], top_d], 1)
                merged_i = torch.cat([best_i[s:s + rows], top_i + start], 1)
                keep = merged_d.topk(k, dim=1, largest=False)
                best_d[s:s + rows] = keep.values
                best_i[s:s + rows] = merged_i.gather(1, keep.indices)
        return best_d.cpu().numpy(), best_i.cpu().numpy()

    def _use_knn_gpu(self, k):
        """Streamed chunks go through ``faiss.knn_gpu`` on a CUDA device when faiss has GPU support."""
        return self.device.type == 'cuda' and _faiss_gpu_available() and k <= FAISS_GPU_MAX_K

    def _torch_search(self, q, k, need_indices):
        rows = self.block_rows(k)
        buf = torch.empty(min(rows, len(q)), self.n, device=self.device)   # the one distance block
        dists, idx = [], []
        for s in range(0, len(q), rows):
            qt = torch.from_numpy(q[s:s + rows]).to(self.device)
            block = buf[:len(qt)]
            torch.addmm(self.bank_sq[None], qt, self.bank.T, beta=1.0, alpha=-2.0, out=block)
            block.add_((qt * qt).sum(1, keepdim=True))
            top_d, top_i = smallest_k(block, k)   # sorted ascending
            dists.append(top_d.cpu().numpy())
            if need_indices:
                idx.append(top_i.cpu().numpy())
        return np.concatenate(dists), (np.concatenate(idx) if need_indices else None)


class ApproxKNN:
    """Approximate squared-L2 k-NN through faiss, on request (``--search ivf|hnsw``), with the
    ``ExactKNN`` interface. ``bank``: an [N, D] array of normalised vectors or a ``Bank``
    (added chunk by chunk, so a memory-mapped store is never loaded whole; the index itself
    holds the N·D vectors in RAM).

    - ``ivf``: ``IndexIVFFlat``, ``nlist`` lists (default 4·√N, at most N/39) trained with
      k-means on a seeded sample of at most 64·nlist bank vectors; ``nprobe`` lists searched
      (default 32); a query whose probed lists hold fewer than k vectors is searched again with
      twice the lists until it has k (counted in ``widened``). On a CUDA device with faiss-gpu
      the k-means runs on the GPU and the index is moved there; a search with k or nprobe
      above faiss-gpu's 2048 (a widening past 2048 lists) runs on a CPU copy of it.
    - ``hnsw``: ``IndexHNSWFlat`` with ``m`` links per node (default 32), ``ef_search``
      candidates (default 128, raised to k when k is larger)."""

    def __init__(self, bank, kind='ivf', device='cpu', nlist=None, nprobe=32, m=32, ef_search=128, seed=0):
        if faiss is None:
            raise UserError("--search ivf/hnsw needs faiss: pip install faiss-cpu (or faiss-gpu-cu12 on CUDA)")
        if kind not in APPROX_BACKENDS:
            raise UserError(f"unknown approximate --search {kind!r}; known: {', '.join(APPROX_BACKENDS)}")
        stream = bank if isinstance(bank, Bank) else None
        self.n, self.dim = (bank.n, bank.dim) if stream else np.shape(bank)
        self.device, self.kind, self.ef_search = torch.device(device), kind, ef_search
        self.widened = 0   # IVF queries whose nprobe lists held fewer than k vectors (then probed wider)
        rows = (lambda a, b: stream.rows(a, b)) if stream else (
            lambda a, b: np.ascontiguousarray(bank[a:b], dtype=np.float32))
        step = stream.per_image * max(1, (1 << 18) // stream.per_image) if stream else 1 << 18
        gpu = kind == 'ivf' and self.device.type == 'cuda' and _faiss_gpu_available()
        if kind == 'ivf':
            self.nlist = int(nlist or max(1, min(int(4 * np.sqrt(self.n)), self.n // 39)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, self.nlist, faiss.METRIC_L2)
            if gpu:   # k-means assignments on the GPU; the trained index itself stays a CPU index until moved
                index.clustering_index = faiss.index_cpu_to_gpu(gpu_resources(), self.device.index or 0,
                                                                faiss.IndexFlatL2(self.dim))
            sample = seeded_indices(self.n, min(self.n, 64 * self.nlist), seed)
            index.train(self._gather(rows, sample, step, self.n))
            index.nprobe = self.nprobe = min(nprobe, self.nlist)
            self.describe = f"ivf (IndexIVFFlat, nlist {self.nlist}, nprobe {self.nprobe})"
        else:
            index = faiss.IndexHNSWFlat(self.dim, m)
            self.describe = f"hnsw (IndexHNSWFlat, M {m}, efSearch {ef_search})"
        for a in range(0, self.n, step):
            index.add(rows(a, min(self.n, a + step)))
        self.cpu_index = None   # the CPU copy of a GPU index, made when a search passes faiss-gpu's limits
        if gpu:
            index = faiss.index_cpu_to_gpu(gpu_resources(), self.device.index or 0, index)
        self.on_gpu = gpu
        self.index, self.backend = index, f'faiss-{kind}'

    @staticmethod
    def _gather(rows, picks, step, n):
        """Bank rows ``picks`` (sorted), read block by block."""
        out = []
        for a in range(0, int(picks[-1]) + 1, step):
            sel = picks[(picks >= a) & (picks < a + step)]
            if len(sel):
                out.append(rows(a, min(a + step, n))[sel - a])
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def kth_distance(self, queries, k):
        return self.search(queries, k, need_indices=False)[0][:, -1]

    def search(self, queries, k, need_indices=True):
        if not 1 <= k <= self.n:
            raise UserError(f"--k {k} is out of range: the bank holds {self.n} vectors, so 1 <= k <= {self.n}")
        if self.kind == 'hnsw':
            self.index.hnsw.efSearch = max(self.ef_search, k)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        nprobe = getattr(self, 'nprobe', None)
        d, i = self._search(q, k, nprobe)
        short = np.flatnonzero((i < 0).any(axis=1))
        if len(short) and self.kind == 'ivf':
            # The probed lists of these queries held fewer than k vectors: probe twice as many
            # lists for them, up to all of them (exact), so every score is a real k-th distance.
            self.widened += len(short)
            probe = nprobe
            while len(short) and probe < self.nlist:
                probe = min(self.nlist, 2 * probe)
                d[short], i[short] = self._search(q[short], k, probe)
                short = short[(i[short] < 0).any(axis=1)]
        if len(short):
            raise RuntimeError(f"{self.describe}: {len(short)} queries found fewer than {k} neighbours")
        return d.astype(np.float32, copy=False), (i if need_indices else None)

    def _search(self, q, k, nprobe):
        """One faiss search with ``nprobe`` lists (IVF). faiss's GPU IVF refuses k or nprobe
        above 2048 (``FAISS_GPU_MAX_K``): such a search runs on a CPU copy of the index, made
        once (``index_gpu_to_cpu``), with the same lists and vectors, so the same answers."""
        index = self.index
        if self.on_gpu and (k > FAISS_GPU_MAX_K or (nprobe or 0) > FAISS_GPU_MAX_K):
            if self.cpu_index is None:
                self.cpu_index = faiss.index_gpu_to_cpu(self.index)
            index = self.cpu_index
        if nprobe is None:
            return index.search(q, k)
        index.nprobe = nprobe
        try:
            return index.search(q, k)
        finally:
            index.nprobe = self.nprobe   # the configured nprobe for the next search


def knn_accuracy(bank, bank_labels, queries, labels, k, num_classes, device='cpu', backend='torch'):
    """ID accuracy of a kNN vote on L2-normalised vectors (the kNN monitor of InstDisc/MoCo):
    each of the k nearest bank vectors votes for its label with weight exp(cosine
    similarity) = exp(1 − d/2) for unit vectors at squared distance d."""
    from util.features import l2_normalize
    search = ExactKNN(l2_normalize(bank), device, backend=backend, k_max=k)
    k = min(k, search.n)
    dist, idx = search.search(l2_normalize(queries), k)
    votes = np.zeros((len(queries), num_classes))
    np.add.at(votes, (np.arange(len(queries))[:, None], np.asarray(bank_labels)[idx]), np.exp(1.0 - dist / 2.0))
    return float((votes.argmax(1) == np.asarray(labels)).mean())
