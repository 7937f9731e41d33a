"""ALPA's cross-attention similarity between two sets of feature maps (docs/METHOD.md §4).

Each map of C channels and H×W positions is read as HW tokens. For a pair (a, b):

    q, k, v  = query(tokens), key(tokens), value(tokens)       # [HW, d] each
    P_ab     = softmax(q_a k_bᵀ / √d)   (rows: a's tokens)     # [HW, HW]
    aligned  = P_ab v_b                 (b aligned onto a)      # [HW, d]
    C_ab[i]  = cos(v_a[i], aligned[i])
    c_i      = C_ab[i] + C_ba[i]
    sim(a,b) = agg_i c_i,  agg ∈ {mean, max, sum, logsum}

The authors materialise every aligned map, (Na·Nb)×HW×d numbers per direction (about
5 GB for 2B = 256 views of 4×4×512). The cosine needs only two numbers per token, and
both come from HW×HW matrices (G_ab = v_a v_bᵀ):

    v_a[i] · aligned[i] = Σ_j P_ab[i,j] G_ab[i,j]
    ‖aligned[i]‖²       = (P_ab G_bb P_abᵀ)[i,i] = Σ_l (P_ab G_bb)[i,l] P_ab[i,l]

so a whole direction is two [Nb·HW, d] × [d, Na·HW] GEMMs (logits, G) plus one batched
HW×HW product, all exact (``AlignmentStats``). When both sets are the same tensor (the
training call) the second direction is the first one transposed and is not recomputed.
At 2B = 256 views of 4×4×512 maps, forward+backward of similarity and loss peaks at
~0.21 GB instead of ~5.4 GB and runs ~26× faster on two CPU cores (``bench/bench_alpa.py``).
"""
import math

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

AGGREGATIONS = ("mean", "max", "sum", "logsum")


def projector(dim, projection_size):
    """Linear(C,C)–ReLU–Linear(C,d), no bias; indices 0 and 2 match the authors' keys."""
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False),
        nn.ReLU(),
        nn.Linear(dim, projection_size, bias=False),
    )


