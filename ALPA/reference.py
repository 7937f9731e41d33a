"""Slow, literal reference implementations of ALPA's similarity and of the two losses.

Written straight from the equations (docs/METHOD.md §4–5), for the tests and for
``bench/bench_alpa.py``. ``reference_similarity`` computes what the authors' code does:
it materialises every aligned map, (Na·Nb)×HW×d numbers per direction, and calls
``F.cosine_similarity``. The losses are Python loops over anchors.
"""
import math

import torch
import torch.nn.functional as F


def reference_similarity(attention, features_a, features_b):
    """The authors' computation, reusing ``attention``'s query/key/value and dropout.

    features_a [Na, C, H, W], features_b [Nb, C, H, W] -> [Na, Nb].
    (Their broadcasting yields [Nb, Na]; it is transposed here to the module's layout.)
    """
    d = attention.inner_size
    tokens_a = features_a.flatten(2).transpose(1, 2).contiguous()  # [Na, HW, C]
    tokens_b = features_b.flatten(2).transpose(1, 2).contiguous()  # [Nb, HW, C]
    query_a, key_a, value_a = (attention.query(tokens_a), attention.key(tokens_a),
                               attention.value(tokens_a))
    query_b, key_b, value_b = (attention.query(tokens_b), attention.key(tokens_b),
                               attention.value(tokens_b))

    value_a = value_a.unsqueeze(0)  # [1, Na, HW, d]
    value_b = value_b.unsqueeze(1)  # [Nb, 1, HW, d]

    # b's tokens attend to a: [Nb, Na, HW, HW] @ [1, Na, HW, d] -> [Nb, Na, HW, d]
    scores = torch.matmul(query_b.unsqueeze(1), key_a.unsqueeze(0).transpose(-1, -2))
    probs = attention.dropout(torch.softmax(scores / math.sqrt(d), dim=-1))
    aligned_a = torch.matmul(probs, value_a)

    # a's tokens attend to b: [Nb, Na, HW, HW] @ [Nb, 1, HW, d] -> [Nb, Na, HW, d]
    scores = torch.matmul(query_a.unsqueeze(0), key_b.unsqueeze(1).transpose(-1, -2))
    probs = attention.dropout(torch.softmax(scores / math.sqrt(d), dim=-1))
    aligned_b = torch.matmul(probs, value_b)

    similarity = F.cosine_similarity(value_a, aligned_b, dim=-1)  # [Nb, Na, HW]
    similarity = similarity + F.cosine_similarity(value_b, aligned_a, dim=-1)

    if attention.aggregation == "logsum":
        lam = attention.lambda_lse
        similarity = torch.log(torch.exp(lam * similarity).sum(-1)) / lam
    elif attention.aggregation == "mean":
        similarity = similarity.mean(-1)
    elif attention.aggregation == "sum":
        similarity = similarity.sum(-1)
    elif attention.aggregation == "max":
        similarity = similarity.max(-1)[0]
    else:
        raise ValueError(attention.aggregation)
    return similarity.T  # [Na, Nb]


def _mean_log_prob_over_positives(logit_row, anchor, positives):
    """-(1/|P|) Σ_{p∈P} log softmax_{a≠anchor}(logit_row)_p; None when P is empty."""
    if not positives:
        return None
    others = [a for a in range(len(logit_row)) if a != anchor]
    log_denom = torch.log(sum(torch.exp(logit_row[a]) for a in others))
    return -sum(logit_row[p] - log_denom for p in positives) / len(positives)


def reference_supcon(features, labels=None, mask=None, temperature=0.07,
                     contrast_mode="all", base_temperature=0.07):
    """SupContrast's loss, one anchor at a time. features [B, V, D] -> scalar.

    Views are stacked view-major (index v·B + b), as SupContrast does; sample b is
    positive to anchor sample b' when mask[b', b] (labels equal; SimCLR: b == b').
    An anchor without a positive adds 0 to the mean over anchors.
    """
    batch, n_views, _ = features.shape
    if mask is None:
        if labels is None:
            mask = torch.eye(batch)
        else:
            mask = torch.tensor([[float(labels[i] == labels[j]) for j in range(batch)]
                                 for i in range(batch)])
    stacked = [features[k % batch, k // batch] for k in range(batch * n_views)]
    anchors = range(batch * n_views) if contrast_mode == "all" else range(batch)
    terms = []
    for i in anchors:
        logit_row = [torch.dot(stacked[i], z) / temperature for z in stacked]
        positives = [p for p in range(len(stacked)) if p != i and mask[i % batch, p % batch] > 0]
        term = _mean_log_prob_over_positives(logit_row, i, positives)
        terms.append(features.sum() * 0 if term is None
                     else (temperature / base_temperature) * term)
    return sum(terms) / len(terms)


def reference_alpa_loss(similarity, labels, temperature_s=10.0):
    """ALPA's loss, one anchor at a time. similarity [N, N], labels [N] -> scalar."""
    n = similarity.shape[0]
    terms = []
    for i in range(n):
        logit_row = [similarity[i, j] * temperature_s for j in range(n)]
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        term = _mean_log_prob_over_positives(logit_row, i, positives)
        terms.append(similarity.sum() * 0 if term is None else term)
    return sum(terms) / n