class AlignmentStats(torch.autograd.Function):
    """The two numbers per (b, token of a) that the cosine needs, with a hand-written backward.

    Inputs: query_a [X, d] (X = Na·n tokens of set A, already scaled by 1/√d),
    value_a [X, d], key_b [Nb, m, d], value_b [Nb, m, d], drop_prob (float, 0 = off).

        P[b, j, x]   = softmax_j(k_b[j] · q_x)            # [Nb, m, X], P_ab transposed
        P'           = dropout(P)
        G[b, j, x]   = v_b[j] · v_x                       # [Nb, m, X]
        dot[b, x]    = Σ_j P'[b,j,x] G[b,j,x]             = v_x · aligned
        sq[b, x]     = Σ_l P'[b,l,x] (G_bb P')[b,l,x]     = ‖aligned‖²,  G_bb = v_b v_bᵀ

    Returns dot, sq, each [Nb, X]. G_bb P' costs m³ per pair against m²d for forming
    the aligned vectors: cheaper whenever HW ≤ d (16 or 49 tokens against d = 80), and it
    is never larger than P.

    Why not plain autograd: every [Nb, m, X] temporary (64 MB in fp32 at 2B = 256, 4×4
    maps) is a fresh allocation and a pass over memory, and autograd keeps three of them
    for backward. Here forward saves only P (and, with dropout, the keep mask); backward
    recomputes G with one GEMM into a buffer it owns and works in place inside it (G
    becomes ∂L/∂P', then ∂L/∂logits), next to one scratch buffer. On the CPU both go
    through the b axis a tile at a time (``tile_size``), so the work buffers are tile-sized
    and each tile is passed over while it is still in cache; a GPU does the same with tiles
    sized from its free memory. Peak about Nb·m·X numbers plus a few tiles. Double backward
    is not supported.
    """

    @staticmethod
    def forward(ctx, query_a, value_a, key_b, value_b, drop_prob):
        # The in-place buffer reuse below needs one dtype throughout.
        with torch.autocast(query_a.device.type, enabled=False):
            return AlignmentStats._forward(ctx, query_a, value_a, key_b, value_b, drop_prob)

    @staticmethod
    def _forward(ctx, query_a, value_a, key_b, value_b, drop_prob):
        num_b, m, d = key_b.shape
        num_x = query_a.shape[0]
        keep, scale = None, 1.0
        if drop_prob > 0:
            # nn.Dropout's rule: keep with probability 1 - p, scale kept by 1 / (1 - p). One
            # draw over the whole [Nb, m, X], whatever the tiling.
            keep = torch.empty(num_b, m, num_x, dtype=torch.bool,
                               device=query_a.device).bernoulli_(1.0 - drop_prob)
            scale = 1.0 / (1.0 - drop_prob) if drop_prob < 1 else 0.0
        gram_bb = torch.bmm(value_b, value_b.transpose(1, 2))  # [Nb, m, m]
        probs = query_a.new_empty(num_b, m, num_x)
        dot, sq_norm = query_a.new_empty(num_b, num_x), query_a.new_empty(num_b, num_x)
        step = tile_size(num_b, m, num_x, query_a.device, query_a.element_size())
        work = query_a.new_empty(min(step, num_b), m, num_x)
        for s in range(0, num_b, step):
            e = min(num_b, s + step)
            rows = (e - s) * m
            p = probs[s:e]
            torch.mm(key_b[s:e].reshape(rows, d), query_a.T, out=p.view(rows, num_x))
            p.copy_(torch.softmax(p, dim=1))  # [c, m, X]
            used = p if keep is None else p * keep[s:e] * scale
            # One work buffer: G, then P'⊙G, then G_bb P', then P'⊙(G_bb P').
            w = work[:e - s]
            torch.mm(value_b[s:e].reshape(rows, d), value_a.T, out=w.view(rows, num_x))  # G
            torch.sum(w.mul_(used), dim=1, out=dot[s:e])
            torch.bmm(gram_bb[s:e], used, out=w)
            torch.sum(w.mul_(used), dim=1, out=sq_norm[s:e])
        ctx.save_for_backward(query_a, value_a, key_b, value_b, probs, keep, gram_bb)
        ctx.scale = scale
        return dot, sq_norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dot, grad_sq):
        query_a, value_a, key_b, value_b, probs, keep, gram_bb = ctx.saved_tensors
        num_b, m, d = key_b.shape
        num_x = query_a.shape[0]
        grad_query_a, grad_value_a = torch.zeros_like(query_a), torch.zeros_like(value_a)
        grad_key_b, grad_value_b = torch.empty_like(key_b), torch.empty_like(value_b)
        step = tile_size(num_b, m, num_x, query_a.device, query_a.element_size())
        buffers = query_a.new_empty(2, min(step, num_b), m, num_x)
        for s in range(0, num_b, step):
            e = min(num_b, s + step)
            c, rows = e - s, (e - s) * m
            p, vb, kb = probs[s:e], value_b[s:e], key_b[s:e]
            used = p if keep is None else p * keep[s:e] * ctx.scale
            g_dot, g_sq = grad_dot[s:e].unsqueeze(1), grad_sq[s:e].unsqueeze(1)  # [c, 1, X]
            gram_ab, scratch = buffers[0, :c], buffers[1, :c]
            # ∂/∂P' = grad_dot·G + 2·grad_sq·(G_bb P'), built in a recomputed G.
            torch.mm(vb.reshape(rows, d), value_a.T, out=gram_ab.view(rows, num_x))
            torch.bmm(gram_bb[s:e], used, out=scratch)
            grad_used = gram_ab.mul_(g_dot).add_(scratch.mul_(g_sq).mul_(2))
            # ∂/∂G = grad_dot·P'  ->  v_b and v_a through G = v_b v_aᵀ.
            grad_gram_ab = torch.mul(used, g_dot, out=scratch).view(rows, num_x)
            grad_vb = torch.mm(grad_gram_ab, value_a).view(c, m, d)
            grad_value_a.addmm_(grad_gram_ab.T, vb.reshape(rows, d))
            # ∂/∂G_bb = P' diag(grad_sq) P'ᵀ (symmetric), and G_bb = v_b v_bᵀ.
            grad_gram_bb = torch.bmm(torch.mul(used, g_sq, out=scratch), used.transpose(1, 2))
            torch.baddbmm(grad_vb, grad_gram_bb, vb, alpha=2, out=grad_value_b[s:e])
            # Back through dropout, then softmax over j: ∂/∂logits = P ⊙ (∂/∂P − Σ_j P ∂/∂P).
            if keep is not None:
                grad_used.mul_(keep[s:e]).mul_(ctx.scale)
            inner = torch.mul(p, grad_used, out=scratch).sum(dim=1, keepdim=True)
            grad_logits = grad_used.sub_(inner).mul_(p).view(rows, num_x)
            torch.mm(grad_logits, query_a, out=grad_key_b[s:e].view(rows, d))
            grad_query_a.addmm_(grad_logits.T, kb.reshape(rows, d))
        return grad_query_a, grad_value_a, grad_key_b, grad_value_b, None


# The CPU works through AlignmentStats' [Nb, m, X] tensors a few b at a time, so that each
# tile (~2 MB in fp32) stays in cache across the eight passes over it; 1.5x faster than
# whole-tensor passes at 2B = 256 views of 4x4 maps, with the same arithmetic (forward
# bit-equal; the gradients of A's tokens are summed tile by tile, equal to rounding).
TILE_ELEMENTS = 1 << 19
# A GPU gains nothing from cache-sized tiles, but whole-tensor buffers cost memory: at 512
# views of 7×7 maps one [Nb, m, X] fp32 buffer is ~2.5 GB and a step holds 3-5 of them. Its
# tiles are as large as a slice of the free memory allows (each work buffer at most 1/16 of
# it, at most 1 GiB), so the peak is P (saved for backward) plus a few tiles.
CUDA_TILE_SHARE, CUDA_TILE_MAX_BYTES = 16, 1 << 30
_cuda_tile_bytes = {}


def cuda_tile_bytes(device):
    """Bytes of one work buffer on ``device``, from its free memory at the first ALPA step
    (``mem_get_info``, read once per device: it is a driver call)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _cuda_tile_bytes:
        free = torch.cuda.mem_get_info(key)[0]
        _cuda_tile_bytes[key] = max(1 << 20, min(CUDA_TILE_MAX_BYTES, free // CUDA_TILE_SHARE))
    return _cuda_tile_bytes[key]


def tile_size(num_b, m, num_x, device, element_size=4):
    """How many sets b one tile holds."""
    if device.type == 'cuda':
        elements = cuda_tile_bytes(device) // element_size
    elif device.type == 'cpu':
        elements = TILE_ELEMENTS
    else:
        return num_b
    return max(1, min(num_b, elements // max(1, m * num_x)))


class AttentionSimilarity(nn.Module):
    """Attention-aligned spatial similarity of every map in set A to every map in set B.

    Args:
        hidden_size: C, channels of the input maps.
        inner_size: d, width of query/key/value (`--feat-dim`, default 80).
        aggregation: how the HW per-position scores c_i become one number:
            'mean' (default), 'max', 'sum', or 'logsum' = log Σ_i exp(λ c_i) / λ.
        lambda_lse: λ of 'logsum' (default 6).
        drop_prob: dropout on the attention probabilities (default 0).

    forward(features_a [Na, C, H, W], features_b [Nb, C, H, W] or None) -> [Na, Nb].
    ``features_b=None`` (or the very same tensor as ``features_a``) is the training case,
    all 2B views against themselves; the result is then symmetric.

    The state dict holds exactly ``{query,key,value}.{0,2}.weight``, as in the authors'
    checkpoints.
    """

    def __init__(self, hidden_size, inner_size=80, aggregation="mean", lambda_lse=6.0,
                 drop_prob=0.0):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.hidden_size = hidden_size
        self.inner_size = inner_size
        self.aggregation = aggregation
        self.lambda_lse = lambda_lse
        self.query = projector(hidden_size, inner_size)
        self.key = projector(hidden_size, inner_size)
        self.value = projector(hidden_size, inner_size)
        self.dropout = nn.Dropout(drop_prob)
        # Same clamp as F.cosine_similarity: each norm is raised to at least eps.
        self.eps = 1e-8

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, inner_size={self.inner_size}, "
                f"aggregation={self.aggregation!r}, lambda_lse={self.lambda_lse}")

    def project(self, features):
        """[N, C, H, W] -> q, k, v, each [N, HW, d]; q already carries the 1/√d.

        Under autocast the projections may come out in half precision; the softmaxes
        and cosines that follow run in fp32 at least.
        """
        tokens = features.flatten(2).transpose(1, 2).contiguous()  # [N, HW, C], copied once
        query, key, value = self.query(tokens), self.key(tokens), self.value(tokens)
        dtype = torch.promote_types(value.dtype, torch.float32)
        return (query.to(dtype) / math.sqrt(self.inner_size), key.to(dtype), value.to(dtype))

    def align_cosine(self, query_a, value_a, value_a_norm, key_b, value_b):
        """C[b, a, i] = cos(v_a[i], (P_ab v_b)[i]): every token of every a, aligned onto b.

        Args:
            query_a [Na, n, d] (scaled by 1/√d), value_a [Na, n, d], value_a_norm [Na, n]
            (already clamped to eps), key_b [Nb, m, d], value_b [Nb, m, d].
        Returns:
            [Nb, Na, n].
        """
        num_a, n, d = query_a.shape
        num_b = key_b.shape[0]
        drop_prob = self.dropout.p if self.training else 0.0
        dot, sq_norm = AlignmentStats.apply(query_a.reshape(num_a * n, d),
                                            value_a.reshape(num_a * n, d),
                                            key_b, value_b, drop_prob)  # [Nb, Na·n] each
        # sqrt of the clamped square = max(‖aligned‖, eps), without sqrt's infinite slope at 0.
        aligned_norm = sq_norm.clamp_min(self.eps ** 2).sqrt()
        cosine = dot / (aligned_norm * value_a_norm.reshape(1, num_a * n))
        return cosine.view(num_b, num_a, n)

    def aggregate(self, scores):
        """[..., HW] per-position scores c_i -> [...]."""
        if self.aggregation == "mean":
            return scores.mean(dim=-1)
        if self.aggregation == "sum":
            return scores.sum(dim=-1)
        if self.aggregation == "max":
            return scores.max(dim=-1).values
        # 'logsum': log Σ exp(λ c) / λ, a soft maximum.
        return torch.logsumexp(self.lambda_lse * scores, dim=-1) / self.lambda_lse

    def forward(self, features_a, features_b=None):
        """features_a [Na, C, H, W], features_b [Nb, C, H, W] (None: same as a) -> [Na, Nb]."""
        same_set = features_b is None or features_b is features_a
        if features_b is None:
            features_b = features_a
        if features_a.shape[1:] != features_b.shape[1:]:
            raise ValueError(f"feature maps differ: {tuple(features_a.shape)} vs "
                             f"{tuple(features_b.shape)}")
        query_a, key_a, value_a = self.project(features_a)  # [Na, HW, d] each
        norm_a = value_a.norm(dim=-1).clamp_min(self.eps)  # [Na, HW]
        # With one set, direction b→a of pair (a, b) is direction a→b of pair (b, a): one
        # pass gives both. Not with live dropout, where the authors draw separate masks
        # for the two directions.
        if same_set and not (self.training and self.dropout.p > 0):
            cosine = self.align_cosine(query_a, value_a, norm_a, key_a, value_a)  # [N, N, HW]
            scores = cosine + cosine.transpose(0, 1)
        else:
            query_b, key_b, value_b = self.project(features_b)
            norm_b = value_b.norm(dim=-1).clamp_min(self.eps)
            # [Nb, Na, HW]: a's tokens aligned with b's.  [Na, Nb, HW]: b's with a's.
            cosine_a = self.align_cosine(query_a, value_a, norm_a, key_b, value_b)
            cosine_b = self.align_cosine(query_b, value_b, norm_b, key_a, value_a)
            scores = cosine_a.transpose(0, 1) + cosine_b  # [Na, Nb, HW]
        return self.aggregate(scores)
